"""Reading the tables a cohort comes from: CSV/TSV (every cell a string, decoded row by row)
or Parquet, and reading values out of their cells."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import polars as pl

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

ROW_ERROR = "_ctvlp_row_error"  # why a table row cannot be used (e.g. bytes that are not UTF-8), else null

ROW_NOTE = "_ctvlp_row_note"  # how a row was decoded when the fallback encoding was needed, else null

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that failed UTF-8, kept by surrogateescape


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
