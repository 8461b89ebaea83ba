"""A case that cannot be used: ``CaseExcluded`` inside a per-case stage becomes the case
folder's ``excluded.json`` with its reason, and the rest of the cohort goes on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXCLUDED_FILE = "excluded.json"


class CaseExcluded(Exception):
    """This case cannot be used; the reason is recorded and the rest of the cohort goes on."""

    def __init__(self, reason: str, stage: str = ""):
        super().__init__(reason)
        self.reason, self.stage = reason, stage


def write_exclusion(out_dir: str | Path, case_id: str, stage: str, reason: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXCLUDED_FILE
    path.write_text(json.dumps({"case_id": case_id, "stage": stage, "reason": reason}, indent=1))
    log.warning("%s excluded at %s: %s", case_id, stage, reason)
    return path


def read_exclusion(case_dir: str | Path) -> dict | None:
    path = Path(case_dir) / EXCLUDED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
