"""benchmarks/choose_defaults.py: the choice of defaults is blind to test labels (flipping every test
label changes nothing it picks or reports) and does depend on the validation labels (so these tests
can fail); the rule keeps the first-listed setting unless another is clearly better on validation."""

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import choose_defaults as cd

from ctvlp import config as cfgmod

DISEASES = ("d1", "d2", "d3")
N_VAL, N_TEST, N_TRAIN = 60, 40, 10


def _results(root: Path, flip_test: bool = False, flip_val: bool = False) -> Path:
    """A results folder with what the script reads: a run config, qc/cases.parquet (train, val and
    test cases) and cohort/ground_truth.parquet (labels of every case, test included)."""
    rng = np.random.default_rng(1)
    cases, truth = [], []
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        for i in range(n):
            cid = f"{split}_{i:03d}"
            cases.append({"case_id": cid, "split": split})
            for d in DISEASES:
                label = int(rng.random() < 0.4)
                if (split == "test" and flip_test) or (split == "val" and flip_val):
                    label = 1 - label
                truth.append({"case_id": cid, "disease_id": d, "anatomy": "liver", "label": label})
    (root / "qc").mkdir(parents=True, exist_ok=True)
    (root / "cohort").mkdir(parents=True, exist_ok=True)
    (root / ".ctvlp" / "config").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(cases).write_parquet(root / "qc" / "cases.parquet")
    pl.DataFrame(truth, schema_overrides={"label": pl.Int8}).write_parquet(root / "cohort" / "ground_truth.parquet")
    (root / ".ctvlp" / "config" / "run.json").write_text(json.dumps(cfgmod.validate({})), encoding="utf-8")
    return root


# what each candidate "knows" about a case, fixed before any label file exists: candidate strength
# times the ORIGINAL label (drawn with the same seed as _results) plus noise; 0 = a guessing model
STRENGTH = {"off": 0.0, "on": 3.0, "residual": 0.3, "replace": 0.0, "stage3": 0.5, "stage2": 0.5}


def _hidden_labels() -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        for i in range(n):
            for d in DISEASES:
                out[(f"{split}_{i:03d}", d)] = int(rng.random() < 0.4)
    return out


HIDDEN = _hidden_labels()


def _predict(name: str, cases: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """Predictions as zeroshot.predict makes them: one row per (case of ``cases``, disease), its
    score, and the label joined from ``truth`` (which must cover every pair)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rows = [{"case_id": c, "split": s, "disease_id": d, "evaluable": True,
             "score": STRENGTH[name] * HIDDEN[(c, d)] + rng.normal()}
            for c, s in cases.select("case_id", "split").iter_rows() for d in DISEASES]
    pred = pl.DataFrame(rows).join(truth.select("case_id", "disease_id", "label"), on=["case_id", "disease_id"],
                                   how="left")
    assert pred["label"].null_count() == 0
    return pred


def _choose(root: Path, names=("off", "on")):
    val = cd.load_validation(root)
    return cd.choose(list(names), {n: _predict(n, val.cases, val.truth) for n in names}, n_resamples=200)


def test_validation_holds_no_test_label(tmp_path):
    val = cd.load_validation(_results(tmp_path / "r"))
    assert set(val.truth["case_id"]) == val.ids == {f"val_{i:03d}" for i in range(N_VAL)}
    assert set(val.cases["split"]) == {"val"}


def test_flipping_every_test_label_changes_nothing(tmp_path):
    pick, table = _choose(_results(tmp_path / "a"))
    pick_flipped, table_flipped = _choose(_results(tmp_path / "b", flip_test=True))
    assert pick == pick_flipped == "on"
    assert table.equals(table_flipped)


def test_validation_labels_do_change_the_pick(tmp_path):
    """Flipping the validation labels turns the strong candidate into an anti-predictor: the
    baseline stays. (Were the choice made on anything but validation, this would not change.)"""
    pick, _ = _choose(_results(tmp_path / "a"))
    pick_val_flipped, table = _choose(_results(tmp_path / "b", flip_val=True))
    assert (pick, pick_val_flipped) == ("on", "off")
    assert table.filter(pl.col("candidate") == "on")["diff_ci_high"][0] < 0


def test_rule_keeps_the_first_unless_clearly_better(tmp_path):
    # replace guesses: worse than residual, which stays; stage2 = stage3 in strength: a tie, the first stays
    assert _choose(_results(tmp_path / "a"), ("residual", "replace"))[0] == "residual"
    assert _choose(_results(tmp_path / "a"), ("stage3", "stage2"))[0] == "stage3"
    # listed the other way round, the strong candidate is the baseline and the guessing one cannot replace it
    pick, table = _choose(_results(tmp_path / "a"), ("on", "off"))
    assert pick == "on" and table.filter(pl.col("candidate") == "off")["diff_ci_high"][0] < 0


def test_choose_refuses_test_rows(tmp_path):
    root = _results(tmp_path / "r")
    cases = pl.read_parquet(root / "qc" / "cases.parquet")
    truth = pl.read_parquet(root / "cohort" / "ground_truth.parquet")
    pred = _predict("on", cases.filter(pl.col("split") != "train"), truth)
    with pytest.raises(ValueError, match="validation predictions only"):
        cd.choose(["on"], {"on": pred})


def test_main_end_to_end_is_blind_to_test_labels(tmp_path, monkeypatch):
    """The whole script on real files (training and zero-shot scoring replaced by the synthetic
    candidates): the plan, the cache folders, the tables and the config values it writes, the same
    with every test label flipped."""
    calls = []
    monkeypatch.setattr(cd, "train", lambda c: calls.append(c.folder) or 12.0)
    monkeypatch.setattr(cd, "validation_predictions", lambda c, val: _predict(c.name, val.cases, val.truth))
    outs = []
    for name, flip in (("a", False), ("b", True)):
        root = _results(tmp_path / name / "results", flip_test=flip)
        out = tmp_path / name / "out"
        table = cd.main(["--results", str(root), "--val-results", str(root), "--only", "text_center",
                         "--only", "fusion", "--label", "t", "--out", str(out)])
        outs.append((table, out))
    assert outs[0][0].drop("model").equals(outs[1][0].drop("model"))
    md = (outs[0][1] / "choose_defaults_t.md").read_text(encoding="utf-8")
    assert "  text_center: true\n" in md and "  fusion: residual\n" in md  # the config.yaml values of the picks
    assert cd.RULE in md and "Machine:" in md and "Command:" in md
    csv = pl.read_csv(outs[0][1] / "choose_defaults_t.csv")
    assert csv.filter(pl.col("picked"))["candidate"].to_list() == ["on", "residual"]
    flipped = pl.read_csv(outs[1][1] / "choose_defaults_t.csv")
    assert csv.drop("model").equals(flipped.drop("model"))
    # the reference is trained first (fusion continues it); identical settings share one folder
    assert len(calls) == 2 * (1 + 4) and calls[0] == calls[1]


def test_plan_shares_the_reference_and_refuses_overlap(tmp_path, capsys):
    root = _results(tmp_path / "r")
    reference, candidates = cd.plan(cd.run_config(root), root)
    same = [c for c in candidates if c.folder == reference.folder]
    assert {c.dimension for c in same} == set(cd.CANDIDATES) - set(cd.BOOST_DIMENSIONS)
    assert all(c.init == reference.folder / "align" for c in candidates if c.dimension in cd.BOOST_DIMENSIONS)
    # 5 alignment dimensions: the reference + 5 others; fusion/residual = codebook/K16_C64: + 3
    assert len({c.folder for c in candidates}) == 6 + 3
    cd.main(["--results", str(root), "--val-results", str(root), "--dry-run"])
    assert "Rule:" in capsys.readouterr().out
    # a validation folder whose validation cases include a test case of --results: refused
    other = _results(tmp_path / "other")
    cases = pl.read_parquet(other / "qc" / "cases.parquet")
    cases.with_columns(pl.when(pl.col("case_id") == "test_000").then(pl.lit("val")).otherwise(pl.col("split"))
                       .alias("split")).write_parquet(other / "qc" / "cases.parquet")
    with pytest.raises(SystemExit, match="include test cases"):
        cd.main(["--results", str(root), "--val-results", str(other), "--dry-run"])
