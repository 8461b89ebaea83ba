"""Class maps on the image grid from the phantom, precomputed and totalsegmentator backends.

Real TotalSegmentator reference CTs and segmentations from ../shared; the totalsegmentator backend
is exercised for real (no mock) on its missing-weights path, which is all that runs offline.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctvlp import catalog
from ctvlp.imaging import io as imaging_io
from ctvlp.imaging import segment, segmentation


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
            and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection())


def _median_hu(image: sitk.Image, cmap: sitk.Image, version: str, anatomy: str) -> float:
    anat = sitk.GetArrayFromImage(segment.group_classes(cmap, version))
    hu = sitk.GetArrayFromImage(image)
    sel = anat == catalog.anatomy_by_name(anatomy).index
    assert sel.sum() > 100, anatomy
    return float(np.median(hu[sel]))


def _write_class_folder(multilabel: Path, folder: Path, names, version="v2") -> None:
    """TotalSegmentator's non-multilabel output: one binary mask per class, same header."""
    ml = sitk.ReadImage(str(multilabel))
    arr = sitk.GetArrayFromImage(ml)
    folder.mkdir(parents=True)
    for name in names:
        b = sitk.GetImageFromArray((arr == catalog.class_id(name, version)).astype(np.uint8))
        b.CopyInformation(ml)
        sitk.WriteImage(b, str(folder / f"{name}.nii.gz"))


def test_phantom_returns_mask_with_configured_version(ts):
    case = {"case_id": "c", "image_path": str(ts / "example_ct_sm.nii.gz"),
            "mask_path": str(ts / "example_seg.nii.gz")}
    cmap, version = segmentation.class_map("phantom", case, {"class_version": "v2"})
    assert version == "v2"
    img = imaging_io.read_image(case["image_path"])
    assert _same_grid(cmap, img)
    assert np.array_equal(sitk.GetArrayFromImage(cmap),
                          sitk.GetArrayFromImage(sitk.ReadImage(case["mask_path"])))
    with pytest.raises(ValueError, match="no mask_path"):
        segmentation.class_map("phantom", {**case, "mask_path": None}, {})
    with pytest.raises(ValueError, match="unknown segment backend"):
        segmentation.class_map("nnunet", case, {})


def test_precomputed_multilabel_nifti(ts, tmp_path):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "abd.nii.gz").symlink_to(ts / "example_seg.nii.gz")
    case = {"case_id": "abd", "image_path": str(ts / "example_ct_sm.nii.gz")}
    cmap, version = segmentation.class_map("precomputed", case, {"path": str(tmp_path / "seg")})
    img = imaging_io.read_image(case["image_path"])
    assert version == "v2" and _same_grid(cmap, img)
    assert np.array_equal(sitk.GetArrayFromImage(cmap),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg.nii.gz"))))
    assert 30 < _median_hu(img, cmap, version, "liver") < 80

    with pytest.raises(FileNotFoundError) as err:
        segmentation.class_map("precomputed", {**case, "case_id": "nobody"}, {"path": str(tmp_path / "seg")})
    assert str(tmp_path / "seg" / "nobody.nii.gz") in str(err.value)
    assert str(tmp_path / "seg" / "nobody") + "/<class>.nii.gz" in str(err.value)


def test_precomputed_dicom_with_flipped_mask_lands_on_organs(ts, tmp_path):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "dcm.nii.gz").symlink_to(ts / "example_seg_dicom.nii.gz")
    case = {"case_id": "dcm", "image_path": str(ts / "example_ct_dicom")}
    cmap, version = segmentation.class_map("precomputed", case, {"path": str(tmp_path / "seg")})
    img = imaging_io.read_image(case["image_path"])
    assert _same_grid(cmap, img)
    assert 60 < _median_hu(img, cmap, version, "liver") < 200  # contrast-enhanced liver
    assert _median_hu(img, cmap, version, "spleen") > 40
    # the stored mask's array on the image's array lands the spleen in fat/air (about -86 HU)
    assert _median_hu(img, sitk.ReadImage(str(ts / "example_seg_dicom.nii.gz")), version, "spleen") < 0


def test_precomputed_class_folder_matches_multilabel(ts, tmp_path):
    names = ["spleen", "liver", "stomach", "aorta", "vertebrae_T12"]
    _write_class_folder(ts / "example_seg_dicom.nii.gz", tmp_path / "seg" / "dcm", names)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "dcm.nii.gz").symlink_to(ts / "example_seg_dicom.nii.gz")
    case = {"case_id": "dcm", "image_path": str(ts / "example_ct_dicom")}
    folder, v_folder = segmentation.class_map("precomputed", case, {"path": str(tmp_path / "seg")})
    ml, _ = segmentation.class_map("precomputed", case, {"path": str(tmp_path / "ml")})
    assert v_folder == "v2" and _same_grid(folder, ml)
    ids = [catalog.class_id(n) for n in names]
    ml_arr = sitk.GetArrayFromImage(ml)
    expected = np.where(np.isin(ml_arr, ids), ml_arr, 0)
    assert np.array_equal(sitk.GetArrayFromImage(folder), expected)
    assert set(np.unique(expected)) == {0, *ids}


def test_class_folder_version_detection(ts, tmp_path):
    # v1-only class names (heart chambers, face) decide v1; ids follow the v1 numbering
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    folder = tmp_path / "v1" / "abd"
    folder.mkdir(parents=True)
    for name, src in (("liver", "liver"), ("heart_myocardium", "spleen")):
        b = sitk.GetImageFromArray((arr == catalog.class_id(src, "v2")).astype(np.uint8))
        b.CopyInformation(seg)
        sitk.WriteImage(b, str(folder / f"{name}.nii.gz"))
    case = {"case_id": "abd", "image_path": str(ts / "example_ct_sm.nii.gz")}
    cmap, version = segmentation.class_map("precomputed", case, {"path": str(tmp_path / "v1")})
    assert version == "v1"
    out = sitk.GetArrayFromImage(cmap)
    assert set(np.unique(out)) == {0, catalog.class_id("liver", "v1"), catalog.class_id("heart_myocardium", "v1")}
    anat = sitk.GetArrayFromImage(segment.group_classes(cmap, version))
    assert (anat == catalog.anatomy_by_name("heart").index).sum() == (arr == catalog.class_id("spleen")).sum()

    assert segmentation.detect_version(["liver", "spleen"]) == "v2"
    assert segmentation.detect_version(["liver", "spleen"], prefer="v1") == "v1"
    assert segmentation.detect_version(["liver", "superior_vena_cava"], prefer="v1") == "v2"
    with pytest.raises(ValueError, match="fit neither"):
        segmentation.detect_version(["liver", "face", "superior_vena_cava"])
    (folder / "tumour.nii.gz").write_bytes((folder / "liver.nii.gz").read_bytes())
    with pytest.raises(ValueError, match="tumour"):
        segmentation.class_map("precomputed", case, {"path": str(tmp_path / "v1")})


def test_roi_subset_and_required_weights():
    assert segmentation.roi_subset(None) is None
    assert segmentation.roi_subset(catalog.anatomy_names()) is None
    assert segmentation.roi_subset(["liver", "spleen"]) == ["spleen", "liver"]  # by class id
    subset = segmentation.roi_subset(["kidney", "lung"])
    assert {"kidney_left", "kidney_cyst_right", "lung_upper_lobe_left"} <= set(subset)
    assert set(subset) <= set(catalog.totalseg_classes("v2").values())
    assert segmentation.required_datasets(True, None) == ["Dataset297_TotalSegmentator_total_3mm_1559subj"]
    full = segmentation.required_datasets(False, ["liver"])
    assert len(full) == 6 and full[-1] == "Dataset298_TotalSegmentator_total_6mm_1559subj"


def test_missing_weights_detection(tmp_path):
    d = "Dataset297_TotalSegmentator_total_3mm_1559subj"
    assert segmentation.missing_weights(tmp_path, [d]) == [d]
    fold = tmp_path / d / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    assert segmentation.missing_weights(tmp_path, [d]) == [d]  # an empty (interrupted) unpack
    (fold / "checkpoint_final.pth").touch()
    assert segmentation.missing_weights(tmp_path, [d]) == []


@pytest.fixture
def empty_totalseg_home(tmp_path, monkeypatch):
    home = tmp_path / "totalseg_home"
    home.mkdir()
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    return home


def test_totalsegmentator_missing_weights_fails_up_front(ts, empty_totalseg_home, tmp_path):
    case = {"case_id": "abd", "image_path": str(ts / "example_ct_sm.nii.gz")}
    with pytest.raises(segmentation.WeightsMissingError) as err:
        segmentation.class_map("totalsegmentator", case, {"fast": True, "device": "cpu"})
    msg = str(err.value)
    assert str(empty_totalseg_home / "nnunet" / "results") in msg
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in msg
    for hint in ("totalseg_download_weights -t total_fast", "totalseg_import_weights -i <zip>",
                 "TOTALSEG_HOME_DIR", "segment.weights_dir", "segment.download: true",
                 "segment.backend: precomputed"):
        assert hint in msg
    # segment.weights_dir wins over the environment
    other = tmp_path / "elsewhere"
    with pytest.raises(segmentation.WeightsMissingError, match=str(other / "nnunet" / "results")):
        segmentation.class_map("totalsegmentator", case, {"weights_dir": str(other), "fast": False,
                                                          "anatomies": ["liver"]})


def test_totalsegmentator_real_call_without_weights(ts, empty_totalseg_home, monkeypatch):
    """The real TotalSegmentator API, no mock: with no weights it tries to download them from
    GitHub. A dead proxy makes that fail the same way as having no network (a requests
    ConnectionError) on every machine, so the test never downloads weights even where it could."""
    import requests

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    case = {"case_id": "abd", "image_path": str(ts / "example_ct_sm.nii.gz")}
    with pytest.raises(segmentation.WeightsMissingError) as err:
        segmentation.class_map("totalsegmentator", case, {"fast": True, "device": "cpu", "download": True})
    assert isinstance(err.value.__cause__, requests.exceptions.ConnectionError)
    msg = str(err.value)
    assert "downloading them failed (ConnectionError" in msg or "downloading them failed (ProxyError" in msg
    assert "totalseg_download_weights -t total_fast" in msg and "segment.download" not in msg
    # usage statistics were switched off before TotalSegmentator ran
    config = json.loads((empty_totalseg_home / "config.json").read_text(encoding="utf-8"))
    assert config["send_usage_stats"] is False
    assert config["totalseg_id"].startswith("totalseg_")
    assert not list((empty_totalseg_home / "nnunet" / "results").glob("*.zip"))


def test_manifest_spacing_overrides_header_and_keeps_header_aligned_masks(ts, tmp_path):
    """CT-RATE: the metadata's spacing is the truth; a mask made on the header grid (same size,
    header spacing) is voxel-aligned with the image and must not be resampled through space."""
    (tmp_path / "c.nii.gz").symlink_to(ts / "example_seg.nii.gz")
    case = {"case_id": "c", "image_path": str(ts / "example_ct_sm.nii.gz"),
            "spacing_x": 2.0, "spacing_y": 2.5, "spacing_z": 4.0}  # header: 3 mm iso
    img, _ = segmentation.class_map("precomputed", case, {"path": str(tmp_path), "class_version": "v2"})
    assert img.GetSpacing() == pytest.approx((2.0, 2.5, 4.0))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg.nii.gz")))
    assert np.array_equal(sitk.GetArrayFromImage(img), ref)
    image, source = imaging_io.read_case_image(case)
    assert image.GetSpacing() == pytest.approx((2.0, 2.5, 4.0)) and source.startswith("manifest")
    assert imaging_io.read_case_image({**case, "spacing_x": 3.0, "spacing_y": 3.0, "spacing_z": 3.0})[1] == "header"
