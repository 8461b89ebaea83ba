"""Reading CT images: files (NIfTI, NRRD, MHA) and DICOM series folders, headers without the
voxels, the manifest's spacing over the header's, and the checks on stored data that a reader would
hide (a truncated NIfTI, NaN/Inf voxels in a float NIfTI).

Array convention: SimpleITK arrays are (z, y, x); ctvlp's stored arrays are (x, y, z), oriented
``ORIENTATION`` (LPS, ITK's DICOM convention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .exclusion import CaseExcluded

ORIENTATION = "LPS"


def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM folder with SimpleITK.

    A DICOM folder may be a whole study (subfolders searched): ``series_uid`` names the series to
    read (the manifest's ``series_uid``); without it ``choose_series`` picks one by its rule (the
    rule ingest applied, so both agree). A file SimpleITK cannot read (truncated, corrupt, not an
    image), a folder without a usable series or a ``series_uid`` it does not hold raise ``CaseExcluded``.
    """
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(series_files(path, series_uid))
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


def header_info(path: str | Path, series_uid: str | None = None
                ) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """(spacing, size) of an image file or DICOM folder, read from headers only; a DICOM folder's
    series as ``read_image(path, series_uid)`` reads it."""
    path = Path(path)
    if path.is_dir():
        return series_header_info(series_files(path, series_uid))
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"image has {reader.GetDimension()} dimensions, expected 3")
    return tuple(float(s) for s in reader.GetSpacing()), tuple(int(n) for n in reader.GetSize())


def series_header_info(files) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """(spacing, size) of a DICOM series from the headers of its files in the series reader's order:
    the slice spacing is the distance between the first and last slice positions over (n - 1), as ITK does."""
    reader = sitk.ImageFileReader()
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
        nz = len(files)
    else:
        sz = reader.GetSpacing()[2] if reader.GetDimension() > 2 else 1.0
        nz = reader.GetSize()[2] if reader.GetDimension() > 2 else 1
    return (float(sx), float(sy), float(sz)), (int(nx), int(ny), int(nz))


# ---- DICOM studies: which series of a folder is the case's image -------------------------------

CT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage (.1: enhanced, .2: legacy converted)
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants (.7.1 ...)


@dataclass(frozen=True)
class DicomSeries:
    """One image series of a DICOM folder, as GDCM groups the files (by SeriesInstanceUID)."""

    uid: str  # "" when the files carry no SeriesInstanceUID (anonymised exports)
    files: tuple[str, ...]  # in the series reader's slice order
    folder: str  # where its first file lies, relative to the searched folder ("." for the folder itself)
    modality: str = ""
    image_type: str = ""
    sop_class: str = ""
    description: str = ""
    slices: int = 0
    error: str | None = None  # its header could not be read

    @property
    def name(self) -> str:
        return self.uid or f"(series without SeriesInstanceUID in {self.folder})"

    def summary(self) -> str:
        what = [self.modality or "no modality", f"{self.slices} slice{'s' if self.slices != 1 else ''}"]
        if self.description:
            what.append(repr(self.description))
        return ", ".join(what)


@dataclass(frozen=True)
class SeriesChoice:
    """The series ``choose_series`` picked, and the note on what it skipped (None when the folder
    held just that series)."""

    series: DicomSeries
    note: str | None

    @property
    def uid(self) -> str | None:
        return self.series.uid or None

    @property
    def files(self) -> list[str]:
        return list(self.series.files)


def _meta(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _describe(root: Path, uid: str, files) -> DicomSeries:
    folder = os.path.relpath(os.path.dirname(files[0]), root)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return DicomSeries(uid, tuple(files), folder, slices=len(files), error=first_line(e))
    slices = len(files) if len(files) > 1 else (reader.GetSize()[2] if reader.GetDimension() > 2 else 1)
    return DicomSeries(uid, tuple(files), folder, modality=_meta(reader, "0008|0060").upper(),
                       image_type=_meta(reader, "0008|0008").upper(), sop_class=_meta(reader, "0008|0016"),
                       description=_meta(reader, "0008|103e"), slices=int(slices))


def _dicom_modality_of_file(path: Path) -> str | None:
    """Modality of a DICOM file that holds no image (GDCM lists no series for it: a structured or
    dose report, a DICOMDIR): "DICOM" with its Modality when it is cheaply found, None when the
    file is not DICOM. Reads the first 64 KiB only; explicit and implicit VR little endian."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    at = head.find(b"\x08\x00\x60\x00", 132)  # (0008,0060) Modality
    if at >= 0:
        if head[at + 4:at + 6] == b"CS":
            n, start = int.from_bytes(head[at + 6:at + 8], "little"), at + 8
        else:
            n, start = int.from_bytes(head[at + 4:at + 8], "little"), at + 8
        value = head[start:start + n].decode("ascii", "replace").strip(" \0") if n <= 16 else ""
        if value:
            return value
    return ""


def dicom_series(folder: str | Path) -> tuple[list[DicomSeries], list[str]]:
    """Every image series in ``folder`` and its subfolders (GDCM's grouping by SeriesInstanceUID;
    a series spread over several subfolders is one series), and the DICOM files that belong to no
    image series (files without pixel data, such as structured or dose reports: GDCM lists none)
    as "relative/path (modality SR)" notes."""
    root = Path(folder)
    found: dict[str, list] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if not filenames:  # (GDCM warns on every folder without a series)
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath):
            found.setdefault(uid, []).append(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, uid))
    series = []
    for uid, parts in found.items():
        files = parts[0] if len(parts) == 1 else sitk.ImageSeriesReader.GetGDCMSeriesFileNames(
            str(root), uid, False, True)  # one series in several subfolders: GDCM orders all its slices
        if files:
            series.append(_describe(root, uid, files))
    in_series = {os.path.realpath(f) for s in series for f in s.files}
    others = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and os.path.realpath(p) not in in_series:
            mod = _dicom_modality_of_file(p)
            if mod is not None:
                others.append(f"{p.relative_to(root).as_posix()} ({f'modality {mod}' if mod else 'no Modality'})")
    return series, others


def series_problem(series: DicomSeries, min_slices: int | None = None) -> str | None:
    """Why ``series`` is not the case's CT image, or None: an unreadable header, a modality other
    than CT (SR, OT, PT, MR, ...), a secondary capture (a dose report or screenshot, even when
    labelled CT), a localizer/scout (ImageType LOCALIZER), fewer than ``min_slices`` slices."""
    if series.error:
        return f"unreadable header ({series.error})"
    if series.modality and series.modality != "CT":
        return f"modality {series.modality}, not CT"
    if series.sop_class.startswith(SECONDARY_CAPTURE_SOP_CLASS):
        return f"secondary capture (SOP class {series.sop_class}), not a CT image"
    if "LOCALIZER" in series.image_type.split("\\"):
        return f"localizer (ImageType {series.image_type}, {series.slices} slice(s))"
    if min_slices and series.slices < min_slices:
        return f"{series.slices} slice(s) < preprocess.min_slices {min_slices}"
    return None


def choose_series(folder: str | Path, series_uid: str | None = None, min_slices: int | None = None) -> SeriesChoice:
    """The series of a DICOM folder (a study export, subfolders searched) that is the case's image.

    The rule: ``series_uid`` (the table's series column) when given: that series, which must be in
    the folder. Else a folder holding a single image series is that series (the per-case checks
    judge it later, like any image). Else the series must be CT (Modality CT, not a secondary
    capture, ImageType without LOCALIZER) with at least ``min_slices`` slices (preprocess.min_slices;
    None: no minimum), and of those the one with the most slices is chosen (a tie goes to the
    lowest SeriesInstanceUID). The choice's note names the chosen series, every series not chosen
    with its reason, and the DICOM files outside any image series (e.g. dose or structured
    reports). No usable series (or a ``series_uid`` the folder does not hold) raises
    ``CaseExcluded`` with every series' reason.
    """
    folder = Path(folder)
    series, others = dicom_series(folder)
    outside = (f"{len(others)} DICOM file(s) outside any image series (no image data): {', '.join(others[:5])}"
               f"{', ...' if len(others) > 5 else ''}") if others else None
    if not series:
        raise CaseExcluded("; ".join(filter(None, [f"{folder}: folder holds no DICOM image series", outside])))
    series.sort(key=lambda s: (-s.slices, s.uid))
    if series_uid:
        named = [s for s in series if s.uid == series_uid]
        if not named:
            held = "; ".join(f"{s.name} ({s.summary()})" for s in series)
            raise CaseExcluded(f"{folder}: no DICOM series {series_uid} (the table's series_uid); "
                               f"the folder holds: {held}")
        chosen, how = named[0], " as the table names it"
        skipped = [(s, "not the series the table names") for s in series if s is not chosen]
    elif len(series) == 1:
        chosen, how, skipped = series[0], "", []
    else:
        problems = [(s, series_problem(s, min_slices)) for s in series]
        usable = [s for s, why in problems if why is None]
        if not usable:
            reasons = "; ".join(f"{s.name}: {why}" for s, why in problems)
            raise CaseExcluded("; ".join(filter(None, [f"{folder}: no usable CT series among {len(series)} ({reasons})",
                                                       outside])))
        chosen, how = usable[0], ""
        skipped = [(s, why or (f"fewer slices than the chosen series ({s.slices} < {chosen.slices})"
                               if s.slices < chosen.slices else "as many slices as the chosen series; "
                               "the lower SeriesInstanceUID was chosen")) for s, why in problems if s is not chosen]
    if not skipped and not outside:
        return SeriesChoice(chosen, None)
    parts = [f"chose series {chosen.name} ({chosen.summary()}){how}"]
    parts += [f"skipped {s.name}: {why}" for s, why in skipped]
    return SeriesChoice(chosen, "; ".join(filter(None, parts + [outside])))


def series_files(folder: str | Path, series_uid: str | None = None) -> list[str]:
    """The files of the case's series in a DICOM folder, in slice order: ``series_uid``'s (looked for
    in subfolders too), else the one ``choose_series`` picks. Raises ``CaseExcluded``."""
    folder = Path(folder)
    if series_uid:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid, False, True))
        if not files:
            raise CaseExcluded(f"{folder}: no DICOM series {series_uid} (the manifest's series_uid)")
        return files
    return choose_series(folder).files


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
    says where the spacing came from (recorded in the QC table). A DICOM folder's series is the
    manifest's ``series_uid`` (else ``choose_series``'s rule)."""
    image = read_image(case["image_path"], case.get("series_uid"))
    fixed = manifest_spacing(case, image.GetSpacing())
    if fixed is None:
        return image, "header"
    header = [round(v, 4) for v in image.GetSpacing()]
    image.SetSpacing(fixed)
    return image, f"manifest (header said {header})"


def first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def modality(path: str | Path, series_uid: str | None = None) -> str | None:
    """DICOM Modality (0008,0060) of a DICOM folder's series (``series_files``) from its first
    file; None for other formats. Raises ``CaseExcluded`` for a folder without a usable series."""
    path = Path(path)
    if not path.is_dir():
        return None
    first = sitk.ImageFileReader()
    first.SetFileName(series_files(path, series_uid)[0])
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
