"""benchmarks/paper_vs_defaults.py on two synthetic runs written by the library's own table writers:
the paired paper-minus-defaults difference, the goal verdicts and the below-chance list follow the
scores, and runs on different test cases are refused."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctvlp.evaluation import metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
DISEASES = {"liver_cyst": "local", "fatty_liver": "diffuse"}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("paper_vs_defaults", BENCH / "paper_vs_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, separation: dict[str, float], seed: int, prefix: str = "c"):
    """An evaluation folder (predictions.parquet, zeroshot.csv) whose diseases score with the given
    label shift (negative: inverted)."""
    labels = np.tile([0, 1], 60)
    rng = np.random.default_rng(seed)
    rows = []
    for d, ty in DISEASES.items():
        scores = labels * separation[d] + rng.normal(size=len(labels))
        rows += [{"case_id": f"{prefix}{i:04d}", "split": "test", "disease_id": d, "disease": d, "anatomy": "liver",
                  "organ": "liver", "type": ty, "evaluable": True, "reason": "", "score": float(s), "label": int(y)}
                 for i, (y, s) in enumerate(zip(labels, scores))]
    rows += [{**r, "split": "val"} for r in rows[:4]]  # a few validation rows, as the evaluation writes them
    pred = pl.DataFrame(rows).with_columns(pl.col("label").cast(pl.Int8))
    folder.mkdir(parents=True, exist_ok=True)
    pred.write_parquet(folder / "predictions.parquet")
    table, mean_ci = metrics.metrics_table(pred, "youden", 200, 0)
    metrics.write_tables(table.with_columns(pl.lit("presence").alias("prompt_style")), folder, mean_ci=mean_ci)


def _run(root: Path, visd: dict[str, float], prefix: str = "c"):
    base = {"liver_cyst": 0.3, "fatty_liver": 0.6}
    for i, (variant, sub) in enumerate(
            {"clip": "eval/ablation/clip", "fvlm": "eval/ablation/fvlm", "fvlm_icl": "eval/ablation/fvlm_icl",
             "fvlm_dcl": "eval/ablation/fvlm_dcl", "visd": "eval"}.items()):
        _write(root / sub, visd if variant == "visd" else base, seed=i, prefix=prefix)


def test_paper_minus_defaults_and_the_goals_follow_the_scores(bench, tmp_path):
    _run(tmp_path / "defaults", visd={"liver_cyst": -1.5, "fatty_liver": 0.6})  # liver cyst inverted
    _run(tmp_path / "paper", visd={"liver_cyst": 3.0, "fatty_liver": 3.0})  # near perfect
    table = bench.compare(tmp_path / "defaults", tmp_path / "paper", n_resamples=200)
    paper = {r["variant"]: r for r in table.filter(pl.col("run") == "paper").iter_rows(named=True)}
    defaults = {r["variant"]: r for r in table.filter(pl.col("run") == "defaults").iter_rows(named=True)}
    # the same non-ViSD variants in both runs: no difference; ViSD-Boost: a large paired gain
    assert paper["fvlm"]["paper_minus_defaults"] == pytest.approx(0.0, abs=1e-12)
    assert paper["visd"]["pmd_ci_low"] > 0.3 and np.isnan(defaults["visd"]["paper_minus_defaults"])
    assert defaults["visd"]["below_chance"] == "liver_cyst" and paper["visd"]["below_chance"] == "none"
    text = bench.render(table, "cmd", "test")
    verdicts = [line for line in text.splitlines() if line.startswith(("- defaults:", "- paper preset:"))]
    assert "not met" in verdicts[0].split(";")[0] and ": met" in verdicts[1].split(";")[0]
    assert f"{paper['visd']['auc']:.3f}" in text


def test_runs_on_other_test_cases_are_refused(bench, tmp_path):
    same = {"liver_cyst": 0.3, "fatty_liver": 0.6}
    _run(tmp_path / "a", visd=same)
    _run(tmp_path / "b", visd=same, prefix="other")
    with pytest.raises(SystemExit, match="different test cases"):
        bench.compare(tmp_path / "a", tmp_path / "b", n_resamples=50)
    with pytest.raises(SystemExit, match="no evaluation"):
        bench.compare(tmp_path / "a", tmp_path / "missing", n_resamples=50)
