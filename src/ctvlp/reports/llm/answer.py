"""One answer of the model: its JSON found (code fences and text around the outermost braces
tolerated), validated with pydantic (anatomy names, catalog disease ids or names, presences), and
merged into per-anatomy results. ``AnswerError``'s message is what the repair request tells the
model. Pure functions: unit-testable without a server."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from ... import catalog as _cat
from ...catalog import Disease
from ..schema import PRESENCES


class AnswerError(ValueError):
    """An answer that cannot be used; the message is what the repair request tells the model."""


def _norm_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


class _Finding(BaseModel):
    model_config = ConfigDict(extra="ignore")
    disease: str
    presence: Literal["present", "uncertain", "absent"]

    @field_validator("presence", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("disease")
    @classmethod
    def _known_disease(cls, value: str, info: ValidationInfo) -> str:
        alias: dict[str, str] = (info.context or {})["disease_alias"]
        key = _norm_name(value)
        if key not in alias:
            raise ValueError(f"unknown disease {value!r} (use an id from the catalog list)")
        return alias[key]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    anatomy: str
    text: str
    status: Literal["normal", "abnormal", "not_mentioned"]
    findings: list[_Finding]

    @field_validator("status", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return _norm_name(value) if isinstance(value, str) else value

    @field_validator("anatomy")
    @classmethod
    def _known_anatomy(cls, value: str, info: ValidationInfo) -> str:
        key = _norm_name(value)
        if key not in (info.context or {})["anatomies"]:
            raise ValueError(f"unknown anatomy {value!r} (use a name from the anatomy list)")
        return key


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    anatomies: list[_Entry]


def _extract_json(content: str) -> Any:
    text = content.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end and (start > 0 or end < len(text) - 1):
            try:
                return json.loads(text[start : end + 1])
            except json.JSONDecodeError:
                pass
        raise AnswerError(f"invalid JSON: {first.msg} at char {first.pos}") from None


def _format_validation(error: ValidationError, limit: int = 5) -> str:
    parts = []
    for detail in error.errors()[:limit]:
        where = ".".join(str(x) for x in detail["loc"]) or "answer"
        msg = detail["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    more = error.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def validate_answer(
    content: str | None, diseases: Sequence[Disease], finish_reason: str | None = None, max_tokens: int | None = None
) -> dict[str, dict]:
    """Validate one answer; return {anatomy: {text, status, findings}} for the mentioned anatomies.

    Raises ``AnswerError`` (its message is the reason) for empty, truncated or invalid JSON, missing
    fields, unknown anatomy names or disease ids. Pure function: unit-testable without a server.
    """
    if finish_reason == "length":
        raise AnswerError(
            f"answer truncated at the token limit (max_tokens={max_tokens}, finish_reason=length); "
            "give shorter text"
        )
    if content is None or not content.strip():
        raise AnswerError("empty answer")
    data = _extract_json(content)
    context = {
        "anatomies": set(_cat.anatomy_names()),
        "disease_alias": {**{_norm_name(d.name): d.id for d in diseases}, **{_norm_name(d.id): d.id for d in diseases}},
    }
    try:
        answer = _Answer.model_validate(data, context=context)
    except ValidationError as error:
        raise AnswerError(_format_validation(error)) from None
    return merge_answer(answer, diseases)


def merge_answer(answer: _Answer, diseases: Sequence[Disease]) -> dict[str, dict]:
    """A validated answer as {anatomy: {text, status, findings}}: duplicate entries merged, each
    finding filed under its catalog anatomy with its strongest presence, an anatomy with a present
    or uncertain finding "abnormal", entries "not_mentioned" without such findings dropped."""
    by_id = {d.id: d for d in diseases}
    rank = {presence: i for i, presence in enumerate(PRESENCES)}
    texts: dict[str, list[str]] = {}
    status: dict[str, str] = {}
    best: dict[str, str] = {}  # disease id -> strongest presence
    first_text: dict[str, str] = {}  # disease id -> text of the entry that mentioned it
    for entry in answer.anatomies:
        for finding in entry.findings:
            if finding.disease not in best or rank[finding.presence] < rank[best[finding.disease]]:
                best[finding.disease] = finding.presence
            first_text.setdefault(finding.disease, entry.text.strip())
        if entry.status == "not_mentioned":
            continue
        text = entry.text.strip()
        if text and text not in texts.setdefault(entry.anatomy, []):
            texts[entry.anatomy].append(text)
        texts.setdefault(entry.anatomy, [])
        if status.get(entry.anatomy) != "abnormal":
            status[entry.anatomy] = entry.status
    findings: dict[str, list[dict]] = {}
    for disease in diseases:  # catalog order
        if disease.id in best:
            findings.setdefault(disease.anatomy, []).append({"disease_id": disease.id, "presence": best[disease.id]})
    merged: dict[str, dict] = {}
    for anatomy in _cat.anatomy_names():
        anatomy_findings = findings.get(anatomy, [])
        if anatomy not in status and not anatomy_findings:
            continue
        if anatomy not in status:  # only a finding of it was mentioned (under another anatomy)
            sources = [first_text[f["disease_id"]] for f in anatomy_findings if first_text.get(f["disease_id"])]
            texts[anatomy] = list(dict.fromkeys(sources))
        bad = any(f["presence"] != "absent" for f in anatomy_findings)
        anatomy_status = "abnormal" if bad or status.get(anatomy) == "abnormal" else "normal"
        merged[anatomy] = {"text": " ".join(texts.get(anatomy, [])), "status": anatomy_status, "findings": anatomy_findings}
    # keep only findings of a known catalog disease (always true after validation)
    assert all(f["disease_id"] in by_id for v in merged.values() for f in v["findings"])
    return merged
