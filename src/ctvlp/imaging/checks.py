"""Checks shared by the per-case stages: geometry (3D, enough slices, plausible spacing, a
size that can be allocated; finite header fields and an orthonormal direction matrix, for images
and masks alike: ``geometry_problem``, ``check_mask``, ``check_manifest_spacing``), HU (stored
values vs HU, a rescale applied at most once), and NaN/Inf voxels. A failed check raises
``CaseExcluded`` with the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .exclusion import CaseExcluded
from .io import (
    first_line,
    header_info,
    modality,
    nifti_nonfinite,
    read_image,
    verify_nifti_data,
)

log = logging.getLogger(__name__)


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


ORTHONORMAL_TOLERANCE = 1e-3  # DICOM direction cosines are stored to ~1e-6; a broken header is far off


def geometry_problem(dimension: int, spacing, origin, direction) -> str | None:
    """What makes a header's geometry unusable, or None: NaN/Inf in spacing, origin or direction,
    a spacing that is not positive, a direction matrix that is singular or not orthonormal (ITK
    resamples through it: a singular one maps the volume onto a plane, a skewed one shears it)."""
    fields = {"spacing": spacing, "origin": origin, "direction": direction}
    bad = [f"{name} {[round(float(v), 4) for v in values]}" for name, values in fields.items()
           if not np.isfinite(np.asarray(values, dtype=np.float64)).all()]
    if bad:
        return f"NaN/Inf in header field(s): {'; '.join(bad)}"
    if any(float(s) <= 0 for s in spacing):
        return f"non-positive voxel spacing {[round(float(s), 4) for s in spacing]} in the header"
    d = np.asarray(direction, dtype=np.float64)
    if d.size != dimension * dimension:
        return f"direction matrix has {d.size} entries for a {dimension}D image"
    d = d.reshape(dimension, dimension)
    det = float(np.linalg.det(d))
    if abs(det) < ORTHONORMAL_TOLERANCE:
        return f"singular direction matrix (determinant {det:.3g}): {np.round(d, 4).tolist()}; broken header?"
    deviation = float(np.abs(d.T @ d - np.eye(dimension)).max())
    if deviation > ORTHONORMAL_TOLERANCE:
        return (f"direction matrix is not orthonormal (|D^T D - I| up to {deviation:.3g}, tolerance "
                f"{ORTHONORMAL_TOLERANCE:g}): {np.round(d, 4).tolist()}; sheared or broken header?")
    return None


def check_header_geometry(what: str, dimension: int, spacing, origin, direction) -> None:
    """``geometry_problem`` as a ``CaseExcluded`` naming ``what`` (e.g. "image /data/ct.nii.gz")."""
    problem = geometry_problem(dimension, spacing, origin, direction)
    if problem:
        raise CaseExcluded(f"{what}: {problem}")


def _header(path: Path, what: str) -> sitk.ImageFileReader:
    """A file's header read without its voxels; a missing or unreadable file excludes the case."""
    if not path.is_file():
        raise CaseExcluded(f"{what} not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CaseExcluded(f"unreadable {what} {path}: {first_line(e)}") from e
    return reader


def check_mask(path: str | Path, image_dimension: int = 3, what: str = "mask") -> None:
    """A mask (label image) file's header before it is read: readable, one component, as many
    dimensions as its image (a 2D slice or a 4D stack for a 3D CT is refused; a 4D file whose
    fourth axis has length 1 is read as 3D by ITK and passes), finite spacing/origin/direction and
    an orthonormal direction matrix. Its grid may differ from the image's (masks are resampled
    through physical coordinates; one that lands mostly off the image is refused there)."""
    path = Path(path)
    reader = _header(path, what)
    dim, size = reader.GetDimension(), list(reader.GetSize())
    if dim != image_dimension:
        raise CaseExcluded(f"{what} {path} is {dim}D (size {size}) but its image is {image_dimension}D")
    if reader.GetNumberOfComponents() != 1:
        raise CaseExcluded(f"{what} {path} has {reader.GetNumberOfComponents()} components per voxel; a label "
                           "image has one")
    check_header_geometry(f"{what} {path}", dim, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def check_manifest_spacing(case: dict) -> None:
    """The manifest's spacing_x/y/z (authoritative over the header, ``io.manifest_spacing``) must be
    finite and positive where given: a NaN from a metadata table would reach every resampling."""
    vals = {a: case.get(f"spacing_{a}") for a in "xyz"}
    bad = {a: v for a, v in vals.items() if v is not None and not (np.isfinite(v) and v > 0)}
    if bad:
        raise CaseExcluded("manifest spacing " + ", ".join(f"spacing_{a} = {v}" for a, v in bad.items())
                           + " is not a positive finite number (the cohort's metadata table?)")


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


def without_nonfinite(image: sitk.Image, path, max_fraction: float) -> tuple[sitk.Image, str | None]:
    """``image`` (float32, as read from ``path``) with NaN/Inf voxels repaired by
    ``repair_nonfinite``: set to air with a warning, or the case excluded when there are many."""
    hidden = nifti_nonfinite(path)
    if hidden is None and np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        return image, None
    values = sitk.GetArrayFromImage(image)
    if hidden is not None:
        values[hidden[0]] = hidden[1]  # put back what the reader zeroed, then count and repair
    warning = repair_nonfinite(values, max_fraction)
    repaired = sitk.GetImageFromArray(values)
    repaired.CopyInformation(image)
    return repaired, warning


def check_image(path: str | Path, cfg: dict, verify_data: bool = False, image: sitk.Image | None = None,
                series_uid: str | None = None) -> dict:
    """Header-level checks shared by segment and preprocess: readable, CT, 3D, enough slices,
    plausible spacing; with ``verify_data`` also that a NIfTI file is complete. ``image``: the
    already read image (a DICOM series is then not read a second time). ``series_uid``: the series
    of a DICOM folder (the manifest's; None: ``io.choose_series``'s rule). Raises ``CaseExcluded``;
    returns the grid (size, spacing)."""
    path = Path(path)
    if verify_data and path.name.endswith((".nii", ".nii.gz")):
        verify_nifti_data(path)
    mod = modality(path, series_uid)
    if mod and mod != "CT":
        raise CaseExcluded(f"DICOM modality {mod}, not CT")
    if image is None and path.is_dir():  # the series' declared size, before reading its voxels
        try:
            spacing, size = header_info(path, series_uid)
        except (ValueError, RuntimeError) as e:
            raise CaseExcluded(f"unreadable DICOM series {path}: {first_line(e)}") from e
        check_geometry(size, spacing, 3, cfg["min_slices"], cfg["spacing_range"], cfg["max_voxels"])
    if image is not None or path.is_dir():
        img = image if image is not None else read_image(path, series_uid)
        size, spacing, dim = img.GetSize(), img.GetSpacing(), img.GetDimension()
        origin, direction = img.GetOrigin(), img.GetDirection()
    else:
        reader = _header(path, "image")
        size, spacing, dim = reader.GetSize(), reader.GetSpacing(), reader.GetDimension()
        origin, direction = reader.GetOrigin(), reader.GetDirection()
        if reader.GetNumberOfComponents() != 1:
            raise CaseExcluded(f"{reader.GetNumberOfComponents()} components per voxel; a CT has one")
    check_header_geometry(f"image {path}", dim, spacing, origin, direction)
    check_geometry(size, spacing, dim, cfg["min_slices"], cfg["spacing_range"], cfg["max_voxels"])
    return {"size": list(size), "spacing": list(spacing)}
