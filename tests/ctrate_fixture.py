"""A CT-RATE-shaped download, built from real data in ../shared: CT-RATE's folder tree, file names
and CSV columns, real CT volumes and real CT-RATE report texts with their manual labels.

What is real and what is made for the test:
- Chest volumes: pyradiomics' lung1 chest CT (512x512x48, 0.57x0.57x5 mm), shrunk 4x in-plane
  (128x128x48 at 2.28 mm) so that a workflow run stays small; odd copies are flipped left-right and
  every copy gets its own Gaussian noise (sd 10 HU), so no two volumes are identical. Abdomen
  volumes: TotalSegmentator's example_ct_sm (30 slices at 3 mm) as it is.
- Segmentations (``segment.backend: precomputed``): the abdomen CT's is TotalSegmentator's own
  reference output. lung1 has none, so its lungs are segmented here by thresholding (air below
  -400 HU inside the body, the largest connected component), written as TotalSegmentator v2's lung
  lobe classes (left and right of the mid-line). lung1 covers only 240 mm, so its lungs touch the
  first and last slice; the mask leaves those two slices out so that the lungs count as complete
  (a CT-RATE scan covers the whole thorax) and the lung diseases are evaluable.
- Reports and labels: the real CT-RATE reports and hand labels of
  ``data/real_reports/ctrate_manual_labels_val200.csv``. CT-RATE splits a report into
  Findings_EN and Impressions_EN; these texts come whole, so the part before the first quotation
  mark is used as findings and the rest as the impression.
- Metadata: CT-RATE's columns (spacing as "[row, column]" strings, RescaleSlope/Intercept of
  1/-1024 for volumes that already hold HU, as CT-RATE's do) with the volumes' true spacing.
- Problems a real download has, each to be recorded as an exclusion: a second reconstruction of a
  scan, a volume without a report, a report without a volume, a volume without a metadata row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import SimpleITK as sitk
from scipy import ndimage

from conftest import PYRAD, SHARED, TS

REPORTS = SHARED / "data" / "real_reports" / "ctrate_manual_labels_val200.csv"
LUNG_CLASSES = ("lung_upper_lobe_left", "lung_upper_lobe_right")  # TotalSegmentator v2 names

# split -> patients; every patient has scan "a", reconstruction 1 (the chest CT unless named below)
TRAIN_PATIENTS, VALID_PATIENTS = 12, 6
ABDOMEN = {"train_12_a_1", "valid_6_a_1"}  # TotalSegmentator's abdomen CT: no complete lung or heart
SECOND_RECON = "train_1_a_2"  # excluded: one_recon_per_scan keeps train_1_a_1
NO_REPORT = "train_13_a_1"  # a volume whose report row is missing
NO_VOLUME = "train_14_a_1"  # a report whose volume is missing
NO_METADATA = "valid_7_a_1"  # a volume without a metadata row
EXCLUDED = {SECOND_RECON: "one_recon_per_scan", NO_REPORT: "volume without report",
            NO_VOLUME: "report without volume", NO_METADATA: "no metadata row"}


def available() -> str | None:
    """Why the fixture cannot be built here, or None."""
    for path in (PYRAD / "lung1_image.nrrd", TS / "example_ct_sm.nii.gz", TS / "example_seg.nii.gz", REPORTS):
        if not path.is_file():
            return f"shared data not found: {path} (../shared sits beside the repo in CI)"
    return None


def volume_path(root: Path, name: str) -> Path:
    split, patient, scan, _ = name.split("_")
    return root / "dataset" / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / f"{name}.nii.gz"


def _chest() -> tuple[sitk.Image, sitk.Image]:
    """lung1 shrunk 4x in-plane, and its thresholded lung mask as TotalSegmentator v2 class ids."""
    from ctvlp import catalog

    image = sitk.BinShrink(sitk.ReadImage(str(PYRAD / "lung1_image.nrrd")), [4, 4, 1])
    hu = sitk.GetArrayFromImage(image)  # z, y, x
    labelled, _ = ndimage.label(hu < -400)
    outside = np.unique(np.concatenate([labelled[:, [0, -1], :].ravel(), labelled[:, :, [0, -1]].ravel()]))
    sizes = np.bincount(labelled.ravel())
    sizes[outside] = 0  # air outside the body touches the in-plane border
    lung = labelled == int(np.argmax(sizes))
    lung[[0, -1]] = False
    mask = np.zeros(hu.shape, np.uint8)
    half = hu.shape[2] // 2
    left, right = (catalog.class_id(c, "v2") for c in LUNG_CLASSES)
    mask[:, :, half:][lung[:, :, half:]] = left  # LPS: x grows towards the patient's left
    mask[:, :, :half][lung[:, :, :half]] = right
    seg = sitk.GetImageFromArray(mask)
    seg.CopyInformation(image)
    return sitk.Cast(image, sitk.sitkInt16), seg


def _copy(image: sitk.Image, seg: sitk.Image, flip: bool, rng) -> tuple[sitk.Image, sitk.Image]:
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    hu = np.clip(np.rint(hu + rng.normal(0, 10, hu.shape)), -1024, 3071).astype(np.int16)
    lab = sitk.GetArrayFromImage(seg)
    if flip:
        hu, lab = hu[:, :, ::-1].copy(), lab[:, :, ::-1].copy()
    out_image, out_seg = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(lab)
    out_image.CopyInformation(image)
    out_seg.CopyInformation(seg)
    return out_image, out_seg


def _split_report(text: str) -> tuple[str, str]:
    findings, _, impression = text.partition('"')
    return findings.strip(), impression.replace('"', " ").strip()


def build(root: Path, seg_dir: Path, seed: int = 0) -> dict:
    """Write the CT-RATE-shaped download into ``root`` (``root/dataset/...``) and the precomputed
    segmentations into ``seg_dir/<case_id>.nii.gz``. Returns what was written: the volume names
    per split and the label table of the kept volumes."""
    from ctvlp import catalog

    rng = np.random.default_rng(seed)
    chest, chest_seg = _chest()
    abdomen = sitk.ReadImage(str(TS / "example_ct_sm.nii.gz"), sitk.sitkInt16)
    abdomen_seg = sitk.ReadImage(str(TS / "example_seg.nii.gz"))
    names = ([f"train_{p}_a_1" for p in range(1, TRAIN_PATIENTS + 1)] + [SECOND_RECON, NO_REPORT]
             + [f"valid_{p}_a_1" for p in range(1, VALID_PATIENTS + 1)] + [NO_METADATA])
    seg_dir.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    for i, name in enumerate(names):
        image, seg = (abdomen, abdomen_seg) if name in ABDOMEN else _copy(chest, chest_seg, i % 2 == 1, rng)
        path = volume_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
        sitk.WriteImage(seg, str(seg_dir / f"{name}.nii.gz"), useCompression=True)
        sx, sy, sz = image.GetSpacing()
        if name != NO_METADATA:
            meta_rows.append({"VolumeName": f"{name}.nii.gz", "Manufacturer": "SIEMENS",
                              "SeriesDescription": "THORAX 1.0", "XYSpacing": f"[{sy}, {sx}]", "ZSpacing": str(sz),
                              "RescaleIntercept": "-1024.0", "RescaleSlope": "1.0",
                              "Rows": str(image.GetSize()[1]), "Columns": str(image.GetSize()[0]),
                              "NumberofSlices": str(image.GetSize()[2])})

    # reports: the valid (test) volumes get lung-nodule-positive and -negative reports alternately
    labels = catalog.diseases("ctrate")
    table = pl.read_csv(REPORTS)
    positive = table.filter(pl.col("Lung nodule") == 1).to_dicts()
    negative = table.filter(pl.col("Lung nodule") == 0).to_dicts()
    reported = [n for n in names if n != NO_REPORT] + [NO_VOLUME]
    valid = [n for n in reported if n.startswith("valid")]
    chosen = {n: (positive if k % 2 == 0 else negative).pop(0) for k, n in enumerate(valid)}
    rest = positive + negative
    chosen |= {n: rest.pop(0) for n in reported if n not in chosen}
    reports, label_rows = [], []
    for name in reported:
        findings, impression = _split_report(chosen[name]["report_text"])
        reports.append({"VolumeName": f"{name}.nii.gz", "ClinicalInformation_EN": "Not given.",
                        "Technique_EN": "Non-contrast chest CT.", "Findings_EN": findings,
                        "Impressions_EN": impression})
        label_rows.append({"VolumeName": f"{name}.nii.gz", **{d.name: int(chosen[name][d.name]) for d in labels}})

    def write(frame_rows: list[dict], folder: str, split_file: dict[str, str]):
        frame = pl.DataFrame(frame_rows)
        out = root / "dataset" / folder
        out.mkdir(parents=True, exist_ok=True)
        for split, file in split_file.items():
            frame.filter(pl.col("VolumeName").str.starts_with(split)).write_csv(out / file)

    write(meta_rows, "metadata", {"train": "train_metadata.csv", "valid": "validation_metadata.csv"})
    write(reports, "radiology_text_reports", {"train": "train_reports.csv", "valid": "validation_reports.csv"})
    write(label_rows, "multi_abnormality_labels",
          {"train": "train_predicted_labels.csv", "valid": "valid_predicted_labels.csv"})
    return {"volumes": names, "labels": pl.DataFrame(label_rows)}
