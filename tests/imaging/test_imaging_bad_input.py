"""A corpus of bad cases goes through ingest -> segment -> preprocess -> qc: each case is either
processed or excluded with its reason, the rest of the cohort goes on, nothing disappears."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

from ctvlp import cli, workspace
from ctvlp.cohort import demo, generic, schema
from ctvlp.config import validate
from ctvlp.imaging import checks, exclusion, qc
from ctvlp.imaging.stage import STAMP
from htmlpage import tables

SETTINGS = validate({"preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"backend": "phantom"}})


def _nifti(arr, affine, path, dtype=np.int16):
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _dicom_series(arr_zyx, folder, modality):
    """A DICOM series written slice by slice with the tags a scanner would set."""
    folder.mkdir()
    series_uid, study_uid = "1.2.826.0.1.3680043.2.1125.1.1", "1.2.826.0.1.3680043.2.1125.1.2"
    for k, sl in enumerate(arr_zyx):
        img = sitk.GetImageFromArray(sl.astype(np.int16))
        img.SetSpacing((2.0, 2.0))
        tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|000d": study_uid,
                "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{k * 4.0}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": "4.0", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{k + 1}"}
        for key, v in tags.items():
            img.SetMetaData(key, v)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"{k:03d}.dcm"))
        w.Execute(img)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    case = demo.generate_case(0, seed=3)
    hu, mask, aff = case.image.astype(np.int16), case.mask.astype(np.uint8), case.affine
    good_mask = _nifti(mask, aff, d / "mask.nii.gz", np.uint8)
    rows = []

    def add(cid, image, report="Liver: normal. Lungs: clear.", mask_path=good_mask, **extra):
        rows.append({"case_id": cid, "image": str(image), "report": report, "mask": str(mask_path), **extra})

    add("good", _nifti(hu, aff, d / "good.nii.gz"))
    add("hu_with_metadata_rescale", _nifti(hu, aff, d / "hu_meta.nii.gz"), slope=1.0, intercept=-1024.0)
    add("raw_stored_values", _nifti(hu + 1024, aff, d / "raw.nii.gz", np.uint16), slope=1.0, intercept=-1024.0)
    add("double_rescaled", _nifti(hu - 1024, aff, d / "double.nii.gz"))
    add("mr_like_values", _nifti(np.abs(hu + 1000) // 3, aff, d / "mr.nii.gz"))
    few = np.diag([2.0, 2.0, 4.0, 1.0])
    add("few_slices", _nifti(hu[:, :, 60:63], few, d / "few.nii.gz"),
        mask_path=_nifti(mask[:, :, 60:63], few, d / "few_mask.nii.gz", np.uint8))
    absurd = aff.copy()
    absurd[2, 2] = 90.0
    add("absurd_spacing", _nifti(hu, absurd, d / "absurd.nii.gz"),
        mask_path=_nifti(mask, absurd, d / "absurd_mask.nii.gz", np.uint8))
    shifted = aff.copy()
    shifted[:3, 3] += 600.0
    add("mismatched_mask", _nifti(hu, aff, d / "mm.nii.gz"), mask_path=_nifti(mask, shifted, d / "mm_mask.nii.gz", np.uint8))
    raw = gzip.compress(gzip.decompress((d / "good.nii.gz").read_bytes()))
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    add("truncated_file", d / "truncated.nii.gz")
    _dicom_series(np.transpose(hu[::4, ::4, 40:60], (2, 1, 0)), d / "mr_dicom", "MR")
    add("mr_dicom", d / "mr_dicom")
    add("missing_report", d / "good.nii.gz", report="")

    table = pl.DataFrame(rows)
    table.drop("slope", "intercept").write_csv(d / "cohort.csv")
    man, _, exc = generic.ingest(d / "cohort.csv", image_col="image", report_col="report", mask_col="mask",
                               split_fractions=(1.0, 0.0, 0.0))
    rescale = table.select("case_id", pl.col("slope").alias("rescale_slope"), pl.col("intercept").alias("rescale_intercept"))
    man = man.drop("rescale_slope", "rescale_intercept").join(rescale, on="case_id", how="left")
    schema.write(man, None, exc, d / "cohort")
    params = d / "settings.json"
    params.write_text(json.dumps(SETTINGS))
    params = str(params)
    for cid in man["case_id"]:
        cli.main(["segment", "--config", params, "--case", cid, "--manifest", str(d / "cohort/manifest.parquet"),
                  "--out-dir", str(d / "segment" / cid)])
        cli.main(["preprocess", "--config", params, "--case", cid, "--manifest", str(d / "cohort/manifest.parquet"),
                  "--segment-dir", str(d / "segment" / cid), "--out-dir", str(d / "preprocessed" / cid)])
    qc.collect(d / "cohort/manifest.parquet", d / "cohort/exclusions.parquet", d / "segment", d / "preprocessed",
               d / "qc")
    return d, [r["case_id"] for r in rows]


def test_every_case_is_kept_or_excluded_with_its_reason(corpus):
    d, ids = corpus
    kept = set(pl.read_parquet(d / "qc/cases.parquet")["case_id"])
    exc = pl.read_parquet(d / "qc/excluded.parquet")
    reasons = dict(zip(exc["case_id"], exc["reason"]))
    stages = dict(zip(exc["case_id"], exc["stage"]))
    assert kept == {"good", "hu_with_metadata_rescale", "raw_stored_values"}
    assert kept | set(reasons) == set(ids) and not kept & set(reasons)  # nothing lost, nothing twice
    expected = {"double_rescaled": ("preprocess", "applied twice"),
                "mr_like_values": ("preprocess", "do not look like CT HU"),
                "few_slices": ("segment", "too few slices"),
                "absurd_spacing": ("segment", "absurd voxel spacing"),
                "mismatched_mask": ("segment", "mask does not match its image"),
                "truncated_file": ("segment", "truncated file"),
                "mr_dicom": ("segment", "modality MR"),
                "missing_report": ("ingest", "empty report")}
    for cid, (stage, words) in expected.items():
        assert stages[cid] == stage, (cid, stages[cid], reasons[cid])
        assert words in reasons[cid], (cid, reasons[cid])
    # an excluded case leaves only its record, never half-written arrays
    assert sorted(p.name for p in (d / "preprocessed/double_rescaled").iterdir()) == [STAMP, "excluded.json"]
    summary = (d / "qc/summary.md").read_text(encoding="utf-8")
    assert "cases processed and kept: 3" in summary and "mismatched_mask" in summary
    # the report's inline page: every exclusion with its stage and reason, the same counts
    page = tables((d / "qc/summary.html").read_text(encoding="utf-8"))
    rows = exc.select("case_id", "stage", "reason").iter_rows()
    assert sorted(page["Excluded cases"][1]) == sorted(list(r) for r in rows)
    assert dict(page["Counts"][1])["cases processed and kept"] == "3"
    assert dict(page["Counts"][1])["exclusions recorded"] == str(len(exc)) == str(len(expected))


def test_rescale_is_applied_at_most_once_and_recorded(corpus):
    d, _ = corpus
    rows = {r["case_id"]: r for r in pl.read_parquet(d / "qc/qc.parquet").iter_rows(named=True)}
    assert rows["good"]["hu_intercept"] == 0.0
    assert rows["hu_with_metadata_rescale"]["hu_intercept"] == 0.0
    assert "NOT applied again" in rows["hu_with_metadata_rescale"]["hu_decision"]
    assert rows["raw_stored_values"]["hu_intercept"] == -1024.0
    # all three hold the same scan: same HU after the decision, same preprocessed image
    for k in ("hu_p1", "hu_p50", "hu_p99"):
        assert rows["raw_stored_values"][k] == rows["good"][k] == rows["hu_with_metadata_rescale"][k]
    ref = np.load(d / "preprocessed/good/image.npy")
    for cid in ("hu_with_metadata_rescale", "raw_stored_values"):
        assert np.array_equal(np.load(d / f"preprocessed/{cid}/image.npy"), ref)
    assert -1100 < rows["good"]["hu_p1"] < -900  # air
    assert rows["good"]["original_spacing_z"] != rows["good"]["spacing_z"] == 8.0


def test_strict_fails_the_run_on_any_exclusion(corpus, tmp_path):
    d, _ = corpus
    with pytest.raises(SystemExit, match="excluded and preprocess.strict"):
        qc.collect(d / "cohort/manifest.parquet", d / "cohort/exclusions.parquet", d / "segment",
                   d / "preprocessed", tmp_path / "qc", strict=True)


def test_2d_image_is_excluded(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(path))
    with pytest.raises(exclusion.CaseExcluded, match="2D image"):
        checks.check_image(path, SETTINGS["preprocess"])


def test_hu_warnings_without_exclusion():
    rng = np.random.default_rng(0)
    body = np.concatenate([rng.normal(-1000, 20, 5000), rng.normal(40, 30, 20000), np.full(30, -1180.0)])
    stats, warnings = checks.check_hu(body.reshape(-1, 1, 1))
    assert any("below -1100" in w for w in warnings)
    no_air = rng.normal(40, 30, 20000).reshape(-1, 1, 1)
    assert any("no air" in w for w in checks.check_hu(no_air)[1])
    assert checks.check_hu(rng.normal(-1000, 10, 1000).reshape(-1, 1, 1))[0]["p50"] == pytest.approx(-1000, abs=3)


def test_scanner_padding_is_not_mistaken_for_air():
    rng = np.random.default_rng(1)
    vals = np.concatenate([np.full(30000, -3024.0), rng.normal(-1000, 15, 10000), rng.normal(40, 30, 60000)])
    stats, _ = checks.check_hu(vals.reshape(-1, 1, 1))  # would be "applied twice" if padding counted as air
    assert stats["padding_fraction"] == pytest.approx(0.3) and stats["p1"] > -1100


def test_rescue_of_a_case_reruns_cleanly(corpus, tmp_path):
    """A case folder is rewritten from scratch: an old exclusion never survives a good rerun."""
    d, _ = corpus
    workspace.prepare_results(tmp_path)  # ctvlp replaces folders only inside its marked results folder
    out = tmp_path / "seg"
    shutil.copytree(d / "segment/double_rescaled", out)
    (out / "excluded.json").write_text(json.dumps({"case_id": "good", "stage": "segment", "reason": "old"}))
    cli.main(["segment", "--config", str(d / "settings.json"), "--case", "good", "--manifest",
              str(d / "cohort/manifest.parquet"), "--out-dir", str(out)])
    assert not (out / "excluded.json").exists() and (out / "anatomy.nii.gz").is_file()
    assert not list(tmp_path.glob(".seg.*"))  # no temporary or old folder left beside it


def test_label_notes_are_not_exclusions(corpus, tmp_path):
    """Ingest's stage "ground_truth" rows describe kept cases without complete labels: listed,
    but strict does not fail on them and they are not counted as exclusions."""
    d, _ = corpus
    kept = pl.read_parquet(d / "qc/cases.parquet")
    kept.write_parquet(tmp_path / "manifest.parquet")
    pl.DataFrame([{"case_id": "good", "stage": "ground_truth", "reason": "no row in the labels table"}],
                 schema=schema.EXCLUSIONS_SCHEMA).write_parquet(tmp_path / "exclusions.parquet")
    out = qc.collect(tmp_path / "manifest.parquet", tmp_path / "exclusions.parquet", d / "segment",
                     d / "preprocessed", tmp_path / "qc", strict=True)
    assert out == {"kept": 3, "excluded": 0}
    summary = (tmp_path / "qc/summary.md").read_text(encoding="utf-8")
    assert "exclusions recorded: 0" in summary and "missing or incomplete labels (stage ground_truth): 1" in summary
    assert pl.read_parquet(tmp_path / "qc/excluded.parquet")["stage"].to_list() == ["ground_truth"]
