"""Reading the tables a cohort comes from: CSV/TSV (every cell a string, decoded row by row)
or Parquet, and reading values out of their cells.

A cell may hold up to ``MAX_CELL_BYTES`` (1 MiB: a long report is a few tens of kB); a row with a
larger cell is kept with the reason in ``ROW_ERROR``, so its case is excluded and the table goes
on. Every row carries where it came from (``ROW_WHERE``: "cases.csv line 7", "cases.parquet row
5") for the messages that name it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import polars as pl

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

ROW_ERROR = "_ctvlp_row_error"  # why a table row cannot be used (e.g. bytes that are not UTF-8), else null

ROW_NOTE = "_ctvlp_row_note"  # how a row was decoded when the fallback encoding was needed, else null

ROW_WHERE = "_ctvlp_row"  # the row's file and line (CSV) or row number (Parquet), for messages

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that failed UTF-8, kept by surrogateescape

MAX_CELL_BYTES = 1 << 20  # the largest cell (a report) a table may hold; a larger one excludes its row
_CSV_FIELD_LIMIT = 1 << 30  # what the csv module may read as one field (its default, 128 KiB, is too small)


def strip_image_suffix(name: str) -> str:
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def text(v) -> str:
    return "" if v is None else str(v).strip()


def number(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = _FLOAT.findall(str(v))
    return float(m[0]) if len(m) == 1 else None


def label_value(v) -> tuple[int | None, bool]:
    """A label cell as ``(0 or 1 or None for empty, valid)``: 0, 1 (also written 0.0, 1.0, or a
    boolean) or empty are valid; anything else (0.9, 2, -1, 300, 1e400, "yes") is not."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None, True
    if isinstance(v, bool):
        return int(v), True
    if isinstance(v, (int, float)):
        return (int(v), True) if v in (0, 1) else (None, False)
    s = str(v).strip()
    try:
        x = float(s) if _FLOAT.fullmatch(s) else None
    except (ValueError, OverflowError):
        x = None
    return (int(x), True) if x in (0.0, 1.0) else (None, False)


def numbers(v) -> list[float]:
    """Every number written in a cell ("[0.75, 0.75]" -> [0.75, 0.75])."""
    return [float(x) for x in _FLOAT.findall(text(v))]


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


def read_table(paths, fallback_encoding: str | None = None) -> pl.DataFrame:
    """CSV/TSV (all columns as strings) or Parquet; a list of paths is concatenated.

    CSV bytes are decoded row by row: a row with bytes that are not UTF-8 is kept with the reason
    in column ``ROW_ERROR`` (the caller excludes that case, naming the row and column), or, with
    ``fallback_encoding``, decoded with it and noted in ``ROW_NOTE``. One bad byte never stops
    the whole table.
    """
    if isinstance(paths, (list, tuple)):
        return pl.concat([read_table(p, fallback_encoding) for p in paths], how="diagonal_relaxed")
    path = Path(paths)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):  # Parquet strings are UTF-8 by the format
        df = pl.read_parquet(path)
        big = [pl.when(pl.col(c).str.len_bytes() > MAX_CELL_BYTES)
               .then(pl.lit(f"column {c!r} holds ") + pl.col(c).str.len_bytes().cast(pl.Utf8)
                     + pl.lit(f" bytes, more than the {MAX_CELL_BYTES >> 20} MiB a cell may hold"))
               for c, t in df.schema.items() if t == pl.Utf8]
        error = pl.coalesce(big) if big else pl.lit(None, pl.Utf8)
        return df.with_columns(error.cast(pl.Utf8).alias(ROW_ERROR), pl.lit(None, pl.Utf8).alias(ROW_NOTE),
                               (pl.lit(f"{path.name} row ") + pl.int_range(1, df.height + 1).cast(pl.Utf8))
                               .alias(ROW_WHERE))
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, _CSV_FIELD_LIMIT))  # cells over MAX_CELL_BYTES are refused below, by row
    try:
        return _read_csv(text, sep, path, fallback_encoding)
    finally:
        csv.field_size_limit(limit)


def _too_big(cells: list[str], header: list[str]) -> str | None:
    for col, cell in zip(header, cells):
        if len(cell) * 4 > MAX_CELL_BYTES and (size := len(cell.encode("utf-8", "surrogateescape"))) > MAX_CELL_BYTES:
            return (f"column {col!r} holds {size} bytes, more than the {MAX_CELL_BYTES >> 20} MiB a cell may hold "
                    "(a quote left open joins the rows after it into one cell)")
    return None


def _read_csv(text: str, sep: str, path: Path, fallback_encoding: str | None) -> pl.DataFrame:
    records = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header = next(records, None)
    if not header:
        raise ValueError(f"{path}: empty table (no header row)")
    if any(_UNDECODABLE.search(h) for h in header):
        raise ValueError(f"{path}: the header row is not valid UTF-8")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header")
    columns: list[list] = [[] for _ in header]
    errors, notes, where = [], [], []
    line = records.line_num + 1  # the line the next record starts on
    for cells in records:
        start, line = line, records.line_num + 1
        if not cells:
            continue
        if len(cells) != len(header):
            values, error, note = [], f"row (line {start}) has {len(cells)} fields, the header {len(header)}", None
        elif error := _too_big(cells, header):
            values, note = [], None
        else:
            values, error, note = _decode_cells(cells, header, fallback_encoding)
        if error:  # keep what identifies the row (id columns), blank the rest
            values = [c if c and not _UNDECODABLE.search(c) and len(c) <= MAX_CELL_BYTES // 4 else None
                      for c in cells[:len(header)]]
            values += [None] * (len(header) - len(values))
        for col, v in zip(columns, values):
            col.append(v)
        errors.append(error)
        notes.append(note)
        where.append(f"{path.name} line {start}")
    df = pl.DataFrame({h: pl.Series(h, c, dtype=pl.Utf8) for h, c in zip(header, columns)})
    return df.with_columns(pl.Series(ROW_ERROR, errors, dtype=pl.Utf8), pl.Series(ROW_NOTE, notes, dtype=pl.Utf8),
                           pl.Series(ROW_WHERE, where, dtype=pl.Utf8))
