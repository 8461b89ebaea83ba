"""Reading back the tables of an HTML page written by ``ctvlp.htmltable`` (for the tests): each
table's header and rows of cell texts, by the heading above it."""

from __future__ import annotations

import html
import re

_CELL = re.compile(r"<t[hd][^>]*>(.*?)</t[hd]>", re.S)


def tables(page: str) -> dict[str | None, tuple[list[str], list[list[str]]]]:
    """{heading (the <h2> above the table; None for a page with no <h2>): (header, body rows)},
    every cell as its text (HTML entities decoded)."""
    out = {}
    for heading, table in re.findall(r"(?:<h2>(.*?)</h2>.*?)?(<table class=\"sortable\">.*?</table>)", page, re.S):
        rows = [[html.unescape(c) for c in _CELL.findall(tr)] for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)]
        out[html.unescape(heading) if heading else None] = (rows[0], rows[1:])
    return out
