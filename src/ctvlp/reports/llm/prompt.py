"""The prompt: the versioned template (package data ``ctvlp/prompts/<name>.yaml``), the messages
of one report (anatomy list and catalog first, the fenced report last), the repair request, and the
answer's JSON schema with the ``response_format`` that carries it in each structured-output mode."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from ... import catalog as _cat
from ...catalog import Disease
from ..schema import PRESENCES

DEFAULT_PROMPT = "report_v2"
PROMPT_VERSION = DEFAULT_PROMPT

# structured-output modes, tried in this order by response_format "auto"
MODES = ("json_schema", "json_object_schema", "json_object", "none")

REPAIR_ANSWER_CHARS = 4000  # the failed answer sent back in the repair request is cut to this


@dataclass(frozen=True)
class Prompt:
    version: str
    digest: str  # sha256 of the template file
    system: str
    user: str
    repair: str
    anatomies: dict[str, str]


@cache
def load_prompt(name: str = DEFAULT_PROMPT) -> Prompt:
    """Load ``ctvlp/prompts/<name>.yaml`` (package data); its version is its file name."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"bad prompt name {name!r}")
    resource = resources.files("ctvlp").joinpath("prompts", f"{name}.yaml")
    if not resource.is_file():
        raise FileNotFoundError(f"prompt template {name!r} not found in ctvlp/prompts/")
    raw = resource.read_text(encoding="utf-8")
    data = yaml.safe_load(raw)
    if data.get("version") != name:
        raise ValueError(f"prompt {name}.yaml has version {data.get('version')!r}; it must be {name!r}")
    covers = {str(anatomy): str(what) for anatomy, what in (data.get("anatomies") or {}).items()}
    names = _cat.anatomy_names()
    if list(covers) != names:
        missing = [a for a in names if a not in covers]
        extra = [a for a in covers if a not in names]
        raise ValueError(
            f"prompt {name}.yaml: `anatomies` must list the catalog anatomies in catalog order "
            f"(missing {missing}, unknown {extra})"
        )
    for key in ("system", "user", "repair"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"prompt {name}.yaml lacks a `{key}` template")
    return Prompt(
        version=name,
        digest=hashlib.sha256(raw.encode()).hexdigest(),
        system=data["system"].strip(),
        user=data["user"].strip(),
        repair=data["repair"].strip(),
        anatomies=covers,
    )


def _fill(template: str, **values: str) -> str:
    """Replace {name} placeholders in one pass; other braces (JSON examples, report text) stay."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


_PLAIN_SYNONYM = re.compile(r"^[A-Za-z][A-Za-z0-9 '\-]*$")


def disease_line(disease: Disease) -> str:
    """The catalog line of one disease: "- id: name (where; also: up to 3 plain synonyms)"."""
    synonyms = [
        s for s in disease.synonyms if _PLAIN_SYNONYM.match(s) and s.lower() != disease.name.lower()
    ][:3]
    own = {disease.anatomy, *(s.lower() for s in _cat.anatomy_by_name(disease.anatomy).synonyms)}
    where = disease.anatomy if disease.organ.lower() in own else f"any site, filed under {disease.anatomy}"
    also = f"; also: {', '.join(synonyms)}" if synonyms else ""
    return f"- {disease.id}: {disease.name} ({where}{also})"


def report_fence(report: str) -> str:
    """The line that opens and closes the report in the prompt: it names a digest of the report
    itself, so the report cannot contain it (it would have to hold its own hash)."""
    salt = 0
    while True:
        fence = f"<<<REPORT {hashlib.sha256(f'{salt}:{report}'.encode()).hexdigest()[:16]}>>>"
        if fence not in report:
            return fence
        salt += 1


def build_messages(prompt: Prompt, diseases: Sequence[Disease], report: str) -> list[dict]:
    anatomies = "\n".join(f"- {anatomy}: {covers}" for anatomy, covers in prompt.anatomies.items())
    disease_lines = "\n".join(disease_line(d) for d in diseases) or "(none)"
    report = report.strip()
    user = _fill(prompt.user, anatomies=anatomies, diseases=disease_lines, report=report, fence=report_fence(report))
    return [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": user},
    ]


def repair_messages(prompt: Prompt, messages: list[dict], answer: str | None, error: str) -> list[dict]:
    """``messages`` followed by the failed answer (cut to REPAIR_ANSWER_CHARS) and the repair
    request that tells the model why it could not be used."""
    return messages + [
        {"role": "assistant", "content": (answer or "")[:REPAIR_ANSWER_CHARS]},
        {"role": "user", "content": _fill(prompt.repair, error=error)},
    ]


def answer_schema(diseases: Sequence[Disease]) -> dict:
    """JSON schema of an answer (enums of anatomy names and catalog ids), for structured output."""
    finding = {
        "type": "object",
        "properties": {
            "disease": {"type": "string", "enum": [d.id for d in diseases]},
            "presence": {"type": "string", "enum": list(PRESENCES)},
        },
        "required": ["disease", "presence"],
        "additionalProperties": False,
    }
    findings: dict = {"type": "array", "items": finding}
    if not diseases:
        findings = {"type": "array", "items": {"type": "object"}, "maxItems": 0}
    return {
        "type": "object",
        "properties": {
            "anatomies": {
                "type": "array",
                "maxItems": len(_cat.anatomies()),
                "items": {
                    "type": "object",
                    "properties": {
                        "anatomy": {"type": "string", "enum": _cat.anatomy_names()},
                        "text": {"type": "string"},
                        "status": {"type": "string", "enum": ["normal", "abnormal"]},
                        "findings": findings,
                    },
                    "required": ["anatomy", "text", "status", "findings"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["anatomies"],
        "additionalProperties": False,
    }


def response_format_for(mode: str, schema: dict) -> dict | None:
    """The request's ``response_format`` in one of ``MODES`` (None: send none)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "report_anatomies", "strict": True, "schema": schema}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    return None
