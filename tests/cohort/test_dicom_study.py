"""A DICOM case may be a whole study folder: localizers, several reconstructions, a dose report
(secondary capture) and a structured report beside the CT series, in subfolders. Ingest picks the
series by ``imaging.io.choose_series``'s rule (or the table's series column), records it in the
manifest with the skipped series and why, and every later reader reads that series."""

import shutil
import struct
import time

import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

from ctvlp.cohort import generic
from ctvlp.config import validate
from ctvlp.imaging import io as imaging_io
from ctvlp.imaging.checks import check_image
from ctvlp.imaging.exclusion import CaseExcluded
from ctvlp.imaging.segment import segment_case

from conftest import TS

REAL = TS / "example_ct_dicom"
ROOT = "1.2.826.0.1.3680043.2.1125.7"
STUDY_UID, CT_UID, THICK_UID, LOC_UID, DOSE_UID, SR_UID = (f"{ROOT}.{i}" for i in range(6))
CT_IMAGE, SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"
SETTINGS = validate({"segment": {"backend": "phantom"}})


def _write_slices(slices, folder, uid, tags):
    """Write 2D/3D one-slice images as one DICOM file each, with ``tags`` and the series' uids."""
    folder.mkdir(parents=True)
    for k, img in enumerate(slices):
        img = sitk.Image(img)
        for key, v in {**tags, "0020|000e": uid, "0020|000d": STUDY_UID, "0020|0013": str(k + 1),
                       "0008|0018": f"{uid}.{k + 1}"}.items():
            img.SetMetaData(key, v)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"{k:03d}.dcm"))
        w.Execute(img)


def _real_slices():
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(REAL), "")
    return [sitk.ReadImage(f) for f in files]  # each with the scanner's tags, in slice order


def _sr_file(path, uid):
    """A DICOM file without pixel data (an X-ray radiation dose SR), written byte by byte:
    explicit VR little endian, the elements a PACS export carries."""
    def el(group, elem, vr, value: bytes):
        value += b"\0" if len(value) % 2 else b""
        if vr == "OB":
            return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value

    sop_class, sop = b"1.2.840.10008.5.1.4.1.1.88.67", f"{uid}.1".encode()
    meta = (el(2, 1, "OB", b"\0\1") + el(2, 2, "UI", sop_class) + el(2, 3, "UI", sop)
            + el(2, 0x10, "UI", b"1.2.840.10008.1.2.1"))  # explicit VR little endian
    data = (el(8, 0x16, "UI", sop_class) + el(8, 0x18, "UI", sop) + el(8, 0x60, "CS", b"SR")
            + el(0x20, 0xD, "UI", STUDY_UID.encode()) + el(0x20, 0xE, "UI", uid.encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + el(2, 0, "UL", struct.pack("<I", len(meta))) + meta + data)


def _localizer(folder, real):
    _write_slices(real[:2], folder, LOC_UID, {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER",
                                              "0008|0016": CT_IMAGE, "0008|103e": "Topogram 0.6 T20s"})


def _dose_report(folder):
    page = sitk.GetImageFromArray(np.full((1, 64, 64), 100, np.int16))
    _write_slices([page], folder, DOSE_UID, {"0008|0060": "OT", "0008|0008": "DERIVED\\SECONDARY\\OTHER",
                                             "0008|0016": SECONDARY_CAPTURE, "0008|103e": "Patient Protocol"})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """study/: the real series (rewritten with a SeriesInstanceUID, HU and geometry as read), a
    10-slice thick reconstruction of it, a 2-slice localizer, a secondary-capture dose report and a
    dose SR without pixel data, each in its own subfolder as PACS exports lay them out."""
    if not REAL.is_dir():
        pytest.skip(f"shared real DICOM series not found at {REAL} (../shared sits beside the repo in CI)")
    root = tmp_path_factory.mktemp("dicom_study") / "study"
    real = _real_slices()
    ct_tags = {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0008|0016": CT_IMAGE}
    _write_slices(real, root / "s001_ct_body_2mm", CT_UID, {**ct_tags, "0008|103e": "CT Body 3.0"})
    _write_slices(real[::2], root / "s002_ct_body_4mm", THICK_UID, {**ct_tags, "0008|103e": "CT Body 5.0"})
    _localizer(root / "s000_topogram", real)
    _dose_report(root / "s501_dose")
    _sr_file(root / "s502_sr" / "dose_sr.dcm", SR_UID)
    return root


def _ingest(tmp_path, rows, **kw):
    table = tmp_path / "cases.csv"
    pl.DataFrame(rows).write_csv(table)
    return generic.ingest(table, split_fractions=(1.0, 0.0, 0.0), **kw)


def test_study_folder_ingest_picks_the_ct_series_and_notes_the_rest(study, tmp_path):
    t0 = time.perf_counter()
    man, _, exc = _ingest(tmp_path, [{"case_id": "s1", "image": str(study), "report": "Liver normal."}],
                          min_slices=10)
    assert exc.is_empty(), exc.to_dicts()
    row = man.row(0, named=True)
    assert row["series_uid"] == CT_UID
    assert (row["shape_x"], row["shape_y"], row["shape_z"]) == (512, 512, 20)
    original = imaging_io.read_image(REAL)
    assert np.allclose([row["spacing_x"], row["spacing_y"], row["spacing_z"]], original.GetSpacing(), atol=1e-4)
    note = row["ingest_note"]
    assert note.startswith(f"chose series {CT_UID} (CT, 20 slices")
    assert f"skipped {THICK_UID}: fewer slices than the chosen series (10 < 20)" in note
    assert f"skipped {LOC_UID}: localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER, 2 slice(s))" in note
    assert f"skipped {DOSE_UID}: modality OT, not CT" in note
    assert "s502_sr/dose_sr.dcm (modality SR)" in note  # a DICOM file that is no image series
    assert time.perf_counter() - t0 < 20


def test_series_column_names_the_series_and_an_unknown_uid_is_excluded(study, tmp_path):
    rows = [{"case_id": "thick", "image": str(study), "report": "r", "series": THICK_UID},
            {"case_id": "rule", "image": str(study), "report": "r", "series": ""},
            {"case_id": "unknown", "image": str(study), "report": "r", "series": "1.2.3.999"}]
    man, _, exc = _ingest(tmp_path, rows, series_col="series", min_slices=10)
    got = {r["case_id"]: r for r in man.iter_rows(named=True)}
    assert set(got) == {"thick", "rule"}
    assert got["thick"]["series_uid"] == THICK_UID and got["thick"]["shape_z"] == 10
    assert "as the table names it" in got["thick"]["ingest_note"]
    assert got["rule"]["series_uid"] == CT_UID and got["rule"]["shape_z"] == 20
    (reason,) = exc.filter(pl.col("case_id") == "unknown")["reason"].to_list()
    assert "no DICOM series 1.2.3.999" in reason and CT_UID in reason and LOC_UID in reason
    with pytest.raises(ValueError, match="series_col"):
        _ingest(tmp_path, rows, series_col="no_such_column")


def test_every_reader_reads_the_chosen_series(study, tmp_path):
    mask = str(TS / "example_seg_dicom.nii.gz")  # the real series' segmentation (31 classes)
    rows = [{"case_id": c, "image": str(study), "report": "r", "series": s, "mask": mask}
            for c, s in (("rule", ""), ("thick", THICK_UID))]
    man, _, exc = _ingest(tmp_path, rows, series_col="series", mask_col="mask", min_slices=10)
    assert exc.is_empty(), exc.to_dicts()
    cases = {r["case_id"]: r for r in man.iter_rows(named=True)}
    original = imaging_io.read_image(REAL)
    image, source = imaging_io.read_case_image(cases["rule"])
    assert image.GetSize() == (512, 512, 20) and source == "header"
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        assert np.allclose(get(image), get(original), atol=1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))  # the real HU
    assert imaging_io.read_case_image(cases["thick"])[0].GetSize() == (512, 512, 10)  # the manifest's series
    assert check_image(study, SETTINGS["preprocess"], series_uid=THICK_UID)["size"] == [512, 512, 10]
    with pytest.raises(CaseExcluded, match="too few slices"):
        check_image(study, SETTINGS["preprocess"], series_uid=LOC_UID)
    cfg = {**SETTINGS["segment"], "preprocess": SETTINGS["preprocess"]}
    table = segment_case(cases["rule"], cfg, tmp_path / "seg")
    anat = sitk.ReadImage(str(tmp_path / "seg" / "anatomy.nii.gz"))
    assert anat.GetSize() == (512, 512, 20) and np.allclose(anat.GetOrigin(), original.GetOrigin(), atol=1e-4)
    assert table.filter(pl.col("anatomy") == "liver")["present"].item()


def test_study_without_a_usable_series_is_excluded_with_every_reason(study, tmp_path):
    real = _real_slices()[:2]
    folder = tmp_path / "scout_and_dose"
    _localizer(folder / "a", real)
    _dose_report(folder / "b")
    _, _, exc = _ingest(tmp_path, [{"case_id": "none", "image": str(folder), "report": "r"}], min_slices=10)
    (reason,) = exc["reason"].to_list()
    assert f"{LOC_UID}: localizer" in reason and f"{DOSE_UID}: modality OT, not CT" in reason, reason
    assert exc["stage"].to_list() == ["ingest"]
    with pytest.raises(CaseExcluded, match="no usable CT series"):
        imaging_io.read_image(folder)


def test_anonymised_series_without_uid_in_a_flat_study_folder(study, tmp_path):
    """Anonymised exports blank the SeriesInstanceUID (the shared series does): the series is
    still chosen, recorded as null, and every reader finds it again by the same rule."""
    folder = tmp_path / "flat"
    shutil.copytree(REAL, folder)  # the real files byte for byte
    for p in (study / "s000_topogram").iterdir():
        shutil.copy(p, folder / f"loc_{p.name}")
    choice = imaging_io.choose_series(folder, min_slices=10)
    assert choice.uid is None and len(choice.files) == 20
    assert choice.note.startswith("chose series (series without SeriesInstanceUID in .) (CT, 20 slices")
    assert f"skipped {LOC_UID}: localizer" in choice.note
    image = imaging_io.read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    assert imaging_io.header_info(folder) == imaging_io.header_info(REAL)
