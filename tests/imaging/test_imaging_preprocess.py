import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctvlp import catalog
from ctvlp.config import validate
from ctvlp.imaging import io as imaging_io
from ctvlp.imaging import preprocess, segment


def _hu(scaled, window=(-1000, 1000)):
    return scaled.astype(np.float64) * (window[1] - window[0]) + window[0]


PRE = validate({"preprocess": {"spacing": [3.0, 3.0, 3.0]}})["preprocess"]


def _segment_and_preprocess(tmp_path, image, seg, spacing=(3.0, 3.0, 3.0)):
    case = {"case_id": "c", "image_path": str(image), "mask_path": str(seg)}
    cfg = {"backend": "phantom", "class_version": "v2", "min_voxels": 10, "preprocess": PRE}
    table = segment.segment_case(case, cfg, tmp_path / "seg")
    meta = preprocess.preprocess_case(case, tmp_path / "seg" / "anatomy.nii.gz", {**PRE, "spacing": list(spacing)},
                                   tmp_path / "pre")
    return table, meta, np.load(tmp_path / "pre" / "image.npy"), np.load(tmp_path / "pre" / "anatomy.npy")


def _median_hu(img, anat, name):
    return float(np.median(_hu(img[anat == catalog.anatomy_by_name(name).index])))


def test_grouping_real_abdomen_segmentation(real_ct, tmp_path):
    ts = real_ct / "totalsegmentator"
    table, meta, img, anat = _segment_and_preprocess(tmp_path, ts / "example_ct.nii.gz",
                                                     ts / "example_seg_fast_force_split.nii.gz")
    vol = dict(zip(table["anatomy"], table["volume_ml"]))
    for name in ("liver", "spleen", "kidney", "pancreas", "stomach", "colon", "small_intestine",
                 "urinary_bladder", "aorta", "lumbar_spine", "sacrum", "hip", "iliopsoas"):
        assert vol[name] > 0, name
    # plausible adult volumes (mL); the scan covers the whole liver and spleen
    assert 900 < vol["liver"] < 3000
    assert 80 < vol["spleen"] < 600
    assert 150 < vol["kidney"] < 700
    assert vol["head"] == 0 and vol["thyroid_gland"] == 0
    # intensities land in the organ's HU range after grouping and resampling
    assert 30 < _median_hu(img, anat, "liver") < 80
    assert 20 < _median_hu(img, anat, "spleen") < 70
    assert meta["anatomy_voxels"]["liver"] > 0


def test_dicom_series_with_flipped_mask_lands_on_the_organs(real_ct, tmp_path):
    ts = real_ct / "totalsegmentator"
    _, meta, img, anat = _segment_and_preprocess(tmp_path, ts / "example_ct_dicom", ts / "example_seg_dicom.nii.gz",
                                                 spacing=(2.0, 2.0, 2.0))
    assert meta["original_size"] == [512, 512, 20]
    # The mask is stored with its y axis flipped. Overlaying its array naively puts the spleen at
    # about -86 HU, the aorta at 12 and the thoracic spine at -71; resampling through physical
    # space must land each label on its organ.
    assert 60 < _median_hu(img, anat, "liver") < 200  # contrast-enhanced liver
    assert 40 < _median_hu(img, anat, "spleen") < 200
    assert _median_hu(img, anat, "aorta") > 100  # arterial contrast
    assert _median_hu(img, anat, "thoracic_spine") > 150  # bone


def test_preprocess_spacing_and_range(real_ct, tmp_path):
    ts = real_ct / "totalsegmentator"
    _, meta, img, anat = _segment_and_preprocess(tmp_path, ts / "example_ct.nii.gz", ts / "example_seg.nii.gz",
                                                 spacing=(1.5, 2.0, 5.0))
    assert meta["spacing"] == pytest.approx([1.5, 2.0, 5.0])
    # extent is preserved: 122 x 101 x 112 voxels of 3 mm
    assert img.shape == (244, 152, 67)  # 122 x 101 x 112 voxels of 3 mm, extent preserved
    assert img.dtype == np.float16 and anat.dtype == np.uint8 and img.shape == anat.shape
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.min() == 0.0  # air at or below -1000 HU clips to 0
    assert set(np.unique(anat)) <= set(range(37))
    assert json.loads((tmp_path / "pre" / "meta.json").read_text(encoding="utf-8"))["orientation"] == "LPS"


def test_scale_hu_window():
    hu = np.array([-3000, -1000, 0, 1000, 3000])
    assert preprocess.scale_hu(hu, (-1000, 1000)).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_group_rejects_foreign_label_ids():
    img = sitk.GetImageFromArray(np.full((4, 4, 4), 200, dtype=np.uint8))
    with pytest.raises(ValueError, match="outside TotalSegmentator v2"):
        segment.group_classes(img, "v2")


def test_anatomy_table_bbox_and_completeness():
    arr = np.zeros((10, 10, 10), dtype=np.uint8)
    liver = catalog.anatomy_by_name("liver").index
    lung = catalog.anatomy_by_name("lung").index
    arr[2:5, 3:6, 4:8] = liver  # inside
    arr[0:3, 0:2, 0:1] = lung  # touches the border: cut off by the scan
    tab = segment.anatomy_table(arr, (2.0, 2.0, 2.0), "c", min_voxels=1)
    row = tab.filter(tab["anatomy"] == "liver").row(0, named=True)
    assert (row["x0"], row["x1"], row["y0"], row["y1"], row["z0"], row["z1"]) == (2, 4, 3, 5, 4, 7)
    assert row["voxels"] == 36 and row["volume_ml"] == pytest.approx(36 * 8 / 1000)
    assert row["complete"]
    assert not tab.filter(tab["anatomy"] == "lung")["complete"][0]
    assert tab.filter(tab["anatomy"] == "spleen")["present"][0] is False


def test_anatomy_crop_is_centred_inside_and_covers_the_box():
    from ctvlp.evaluation.embed import anatomy_crop

    sl = anatomy_crop([10, 19, 0, 3, 40, 49], (100, 50, 50), (20, 20, 20))
    assert sl == (slice(5, 25), slice(0, 20), slice(30, 50))  # centred; clamped at both borders
    big = anatomy_crop([0, 59, 5, 9, 0, 9], (100, 50, 50), (20, 20, 20))
    assert big[0] == slice(0, 60)  # grown to the box: the anatomy stays complete


def test_truncated_uncompressed_nifti_is_caught(tmp_path):
    from ctvlp.imaging.exclusion import CaseExcluded

    path = tmp_path / "t.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20, 20), np.int16)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CaseExcluded, match="truncated file"):
        imaging_io.verify_nifti_data(path)
