"""The demo cohort written out as a user's own data would be: a plain CSV table of cases (image,
mask, report, split, patient, one 0/1 column per disease) beside the NIfTI files it names, and the
config that runs the workflow on it through ``cohort.source: table`` (``make example``).

What the table path then reads is exactly this format; a user copies the table, swaps in their own
files and columns, and keeps the config.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import polars as pl
import yaml

from .. import catalog
from .demo import write_cohort
from .schema import GROUND_TRUTH_FILE

log = logging.getLogger(__name__)

MARKER = ".ctvlp-example"  # a folder ctvlp wrote: `ctvlp example` may write it again
TABLE, CONFIG = "cases.csv", "config.yaml"
CATALOG = "demo"


def _header(folder: str, results: str) -> str:
    return (f"# The demo cohort as a table of your own data would be ({folder}/{TABLE}, written by `ctvlp example`).\n"
            f"# Run from the checkout:  snakemake --cores all --configfile {folder}/{CONFIG}\n"
            f"# Relative paths in the table resolve against the table's folder; paths here against the folder\n"
            f"# snakemake runs in. Outputs go to {results}/. For your data: point cohort.table.path at your\n"
            f"# table, name its columns below, and set segment (README 'Use your own data').\n")


def write_example(out_dir, n_cases: int = 160, seed: int = 0, split=(0.7, 0.15, 0.15), results: str | None = None,
                  workers: int = 1) -> dict[str, Path]:
    """Write ``out_dir``/cases.csv, images/, masks/ and config.yaml; returns their paths.

    ``out_dir`` must be new, empty, or written by this function before (it holds ``MARKER``): a
    folder with anything else in it is refused, never overwritten. ``results``: the results
    folder the config names (default ``<out_dir>/results``)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and was not written by `ctvlp example`; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    results = results or f"{out.as_posix()}/results"
    with tempfile.TemporaryDirectory(prefix=".cohort-", dir=out) as tmp:
        manifest = pl.read_parquet(write_cohort(tmp, n_cases=n_cases, seed=seed, split=tuple(split), workers=workers))
        truth = pl.read_parquet(Path(tmp) / GROUND_TRUTH_FILE)
        for sub in ("images", "masks"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)  # only ever a folder this function wrote (MARKER checked above)
            (Path(tmp) / sub).rename(out / sub)
    diseases = [d.id for d in catalog.diseases(CATALOG)]
    labels = truth.pivot(on="disease_id", index="case_id", values="label").select("case_id", *diseases)
    table = (manifest.select(
        "case_id", pl.col("case_id").alias("patient_id"), "split",
        pl.col("image_path").map_elements(lambda p: f"images/{Path(p).name}", return_dtype=pl.Utf8).alias("image"),
        pl.col("mask_path").map_elements(lambda p: f"masks/{Path(p).name}", return_dtype=pl.Utf8).alias("mask"),
        pl.col("report_text").alias("report"))
        .join(labels, on="case_id", how="left", validate="1:1").sort("case_id"))
    table.write_csv(out / TABLE)
    config = {
        "results": results,
        "cohort": {"source": "table", "table": {
            "path": f"{out.as_posix()}/{TABLE}", "id_col": "case_id", "image_col": "image", "report_col": "report",
            "split_col": "split", "patient_col": "patient_id", "mask_col": "mask", "label_cols": diseases}},
        "segment": {"backend": "phantom"},
        "reports": {"catalog": CATALOG},
        "evaluate": {"catalog": CATALOG},
    }
    (out / CONFIG).write_text(_header(out.as_posix(), results) + yaml.safe_dump(config, sort_keys=False),
                              encoding="utf-8")
    log.info("%d cases in %s; run: snakemake --cores all --configfile %s", len(table), out / TABLE, out / CONFIG)
    return {"table": out / TABLE, "config": out / CONFIG, "images": out / "images", "masks": out / "masks"}
