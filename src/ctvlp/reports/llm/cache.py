"""The on-disk answer cache: one JSON file per report under ``cache_dir``, named by ``entry_key``
(sha256 of prompt version, prompt file digest, model, disease catalog digest and report text),
written atomically (temp file + ``os.replace``) so that a killed run leaves no half-written file.
The cache holds only validated answers ("parsed" entries, with the raw answers): a report that
ended unparsed, or a request that failed, is never written, and a file that is not a usable
answer (an "unparsed" entry of an older ctvlp, another format, a wrong shape, unreadable) is
removed when read, so its report is sent again."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ... import catalog as _cat
from ...catalog import Disease
from ...workspace import write_text_atomic
from ..schema import ERR_NO_ANATOMY, PRESENCES
from .prompt import Prompt

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
RAW_ANSWER_CHARS = 20000  # each raw answer kept in an entry is cut to this


@lru_cache(maxsize=32)
def _catalog_digest_cached(diseases: tuple[Disease, ...]) -> str:
    payload = json.dumps([[d.id, d.name, d.anatomy, d.organ, list(d.synonyms)] for d in diseases])
    return hashlib.sha256(payload.encode()).hexdigest()


def catalog_digest(diseases: Sequence[Disease]) -> str:
    """sha256 over what the prompt and validation use of each disease (id, name, anatomy, organ, synonyms)."""
    return _catalog_digest_cached(tuple(diseases))


def entry_key(report: str, prompt: Prompt, model: str, diseases: Sequence[Disease]) -> str:
    """Cache key: sha256 over prompt version + prompt digest + model + catalog digest + sha256(report)."""
    report_sha = hashlib.sha256(report.encode()).hexdigest()
    payload = "\0".join([prompt.version, prompt.digest, model, catalog_digest(diseases), report_sha])
    return hashlib.sha256(payload.encode()).hexdigest()


def make_entry(
    outcome: str,
    error: str | None,
    anatomies: dict,
    raw: list[str | None],
    errors: list[str],
    *,
    prompt_version: str,
    model: str,
    catalog: str,
    response_format: str | None,
) -> dict:
    """A cache entry: the outcome ("parsed" or "unparsed") of one report with its reason, the merged
    anatomies, what produced it, and every raw answer and validation error."""
    return {
        "cache_format": CACHE_FORMAT,
        "outcome": outcome,
        "error": error,
        "anatomies": anatomies,
        "prompt_version": prompt_version,
        "model": model,
        "catalog": catalog,
        "response_format": response_format,
        "answers": len(raw),
        "errors": errors,
        "raw": [answer[:RAW_ANSWER_CHARS] if isinstance(answer, str) else answer for answer in raw],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_entry(path: Path, entry: dict) -> None:
    """Write ``entry`` as JSON at ``path``, complete or not at all (``workspace.atomic_write``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(entry, ensure_ascii=False))


def entry_problem(data, diseases: Sequence[Disease]) -> str | None:
    """Why ``data`` is not a usable cached answer (None: it is one): the cache format, the outcome
    "parsed", and the merged anatomies' shape (known anatomy names, statuses normal/abnormal,
    findings with catalog ids and known presences)."""
    if not isinstance(data, dict) or data.get("cache_format") != CACHE_FORMAT:
        return "another cache format"
    if data.get("outcome") != "parsed":
        return f"outcome {data.get('outcome')!r} (only validated answers are served)"
    if data.get("error") not in (None, ERR_NO_ANATOMY):
        return "an error"
    anatomies = data.get("anatomies")
    if not isinstance(anatomies, dict):
        return "no anatomies"
    names, ids = set(_cat.anatomy_names()), {d.id for d in diseases}
    for anatomy, value in anatomies.items():
        if anatomy not in names or not isinstance(value, dict):
            return f"unknown anatomy {anatomy!r}"
        if not isinstance(value.get("text"), str) or value.get("status") not in ("normal", "abnormal"):
            return f"bad text or status of {anatomy!r}"
        findings = value.get("findings")
        if not isinstance(findings, list) or not all(
            isinstance(f, dict) and f.get("disease_id") in ids and f.get("presence") in PRESENCES for f in findings
        ):
            return f"bad findings of {anatomy!r}"
    return None


def read_entry(path: Path, diseases: Sequence[Disease]) -> dict | None:
    """The validated answer at ``path``; None when there is none. A file there that is not one
    (``entry_problem``, or unreadable) is removed (logged), so its report is sent again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        problem: str | None = "unreadable"
    else:
        problem = entry_problem(data, diseases)
    if problem is None:
        return data
    log.info("cache file %s is not a usable answer (%s): removed; its report is sent again", path.name, problem)
    try:
        path.unlink()
    except OSError as error:
        log.warning("could not remove cache file %s: %s", path, error)
    return None
