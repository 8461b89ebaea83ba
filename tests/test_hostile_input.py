"""Hostile and careless input, class by class: nothing escapes the results folder, nothing is
deleted or overwritten outside it, every bad row is excluded with its reason, and what cannot be
used fails with a clear message instead of a traceback or silent corruption."""

import json
import shutil

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

from ctvlp import catalog, cli, config, workspace
from ctvlp.cohort import demo, generic, schema
from ctvlp.evaluation import zeroshot
from ctvlp.imaging import exclusion, preprocess, qc, segment
from ctvlp.imaging import io as imaging_io
from ctvlp.imaging.storage import with_folders
from ctvlp.model import io as model_io
from ctvlp.reports import rules
from ctvlp.reports import schema as report_schema
from ctvlp.training import phases
from ctvlp.workspace import UnsafePathError

HOSTILE_IDS = {
    "../..": "path separator",
    "../../IMPORTANT.txt": "path separator",
    "../cohort": "path separator",
    ".": "names a folder itself",
    "..": "names a folder itself",
    "../x": "path separator",
    "./ok2": "path separator",
    "a\\b": "path separator",
    "-leading": "starts with '-'",
    "tab\tid": "control or invisible",
    "zero\u200bwidth": "control or invisible",
    "soft\u00adhyphen": "control or invisible",
    "x" * 129: "longer than 128",
    "trailing.": "ends with '.'",
    "con": "reserved device name",
    "NUL.txt": "reserved device name",
    "spa ce": "characters other than",
    "ünï": "characters other than",
    "": "empty",
}


# ---- case ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", sorted(HOSTILE_IDS, key=repr))
def test_unsafe_ids_are_named_with_the_reason(case_id):
    problem = workspace.case_id_problem(case_id)
    assert problem is not None and HOSTILE_IDS[case_id] in problem
    with pytest.raises(ValueError):
        workspace.check_case_id(case_id)


@pytest.mark.parametrize("case_id", ["ok2", "demo_0001", "train_1_a_1", "A.b-c_d", "x" * 128, "1"])
def test_plain_ids_pass(case_id):
    assert workspace.case_id_problem(case_id) is None


def test_ids_sharing_a_folder_are_all_excluded_never_merged():
    folders, excluded = workspace.case_folders(["Case1", "case1", "ok", "../x", "x"], "exclude")
    assert folders == {"ok": "ok", "x": "x"}
    assert set(excluded) == {"Case1", "case1", "../x"}
    assert "share one folder" in excluded["Case1"] and "path separator" in excluded["../x"]


def test_slug_policy_maps_unsafe_ids_to_distinct_plain_names():
    ids = ["../x", "..\\x", "-x", "x y", "a\u200bb", "ok"]
    folders, excluded = workspace.case_folders(ids, "slug")
    assert not excluded and folders["ok"] == "ok"
    assert len(set(folders.values())) == len(ids)  # never merged
    assert all(workspace.case_id_problem(f) is None for f in folders.values())


# ---- the results folder -------------------------------------------------------------------------


def test_results_folder_guard(tmp_path):
    checkout = tmp_path / "repo"
    checkout.mkdir()
    protected = [checkout]
    for bad, words in (("", "empty"), ("/", "filesystem root"), (str(checkout), "whose files"),
                       (str(tmp_path), "whose files")):
        assert words in workspace.results_problem(bad, protected)
    other = tmp_path / "someone_elses"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert "did not create" in workspace.results_problem(other, protected)
    with pytest.raises(UnsafePathError):
        workspace.prepare_results(other, protected)
    assert (other / "thesis.tex").read_text() == "years of work" and not (other / workspace.MARKER).exists()
    assert workspace.results_problem(other, protected, force=True) is None  # adopted only when asked
    fresh = tmp_path / "new" / "results"
    assert workspace.prepare_results(fresh, protected) == fresh.resolve()
    assert (fresh / workspace.MARKER).is_file()
    assert workspace.results_problem(fresh, protected) is None  # ctvlp's own, also once it fills up


def test_deletion_only_inside_a_marked_results_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    results = workspace.prepare_results(tmp_path / "results")
    with pytest.raises(UnsafePathError):
        workspace.remove_tree(outside)
    with pytest.raises(UnsafePathError):  # the results folder itself is not a case folder
        workspace.remove_tree(results)
    link = results / "segment" / "evil"
    link.parent.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError):  # a link cannot lead a deletion outside
        with workspace.replace_dir(link) as tmp:
            (tmp / "x").write_text("x")
    assert (outside / "keep.txt").read_text() == "keep"
    inside = results / "segment" / "c1"
    inside.mkdir()
    workspace.remove_tree(inside)
    assert not inside.exists()


def test_case_folder_appears_only_complete(tmp_path):
    workspace.prepare_results(tmp_path)
    final = tmp_path / "preprocessed" / "c1"
    with workspace.replace_dir(final) as tmp:
        (tmp / "a.npy").write_text("old")
    with pytest.raises(RuntimeError):  # killed half-way: the old, complete folder stays
        with workspace.replace_dir(final) as tmp:
            (tmp / "a.npy").write_text("new, half")
            raise RuntimeError("killed")
    assert [p.name for p in final.iterdir()] == ["a.npy"] and (final / "a.npy").read_text() == "old"
    (final.parent / ".c1.tmp-99999").mkdir()  # left by a SIGKILL: removed by the next write
    with workspace.replace_dir(final) as tmp:
        (tmp / "b.npy").write_text("new")
    assert sorted(p.name for p in final.parent.iterdir()) == ["c1"] and (final / "b.npy").is_file()


def test_cli_refuses_an_unsafe_case_and_an_unmarked_folder(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text("{}")
    with pytest.raises(SystemExit, match="starts with '-'"):
        cli.main(["segment", "--config", str(settings), "--case=-leading", "--manifest", "m.parquet",
                  "--out-dir", str(tmp_path / "x")])


# ---- a table of hostile ids through ingest ----------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    case = demo.generate_case(0, seed=3)
    paths = {}
    for name, arr, dtype in (("ct", case.image, np.int16), ("mask", case.mask, np.uint8)):
        img = nib.Nifti1Image(arr.astype(dtype), case.affine)
        img.set_qform(case.affine, code=1)
        nib.save(img, str(d / f"{name}.nii.gz"))
        paths[name] = d / f"{name}.nii.gz"
    paths["case"] = case
    return paths


def test_hostile_ids_are_excluded_at_ingest_with_reasons(images, tmp_path):
    ids = [i for i in HOSTILE_IDS if i] + ["ok2", "Case1", "case1"]
    pl.DataFrame({"case_id": ids, "image": [str(images["ct"])] * len(ids),
                  "report": ["Liver normal."] * len(ids)}).write_csv(tmp_path / "t.csv")
    man, _, exc = generic.ingest(tmp_path / "t.csv", split_fractions=(1, 0, 0))
    assert man["case_id"].to_list() == ["ok2"]  # "./ok2" never merges into "ok2"
    reasons = dict(zip(exc["case_id"], exc["reason"]))
    assert set(reasons) == set(ids) - {"ok2"}
    assert "share one folder" in reasons["Case1"] and "path separator" in reasons["./ok2"]
    man, _, exc = generic.ingest(tmp_path / "t.csv", split_fractions=(1, 0, 0), unsafe_ids="slug")
    assert len(man) == len(ids) - 2 and set(exc["case_id"]) == {"Case1", "case1"}
    mapped = man.filter(pl.col("case_id") != pl.col("source_id"))
    assert set(mapped["source_id"]) == {i for i in ids if workspace.case_id_problem(i)}
    assert mapped["ingest_note"].str.contains("mapped from").all()
    schema.write(man, None, exc, tmp_path / "out")  # every id safe: accepted
    with pytest.raises(ValueError, match="unsafe as folder names"):
        schema.write(man.with_columns(case_id=pl.col("source_id")), None, exc, tmp_path / "out2")


def test_generic_table_without_labels_gives_empty_ground_truth_and_a_clear_evaluation_error(images, tmp_path):
    pl.DataFrame({"case_id": ["a"], "image": [str(images["ct"])], "report": ["Liver normal."]}).write_csv(tmp_path / "t.csv")
    man, gt, exc = generic.ingest(tmp_path / "t.csv")
    paths = schema.write(man, gt, exc, tmp_path / "cohort")
    truth = pl.read_parquet(paths["ground_truth"])
    assert truth.is_empty() and truth.schema == pl.Schema(schema.GROUND_TRUTH_SCHEMA)
    with pytest.raises(zeroshot.NoLabelsError, match="needs? .*labels|label_cols"):
        zeroshot.read_ground_truth(paths["ground_truth"])
    settings = tmp_path / "s.json"
    settings.write_text("{}")
    with pytest.raises(SystemExit, match="no ground-truth labels"):
        cli.main(["evaluate", "--config", str(settings), "--model", str(tmp_path), "--cases", str(paths["manifest"]),
                  "--ground-truth", str(paths["ground_truth"]), "--out-dir", str(tmp_path / "eval")])


def test_one_latin1_byte_excludes_only_its_row(images, tmp_path):
    head = b"case_id,image,report\n"
    good = f"good,{images['ct']},The liver is normal.\n".encode()
    bad = f"bad,{images['ct']},Caf".encode() + b"\xe9 au lait spots; liver normal.\n"
    (tmp_path / "t.csv").write_bytes(head + good + bad)
    man, _, exc = generic.ingest(tmp_path / "t.csv", split_fractions=(1, 0, 0))
    assert man["case_id"].to_list() == ["good"]
    row = exc.row(0, named=True)
    assert row["case_id"] == "bad" and "'report'" in row["reason"] and "UTF-8" in row["reason"] and "0xe9" in row["reason"]
    man, _, exc = generic.ingest(tmp_path / "t.csv", split_fractions=(1, 0, 0), fallback_encoding="cp1252")
    assert sorted(man["case_id"]) == ["bad", "good"] and exc.is_empty()
    bad_row = man.filter(pl.col("case_id") == "bad").row(0, named=True)
    assert bad_row["report_text"].startswith("Café") and "cp1252" in bad_row["ingest_note"]
    with pytest.raises(config.ConfigError, match="unknown text encoding"):
        config.validate({"cohort": {"text_fallback_encoding": "klingon"}})


# ---- images -----------------------------------------------------------------------------------


def _settings(**pre):
    return config.validate({"preprocess": {"spacing": [8.0, 8.0, 8.0], **pre}})


def _case(path, mask):
    return {"case_id": "c", "image_path": str(path), "mask_path": str(mask)}


def _run(case, tmp_path, settings):
    seg_cfg = {**settings["segment"], "preprocess": settings["preprocess"]}
    segment.segment_case(case, seg_cfg, tmp_path / "seg")
    return preprocess.preprocess_case(case, tmp_path / "seg" / "anatomy.nii.gz", settings["preprocess"], tmp_path / "pre")


@pytest.mark.parametrize("fmt", ["nrrd", "nii.gz"])
def test_a_few_non_finite_voxels_are_repaired_with_a_warning(images, tmp_path, fmt):
    ct = sitk.Cast(sitk.ReadImage(str(images["ct"])), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(ct)
    arr.flat[[10, 5000, 90000]] = [np.inf, np.nan, -np.inf]
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(ct)
    sitk.WriteImage(bad, str(tmp_path / f"ct.{fmt}"))
    meta = _run(_case(tmp_path / f"ct.{fmt}", images["mask"]), tmp_path, _settings())
    assert any("3 non-finite voxels (1 NaN, 2 Inf)" in w for w in meta["warnings"])
    assert np.isfinite(np.load(tmp_path / "pre" / "image.npy")).all()
    assert qc._qc_row(meta)["warnings"].count("non-finite") == 1  # reaches the QC table


def test_many_non_finite_voxels_exclude_the_case(images, tmp_path):
    ct = sitk.Cast(sitk.ReadImage(str(images["ct"])), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(ct)
    arr[: arr.shape[0] // 10] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(ct)
    sitk.WriteImage(bad, str(tmp_path / "ct.nrrd"))
    with pytest.raises(exclusion.CaseExcluded, match="non-finite voxels .*max_nonfinite_fraction"):
        _run(_case(tmp_path / "ct.nrrd", images["mask"]), tmp_path, _settings())
    assert not (tmp_path / "pre" / "image.npy").exists()


@pytest.mark.parametrize("header", [
    "NRRD0004\ntype: short\ndimension: 3\nsizes: 5000 5000 5000\nspacings: 1 1 1\nencoding: raw\n"
    "endian: little\ndata file: huge.raw\n",
    "ObjectType = Image\nNDims = 3\nDimSize = 5000 5000 5000\nElementType = MET_SHORT\n"
    "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n",
])
def test_a_declared_size_too_large_is_excluded_before_reading(images, tmp_path, header):
    path = tmp_path / ("huge.nhdr" if header.startswith("NRRD") else "huge.mhd")
    path.write_text(header)
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)  # the voxels are never read
    spacing, shape = imaging_io.header_info(path)  # ingest reads headers only
    assert shape == (5000, 5000, 5000)
    seg_cfg = {**_settings()["segment"], "preprocess": _settings()["preprocess"]}
    with pytest.raises(exclusion.CaseExcluded, match="header declares .*max_voxels"):
        segment.segment_case(_case(path, images["mask"]), seg_cfg, tmp_path / "seg")
    with pytest.raises(exclusion.CaseExcluded, match="header declares"):
        preprocess.preprocess_case(_case(path, images["mask"]), images["mask"], _settings()["preprocess"], tmp_path / "p")


def test_a_resampled_grid_too_large_is_excluded_before_allocation(images, tmp_path):
    settings = _settings(spacing=[0.1, 0.1, 0.1], max_voxels=10_000_000)
    with pytest.raises(exclusion.CaseExcluded, match="resampled to .*max_voxels"):
        _run(_case(images["ct"], images["mask"]), tmp_path, settings)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, words", [
    ({"preprocess": {"hu_window": [0, 0]}}, "preprocess.hu_window': needs lower < upper"),
    ({"preprocess": {"hu_window": [1000, -1000]}}, "preprocess.hu_window': needs lower < upper"),
    ({"preprocess": {"spacing": [0.001, 0.001, 0.001]}}, "preprocess.spacing"),
    ({"preprocess": {"spacing_range": [20.0, 0.1]}}, "spacing_range': needs lower < upper"),
    ({"results": ""}, "results"),
    ({"model": {"widths": [1000000, 1000000, 1000000, 1000000]}}, "model.widths"),
    ({"model": {"vq_dim": 16000, "vq_depth": 60}}, "billion parameters"),
])
def test_absurd_config_values_stop_at_start(bad, words):
    with pytest.raises(config.ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        config.validate(bad)


def test_a_pasted_secret_is_refused_without_being_shown(tmp_path):
    secret = "sk-proj-AbC123secretsecret"
    with pytest.raises(config.ConfigError) as e:
        config.validate({"reports": {"llm": {"api_key_env": secret}}})
    assert "api_key_env" in str(e.value) and secret not in str(e.value) and "NAME of an environment variable" in str(e.value)


def test_a_stage_reading_a_section_its_rule_did_not_pass_fails_loudly():
    settings = config.restrict(config.validate({}), ["preprocess.strict", "seed"])
    assert settings["preprocess"] == {"strict": False} and settings["seed"] == 0
    with pytest.raises(config.ConfigError, match="did not pass"):
        settings["train"]
    with pytest.raises(KeyError):
        settings["preprocess"]["spacing"]


# ---- a model folder's config.json ---------------------------------------------------------------


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"phase": "align"}), "lacks the model settings"),
    (json.dumps({"model": {"widths": "wide"}}), "model.widths"),
    (json.dumps({"model": {"widths": [2**20] * 4}}), "model.widths"),
    (json.dumps({"model": {"embed_dim": 64, "warp_drive": True}}), "warp_drive"),
])
def test_a_broken_model_folder_is_refused_before_allocation(tmp_path, content, words):
    (tmp_path / "config.json").write_text(content)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(config.ConfigError, match=words):
        model_io.load_model(tmp_path)
    run_config = tmp_path / "run.yaml"  # a model folder without bundle.json needs the run's config
    run_config.write_text("train: {device: cpu}\n")
    with pytest.raises(SystemExit, match=words):  # the CLI says it plainly, no traceback
        cli.main(["predict", "scan.nii.gz", "--model", str(tmp_path), "--config", str(run_config), "--device", "cpu"])


# ---- training on a bad case ---------------------------------------------------------------------


def test_a_non_finite_loss_names_the_cases_of_the_batch(tiny_cohort, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohort["root"], root)
    bad = "tiny_02"
    img = np.load(root / "preprocessed" / bad / "image.npy")
    np.save(root / "preprocessed" / bad / "image.npy", np.full_like(img, np.nan))
    cfg_model = {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3,
                 "vq_codes": 0}
    cfg_train = config.validate({"train": {"epochs": 1, "batch_size": 6, "crop_size": [32, 32, 48], "threads": 1,
                                           "device": "cpu"}})["train"]
    with pytest.raises(FloatingPointError, match=f"non-finite loss .*cases .*{bad}"):
        cases = pl.read_parquet(root / "cases.parquet")
        with_folders(cases.select("case_id", "split"), root / "segment", root / "preprocessed").write_parquet(
            root / "cases.parquet")
        phases.run("align", root / "cases.parquet", root / "reports.parquet", tmp_path / "out", cfg_model, cfg_train, 0)


# ---- report text -------------------------------------------------------------------------------


@pytest.mark.parametrize("spoiled", ["cy\u00adst", "cy\u200bst", "cy\x07st", "cy\ufeffst", "ｃｙｓｔ", "cy\u2060st"])
def test_invisible_and_compatibility_characters_do_not_hide_a_finding(spoiled):
    diseases = catalog.diseases("demo")
    rows = {r["anatomy"]: r for r in rules.parse_report(f"A renal {spoiled} is seen in the left kidney.", diseases)}
    assert rows["kidney"]["status"] == "abnormal"
    assert {"disease_id": "kidney_cyst", "presence": "present"} in rows["kidney"]["findings"]
    assert report_schema.clean_text(f"a{spoiled}b\u2028c") == "acystb\nc"
