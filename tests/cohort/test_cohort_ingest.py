"""Manifest building from CT-RATE-shaped folders and generic tables, on real CT files.

The CT-RATE fixture reuses real CTs from ../shared under CT-RATE file names; every report text and
label here is made up for the test.
"""

from pathlib import Path

import polars as pl
import pytest

from ctvlp import catalog
from ctvlp.cohort import ctrate, generic, schema, splits
from ctvlp.config import validate
from ctvlp.imaging import io as imaging_io
from ctvlp.imaging import preprocess

from conftest import PYRAD, TS


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def _vol(root: Path, name: str, src: Path) -> Path:
    split, patient, scan, _ = name.split("_")
    return _link(src, root / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / f"{name}.nii.gz")


LABELS = [d.name for d in catalog.diseases("ctrate")]


@pytest.fixture
def ctrate_dir(shared, tmp_path):
    """CT-RATE layout: 5 train patients (patient 1 with two scans, scan a in two recons), one valid
    patient, a volume without report, a report without volume, a volume without metadata."""
    root = tmp_path / "ctrate" / "dataset"
    sm, chest = TS / "example_ct_sm.nii.gz", TS / "chest_ct_cropped.nii.gz"
    names = {
        "train_1_a_1": chest, "train_1_a_2": sm, "train_1_b_1": sm,
        "train_2_a_2": chest, "train_2_a_1": sm,  # recon 1 sorts last on disk, still kept
        "train_3_a_1": chest, "train_7_a_1": sm, "train_8_a_1": chest,
        "valid_5_a_1": chest,
        "train_4_a_1": sm,   # no report
        "train_6_a_1": sm,   # no metadata row
    }
    for name, src in names.items():
        _vol(root, name, src)
    reported = [n for n in names if n != "train_4_a_1"] + ["train_9_a_1"]  # train_9: no volume
    reports = pl.DataFrame({
        "VolumeName": [f"{n}.nii.gz" for n in reported],
        "ClinicalInformation_EN": ["Test indication."] * len(reported),
        "Technique_EN": ["Test technique."] * len(reported),
        "Findings_EN": [f"Made-up findings for {n}. Heart size is normal." for n in reported],
        "Impressions_EN": [f"Made-up impression for {n}." for n in reported],
    })
    meta_names = [n for n in names if n != "train_6_a_1"] + ["train_9_a_1"]
    meta = pl.DataFrame({
        "VolumeName": [f"{n}.nii.gz" for n in meta_names],
        "XYSpacing": ["[0.7, 0.8]" if n == "train_1_a_1" else "[0.75, 0.75]" for n in meta_names],
        "ZSpacing": ["1.5" if n == "train_1_a_1" else "1.0" for n in meta_names],
        "RescaleSlope": ["1.0"] * len(meta_names),
        "RescaleIntercept": ["-1024.0" if n == "train_1_a_1" else "-8192" for n in meta_names],
    })
    labels = pl.DataFrame({"VolumeName": [f"{n}.nii.gz" for n in names if n != "train_8_a_1"],
                           **{lab: [int(i == j) for j, _ in enumerate(names) if _ != "train_8_a_1"]
                              for i, lab in enumerate(LABELS)}})
    csv = tmp_path / "ctrate"
    reports.write_csv(csv / "reports.csv")
    meta.write_csv(csv / "metadata.csv")
    labels.write_csv(csv / "labels.csv")
    return root, csv


def test_ctrate_manifest(ctrate_dir):
    root, csv = ctrate_dir
    man, gt, exc = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv", csv / "labels.csv")
    assert man.columns == list(schema.MANIFEST_SCHEMA)
    assert dict(man.schema) == schema.MANIFEST_SCHEMA
    # lowest recon per (patient, scan); excluded volumes are absent
    assert man["case_id"].to_list() == ["train_1_a_1", "train_1_b_1", "train_2_a_1", "train_3_a_1",
                                        "train_7_a_1", "train_8_a_1", "valid_5_a_1"]
    row = man.filter(pl.col("case_id") == "train_1_a_1").row(0, named=True)
    # XYSpacing is DICOM PixelSpacing: [row spacing (y), column spacing (x)]
    assert (row["spacing_x"], row["spacing_y"], row["spacing_z"]) == (0.8, 0.7, 1.5)
    assert (row["shape_x"], row["shape_y"], row["shape_z"]) == (122, 102, 112)  # chest_ct_cropped header
    assert row["rescale_slope"] == 1.0 and row["rescale_intercept"] == -1024.0
    assert row["report_text"] == ("FINDINGS:\nMade-up findings for train_1_a_1. Heart size is normal."
                                  "\n\nIMPRESSION:\nMade-up impression for train_1_a_1.")
    assert row["mask_path"] is None and row["source"] == "ctrate"
    assert Path(row["image_path"]).name == "train_1_a_1.nii.gz" and Path(row["image_path"]).exists()
    sm = man.filter(pl.col("case_id") == "train_2_a_1").row(0, named=True)
    assert (sm["shape_x"], sm["shape_y"], sm["shape_z"]) == (122, 101, 30)
    # splits: CT-RATE valid -> test; train split by patient into train/val
    split = dict(zip(man["case_id"], man["split"]))
    assert split["valid_5_a_1"] == "test"
    assert split["train_1_a_1"] == split["train_1_b_1"]
    train_splits = [s for c, s in split.items() if c.startswith("train")]
    assert set(train_splits) == {"train", "val"}  # 5 patients, 10 %: one val patient
    by_patient = man.with_columns(pl.col("case_id").str.extract(r"^(\w+?_\d+)_").alias("p")) \
        .group_by("p").agg(pl.col("split").n_unique().alias("n"))
    assert by_patient["n"].max() == 1
    # deterministic
    again, _, _ = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv")
    assert again["split"].to_list() == man["split"].to_list()

    reasons = {(r["case_id"], r["stage"]): r["reason"] for r in exc.iter_rows(named=True)}
    assert "volume without report" in reasons[("train_4_a_1", "ingest")]
    assert reasons[("train_9_a_1", "ingest")] == "report without volume file"
    assert "no metadata row" in reasons[("train_6_a_1", "ingest")]
    assert "train_1_a_1" in reasons[("train_1_a_2", "ingest")]
    assert "train_2_a_1" in reasons[("train_2_a_2", "ingest")]
    assert "no row in the labels table" in reasons[("train_8_a_1", "ground_truth")]
    assert set(exc["stage"]) == {"ingest", "ground_truth"}

    # ground truth: long, 18 diseases per labelled manifest case, catalog ids and anatomies
    assert dict(gt.schema) == schema.GROUND_TRUTH_SCHEMA
    assert set(gt["case_id"]) == set(man["case_id"]) - {"train_8_a_1"}
    assert gt.group_by("case_id").len()["len"].unique().to_list() == [18]
    ids = {d.name: d for d in catalog.diseases("ctrate")}
    # names: column i is positive for the i-th volume of the fixture dict (train_1_a_1 -> first label)
    pos = gt.filter((pl.col("case_id") == "train_1_a_1") & (pl.col("label") == 1))
    assert pos["disease_id"].to_list() == [ids[LABELS[0]].id]
    assert pos["anatomy"].to_list() == [ids[LABELS[0]].anatomy]


def test_ctrate_options(ctrate_dir, tmp_path):
    root, csv = ctrate_dir
    man, gt, exc = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv", split="valid",
                                 one_recon_per_scan=False)
    assert gt.is_empty()  # no labels CSV: empty ground truth, the columns as always
    assert man["case_id"].to_list() == ["valid_5_a_1"] and man["split"].to_list() == ["test"]
    assert not exc["case_id"].str.starts_with("train").any()
    man, _, exc = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv", split="train",
                                one_recon_per_scan=False, val_fraction=0.0)
    assert {"train_1_a_2", "train_2_a_2"} <= set(man["case_id"])
    assert set(man["split"]) == {"train"}
    paths = schema.write(man, None, exc, tmp_path / "out")
    assert pl.read_parquet(paths["manifest"]).equals(man)
    assert pl.read_parquet(paths["exclusions"]).equals(exc)
    assert pl.read_parquet(tmp_path / "out" / "ground_truth.parquet").is_empty()


def test_table_nifti_nrrd_dicom_and_missing(shared, tmp_path):
    if not (PYRAD / "lung1_image.nrrd").is_file():
        pytest.skip(f"pyradiomics lung1 not found at {PYRAD}")
    work = tmp_path / "tab"
    _link(TS / "example_ct_sm.nii.gz", work / "imgs" / "abd.nii.gz")
    tab = pl.DataFrame({
        "case_id": ["abd", "lung1", "dcm", "gone", "silent"],
        "image": ["imgs/abd.nii.gz", str(PYRAD / "lung1_image.nrrd"), str(TS / "example_ct_dicom"),
                  "imgs/missing.nii.gz", "imgs/abd.nii.gz"],
        "report": ["Made-up: liver normal.", "Made-up: lung nodule.", "Made-up: spleen normal.",
                   "Made-up text.", "  "],
        "Lung nodule": [0, 1, 0, 0, 0],
        "emphysema": [0, None, 1, 0, 0],
    })
    tab.write_csv(work / "cases.csv")
    man, gt, exc = generic.ingest(work / "cases.csv", label_cols=["Lung nodule", "emphysema"],
                                split_fractions=(1, 1, 1))
    assert man.columns == list(schema.MANIFEST_SCHEMA)
    assert man["case_id"].to_list() == ["abd", "dcm", "lung1"]
    rows = {r["case_id"]: r for r in man.iter_rows(named=True)}
    assert rows["abd"]["image_path"] == str(work / "imgs" / "abd.nii.gz")
    assert (rows["abd"]["shape_x"], rows["abd"]["shape_y"], rows["abd"]["shape_z"]) == (122, 101, 30)
    assert rows["abd"]["spacing_z"] == pytest.approx(3.0)
    assert (rows["lung1"]["shape_x"], rows["lung1"]["shape_y"], rows["lung1"]["shape_z"]) == (512, 512, 48)
    assert rows["lung1"]["spacing_z"] == pytest.approx(5.0)
    # DICOM spacing/shape from headers match what the series reader assembles
    img = imaging_io.read_image(TS / "example_ct_dicom")
    d = rows["dcm"]
    assert (d["shape_x"], d["shape_y"], d["shape_z"]) == img.GetSize()
    assert [d["spacing_x"], d["spacing_y"], d["spacing_z"]] == pytest.approx(list(img.GetSpacing()), abs=1e-4)
    assert rows["abd"]["rescale_slope"] is None and rows["abd"]["source"] == "cases"
    assert set(man["split"]) == {"train", "val", "test"}

    reasons = dict(zip(exc["case_id"], exc["reason"]))
    assert reasons["gone"].startswith("image not found") and "missing.nii.gz" in reasons["gone"]
    assert reasons["silent"] == "empty report"
    assert "emphysema" in reasons["lung1"]  # missing label value recorded, case kept
    assert exc.filter(pl.col("case_id") == "lung1")["stage"].to_list() == ["ground_truth"]

    assert set(gt["disease_id"]) == {"lung_nodule", "emphysema"}
    lab = {(r["case_id"], r["disease_id"]): r["label"] for r in gt.iter_rows(named=True)}
    assert lab[("lung1", "lung_nodule")] == 1 and ("lung1", "emphysema") not in lab
    assert lab[("dcm", "emphysema")] == 1

    paths = schema.write(man, gt, exc, tmp_path / "out")
    assert pl.read_parquet(paths["ground_truth"]).equals(gt)


def test_table_split_column_parquet_and_ids_from_names(shared, tmp_path):
    tab = pl.DataFrame({"img": [str(TS / "example_ct_sm.nii.gz"), str(TS / "chest_ct_cropped.nii.gz")],
                        "text": ["Made-up A.", "Made-up B."], "fold": ["training", "Validation"]})
    tab.write_parquet(tmp_path / "t.parquet")
    man, gt, exc = generic.ingest(tmp_path / "t.parquet", image_col="img", report_col="text",
                                split_col="fold", source="mine")
    assert gt.is_empty() and exc.height == 0
    assert dict(zip(man["case_id"], man["split"])) == {"example_ct_sm": "train", "chest_ct_cropped": "val"}
    assert set(man["source"]) == {"mine"}
    with pytest.raises(ValueError, match="not a column"):
        generic.ingest(tmp_path / "t.parquet", image_col="image")


def test_split_groups_deterministic_and_exclusive():
    groups = [f"p{i}" for i in range(200)]
    a = splits.split_groups(groups, (0.8, 0.1, 0.1), seed=3)
    assert a == splits.split_groups(list(reversed(groups)), (0.8, 0.1, 0.1), seed=3)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    assert a != splits.split_groups(groups, (0.8, 0.1, 0.1), seed=4)


def test_ctrate_volume_already_in_hu_is_not_rescaled_twice(ctrate_dir, tmp_path):
    """CT-RATE metadata carries RescaleIntercept for volumes that already hold HU (CT-CLIP issue
    50): auto keeps them; forcing the rescale lands air near -2000 HU and the case is excluded."""
    import SimpleITK as sitk

    from ctvlp.imaging.exclusion import CaseExcluded

    root, csv = ctrate_dir
    man, _, _ = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv")
    case = man.filter(pl.col("case_id") == "train_1_a_1").row(0, named=True)
    assert case["rescale_intercept"] == -1024.0
    image = imaging_io.read_image(case["image_path"])
    block = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    block.CopyInformation(image)
    block[20:60, 20:60, 20:60] = 1
    sitk.WriteImage(block, str(tmp_path / "anat.nii.gz"))
    cfg = validate({"preprocess": {"spacing": [3.0, 3.0, 3.0]}})["preprocess"]
    meta = preprocess.preprocess_case(case, tmp_path / "anat.nii.gz", cfg, tmp_path / "auto")
    assert meta["hu_intercept"] == 0.0 and "NOT applied again" in meta["hu_decision"]
    # the metadata's spacing, not the header's (1.5 mm iso), sets the physical grid
    assert meta["original_spacing"] == pytest.approx([0.8, 0.7, 1.5]) and meta["spacing_source"].startswith("manifest")
    assert meta["size"] == [round(122 * 0.8 / 3), round(102 * 0.7 / 3), round(112 * 1.5 / 3)]
    assert -1100 < meta["hu_stats"]["p1"] < -800  # lung / air of the real chest CT
    with pytest.raises(CaseExcluded, match="applied twice"):
        preprocess.preprocess_case(case, tmp_path / "anat.nii.gz", {**cfg, "hu": "rescale"}, tmp_path / "forced")


def test_ctrate_label_cells_must_be_0_1_or_empty(ctrate_dir):
    """A CT-RATE label cell of 0.9, 2 or 1e400 leaves its case without ground truth, naming the CSV
    line, column and value; a report over 128 KiB (csv's default field limit) is read."""
    root, csv = ctrate_dir
    labels = pl.read_csv(csv / "labels.csv", infer_schema=False)
    col = LABELS[3]
    bad = {"train_1_a_1.nii.gz": "0.9", "train_3_a_1.nii.gz": "2", "valid_5_a_1.nii.gz": "1e400"}
    labels = labels.with_columns(pl.col("VolumeName").replace_strict(bad, default=pl.col(col)).alias(col))
    labels.write_csv(csv / "labels.csv")
    lines = {name: i + 2 for i, name in enumerate(labels["VolumeName"])}
    reports = pl.read_csv(csv / "reports.csv", infer_schema=False)
    long = "The liver is normal. " * 8000  # 168 kB
    reports.with_columns(pl.when(pl.col("VolumeName") == "train_7_a_1.nii.gz").then(pl.lit(long))
                         .otherwise(pl.col("Findings_EN")).alias("Findings_EN")).write_csv(csv / "reports.csv")
    man, gt, exc = ctrate.ingest(root, csv / "metadata.csv", csv / "reports.csv", csv / "labels.csv")
    assert long.strip() in man.filter(pl.col("case_id") == "train_7_a_1")["report_text"].item()
    for name, value in bad.items():
        case = name.removesuffix(".nii.gz")
        assert case in set(man["case_id"]) and case not in set(gt["case_id"])
        reason = exc.filter((pl.col("case_id") == case) & (pl.col("stage") == schema.GROUND_TRUTH))["reason"].item()
        assert f"labels.csv line {lines[name]}" in reason and repr(col) in reason and repr(value) in reason
    assert set(gt["label"].unique()) <= {0, 1}
