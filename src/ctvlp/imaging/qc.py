"""The cohort's QC tables: every case's record gathered into results/qc/ - the QC table (what
was done to each case), the exclusions with their reasons (ingest + imaging), the cases that go
on to training and evaluation, and a summary (summary.md, and summary.html with the same counts and
exclusions as sortable tables, shown inline in Snakemake's report). With ``strict`` any exclusion
fails the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from ..cohort.schema import EXCLUSIONS_SCHEMA, GROUND_TRUTH
from ..htmltable import write_html_tables
from ..workspace import read_parquet
from .exclusion import read_exclusion
from .storage import with_folders

log = logging.getLogger(__name__)


def collect(manifest: str | Path, cohort_exclusions: str | Path | None, segment_dir: str | Path,
            preprocessed_dir: str | Path, out_dir: str | Path, strict: bool = False) -> dict:
    """Gather per-case records into out_dir: qc.parquet (one row per processed case),
    excluded.parquet (ingest + imaging exclusions with reasons, plus ingest's stage "ground_truth"
    notes on kept cases without complete labels), cases.parquet (the manifest rows that go on, with
    their stage folders: ``storage.with_folders``), summary.md and summary.html (``summary_tables``
    as one page of sortable tables, for the report). With ``strict``, raise if any case was excluded
    (label notes do not count)."""
    cohort = read_parquet(manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    excluded, qc_rows, kept = [], [], []
    if cohort_exclusions and Path(cohort_exclusions).is_file():
        excluded += read_parquet(cohort_exclusions).to_dicts()
    for case_id in cohort["case_id"]:
        record = read_exclusion(Path(segment_dir) / case_id) or read_exclusion(Path(preprocessed_dir) / case_id)
        if record:
            excluded.append(record)
            continue
        meta = json.loads((Path(preprocessed_dir) / case_id / "meta.json").read_text(encoding="utf-8"))
        qc_rows.append(_qc_row(meta))
        kept.append(case_id)
    qc_table = pl.DataFrame(qc_rows) if qc_rows else pl.DataFrame()
    excluded = pl.DataFrame(excluded, schema=EXCLUSIONS_SCHEMA)
    qc_table.write_parquet(out / "qc.parquet")
    excluded.write_parquet(out / "excluded.parquet")
    with_folders(cohort.filter(pl.col("case_id").is_in(kept)), segment_dir, preprocessed_dir).write_parquet(
        out / "cases.parquet")
    summary = _summary(cohort, kept, excluded, qc_table)
    (out / "summary.md").write_text(summary)
    write_html_tables(out / "summary.html", "Data QC summary", summary_tables(cohort, kept, excluded, qc_table),
                      "How many cases of the manifest were processed and kept, and every exclusion with its reason.")
    log.info("\n%s", summary)
    dropped = excluded.filter(pl.col("stage") != GROUND_TRUTH)  # notes on kept cases without labels
    if strict and len(dropped):
        raise SystemExit(f"{len(dropped)} case(s) excluded and preprocess.strict is true; see {out / 'excluded.parquet'}")
    return {"kept": len(kept), "excluded": len(dropped)}


def _qc_row(meta: dict) -> dict:
    row = {k: meta[k] for k in ("case_id", "source_path", "hu_decision", "hu_slope", "hu_intercept")}
    for k in ("original_size", "original_spacing", "size", "spacing"):
        for axis, v in zip("xyz", meta[k]):
            row[f"{k}_{axis}"] = v
    row.update({f"hu_{k}": v for k, v in meta["hu_stats"].items()})
    row["warnings"] = "; ".join(meta["warnings"])
    row["anatomies_present"] = len(meta["anatomy_voxels"])
    return row


def _printable(text) -> str:
    """A hostile id or reason cannot print control characters (shown escaped, as ``ascii`` would)."""
    text = str(text)
    return ascii(text)[1:-1] if any(not c.isprintable() for c in text) else text


def _cell(text) -> str:
    """A Markdown table cell: a hostile id cannot break the table or print control characters."""
    return _printable(text).replace("|", "\\|")


def _counts(cohort: pl.DataFrame, kept: list[str], excluded: pl.DataFrame, qc_table: pl.DataFrame) -> list[tuple]:
    """(check, number of cases) of the summary, in the order shown."""
    notes = excluded.filter(pl.col("stage") == GROUND_TRUTH)
    counts = [("cases in the manifest", len(cohort)), ("cases processed and kept", len(kept)),
              ("exclusions recorded", len(excluded) - len(notes))]
    if len(notes):
        counts.append(("kept cases with missing or incomplete labels (stage ground_truth)", len(notes)))
    if len(qc_table) and "warnings" in qc_table.columns:
        counts.append(("kept cases with HU warnings", len(qc_table.filter(pl.col("warnings") != ""))))
    return counts


def summary_tables(cohort: pl.DataFrame, kept: list[str], excluded: pl.DataFrame,
                   qc_table: pl.DataFrame) -> list[tuple[str, pl.DataFrame, str]]:
    """The QC summary as (heading, table, note) sections for ``htmltable.tables_html``: the counts
    of summary.md, the exclusions counted per stage and reason, every excluded case with its
    reason, the kept cases counted per HU decision, and the kept cases with HU warnings."""
    counts = pl.DataFrame(_counts(cohort, kept, excluded, qc_table), schema={"check": pl.Utf8, "cases": pl.Int64},
                          orient="row")
    shown = pl.DataFrame({c: [None if v is None else _printable(v) for v in excluded[c]] for c in EXCLUSIONS_SCHEMA},
                         schema=EXCLUSIONS_SCHEMA)
    per_reason = (shown.group_by("stage", "reason").agg(pl.len().cast(pl.Int64).alias("cases"))
                  .sort(["cases", "stage", "reason"], descending=[True, False, False]))
    sections = [
        ("Counts", counts, ""),
        ("Exclusions per stage and reason", per_reason,
         "Stage ground_truth rows are notes on kept cases (labels missing or incomplete), not exclusions."
         if (excluded["stage"] == GROUND_TRUTH).any() else ""),
        ("Excluded cases", shown, "" if len(shown) else "No case was excluded."),
    ]
    if len(qc_table) and "hu_decision" in qc_table.columns:
        decisions = (qc_table.group_by("hu_decision").agg(pl.len().cast(pl.Int64).alias("cases"))
                     .sort(["cases", "hu_decision"], descending=[True, False]))
        sections.append(("Kept cases per HU decision", decisions, ""))
    if len(qc_table) and "warnings" in qc_table.columns:
        warned = qc_table.filter(pl.col("warnings") != "").select("case_id", "hu_decision", "warnings")
        warned = warned.with_columns(pl.Series("case_id", [_printable(v) for v in warned["case_id"]], pl.Utf8))
        sections.append(("Kept cases with HU warnings", warned,
                         "" if len(warned) else "No kept case has an HU warning."))
    return sections


def _summary(cohort: pl.DataFrame, kept: list[str], excluded: pl.DataFrame, qc_table: pl.DataFrame) -> str:
    lines = ["# QC summary", ""] + [f"- {check}: {n}" for check, n in _counts(cohort, kept, excluded, qc_table)]
    if len(excluded):
        lines += ["", "| case | stage | reason |", "|---|---|---|"]
        lines += [f"| {_cell(r['case_id'])} | {r['stage']} | {_cell(r['reason'])} |"
                  for r in excluded.iter_rows(named=True)]
    return "\n".join(lines) + "\n"
