"""The on-disk answer cache: one JSON file per report under ``cache_dir``, named by ``entry_key``
(sha256 of prompt version, prompt file digest, model, disease catalog digest and report text),
written atomically (temp file + ``os.replace``) so that a killed run leaves no half-written file.
An entry holds the final outcome of one report, "unparsed" included, with the raw answers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ...catalog import Disease
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
    """Write ``entry`` as JSON at ``path`` atomically (temp file beside it, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_entry(path: Path) -> dict | None:
    """The entry at ``path``; None when there is none, it is unreadable (logged) or of another format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable cache file %s", path)
        return None
    if not isinstance(data, dict) or data.get("cache_format") != CACHE_FORMAT or "outcome" not in data:
        return None
    return data
