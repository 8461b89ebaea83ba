"""Ground truth from a wide label table (one 0/1 column per disease)."""

from __future__ import annotations

import polars as pl

from .. import catalog
from .schema import GROUND_TRUTH, GROUND_TRUTH_SCHEMA, frame
from .tables import ROW_WHERE, label_value, strip_image_suffix, text

# a label column with more than this fraction of its filled cells not 0 or 1 is refused as a whole
MAX_BAD_LABEL_FRACTION = 0.5


def _shown(v) -> str:
    s = text(v)
    return ascii(s if len(s) <= 40 else s[:40] + "...")


def check_label_columns(labels: pl.DataFrame, columns) -> None:
    """Refuse (ValueError naming the column and examples) a label column whose filled cells are
    mostly not 0 or 1: probabilities, yes/no, 1/2 codes or the wrong column, not a few typos."""
    for col in columns:
        filled = [v for v in labels[col].to_list() if label_value(v) != (None, True)]
        bad = [v for v in filled if not label_value(v)[1]]
        if filled and len(bad) > MAX_BAD_LABEL_FRACTION * len(filled):
            examples = ", ".join(dict.fromkeys(_shown(v) for v in bad[:50]))
            raise ValueError(f"label column {col!r}: {len(bad)} of its {len(filled)} filled cells are not 0 or 1 "
                             f"(e.g. {examples}); a label cell must be 0, 1 or empty (convert probabilities, "
                             "yes/no or other codes first, or check that the column is the right one)")


def ground_truth(labels: pl.DataFrame, key_col: str, key_to_case: dict, columns: dict,
                  excl: list[dict]) -> pl.DataFrame:
    """Long ground truth from a wide label table. ``columns``: label column -> Disease.

    A label cell must be 0, 1 (also 0.0/1.0) or empty. An empty cell leaves that disease
    unlabelled (a note, stage ground_truth); any other value (0.9, 2, -1, 300, 1e400, "yes")
    leaves the whole case without ground truth, named by row (the table's ``ROW_WHERE`` column
    when it has one), column and value. A column mostly of such values is refused
    (``check_label_columns``)."""
    check_label_columns(labels, columns)
    rows, seen = [], set()
    for r in labels.iter_rows(named=True):
        case_id = key_to_case.get(strip_image_suffix(text(r[key_col])))
        if case_id is None or case_id in seen:
            continue
        seen.add(case_id)
        missing, bad, found = [], [], []
        for col, d in columns.items():
            v, valid = label_value(r[col])
            if not valid:
                bad.append(f"column {col!r} holds {_shown(r[col])}")
            elif v is None:
                missing.append(col)
            else:
                found.append({"case_id": case_id, "disease_id": d.id, "anatomy": d.anatomy, "label": v})
        where = r.get(ROW_WHERE) or f"{key_col} {text(r[key_col])}"
        if bad:
            excl.append({"case_id": case_id, "stage": GROUND_TRUTH,
                         "reason": f"{where}: {'; '.join(bad)}, not 0, 1 or empty: none of this case's labels "
                                   "are used (the case is not evaluated; training reads no labels)"})
            continue
        rows += found
        if missing:
            excl.append({"case_id": case_id, "stage": GROUND_TRUTH,
                         "reason": f"{where}: label missing for: {', '.join(missing)}"})
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
