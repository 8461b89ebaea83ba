"""Ground truth from a wide label table (one 0/1 column per disease)."""

from __future__ import annotations

import polars as pl

from .. import catalog
from .schema import GROUND_TRUTH, GROUND_TRUTH_SCHEMA, frame
from .tables import number, strip_image_suffix, text


def ground_truth(labels: pl.DataFrame, key_col: str, key_to_case: dict, columns: dict,
                  excl: list[dict]) -> pl.DataFrame:
    """Long ground truth from a wide label table. ``columns``: label column -> Disease."""
    rows, seen = [], set()
    for r in labels.iter_rows(named=True):
        case_id = key_to_case.get(strip_image_suffix(text(r[key_col])))
        if case_id is None or case_id in seen:
            continue
        seen.add(case_id)
        missing = []
        for col, d in columns.items():
            v = number(r[col])
            if v is None:
                missing.append(col)
                continue
            rows.append({"case_id": case_id, "disease_id": d.id, "anatomy": d.anatomy, "label": int(v)})
        if missing:
            excl.append({"case_id": case_id, "stage": GROUND_TRUTH,
                         "reason": f"label missing or unreadable for: {', '.join(missing)}"})
    for case_id in sorted(set(key_to_case.values()) - seen):
        excl.append({"case_id": case_id, "stage": GROUND_TRUTH,
                     "reason": "no row in the labels table; case kept without ground truth"})
    return frame(rows, GROUND_TRUTH_SCHEMA).sort(["case_id", "disease_id"])


def label_columns(label_cols, available, disease_catalog: str) -> dict:
    """Label column -> Disease; columns are matched to catalog diseases by id or by name."""
    diseases = catalog.diseases(disease_catalog)
    by_key = {d.id: d for d in diseases} | {d.name: d for d in diseases} | {d.name.lower(): d for d in diseases}
    if isinstance(label_cols, dict):
        pairs = list(label_cols.items())
    else:
        pairs = [(c, c) for c in label_cols]
    out = {}
    for col, key in pairs:
        if col not in available:
            raise ValueError(f"label column {col!r} not in the table")
        d = by_key.get(key) or by_key.get(str(key).lower())
        if d is None:
            raise ValueError(f"label column {col!r} is neither a disease id nor a disease name of "
                             f"catalog {disease_catalog!r}")
        out[col] = d
    return out
