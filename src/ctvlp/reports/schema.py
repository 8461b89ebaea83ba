"""The parsed-reports table, one definition for both backends (rules and llm): one row per case
and anatomy (all 36, catalog order) with the report sentences about it, its status and the catalog
findings the report states for it. Following the paper, only an anatomy described as completely
healthy is "normal"; anything present or uncertain makes it "abnormal"; an anatomy the report does
not name is "not_mentioned"; "unparsed" is a backend's failure on one case, with the reason in
``error``. ``clean_text`` is how both backends read a report."""

from __future__ import annotations

import re
import unicodedata

import polars as pl

STATUSES = ("normal", "abnormal", "not_mentioned", "unparsed")

PRESENCES = ("present", "uncertain", "absent")  # strongest first

FINDING_DTYPE = pl.Struct({"disease_id": pl.Utf8, "presence": pl.Utf8})

REPORT_SCHEMA: dict[str, pl.DataType] = {
    "case_id": pl.Utf8,
    "anatomy": pl.Utf8,
    "text": pl.Utf8,
    "status": pl.Utf8,  # STATUSES
    "findings": pl.List(FINDING_DTYPE),  # presence in PRESENCES
    "backend": pl.Utf8,
    "model": pl.Utf8,
    "prompt_version": pl.Utf8,
    "error": pl.Utf8,  # null when the report was parsed
}

ERR_EMPTY = "empty report"

ERR_NOT_ENGLISH = "report does not look like English"

ERR_NO_ANATOMY = "no anatomy mentioned"

_LINE_BREAKS = re.compile("[\r\u2028\u2029\u0085]")


def clean_text(text: str | None) -> str | None:
    """Report text as both backends read it: Unicode NFKC (full-width letters, ligatures and
    compatibility forms become plain ones), line/paragraph separators as line breaks, and control
    and invisible format characters (zero-width space, soft hyphen, BOM, ...) removed, so that
    "cy\u00adst" or "cy\u200bst" still reads "cyst". Tabs and line breaks stay."""
    if text is None:
        return None
    text = _LINE_BREAKS.sub("\n", unicodedata.normalize("NFKC", text))
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cf"))
