"""The cohort stage on CT-RATE as downloaded (tests/ctrate_fixture.py), with config.ctrate.yaml's own
settings: the CSV keys take the train and valid files together, and a test split without labels
is said out loud."""

import logging

import polars as pl
import pytest
import yaml

import ctrate_fixture
from ctvlp import config as cfgmod
from ctvlp.cohort.stage import build_cohort

from conftest import REPO


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    why = ctrate_fixture.available()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("ctrate")
    ctrate_fixture.build(root / "CT-RATE", root / "seg")
    text = (REPO / "config.ctrate.yaml").read_text(encoding="utf-8").replace("/data/CT-RATE", str(root / "CT-RATE"))
    return root, cfgmod.validate(yaml.safe_load(text))


def test_train_and_valid_csvs_together(download, tmp_path):
    _, settings = download
    paths = build_cohort(settings, tmp_path / "cohort")
    man = pl.read_parquet(paths["manifest"])
    counts = dict(man["split"].value_counts().iter_rows())
    assert counts["test"] == 6 and counts["train"] + counts["val"] == ctrate_fixture.TRAIN_PATIENTS
    assert counts["val"] >= 1  # 10% of 12 patients, rounded by the patient split
    truth = pl.read_parquet(paths["ground_truth"])
    assert set(man["case_id"]) == set(truth["case_id"])


def test_one_csv_each_gives_no_test_split(download, tmp_path):
    """The old README example: the train CSVs alone. Every valid volume is then excluded."""
    _, settings = download
    ctrate = settings["cohort"]["ctrate"]
    single = {**settings, "cohort": {**settings["cohort"], "ctrate": {
        **ctrate, **{k: ctrate[k][0] for k in ("metadata_csv", "reports_csv", "labels_csv")}}}}
    paths = build_cohort(cfgmod.validate(single), tmp_path / "cohort")
    assert "test" not in set(pl.read_parquet(paths["manifest"])["split"])
    reasons = pl.read_parquet(paths["exclusions"]).filter(pl.col("case_id").str.starts_with("valid"))["reason"]
    assert len(reasons) == ctrate_fixture.VALID_PATIENTS + 1  # valid_7 too: it has a report, no metadata
    assert reasons.str.contains("volume without report").all()


def test_test_split_without_labels_is_warned(download, tmp_path, caplog):
    _, settings = download
    ctrate = settings["cohort"]["ctrate"]
    train_labels = {**settings, "cohort": {**settings["cohort"], "ctrate": {**ctrate,
                                                                            "labels_csv": ctrate["labels_csv"][:1]}}}
    with caplog.at_level(logging.WARNING, logger="ctvlp.cohort.stage"):
        paths = build_cohort(cfgmod.validate(train_labels), tmp_path / "cohort")
    assert "none of the 6 test cases" in caplog.text and "valid_predicted_labels.csv" in caplog.text
    assert len(pl.read_parquet(paths["manifest"]).filter(pl.col("split") == "test")) == 6
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctvlp.cohort.stage"):
        build_cohort(settings, tmp_path / "both")
    assert "test cases" not in caplog.text
