"""Running a per-case stage (segment, preprocess) over cases of the manifest.

Each case gets its own folder ``<root>/<case_id>``, written complete or not at all
(``workspace.replace_dir``), holding the outputs or ``excluded.json`` with the reason, plus a stamp
(``STAMP``) naming what it was made from: the stage's settings and the case's manifest row (and,
for preprocess, the stamp of its segment folder).

The workflow runs a stage over a *shard* of cases per job (``shard_cases``: the manifest's cases
in order, ``shard_size`` at a time), so one process imports its libraries once for many cases
instead of once per case. A case whose folder already carries the same stamp is kept as it is:
a shard job killed half-way, or re-run after a change that does not concern every case, redoes
only what is missing or stale. The job's declared output is the shard's table (one row per case:
done, reused or excluded, the reason, seconds), which the qc rule gathers. One case also runs by
hand (``segment`` / ``preprocess`` with a case id).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import polars as pl

from ..cohort.schema import PREPROCESS, SEGMENT
from ..config import digest
from ..workspace import check_case_id, replace_dir, write_parquet_atomic
from .exclusion import CaseExcluded, read_exclusion, write_exclusion
from .preprocess import preprocess_case
from .segment import segment_case
from .segmentation import shard_session

log = logging.getLogger(__name__)

STAMP = ".ctvlp-case.json"
SHARD_SCHEMA = {"case_id": pl.Utf8, "stage": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8, "seconds": pl.Float64}
DONE, REUSED, EXCLUDED = "done", "reused", "excluded"


# ---- which cases ---------------------------------------------------------------------------------


def manifest_row(manifest, case_id: str) -> dict:
    """The manifest row of ``case_id`` (a plain folder name) as a dict."""
    check_case_id(case_id)
    rows = pl.read_parquet(manifest).filter(pl.col("case_id") == case_id)
    if len(rows) != 1:
        raise ValueError(f"case {case_id!r} appears {len(rows)} times in {manifest} (expected once)")
    return rows.row(0, named=True)


def n_shards(n_cases: int, shard_size: int) -> int:
    return math.ceil(n_cases / shard_size)


def shard_cases(manifest, shard: int, shard_size: int) -> list[dict]:
    """The manifest rows of shard ``shard``: the cases in case_id order, cut into
    ``n_shards(cases, shard_size)`` shards of equal size (to one case), at most ``shard_size`` each."""
    table = manifest if isinstance(manifest, pl.DataFrame) else pl.read_parquet(manifest)
    table = table.sort("case_id")
    count = max(n_shards(len(table), shard_size), 1)
    if not 0 <= shard < count:
        raise ValueError(f"shard {shard} does not exist: {len(table)} cases in {count} shard(s) of at most {shard_size}")
    start, stop = shard * len(table) // count, (shard + 1) * len(table) // count
    return table.slice(start, stop - start).to_dicts()


# ---- one case --------------------------------------------------------------------------------------


def _stamp(stage: str, settings: dict, case: dict, upstream: dict | None = None) -> dict:
    return {"stage": stage, "settings": digest(settings), "case": digest(case),
            "upstream": digest(upstream) if upstream else None}


def read_stamp(folder) -> dict | None:
    path = Path(folder) / STAMP
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the case is made again


def run_case(stage: str, case_id: str, out_dir, work, stamp: dict | None = None) -> str:
    """``work(folder)`` for one case into a fresh folder that replaces ``out_dir`` only when
    complete; a ``CaseExcluded`` becomes ``out_dir``/excluded.json with its reason. Returns the
    reason of an exclusion, else None."""
    def stamped(write):
        with replace_dir(out_dir) as tmp:
            write(tmp)
            if stamp:
                (tmp / STAMP).write_text(json.dumps(stamp), encoding="utf-8")

    try:
        stamped(work)
    except CaseExcluded as e:
        where, reason = e.stage or stage, e.reason
        stamped(lambda tmp: write_exclusion(tmp, case_id, where, reason))
        return reason
    return None


def _segment_settings(settings: dict) -> dict:
    cfg = {**settings["segment"], "preprocess": settings["preprocess"]}
    if cfg["backend"] == "precomputed" and not cfg.get("path"):
        raise SystemExit("segment.backend precomputed needs segment.path (a folder of segmentations)")
    return cfg


def _segment_work(case: dict, cfg: dict):
    def work(out):
        table = segment_case(case, cfg, out)
        log.info("%s: %d anatomies present, %d complete", case["case_id"], table["present"].sum(),
                 table["complete"].sum())

    return work


def _preprocess_work(case: dict, settings: dict, segment_dir):
    def work(out):
        upstream = read_exclusion(segment_dir)
        if upstream:  # excluded at segmentation: carry the record forward, nothing to preprocess
            raise CaseExcluded(upstream["reason"], upstream["stage"])
        meta = preprocess_case(case, Path(segment_dir) / "anatomy.nii.gz", settings["preprocess"], out)
        log.info("%s: %s @ %s mm -> %s @ %s mm; %s", case["case_id"], meta["original_size"],
                 [round(v, 2) for v in meta["original_spacing"]], meta["size"], meta["spacing"], meta["hu_decision"])

    return work


def segment(manifest, case_id: str, settings: dict, out_dir) -> None:
    """The segment stage for one case, by hand (settings: sections segment and the preprocess
    image checks)."""
    cfg = _segment_settings(settings)
    case = manifest_row(manifest, case_id)
    run_case(SEGMENT, case_id, out_dir, _segment_work(case, cfg), _stamp(SEGMENT, cfg, case))


def preprocess(manifest, case_id: str, settings: dict, segment_dir, out_dir) -> None:
    """The preprocess stage for one case, by hand, after its segment stage (whose exclusion
    carries over)."""
    case = manifest_row(manifest, case_id)
    run_case(PREPROCESS, case_id, out_dir, _preprocess_work(case, settings, segment_dir),
             _stamp(PREPROCESS, settings["preprocess"], case, read_stamp(segment_dir)))


# ---- a shard -------------------------------------------------------------------------------------


def run_shard(stage: str, manifest, shard: int, shard_size: int, settings: dict, out_root, table_out,
              segment_root=None) -> pl.DataFrame:
    """Run ``stage`` ("segment" or "preprocess") for every case of the shard into
    ``out_root/<case_id>``, keeping case folders whose stamp already matches; write the shard's
    table to ``table_out`` and return it. ``segment_root``: where preprocess finds segment folders."""
    if stage not in (SEGMENT, PREPROCESS):
        raise ValueError(f"stage must be {SEGMENT} or {PREPROCESS}, not {stage!r}")
    cases = shard_cases(manifest, shard, shard_size)
    cfg = _segment_settings(settings) if stage == SEGMENT else settings["preprocess"]
    rows = []
    start = time.perf_counter()
    # segment: a backend that runs a model (totalsegmentator) loads it once for the whole shard
    with shard_session(cfg) if stage == SEGMENT else contextlib.nullcontext():
        _run_cases(stage, cases, shard, cfg, settings, out_root, segment_root, rows)
    table = pl.DataFrame(rows, schema=SHARD_SCHEMA)
    write_parquet_atomic(table, table_out)
    counts = dict(table.group_by("status").len().iter_rows())
    log.info("%s shard %d: %d cases in %.1f s (%s)", stage, shard, len(cases), time.perf_counter() - start, counts)
    return table


def _run_cases(stage: str, cases: list[dict], shard: int, cfg: dict, settings: dict, out_root, segment_root,
               rows: list) -> None:
    for i, case in enumerate(cases, 1):
        case_id, tick = case["case_id"], time.perf_counter()
        check_case_id(case_id)
        out_dir = Path(out_root) / case_id
        if stage == SEGMENT:
            stamp, work = _stamp(SEGMENT, cfg, case), _segment_work(case, cfg)
        else:
            segment_dir = Path(segment_root) / case_id
            stamp = _stamp(PREPROCESS, cfg, case, read_stamp(segment_dir))
            work = _preprocess_work(case, settings, segment_dir)
        if read_stamp(out_dir) == stamp:  # made from the same settings and input: kept as it is
            excluded = read_exclusion(out_dir)
            status, reason = (EXCLUDED, excluded["reason"]) if excluded else (REUSED, None)
        else:
            reason = run_case(stage, case_id, out_dir, work, stamp)
            status = EXCLUDED if reason else DONE
        rows.append({"case_id": case_id, "stage": stage, "status": status, "reason": reason,
                     "seconds": round(time.perf_counter() - tick, 3)})
        log.info("%s shard %d: case %d of %d (%s) %s in %.2f s", stage, shard, i, len(cases), case_id, status,
                 rows[-1]["seconds"])
