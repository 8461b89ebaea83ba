"""Where the per-case stages put a case (one folder per case and stage), and reading a
preprocessed case back: what training and evaluation read.

The qc stage lists the cases that go on in ``qc/cases.parquet``: the manifest's columns plus
``SEGMENT_DIR`` and ``PREPROCESSED_DIR``, each case's two folders. Training and evaluation find
a case's files only through those columns (``paths_from``), so the workflow's only dependency of
theirs on the per-case outputs is that table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..workspace import read_parquet

SEGMENT_DIR, PREPROCESSED_DIR = "segment_dir", "preprocessed_dir"  # columns of qc/cases.parquet


@dataclass
class CasePaths:
    case_id: str
    image: Path  # float16 (x, y, z) .npy in [0, 1]
    anatomy: Path  # uint8 (x, y, z) .npy anatomy indices
    meta: Path  # preprocess JSON (the case's QC record)
    table: Path  # segment anatomy table (Parquet)


def case_paths(case_id: str, segment_dir, preprocessed_dir) -> CasePaths:
    """The files of a case whose stage folders are ``segment_dir`` and ``preprocessed_dir``."""
    pre, seg = Path(preprocessed_dir), Path(segment_dir)
    return CasePaths(case_id, pre / "image.npy", pre / "anatomy.npy", pre / "meta.json", seg / "anatomies.parquet")


def with_folders(manifest: pl.DataFrame, segment_root, preprocessed_root) -> pl.DataFrame:
    """The manifest with each case's stage folders (``<root>/<case_id>``) as two columns."""
    return manifest.with_columns(
        (pl.lit(f"{Path(segment_root)}/") + pl.col("case_id")).alias(SEGMENT_DIR),
        (pl.lit(f"{Path(preprocessed_root)}/") + pl.col("case_id")).alias(PREPROCESSED_DIR))


def paths_from(cases: pl.DataFrame) -> dict[str, CasePaths]:
    """{case_id: its files} of a table with the stage folder columns (``qc/cases.parquet``)."""
    missing = {SEGMENT_DIR, PREPROCESSED_DIR} - set(cases.columns)
    if missing:
        raise ValueError(f"the case table lacks {sorted(missing)}: give qc/cases.parquet (written by ctvlp qc), "
                         "not the cohort manifest")
    return {c: case_paths(c, s, p) for c, s, p in cases.select("case_id", SEGMENT_DIR, PREPROCESSED_DIR).iter_rows()}


def load_case(paths: CasePaths):
    """A preprocessed case for inference: image and anatomy map memory-mapped (x, y, z), the (M,)
    complete-in-scan flags of its segment table, and its anatomy boxes on the preprocessed grid
    ({name: bbox}; None for outputs of an older ctvlp without them)."""
    complete = read_parquet(paths.table).sort("index")["complete"].to_numpy().astype(bool)
    boxes = json.loads(paths.meta.read_text(encoding="utf-8")).get("anatomy_bbox")
    return np.load(paths.image, mmap_mode="r"), np.load(paths.anatomy, mmap_mode="r"), complete, boxes
