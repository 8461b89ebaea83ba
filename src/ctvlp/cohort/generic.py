"""A generic table of cases: one row per CT (image path, report, optional id, split, patient,
mask and label columns)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import polars as pl

from ..imaging.exclusion import CaseExcluded
from ..imaging.io import choose_series, header_info, series_header_info
from .ids import with_safe_ids
from .labels import ground_truth, label_columns
from .schema import EXCLUSIONS_SCHEMA, GROUND_TRUTH_SCHEMA, INGEST, MANIFEST_SCHEMA, empty, frame
from .splits import split_groups
from .tables import ROW_ERROR, ROW_NOTE, ROW_WHERE, read_table, strip_image_suffix, text


def _nfc(v) -> str:
    """A cell's text in Unicode NFC: "é" typed as one character or as e plus an accent is one id."""
    return unicodedata.normalize("NFC", text(v))


def _label_text(v) -> str | None:
    """A label cell as text (a Parquet boolean as 0/1), None when empty; checked by ``ground_truth``."""
    return str(int(v)) if isinstance(v, bool) else text(v) or None


def _normalise_split(v) -> str | None:
    s = text(v).lower()
    return {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
            "dev": "val", "test": "test", "testing": "test"}.get(s)


def ingest(path, image_col: str = "image", report_col: str = "report", id_col: str = "case_id",
          split_col: str | None = None, label_cols=None, split_fractions=(0.8, 0.1, 0.1), seed: int = 0,
          base_dir=None, patient_col: str | None = None, mask_col: str | None = None,
          disease_catalog: str = "ctrate", source: str | None = None, unsafe_ids: str = "exclude",
          fallback_encoding: str | None = None, series_col: str | None = None, min_slices: int | None = None):
    """Manifest, ground truth and exclusions from a CSV/TSV/Parquet table of images and reports.

    image_col: path of a NIfTI/NRRD/MHA file or a DICOM folder; relative paths resolve
        against ``base_dir`` (default: the table's folder). Spacing and shape come from the headers.
        A DICOM folder may hold a whole study (subfolders are searched): localizers, several
        reconstructions, dose reports. Its series is picked by ``imaging.io.choose_series``:
        the row's ``series_col`` value when given (a uid the folder does not hold is an
        exclusion), else the only series, else the CT series (Modality CT, not a secondary
        capture, ImageType without LOCALIZER) with the most slices among those with at least
        ``min_slices`` (preprocess.min_slices; None: no minimum) slices, a tie going to the lowest
        SeriesInstanceUID. The manifest records the chosen uid (``series_uid``) and, in
        ``ingest_note``, every series not chosen with its reason (and DICOM files without image
        data, e.g. dose or structured reports); a folder without a usable series is an exclusion
        listing each series' reason. Every later reader reads the recorded series.
    series_col: optional column of SeriesInstanceUIDs naming the series of a DICOM folder (empty
        cells: the rule above; ignored, with a note, for an image file).
    id_col: case id column; when the table has no such column the id is the image's file (or
        folder) name without its extension. A blank id in the column is an exclusion (never the
        file name). Ids (and patient ids) are NFC-normalised before duplicates are looked for, so
        one name typed in two Unicode forms is one case (the second row a duplicate).
    split_col: column with train/val/test (also train(ing)/valid(ation)/dev/test(ing)); without
        it cases are split by ``patient_col`` (or by case) with ``split_fractions`` and ``seed``.
    label_cols: list of label columns named by disease id or name of ``disease_catalog``, or a
        dict column -> disease id/name; values 0/1 (missing values go to the exclusions, stage
        "ground_truth"). Without label columns the ground truth is empty. A label cell must be 0,
        1 or empty (``labels.ground_truth``): another value leaves its case without ground truth,
        named by row, column and value; a column mostly of such values is refused.
    mask_col: optional column of TotalSegmentator multilabel masks (manifest mask_path).
    unsafe_ids: an id that cannot be a folder name (``workspace.case_id_problem``) is excluded
        ("exclude") or mapped to a safe name recorded in ``source_id`` / ``ingest_note`` ("slug");
        ids that would share a folder are excluded either way.
    fallback_encoding: decode CSV rows that are not UTF-8 with it (else such a row is excluded).
    Missing or unreadable images, missing masks, empty reports, blank and duplicate ids, and cells
    over ``tables.MAX_CELL_BYTES`` go to the exclusions (stage "ingest"), each naming its table
    row. Returns ``(manifest, ground_truth, exclusions)``.
    """
    path = Path(path)
    df = read_table(path, fallback_encoding)
    base = Path(base_dir) if base_dir is not None else path.resolve().parent
    source = source or path.stem
    for col, what in ((image_col, "image_col"), (report_col, "report_col"), (split_col, "split_col"),
                      (patient_col, "patient_col"), (mask_col, "mask_col"), (series_col, "series_col")):
        if col is not None and col not in df.columns:
            raise ValueError(f"{path}: {what} {col!r} is not a column (columns: {', '.join(df.columns)})")
    label_map = label_columns(label_cols, df.columns, disease_catalog) if label_cols else {}
    given = [c for c in df.columns if not c.startswith("_ctvlp_")]

    def _resolve(v) -> Path | None:
        s = text(v)
        if not s:
            return None
        p = Path(s).expanduser()
        return p if p.is_absolute() else base / p

    excl: list[dict] = []
    rows, groups, fixed_split, seen = [], {}, {}, {}
    label_of: dict[str, dict] = {}
    for i, r in enumerate(df.iter_rows(named=True)):
        where = r[ROW_WHERE]
        if not r[ROW_ERROR] and not any(text(r[c]) for c in given):
            continue  # a blank line of commas is not a case
        img = _resolve(r[image_col])
        if id_col in df.columns:
            cid = _nfc(r[id_col])
            if not cid:
                shown = f" (the image {img.name} does not name it)" if img is not None else ""
                excl.append({"case_id": f"<{where}>", "stage": INGEST,
                             "reason": f"{where}: blank case id in column {id_col!r}{shown}"})
                continue
        elif img is not None:
            cid = unicodedata.normalize("NFC", strip_image_suffix(img.name))
        else:
            cid = f"row{i + 1}"
        if r[ROW_ERROR]:
            excl.append({"case_id": cid, "stage": INGEST, "reason": f"{where}: {r[ROW_ERROR]}"})
            continue
        if cid in seen:
            first, raw = seen[cid]
            again = text(r[id_col]) if id_col in df.columns else cid
            how = " (the same after Unicode NFC normalisation)" if raw != again else ""
            excl.append({"case_id": cid, "stage": INGEST,
                         "reason": f"{where}: duplicate case_id{how}, first at {first}"})
            continue
        seen[cid] = (where, text(r[id_col]) if id_col in df.columns else cid)
        if img is None:
            excl.append({"case_id": cid, "stage": INGEST, "reason": "no image path"})
            continue
        if not img.exists():
            excl.append({"case_id": cid, "stage": INGEST, "reason": f"image not found: {img}"})
            continue
        report = text(r[report_col])
        if not report:
            excl.append({"case_id": cid, "stage": INGEST, "reason": "empty report"})
            continue
        mask = None
        if mask_col is not None:
            mask = _resolve(r[mask_col])
            if mask is not None and not mask.exists():
                excl.append({"case_id": cid, "stage": INGEST, "reason": f"mask not found: {mask}"})
                continue
        series_uid, notes = None, [r[ROW_NOTE]]
        wanted = text(r[series_col]) if series_col is not None else ""
        try:
            if img.is_dir():
                choice = choose_series(img, wanted or None, min_slices)
                series_uid = choice.uid
                notes.append(choice.note)
                spacing, shape = series_header_info(choice.files)
            else:
                if wanted:
                    notes.append(f"series_uid {wanted} ignored: the image is a file, not a DICOM folder")
                spacing, shape = header_info(img)
        except CaseExcluded as e:
            excl.append({"case_id": cid, "stage": INGEST, "reason": e.reason})
            continue
        except Exception as e:  # noqa: BLE001
            excl.append({"case_id": cid, "stage": INGEST, "reason": f"unreadable image {img}: {e}"})
            continue
        if split_col is not None:
            s = _normalise_split(r[split_col])
            if s is None:
                excl.append({"case_id": cid, "stage": INGEST,
                             "reason": f"unknown split {r[split_col]!r} (use train/val/test)"})
                continue
            fixed_split[cid] = s
        groups[cid] = _nfc(r[patient_col]) if patient_col is not None and text(r[patient_col]) else cid
        rows.append({"case_id": cid, "image_path": str(img), "mask_path": None if mask is None else str(mask),
                     "report_text": report, "source": source,
                     "spacing_x": spacing[0], "spacing_y": spacing[1], "spacing_z": spacing[2],
                     "shape_x": shape[0], "shape_y": shape[1], "shape_z": shape[2],
                     "rescale_slope": None, "rescale_intercept": None, "source_id": cid,
                     "ingest_note": "; ".join(filter(None, notes)) or None, "series_uid": series_uid})
        label_of[cid] = r

    rows = with_safe_ids(rows, unsafe_ids, excl)
    if split_col is None:
        by_group = split_groups([groups[row["source_id"]] for row in rows], split_fractions, seed)
        for row in rows:
            row["split"] = by_group[groups[row["source_id"]]]
    else:
        for row in rows:
            row["split"] = fixed_split[row["source_id"]]
    manifest = frame(rows, MANIFEST_SCHEMA).select(list(MANIFEST_SCHEMA)).sort("case_id")

    truth = empty(GROUND_TRUTH_SCHEMA)
    if label_map:
        cols = label_map
        labels = pl.DataFrame({"__key": [row["case_id"] for row in rows],
                               ROW_WHERE: [label_of[row["source_id"]][ROW_WHERE] for row in rows],
                               **{c: [_label_text(label_of[row["source_id"]][c]) for row in rows] for c in cols}},
                              schema={"__key": pl.Utf8, ROW_WHERE: pl.Utf8, **{c: pl.Utf8 for c in cols}})
        truth = ground_truth(labels, "__key", {row["case_id"]: row["case_id"] for row in rows}, cols, excl)
    return manifest, truth, frame(excl, EXCLUSIONS_SCHEMA)
