"""Reading CT images: files (NIfTI, NRRD, MHA) and DICOM series folders, headers without the
voxels, the manifest's spacing over the header's, and the checks on stored data that a reader would
hide (a truncated NIfTI, NaN/Inf voxels in a float NIfTI).

Array convention: SimpleITK arrays are (z, y, x); ctvlp's stored arrays are (x, y, z), oriented
``ORIENTATION`` (LPS, ITK's DICOM convention).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .exclusion import CaseExcluded

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
            raise CaseExcluded(f"unreadable DICOM series {path}: {first_line(e)}") from e
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseExcluded(f"unreadable image {path}: {first_line(e)}") from e


def header_info(path: str | Path) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """(spacing, size) of an image file or DICOM series folder, read from headers only.

    For a DICOM folder the slices are ordered as SimpleITK's series reader orders them; the slice
    spacing is the distance between the first and last slice positions over (n - 1), as ITK does.
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    if path.is_dir():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise ValueError("folder holds no DICOM series")
        if len(ids) > 1:
            raise ValueError(f"folder holds {len(ids)} DICOM series; give one series per folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        sx, sy = reader.GetSpacing()[:2]
        nx, ny = reader.GetSize()[:2]
        first = reader.GetOrigin()
        if len(files) > 1:
            reader.SetFileName(files[-1])
            reader.ReadImageInformation()
            last = reader.GetOrigin()
            sz = sum((a - b) ** 2 for a, b in zip(first, last)) ** 0.5 / (len(files) - 1)
        else:
            sz = reader.GetSpacing()[2] if reader.GetDimension() > 2 else 1.0
        return (float(sx), float(sy), float(sz)), (int(nx), int(ny), len(files))
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"image has {reader.GetDimension()} dimensions, expected 3")
    return tuple(float(s) for s in reader.GetSpacing()), tuple(int(n) for n in reader.GetSize())


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


def first_line(e: Exception) -> str:
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


def to_xyz(image: sitk.Image) -> np.ndarray:
    """SimpleITK arrays are (z, y, x); ctvlp works in (x, y, z)."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))
