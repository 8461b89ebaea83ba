"""CT-RATE: volumes in its folder layout plus its metadata, reports and label CSVs."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from .. import catalog
from ..imaging.io import header_info
from .labels import ground_truth, label_columns
from .schema import EXCLUSIONS_SCHEMA, GROUND_TRUTH_SCHEMA, INGEST, MANIFEST_SCHEMA, empty, frame
from .splits import split_groups
from .tables import (
    ROW_ERROR,
    ROW_NOTE,
    number,
    numbers,
    read_table,
    strip_image_suffix,
    text,
)

CTRATE_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")


def ingest(volumes_root, metadata_csv, reports_csv, labels_csv=None, split: str | None = None,
           one_recon_per_scan: bool = True, val_fraction: float = 0.1, seed: int = 0,
           source: str = "ctrate", fallback_encoding: str | None = None):
    """Manifest, ground truth and exclusions for CT-RATE.

    volumes_root: folder searched recursively for ``{split}_{patient}_{scan}_{recon}.nii.gz``
        (CT-RATE's ``train/train_1/train_1_a/train_1_a_1.nii.gz`` layout, or flat).
    metadata_csv, reports_csv, labels_csv: CT-RATE's CSVs (a path or a list of paths, e.g. the
        train and validation files together). Metadata: VolumeName, XYSpacing ("[0.75, 0.75]",
        DICOM PixelSpacing order: row spacing = y, column spacing = x), ZSpacing, RescaleSlope,
        RescaleIntercept. Reports: VolumeName, Findings_EN, Impressions_EN (report_text is
        "FINDINGS:\\n<findings>\\n\\nIMPRESSION:\\n<impressions>"). Labels: VolumeName plus the 18
        columns named as the ``name`` fields of ``catalog.diseases("ctrate")``.
    split: "train" or "valid" to ingest only that CT-RATE split, None for both. CT-RATE "valid"
        becomes the manifest's "test"; CT-RATE "train" is split into "train"/"val" by patient
        (``split_groups`` with ``(1 - val_fraction, val_fraction, 0)`` and ``seed``), so a
        patient's scans never straddle train and val.
    one_recon_per_scan: keep only the lowest-numbered usable reconstruction of each
        (patient, scan); the others are listed in the exclusions.

    Spacing comes from the metadata CSV (CT-RATE's NIfTI headers are not to be trusted for it),
    shape from the NIfTI header. A CSV row whose bytes are not UTF-8 excludes its case with the
    reason (``fallback_encoding``: decode it with that instead, noted in ``ingest_note``).
    Returns ``(manifest, ground_truth (empty without labels_csv), exclusions)``.
    """
    if split not in (None, "train", "valid"):
        raise ValueError(f"CT-RATE split must be 'train', 'valid' or None, not {split!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    root = Path(volumes_root)
    if not root.is_dir():
        raise FileNotFoundError(f"CT-RATE volumes folder not found: {root}")
    wanted = ("train", "valid") if split is None else (split,)
    excl: list[dict] = []

    # volumes
    volumes: dict[str, Path] = {}
    for p in sorted(root.rglob("*.nii*")):
        if not p.name.endswith((".nii.gz", ".nii")) or not p.is_file():
            continue
        cid = strip_image_suffix(p.name)
        m = CTRATE_NAME.match(cid)
        if m is None:
            excl.append({"case_id": cid, "stage": INGEST,
                         "reason": f"file name not in CT-RATE form <split>_<patient>_<scan>_<recon>.nii.gz: {p}"})
            continue
        if m.group(1) not in wanted:
            continue
        if cid in volumes:
            excl.append({"case_id": cid, "stage": INGEST,
                         "reason": f"duplicate volume file {p} (kept {volumes[cid]})"})
            continue
        volumes[cid] = p

    def _rows_by_name(df: pl.DataFrame, what: str, cols: list[str]) -> dict[str, dict]:
        lacking = [c for c in ["VolumeName", *cols] if c not in df.columns]
        if lacking:
            raise ValueError(f"CT-RATE {what} CSV lacks columns: {', '.join(lacking)}")
        out = {}
        for r in df.iter_rows(named=True):
            cid = strip_image_suffix(text(r["VolumeName"]))
            m = CTRATE_NAME.match(cid)
            if m is None or m.group(1) not in wanted:
                continue
            out.setdefault(cid, r)
        return out

    meta = _rows_by_name(read_table(metadata_csv, fallback_encoding), "metadata", ["XYSpacing", "ZSpacing"])
    reports = _rows_by_name(read_table(reports_csv, fallback_encoding), "reports", ["Findings_EN", "Impressions_EN"])

    for cid in sorted(set(reports) - set(volumes)):
        excl.append({"case_id": cid, "stage": INGEST, "reason": "report without volume file"})

    usable: dict[str, dict] = {}
    for cid, path in volumes.items():
        if cid not in reports:
            excl.append({"case_id": cid, "stage": INGEST, "reason": f"volume without report: {path}"})
            continue
        bad = [f"{what} CSV: {rows[cid][ROW_ERROR]}" for what, rows in (("reports", reports), ("metadata", meta))
               if cid in rows and rows[cid][ROW_ERROR]]
        if bad:
            excl.append({"case_id": cid, "stage": INGEST, "reason": "; ".join(bad)})
            continue
        findings = text(reports[cid]["Findings_EN"])
        impressions = text(reports[cid]["Impressions_EN"])
        if not findings and not impressions:
            excl.append({"case_id": cid, "stage": INGEST,
                         "reason": "empty report (no Findings_EN, no Impressions_EN)"})
            continue
        if cid not in meta:
            excl.append({"case_id": cid, "stage": INGEST, "reason": "no metadata row (spacing unknown)"})
            continue
        xy = numbers(meta[cid]["XYSpacing"])
        z = number(meta[cid]["ZSpacing"])
        if len(xy) != 2 or z is None or min(xy + [z]) <= 0:
            excl.append({"case_id": cid, "stage": INGEST,
                         "reason": f"unreadable spacing in metadata: XYSpacing={meta[cid]['XYSpacing']!r}, "
                                   f"ZSpacing={meta[cid]['ZSpacing']!r}"})
            continue
        try:
            _, shape = header_info(path)
        except Exception as e:  # noqa: BLE001 - any unreadable header is an exclusion, not a crash
            excl.append({"case_id": cid, "stage": INGEST, "reason": f"unreadable NIfTI header: {e}"})
            continue
        usable[cid] = {
            "case_id": cid, "image_path": str(path), "mask_path": None,
            "report_text": f"FINDINGS:\n{findings}\n\nIMPRESSION:\n{impressions}", "source": source,
            "spacing_x": xy[1], "spacing_y": xy[0], "spacing_z": z,
            "shape_x": shape[0], "shape_y": shape[1], "shape_z": shape[2],
            "rescale_slope": number(meta[cid].get("RescaleSlope")),
            "rescale_intercept": number(meta[cid].get("RescaleIntercept")),
            "source_id": cid,
            "ingest_note": "; ".join(f"{what} CSV: {rows[cid][ROW_NOTE]}" for what, rows
                                     in (("reports", reports), ("metadata", meta)) if rows[cid][ROW_NOTE]) or None,
        }

    # one reconstruction per scan
    parsed = {cid: CTRATE_NAME.match(cid).groups() for cid in usable}
    if one_recon_per_scan:
        kept: dict[tuple, str] = {}
        for cid in sorted(usable, key=lambda c: (parsed[c][:3], int(parsed[c][3]))):
            key = parsed[cid][:3]
            if key in kept:
                excl.append({"case_id": cid, "stage": INGEST,
                             "reason": "one_recon_per_scan: another reconstruction of this scan "
                                       f"is kept ({kept[key]})"})
            else:
                kept[key] = cid
        usable = {cid: usable[cid] for cid in kept.values()}

    # splits: CT-RATE valid -> test; CT-RATE train -> train/val by patient
    patients = {cid: f"{parsed[cid][0]}_{parsed[cid][1]}" for cid in usable}
    train_split = split_groups([p for c, p in patients.items() if parsed[c][0] == "train"],
                               (1.0 - val_fraction, val_fraction, 0.0), seed)
    rows = []
    for cid in sorted(usable):
        row = usable[cid]
        row["split"] = "test" if parsed[cid][0] == "valid" else train_split[patients[cid]]
        rows.append(row)
    manifest = frame(rows, MANIFEST_SCHEMA).select(list(MANIFEST_SCHEMA))

    truth = empty(GROUND_TRUTH_SCHEMA)
    if labels_csv is not None:
        labels = read_table(labels_csv, fallback_encoding)
        if "VolumeName" not in labels.columns:
            raise ValueError("CT-RATE labels CSV lacks column VolumeName")
        names = [d.name for d in catalog.diseases("ctrate")]
        lacking = [n for n in names if n not in labels.columns]
        if lacking:
            raise ValueError(f"CT-RATE labels CSV lacks label columns: {', '.join(lacking)}")
        truth = ground_truth(labels, "VolumeName", {c: c for c in manifest["case_id"]},
                              label_columns(names, labels.columns, "ctrate"), excl)
    return manifest, truth, frame(excl, EXCLUSIONS_SCHEMA)
