"""One bad case never stops its shard, and a changed input file is made again.

A shard holding cases with broken geometry (singular or sheared direction, NaN in the header or the
manifest, a 2D or 4D mask for a 3D image) and a case whose processing raises an unexpected error
finishes every other case and records each exclusion with the case, the stage and the reason. A
failure of the shard itself (memory, a full disk, the model) fails the job naming the case. An image
or mask replaced in place is redone by the next run of its shard, and only that case."""

import errno
import json
import os
import time

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from ctvlp import config, workspace
from ctvlp.cohort import demo, schema
from ctvlp.imaging import checks, exclusion, stage
from ctvlp.imaging.segmentation import WeightsMissingError

SETTINGS = config.validate({"preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"backend": "phantom"}})


def _nifti(arr, affine, path, dtype=np.int16, sform_only=False):
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype), None)
    img.header.set_data_dtype(dtype)
    img.set_qform(None if sform_only else affine, code=0 if sform_only else 1)  # nibabel orthogonalises a qform
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _mha(path, matrix="1 0 0 0 1 0 0 0 1", spacing="2 2 2", offset="0 0 0"):
    """A small MetaImage with the header fields as written (readers take them as they are)."""
    arr = np.full((24, 24, 24), -1000, np.int16)
    head = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nOffset = {offset}\n"
            f"TransformMatrix = {matrix}\nElementSpacing = {spacing}\nDimSize = 24 24 24\nElementType = MET_SHORT\n"
            "ElementDataFile = LOCAL\n")
    path.write_bytes(head.encode() + arr.tobytes())
    return path


@pytest.fixture(scope="module")
def base():
    return demo.generate_case(0, seed=3)


def _row(case_id, image, mask, base, **extra):
    return {"case_id": case_id, "split": "train", "image_path": str(image), "mask_path": str(mask),
            "report_text": base.report, "source": "table", "spacing_x": base.spacing[0], "spacing_y": base.spacing[1],
            "spacing_z": base.spacing[2], "shape_x": base.image.shape[0], "shape_y": base.image.shape[1],
            "shape_z": base.image.shape[2], "source_id": case_id, **extra}


def _cohort(root, rows):
    workspace.prepare_results(root / "results")
    schema.write(schema.frame(rows, schema.MANIFEST_SCHEMA), None, None, root / "cohort")
    return root / "cohort/manifest.parquet"


def _segment(manifest, root, size=64):
    r = root / "results"
    count = stage.n_shards(pl.read_parquet(manifest).height, size)
    return pl.concat([stage.run_shard("segment", manifest, k, size, SETTINGS, r / "segment",
                                      r / f"shards/segment/{k}.parquet") for k in range(count)])


def _preprocess(manifest, root, size=64):
    r = root / "results"
    count = stage.n_shards(pl.read_parquet(manifest).height, size)
    return pl.concat([stage.run_shard("preprocess", manifest, k, size, SETTINGS, r / "preprocessed",
                                      r / f"shards/preprocessed/{k}.parquet", segment_root=r / "segment")
                      for k in range(count)])


# ---- geometry checks, one place ------------------------------------------------------------------


@pytest.mark.parametrize("direction, words", [
    (np.eye(3), None),
    (np.diag([-1.0, -1.0, 1.0]), None),  # RAS vs LPS: a flip is fine
    (np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], float).T, "singular"),
    (np.zeros((3, 3)), "singular"),
    (np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]], float), "not orthonormal"),
    (np.diag([2.0, 1.0, 1.0]), "not orthonormal"),
])
def test_the_direction_matrix_must_be_orthonormal(direction, words):
    problem = checks.geometry_problem(3, (1, 1, 1), (0, 0, 0), direction.ravel())
    assert (problem is None) if words is None else (words in problem)


@pytest.mark.parametrize("spacing, origin, words", [
    ((1, float("nan"), 1), (0, 0, 0), "NaN/Inf in header field(s): spacing"),
    ((1, 1, 1), (0, float("inf"), 0), "origin"),
    ((1, 0, 1), (0, 0, 0), "non-positive"),
])
def test_nan_or_nonpositive_header_fields_are_named(spacing, origin, words):
    assert words in checks.geometry_problem(3, spacing, origin, np.eye(3).ravel())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_manifest_spacing_that_is_not_a_positive_number_is_an_exclusion(value):
    with pytest.raises(exclusion.CaseExcluded, match="spacing_y"):
        checks.check_manifest_spacing({"spacing_x": 1.0, "spacing_y": value, "spacing_z": 1.0})
    checks.check_manifest_spacing({"spacing_x": None, "spacing_y": None, "spacing_z": None})  # not given: fine


# ---- a shard with bad cases in the middle --------------------------------------------------------


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("isolation")
    hu, mask, aff = base.image.astype(np.int16), base.mask.astype(np.uint8), base.affine
    good_mask = _nifti(mask, aff, root / "mask.nii.gz", np.uint8)
    rows = []

    def add(cid, image_affine=aff, mask_path=good_mask, image=None, **extra):
        image = image or _nifti(hu, image_affine, root / f"{cid}.nii.gz", sform_only=image_affine is not aff)
        rows.append(_row(cid, image, mask_path, base, **extra))

    singular = aff.copy()
    singular[:3, 2] = singular[:3, 0]  # the z axis along x
    add("a_good")
    add("b_singular_direction", singular)
    add("b2_singular_direction_mha", image=_mha(root / "singular.mha", matrix="1 0 0 0 1 0 1 0 0"))
    add("c_sheared_direction", image=_mha(root / "sheared.mha", matrix="1 0 0 0.3 1 0 0 0 1"))
    add("d_mask_2d", mask_path=_nifti(mask[:, :, 60], aff, root / "mask2d.nii.gz", np.uint8))
    add("e_mask_4d", mask_path=_nifti(np.stack([mask, mask], -1), aff, root / "mask4d.nii.gz", np.uint8))
    add("f_nan_manifest_spacing", spacing_x=float("nan"))
    add("g_nan_header_spacing", image=_mha(root / "nan_spacing.mha", spacing="nan 2 2"))
    nrrd = root / "nan_origin.nrrd"  # NRRD's reader refuses a NaN origin; MetaIO reads "nan" as 0, NIfTI drops it
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 24 24 24\n"
                     b"space directions: (2,0,0) (0,2,0) (0,0,2)\nkinds: domain domain domain\nendian: little\n"
                     b"encoding: raw\nspace origin: (nan,0,0)\n\n" + np.zeros(24 ** 3, np.int16).tobytes())
    add("g2_nan_header_origin", image=nrrd)
    add("h_unexpected_error")
    add("i_mask_singular", mask_path=_mha(root / "mask_singular.mha", matrix="0 0 1 0 1 0 0 0 1"))
    add("z_good")
    manifest = _cohort(root, rows)
    return root, manifest


EXPECTED = {
    "b_singular_direction": (stage.SEGMENT, "orthonormal"),  # ITK's NIfTI reader refuses it: unreadable
    "c_sheared_direction": (stage.SEGMENT, "not orthonormal"),
    "d_mask_2d": (stage.SEGMENT, "is 2D"),
    "e_mask_4d": (stage.SEGMENT, "is 4D"),
    "f_nan_manifest_spacing": (stage.SEGMENT, "spacing_x = nan"),
    "b2_singular_direction_mha": (stage.SEGMENT, "singular direction matrix"),
    "g_nan_header_spacing": (stage.SEGMENT, "spacing"),
    "g2_nan_header_origin": (stage.SEGMENT, "unreadable image"),
    "h_unexpected_error": (stage.SEGMENT, "unexpected error: ZeroDivisionError: boom in the middle"),
    "i_mask_singular": (stage.SEGMENT, "mask_singular.mha: singular direction matrix"),
}


def _boom_for(case_id, error):
    real = stage.segment_case

    def fake(case, cfg, out):
        if case["case_id"] == case_id:
            raise error
        return real(case, cfg, out)

    return fake


def test_bad_cases_in_the_middle_are_excluded_with_case_stage_and_reason_and_the_shard_goes_on(
        bad_shard, monkeypatch, caplog):
    root, manifest = bad_shard
    monkeypatch.setattr(stage, "segment_case", _boom_for("h_unexpected_error", ZeroDivisionError("boom in the middle")))
    table = _segment(manifest, root)
    status = dict(zip(table["case_id"], table["status"]))
    assert status["a_good"] == status["z_good"] == "done"
    assert {c for c, s in status.items() if s == "excluded"} == set(EXPECTED)
    reasons = dict(zip(table["case_id"], table["reason"]))
    for case_id, (where, words) in EXPECTED.items():
        assert words in reasons[case_id], (case_id, reasons[case_id])
        record = exclusion.read_exclusion(root / "results/segment" / case_id)
        assert record == {"case_id": case_id, "stage": where, "reason": reasons[case_id]}
    assert "d_mask_2d" in reasons["d_mask_2d"] or "mask2d.nii.gz" in reasons["d_mask_2d"]  # names the file
    # the log names the case of the unexpected error, with its traceback
    assert any("h_unexpected_error" in r.getMessage() and r.exc_info for r in caplog.records)
    # preprocess carries every exclusion forward and makes the good cases
    pre = _preprocess(manifest, root)
    assert dict(zip(pre["case_id"], pre["status"])) == status
    assert (root / "results/preprocessed/z_good/image.npy").is_file()


def test_an_unexpected_error_is_tried_again_on_the_next_run_a_data_exclusion_is_kept(bad_shard, monkeypatch):
    root, manifest = bad_shard
    monkeypatch.setattr(stage, "segment_case", _boom_for("h_unexpected_error", ZeroDivisionError("boom in the middle")))
    _segment(manifest, root)
    monkeypatch.undo()  # the bug is fixed
    again = _segment(manifest, root)
    status = dict(zip(again["case_id"], again["status"]))
    assert status["h_unexpected_error"] == "done"  # no stamp on a crash record: made again
    assert status["a_good"] == status["z_good"] == "reused"
    assert status["b_singular_direction"] == "excluded"  # a data exclusion keeps its stamp


@pytest.mark.parametrize("error, words", [
    (MemoryError("Unable to allocate 12.0 GiB"), "MemoryError"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("sitk::ERROR: Failed to write image: No space left on device"), "No space left"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only"),
    (WeightsMissingError("TotalSegmentator weights for task 'total' are missing"), "weights"),
])
def test_a_failure_of_the_shard_fails_the_job_naming_the_case_and_keeps_what_was_done(
        tmp_path, base, monkeypatch, error, words):
    hu, mask, aff = base.image.astype(np.int16), base.mask.astype(np.uint8), base.affine
    m = _nifti(mask, aff, tmp_path / "mask.nii.gz", np.uint8)
    rows = [_row(c, _nifti(hu, aff, tmp_path / f"{c}.nii.gz"), m, base) for c in ("a", "b", "c")]
    manifest = _cohort(tmp_path, rows)
    monkeypatch.setattr(stage, "segment_case", _boom_for("b", error))
    with pytest.raises(stage.ShardFailed, match=r"segment shard 0: case 2 of 3 \(b\)") as info:
        _segment(manifest, tmp_path)
    assert words in str(info.value) and "1 case(s) before it are kept" in str(info.value)
    assert not (tmp_path / "results/shards/segment/0.parquet").exists()  # the job's output: not written
    monkeypatch.undo()
    status = _segment(manifest, tmp_path)["status"].to_list()
    assert status == ["reused", "done", "done"]  # the rerun resumes at the failed case


def test_an_interrupt_is_not_swallowed(tmp_path, base, monkeypatch):
    hu, mask, aff = base.image.astype(np.int16), base.mask.astype(np.uint8), base.affine
    m = _nifti(mask, aff, tmp_path / "mask.nii.gz", np.uint8)
    manifest = _cohort(tmp_path, [_row(c, _nifti(hu, aff, tmp_path / f"{c}.nii.gz"), m, base) for c in ("a", "b")])
    monkeypatch.setattr(stage, "segment_case", _boom_for("a", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _segment(manifest, tmp_path)


@pytest.mark.parametrize("error, fatal", [
    (ValueError("bad label"), False), (FileNotFoundError(errno.ENOENT, "gone"), False),
    (PermissionError(errno.EACCES, "input not readable"), False), (MemoryError(), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True), (RuntimeError("CUDA error: an illegal memory access"), True),
    (ImportError("No module named 'totalsegmentator'"), True),
])
def test_which_errors_are_failures_of_the_shard(error, fatal):
    assert stage.shard_fatal(error) is fatal
    try:  # also when wrapped by the code that met it
        raise ValueError("while reading the case") from error
    except ValueError as wrapped:
        assert stage.shard_fatal(wrapped) is fatal


# ---- stale inputs --------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, base):
    hu, mask, aff = base.image.astype(np.int16), base.mask.astype(np.uint8), base.affine
    rows = [_row(c, _nifti(hu, aff, tmp_path / f"{c}.nii.gz"), _nifti(mask, aff, tmp_path / f"{c}_mask.nii.gz",
                                                                          np.uint8), base) for c in ("a", "b", "c")]
    manifest = _cohort(tmp_path, rows)
    assert _segment(manifest, tmp_path, size=2)["status"].to_list() == ["done"] * 3
    assert _preprocess(manifest, tmp_path, size=2)["status"].to_list() == ["done"] * 3
    return tmp_path, manifest, base


def _replace(path, arr, affine, dtype=np.int16, keep_mtime=False):
    st = os.stat(path)
    _nifti(arr, affine, path, dtype)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_image_replaced_in_place_is_made_again_and_only_it(small, keep_mtime):
    root, manifest, base = small
    before = np.load(root / "results/preprocessed/b/image.npy")
    changed = base.image.astype(np.int16)
    changed[40:100, 30:90, 40:100] += 300  # same geometry, other voxels
    _replace(root / "b.nii.gz", changed, base.affine, keep_mtime=keep_mtime)  # mtime kept: only the digest sees it
    assert _segment(manifest, root, size=2)["status"].to_list() == ["reused", "done", "reused"]
    assert _preprocess(manifest, root, size=2)["status"].to_list() == ["reused", "done", "reused"]
    assert not np.array_equal(np.load(root / "results/preprocessed/b/image.npy"), before)


def test_a_mask_replaced_in_place_is_segmented_again(small):
    root, manifest, base = small
    before = json.loads((root / "results/segment/c" / stage.STAMP).read_text())
    mask = base.mask.astype(np.uint8)
    mask[mask == mask.max()] = 0
    _replace(root / "c_mask.nii.gz", mask, base.affine, np.uint8)
    assert _segment(manifest, root, size=2)["status"].to_list() == ["reused", "reused", "done"]
    assert json.loads((root / "results/segment/c" / stage.STAMP).read_text())["inputs"] != before["inputs"]
    assert _preprocess(manifest, root, size=2)["status"].to_list() == ["reused", "reused", "done"]  # follows segment


def test_the_shard_param_changes_only_for_the_shard_whose_file_changed(small):
    root, manifest, _ = small
    before = [stage.shard_inputs_digest(manifest, k, 2) for k in range(2)]
    assert all(before) and before[0] != before[1]
    time.sleep(0.01)
    os.utime(root / "c.nii.gz")  # shard 1 holds case c
    after = [stage.shard_inputs_digest(manifest, k, 2) for k in range(2)]
    assert after[0] == before[0] and after[1] != before[1]
    assert stage.shard_inputs_digest(root / "absent.parquet", 0, 2) == ""


def test_a_dicom_folder_identity_covers_every_file_and_a_precomputed_segmentation(tmp_path):
    study = tmp_path / "study"
    (study / "s1").mkdir(parents=True)
    (study / "s1" / "1.dcm").write_bytes(b"x" * 10)
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "c.nii.gz").write_bytes(b"y" * 10)
    case = {"case_id": "c", "image_path": str(study), "mask_path": None}
    cfg = {"backend": "precomputed", "path": str(seg)}
    first = stage.input_identity(case, cfg)
    assert set(first) == {str(study / "s1" / "1.dcm"), str(seg / "c.nii.gz")}
    (study / "s2").mkdir()
    (study / "s2" / "1.dcm").write_bytes(b"z")  # a series added to the study
    assert len(stage.input_identity(case, cfg)) == 3
    (seg / "c.nii.gz").write_bytes(b"Y" * 10)  # same size, other content
    assert stage.input_identity(case, cfg)[str(seg / "c.nii.gz")]["blake2b"] != first[str(seg / "c.nii.gz")]["blake2b"]


def test_the_content_digest_reads_only_both_ends_of_a_large_file(tmp_path, monkeypatch):
    """The cost at CT-RATE scale: two DIGEST_SPAN reads per file, whatever its size."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(64 << 20)  # 64 MiB sparse file
    reads = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n):
            data = self.fh.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    stage.file_identity(big)
    monkeypatch.undo()
    assert sum(reads) == 2 * stage.DIGEST_SPAN
