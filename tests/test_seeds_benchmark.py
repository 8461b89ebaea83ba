"""benchmarks/seeds.py (issue 22): a difference between variants is a finding only when its sign holds in
every seed AND the paired bootstrap CI on the seed-averaged scores excludes 0; seed averaging is per
case x disease (not per row position); the runner's plan chains each seed's ViSD-Boost from the same
seed's + disease CL model. Synthetic prediction tables with known AUCs."""

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import seeds as sb  # noqa: E402

DISEASES = {"liver_cyst": "local", "fatty_liver": "diffuse"}  # types as in the demo catalog
LOCAL = {"liver_cyst"}
N = 200


def _labels(n: int = N) -> np.ndarray:
    return (np.arange(n) % 2).astype(np.int8)  # half positive, for every disease


def _pred(scores: dict[str, np.ndarray], labels: np.ndarray, split: str = "test", prefix: str = "c") -> pl.DataFrame:
    """A predictions table as evaluate_zeroshot writes it, one row per case x disease."""
    rows = []
    for d, s in scores.items():
        for i, (y, x) in enumerate(zip(labels, s, strict=True)):
            rows.append({"case_id": f"{prefix}{i:04d}", "split": split, "disease_id": d, "disease": d,
                         "anatomy": "liver", "organ": "liver", "type": DISEASES[d], "evaluable": True,
                         "reason": "", "score": float(x), "label": int(y)})
    return pl.DataFrame(rows).with_columns(pl.col("label").cast(pl.Int8))


def _noisy(labels: np.ndarray, separation: float, seed: int) -> np.ndarray:
    """Scores whose AUC grows with ``separation`` (label shift under unit Gaussian noise)."""
    return labels * separation + np.random.default_rng(seed).normal(size=len(labels))


def _variant(separations: list[float], seed0: int) -> list[pl.DataFrame]:
    """One prediction table per seed, scores with the given separation in that seed."""
    y = _labels()
    return [_pred({d: _noisy(y, sep, seed0 + 10 * k + j) for j, d in enumerate(DISEASES)}, y)
            for k, sep in enumerate(separations)]


def _mean_auc(pred: pl.DataFrame) -> float:
    return float(np.mean([roc_auc_score(g["label"], g["score"]) for _, g in pred.group_by("disease_id")]))


def test_better_in_every_seed_is_a_finding():
    a, b = _variant([0.5, 0.5, 0.5], 100), _variant([2.0, 2.0, 2.0], 200)
    variants, pairs = sb.aggregate({"fvlm": a, "fvlm_dcl": b}, LOCAL, n_resamples=300)
    va = variants.filter(pl.col("variant") == "fvlm").row(0, named=True)
    expected = [_mean_auc(p) for p in a]
    assert [va[f"auc_seed{k}"] for k in range(3)] == pytest.approx(expected)
    assert va["seed_mean"] == pytest.approx(np.mean(expected))
    assert va["seed_sd"] == pytest.approx(np.std(expected, ddof=1))
    assert va["seed_min"] == pytest.approx(min(expected)) and va["seed_max"] == pytest.approx(max(expected))
    assert va["avg_ci_low"] < va["avg_auc"] < va["avg_ci_high"]
    local = [roc_auc_score(p.filter(pl.col("disease_id") == "liver_cyst")["label"],
                           p.filter(pl.col("disease_id") == "liver_cyst")["score"]) for p in a]
    assert va["seed_mean_local"] == pytest.approx(np.mean(local))
    row = pairs.filter((pl.col("variant") == "fvlm_dcl") & (pl.col("reference") == "fvlm")).row(0, named=True)
    for k in range(3):
        assert row[f"diff_seed{k}"] == pytest.approx(_mean_auc(b[k]) - _mean_auc(a[k]))
        assert row[f"diff_seed{k}"] > 0
    assert row["same_sign_every_seed"] and row["avg_diff_ci_low"] > 0 and row["finding"]
    # the other way round the same difference is negative, and still a finding
    _, back = sb.aggregate({"fvlm": b, "fvlm_dcl": a}, LOCAL, n_resamples=300)
    back = back.row(0, named=True)
    assert back["avg_diff"] < 0 and back["avg_diff_ci_high"] < 0 and back["finding"]


def test_one_reversed_seed_is_not_a_finding_despite_a_positive_mean():
    # B far better in seeds 0 and 1, slightly worse in seed 2
    a, b = _variant([0.5, 0.5, 1.5], 100), _variant([2.0, 2.0, 1.0], 200)
    _, pairs = sb.aggregate({"fvlm": a, "visd": b}, LOCAL, n_resamples=300)
    row = pairs.row(0, named=True)
    assert row["diff_seed0"] > 0 and row["diff_seed1"] > 0 and row["diff_seed2"] < 0
    assert row["seed_mean_diff"] > 0 and row["avg_diff"] > 0
    assert row["ci_excludes_0"]  # the seed-averaged CI alone would call it
    assert not row["same_sign_every_seed"] and not row["finding"]


def test_same_sign_but_ci_including_zero_is_not_a_finding():
    y = _labels(40)
    base = [_pred({d: _noisy(y, 1.0, 7 + 10 * k + j) for j, d in enumerate(DISEASES)}, y) for k in range(3)]
    better = []
    for p in base:  # raise the lowest-scored positive case of one disease: a small gain in every seed
        pos = p.filter((pl.col("disease_id") == "liver_cyst") & (pl.col("label") == 1))
        low = pos.sort("score")["case_id"][0]
        better.append(p.with_columns(pl.when((pl.col("case_id") == low) & (pl.col("disease_id") == "liver_cyst"))
                                     .then(pl.col("score") + 0.5).otherwise(pl.col("score")).alias("score")))
    _, pairs = sb.aggregate({"fvlm": base, "fvlm_dcl": better}, LOCAL, n_resamples=300)
    row = pairs.row(0, named=True)
    assert all(row[f"diff_seed{k}"] > 0 for k in range(3)) and row["same_sign_every_seed"]
    assert not row["ci_excludes_0"] and not row["finding"]


def test_seed_averaging_is_per_case():
    """Two seeds, 4 cases: each seed alone has AUC 0.75, the per-case average separates perfectly
    (1.0); the second seed's rows are in another order, which averaging by position would mix up."""
    y = np.array([1, 1, 0, 0], dtype=np.int8)
    s0 = _pred({"liver_cyst": np.array([0.9, 0.2, 0.3, 0.1])}, y)
    s1 = _pred({"liver_cyst": np.array([0.2, 0.9, 0.1, 0.3])}, y).reverse()
    assert _mean_auc(s0) == 0.75 and _mean_auc(s1) == 0.75
    avg = sb.average_seeds([s0, s1]).sort("case_id")
    assert avg["score"].to_list() == pytest.approx([0.55, 0.55, 0.2, 0.2])
    assert avg.columns == s0.columns
    variants, _ = sb.aggregate({"fvlm": [s0, s1]}, LOCAL, n_resamples=50)
    row = variants.row(0, named=True)
    assert row["auc_seed0"] == row["auc_seed1"] == row["seed_mean"] == 0.75 and row["seed_sd"] == 0
    assert row["avg_auc"] == 1.0


def test_averaging_keeps_a_row_evaluable_only_in_every_seed_and_refuses_other_labels():
    y = np.array([1, 0, 1, 0], dtype=np.int8)
    s0 = _pred({"liver_cyst": np.array([0.9, 0.2, 0.3, 0.1])}, y)
    s1 = s0.with_columns(pl.when(pl.col("case_id") == "c0000").then(False).otherwise(pl.col("evaluable"))
                         .alias("evaluable"))
    avg = sb.average_seeds([s0, s1]).sort("case_id")
    assert avg["evaluable"].to_list() == [False, True, True, True]
    assert len(sb.average_seeds([s0, s1.filter(pl.col("case_id") != "c0003")])) == 3  # missing in a seed: dropped
    with pytest.raises(ValueError, match="different labels"):
        sb.average_seeds([s0, s0.with_columns((1 - pl.col("label")).cast(pl.Int8).alias("label"))])


def test_plan_chains_each_seed_from_its_own_models(tmp_path):
    results = tmp_path / "res"
    cmds = sb.plan(results, "x")
    assert len(cmds) == 3
    specs = [[c[i + 1] for i, a in enumerate(c) if a == "--variant"] for c in cmds]
    assert specs[0] == [f"fvlm_s0=chain=none,init={results / 'ablation/fvlm/align'}",
                        f"fvlm_dcl_s0=chain=none,init={results / 'train/align'}",
                        f"visd_s0=chain=none,init={results / 'train/boost'}"]
    for s in (1, 2):
        assert specs[s] == [f"fvlm_s{s}=chain=align,seed={s},train.seed={s}",
                            f"fvlm_dcl_s{s}=chain=visual_cl+align,seed={s},train.seed={s}",
                            f"visd_s{s}=chain=normality+boost,init={results / 'levers' / f'fvlm_dcl_s{s}' / 'align'},"
                            f"seed={s},train.seed={s}"]
    files = sb.default_files(results)
    assert files["visd"][0] == results / "eval" / "predictions.parquet"  # seed 0: the workflow's evaluation
    assert files["visd"][2] == results / "levers" / "visd_s2" / "eval" / "predictions.parquet"


def test_main_writes_tables(tmp_path):
    a, b = _variant([0.5, 0.5, 0.5], 100), _variant([2.0, 2.0, 2.0], 200)
    args = []
    for name, preds in (("fvlm", a), ("fvlm_dcl", b)):
        paths = []
        for k, p in enumerate(preds):
            paths.append(tmp_path / f"{name}_{k}.parquet")
            p.write_parquet(paths[-1])
        args += ["--predictions", f"{name}=" + ",".join(map(str, paths))]
    sb.main([*args, "--resamples", "100", "--label", "t", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "seeds_t.md").read_text(encoding="utf-8")
    assert "finding" in md and "Machine:" in md and "Command:" in md
    pairs = pl.read_csv(tmp_path / "out" / "seeds_t_pairs.csv")
    assert pairs["finding"].to_list() == [True]
    assert len(pl.read_csv(tmp_path / "out" / "seeds_t.csv")) == 2
