"""Zero-shot diagnosis: each val/test case's anatomy embedding scored against its diseases'
positive and negative prompts, joined with the ground truth. The operating threshold of each
disease is chosen on the validation split later (``metrics``), never on test labels."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from .. import catalog
from ..imaging.storage import paths_from
from ..model.io import load_model, pick_device
from ..model.zeroshot import disease_scores, prompt_styles
from ..workspace import read_parquet
from .embed import embed_cases
from .metrics import choose_prompt_style
from .schema import NOT_EVALUABLE_ANATOMY, PREDICTION_SCHEMA, NoLabelsError


def read_ground_truth(ground_truth) -> pl.DataFrame:
    """The cohort's ground truth (a Parquet path or a DataFrame); NoLabelsError when it is empty
    (a source without labels, e.g. a table without cohort.table.label_cols)."""
    truth = ground_truth if isinstance(ground_truth, pl.DataFrame) else read_parquet(ground_truth)
    if truth.is_empty():
        raise NoLabelsError(
            "the cohort has no ground-truth labels (empty ground truth): zero-shot evaluation, the linear probe "
            "and the figures need them. Give cohort.table.label_cols (or cohort.ctrate.labels_csv); the trained "
            "model itself is in results/train/boost")
    return truth


def _rows(model, emb, complete, ids, splits, disease_catalog: str, style: str) -> pl.DataFrame:
    rows = []
    for d, scores in disease_scores(model, emb, disease_catalog, style):
        j = catalog.anatomy_by_name(d.anatomy).index - 1
        for case_id, split, score, ok in zip(ids, splits, scores, complete[:, j]):
            rows.append({"case_id": case_id, "split": split, "disease_id": d.id, "disease": d.name,
                         "anatomy": d.anatomy, "organ": d.organ, "type": d.type, "evaluable": bool(ok),
                         "reason": None if ok else NOT_EVALUABLE_ANATOMY,
                         "score": float(score) if ok else None, "prompt_style": style})
    return pl.DataFrame(rows, schema={**PREDICTION_SCHEMA, "prompt_style": pl.Utf8})


@torch.no_grad()
def predict(model_dir, cases, ground_truth, disease_catalog: str, device="auto", crop_size=None,
            prompt_style: str = "auto") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Zero-shot predictions: one row per (case in val/test, disease) with its score, or
    evaluable=False with the reason, and the ground-truth label; and the prompt-style table.

    cases: qc/cases.parquet (the cases and their folders); crop_size: None = whole volumes, else
    anatomy-centred crops (``embed_cases``). prompt_style "auto": every style of the catalog is
    scored and the one with the highest mean AUC on the VALIDATION split is kept
    (``metrics.choose_prompt_style``; test labels play no part); else the named style.
    """
    truth = read_ground_truth(ground_truth)  # before anything is loaded: no labels, no evaluation
    device = pick_device(device)
    model = load_model(model_dir, device)
    evaluated = read_parquet(cases).filter(pl.col("split").is_in(["val", "test"]))
    ids, splits = evaluated["case_id"].to_list(), evaluated["split"].to_list()
    paths = paths_from(evaluated)
    embs = embed_cases(model, [paths[c] for c in ids], device, crop_size)
    emb = torch.from_numpy(np.stack([embs[c][0] for c in ids])).to(device)  # (cases, M, D)
    complete = np.stack([embs[c][1] for c in ids])  # (cases, M)
    labels = truth.select("case_id", "disease_id", pl.col("label").cast(pl.Int8))
    by_style = {}
    for style in prompt_styles(disease_catalog):
        pred = _rows(model, emb, complete, ids, splits, disease_catalog, style)
        pred = pred.join(labels, on=["case_id", "disease_id"], how="left")
        missing = pred.filter(pl.col("label").is_null())
        if len(missing):
            raise ValueError(f"ground truth lacks {len(missing)} (case, disease) pairs, e.g. "
                             f"{missing.row(0, named=True)['case_id']}/{missing.row(0, named=True)['disease_id']}")
        by_style[style] = pred
    chosen, choice = choose_prompt_style(by_style, prompt_style)
    return by_style[chosen], choice
