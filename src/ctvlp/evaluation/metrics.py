"""Metrics of a predictions table: the threshold of each disease chosen on the validation split
and applied unchanged to test, test metrics per disease with 95% bootstrap CIs of the AUC, the
tables (Markdown, CSV, Parquet; per organ and local/diffuse), and the ablation table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from tabulate import tabulate

from ..workspace import atomic_write, read_parquet, write_parquet_atomic, write_text_atomic

METRICS = ["auc", "sensitivity", "specificity", "accuracy", "precision", "f1"]


def choose_prompt_style(by_style: dict[str, pl.DataFrame], requested: str = "auto") -> tuple[str, pl.DataFrame]:
    """The prompt style to evaluate with: the one whose predictions have the highest mean AUC over
    the diseases of the VALIDATION split (where both classes occur; ties go to the earlier style),
    or ``requested`` when it names a style. Test rows are never read. Returns the style and a
    table (style, val_mean_auc, val_diseases, chosen)."""
    rows = []
    for style, pred in by_style.items():
        val = pred.filter((pl.col("split") == "val") & pl.col("evaluable"))
        aucs = [roc_auc_score(g["label"].to_numpy(), g["score"].to_numpy())
                for _, g in val.group_by("disease_id", maintain_order=True) if g["label"].n_unique() == 2]
        rows.append({"style": style, "val_mean_auc": float(np.mean(aucs)) if aucs else float("nan"),
                     "val_diseases": len(aucs)})
    if requested != "auto":
        if requested not in by_style:
            raise ValueError(f"evaluate.prompt_style {requested!r} is not a style of the catalog ({', '.join(by_style)})")
        chosen = requested
    else:
        scored = [r for r in rows if not np.isnan(r["val_mean_auc"])]
        chosen = max(scored, key=lambda r: r["val_mean_auc"])["style"] if scored else rows[0]["style"]
    table = pl.DataFrame(rows).with_columns((pl.col("style") == chosen).alias("chosen"))
    return chosen, table


def choose_threshold(y: np.ndarray, score: np.ndarray, rule: str = "youden") -> float:
    """Operating point on one split: Youden's J or the ROC point closest to (0, 1)."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, score)
    thr = np.clip(thr, 0.0, 1.0)  # sklearn's first threshold is +inf
    k = np.argmax(tpr - fpr) if rule == "youden" else np.argmin(fpr**2 + (1 - tpr) ** 2)
    return float(thr[k])


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    pred = (score >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    return {
        "auc": float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan"),
        "sensitivity": sens, "specificity": div(tn, tn + fp), "accuracy": div(tp + tn, len(y)),
        "precision": prec, "f1": div(2 * prec * sens, prec + sens) if tp else 0.0,
    }


def metrics_table(pred: pl.DataFrame, rule: str = "youden", n_resamples: int = 1000, seed: int = 0):
    """Per-disease test metrics and 95% bootstrap CIs of AUC; returns (table, CI of the mean AUC)."""
    ci, mean_ci = bootstrap_auc(pred, n_resamples, seed=seed) if n_resamples else ({}, (np.nan, np.nan))
    rows = []
    for (disease_id,), g in pred.group_by(["disease_id"], maintain_order=True):
        first = g.row(0, named=True)
        ev = g.filter(pl.col("evaluable"))
        val, test = ev.filter(pl.col("split") == "val"), ev.filter(pl.col("split") == "test")
        thr = choose_threshold(val["label"].to_numpy(), val["score"].to_numpy(), rule)
        m = binary_metrics(test["label"].to_numpy(), test["score"].to_numpy(), thr) if len(test) else {
            k: float("nan") for k in METRICS}
        low, high = ci.get(disease_id, (float("nan"), float("nan")))
        rows.append({"disease_id": disease_id, "disease": first["disease"], "organ": first["organ"],
                     "type": first["type"], **m, "auc_ci_low": low, "auc_ci_high": high, "threshold": thr,
                     "test_positives": int(test["label"].sum()), "test_evaluable": len(test),
                     "test_not_evaluable": int((g["split"] == "test").sum()) - len(test)})
    return pl.DataFrame(rows), mean_ci


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one disease under each row of ``weights`` (R, n) (a bootstrap resample: how often
    each case was drawn), as roc_auc_score on the repeated cases gives it (ties count half), for all
    resamples at once; NaN where a resample has one class only."""
    order = np.argsort(scores, kind="stable")
    scores, labels, weights = scores[order], labels[order].astype(bool), weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, np.diff(scores) != 0])  # groups of tied scores
    pos = np.add.reduceat(weights * labels, starts, axis=1)
    neg = np.add.reduceat(weights * ~labels, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _resampled_aucs(pred: pl.DataFrame, cases: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """{disease: (R,) AUC per resample} of the evaluable test rows of ``pred``."""
    col = {c: i for i, c in enumerate(cases)}
    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable"))
    out = {}
    for (d,), g in test.group_by(["disease_id"], maintain_order=True):
        idx = np.array([col[c] for c in g["case_id"]])
        out[d] = weighted_auc(g["label"].to_numpy(), g["score"].to_numpy(), weights[:, idx])
    return out


def _resample_weights(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    """(R, n) how often each test case is drawn in each bootstrap resample (seeded)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_cases, n_cases), minlength=n_cases) for _ in range(n_resamples)])


def _test_cases(pred: pl.DataFrame) -> np.ndarray:
    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable"))
    return np.array(sorted(set(test["case_id"].to_list())))


def bootstrap_auc(pred: pl.DataFrame, n_resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap over test CASES (one resample serves every disease, so the mean over
    diseases keeps its within-case correlation). Returns ({disease_id: (low, high)}, (low, high) of
    the mean AUC). A resample where a disease has one class only leaves that disease out of it."""
    cases = _test_cases(pred)
    if len(cases) == 0:
        return {}, (float("nan"), float("nan"))
    aucs = _resampled_aucs(pred, cases, _resample_weights(len(cases), n_resamples, seed))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    nan = (float("nan"), float("nan"))
    ci = {d: tuple(np.percentile(v[~np.isnan(v)], q)) if (~np.isnan(v)).any() else nan for d, v in aucs.items()}
    stacked = np.stack(list(aucs.values())) if aucs else np.full((1, n_resamples), np.nan)
    defined = (~np.isnan(stacked)).any(0)
    means = np.nanmean(stacked[:, defined], axis=0) if defined.any() else np.array([])
    return ci, tuple(np.percentile(means, q)) if len(means) else nan


def paired_difference(pred: pl.DataFrame, reference: pl.DataFrame, n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean test AUC of ``pred`` minus that of ``reference`` on the same cases, with a paired
    percentile bootstrap CI: each resample draws the test cases once and scores both on them; the
    mean runs over the diseases defined for both (both classes present) in that resample."""
    cases = np.array(sorted(set(_test_cases(pred)) & set(_test_cases(reference))))
    if len(cases) == 0:
        return float("nan"), float("nan"), float("nan")
    ones = np.ones((1, len(cases)))
    point = [_resampled_aucs(p, cases, ones) for p in (pred, reference)]
    shared = [d for d in point[0] if d in point[1] and not np.isnan(point[0][d][0]) and not np.isnan(point[1][d][0])]
    if not shared:  # no disease with both classes among the shared test cases: no difference to report
        return float("nan"), float("nan"), float("nan")
    diff = float(np.mean([point[0][d][0] for d in shared]) - np.mean([point[1][d][0] for d in shared]))
    weights = _resample_weights(len(cases), n_resamples, seed)
    a, b = (_resampled_aucs(p, cases, weights) for p in (pred, reference))
    both = np.stack([a[d] for d in shared]), np.stack([b[d] for d in shared])
    ok = ~np.isnan(both[0]) & ~np.isnan(both[1])
    diffs = np.array([both[0][ok[:, r], r].mean() - both[1][ok[:, r], r].mean() for r in range(n_resamples)
                      if ok[:, r].any()])
    if len(diffs) == 0:
        return diff, float("nan"), float("nan")
    low, high = np.percentile(diffs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return diff, float(low), float(high)


def write_tables(table: pl.DataFrame, out_dir: str | Path, stem: str = "zeroshot",
                 mean_ci=(float("nan"), float("nan")), note: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the mean row averages each metric over the diseases where it is defined (a disease without
    # positives in the test split has no AUC), as the bootstrap of the mean does
    mean = table.select(pl.lit("mean").alias("disease_id"), pl.lit("mean").alias("disease"),
                        pl.lit("").alias("organ"), pl.lit("").alias("type"),
                        *[pl.col(c).fill_nan(None).mean() for c in METRICS], pl.lit(mean_ci[0]).alias("auc_ci_low"),
                        pl.lit(mean_ci[1]).alias("auc_ci_high"), pl.lit(None, dtype=pl.Float64).alias("threshold"),
                        pl.col("test_positives").sum(), pl.col("test_evaluable").sum(),
                        pl.col("test_not_evaluable").sum())
    full = pl.concat([table, mean], how="diagonal_relaxed")
    paths = {"csv": out_dir / f"{stem}.csv", "parquet": out_dir / f"{stem}.parquet", "md": out_dir / f"{stem}.md"}
    atomic_write(paths["csv"], full.write_csv)
    write_parquet_atomic(full, paths["parquet"])
    write_text_atomic(paths["md"], (note + "\n\n" if note else "") + markdown(full))
    # per organ (the paper's Table 2) and local vs diffuse (its Table 8): means over diseases
    for by in ("organ", "type"):
        summary = (table.group_by(by, maintain_order=True)
                   .agg(pl.len().alias("diseases"), *[pl.col(c).fill_nan(None).mean() for c in METRICS],
                        pl.col("test_positives").sum()))
        paths[f"by_{by}_csv"] = out_dir / f"{stem}_by_{by}.csv"
        paths[f"by_{by}_md"] = out_dir / f"{stem}_by_{by}.md"
        atomic_write(paths[f"by_{by}_csv"], summary.write_csv)
        write_text_atomic(paths[f"by_{by}_md"], markdown(summary))
    return paths


def markdown(df: pl.DataFrame) -> str:
    return tabulate(df.rows(), headers=df.columns, tablefmt="github", floatfmt=".3f", missingval="n/a") + "\n"


ABLATION = {  # variant -> the paper's Table 5 wording
    "clip": "CLIP-style global alignment (whole volume vs whole report)",
    "fvlm": "fVLM: anatomy-wise alignment (phase 2 only)",
    "fvlm_icl": "+ instance-level visual contrastive learning (phase 1 instance, then 2)",
    "fvlm_dcl": "+ disease-level visual contrastive learning (phases 1-2)",
    "visd": "+ VSDB = ViSD-Boost (phases 1-4)",
}


def ablation_table(variants: dict[str, str | Path], reference: str = "fvlm", n_resamples: int = 1000,
                   seed: int = 0) -> pl.DataFrame:
    """One row per variant from its evaluation folder (zeroshot.csv, predictions.parquet): mean test
    AUC with its 95% bootstrap CI, mean AUC over local and over diffuse diseases, mean
    sensitivity/specificity/accuracy, and the difference of its mean AUC to ``reference`` with a
    paired bootstrap CI (both scored on the same resampled test cases)."""
    rows = []
    base = read_parquet(Path(variants[reference]) / "predictions.parquet") if reference in variants else None
    for variant, folder in variants.items():
        t = pl.read_csv(Path(folder) / "zeroshot.csv")
        diseases, mean = t.filter(pl.col("disease_id") != "mean"), t.filter(pl.col("disease_id") == "mean").row(0, named=True)
        by_type = {ty: diseases.filter(pl.col("type") == ty)["auc"].fill_nan(None).mean() for ty in ("local", "diffuse")}
        pred = read_parquet(Path(folder) / "predictions.parquet")
        diff = (float("nan"),) * 3
        if base is not None and variant != reference:
            diff = paired_difference(pred, base, n_resamples, seed=seed)
        rows.append({"variant": variant, "method": ABLATION.get(variant, variant), "auc": mean["auc"],
                     "auc_ci_low": mean["auc_ci_low"], "auc_ci_high": mean["auc_ci_high"],
                     f"diff_vs_{reference}": diff[0], "diff_ci_low": diff[1], "diff_ci_high": diff[2],
                     "auc_local": by_type["local"], "auc_diffuse": by_type["diffuse"],
                     "sensitivity": mean["sensitivity"], "specificity": mean["specificity"],
                     "accuracy": mean["accuracy"], "test_cases": len(_test_cases(pred)), "diseases": len(diseases),
                     "prompt_style": diseases["prompt_style"][0] if "prompt_style" in diseases.columns else None})
    return pl.DataFrame(rows)
