"""The preprocess stage: check, convert to HU (at most one rescale), repair or exclude NaN/Inf,
orient, resample to the target spacing, clip and scale HU, and store the arrays training reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import catalog
from . import checks
from .exclusion import CaseExcluded
from .io import ORIENTATION, read_case_image, read_image, to_xyz


def resample(image: sitk.Image, spacing, interpolator, default: float, reference: sitk.Image | None = None):
    if reference is None:
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
        reference = sitk.Image(size, image.GetPixelID())
        reference.SetSpacing([float(s) for s in spacing])
        reference.SetOrigin(image.GetOrigin())
        reference.SetDirection(image.GetDirection())
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def scale_hu(hu: np.ndarray, window) -> np.ndarray:
    lo, hi = window
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def preprocess_case(case: dict, anatomy_path: str | Path, cfg: dict, out_dir: str | Path) -> dict:
    """Check, convert to HU (at most one rescale), orient, resample (image linear, anatomy map
    nearest onto the image grid), clip and scale HU.

    Writes into ``out_dir``: image.npy (float16 in [0, 1]) and anatomy.npy (uint8), both (x, y, z)
    arrays that training memory-maps, and meta.json recording what was done (the QC row).
    Raises ``CaseExcluded`` for unusable input.
    """
    series = case.get("series_uid")  # a DICOM folder's series (None: io.choose_series's rule)
    checks.check_image(case["image_path"], cfg, series_uid=series)  # the declared size before anything is read
    image, spacing_source = read_case_image(case)
    grid = checks.check_image(case["image_path"], cfg, image=image, series_uid=series)
    target = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), cfg["spacing"])]
    if np.prod(target, dtype=np.float64) > cfg["max_voxels"]:
        raise CaseExcluded(f"resampled to {cfg['spacing']} mm the volume would be {target} voxels, more than "
                           f"preprocess.max_voxels ({cfg['max_voxels']:.3g}); coarser preprocess.spacing?")
    image_f, warning = sitk.Cast(image, sitk.sitkFloat32), None
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):  # NaN/Inf: only float files have them
        image_f, warning = checks.without_nonfinite(image_f, case["image_path"], cfg["max_nonfinite_fraction"])
    warnings = [warning] if warning else []
    image_f = sitk.DICOMOrient(image_f, ORIENTATION)
    slope, intercept, decision = checks.hu_conversion(checks.sample(sitk.GetArrayViewFromImage(image_f)), case.get("rescale_slope"),
                                                  case.get("rescale_intercept"), cfg["hu"])
    if (slope, intercept) != (1.0, 0.0):
        image_f = image_f * slope + intercept
    hu_stats, hu_warnings = checks.check_hu(checks.sample(sitk.GetArrayViewFromImage(image_f)))
    warnings += hu_warnings
    image_f = resample(image_f, cfg["spacing"], sitk.sitkLinear, -1024.0)
    # The anatomy map goes onto the resampled image grid through both images' physical
    # coordinates, so a mask stored on another grid or with flipped axes still lands right.
    anat_r = resample(read_image(anatomy_path), None, sitk.sitkNearestNeighbor, 0, reference=image_f)
    hu = to_xyz(image_f)
    amap = to_xyz(anat_r).astype(np.uint8)
    if not amap.any():
        raise CaseExcluded("no anatomy left on the resampled image grid (mask and image do not overlap)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scaled = scale_hu(hu, cfg["hu_window"]).astype(np.float16)
    if not np.isfinite(scaled).all():  # never reaches training storage (repair_nonfinite ran above)
        raise CaseExcluded("non-finite values after resampling and scaling")
    np.save(out / "image.npy", scaled)
    np.save(out / "anatomy.npy", amap)
    from scipy import ndimage

    counts = np.bincount(amap.ravel(), minlength=len(catalog.anatomies()) + 1)
    meta = {
        "case_id": case["case_id"],
        "source_path": str(case["image_path"]),
        "orientation": ORIENTATION,
        "original_size": grid["size"],
        "original_spacing": grid["spacing"],
        "spacing_source": spacing_source,
        "size": list(hu.shape),
        "spacing": list(image_f.GetSpacing()),
        "origin": list(image_f.GetOrigin()),
        "direction": list(image_f.GetDirection()),
        "hu_decision": decision,
        "hu_slope": slope,
        "hu_intercept": intercept,
        "hu_window": list(cfg["hu_window"]),
        "hu_stats": hu_stats,
        "warnings": warnings,
        "anatomy_voxels": {a.name: int(counts[a.index]) for a in catalog.anatomies() if counts[a.index]},
        # bounding boxes on the preprocessed grid (x0, x1, y0, y1, z0, z1 inclusive): evaluation crops
        "anatomy_bbox": {a.name: [v for sl in box for v in (sl.start, sl.stop - 1)]
                         for a, box in zip(catalog.anatomies(), ndimage.find_objects(amap, max_label=len(counts) - 1))
                         if box},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
