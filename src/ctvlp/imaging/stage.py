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

Stale input: the stamp also holds the identity of every input file the case reads
(``input_identity``: its image file or every file under its DICOM folder, its mask, its
precomputed segmentation): size, mtime_ns and a BLAKE2b digest of the size and the first and last
``DIGEST_SPAN`` bytes (a .gz file's last 8 bytes are the CRC-32 and length of all its content). A
file replaced in place is therefore made again by any rerun of its shard, and only that case. The
workflow reruns the shard itself through a rule param, ``shard_inputs_digest``: the same files'
size and mtime_ns (stat only, no reading), so a plain ``snakemake`` redoes exactly the shards
whose input files changed.

One bad case never stops a shard: any exception while a case is processed excludes that case
(``excluded.json`` names the stage and the exception; such a record carries no stamp, so the next
run tries the case again), and the shard goes on. Only a failure of the shard itself
(``shard_fatal``: memory, a full or read-only output disk, the segmentation model) stops the job,
with ``ShardFailed`` naming the case it was on; the cases finished before it are kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import polars as pl

from .. import progress
from ..cohort.schema import PREPROCESS, SEGMENT
from ..config import digest
from ..workspace import check_case_id, read_parquet, replace_dir, write_parquet_atomic
from . import checks
from .exclusion import CaseExcluded, read_exclusion, write_exclusion
from .io import first_line
from .preprocess import preprocess_case
from .segment import segment_case
from .segmentation import MASK_SUFFIXES, WeightsMissingError, shard_session

log = logging.getLogger(__name__)

STAMP = ".ctvlp-case.json"
SHARD_SCHEMA = {"case_id": pl.Utf8, "stage": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8, "seconds": pl.Float64}
DONE, REUSED, EXCLUDED = "done", "reused", "excluded"


# ---- which cases ---------------------------------------------------------------------------------


def manifest_row(manifest, case_id: str) -> dict:
    """The manifest row of ``case_id`` (a plain folder name) as a dict."""
    check_case_id(case_id)
    rows = read_parquet(manifest).filter(pl.col("case_id") == case_id)
    if len(rows) != 1:
        raise ValueError(f"case {case_id!r} appears {len(rows)} times in {manifest} (expected once)")
    return rows.row(0, named=True)


def n_shards(n_cases: int, shard_size: int) -> int:
    return math.ceil(n_cases / shard_size)


def shard_cases(manifest, shard: int, shard_size: int) -> list[dict]:
    """The manifest rows of shard ``shard``: the cases in case_id order, cut into
    ``n_shards(cases, shard_size)`` shards of equal size (to one case), at most ``shard_size`` each."""
    table = manifest if isinstance(manifest, pl.DataFrame) else read_parquet(manifest)
    table = table.sort("case_id")
    count = max(n_shards(len(table), shard_size), 1)
    if not 0 <= shard < count:
        raise ValueError(f"shard {shard} does not exist: {len(table)} cases in {count} shard(s) of at most {shard_size}")
    start, stop = shard * len(table) // count, (shard + 1) * len(table) // count
    return table.slice(start, stop - start).to_dicts()


# ---- which files a case reads, and their identity -------------------------------------------------

DIGEST_SPAN = 1 << 16  # bytes hashed at each end of a file (cost measured in tests/imaging/test_imaging_isolation.py)


def input_files(case: dict, segment_cfg: dict | None = None) -> list[Path]:
    """The files and folders a case's stages read: its image (a file or a DICOM folder), its mask
    when the manifest gives one, and with ``segment_cfg`` of backend precomputed its segmentation
    under segment.path (the multilabel file or the folder of per-class files, whichever exists)."""
    paths = [Path(case["image_path"])]
    if case.get("mask_path"):
        paths.append(Path(case["mask_path"]))
    if segment_cfg and segment_cfg.get("backend") == "precomputed" and segment_cfg.get("path"):
        root = Path(segment_cfg["path"])
        found = [root / f"{case['case_id']}{suffix}" for suffix in MASK_SUFFIXES]
        paths += [p for p in found if p.is_file()] or [root / str(case["case_id"])]
    return paths


def _files_under(path: Path) -> list[Path]:
    """``path`` itself, or every file under a folder (a DICOM study: any added, removed or changed
    file may change which series is the image), in a stable order."""
    if not path.is_dir():
        return [path]
    return sorted(Path(d) / f for d, _, names in os.walk(path) for f in names)


def file_identity(path: Path, content: bool = True) -> dict:
    """size, mtime_ns and (``content``) the BLAKE2b-128 of the size and the first and last
    ``DIGEST_SPAN`` bytes; ``{"missing": ...}`` for a file that is absent or unreadable (the case's
    stage then says why)."""
    try:
        st = path.stat()
        out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if content:
            h = hashlib.blake2b(st.st_size.to_bytes(8, "little"), digest_size=16)
            with open(path, "rb") as fh:
                h.update(fh.read(DIGEST_SPAN))
                if st.st_size > DIGEST_SPAN:
                    fh.seek(max(DIGEST_SPAN, st.st_size - DIGEST_SPAN))
                    h.update(fh.read(DIGEST_SPAN))
            out["blake2b"] = h.hexdigest()
        return out
    except OSError as e:
        return {"missing": type(e).__name__}


def input_identity(case: dict, segment_cfg: dict | None = None, content: bool = True) -> dict:
    """{file: identity} of every file ``input_files`` names (folders expanded)."""
    return {str(f): file_identity(f, content) for p in input_files(case, segment_cfg) for f in _files_under(p)}


_MANIFEST_CACHE: dict = {}


def shard_inputs_digest(manifest, shard: int, shard_size: int, segment_cfg: dict | None = None) -> str:
    """A digest of the size and mtime_ns of every input file of the shard's cases (stat only): a
    workflow rule param, so that a plain ``snakemake`` reruns a shard whose image, mask or
    precomputed segmentation changed (the per-case stamps then redo only those cases). "" while the
    manifest does not exist yet or the shard is not in it (the cohort rule runs first)."""
    path = Path(manifest)
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in _MANIFEST_CACHE:
            _MANIFEST_CACHE.clear()
            _MANIFEST_CACHE[key] = pl.read_parquet(path, columns=["case_id", "image_path", "mask_path"])
        cases = shard_cases(_MANIFEST_CACHE[key], shard, shard_size)
    except Exception:  # noqa: BLE001 - unreadable or not there yet: the cohort rule (re)writes it first
        return ""
    return digest({c["case_id"]: input_identity(c, segment_cfg, content=False) for c in cases})


# ---- one case --------------------------------------------------------------------------------------


def _stamp(stage: str, settings: dict, case: dict, upstream: dict | None = None, inputs: dict | None = None) -> dict:
    return {"stage": stage, "settings": digest(settings), "case": digest(case),
            "upstream": digest(upstream) if upstream else None, "inputs": digest(inputs) if inputs else None}


def read_stamp(folder) -> dict | None:
    path = Path(folder) / STAMP
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the case is made again


FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class ShardFailed(RuntimeError):
    """The shard itself cannot go on (memory, output disk, the segmentation model): the job fails,
    naming the case it was on. The cases finished before it keep their folders and stamps."""


def shard_fatal(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a failure of the shard rather than
    of one case: out of memory (host or CUDA), no space / quota / read-only file system, a
    TotalSegmentator model that cannot be loaded or run (weights or package missing, a CUDA error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (MemoryError, WeightsMissingError, ImportError)):
            return True
        if isinstance(error, OSError) and error.errno in FATAL_ERRNOS:
            return True
        text = str(error)
        if type(error).__name__ == "OutOfMemoryError" or "CUDA error" in text or "No space left on device" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def run_case(stage: str, case_id: str, out_dir, work, stamp: dict | None = None) -> str:
    """``work(folder)`` for one case into a fresh folder that replaces ``out_dir`` only when
    complete; a ``CaseExcluded`` becomes ``out_dir``/excluded.json with its reason. Returns the
    reason of an exclusion, else None. Any other exception propagates (``_run_cases`` decides
    whether it excludes the case or stops the shard)."""
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


def exclude_on_error(stage: str, case_id: str, out_dir, error: Exception) -> str:
    """Record an unexpected exception of one case as its exclusion (stage, exception type and
    message), without a stamp: the next run of its shard tries the case again."""
    reason = f"unexpected error: {type(error).__name__}: {first_line(error)}"
    with replace_dir(out_dir) as tmp:
        write_exclusion(tmp, case_id, stage, reason)
    return reason


def _segment_settings(settings: dict) -> dict:
    cfg = {**settings["segment"], "preprocess": settings["preprocess"]}
    if cfg["backend"] == "precomputed" and not cfg.get("path"):
        raise SystemExit("segment.backend precomputed needs segment.path (a folder of segmentations)")
    return cfg


def _check_segment_inputs(case: dict, cfg: dict) -> None:
    """Header checks of what the backend reads beside the image (whose own checks run in
    ``segment_case``): the manifest spacing, the phantom backend's mask, a precomputed
    multilabel file."""
    checks.check_manifest_spacing(case)
    if cfg["backend"] == "phantom" and case.get("mask_path"):
        checks.check_mask(case["mask_path"])
    elif cfg["backend"] == "precomputed":
        for path in input_files(case, cfg)[1:]:
            if path.is_file() and str(path) != str(case.get("mask_path")):
                checks.check_mask(path, what="precomputed segmentation")


def _segment_work(case: dict, cfg: dict):
    def work(out):
        _check_segment_inputs(case, cfg)
        table = segment_case(case, cfg, out)
        log.info("%s: %d anatomies present, %d complete", case["case_id"], table["present"].sum(),
                 table["complete"].sum())

    return work


def _preprocess_work(case: dict, settings: dict, segment_dir):
    def work(out):
        upstream = read_exclusion(segment_dir)
        if upstream:  # excluded at segmentation: carry the record forward, nothing to preprocess
            raise CaseExcluded(upstream["reason"], upstream["stage"])
        checks.check_manifest_spacing(case)
        meta = preprocess_case(case, Path(segment_dir) / "anatomy.nii.gz", settings["preprocess"], out)
        log.info("%s: %s @ %s mm -> %s @ %s mm; %s", case["case_id"], meta["original_size"],
                 [round(v, 2) for v in meta["original_spacing"]], meta["size"], meta["spacing"], meta["hu_decision"])

    return work


def segment(manifest, case_id: str, settings: dict, out_dir) -> None:
    """The segment stage for one case, by hand (settings: sections segment and the preprocess
    image checks)."""
    cfg = _segment_settings(settings)
    case = manifest_row(manifest, case_id)
    run_case(SEGMENT, case_id, out_dir, _segment_work(case, cfg),
             _stamp(SEGMENT, cfg, case, inputs=input_identity(case, cfg)))


def preprocess(manifest, case_id: str, settings: dict, segment_dir, out_dir) -> None:
    """The preprocess stage for one case, by hand, after its segment stage (whose exclusion
    carries over)."""
    case = manifest_row(manifest, case_id)
    run_case(PREPROCESS, case_id, out_dir, _preprocess_work(case, settings, segment_dir),
             _stamp(PREPROCESS, settings["preprocess"], case, read_stamp(segment_dir), input_identity(case)))


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
    progress.log.info("%s shard %d done: %d cases in %.1f s (%s)", stage, shard, len(cases), time.perf_counter() - start,
                      ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return table


def _run_cases(stage: str, cases: list[dict], shard: int, cfg: dict, settings: dict, out_root, segment_root,
               rows: list) -> None:
    for i, case in enumerate(cases, 1):
        case_id, tick = case["case_id"], time.perf_counter()
        check_case_id(case_id)
        out_dir = Path(out_root) / case_id
        where = f"{stage} shard {shard}: case {i} of {len(cases)} ({case_id})"
        try:
            status, reason = _one_case(stage, case, cfg, settings, out_dir, segment_root)
        except KeyboardInterrupt:
            log.error("%s: interrupted; the %d case(s) before it are kept", where, i - 1)
            raise
        except Exception as e:  # one case's failure must not stop the shard
            if shard_fatal(e):
                log.exception("%s: the shard cannot go on", where)
                raise ShardFailed(f"{where}: the shard stopped at this case on {type(e).__name__}: {first_line(e)} "
                                  f"(a failure of the shard, not of the case: memory, output disk or the "
                                  f"segmentation model); the {i - 1} case(s) before it are kept and a rerun "
                                  "resumes there") from e
            log.exception("%s: excluded on an unexpected error", where)
            try:
                status, reason = EXCLUDED, exclude_on_error(stage, case_id, out_dir, e)
            except Exception as e2:  # not even its exclusion can be written
                raise ShardFailed(f"{where}: could not record the case's exclusion after "
                                  f"{type(e).__name__}: {first_line(e)}: {type(e2).__name__}: {first_line(e2)}") from e2
        rows.append({"case_id": case_id, "stage": stage, "status": status, "reason": reason,
                     "seconds": round(time.perf_counter() - tick, 3)})
        log.info("%s %s in %.2f s", where, status, rows[-1]["seconds"])


def _one_case(stage: str, case: dict, cfg: dict, settings: dict, out_dir: Path, segment_root) -> tuple[str, str]:
    """(status, reason) of one case: kept when its folder's stamp matches, else made (or excluded)."""
    case_id = case["case_id"]
    if stage == SEGMENT:
        stamp = _stamp(SEGMENT, cfg, case, inputs=input_identity(case, cfg))
        work = _segment_work(case, cfg)
    else:
        segment_dir = Path(segment_root) / case_id
        stamp = _stamp(PREPROCESS, cfg, case, read_stamp(segment_dir), input_identity(case))
        work = _preprocess_work(case, settings, segment_dir)
    if read_stamp(out_dir) == stamp:  # made from the same settings and input files: kept as it is
        excluded = read_exclusion(out_dir)
        return (EXCLUDED, excluded["reason"]) if excluded else (REUSED, None)
    reason = run_case(stage, case_id, out_dir, work, stamp)
    return (EXCLUDED if reason else DONE), reason
