"""Tables as small self-contained HTML pages, for Snakemake's report.

Snakemake's HTML report shows a result inline only when it is an image, a PDF or an HTML file
(an HTML file in an iframe, from a data URI); a CSV or Markdown table is only a download button.
Each table is therefore also written as one HTML page: the table with the numbers formatted as in
the Markdown tables (``metrics.markdown``: 3 decimals, ``n/a`` for a missing value), a note above
it, and a few lines of inline JavaScript that sort it by the column whose header is clicked
(numbers as numbers, ``n/a`` last). Nothing is loaded from outside the page. A page may also hold
several tables, each under its own heading (``tables_html``: e.g. the data QC summary).

A foundation module (it imports nothing of ctvlp): the evaluation and the imaging stage both write
their tables with it.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import polars as pl

FLOAT_FORMAT = ".3f"
MISSING = "n/a"

_STYLE = """
body { font: 13px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 8px; color: #222; }
h1 { font-size: 15px; margin: 4px 0 6px; }
h2 { font-size: 13px; margin: 14px 0 4px; }
p.note { margin: 0 0 8px; color: #444; max-width: 70em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 7px; white-space: nowrap; }
th { background: #f0f2f5; cursor: pointer; position: sticky; top: 0; user-select: none; }
th.asc::after { content: " \\25B2"; font-size: 9px; }
th.desc::after { content: " \\25BC"; font-size: 9px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
tr.summary td { font-weight: 600; border-top: 2px solid #888; }
p.hint { color: #777; font-size: 11px; }
"""

# sort by the clicked column: numbers by value, text alphabetically, "n/a" always last; the
# summary row (mean) stays at the bottom
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows).filter(function (r) { return !r.classList.contains("summary"); });
      var fixed = Array.prototype.slice.call(body.rows).filter(function (r) { return r.classList.contains("summary"); });
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x === undefined || y === undefined) { return (x === undefined) - (y === undefined); }
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.concat(fixed).forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def format_cell(value) -> tuple[str, str | None, bool]:
    """(shown text, sort key or None when missing, numeric) of one cell, as ``metrics.markdown``
    formats it: floats with 3 decimals, missing and NaN as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING, None, False
    if isinstance(value, bool):
        return str(value).lower(), str(int(value)), False
    if isinstance(value, float):
        return format(value, FLOAT_FORMAT), repr(value), True
    if isinstance(value, int):
        return str(value), str(value), True
    return str(value), str(value), False


def _table(df: pl.DataFrame, summary_column: str | None = None, summary_value: str = "mean") -> str:
    """``df`` as a sortable <table> with the row-count hint below it."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = []
    for row in df.iter_rows(named=True):
        summary = summary_column is not None and row.get(summary_column) == summary_value
        cells = []
        for value in row.values():
            text, key, numeric = format_cell(value)
            attrs = (' class="num"' if numeric else "") + (f' data-v="{html.escape(key)}"' if key is not None else "")
            cells.append(f"<td{attrs}>{html.escape(text)}</td>")
        tr = '<tr class="summary">' if summary else "<tr>"
        body.append(f"{tr}{''.join(cells)}</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>\n"
            f'<p class="hint">{len(df)} rows; click a column header to sort.</p>\n')


def _note(note: str) -> str:
    return f'<p class="note">{html.escape(note)}</p>' if note else ""


def _page(title: str, content: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{content}"
            f"<script>{_SCRIPT}</script>\n</body></html>\n")


def table_html(df: pl.DataFrame, title: str, note: str = "", summary_column: str | None = None,
               summary_value: str = "mean") -> str:
    """One self-contained HTML page holding ``df`` as a sortable table. Rows whose
    ``summary_column`` equals ``summary_value`` (e.g. the mean row) are set apart and stay last."""
    return _page(title, f"{_note(note)}\n{_table(df, summary_column, summary_value)}")


def tables_html(title: str, sections, note: str = "") -> str:
    """One self-contained HTML page holding several sortable tables: ``sections`` is a sequence of
    (heading, DataFrame, note), each table under its heading with its note (which may be "")."""
    parts = [_note(note) + "\n"] if note else []
    for heading, df, section_note in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{_note(section_note)}\n{_table(df)}")
    return _page(title, "".join(parts))


def write_html_table(table, out_html, title: str, note: str = "", summary_column: str | None = None) -> Path:
    """``table`` (a DataFrame or a CSV path) as ``table_html`` into out_html; returns its path."""
    df = table if isinstance(table, pl.DataFrame) else pl.read_csv(table)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table_html(df, title, note, summary_column), encoding="utf-8")
    return out


def write_html_tables(out_html, title: str, sections, note: str = "") -> Path:
    """``tables_html(title, sections, note)`` into out_html; returns its path."""
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tables_html(title, sections, note), encoding="utf-8")
    return out
