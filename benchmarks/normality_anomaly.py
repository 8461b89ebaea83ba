"""Does the normality model see abnormality? Phase 3's VQ-VAE (Eq. 3) learns the tokens of NORMAL
anatomies; if it does, its reconstruction error of an anatomy's token row is an anomaly score. On the
VALIDATION split of a results folder this scores every (case, anatomy) row with the frozen encoder's
tokens and the VQ-VAE's ``row_error`` (as ``NormalityPhase.validate``: the centred training crop, or
the whole volume), and reports

- per disease of the catalog: the AUC of the error of the disease's anatomy as a score for the
  disease (positives: validation cases with the disease in the ground truth; negatives: those
  without it; rows of cases where the anatomy is not complete are left out), with the mean errors;
- per anatomy: the AUC of abnormal against normal anatomies by the REPORT status (negatives the
  anatomies the report calls normal; and again with the unmentioned ones counted normal, as training
  does with train.unmentioned_as_normal), and codebook use: perplexity, codes used and dead codes of
  the codes assigned on validation (all rows, and normal rows only), beside those of the training
  usage the model saved (``NormalityVQVAE.codebook_stats``).

    python benchmarks/normality_anomaly.py --model results/train/normality --results results_val --label cpu

Only validation labels are read (the ground truth is loaded filtered to the validation case ids).
Writes ``normality_anomaly_<label>.md`` with the machine and the command, ``normality_anomaly_<label>.csv``
(per disease) and ``normality_anomaly_<label>_anatomy.csv`` (per anatomy) into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch
from machine import cpu  # benchmarks/ is on sys.path
from sklearn.metrics import roc_auc_score

from ctvlp import catalog
from ctvlp.evaluation.metrics import markdown
from ctvlp.imaging.storage import load_case, paths_from
from ctvlp.model.io import load_model, pick_device, read_config
from ctvlp.model.vision import pad_to_multiple
from ctvlp.training.data import CropDataset, anatomy_texts, to_device

ANATOMY_NAMES = {a.index - 1: a.name for a in catalog.anatomies()}


def load_validation(results: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(validation cases, their report rows, their ground truth): the ground truth is filtered to
    the validation case ids in the Parquet scan, so no other case's label is read."""
    cases = pl.read_parquet(results / "qc" / "cases.parquet").filter(pl.col("split") == "val")
    if cases.is_empty():
        raise SystemExit(f"{results} has no validation cases")
    ids = cases["case_id"].to_list()
    truth = (pl.scan_parquet(results / "cohort" / "ground_truth.parquet")
             .filter(pl.col("case_id").is_in(ids)).collect())
    reports = pl.read_parquet(results / "reports" / "reports.parquet").filter(pl.col("case_id").is_in(ids))
    return cases, reports, truth


@torch.no_grad()
def score_rows(vq, tokens: torch.Tensor, pad: torch.Tensor, anatomy: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The frozen VQ-VAE on token rows (R, L, C): per row its reconstruction error (``row_error``)
    and its assigned codes (R, L; -1 on pads). No codebook update, no usage counted."""
    if tokens.shape[0] == 0:
        return np.zeros(0), np.zeros((0, 0), np.int64)
    out = vq(tokens, pad, anatomy, update_codebook=False)
    return out.row_error.float().cpu().numpy(), out.codes.cpu().numpy()


@torch.no_grad()
def case_rows(model, image: torch.Tensor, anatomy: torch.Tensor, rows_mask: torch.Tensor):
    """[(anatomy index 0..M-1, row error, codes of the row's real tokens)] of one sample
    (image (1, 1, X, Y, Z), anatomy (1, X, Y, Z), rows_mask (1, M) bool)."""
    rows = model.anatomy_rows(image, anatomy, rows_mask)
    errors, codes = score_rows(model.vqvae, rows.tokens, rows.pad, rows.anatomy)
    return [(int(j), float(e), c[c >= 0]) for j, e, c in zip(rows.anatomy.tolist(), errors, codes)]


def error_rows(model, cases: pl.DataFrame, reports: pl.DataFrame, device, crop: str = "center",
               crop_size=None) -> tuple[pl.DataFrame, dict[int, list[np.ndarray]]]:
    """One row per (validation case, anatomy scored): case_id, anatomy, status (the report's),
    error; and the codes per anatomy index, with the status, for codebook use.

    crop "center": the centred crop of ``crop_size`` (the training crop), anatomies complete in the
    scan and inside the crop, as phase 3's validation; "whole": the whole volume, anatomies complete
    in the scan. Unlike phase 3's validation, an anatomy without a usable report text is scored too."""
    ids, paths = cases["case_id"].to_list(), paths_from(cases)
    status = {(c, a): s for c, a, s in reports.select("case_id", "anatomy", "status").iter_rows()}
    out, codes = [], {}
    if crop == "center":
        texts = anatomy_texts(reports, ids, True)
        texts = texts._replace(text_idx=np.zeros_like(texts.text_idx))  # every anatomy counts, text or not
        dataset = CropDataset([paths[c] for c in ids], texts, crop_size, model.vision.stride, False, 0, "center")
    for i, cid in enumerate(ids):
        if crop == "center":
            item = dataset[i]
            on = to_device({k: (v[None] if torch.is_tensor(v) else v) for k, v in item.items() if k != "flip"},
                           device)
            image, anat, mask = on["image"], on["anatomy"], on["valid"]
        else:
            img, anat_np, complete, _ = load_case(paths[cid])
            stride = model.vision.stride
            image = torch.from_numpy(pad_to_multiple(np.asarray(img, np.float32), stride))[None, None].to(device)
            anat = torch.from_numpy(pad_to_multiple(np.array(anat_np), stride))[None].to(device)
            mask = torch.from_numpy(np.asarray(complete, bool))[None].to(device)
        for j, err, row_codes in case_rows(model, image, anat, mask):
            name = ANATOMY_NAMES[j]
            st = status.get((cid, name), "no_report_row")
            out.append({"case_id": cid, "anatomy": name, "status": st, "error": err})
            codes.setdefault(j, []).append((st, row_codes))
    schema = {"case_id": pl.Utf8, "anatomy": pl.Utf8, "status": pl.Utf8, "error": pl.Float64}
    return pl.DataFrame(out, schema=schema), codes


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def disease_aucs(rows: pl.DataFrame, truth: pl.DataFrame, catalog_name: str = "demo") -> pl.DataFrame:
    """Per disease of the catalog: the AUC of the row error of its anatomy as the disease's score
    (positives: rows of cases whose ground-truth label is 1; negatives: label 0), the counts and the
    mean error of each class. ``rows``: case_id, anatomy, error; ``truth``: case_id, disease_id, label."""
    out = []
    for d in catalog.diseases(catalog_name):
        g = (rows.filter(pl.col("anatomy") == d.anatomy)
             .join(truth.filter(pl.col("disease_id") == d.id).select("case_id", "label"), on="case_id", how="inner"))
        y, e = g["label"].cast(pl.Int64).to_numpy(), g["error"].to_numpy()
        out.append({"disease_id": d.id, "anatomy": d.anatomy, "type": d.type, "auc": _auc(y, e),
                    "positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
                    "error_pos": float(e[y == 1].mean()) if y.sum() else float("nan"),
                    "error_neg": float(e[y == 0].mean()) if (y == 0).any() else float("nan")})
    return pl.DataFrame(out)


def status_aucs(rows: pl.DataFrame) -> pl.DataFrame:
    """Per anatomy (and "all", pooled): AUC of the row error for abnormal against normal anatomies
    by the report status; ``auc_vs_normal``: negatives stated normal; ``auc_vs_normal_or_unmentioned``:
    negatives stated normal or not mentioned."""
    out = []
    groups = [(a, rows.filter(pl.col("anatomy") == a)) for a in sorted(set(rows["anatomy"]))] + [("all", rows)]
    for name, g in groups:
        abnormal = g.filter(pl.col("status") == "abnormal")["error"].to_numpy()
        row = {"anatomy": name, "rows": len(g), "abnormal": len(abnormal),
               "error_abnormal": float(abnormal.mean()) if len(abnormal) else float("nan")}
        for key, negatives in (("normal", ("normal",)), ("normal_or_unmentioned", ("normal", "not_mentioned"))):
            neg = g.filter(pl.col("status").is_in(negatives))["error"].to_numpy()
            y = np.r_[np.ones(len(abnormal)), np.zeros(len(neg))]
            row[f"auc_vs_{key}"] = _auc(y, np.r_[abnormal, neg])
            row[f"n_{key}"] = len(neg)
            row[f"error_{key}"] = float(neg.mean()) if len(neg) else float("nan")
        out.append(row)
    return pl.DataFrame(out)


def usage(codes: list[np.ndarray], k: int) -> dict:
    """Perplexity exp(H) of the code distribution, codes used and dead codes (of ``k``) of the
    assignments ``codes`` (arrays of code indices)."""
    counts = np.bincount(np.concatenate(codes).astype(np.int64), minlength=k) if codes else np.zeros(k)
    total = counts.sum()
    if not total:
        return {"perplexity": 0.0, "codes_used": 0, "dead_codes": k}
    p = counts[counts > 0] / total
    return {"perplexity": float(np.exp(-(p * np.log(p)).sum())), "codes_used": int((counts > 0).sum()),
            "dead_codes": int((counts == 0).sum())}


def codebook_table(vq, codes: dict[int, list]) -> pl.DataFrame:
    """Per anatomy scored on validation: codebook use of its validation rows (all, and those the
    report calls normal) beside the training usage saved with the model."""
    k = vq.codebook.shape[1]
    train = vq.codebook_stats()
    out = []
    for j in sorted(codes):
        all_rows = usage([c for _, c in codes[j]], k)
        normal = usage([c for s, c in codes[j] if s == "normal"], k)
        out.append({"anatomy": ANATOMY_NAMES[j], "K": k, "train_perplexity": train["perplexity"][j],
                    "train_dead_codes": train["dead_codes"][j], "val_perplexity": all_rows["perplexity"],
                    "val_codes_used": all_rows["codes_used"], "val_dead_codes": all_rows["dead_codes"],
                    "val_normal_perplexity": normal["perplexity"], "val_normal_codes_used": normal["codes_used"]})
    return pl.DataFrame(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("results/train/normality"),
                        help="a trained phase-3 model folder (model.safetensors + config.json)")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="results folder with the preprocessed cases, reports and ground truth (its "
                             "VALIDATION split is scored)")
    parser.add_argument("--crop", choices=("center", "whole"), default="center",
                        help="center: the centred training crop, as phase 3's validation; whole: whole volumes")
    parser.add_argument("--catalog", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, reports, truth = load_validation(args.results)  # first: validation labels only
    device = pick_device(args.device)
    _, saved = read_config(args.model)
    model = load_model(args.model, device)
    if model.vqvae is None:
        raise SystemExit(f"{args.model} has no VQ-VAE (vq_codes 0): give a phase-3 (normality) or -4 model folder")
    crop_size = (saved.get("train") or {}).get("crop_size")
    if args.crop == "center" and not crop_size:
        raise SystemExit(f"{args.model}/config.json records no train.crop_size: use --crop whole")
    rows, codes = error_rows(model, cases, reports, device, args.crop, crop_size)
    diseases = disease_aucs(rows, truth, args.catalog)
    anatomy = status_aucs(rows).join(codebook_table(model.vqvae, codes), on="anatomy", how="left")
    write(args, argv, diseases, anatomy, rows, saved)
    return diseases, anatomy


def write(args, argv, diseases: pl.DataFrame, anatomy: pl.DataFrame, rows: pl.DataFrame, saved: dict) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"normality_anomaly_{args.label}.md"
    diseases.write_csv(path.with_suffix(".csv"))
    anatomy.write_csv(path.with_name(f"{path.stem}_anatomy.csv"))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    summary = saved.get("normality") or {}
    scored = diseases.filter(pl.col("auc").is_not_nan())
    all_row = anatomy.filter(pl.col("anatomy") == "all").row(0, named=True)
    path.write_text(
        f"# Does the normality model see abnormality? ({dt.date.today()})\n\n"
        f"Machine: {cpu()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}, "
        f"{args.threads} threads.\n\nCommand: `python benchmarks/normality_anomaly.py {command}`\n\n"
        f"Model `{args.model}` (phase {saved.get('phase')}, K={saved['model'].get('vq_codes')} codes of dimension "
        f"{saved['model'].get('vq_dim')}, token_stage {saved['model'].get('token_stage')}); validation split of "
        f"`{args.results}`: {rows['case_id'].n_unique()} cases, {len(rows)} (case, anatomy) rows, {args.crop} "
        f"{'crop' if args.crop == 'center' else 'volumes'}. Score: the VQ-VAE's reconstruction error of the row's "
        "tokens (row_error, no codebook update). Phase 3 recorded at its end: "
        + (", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()) or "n/a")
        + ".\n\n"
        f"Mean AUC over the {len(scored)} diseases with both classes: "
        f"{scored['auc'].mean() if len(scored) else float('nan'):.3f}; abnormal vs normal anatomies by the "
        f"report, pooled over anatomies: {all_row['auc_vs_normal']:.3f} (vs normal or unmentioned "
        f"{all_row['auc_vs_normal_or_unmentioned']:.3f}). AUC 0.5 = the error does not tell them apart.\n\n"
        "Per disease (the error of its anatomy; positives and negatives from the ground truth):\n\n"
        + markdown(diseases)
        + "\nPer anatomy: abnormal vs normal by the report status, and codebook use (validation assignments "
        "of all rows and of the normal rows; train_*: the usage the model saved from training):\n\n"
        + markdown(anatomy),
        encoding="utf-8")
    print(path.read_text(encoding="utf-8"))
    return path


if __name__ == "__main__":
    main()
