"""The reports stage: parse every report of the manifest with the configured backend
(``reports.backend``) into one ``schema.REPORT_SCHEMA`` table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ..workspace import read_parquet, write_parquet_atomic
from . import rules
from .schema import REPORT_SCHEMA


def write_reports(manifest_path, out_path, settings: dict) -> pl.DataFrame:
    """Parse the reports of the manifest at ``manifest_path`` with the backend of ``settings``
    (the reports config section) and write ``out_path`` (Parquet, ``REPORT_SCHEMA``).

    The llm backend's answer cache defaults to ``llm_cache/`` beside ``out_path``, so a re-run
    sends nothing for reports already answered. When the llm backend stops (``LLMError``: the
    server unreachable, the key refused, a transient failure after all retries, a systematic one),
    nothing is written and SystemExit carries its message (the URL redacted, no secret).
    """
    manifest = read_parquet(manifest_path)
    if settings["backend"] == "rules":
        table = rules.parse_reports(manifest, settings["catalog"], progress=True)
    else:
        from .llm import LLMError, parse_reports

        llm = {**settings["llm"], "catalog": settings["catalog"]}
        if not llm["model"]:
            raise SystemExit("reports.backend llm needs reports.llm.model (the served model name)")
        llm["cache_dir"] = llm["cache_dir"] or str(Path(out_path).parent / "llm_cache")
        try:
            table = parse_reports(manifest, llm, progress=True)
        except LLMError as error:
            raise SystemExit(f"ctvlp reports: {error}") from None
    write_parquet_atomic(table.select(list(REPORT_SCHEMA)), out_path)
    return table
