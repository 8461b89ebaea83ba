"""Runs the whole Snakefile on a tiny config in a temporary folder (a few minutes on 2 cores)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ctvlp import catalog
from ctvlp.train import load_model
from conftest import REPO

pytestmark = pytest.mark.slow

TINY = {
    "results": "results",
    "seed": 1,
    "cohort": {"n_cases": 24, "split": [0.5, 0.25, 0.25]},
    "preprocess": {"spacing": [8.0, 8.0, 8.0]},
    "model": {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3,
              "train_text_head": False, "vq_codes": 4, "vq_dim": 16, "vq_depth": 1, "vq_heads": 2},
    "train": {"epochs": 2, "batch_size": 4, "crop_size": [40, 32, 48], "lr": 1e-3, "threads": 2,
              "visual_cl": {"epochs": 1}, "normality": {"epochs": 1}, "boost": {"epochs": 1}},
    "evaluate": {"bootstrap": 100},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--cores", "2", *args], capture_output=True, text=True, env=env, timeout=900)


def planned_rules(workdir: Path) -> set[str]:
    out = snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return set()
    stats = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", stats, re.M)} - {"job"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    (wd / "config.yaml").write_text(yaml.safe_dump(TINY))
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


def test_html_report_holds_tables_figures_and_captions(run):
    out = snakemake(run, "--report", "report.html")
    assert out.returncode == 0, out.stderr[-3000:]
    html = (run / "report.html").read_text(encoding="utf-8")
    for name in ("zeroshot.md", "zeroshot_by_organ.md", "linear_probe.md", "summary.md", "roc_per_organ.png",
                 "tsne.png", "activation_histograms.png", "activation_maps.png", "metrics.csv"):
        assert name in html, name
    assert "t-SNE of test anatomy embeddings" in html  # a caption from workflow/report/
    import matplotlib.image

    img = matplotlib.image.imread(run / "results/eval/figures/roc_per_organ.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0  # a drawn figure, not blank


def test_rerun_has_nothing_to_do(run):
    assert planned_rules(run) == set()


def test_parameter_change_reruns_only_dependent_rules(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["evaluate"] = {"threshold": "closest"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        assert planned_rules(run) == {"evaluate_zeroshot", "linear_probe", "figures", "all"}
        cfg["preprocess"]["spacing"] = [9.0, 9.0, 9.0]
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert planned_rules(run) == {"preprocess", "qc", "train_visual_cl", "train_align", "train_normality", "train_boost",
                                      "evaluate_zeroshot", "linear_probe", "figures", "all"}
    finally:
        (run / "config.yaml").write_text(yaml.safe_dump(TINY))


def test_bad_config_stops_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": "many"}}))
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0
    assert "train.epochs" in out.stdout + out.stderr


def test_lint_is_clean():
    out = snakemake(REPO, "--lint")
    assert out.returncode == 0 and "good condition" in out.stdout + out.stderr
