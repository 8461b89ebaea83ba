"""The segment stage: a case's TotalSegmentator classes (from the configured backend) grouped into
the 36 anatomies on the image grid, with a table of each anatomy's size, box and completeness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import SimpleITK as sitk

from .. import catalog
from .checks import check_image
from .exclusion import CaseExcluded
from .io import read_image, to_xyz
from .segmentation import class_map


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
    from scipy import (
        ndimage,  # imported here: it is slow to import and only this function needs it
    )

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


def segment_case(case: dict, cfg: dict, out_dir: str | Path) -> pl.DataFrame:
    """Get the case's TotalSegmentator class map from the configured backend, group it into
    anatomies, and write ``out_dir``/anatomy.nii.gz (on the image grid) and anatomies.parquet.

    cfg: the segment section plus the preprocess section under "preprocess" (image checks).
    Data problems (bad image, missing or mismatched mask, label ids outside the class set)
    raise ``CaseExcluded``.
    """
    # headers first (declared size, spacing); a DICOM series is then read once for checks and grid
    check_image(case["image_path"], cfg["preprocess"], verify_data=True, series_uid=case.get("series_uid"))
    series = read_image(case["image_path"], case.get("series_uid")) if Path(case["image_path"]).is_dir() else None
    try:
        classes, version = class_map(cfg["backend"], case, cfg, image=series)
        anat = group_classes(classes, version)
    except (ValueError, FileNotFoundError) as e:
        raise CaseExcluded(str(e)) from e
    table = anatomy_table(to_xyz(anat), classes.GetSpacing(), case["case_id"], cfg["min_voxels"])
    if not table["present"].any():
        raise CaseExcluded(f"no anatomy of at least {cfg['min_voxels']} voxels in the segmentation")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(anat, str(out / "anatomy.nii.gz"), useCompression=True)
    table.write_parquet(out / "anatomies.parquet")
    return table
