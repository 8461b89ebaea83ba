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

from . import catalog, qc
from .qc import CaseExcluded

ORIENTATION = "LPS"


def read_image(path: str | Path) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder with SimpleITK.

    A file SimpleITK cannot read (truncated, corrupt, not an image) raises ``CaseExcluded``.
    """
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise CaseExcluded(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise CaseExcluded(f"{path}: folder holds {len(series)} DICOM series; give one series per folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        try:
            return reader.Execute()
        except RuntimeError as e:
            raise CaseExcluded(f"unreadable DICOM series {path}: {_first_line(e)}") from e
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseExcluded(f"unreadable image {path}: {_first_line(e)}") from e


def manifest_spacing(case: dict, header_spacing) -> list[float] | None:
    """The manifest's spacing when it differs from the image header's, else None.

    The manifest is authoritative: CT-RATE's NIfTI headers do not hold the true spacing, its
    metadata CSV does (ingest puts it in the manifest); for other sources both agree.
    """
    vals = [case.get(f"spacing_{a}") for a in "xyz"]
    if len(header_spacing) != 3 or any(v is None for v in vals) or np.allclose(vals, header_spacing, rtol=1e-3, atol=1e-4):
        return None
    return [float(v) for v in vals]


def read_case_image(case: dict) -> tuple[sitk.Image, str]:
    """The case's image with the manifest's spacing applied where the header disagrees; also
    says where the spacing came from (recorded in the QC table)."""
    image = read_image(case["image_path"])
    fixed = manifest_spacing(case, image.GetSpacing())
    if fixed is None:
        return image, "header"
    header = [round(v, 4) for v in image.GetSpacing()]
    image.SetSpacing(fixed)
    return image, f"manifest (header said {header})"


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def modality(path: str | Path) -> str | None:
    """DICOM Modality (0008,0060) of a series folder's first file; None for other formats."""
    path = Path(path)
    if not path.is_dir():
        return None
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        return None
    first = sitk.ImageFileReader()
    first.SetFileName(reader.GetGDCMSeriesFileNames(str(path), series[0])[0])
    first.ReadImageInformation()
    return first.GetMetaData("0008|0060").strip() if first.HasMetaDataKey("0008|0060") else None


def verify_nifti_data(path: Path) -> None:
    """A truncated .nii/.nii.gz must not pass: ITK reads one without error and fills the missing
    voxels with 0. Checks the stored length against the header (streams .gz once, checking CRC)."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable header is an exclusion
        raise CaseExcluded(f"unreadable NIfTI header {path}: {e}") from e
    expected = int(img.dataobj.offset) + int(np.prod(img.shape)) * int(img.header["bitpix"]) // 8
    if path.name.endswith(".gz"):
        length = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    length += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise CaseExcluded(f"corrupt or truncated file {path}: {e}") from e
    else:
        length = path.stat().st_size
    if length < expected:
        raise CaseExcluded(f"truncated file {path}: {length} bytes of data, header needs {expected}")


def nifti_nonfinite(path) -> tuple[np.ndarray, np.ndarray] | None:
    """NaN/Inf voxels of a float NIfTI file as ``(mask, values)`` in SimpleITK's (z, y, x) array
    order, or None. ITK's NIfTI reader silently turns them into 0 (0 HU, soft tissue), so they are
    found here, on the stored data, before that read can hide them."""
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return None
    img = nib.load(str(path))
    if np.dtype(img.get_data_dtype()).kind != "f":
        return None
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3 or np.isfinite(data).all():
        return None
    mask = ~np.isfinite(data)
    return mask.transpose(2, 1, 0), data[mask]  # file index (i, j, k) is ITK's array index [k, j, i]


def _without_nonfinite(image: sitk.Image, path, max_fraction: float) -> tuple[sitk.Image, str | None]:
    """``image`` (float32, as read from ``path``) with NaN/Inf voxels repaired by
    ``qc.repair_nonfinite``: set to air with a warning, or the case excluded when there are many."""
    hidden = nifti_nonfinite(path)
    if hidden is None and np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        return image, None
    values = sitk.GetArrayFromImage(image)
    if hidden is not None:
        values[hidden[0]] = hidden[1]  # put back what the reader zeroed, then count and repair
    warning = qc.repair_nonfinite(values, max_fraction)
    repaired = sitk.GetImageFromArray(values)
    repaired.CopyInformation(image)
    return repaired, warning


def check_image(path: str | Path, cfg: dict, verify_data: bool = False, image: sitk.Image | None = None) -> dict:
    """Header-level checks shared by segment and preprocess: readable, CT, 3D, enough slices,
    plausible spacing; with ``verify_data`` also that a NIfTI file is complete. ``image``: the
    already read image (a DICOM series is then not read a second time). Raises ``CaseExcluded``;
    returns the grid (size, spacing)."""
    path = Path(path)
    if verify_data and path.name.endswith((".nii", ".nii.gz")):
        verify_nifti_data(path)
    mod = modality(path)
    if mod and mod != "CT":
        raise CaseExcluded(f"DICOM modality {mod}, not CT")
    if image is None and path.is_dir():  # the series' declared size, before reading its voxels
        from .ingest import header_info

        try:
            spacing, size = header_info(path)
        except (ValueError, RuntimeError) as e:
            raise CaseExcluded(f"unreadable DICOM series {path}: {_first_line(e)}") from e
        qc.check_geometry(size, spacing, 3, cfg["min_slices"], cfg["spacing_range"], cfg["max_voxels"])
    if image is not None or path.is_dir():
        img = image if image is not None else read_image(path)
        size, spacing, dim = img.GetSize(), img.GetSpacing(), img.GetDimension()
    else:
        if not path.is_file():
            raise CaseExcluded(f"image not found: {path}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise CaseExcluded(f"unreadable image {path}: {_first_line(e)}") from e
        size, spacing, dim = reader.GetSize(), reader.GetSpacing(), reader.GetDimension()
        if reader.GetNumberOfComponents() != 1:
            raise CaseExcluded(f"{reader.GetNumberOfComponents()} components per voxel; a CT has one")
    qc.check_geometry(size, spacing, dim, cfg["min_slices"], cfg["spacing_range"], cfg["max_voxels"])
    return {"size": list(size), "spacing": list(spacing)}


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


def segment_case(case: dict, cfg: dict, out_dir: str | Path) -> pl.DataFrame:
    """Get the case's TotalSegmentator class map from the configured backend, group it into
    anatomies, and write ``out_dir``/anatomy.nii.gz (on the image grid) and anatomies.parquet.

    cfg: the segment section plus the preprocess section under "preprocess" (image checks).
    Data problems (bad image, missing or mismatched mask, label ids outside the class set)
    raise ``CaseExcluded``.
    """
    from .segmentation import class_map

    # headers first (declared size, spacing); a DICOM series is then read once for checks and grid
    check_image(case["image_path"], cfg["preprocess"], verify_data=True)
    series = read_image(case["image_path"]) if Path(case["image_path"]).is_dir() else None
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
    check_image(case["image_path"], cfg)  # the declared size before anything is read or allocated
    image, spacing_source = read_case_image(case)
    grid = check_image(case["image_path"], cfg, image=image)
    target = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), cfg["spacing"])]
    if np.prod(target, dtype=np.float64) > cfg["max_voxels"]:
        raise CaseExcluded(f"resampled to {cfg['spacing']} mm the volume would be {target} voxels, more than "
                           f"preprocess.max_voxels ({cfg['max_voxels']:.3g}); coarser preprocess.spacing?")
    image_f, warning = sitk.Cast(image, sitk.sitkFloat32), None
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):  # NaN/Inf: only float files have them
        image_f, warning = _without_nonfinite(image_f, case["image_path"], cfg["max_nonfinite_fraction"])
    warnings = [warning] if warning else []
    image_f = sitk.DICOMOrient(image_f, ORIENTATION)
    slope, intercept, decision = qc.hu_conversion(qc.sample(sitk.GetArrayViewFromImage(image_f)), case.get("rescale_slope"),
                                                  case.get("rescale_intercept"), cfg["hu"])
    if (slope, intercept) != (1.0, 0.0):
        image_f = image_f * slope + intercept
    hu_stats, hu_warnings = qc.check_hu(qc.sample(sitk.GetArrayViewFromImage(image_f)))
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
