"""CT-RATE as downloaded, through the whole workflow: config.ctrate.yaml (the README's CT-RATE
example, only its /data/CT-RATE prefix replaced) on a CT-RATE-shaped folder built from real CTs and
real CT-RATE reports (tests/ctrate_fixture.py), with tiny model and training settings and the
fixture's precomputed segmentations on top. A few minutes on 2 cores."""

import re

import polars as pl
import pytest
import yaml

import ctrate_fixture
from ctvlp import catalog

from conftest import REPO
from snakemake_run import TEST_CONFIG, snakemake

pytestmark = pytest.mark.slow

CONFIG = REPO / "config.ctrate.yaml"


def overlay(seg_dir) -> dict:
    """The tiny model and training of the tests' whole-workflow config, the fixture's segmentations,
    and a validation fraction that leaves several validation patients out of twelve."""
    tiny = yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8"))
    return {"seed": tiny["seed"], "shard_size": tiny["shard_size"], "model": tiny["model"], "train": tiny["train"],
            "evaluate": tiny["evaluate"], "preprocess": {"spacing": [8.0, 8.0, 8.0]},
            "segment": {"backend": "precomputed", "path": str(seg_dir)},
            "cohort": {"ctrate": {"val_fraction": 0.34}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    why = ctrate_fixture.available()
    if why:
        pytest.skip(why)
    wd = tmp_path_factory.mktemp("ctrate")
    built = ctrate_fixture.build(wd / "CT-RATE", wd / "seg")
    (wd / "config.yaml").write_text(CONFIG.read_text(encoding="utf-8").replace("/data/CT-RATE", str(wd / "CT-RATE")))
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay(wd / "seg")))
    out = snakemake(wd, "--configfile", str(wd / "overlay.yaml"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return wd, built


def test_splits_labels_and_exclusions(run):
    wd, built = run
    r = wd / "results_ctrate"
    man = pl.read_parquet(r / "cohort/manifest.parquet")
    split = dict(zip(man["case_id"], man["split"]))
    counts = man["split"].value_counts()
    assert set(counts["split"]) == {"train", "val", "test"} and counts["count"].min() > 0
    # CT-RATE valid -> test; CT-RATE train -> train or val, by patient
    assert {c for c, s in split.items() if s == "test"} == {v for v in built["volumes"] if v.startswith("valid")} - {
        ctrate_fixture.NO_METADATA}
    assert all(s in ("train", "val") for c, s in split.items() if c.startswith("train"))
    # test labels read from the valid labels CSV, exactly
    truth = pl.read_parquet(r / "cohort/ground_truth.parquet")
    names = {d.id: d.name for d in catalog.diseases("ctrate")}
    expected = {(row["VolumeName"].removesuffix(".nii.gz"), d_id): row[name]
                for row in built["labels"].iter_rows(named=True) for d_id, name in names.items()}
    test_truth = truth.filter(pl.col("case_id").is_in([c for c, s in split.items() if s == "test"]))
    assert len(test_truth) == 6 * len(names)
    assert all(expected[(c, d)] == lab for c, d, lab in test_truth.select("case_id", "disease_id", "label").iter_rows())
    # every exclusion named with its reason, and nothing else excluded
    excluded = pl.read_parquet(r / "qc/excluded.parquet")
    assert dict(zip(excluded["case_id"], excluded["reason"])).keys() == ctrate_fixture.EXCLUDED.keys()
    for case_id, reason in zip(excluded["case_id"], excluded["reason"]):
        assert ctrate_fixture.EXCLUDED[case_id] in reason, (case_id, reason)
    assert sorted(pl.read_parquet(r / "qc/cases.parquet")["case_id"]) == sorted(man["case_id"])
    summary = (r / "qc/summary.md").read_text(encoding="utf-8")
    assert all(c in summary for c in ctrate_fixture.EXCLUDED)


def test_evaluation_tables_on_the_test_split(run):
    wd, _ = run
    r = wd / "results_ctrate"
    table = pl.read_csv(r / "eval/zeroshot.csv")
    zero_shot = [d.id for d in catalog.diseases("ctrate") if d.zero_shot]
    assert table["disease_id"].to_list() == zero_shot + ["mean"]
    pred = pl.read_parquet(r / "eval/predictions.parquet").filter(pl.col("split") == "test")
    assert pred["case_id"].n_unique() == 6
    # lungs are complete in the chest volumes, absent as a whole from the abdomen CT
    lung = pred.filter(pl.col("anatomy") == "lung")
    chest = lung.filter(~pl.col("case_id").is_in(list(ctrate_fixture.ABDOMEN)))
    assert chest["evaluable"].all() and chest["score"].is_not_null().all()
    assert not lung.filter(pl.col("case_id").is_in(list(ctrate_fixture.ABDOMEN)))["evaluable"].any()
    # the fixture's test split holds lung-nodule positives and negatives: an AUC is computed
    nodule = table.filter(pl.col("disease_id") == "lung_nodule").row(0, named=True)
    assert 0.0 <= nodule["auc"] <= 1.0
    assert re.search(r"\|\s*Lung nodule\s*\|", (r / "eval/zeroshot.md").read_text(encoding="utf-8"), re.IGNORECASE)


def test_readme_shows_the_tested_config():
    """The README's CT-RATE example is this file, word for word."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    assert CONFIG.read_text(encoding="utf-8") in blocks
