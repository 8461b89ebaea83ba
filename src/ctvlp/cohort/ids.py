"""Case ids as folder names, for every source: see ``workspace.case_folders``."""

from __future__ import annotations

from .. import workspace
from .schema import INGEST


def with_safe_ids(rows: list[dict], policy: str, excl: list[dict]) -> list[dict]:
    """Rows whose case id can name a folder: unsafe ids are excluded (or mapped, under policy
    "slug"); ids that would share a folder are all excluded. See ``workspace.case_folders``."""
    folders, excluded = workspace.case_folders([row["case_id"] for row in rows], policy)
    excl += [{"case_id": cid, "stage": INGEST, "reason": reason} for cid, reason in excluded.items()]
    kept = []
    for row in rows:
        folder = folders.get(row["case_id"])
        if folder is None:
            continue
        if folder != row["case_id"]:
            note = f"case id mapped from {ascii(row['case_id'])} (cohort.unsafe_ids: slug)"
            row = {**row, "case_id": folder, "ingest_note": "; ".join(filter(None, [note, row["ingest_note"]]))}
        kept.append(row)
    return kept
