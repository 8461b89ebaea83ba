"""Input checks, per-case exclusions and the cohort QC tables.

A case that cannot be used (unreadable file, not CT, 2D or too few slices, absurd spacing,
implausible HU, mask that does not match its image, ...) raises ``CaseExcluded`` inside
``segment``/``preprocess``; the CLI records it as ``excluded.json`` in the case's output folder
and the run goes on. ``collect`` gathers every case's record into results/qc/: the QC table
(what was done to each case), the exclusions with their reasons (ingest + imaging), the list of
cases that go on to training and evaluation, and a summary. With ``strict`` any exclusion fails
the run there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl

from .ingest import EXCLUSIONS_SCHEMA

log = logging.getLogger(__name__)

EXCLUDED_FILE = "excluded.json"


class CaseExcluded(Exception):
    """This case cannot be used; the reason is recorded and the rest of the cohort goes on."""

    def __init__(self, reason: str, stage: str = ""):
        super().__init__(reason)
        self.reason, self.stage = reason, stage


def write_exclusion(out_dir: str | Path, case_id: str, stage: str, reason: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXCLUDED_FILE
    path.write_text(json.dumps({"case_id": case_id, "stage": stage, "reason": reason}, indent=1))
    log.warning("%s excluded at %s: %s", case_id, stage, reason)
    return path


def read_exclusion(case_dir: str | Path) -> dict | None:
    path = Path(case_dir) / EXCLUDED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---- checks --------------------------------------------------------------------------------


def check_geometry(size, spacing, dimension: int, min_slices: int, spacing_range, max_voxels: int) -> None:
    """2D images, single/too few slices, absurd voxel spacing and a declared size too large to
    allocate are exclusions (checked on the header, before any voxel is read)."""
    if dimension != 3:
        raise CaseExcluded(f"{dimension}D image (size {list(size)}); a CT volume is 3D")
    n = int(np.prod([int(v) for v in size], dtype=np.float64))
    if n > max_voxels:
        raise CaseExcluded(f"header declares {list(size)} = {n:.3g} voxels, more than preprocess.max_voxels "
                           f"({max_voxels:.3g}); broken header or not a CT volume?")
    if min(size) < min_slices:
        raise CaseExcluded(f"too few slices: size {list(size)}, need at least {min_slices} along every axis "
                           "(preprocess.min_slices)")
    lo, hi = spacing_range
    bad = [round(float(s), 4) for s in spacing if not lo <= s <= hi]
    if bad:
        raise CaseExcluded(f"absurd voxel spacing {[round(float(s), 4) for s in spacing]} mm: {bad} outside "
                           f"[{lo}, {hi}] (preprocess.spacing_range); header broken?")


def sample(arr: np.ndarray, max_voxels: int = 2_000_000) -> np.ndarray:
    """A regular subsample for percentiles: exact enough for QC, fast on 512x512x500 volumes."""
    step = max(1, int(np.ceil((arr.size / max_voxels) ** (1 / 3))))
    return np.asarray(arr[::step, ::step, ::step], dtype=np.float32).ravel()


def _without_padding(values: np.ndarray) -> np.ndarray:
    """Drop the scanner's out-of-field padding: voxels at exactly the minimum value, when that
    minimum is at or below -1024 and holds more than 0.5 % of the volume (e.g. -2048, -3024)."""
    lo = values.min()
    pad = values == lo
    if lo <= -1024 and pad.mean() > 0.005 and (~pad).any():
        return values[~pad]
    return values


def looks_like_hu(values: np.ndarray) -> bool:
    """Air (about -1000 HU) is in every CT field of view; stored raw values (0..4095) have none."""
    return float(np.percentile(_without_padding(values), 1)) < -500


def hu_conversion(values: np.ndarray, slope, intercept, mode: str) -> tuple[float, float, str]:
    """Decide how stored values become HU. Returns (slope, intercept, what was decided).

    mode "as_stored": values are HU. "rescale": apply the manifest's slope/intercept.
    "auto": apply them only when the values are not HU already. Readers (SimpleITK for DICOM,
    NIfTI scl_slope/scl_inter) have applied the file's own header scaling; a manifest's
    RescaleSlope/Intercept (CT-RATE metadata) is applied at most once on top, and not at all to
    volumes that already hold HU (CT-RATE v2; CT-CLIP issue 50 applied it twice).
    """
    given = all(v is not None and not np.isnan(v) for v in (slope, intercept))
    if mode == "as_stored":
        return 1.0, 0.0, "values used as stored (preprocess.hu: as_stored)"
    if mode == "rescale":
        if not given:
            raise CaseExcluded("preprocess.hu is rescale but the manifest has no rescale_slope/rescale_intercept")
        return float(slope), float(intercept), f"manifest rescale applied: HU = {slope} * value + {intercept}"
    hu_already = looks_like_hu(values)
    if hu_already:
        if given and (float(slope), float(intercept)) != (1.0, 0.0):
            return 1.0, 0.0, (f"values already HU (air present); manifest rescale {slope}/{intercept} "
                              "NOT applied again")
        return 1.0, 0.0, "values already HU (air present)"
    if given:
        return float(slope), float(intercept), f"raw stored values; manifest rescale applied: HU = {slope} * value + {intercept}"
    p1, p50 = np.percentile(_without_padding(values), [1, 50])
    raise CaseExcluded(f"values do not look like CT HU (1st percentile {p1:.0f}, median {p50:.0f}; air should be "
                       "near -1000) and the manifest gives no rescale slope/intercept: MR, PET or unscaled CT?")


def repair_nonfinite(arr: np.ndarray, max_fraction: float, fill: float = -1024.0) -> str | None:
    """NaN/Inf voxels of a float HU array, in place: more than ``max_fraction`` of the volume is an
    exclusion; fewer are set to ``fill`` (air) and the returned warning goes into the QC table."""
    if arr.dtype.kind != "f":
        return None
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if not n:
        return None
    fraction = n / arr.size
    kinds = f"{int(np.isnan(arr).sum())} NaN, {n - int(np.isnan(arr).sum())} Inf"
    if fraction > max_fraction:
        raise CaseExcluded(f"{n} non-finite voxels ({kinds}; {fraction:.2%} of the volume), more than "
                           f"preprocess.max_nonfinite_fraction ({max_fraction:.2%})")
    arr[bad] = fill
    return f"{n} non-finite voxels ({kinds}) set to {fill:g} HU"


def check_hu(values: np.ndarray, air_floor: float = -1500.0) -> tuple[dict, list[str]]:
    """HU percentiles (padding excluded) and warnings; air far below -1024 HU is an exclusion."""
    body = _without_padding(values)
    p = np.percentile(body, [0.1, 1, 50, 99, 99.9])
    stats = dict(zip(["p0_1", "p1", "p50", "p99", "p99_9"], [round(float(v), 1) for v in p]))
    stats["padding_fraction"] = round(1 - body.size / values.size, 4)
    if p[1] < air_floor:
        raise CaseExcluded(f"implausible HU: 1st percentile {p[1]:.0f} HU (air should be near -1000); "
                           "rescale slope/intercept applied twice?")
    warnings = []
    if p[0] < -1100:
        warnings.append(f"air below -1100 HU (0.1st percentile {p[0]:.0f})")
    if p[1] > -500:
        warnings.append(f"no air in the field of view (1st percentile {p[1]:.0f} HU)")
    if p[4] > 4000:
        warnings.append(f"very high HU (99.9th percentile {p[4]:.0f}): metal or wrong scaling")
    for w in warnings:
        log.warning("HU check: %s", w)
    return stats, warnings


# ---- cohort tables -------------------------------------------------------------------------


def collect(manifest: str | Path, cohort_exclusions: str | Path | None, segment_dir: str | Path,
            preprocessed_dir: str | Path, out_dir: str | Path, strict: bool = False) -> dict:
    """Gather per-case records into out_dir: qc.parquet (one row per processed case),
    excluded.parquet (ingest + imaging exclusions with reasons, plus ingest's stage "ground_truth"
    notes on kept cases without complete labels), cases.parquet (the manifest rows that go on) and
    summary.md. With ``strict``, raise if any case was excluded (label notes do not count)."""
    man = pl.read_parquet(manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    excluded, rows, kept = [], [], []
    if cohort_exclusions and Path(cohort_exclusions).is_file():
        excluded += pl.read_parquet(cohort_exclusions).to_dicts()
    for case_id in man["case_id"]:
        record = read_exclusion(Path(segment_dir) / case_id) or read_exclusion(Path(preprocessed_dir) / case_id)
        if record:
            excluded.append(record)
            continue
        meta = json.loads((Path(preprocessed_dir) / case_id / "meta.json").read_text(encoding="utf-8"))
        rows.append(_qc_row(meta))
        kept.append(case_id)
    qc_table = pl.DataFrame(rows) if rows else pl.DataFrame()
    exc = pl.DataFrame(excluded, schema=EXCLUSIONS_SCHEMA)
    qc_table.write_parquet(out / "qc.parquet")
    exc.write_parquet(out / "excluded.parquet")
    man.filter(pl.col("case_id").is_in(kept)).write_parquet(out / "cases.parquet")
    summary = _summary(man, kept, exc, qc_table)
    (out / "summary.md").write_text(summary)
    log.info("\n%s", summary)
    dropped = exc.filter(pl.col("stage") != "ground_truth")  # "ground_truth" rows: kept, without labels
    if strict and len(dropped):
        raise SystemExit(f"{len(dropped)} case(s) excluded and preprocess.strict is true; see {out / 'excluded.parquet'}")
    return {"kept": len(kept), "excluded": len(dropped)}


def _qc_row(meta: dict) -> dict:
    row = {k: meta[k] for k in ("case_id", "source_path", "hu_decision", "hu_slope", "hu_intercept")}
    for k in ("original_size", "original_spacing", "size", "spacing"):
        for axis, v in zip("xyz", meta[k]):
            row[f"{k}_{axis}"] = v
    row.update({f"hu_{k}": v for k, v in meta["hu_stats"].items()})
    row["warnings"] = "; ".join(meta["warnings"])
    row["anatomies_present"] = len(meta["anatomy_voxels"])
    return row


def _cell(text) -> str:
    """A Markdown table cell: a hostile id cannot break the table or print control characters."""
    text = str(text)
    if any(not c.isprintable() for c in text):
        text = ascii(text)[1:-1]
    return text.replace("|", "\\|")


def _summary(man: pl.DataFrame, kept: list[str], exc: pl.DataFrame, qc_table: pl.DataFrame) -> str:
    labels = exc.filter(pl.col("stage") == "ground_truth")
    lines = ["# QC summary", "", f"- cases in the manifest: {len(man)}",
             f"- cases processed and kept: {len(kept)}", f"- exclusions recorded: {len(exc) - len(labels)}"]
    if len(labels):
        lines.append(f"- kept cases with missing or incomplete labels (stage ground_truth): {len(labels)}")
    if len(qc_table) and "warnings" in qc_table.columns:
        warned = qc_table.filter(pl.col("warnings") != "")
        lines.append(f"- kept cases with HU warnings: {len(warned)}")
    if len(exc):
        lines += ["", "| case | stage | reason |", "|---|---|---|"]
        lines += [f"| {_cell(r['case_id'])} | {r['stage']} | {_cell(r['reason'])} |" for r in exc.iter_rows(named=True)]
    return "\n".join(lines) + "\n"
