"""The cohort's tables, one definition each: every source (demo, CT-RATE, a generic table) writes
exactly these, and every later stage reads them.

manifest (``MANIFEST_SCHEMA``), one row per case
    case_id (a plain folder name, ``workspace.case_id_problem``), split ("train"/"val"/"test"),
    image_path (a file or a DICOM series folder), mask_path (the demo's or a table's masks, else
    null), report_text, source, spacing_x/y/z (mm; authoritative over the image header),
    shape_x/y/z, rescale_slope, rescale_intercept (CT-RATE's metadata; else null), source_id (the
    id as the source gave it), ingest_note (what ingest changed on the way in, or null),
    series_uid (the SeriesInstanceUID of the DICOM series that is the case's image when image_path
    is a DICOM study folder, ``imaging.io.choose_series``; null otherwise: every reader then
    applies the same rule).
ground truth (``GROUND_TRUTH_SCHEMA``), long: case_id, disease_id, anatomy, label (int8); empty
    for a source without labels. Read only by evaluation.
exclusions (``EXCLUSIONS_SCHEMA``): case_id, stage, reason. Nothing is dropped silently: stage
    ``INGEST`` (the case is not in the manifest), ``SEGMENT`` / ``PREPROCESS`` (the case stopped
    there), or ``GROUND_TRUTH`` (a note: the case is kept but its labels are missing or incomplete).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .. import workspace

# <cohort>/lesions/<case_id>.nii.gz: a case's local lesions as a label map (the demo cohort writes them);
# <cohort>/lesions/labels.json: {"labels": {value: disease_id}, ...}. Here, not in the demo package, so
# that the figures can find them without importing the demo generator (and its imaging libraries).
LESIONS_DIR = "lesions"
LESION_LABELS = "labels.json"

MANIFEST_SCHEMA = {
    "case_id": pl.Utf8, "split": pl.Utf8, "image_path": pl.Utf8, "mask_path": pl.Utf8,
    "report_text": pl.Utf8, "source": pl.Utf8,
    "spacing_x": pl.Float64, "spacing_y": pl.Float64, "spacing_z": pl.Float64,
    "shape_x": pl.Int64, "shape_y": pl.Int64, "shape_z": pl.Int64,
    "rescale_slope": pl.Float64, "rescale_intercept": pl.Float64,
    "source_id": pl.Utf8,  # the id as the source gave it (differs from case_id only under cohort.unsafe_ids: slug)
    "ingest_note": pl.Utf8,  # what ingest changed on the way in (id mapped, report decoded with a fallback), or null
    "series_uid": pl.Utf8,  # a DICOM folder's chosen series (imaging.io.choose_series), else null
}
GROUND_TRUTH_SCHEMA = {"case_id": pl.Utf8, "disease_id": pl.Utf8, "anatomy": pl.Utf8, "label": pl.Int8}
EXCLUSIONS_SCHEMA = {"case_id": pl.Utf8, "stage": pl.Utf8, "reason": pl.Utf8}
SPLITS = ("train", "val", "test")

# exclusion stages
INGEST = "ingest"
SEGMENT = "segment"
PREPROCESS = "preprocess"
GROUND_TRUTH = "ground_truth"  # a note on a kept case, not an exclusion

MANIFEST, GROUND_TRUTH_FILE, EXCLUSIONS = "manifest.parquet", "ground_truth.parquet", "exclusions.parquet"


def empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    """Rows as a frame of exactly ``schema``'s columns, in its order."""
    return pl.DataFrame(rows, schema=schema).select(list(schema)) if rows else empty(schema)


def write(manifest: pl.DataFrame, ground_truth: pl.DataFrame | None, exclusions: pl.DataFrame | None,
          out_dir) -> dict[str, Path]:
    """Write manifest.parquet, ground_truth.parquet (empty when the source has no labels) and
    exclusions.parquet (possibly empty) into ``out_dir``; returns the paths written.

    Every case id of the manifest must be safe as a folder name (``workspace.case_id_problem``):
    later stages use it as one, and Snakemake deletes stale outputs at those paths.
    """
    unsafe = [(c, p) for c in manifest["case_id"] if (p := workspace.case_id_problem(c))]
    if unsafe:
        raise ValueError(f"manifest holds {len(unsafe)} case id(s) unsafe as folder names, e.g. {unsafe[0][1]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"manifest": out / MANIFEST, "exclusions": out / EXCLUSIONS, "ground_truth": out / GROUND_TRUTH_FILE}
    manifest.select(list(MANIFEST_SCHEMA)).write_parquet(paths["manifest"])
    (exclusions if exclusions is not None else empty(EXCLUSIONS_SCHEMA)).write_parquet(paths["exclusions"])
    (ground_truth if ground_truth is not None else empty(GROUND_TRUTH_SCHEMA)).write_parquet(paths["ground_truth"])
    return paths
