"""Linear probe (the paper's Table 4 setting): the pretrained vision encoder stays frozen and one
logistic regression per disease is fitted on the embedding of that disease's anatomy.

Data. Every case of the manifest is embedded once with ``embed.embed_cases`` (the same code and
crop setting as zero-shot evaluation). Training uses the *train* split only, with labels derived
from its parsed reports (``report_labels``); ground-truth labels are never read for training
cases. Val and test rows carry the ground-truth label, exactly as ``zeroshot.predict`` writes
them, so ``metrics.metrics_table`` picks each threshold on val and reports test metrics with the
same code as the zero-shot tables.

Report labels (``report_labels``), per (case, disease):
  1     the disease's anatomy row lists the disease with presence "present";
  0     the anatomy row was parsed (status normal, abnormal or not_mentioned, no parser error) and
        the disease is listed as "absent" or not listed at all -- a report that does not name a
        finding is read as its absence, as report-derived multi-label sets (CT-RATE's) do and as
        training's ``unmentioned_as_normal`` option does;
  null  "uncertain" ("cannot be excluded", "possible ..."): neither class is trustworthy, so the
        case is left out of that disease's fit rather than guessed; likewise an anatomy the parser
        could not read (status "unparsed", a row with a parser ``error`` such as "empty report",
        or no row at all; unlike ``training.data.anatomy_texts``, a rules-parser error row is not read as
        "not mentioned"). Null labels of the training split are counted and logged per disease.

Classifier (``make_classifier``): standardisation fitted on the training rows, then scikit-learn
``LogisticRegression(class_weight="balanced")`` (lbfgs, deterministic). Standardising matters
because the anatomy embeddings are L2-normalised, so their coordinates are small and of unequal
spread. The inverse regularisation strength C is chosen per disease from ``C_GRID`` by the AUC on
the *validation* split against the validation cases' REPORT labels (never ground truth, never
test data); ties go to the C nearest ``C_DEFAULT`` (then the smaller). Where the validation
report labels have one class or no evaluable case, ``C_DEFAULT`` is used. The fit with the chosen C
(training split only; val is not added) scores the val and test cases.

Rows: one per (val/test case, disease that has ground truth; zero-shot or not), with exactly
``zeroshot.predict``'s columns. Not evaluable, with the reason: the anatomy is absent or
incomplete in the scan (as ``zeroshot.predict``); the disease's training labels have one class
("one class in the training labels", every row of that disease); or no training case has both
a complete anatomy and a label ("no training labels", every row of that disease).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .. import catalog
from ..catalog import Disease
from ..imaging.storage import paths_from
from ..model.io import load_model, pick_device
from ..workspace import read_parquet
from . import metrics
from .embed import embed_cases
from .schema import (
    NOT_EVALUABLE_ANATOMY,
    NOT_EVALUABLE_NO_LABELS,
    NOT_EVALUABLE_ONE_CLASS,
    PREDICTION_SCHEMA,
)
from .zeroshot import read_ground_truth

log = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0, 10.0)
C_DEFAULT = 1.0
PARSED = ("normal", "abnormal", "not_mentioned")


def _frame(x) -> pl.DataFrame:
    return x if isinstance(x, pl.DataFrame) else read_parquet(x)


def _diseases(disease_catalog) -> tuple[Disease, ...]:
    return catalog.diseases(disease_catalog) if isinstance(disease_catalog, (str, Path)) else tuple(disease_catalog)


def report_labels(reports: pl.DataFrame, case_ids: Iterable[str], disease_catalog) -> pl.DataFrame:
    """(case_id, disease_id, label Int8 or null) for every case in ``case_ids`` and catalog disease.

    reports: ``reports.REPORT_SCHEMA`` rows (case_id, anatomy, status, findings, optional error).
    disease_catalog: a catalog name or path, or a sequence of ``catalog.Disease``.
    See the module docstring for the 1 / 0 / null rule.
    """
    case_ids = [str(c) for c in case_ids]
    dis = _diseases(disease_catalog)
    grid = pl.DataFrame({"case_id": case_ids}).join(
        pl.DataFrame({"disease_id": [d.id for d in dis], "anatomy": [d.anatomy for d in dis]}), how="cross")
    case_reports = reports.filter(pl.col("case_id").is_in(case_ids))
    dupes = case_reports.group_by("case_id", "anatomy").len().filter(pl.col("len") > 1)
    if len(dupes):
        r = dupes.row(0, named=True)
        raise ValueError(f"reports have {len(dupes)} duplicate (case, anatomy) rows, e.g. {r['case_id']}/{r['anatomy']}")
    error = pl.col("error") if "error" in case_reports.columns else pl.lit(None, dtype=pl.Utf8)
    rows = case_reports.select("case_id", "anatomy", (pl.col("status").is_in(PARSED) & error.is_null()).alias("parsed"))
    found = (case_reports.select("case_id", "anatomy", "findings").explode("findings").drop_nulls("findings")
             .unnest("findings").select("case_id", "anatomy", "disease_id", "presence"))
    if len(found.unique(["case_id", "anatomy", "disease_id"])) != len(found):
        raise ValueError("a report row lists the same disease twice in its findings")
    out = (grid.join(rows, on=["case_id", "anatomy"], how="left")
           .join(found, on=["case_id", "anatomy", "disease_id"], how="left")
           .with_columns(pl.when(~pl.col("parsed").fill_null(False)).then(None)
                         .when(pl.col("presence") == "present").then(1)
                         .when(pl.col("presence") == "uncertain").then(None)
                         .otherwise(0).cast(pl.Int8).alias("label")))
    return out.select("case_id", "disease_id", "label")


def make_classifier(c: float, seed: int = 0):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000,
                                                              random_state=seed))


def fit_probe(x_train, y_train, x_val=None, y_val=None, seed: int = 0):
    """Fit on the training rows; C from ``C_GRID`` by validation AUC (report labels) when the
    validation rows have both classes, else ``C_DEFAULT``. Returns (fitted pipeline, C)."""
    if y_val is None or len(np.unique(y_val)) < 2:
        return make_classifier(C_DEFAULT, seed).fit(x_train, y_train), C_DEFAULT
    best = None
    for c in sorted(C_GRID, key=lambda c: (abs(np.log10(c / C_DEFAULT)), c)):  # tie-break order
        clf = make_classifier(c, seed).fit(x_train, y_train)
        auc = roc_auc_score(y_val, clf.predict_proba(x_val)[:, 1])
        if best is None or auc > best[0] + 1e-12:
            best = (auc, clf, c)
    return best[1], best[2]


def linear_probe(model_dir, cases, reports, ground_truth, disease_catalog, device="cpu", crop_size=None,
                 seed=0) -> pl.DataFrame:
    """One row per (val/test case, disease with ground truth): the probe's P(positive) with
    ``zeroshot.predict``'s schema (label = ground truth), or evaluable=False with the reason.

    cases (qc/cases.parquet: the cases and their folders), reports, ground_truth: Parquet paths or
    DataFrames; crop_size as in ``zeroshot.predict``.
    """
    truth = read_ground_truth(_frame(ground_truth))  # before anything is loaded
    device = pick_device(device)
    model = load_model(model_dir, device)
    used = _frame(cases).filter(pl.col("split").is_in(["train", "val", "test"]))
    ids, splits = used["case_id"].to_list(), np.array(used["split"].to_list())
    paths = paths_from(used)
    embs = embed_cases(model, [paths[c] for c in ids], device, crop_size)
    emb = np.stack([embs[c][0] for c in ids])  # (cases, M, D)
    complete = np.stack([embs[c][1] for c in ids]).astype(bool)  # (cases, M)
    with_truth = set(truth["disease_id"].to_list())
    dis = [d for d in _diseases(disease_catalog) if d.id in with_truth]
    fit_ids = [c for c, s in zip(ids, splits) if s in ("train", "val")]  # test reports are never read
    lab = report_labels(_frame(reports), fit_ids, dis)
    row_of = {c: i for i, c in enumerate(ids)}
    train, evaluated = splits == "train", np.isin(splits, ["val", "test"])
    rows = []
    for d in dis:
        j = catalog.anatomy_by_name(d.anatomy).index - 1
        y = np.full(len(ids), -1, np.int64)  # -1 = no report label
        sub = lab.filter((pl.col("disease_id") == d.id) & pl.col("label").is_not_null())
        y[[row_of[c] for c in sub["case_id"]]] = sub["label"].to_numpy()
        tr = train & complete[:, j] & (y >= 0)
        va = (splits == "val") & complete[:, j] & (y >= 0)
        n_uncertain = int((train & complete[:, j] & (y < 0)).sum())
        classes = np.unique(y[tr])
        reason, scores = None, np.full(len(ids), np.nan)
        if len(classes) == 0:
            reason = NOT_EVALUABLE_NO_LABELS
        elif len(classes) == 1:
            reason = NOT_EVALUABLE_ONE_CLASS
        else:
            clf, c = fit_probe(emb[tr, j], y[tr], emb[va, j], y[va], seed)
            ok = evaluated & complete[:, j]
            scores[ok] = clf.predict_proba(emb[ok, j])[:, 1]
            log.info("%s: C=%g, %d training cases (%d positive), %d left out (uncertain or unparsed)",
                     d.id, c, tr.sum(), int(y[tr].sum()), n_uncertain)
        if reason:
            log.warning("%s: not evaluable (%s); %d training cases, %d left out", d.id, reason, tr.sum(), n_uncertain)
        for i in np.flatnonzero(evaluated):
            ok = reason is None and bool(complete[i, j])
            rows.append({"case_id": ids[i], "split": str(splits[i]), "disease_id": d.id, "disease": d.name,
                         "anatomy": d.anatomy, "organ": d.organ, "type": d.type, "evaluable": ok,
                         "reason": None if ok else (reason or NOT_EVALUABLE_ANATOMY),
                         "score": float(scores[i]) if ok else None})
    pred = pl.DataFrame(rows, schema=PREDICTION_SCHEMA)
    labels = truth.select(pl.col("case_id").cast(pl.Utf8), "disease_id", pl.col("label").cast(pl.Int8))
    pred = pred.join(labels, on=["case_id", "disease_id"], how="left", maintain_order="left")
    missing = pred.filter(pl.col("label").is_null())
    if len(missing):
        r = missing.row(0, named=True)
        raise ValueError(f"ground truth lacks {len(missing)} (case, disease) pairs, e.g. {r['case_id']}/{r['disease_id']}")
    return pred


def write(pred: pl.DataFrame, out_dir, rule: str = "youden", bootstrap: int = 1000, seed: int = 0) -> dict[str, Path]:
    """linear_probe_predictions.parquet plus the metric tables (``metrics.write_tables``,
    stem "linear_probe": .csv/.parquet/.md and _by_organ/_by_type). Returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred.write_parquet(out / "linear_probe_predictions.parquet")
    table, mean_ci = metrics.metrics_table(pred, rule, bootstrap, seed)
    paths = metrics.write_tables(table, out, stem="linear_probe", mean_ci=mean_ci)
    paths["predictions"] = out / "linear_probe_predictions.parquet"
    return paths
