"""Runs the whole Snakefile on a tiny config in a temporary folder (a few minutes on 2 cores)."""

import base64
import json
import re
import shlex
import shutil
import subprocess

import matplotlib.image
import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

import ctvlp
from ctvlp import catalog
from ctvlp.config import validate
from ctvlp.model.io import load_model
from htmlpage import tables as page_tables

from conftest import REPO
from snakemake_run import TEST_CONFIG, planned_jobs, planned_rules, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    shutil.copy(TEST_CONFIG, wd / "config.yaml")
    out = snakemake(wd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return wd


def test_outputs_hold_what_each_stage_promises(run):
    r = run / "results"
    man = pl.read_parquet(r / "cohort/manifest.parquet")
    assert len(man) == 24 and set(man["split"]) == {"train", "val", "test"}
    # reports: one row per case and anatomy, with both normal and abnormal statuses
    rep = pl.read_parquet(r / "reports/reports.parquet")
    assert len(rep) == 24 * len(catalog.anatomies())
    assert {"normal", "abnormal"} <= set(rep["status"])
    # preprocessing: target spacing, [0, 1] float16 image, anatomy labels of the catalog
    case = man["case_id"][0]
    meta = json.loads((r / f"preprocessed/{case}/meta.json").read_text(encoding="utf-8"))
    assert meta["spacing"] == pytest.approx([8.0, 8.0, 8.0]) and meta["original_spacing"] != meta["spacing"]
    img = np.load(r / f"preprocessed/{case}/image.npy")
    anat = np.load(r / f"preprocessed/{case}/anatomy.npy")
    assert img.dtype == np.float16 and 0 <= img.min() and img.max() <= 1 and img.shape == anat.shape
    assert len(set(np.unique(anat)) - {0}) >= 14
    tab = pl.read_parquet(r / f"segment/{case}/anatomies.parquet")
    assert tab["present"].sum() >= 14
    # data QC: every demo case kept, its HU decision recorded, no exclusions
    qc = pl.read_parquet(r / "qc/qc.parquet")
    assert sorted(qc["case_id"]) == sorted(man["case_id"]) and qc["hu_decision"].str.contains("already HU").all()
    assert len(pl.read_parquet(r / "qc/excluded.parquet")) == 0
    assert pl.read_parquet(r / "qc/cases.parquet")["case_id"].to_list() == man["case_id"].to_list()
    # training: a finite loss per step and one validation loss per epoch; loadable weights
    metrics = pl.read_csv(r / "train/align/metrics.csv")
    assert len(metrics.filter(pl.col("split") == "val")) == 2
    assert metrics["loss"].is_finite().all()
    model = load_model(r / "train/align")
    assert model.vision.net.layer4[0].conv1.out_channels == 16
    # the four phases ran in a chain: phase 2 started from phase 1, the evaluated model is phase 4's
    assert json.loads((r / "train/align/config.json").read_text(encoding="utf-8"))["init"].endswith("train/visual_cl")
    assert load_model(r / "train/boost").boost
    normality = json.loads((r / "train/normality/config.json").read_text(encoding="utf-8"))["normality"]
    assert normality["n_normal"] > 0 and normality["recon_normal"] > 0
    # evaluation: one row per zero-shot demo disease plus the mean; numbers recomputed from predictions
    table = pl.read_csv(r / "eval/zeroshot.csv")
    pred = pl.read_parquet(r / "eval/predictions.parquet")
    ids = [d.id for d in catalog.diseases("demo") if d.zero_shot]
    assert table["disease_id"].to_list() == ids + ["mean"]
    for row in table.filter(pl.col("disease_id") != "mean").iter_rows(named=True):
        t = pred.filter((pl.col("disease_id") == row["disease_id"]) & (pl.col("split") == "test")
                        & pl.col("evaluable"))
        if t["label"].n_unique() == 2:
            assert row["auc"] == pytest.approx(roc_auc_score(t["label"], t["score"]))
    assert (r / "eval/zeroshot.md").read_text(encoding="utf-8").count("|") > 20
    organs = pl.read_csv(r / "eval/zeroshot_by_organ.csv")
    assert set(organs["organ"]) == {d.organ for d in catalog.diseases("demo")}
    mean = table.filter(pl.col("disease_id") == "mean").row(0, named=True)
    assert mean["auc_ci_low"] <= mean["auc"] <= mean["auc_ci_high"]
    # the linear probe: same diseases with ground truth, same metric columns
    probe = pl.read_csv(r / "eval/linear_probe.csv")
    assert set(probe["disease_id"]) >= set(ids) and {"auc", "sensitivity", "threshold"} <= set(probe.columns)
    # every rule wrote a log and a benchmark
    assert (r / "logs/train/train_align.log").stat().st_size > 0
    assert (r / "benchmarks/train/train_align.tsv").read_text(encoding="utf-8").startswith("s\t")


def test_the_model_bundle_holds_the_boost_model_and_the_evaluations_thresholds(run):
    r = run / "results"
    content = json.loads((r / "model/bundle.json").read_text(encoding="utf-8"))
    assert (r / "model/model.safetensors").read_bytes() == (r / "train/boost/model.safetensors").read_bytes()
    table = pl.read_csv(r / "eval/zeroshot.csv").filter(pl.col("disease_id") != "mean").drop_nulls("threshold")
    assert content["thresholds"]["values"] == dict(zip(table["disease_id"], table["threshold"]))
    assert content["diseases"]["prompt_style"] == table["prompt_style"][0]
    assert content["settings"]["preprocess"]["spacing"] == [8.0, 8.0, 8.0]
    assert content["settings"]["model"]["vq_codes"] == 4
    # the run's own config agrees with the bundle on every key it fixes
    run_config = validate(yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8")))
    assert ctvlp.load_model(r / "model", run_config, device="cpu").thresholds == content["thresholds"]["values"]


def _embedded_html(report_html: str) -> dict[str, str]:
    """{file name: its text} of every HTML file the report embeds (as base64 data URIs: shown in
    an iframe, i.e. inline, not as a download)."""
    found = re.findall(r"data:text/html;charset=[\w-]+;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", report_html)
    return {name: base64.b64decode(data).decode("utf-8") for name, data in found}


def test_html_report_holds_tables_figures_and_captions(run):
    out = snakemake(run, "--report", "report.html")
    assert out.returncode == 0, out.stderr[-3000:]
    html = (run / "report.html").read_text(encoding="utf-8")
    for name in ("roc_per_organ.png", "tsne.png", "activation_histograms.png", "activation_maps.png",
                 "metrics.csv", *(f"training_{phase}.png" for phase in ("visual_cl", "align", "normality", "boost"))):
        assert name in html, name
    assert "t-SNE of test anatomy embeddings" in html  # a caption from workflow/report/
    assert "Phase 3, the normality VQ-VAE" in html  # each training phase has its own caption
    assert "System Message" not in html  # every caption is valid reStructuredText (docutils embeds its errors)
    # every table is embedded as an HTML page (shown inline) holding the table's own numbers
    tables = _embedded_html(html)
    assert {"zeroshot.html", "zeroshot_by_organ.html", "zeroshot_by_type.html", "linear_probe.html",
            "linear_probe_by_organ.html", "linear_probe_by_type.html", "summary.html"} <= set(tables), sorted(tables)
    # the data QC summary: its counts, exclusions and HU decisions as the qc tables hold them
    qc_page = page_tables(tables["summary.html"])
    man, qc = pl.read_parquet(run / "results/qc/cases.parquet"), pl.read_parquet(run / "results/qc/qc.parquet")
    excluded = pl.read_parquet(run / "results/qc/excluded.parquet")
    counts = dict(qc_page["Counts"][1])
    assert counts["cases in the manifest"] == str(len(pl.read_parquet(run / "results/cohort/manifest.parquet")))
    assert counts["cases processed and kept"] == str(len(man)) == str(len(qc))
    assert counts["exclusions recorded"] == str(len(excluded)) == "0"
    assert qc_page["Excluded cases"][1] == [] and "No case was excluded." in tables["summary.html"]
    decisions = qc.group_by("hu_decision").len()
    assert sorted(qc_page["Kept cases per HU decision"][1]) == sorted(
        [d, str(n)] for d, n in decisions.iter_rows()), qc_page["Kept cases per HU decision"]
    assert "Data QC: how many cases" in html  # its caption
    for stem in ("zeroshot", "linear_probe"):
        csv = pl.read_csv(run / f"results/eval/{stem}.csv")
        page = tables[f"{stem}.html"]
        assert page.count("<tr") == len(csv) + 1 and 'class="sortable"' in page
        mean = csv.filter(pl.col("disease_id") == "mean").row(0, named=True)
        for key in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity"):
            assert f">{mean[key]:.3f}</td>" in page, (stem, key, mean[key])
        for row in csv.filter(pl.col("disease_id") != "mean").iter_rows(named=True):
            shown = "n/a" if row["auc"] is None or np.isnan(row["auc"]) else f"{row['auc']:.3f}"
            assert f">{shown}</td>" in page, (stem, row["disease_id"])
    organs = pl.read_csv(run / "results/eval/zeroshot_by_organ.csv").filter(pl.col("auc").is_finite())
    assert len(organs) and all(f">{a:.3f}</td>" in tables["zeroshot_by_organ.html"] for a in organs["auc"])
    img = matplotlib.image.imread(run / "results/eval/figures/roc_per_organ.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0  # a drawn figure, not blank


def test_rerun_has_nothing_to_do(run):
    assert planned_rules(run) == set()


def test_parameter_change_reruns_only_dependent_rules(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["evaluate"] = {"threshold": "closest"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        # the model bundle too: its thresholds and its settings
        assert planned_rules(run) == {"evaluate_zeroshot", "linear_probe", "figures", "bundle", "all"}
        cfg["preprocess"]["spacing"] = [9.0, 9.0, 9.0]
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        jobs = planned_jobs(run)
        assert set(jobs) == {"preprocess", "qc", "train", "evaluate_zeroshot", "linear_probe", "figures", "bundle",
                             "all"}
        assert jobs["train"] == 4  # every phase of the chain, from the first
        cfg = yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8"))
        cfg["train"]["threads"], cfg["train"]["checkpoint_every"] = 1, 7  # runtime keys: nothing to redo
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert planned_rules(run) == set()
    finally:
        shutil.copy(TEST_CONFIG, run / "config.yaml")


def test_bad_config_stops_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": "many"}}))
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0
    assert "train.epochs" in out.stdout + out.stderr


def test_every_command_gets_the_rules_threads(run):
    # every rule after the cohort checkpoint (forcing the checkpoint itself would hide what follows it)
    forced = ("segment", "preprocess", "qc", "reports", "train", "evaluate_zeroshot", "linear_probe", "figures")
    out = snakemake(run, "-n", "-p", "--cores", "1", "--forcerun", *forced)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    jobs = planned_jobs(run, "--cores", "1", "--forcerun", *forced)
    assert set(forced) <= set(jobs), jobs
    commands = [line for line in text.splitlines() if "Shell command: " in line and " ctvlp " in f" {line} "]
    # one ctvlp command per planned job (the aggregate rule ``all`` has none)
    assert len(commands) == sum(n for rule, n in jobs.items() if rule != "all"), (len(commands), jobs)
    assert all(" --threads 1 " in c for c in commands), [c for c in commands if " --threads 1 " not in c][:3]


@pytest.mark.parametrize("configfile", [None, TEST_CONFIG])
def test_lint_is_clean(configfile):
    out = snakemake(REPO, "--lint", *(["--configfile", str(configfile)] if configfile else []))
    assert out.returncode == 0 and "good condition" in out.stdout + out.stderr


@pytest.mark.parametrize("target", ["demo", "ablation", "lesions", "paper", "holdout"])
def test_make_targets_plan_their_workflow(tmp_path, target):
    """The Makefile's snakemake commands, as make would run them, plan the intended jobs (dry run in
    a copy of the configs): argument order matters (--configfile takes every word after it)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for name in ("config.yaml", "config.ablation.yaml", "config.lesions.yaml", "config.paper.yaml",
                 "config.holdout.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), target], capture_output=True, text=True, check=True)
    runs = [shlex.split(line) for line in out.stdout.splitlines()
            if "snakemake" in line.split()[0] and "--report" not in line]
    assert runs, out.stdout
    for argv in runs:
        jobs = planned_jobs(tmp_path, *argv[1:])
        assert jobs.get("cohort") == 1 and jobs.get("all") == 1, jobs  # the rest waits for the cohort checkpoint
        if target in ("ablation", "paper", "holdout"):
            assert jobs.get("ablation") == 1 and jobs["train"] == 8 and jobs["evaluate_zeroshot"] == 5, jobs
        if target == "lesions":  # the workflow of config.yaml (no ablation variants), into its own folder
            assert "ablation" not in jobs, jobs
            plan = snakemake(tmp_path, "-n", *argv[1:])
            assert "results_lesions/cohort/manifest.parquet" in plan.stdout + plan.stderr
    if target == "holdout":  # the defaults, then the paper preset, each into its own folder
        folders = [snakemake(tmp_path, "-n", *argv[1:]) for argv in runs]
        assert ["results_holdout/cohort/manifest.parquet" in f.stdout for f in folders] == [True, False]
        assert ["results_holdout_paper/cohort/manifest.parquet" in f.stdout for f in folders] == [False, True]
