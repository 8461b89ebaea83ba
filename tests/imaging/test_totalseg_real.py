"""The totalsegmentator backend run for real: TotalSegmentator's own package (its python API, its
nnU-Net pre- and postprocessing, nnU-Net's predictor) on the real CTs in ../shared, offline.

The model folder is TotalSegmentator's "fast" task (Dataset297, 3 mm, one network) in its own
weights layout under a temporary TOTALSEG_HOME_DIR, written by tests/totalseg_weights.py: a small
nnU-Net built by nnU-Net's own code with RANDOM weights (seeded). That proves the code path and the
equivalence of the per-shard route, not segmentation quality: the labels are whatever the random
network's argmax gives, which is why they are checked against the class map, not against anatomy.
"""

import logging

import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

pytest.importorskip("totalsegmentator", reason="TotalSegmentator not installed (make install-test installs it)")

from ctvlp import catalog, config
from ctvlp.imaging import segment, segmentation, stage
from ctvlp.imaging.io import read_image
from totalseg_weights import SMALL, task_folder, write_model


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A TotalSegmentator home holding only the fast model's folder (random weights)."""
    root = tmp_path_factory.mktemp("totalseg_home")
    write_model(root, 297, SMALL, seed=0)
    return root


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two real CTs: the 30-slice abdomen crop (3 mm, like the model) and the chest crop (1.5 mm:
    TotalSegmentator resamples it to 3 mm and its mask back)."""
    from conftest import TS

    if not (TS / "example_ct_sm.nii.gz").is_file() or not (TS / "chest_ct_cropped.nii.gz").is_file():
        pytest.skip(f"shared real CT data not found at {TS} (../shared sits beside the repo in CI)")
    return [{"case_id": "abdomen", "image_path": str(TS / "example_ct_sm.nii.gz")},
            {"case_id": "chest", "image_path": str(TS / "chest_ct_cropped.nii.gz")}]


def _cfg(home, **extra):
    return {"backend": "totalsegmentator", "weights_dir": str(home), "fast": True, "device": "cpu", **extra}


@pytest.fixture(scope="module")
def per_call(home, cases):
    """The reference: one totalsegmentator() call per case (networks loaded per call)."""
    return {c["case_id"]: segmentation.class_map("totalsegmentator", c, _cfg(home)) for c in cases}


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def test_totalsegmentator_runs_on_real_ct_with_its_class_map(per_call, cases):
    v2 = catalog.totalseg_classes("v2")
    for case in cases:
        cmap, version = per_call[case["case_id"]]
        assert version == "v2"
        assert _same_grid(cmap, read_image(case["image_path"]))
        ids = set(np.unique(sitk.GetArrayViewFromImage(cmap)).tolist()) - {0}
        assert ids and ids <= set(v2), f"{case['case_id']}: ids outside TotalSegmentator v2: {ids - set(v2)}"
        # a random network's argmax spreads over many of the 117 classes: the whole map came back
        assert len(ids) > 10, ids


def test_a_session_loads_once_and_gives_the_same_masks_as_per_call(home, cases, per_call):
    with segmentation.shard_session(_cfg(home)) as session:
        for case in cases:
            cmap, _ = segmentation.class_map("totalsegmentator", case, _cfg(home))
            ref = per_call[case["case_id"]][0]
            assert _same_grid(cmap, ref)
            assert np.array_equal(sitk.GetArrayFromImage(cmap), sitk.GetArrayFromImage(ref)), case["case_id"]
    assert session.patched is False  # TotalSegmentator is left as it was
    assert session.loads == 1 and session.load_seconds > 0  # one network for both cases
    assert session.predict_seconds > 0


def test_a_roi_subset_runs_the_crop_model_too_and_matches_per_call(home, cases):
    """Anatomies given: TotalSegmentator first runs its 6 mm model (Dataset298) to crop, then the
    3 mm model on the crop, and keeps only the subset's classes; the session keeps both networks."""
    write_model(home, 298, SMALL, seed=1)
    cfg = _cfg(home, anatomies=["lung", "liver", "ribs"])
    wanted = {catalog.class_id(c) for c in segmentation.roi_subset(cfg["anatomies"])}
    case = cases[0]
    ref = sitk.GetArrayFromImage(segmentation.class_map("totalsegmentator", case, cfg)[0])
    assert set(np.unique(ref).tolist()) - {0} and set(np.unique(ref).tolist()) <= wanted | {0}
    with segmentation.shard_session(cfg) as session:
        got = sitk.GetArrayFromImage(segmentation.class_map("totalsegmentator", case, cfg)[0])
    assert session.loads == 2  # the crop model and the 3 mm model, one predictor each
    assert np.array_equal(got, ref)


def test_segment_shard_groups_anatomies_and_matches_per_call(home, cases, per_call, tmp_path, caplog):
    manifest = tmp_path / "manifest.parquet"
    pl.DataFrame(cases).write_parquet(manifest)
    settings = config.validate({"segment": _cfg(home)})
    caplog.set_level(logging.INFO, logger="ctvlp.imaging.totalseg")
    table = stage.run_shard("segment", manifest, 0, 8, settings, tmp_path / "segment", tmp_path / "shard.parquet")
    assert table["status"].to_list() == ["done", "done"], table
    loaded = [r for r in caplog.records if "loaded" in r.getMessage()]
    assert len(loaded) == 1 and task_folder(297) in loaded[0].getMessage()
    for case in cases:
        out = tmp_path / "segment" / case["case_id"]
        anat = sitk.ReadImage(str(out / "anatomy.nii.gz"))
        assert _same_grid(anat, read_image(case["image_path"]))
        expected = segment.group_classes(*per_call[case["case_id"]])
        assert np.array_equal(sitk.GetArrayFromImage(anat), sitk.GetArrayFromImage(expected))
        anatomies = pl.read_parquet(out / "anatomies.parquet")
        assert anatomies["anatomy"].to_list() == catalog.anatomy_names()
        counts = np.bincount(sitk.GetArrayFromImage(anat).ravel(), minlength=len(catalog.anatomies()) + 1)
        assert anatomies["voxels"].to_list() == counts[1:].tolist()
        assert anatomies["present"].sum() > 0


def test_shard_session_refuses_missing_weights_before_loading(tmp_path, cases):
    with (pytest.raises(segmentation.WeightsMissingError, match=task_folder(297)),
          segmentation.shard_session(_cfg(tmp_path / "empty_home"))):
        pass
    with segmentation.shard_session({"backend": "phantom"}) as session:
        assert session is None


def test_preflight_names_the_fix(tmp_path, home, monkeypatch):
    assert segmentation.preflight({"backend": "phantom"}) is None
    assert segmentation.preflight(_cfg(home)) is None  # the fast model's folder is all it needs
    problem = segmentation.preflight(_cfg(tmp_path))
    assert task_folder(297) in problem and str(tmp_path / "nnunet" / "results") in problem
    assert "totalseg_download_weights -t total_fast" in problem and "TOTALSEG_HOME_DIR" in problem
    slow = segmentation.preflight(_cfg(home, fast=False))  # the five part models are not there
    assert "Dataset291_TotalSegmentator_part1_organs" in slow and "segment.fast: true" in slow
    assert segmentation.preflight(_cfg(tmp_path, download=True)) is None
    monkeypatch.setattr(segmentation.importlib.util, "find_spec", lambda name: None)
    assert "make install TOTALSEG=1" in segmentation.preflight(_cfg(home))
