"""Zero-shot diagnosis: per-anatomy embeddings vs positive/negative disease prompts.

The operating threshold of each disease is chosen on the validation split and applied unchanged
to the test split; test labels never influence it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from tabulate import tabulate
from tqdm import tqdm

from . import catalog, data
from .model import pad_to_multiple, prompt_embedding, zero_shot_scores
from .train import load_model, pick_device

METRICS = ["auc", "sensitivity", "specificity", "accuracy", "precision", "f1"]


class NoLabelsError(RuntimeError):
    """The cohort has no ground-truth labels, which evaluation needs."""


def read_ground_truth(ground_truth) -> pl.DataFrame:
    """The cohort's ground truth (a Parquet path or a DataFrame); NoLabelsError when it is empty
    (a source without labels, e.g. a table without cohort.table.label_cols)."""
    gt = ground_truth if isinstance(ground_truth, pl.DataFrame) else pl.read_parquet(ground_truth)
    if gt.is_empty():
        raise NoLabelsError(
            "the cohort has no ground-truth labels (empty ground truth): zero-shot evaluation, the linear probe "
            "and the figures need them. Give cohort.table.label_cols (or cohort.ctrate.labels_csv); the trained "
            "model itself is in results/train/boost")
    return gt


@torch.no_grad()
def embed_volume(model, img, anat, complete, boxes: dict, device, crop_size=None) -> np.ndarray:
    """(M, D) anatomy embeddings of one preprocessed volume (x, y, z arrays).

    crop_size None: one pass over the whole volume. Otherwise one pass per complete anatomy on a
    crop of crop_size centred on its box (``data.anatomy_crop``; boxes from the preprocess meta),
    as in training; for volumes too large for one pass at the paper's resolution.
    """
    stride = model.vision.stride

    def encode(im, an):
        im, an = pad_to_multiple(np.array(im, np.float32), stride), pad_to_multiple(np.array(an), stride)
        emb, _ = model.encode_image(torch.from_numpy(im)[None, None].to(device), torch.from_numpy(an)[None].to(device))
        return emb[0].float().cpu().numpy()

    if model.vis_global is not None:  # CLIP-style baseline: one whole-volume embedding for every anatomy
        im = pad_to_multiple(np.asarray(img, np.float32), stride)
        emb = model.encode_image_global(torch.from_numpy(im)[None, None].to(device))[0].float().cpu().numpy()
        return np.repeat(emb[None], len(complete), axis=0)
    if crop_size is None:
        return encode(img, anat)
    emb = np.zeros((len(complete), model.vis_proj.bias.shape[1]), np.float32)
    for a in catalog.anatomies():
        if complete[a.index - 1] and a.name not in (boxes or {}):
            raise ValueError(f"anatomy-centred crops need the anatomy's box in the preprocess meta.json "
                             f"({a.name} missing); re-run ctvlp preprocess")
        if complete[a.index - 1]:
            sl = data.anatomy_crop(boxes[a.name], img.shape, crop_size)
            emb[a.index - 1] = encode(img[sl], anat[sl])[a.index - 1]
    return emb


def embed_cases(model, results, case_ids, device, crop_size=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Anatomy embeddings per case: (M, D) array and (M,) evaluable flags (complete in the scan)."""
    out = {}
    for case_id in tqdm(case_ids, desc="embed", unit="case"):
        img, anat, complete, boxes = data.load_case(results, case_id)
        out[case_id] = (embed_volume(model, img, anat, complete, boxes, device, crop_size), complete)
    return out


@torch.no_grad()
def disease_scores(model, emb: torch.Tensor, disease_catalog: str):
    """Yield (disease, P(positive) per row) for every zero-shot disease; emb (N, M, D)."""
    for d in catalog.diseases(disease_catalog):
        if not d.zero_shot:
            continue
        j = catalog.anatomy_by_name(d.anatomy).index - 1
        if model.vis_global is not None:
            pos = F.normalize(model.encode_report_global(list(d.positive_prompts)).mean(0), dim=-1)
            neg = F.normalize(model.encode_report_global(list(d.negative_prompts)).mean(0), dim=-1)
        else:
            pos = prompt_embedding(model, d.positive_prompts, j)
            neg = prompt_embedding(model, d.negative_prompts, j)
        yield d, zero_shot_scores(emb[:, j], pos, neg, model.logit_scale).float().cpu().numpy()


@torch.no_grad()
def predict(model_dir, manifest, results, ground_truth, disease_catalog: str, device="auto",
            crop_size=None) -> pl.DataFrame:
    """One row per (case in val/test, disease): score, or evaluable=False with the reason.
    crop_size: None = whole volumes, else anatomy-centred crops (``embed_cases``)."""
    gt = read_ground_truth(ground_truth)  # before anything is loaded: no labels, no evaluation
    device = pick_device(device)
    model = load_model(model_dir, device)
    man = pl.read_parquet(manifest).filter(pl.col("split").is_in(["val", "test"]))
    ids, splits = man["case_id"].to_list(), man["split"].to_list()
    embs = embed_cases(model, results, ids, device, crop_size)
    emb = torch.from_numpy(np.stack([embs[c][0] for c in ids])).to(device)  # (cases, M, D)
    complete = np.stack([embs[c][1] for c in ids])  # (cases, M)
    rows = []
    for d, scores in disease_scores(model, emb, disease_catalog):
        j = catalog.anatomy_by_name(d.anatomy).index - 1
        for case_id, split, score, ok in zip(ids, splits, scores, complete[:, j]):
            rows.append({"case_id": case_id, "split": split, "disease_id": d.id, "disease": d.name,
                         "anatomy": d.anatomy, "organ": d.organ, "type": d.type, "evaluable": bool(ok),
                         "reason": None if ok else "anatomy absent or incomplete in the scan",
                         "score": float(score) if ok else None})
    pred = pl.DataFrame(rows, infer_schema_length=None)
    labels = gt.select("case_id", "disease_id", pl.col("label").cast(pl.Int8))
    pred = pred.join(labels, on=["case_id", "disease_id"], how="left")
    missing = pred.filter(pl.col("label").is_null())
    if len(missing):
        raise ValueError(f"ground truth lacks {len(missing)} (case, disease) pairs, e.g. "
                         f"{missing.row(0, named=True)['case_id']}/{missing.row(0, named=True)['disease_id']}")
    return pred


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


def bootstrap_auc(pred: pl.DataFrame, n_resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap over test CASES (one resample serves every disease, so the mean over
    diseases keeps its within-case correlation). Returns ({disease_id: (low, high)}, (low, high) of
    the mean AUC). A resample where a disease has one class only leaves that disease out of it."""
    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable"))
    cases = np.array(sorted(set(test["case_id"].to_list())))
    if len(cases) == 0:
        return {}, (float("nan"), float("nan"))
    col = {c: i for i, c in enumerate(cases)}
    per = {}
    for (d,), g in test.group_by(["disease_id"], maintain_order=True):
        per[d] = (np.array([col[c] for c in g["case_id"]]), g["label"].to_numpy(), g["score"].to_numpy())
    rng = np.random.default_rng(seed)
    aucs = {d: [] for d in per}
    means = []
    for _ in range(n_resamples):
        weight = np.bincount(rng.integers(0, len(cases), len(cases)), minlength=len(cases))
        vals = []
        for d, (idx, y, s) in per.items():
            w = weight[idx]
            yy, ss = np.repeat(y, w), np.repeat(s, w)
            if len(np.unique(yy)) == 2:
                v = roc_auc_score(yy, ss)
                aucs[d].append(v)
                vals.append(v)
        if vals:
            means.append(np.mean(vals))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = {d: tuple(np.percentile(v, q)) if v else (float("nan"), float("nan")) for d, v in aucs.items()}
    return ci, tuple(np.percentile(means, q)) if means else (float("nan"), float("nan"))


def write_tables(table: pl.DataFrame, out_dir: str | Path, stem: str = "zeroshot",
                 mean_ci=(float("nan"), float("nan"))) -> dict[str, Path]:
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
    full = pl.concat([table, mean], how="vertical_relaxed")
    paths = {"csv": out_dir / f"{stem}.csv", "parquet": out_dir / f"{stem}.parquet", "md": out_dir / f"{stem}.md"}
    full.write_csv(paths["csv"])
    full.write_parquet(paths["parquet"])
    paths["md"].write_text(markdown(full))
    # per organ (the paper's Table 2) and local vs diffuse (its Table 8): means over diseases
    for by in ("organ", "type"):
        summary = (table.group_by(by, maintain_order=True)
                   .agg(pl.len().alias("diseases"), *[pl.col(c).fill_nan(None).mean() for c in METRICS],
                        pl.col("test_positives").sum()))
        paths[f"by_{by}_csv"] = out_dir / f"{stem}_by_{by}.csv"
        paths[f"by_{by}_md"] = out_dir / f"{stem}_by_{by}.md"
        summary.write_csv(paths[f"by_{by}_csv"])
        paths[f"by_{by}_md"].write_text(markdown(summary))
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


def ablation_table(tables: dict[str, str | Path]) -> pl.DataFrame:
    """One row per variant from its zeroshot.csv: mean test AUC with its 95% bootstrap CI, mean
    AUC over local and over diffuse diseases, mean sensitivity/specificity/accuracy."""
    rows = []
    for variant, path in tables.items():
        t = pl.read_csv(path)
        diseases, mean = t.filter(pl.col("disease_id") != "mean"), t.filter(pl.col("disease_id") == "mean").row(0, named=True)
        by_type = {ty: diseases.filter(pl.col("type") == ty)["auc"].fill_nan(None).mean() for ty in ("local", "diffuse")}
        rows.append({"variant": variant, "method": ABLATION.get(variant, variant), "auc": mean["auc"],
                     "auc_ci_low": mean["auc_ci_low"], "auc_ci_high": mean["auc_ci_high"],
                     "auc_local": by_type["local"], "auc_diffuse": by_type["diffuse"],
                     "sensitivity": mean["sensitivity"], "specificity": mean["specificity"],
                     "accuracy": mean["accuracy"], "diseases": len(diseases)})
    return pl.DataFrame(rows)
