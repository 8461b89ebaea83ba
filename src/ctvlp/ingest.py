"""Real-data ingestion: build ctvlp's manifest (and ground truth) from CT-RATE or a generic table.

Every function returns three tables, ``(manifest, ground_truth, exclusions)``:

manifest (``MANIFEST_SCHEMA``), one row per case, the same columns for every source
    case_id, split ("train"/"val"/"test"), image_path (a file or a DICOM series folder),
    mask_path (null for real data), report_text, source, spacing_x/y/z (mm), shape_x/y/z,
    rescale_slope, rescale_intercept (CT-RATE's metadata; null for other sources), source_id (the
    id as the source gave it), ingest_note. The demo cohort's manifest has the same columns.
    Case ids are always safe folder names (``workspace.case_id_problem``).
ground truth (``GROUND_TRUTH_SCHEMA``), long: case_id, disease_id, anatomy, label (int8)
exclusions (``EXCLUSIONS_SCHEMA``): case_id, stage, reason
    Nothing is dropped silently. stage "ingest": the case is NOT in the manifest (volume without
    report, report without volume, no metadata row, unreadable header, missing file, empty report,
    duplicate id, another reconstruction of the same CT-RATE scan). stage "ground_truth": the case IS
    in the manifest but has no (or incomplete) labels.

``write(manifest, ground_truth, exclusions, out_dir)`` writes manifest.parquet,
ground_truth.parquet (empty when the source has no labels) and exclusions.parquet.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import polars as pl
import SimpleITK as sitk

from . import catalog, workspace

MANIFEST_SCHEMA = {
    "case_id": pl.Utf8, "split": pl.Utf8, "image_path": pl.Utf8, "mask_path": pl.Utf8,
    "report_text": pl.Utf8, "source": pl.Utf8,
    "spacing_x": pl.Float64, "spacing_y": pl.Float64, "spacing_z": pl.Float64,
    "shape_x": pl.Int64, "shape_y": pl.Int64, "shape_z": pl.Int64,
    "rescale_slope": pl.Float64, "rescale_intercept": pl.Float64,
    "source_id": pl.Utf8,  # the id as the source gave it (differs from case_id only under cohort.unsafe_ids: slug)
    "ingest_note": pl.Utf8,  # what ingest changed on the way in (id mapped, report decoded with a fallback), or null
}
GROUND_TRUTH_SCHEMA = {"case_id": pl.Utf8, "disease_id": pl.Utf8, "anatomy": pl.Utf8, "label": pl.Int8}
EXCLUSIONS_SCHEMA = {"case_id": pl.Utf8, "stage": pl.Utf8, "reason": pl.Utf8}
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

CTRATE_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


# ---------------------------------------------------------------------------------------------
# helpers


def _strip_image_suffix(name: str) -> str:
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def _frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema) if rows else _empty(schema)


def _text(v) -> str:
    return "" if v is None else str(v).strip()


ROW_ERROR = "_ctvlp_row_error"  # why a table row cannot be used (e.g. bytes that are not UTF-8), else null
ROW_NOTE = "_ctvlp_row_note"  # how a row was decoded when the fallback encoding was needed, else null
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that failed UTF-8, kept by surrogateescape


def _decode_cells(cells: list[str], header: list[str], fallback: str | None) -> tuple[list, str | None, str | None]:
    """One CSV row decoded with surrogateescape: -> (cells or None for empty, error, note)."""
    out, notes = [], []
    for col, cell in zip(header, cells):
        bad = _UNDECODABLE.search(cell)
        if bad:
            raw = cell.encode("utf-8", "surrogateescape")
            if fallback is None:
                byte = ord(bad.group(0)) - 0xDC00
                return [], (f"column {col!r} is not valid UTF-8 (byte 0x{byte:02x}); set "
                            "cohort.text_fallback_encoding (e.g. cp1252) to decode such rows with it"), None
            try:
                cell = raw.decode(fallback)
            except UnicodeDecodeError as e:
                return [], f"column {col!r} is neither UTF-8 nor {fallback}: {e.reason}", None
            notes.append(f"column {col!r} decoded as {fallback} (not UTF-8)")
        out.append(cell if cell != "" else None)
    return out, None, "; ".join(notes) or None


def _read_table(paths, fallback_encoding: str | None = None) -> pl.DataFrame:
    """CSV/TSV (all columns as strings) or Parquet; a list of paths is concatenated.

    CSV bytes are decoded row by row: a row with bytes that are not UTF-8 is kept with the reason
    in column ``ROW_ERROR`` (the caller excludes that case, naming the row and column), or, with
    ``fallback_encoding``, decoded with it and noted in ``ROW_NOTE``. One bad byte never stops
    the whole table.
    """
    if isinstance(paths, (list, tuple)):
        return pl.concat([_read_table(p, fallback_encoding) for p in paths], how="diagonal_relaxed")
    path = Path(paths)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):  # Parquet strings are UTF-8 by the format
        return pl.read_parquet(path).with_columns(pl.lit(None, pl.Utf8).alias(ROW_ERROR),
                                                  pl.lit(None, pl.Utf8).alias(ROW_NOTE))
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    records = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header = next(records, None)
    if not header:
        raise ValueError(f"{path}: empty table (no header row)")
    if any(_UNDECODABLE.search(h) for h in header):
        raise ValueError(f"{path}: the header row is not valid UTF-8")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header")
    columns: list[list] = [[] for _ in header]
    errors, notes = [], []
    for line, cells in enumerate(records, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            values, error, note = [], f"row (line {line}) has {len(cells)} fields, the header {len(header)}", None
        else:
            values, error, note = _decode_cells(cells, header, fallback_encoding)
        if error:  # keep what identifies the row (id columns), blank the rest
            values = [c if c and not _UNDECODABLE.search(c) else None for c in cells[:len(header)]]
            values += [None] * (len(header) - len(values))
        for col, v in zip(columns, values):
            col.append(v)
        errors.append(error)
        notes.append(note)
    df = pl.DataFrame({h: pl.Series(h, c, dtype=pl.Utf8) for h, c in zip(header, columns)})
    return df.with_columns(pl.Series(ROW_ERROR, errors, dtype=pl.Utf8), pl.Series(ROW_NOTE, notes, dtype=pl.Utf8))


def _float(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = _FLOAT.findall(str(v))
    return float(m[0]) if len(m) == 1 else None


def header_info(path: str | Path) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """(spacing, size) of an image file or DICOM series folder, read from headers only.

    For a DICOM folder the slices are ordered as SimpleITK's series reader orders them; the slice
    spacing is the distance between the first and last slice positions over (n - 1), as ITK does.
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    if path.is_dir():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise ValueError("folder holds no DICOM series")
        if len(ids) > 1:
            raise ValueError(f"folder holds {len(ids)} DICOM series; give one series per folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        sx, sy = reader.GetSpacing()[:2]
        nx, ny = reader.GetSize()[:2]
        first = reader.GetOrigin()
        if len(files) > 1:
            reader.SetFileName(files[-1])
            reader.ReadImageInformation()
            last = reader.GetOrigin()
            sz = sum((a - b) ** 2 for a, b in zip(first, last)) ** 0.5 / (len(files) - 1)
        else:
            sz = reader.GetSpacing()[2] if reader.GetDimension() > 2 else 1.0
        return (float(sx), float(sy), float(sz)), (int(nx), int(ny), len(files))
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"image has {reader.GetDimension()} dimensions, expected 3")
    return tuple(float(s) for s in reader.GetSpacing()), tuple(int(n) for n in reader.GetSize())


def _rank(keys, seed: int) -> list:
    """Keys in a deterministic pseudo-random order that depends only on (seed, key)."""
    return sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def split_groups(groups, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict:
    """Assign each group (patient) to train/val/test: groups ranked by a hash of (seed, group);
    the first round(f_val * n) go to val, the next round(f_test * n) to test, the rest to train.
    A non-zero fraction gets at least one group when there are enough groups to keep one in train."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, not {fractions}")
    total = float(sum(fractions))
    f_val, f_test = fractions[1] / total, fractions[2] / total
    order = _rank(groups, seed)
    n = len(order)
    n_val, n_test = round(f_val * n), round(f_test * n)
    if f_val > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if f_test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    out = {}
    for i, g in enumerate(order):
        out[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def _ground_truth(labels: pl.DataFrame, key_col: str, key_to_case: dict, columns: dict,
                  excl: list[dict]) -> pl.DataFrame:
    """Long ground truth from a wide label table. ``columns``: label column -> Disease."""
    rows, seen = [], set()
    for r in labels.iter_rows(named=True):
        case_id = key_to_case.get(_strip_image_suffix(_text(r[key_col])))
        if case_id is None or case_id in seen:
            continue
        seen.add(case_id)
        missing = []
        for col, d in columns.items():
            v = _float(r[col])
            if v is None:
                missing.append(col)
                continue
            rows.append({"case_id": case_id, "disease_id": d.id, "anatomy": d.anatomy, "label": int(v)})
        if missing:
            excl.append({"case_id": case_id, "stage": "ground_truth",
                         "reason": f"label missing or unreadable for: {', '.join(missing)}"})
    for case_id in sorted(set(key_to_case.values()) - seen):
        excl.append({"case_id": case_id, "stage": "ground_truth",
                     "reason": "no row in the labels table; case kept without ground truth"})
    return _frame(rows, GROUND_TRUTH_SCHEMA).sort(["case_id", "disease_id"])


def _label_columns(label_cols, available, disease_catalog: str) -> dict:
    """Label column -> Disease; columns are matched to catalog diseases by id or by name."""
    diseases = catalog.diseases(disease_catalog)
    by_key = {d.id: d for d in diseases} | {d.name: d for d in diseases} | {d.name.lower(): d for d in diseases}
    if isinstance(label_cols, dict):
        pairs = list(label_cols.items())
    else:
        pairs = [(c, c) for c in label_cols]
    out = {}
    for col, key in pairs:
        if col not in available:
            raise ValueError(f"label column {col!r} not in the table")
        d = by_key.get(key) or by_key.get(str(key).lower())
        if d is None:
            raise ValueError(f"label column {col!r} is neither a disease id nor a disease name of "
                             f"catalog {disease_catalog!r}")
        out[col] = d
    return out


# ---------------------------------------------------------------------------------------------
# CT-RATE


def ctrate(volumes_root, metadata_csv, reports_csv, labels_csv=None, split: str | None = None,
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
        cid = _strip_image_suffix(p.name)
        m = CTRATE_NAME.match(cid)
        if m is None:
            excl.append({"case_id": cid, "stage": "ingest",
                         "reason": f"file name not in CT-RATE form <split>_<patient>_<scan>_<recon>.nii.gz: {p}"})
            continue
        if m.group(1) not in wanted:
            continue
        if cid in volumes:
            excl.append({"case_id": cid, "stage": "ingest",
                         "reason": f"duplicate volume file {p} (kept {volumes[cid]})"})
            continue
        volumes[cid] = p

    def _rows_by_name(df: pl.DataFrame, what: str, cols: list[str]) -> dict[str, dict]:
        lacking = [c for c in ["VolumeName", *cols] if c not in df.columns]
        if lacking:
            raise ValueError(f"CT-RATE {what} CSV lacks columns: {', '.join(lacking)}")
        out = {}
        for r in df.iter_rows(named=True):
            cid = _strip_image_suffix(_text(r["VolumeName"]))
            m = CTRATE_NAME.match(cid)
            if m is None or m.group(1) not in wanted:
                continue
            out.setdefault(cid, r)
        return out

    meta = _rows_by_name(_read_table(metadata_csv, fallback_encoding), "metadata", ["XYSpacing", "ZSpacing"])
    reports = _rows_by_name(_read_table(reports_csv, fallback_encoding), "reports", ["Findings_EN", "Impressions_EN"])

    for cid in sorted(set(reports) - set(volumes)):
        excl.append({"case_id": cid, "stage": "ingest", "reason": "report without volume file"})

    usable: dict[str, dict] = {}
    for cid, path in volumes.items():
        if cid not in reports:
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"volume without report: {path}"})
            continue
        bad = [f"{what} CSV: {rows[cid][ROW_ERROR]}" for what, rows in (("reports", reports), ("metadata", meta))
               if cid in rows and rows[cid][ROW_ERROR]]
        if bad:
            excl.append({"case_id": cid, "stage": "ingest", "reason": "; ".join(bad)})
            continue
        findings = _text(reports[cid]["Findings_EN"])
        impressions = _text(reports[cid]["Impressions_EN"])
        if not findings and not impressions:
            excl.append({"case_id": cid, "stage": "ingest",
                         "reason": "empty report (no Findings_EN, no Impressions_EN)"})
            continue
        if cid not in meta:
            excl.append({"case_id": cid, "stage": "ingest", "reason": "no metadata row (spacing unknown)"})
            continue
        xy = [float(v) for v in _FLOAT.findall(_text(meta[cid]["XYSpacing"]))]
        z = _float(meta[cid]["ZSpacing"])
        if len(xy) != 2 or z is None or min(xy + [z]) <= 0:
            excl.append({"case_id": cid, "stage": "ingest",
                         "reason": f"unreadable spacing in metadata: XYSpacing={meta[cid]['XYSpacing']!r}, "
                                   f"ZSpacing={meta[cid]['ZSpacing']!r}"})
            continue
        try:
            _, shape = header_info(path)
        except Exception as e:  # noqa: BLE001 - any unreadable header is an exclusion, not a crash
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"unreadable NIfTI header: {e}"})
            continue
        usable[cid] = {
            "case_id": cid, "image_path": str(path), "mask_path": None,
            "report_text": f"FINDINGS:\n{findings}\n\nIMPRESSION:\n{impressions}", "source": source,
            "spacing_x": xy[1], "spacing_y": xy[0], "spacing_z": z,
            "shape_x": shape[0], "shape_y": shape[1], "shape_z": shape[2],
            "rescale_slope": _float(meta[cid].get("RescaleSlope")),
            "rescale_intercept": _float(meta[cid].get("RescaleIntercept")),
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
                excl.append({"case_id": cid, "stage": "ingest",
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
    manifest = _frame(rows, MANIFEST_SCHEMA).select(list(MANIFEST_SCHEMA))

    truth = _empty(GROUND_TRUTH_SCHEMA)
    if labels_csv is not None:
        labels = _read_table(labels_csv, fallback_encoding)
        if "VolumeName" not in labels.columns:
            raise ValueError("CT-RATE labels CSV lacks column VolumeName")
        names = [d.name for d in catalog.diseases("ctrate")]
        lacking = [n for n in names if n not in labels.columns]
        if lacking:
            raise ValueError(f"CT-RATE labels CSV lacks label columns: {', '.join(lacking)}")
        truth = _ground_truth(labels, "VolumeName", {c: c for c in manifest["case_id"]},
                              _label_columns(names, labels.columns, "ctrate"), excl)
    return manifest, truth, _exclusions(excl)


def _exclusions(rows: list[dict]) -> pl.DataFrame:
    return _frame(rows, EXCLUSIONS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# generic table


def _normalise_split(v) -> str | None:
    s = _text(v).lower()
    return {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
            "dev": "val", "test": "test", "testing": "test"}.get(s)


def table(path, image_col: str = "image", report_col: str = "report", id_col: str = "case_id",
          split_col: str | None = None, label_cols=None, split_fractions=(0.8, 0.1, 0.1), seed: int = 0,
          base_dir=None, patient_col: str | None = None, mask_col: str | None = None,
          disease_catalog: str = "ctrate", source: str | None = None, unsafe_ids: str = "exclude",
          fallback_encoding: str | None = None):
    """Manifest, ground truth and exclusions from a CSV/TSV/Parquet table of images and reports.

    image_col: path of a NIfTI/NRRD/MHA file or a DICOM series folder; relative paths resolve
        against ``base_dir`` (default: the table's folder). Spacing and shape come from the headers.
    id_col: case id column; when the table has no such column the id is the image's file (or
        folder) name without its extension.
    split_col: column with train/val/test (also train(ing)/valid(ation)/dev/test(ing)); without
        it cases are split by ``patient_col`` (or by case) with ``split_fractions`` and ``seed``.
    label_cols: list of label columns named by disease id or name of ``disease_catalog``, or a
        dict column -> disease id/name; values 0/1 (missing values go to the exclusions, stage
        "ground_truth"). Without label columns the ground truth is empty.
    mask_col: optional column of TotalSegmentator multilabel masks (manifest mask_path).
    unsafe_ids: an id that cannot be a folder name (``workspace.case_id_problem``) is excluded
        ("exclude") or mapped to a safe name recorded in ``source_id`` / ``ingest_note`` ("slug");
        ids that would share a folder are excluded either way.
    fallback_encoding: decode CSV rows that are not UTF-8 with it (else such a row is excluded).
    Missing or unreadable images, missing masks, empty reports and duplicate ids go to the
    exclusions (stage "ingest"). Returns ``(manifest, ground_truth, exclusions)``.
    """
    path = Path(path)
    df = _read_table(path, fallback_encoding)
    base = Path(base_dir) if base_dir is not None else path.resolve().parent
    source = source or path.stem
    for col, what in ((image_col, "image_col"), (report_col, "report_col"), (split_col, "split_col"),
                      (patient_col, "patient_col"), (mask_col, "mask_col")):
        if col is not None and col not in df.columns:
            raise ValueError(f"{path}: {what} {col!r} is not a column (columns: {', '.join(df.columns)})")

    def _resolve(v) -> Path | None:
        s = _text(v)
        if not s:
            return None
        p = Path(s).expanduser()
        return p if p.is_absolute() else base / p

    excl: list[dict] = []
    rows, groups, fixed_split, seen = [], {}, {}, set()
    label_of: dict[str, dict] = {}
    for i, r in enumerate(df.iter_rows(named=True)):
        img = _resolve(r[image_col])
        if id_col in df.columns and _text(r[id_col]):
            cid = _text(r[id_col])
        elif img is not None:
            cid = _strip_image_suffix(img.name)
        else:
            cid = f"row{i}"
        if r[ROW_ERROR]:
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"table row {i}: {r[ROW_ERROR]}"})
            continue
        if cid in seen:
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"duplicate case_id (row {i})"})
            continue
        seen.add(cid)
        if img is None:
            excl.append({"case_id": cid, "stage": "ingest", "reason": "no image path"})
            continue
        if not img.exists():
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"image not found: {img}"})
            continue
        report = _text(r[report_col])
        if not report:
            excl.append({"case_id": cid, "stage": "ingest", "reason": "empty report"})
            continue
        mask = None
        if mask_col is not None:
            mask = _resolve(r[mask_col])
            if mask is not None and not mask.exists():
                excl.append({"case_id": cid, "stage": "ingest", "reason": f"mask not found: {mask}"})
                continue
        try:
            spacing, shape = header_info(img)
        except Exception as e:  # noqa: BLE001
            excl.append({"case_id": cid, "stage": "ingest", "reason": f"unreadable image {img}: {e}"})
            continue
        if split_col is not None:
            s = _normalise_split(r[split_col])
            if s is None:
                excl.append({"case_id": cid, "stage": "ingest",
                             "reason": f"unknown split {r[split_col]!r} (use train/val/test)"})
                continue
            fixed_split[cid] = s
        groups[cid] = _text(r[patient_col]) if patient_col is not None and _text(r[patient_col]) else cid
        rows.append({"case_id": cid, "image_path": str(img), "mask_path": None if mask is None else str(mask),
                     "report_text": report, "source": source,
                     "spacing_x": spacing[0], "spacing_y": spacing[1], "spacing_z": spacing[2],
                     "shape_x": shape[0], "shape_y": shape[1], "shape_z": shape[2],
                     "rescale_slope": None, "rescale_intercept": None, "source_id": cid,
                     "ingest_note": r[ROW_NOTE]})
        label_of[cid] = r

    rows = _with_safe_ids(rows, unsafe_ids, excl)
    if split_col is None:
        by_group = split_groups([groups[row["source_id"]] for row in rows], split_fractions, seed)
        for row in rows:
            row["split"] = by_group[groups[row["source_id"]]]
    else:
        for row in rows:
            row["split"] = fixed_split[row["source_id"]]
    manifest = _frame(rows, MANIFEST_SCHEMA).select(list(MANIFEST_SCHEMA)).sort("case_id")

    truth = _empty(GROUND_TRUTH_SCHEMA)
    if label_cols:
        cols = _label_columns(label_cols, df.columns, disease_catalog)
        labels = pl.DataFrame({"__key": [row["case_id"] for row in rows],
                               **{c: [_text(label_of[row["source_id"]][c]) or None for row in rows] for c in cols}},
                              schema={"__key": pl.Utf8, **{c: pl.Utf8 for c in cols}})
        truth = _ground_truth(labels, "__key", {row["case_id"]: row["case_id"] for row in rows}, cols, excl)
    return manifest, truth, _exclusions(excl)


def _with_safe_ids(rows: list[dict], policy: str, excl: list[dict]) -> list[dict]:
    """Rows whose case id can name a folder: unsafe ids are excluded (or mapped, under policy
    "slug"); ids that would share a folder are all excluded. See ``workspace.case_folders``."""
    folders, excluded = workspace.case_folders([row["case_id"] for row in rows], policy)
    excl += [{"case_id": cid, "stage": "ingest", "reason": reason} for cid, reason in excluded.items()]
    kept = []
    for row in rows:
        folder = folders.get(row["case_id"])
        if folder is None:
            continue
        if folder != row["case_id"]:
            note = f"case id mapped from {ascii(row['case_id'])} (cohort.unsafe_ids: slug)"
            row = {**row, "case_id": folder, "ingest_note": "; ".join(filter(None, [note, row["ingest_note"]]))}
        kept.append(row)
    return kept


# ---------------------------------------------------------------------------------------------


def write(manifest: pl.DataFrame, ground_truth: pl.DataFrame | None, exclusions: pl.DataFrame | None,
          out_dir) -> dict[str, Path]:
    """Write manifest.parquet, ground_truth.parquet (empty when the source has no labels) and
    exclusions.parquet (possibly empty) into ``out_dir``; returns the paths written.

    Every case id of the manifest must be safe as a folder name (``workspace.case_id_problem``):
    later stages use it as one, and Snakemake deletes stale outputs at those paths.
    """
    unsafe = [(c, p) for c in manifest["case_id"] if (p := workspace.case_id_problem(c))]
    if unsafe:
        raise ValueError(f"manifest holds {len(unsafe)} case id(s) unsafe as folder names, e.g. {unsafe[0][1]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"manifest": out / "manifest.parquet", "exclusions": out / "exclusions.parquet",
             "ground_truth": out / "ground_truth.parquet"}
    manifest.write_parquet(paths["manifest"])
    (exclusions if exclusions is not None else _empty(EXCLUSIONS_SCHEMA)).write_parquet(paths["exclusions"])
    (ground_truth if ground_truth is not None else _empty(GROUND_TRUTH_SCHEMA)).write_parquet(paths["ground_truth"])
    return paths
