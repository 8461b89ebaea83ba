"""What a finished workflow run says last in the terminal: the headline result and where to look.

`run_summary(results)` reads only what the results folder holds (a run of some targets, e.g. qc
only, has no evaluation; a cohort without labels has none at all) and returns the lines: the mean
zero-shot AUC with its 95% bootstrap CI, the means over local and diffuse diseases, the linear
probe's mean, the excluded cases with the files that give their reasons, and the HTML report (or
the command that makes it). The Snakefile's ``onsuccess`` prints them; nothing here needs Snakemake.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from .cohort.schema import GROUND_TRUTH
from .workspace import read_parquet

REPORT = "report.html"


def _number(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _mean_row(table: Path) -> dict | None:
    """The "mean" row of a metric table (metrics.write_tables) with ``diseases``, the number of
    diseases with an AUC (those the mean is over); None when there is none."""
    if not table.is_file():
        return None
    frame = read_parquet(table)
    rows = frame.filter(pl.col("disease_id") == "mean").to_dicts()
    if not rows:
        return None
    per_disease = frame.filter(pl.col("disease_id") != "mean")["auc"]
    return {**rows[0], "diseases": per_disease.fill_nan(None).drop_nulls().len()}


def _auc_with_ci(row: dict) -> str:
    text = f"mean AUC {_number(row.get('auc'))}"
    low, high = row.get("auc_ci_low"), row.get("auc_ci_high")
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        text += f" (95% CI {low:.3f}-{high:.3f})"
    return text + f" over {row['diseases']} disease{'' if row['diseases'] == 1 else 's'}"


def _by_type(table: Path) -> str:
    """'; local 0.840, diffuse 0.842' from zeroshot_by_type.csv, or '' without it."""
    if not table.is_file():
        return ""
    means = {r["type"]: r["auc"] for r in pl.read_csv(table).iter_rows(named=True)}
    parts = [f"{kind} {_number(means[kind])}" for kind in ("local", "diffuse") if kind in means]
    return "; " + ", ".join(parts) if parts else ""


def run_summary(results: str | Path, report: str | Path | None = None, configfile: str | None = None) -> list[str]:
    """The closing lines for the results folder ``results``; ``report`` is the HTML report's path
    (default ``results/report.html``), named with the command that makes (or remakes) it;
    ``configfile``: the run's --configfile, repeated in that command."""
    results = Path(results)
    report = Path(report) if report is not None else results / REPORT
    command = "snakemake" + (f" --configfile {configfile}" if configfile else "") + f" --report {report}"
    lines = [f"ctvlp: summary of {results}/"]
    evaluation = results / "eval"
    zeroshot = _mean_row(evaluation / "zeroshot.parquet")
    if zeroshot is not None:
        lines.append(f"  Zero-shot diagnosis, test split: {_auc_with_ci(zeroshot)}"
                     f"{_by_type(evaluation / 'zeroshot_by_type.csv')}  ({evaluation / 'zeroshot.md'})")
    probe = _mean_row(evaluation / "linear_probe.parquet")
    if probe is not None:
        lines.append(f"  Linear probe, test split: {_auc_with_ci(probe)}  ({evaluation / 'linear_probe.md'})")
    qc = results / "qc"
    if (qc / "excluded.parquet").is_file():
        excluded = read_parquet(qc / "excluded.parquet", columns=["case_id", "stage"])
        excluded = excluded.filter(pl.col("stage") != GROUND_TRUTH)  # notes on kept cases, not exclusions
        cases = excluded["case_id"].n_unique()
        kept = read_parquet(qc / "cases.parquet", columns=["case_id"]).height \
            if (qc / "cases.parquet").is_file() else None
        lines.append(f"  Excluded cases: {cases}" + (f" ({kept} kept)" if kept is not None else "")
                     + (f"; reasons in {qc / 'excluded.parquet'} and {qc / 'summary.md'}" if cases else ""))
    if report.is_file():
        lines.append(f"  Report: {report} (`{command}` brings it up to date)")
    elif zeroshot is not None or probe is not None or (qc / "summary.md").is_file():
        lines.append(f"  Report: make it with `{command}`")
    return lines
