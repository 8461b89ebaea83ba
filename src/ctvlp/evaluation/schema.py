"""The predictions table every evaluation writes (zero-shot and linear probe), and why a row can
be not evaluable."""

from __future__ import annotations

import polars as pl

PREDICTION_SCHEMA = {"case_id": pl.Utf8, "split": pl.Utf8, "disease_id": pl.Utf8, "disease": pl.Utf8,
                     "anatomy": pl.Utf8, "organ": pl.Utf8, "type": pl.Utf8, "evaluable": pl.Boolean,
                     "reason": pl.Utf8, "score": pl.Float64}  # + label (Int8, ground truth) once joined


class NoLabelsError(RuntimeError):
    """The cohort has no ground-truth labels, which evaluation needs."""


NOT_EVALUABLE_ANATOMY = "anatomy absent or incomplete in the scan"
NOT_EVALUABLE_ONE_CLASS = "one class in the training labels"  # linear probe
NOT_EVALUABLE_NO_LABELS = "no training labels"  # linear probe
