"""Running a per-case stage (segment, preprocess) on cases of the manifest: each case gets its own
folder, written complete or not at all (``workspace.replace_dir``), holding the outputs or
``excluded.json`` with the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from ..cohort.schema import PREPROCESS, SEGMENT
from ..workspace import check_case_id, replace_dir
from .exclusion import CaseExcluded, read_exclusion, write_exclusion
from .preprocess import preprocess_case
from .segment import segment_case

log = logging.getLogger(__name__)


def manifest_row(manifest, case_id: str) -> dict:
    """The manifest row of ``case_id`` (a plain folder name) as a dict."""
    check_case_id(case_id)
    rows = pl.read_parquet(manifest).filter(pl.col("case_id") == case_id)
    if len(rows) != 1:
        raise ValueError(f"case {case_id!r} appears {len(rows)} times in {manifest} (expected once)")
    return rows.row(0, named=True)


def run_case(stage: str, case_id: str, out_dir, work) -> None:
    """``work(folder)`` for one case into a fresh folder that replaces ``out_dir`` only when
    complete; a ``CaseExcluded`` becomes ``out_dir``/excluded.json with its reason."""
    try:
        with replace_dir(out_dir) as tmp:
            work(tmp)
    except CaseExcluded as e:
        with replace_dir(out_dir) as tmp:
            write_exclusion(tmp, case_id, e.stage or stage, e.reason)


def segment(manifest, case_id: str, settings: dict, out_dir) -> None:
    """The segment stage for one case (settings: sections segment and the preprocess image checks)."""
    cfg = {**settings["segment"], "preprocess": settings["preprocess"]}
    if cfg["backend"] == "precomputed" and not cfg.get("path"):
        raise SystemExit("segment.backend precomputed needs segment.path (a folder of segmentations)")
    case = manifest_row(manifest, case_id)

    def work(out):
        table = segment_case(case, cfg, out)
        log.info("%s: %d anatomies present, %d complete", case_id, table["present"].sum(), table["complete"].sum())

    run_case(SEGMENT, case_id, out_dir, work)


def preprocess(manifest, case_id: str, settings: dict, segment_dir, out_dir) -> None:
    """The preprocess stage for one case, after its segment stage (whose exclusion carries over)."""
    case = manifest_row(manifest, case_id)

    def work(out):
        upstream = read_exclusion(segment_dir)
        if upstream:  # excluded at segmentation: carry the record forward, nothing to preprocess
            raise CaseExcluded(upstream["reason"], upstream["stage"])
        meta = preprocess_case(case, Path(segment_dir) / "anatomy.nii.gz", settings["preprocess"], out)
        log.info("%s: %s @ %s mm -> %s @ %s mm; %s", case_id, meta["original_size"],
                 [round(v, 2) for v in meta["original_spacing"]], meta["size"], meta["spacing"], meta["hu_decision"])

    run_case(PREPROCESS, case_id, out_dir, work)
