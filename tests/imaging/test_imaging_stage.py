"""The per-case stages over shards: every case in exactly one shard, one folder per case with its
own exclusion record, a rerun that redoes only missing or stale cases, and one case by hand."""

import json

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from ctvlp import cli, config, workspace
from ctvlp.cohort import demo, schema
from ctvlp.imaging import stage


@pytest.mark.parametrize("cases, size", [(160, 128), (10, 3), (7, 7), (1, 5), (300, 64)])
def test_shards_cover_every_case_once_in_equal_parts(cases, size):
    manifest = pl.DataFrame({"case_id": [f"c{i:04d}" for i in range(cases)]}).sample(fraction=1.0, shuffle=True, seed=1)
    count = stage.n_shards(cases, size)
    shards = [[r["case_id"] for r in stage.shard_cases(manifest, k, size)] for k in range(count)]
    flat = [c for s in shards for c in s]
    assert flat == sorted(manifest["case_id"])  # each once, in case_id order
    assert max(map(len, shards)) <= size and max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="does not exist"):
        stage.shard_cases(manifest, count, size)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three demo cases and a fourth whose mask is missing (excluded at segment)."""
    root = tmp_path_factory.mktemp("shards")
    workspace.prepare_results(root / "results")
    rows = []
    for i in range(4):
        case = demo.generate_case(i, seed=5)
        paths = {}
        for name, arr, dtype in (("ct", case.image, np.int16), ("mask", case.mask, np.uint8)):
            img = nib.Nifti1Image(arr.astype(dtype), case.affine)
            img.set_qform(case.affine, code=1)
            paths[name] = root / f"{case.case_id}_{name}.nii.gz"
            nib.save(img, str(paths[name]))
        rows.append({"case_id": case.case_id, "split": "train", "image_path": str(paths["ct"]),
                     "mask_path": str(paths["mask"]) if i < 3 else str(root / "missing.nii.gz"),
                     "report_text": case.report, "source": "demo", "spacing_x": case.spacing[0],
                     "spacing_y": case.spacing[1], "spacing_z": case.spacing[2], "shape_x": case.image.shape[0],
                     "shape_y": case.image.shape[1], "shape_z": case.image.shape[2], "source_id": case.case_id})
    schema.write(schema.frame(rows, schema.MANIFEST_SCHEMA), None, None, root / "cohort")
    settings = config.validate({"preprocess": {"spacing": [8.0, 8.0, 8.0]}})
    return {"root": root, "manifest": root / "cohort/manifest.parquet", "settings": settings,
            "results": root / "results"}


def _segment_shards(cohort, settings=None, size=2):
    r = cohort["results"]
    return [stage.run_shard("segment", cohort["manifest"], k, size, settings or cohort["settings"], r / "segment",
                            r / f"shards/segment/{k}.parquet") for k in range(stage.n_shards(4, size))]


def test_a_shard_writes_a_folder_per_case_and_reruns_only_what_is_missing_or_stale(cohort):
    r = cohort["results"]
    tables = pl.concat(_segment_shards(cohort))
    assert tables["status"].to_list() == ["done", "done", "done", "excluded"]
    assert "mask" in tables["reason"][3] or "not found" in tables["reason"][3]
    assert sorted(p.name for p in (r / "segment").iterdir()) == sorted(tables["case_id"])
    assert (r / "segment" / tables["case_id"][3] / "excluded.json").is_file()
    for case_id in tables["case_id"][:3]:
        assert (r / "segment" / case_id / "anatomy.nii.gz").is_file()
        assert json.loads((r / "segment" / case_id / stage.STAMP).read_text())["stage"] == "segment"
    # a rerun (e.g. after the job was killed before writing its table) keeps every finished case
    again = pl.concat(_segment_shards(cohort))
    assert again["status"].to_list() == ["reused", "reused", "reused", "excluded"]
    assert again["reason"][3] == tables["reason"][3]
    # a case lost half-way (its folder never renamed into place) is the only one made again
    lost = r / "segment" / tables["case_id"][1]
    workspace.remove_tree(lost)
    assert pl.concat(_segment_shards(cohort))["status"].to_list() == ["reused", "done", "reused", "excluded"]
    # other settings: every case again
    other = config.validate({"preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"min_voxels": 20}})
    assert pl.concat(_segment_shards(cohort, other))["status"].to_list() == ["done", "done", "done", "excluded"]


def test_preprocess_shards_follow_their_segment_folders(cohort):
    r = cohort["results"]
    _segment_shards(cohort)

    def preprocess():
        return pl.concat([stage.run_shard("preprocess", cohort["manifest"], k, 4, cohort["settings"],
                                          r / "preprocessed", r / "shards/preprocessed/0.parquet",
                                          segment_root=r / "segment") for k in range(1)])

    first = preprocess()
    assert first["status"].to_list() == ["done", "done", "done", "excluded"]  # the segment exclusion carries over
    assert (r / "preprocessed" / first["case_id"][0] / "image.npy").is_file()
    assert preprocess()["status"].to_list() == ["reused", "reused", "reused", "excluded"]
    # a segment folder made again (other settings) makes its preprocess folder stale
    other = config.validate({"preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"min_voxels": 30}})
    _segment_shards(cohort, other)
    assert preprocess()["status"].to_list()[:3] == ["done", "done", "done"]


def test_the_cli_runs_one_case_or_a_shard_never_both(cohort, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(cohort["settings"]))
    case_id = pl.read_parquet(cohort["manifest"])["case_id"][0]
    out = cohort["results"] / "by_hand" / case_id
    cli.main(["segment", "--config", str(settings), "--manifest", str(cohort["manifest"]), "--case", case_id,
              "--out-dir", str(out)])
    assert (out / "anatomies.parquet").is_file()
    with pytest.raises(SystemExit, match="give --case and --out-dir"):
        cli.main(["segment", "--config", str(settings), "--manifest", str(cohort["manifest"]), "--case", case_id,
                  "--shard", "0"])
