"""CT reading, grouping of TotalSegmentator classes into anatomies, resampling and intensity scaling.

Array convention after `preprocess_case`: volumes are oriented LPS (ITK's DICOM convention), and
stored as numpy arrays indexed (x, y, z).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import SimpleITK as sitk

from . import catalog

ORIENTATION = "LPS"


def read_image(path: str | Path) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder with SimpleITK."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ValueError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise ValueError(f"{path}: folder holds {len(series)} DICOM series; give one series per folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return sitk.ReadImage(str(path))


def to_xyz(image: sitk.Image) -> np.ndarray:
    """SimpleITK arrays are (z, y, x); ctvlp works in (x, y, z)."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def group_classes(class_map: sitk.Image, version: str = "v2") -> sitk.Image:
    """Map a TotalSegmentator multilabel image (class ids) to anatomy indices (0..36)."""
    lut = catalog.class_to_anatomy_lut(version)
    arr = sitk.GetArrayViewFromImage(class_map)
    if arr.size and (arr.min() < 0 or arr.max() >= len(lut)):
        raise ValueError(
            f"mask has label ids outside TotalSegmentator {version} (0..{len(lut) - 1}): "
            f"min {arr.min()}, max {arr.max()}; wrong class_version?"
        )
    out = sitk.GetImageFromArray(lut[arr.astype(np.int64)])
    out.CopyInformation(class_map)
    return out


def anatomy_table(anatomy: np.ndarray, spacing, case_id: str, min_voxels: int = 1) -> pl.DataFrame:
    """Per anatomy: voxel count, volume, bounding box (voxel indices, x/y/z) and completeness.

    An anatomy touching a border of the scan is marked incomplete (the scan cuts it off).
    """
    from scipy import ndimage  # imported here: it is slow to import and only this function needs it

    n_anat = len(catalog.anatomies())
    counts = np.bincount(anatomy.ravel(), minlength=n_anat + 1)
    boxes = ndimage.find_objects(anatomy, max_label=n_anat)  # one pass for all bounding boxes
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for a in catalog.anatomies():
        n = int(counts[a.index])
        box = boxes[a.index - 1]
        bbox = [v for sl in box for v in (sl.start, sl.stop - 1)] if box else [-1] * 6
        touches = bool(box) and any(sl.start == 0 or sl.stop == dim for sl, dim in zip(box, anatomy.shape))
        rows.append({"case_id": case_id, "anatomy": a.name, "index": a.index, "voxels": n,
                     "volume_ml": n * voxel_ml, "present": n >= min_voxels,
                     "complete": n >= min_voxels and not touches,
                     **dict(zip(["x0", "x1", "y0", "y1", "z0", "z1"], bbox))})
    return pl.DataFrame(rows)


def segment_case(case: dict, cfg: dict, out_map: str | Path, out_table: str | Path) -> pl.DataFrame:
    """Get the case's TotalSegmentator class map from the configured backend, group it into
    anatomies, and write the anatomy map (on the image grid) and its per-anatomy table."""
    from .segmentation import class_map

    classes, version = class_map(cfg["backend"], case, cfg)
    anat = group_classes(classes, version)
    sitk.WriteImage(anat, str(out_map), useCompression=True)
    table = anatomy_table(to_xyz(anat), classes.GetSpacing(), case["case_id"], cfg["min_voxels"])
    table.write_parquet(out_table)
    return table


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


def preprocess_case(case_id: str, image_path: str | Path, anatomy_path: str | Path, spacing, window,
                    out_image: str | Path, out_anatomy: str | Path, out_meta: str | Path) -> dict:
    """Orient, resample (image linear, anatomy map nearest onto the image grid), clip and scale HU.

    Writes the image as float16 in [0, 1] and the anatomy map as uint8, both (x, y, z) .npy files
    that training memory-maps, and a JSON record of what was done.
    """
    image = sitk.DICOMOrient(read_image(image_path), ORIENTATION)
    anat = read_image(anatomy_path)
    image_f = resample(sitk.Cast(image, sitk.sitkFloat32), spacing, sitk.sitkLinear, -1024.0)
    # The anatomy map goes onto the resampled image grid through both images' physical
    # coordinates, so a mask stored on another grid or with flipped axes still lands right.
    anat_r = resample(anat, None, sitk.sitkNearestNeighbor, 0, reference=image_f)
    hu = to_xyz(image_f)
    amap = to_xyz(anat_r).astype(np.uint8)
    np.save(out_image, scale_hu(hu, window).astype(np.float16))
    np.save(out_anatomy, amap)
    counts = np.bincount(amap.ravel(), minlength=len(catalog.anatomies()) + 1)
    meta = {
        "case_id": case_id,
        "orientation": ORIENTATION,
        "original_size": list(image.GetSize()),
        "original_spacing": list(image.GetSpacing()),
        "size": list(hu.shape),
        "spacing": list(image_f.GetSpacing()),
        "origin": list(image_f.GetOrigin()),
        "direction": list(image_f.GetDirection()),
        "hu_window": list(window),
        "hu_percentiles": dict(zip(["p1", "p50", "p99"], np.percentile(hu, [1, 50, 99]).round(1).tolist())),
        "anatomy_voxels": {a.name: int(counts[a.index]) for a in catalog.anatomies() if counts[a.index]},
    }
    Path(out_meta).write_text(json.dumps(meta, indent=1))
    return meta
