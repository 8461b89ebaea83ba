"""Radiology report parsing with an LLM behind any OpenAI-compatible endpoint (backend "llm").

Produces exactly the frame of the rules backend (``ctvlp.reports.REPORT_SCHEMA``): one row per
(case, anatomy) for all 36 anatomies of ``catalog.anatomies()``, with backend "llm", model = the
configured model name and prompt_version = the prompt file's version ("report_v2").

Config (``cfg`` dict; ``DEFAULTS`` lists every key, unknown keys are an error):
  base_url       OpenAI-compatible endpoint, e.g. "http://127.0.0.1:8000/v1"
  model          served model name (sent with every request and written to the `model` column)
  api_key_env    NAME of the environment variable holding the API key. The key itself never
                 appears in config, logs, outputs or exceptions; an unset/empty variable (a local
                 server) sends the placeholder "not-needed".
  concurrency    requests in flight (a thread pool)
  timeout_s      per-request timeout (seconds)
  max_retries    retries of one request on timeouts, connection errors, 408/409/429 and 5xx, with
                 exponential backoff (backoff_s * 2**attempt, capped at 30 s, times a 0.5-1.5
                 jitter; a Retry-After header is honoured up to 60 s)
  backoff_s      first backoff delay
  cache_dir      on-disk answer cache (see below)
  catalog        disease catalog name or YAML path (``catalog.diseases``)
  temperature    sampling temperature (0: as deterministic as the server allows)
  max_tokens     completion token limit per request
  response_format  "auto" (default) | "json_schema" | "json_object_schema" | "json_object" | "none"
  retry_unparsed   re-send reports whose cached outcome is "unparsed" (default False)
  prompt         prompt template name (package data ``ctvlp/prompts/<name>.yaml``), "report_v2"

Prompt. ``prompts/report_v2.yaml`` (system + user + repair templates, and what each anatomy covers)
asks the model for ``{"anatomies": [{"anatomy", "text", "status", "findings": [{"disease",
"presence"}]}]}``: only the anatomies the report describes, each with its sentences, normal/abnormal
and the catalog diseases it mentions with presence present/absent/uncertain -- the <region, finding,
existence> triplets of ASG. The anatomy list and the catalog are in the prompt before the report, so
the prompt prefix is the same for every report (servers with prefix caching reuse it).

Structured output. ``response_format="auto"`` tries, on the first request, OpenAI's
``{"type": "json_schema", ...}`` (strict schema with enums of the 36 anatomy names and the catalog
ids), then ``{"type": "json_object", "schema": ...}`` (the grammar-constrained JSON mode of
llama-cpp-python's server, which refuses "json_schema": its request validation error comes back as
HTTP 500), then plain ``{"type": "json_object"}``, then no response_format. While probing, an
answer 400/415/422/500/501 whose message names the response format moves to the next mode (counted
in ``stats.format_probes``). The first mode the server accepts is kept (``stats.mode``) for the rest
of the run and, per (base_url, model), for later runs in the same process. A fixed
``response_format`` skips the probing.

Validation. Every answer is parsed (code fences and text around the outermost braces are
tolerated) and validated with pydantic: invalid or truncated JSON (finish_reason "length"), missing
fields, unknown anatomy names or disease ids (ids or exact catalog names; case, spaces and hyphens
are normalised) get ONE repair request that sends the error back to the model; if the repaired answer
fails too, or a request is rejected (400-class, e.g. a report longer than the server's context), every
anatomy row of the case is "unparsed" with the reason in `error` -- never silently "normal". Then:
anatomies the model omits are "not_mentioned"; duplicate entries are merged; a finding is filed
under its catalog anatomy (as in the rules backend); an anatomy with a present or uncertain finding is
"abnormal" whatever status the model gave; an entry "not_mentioned" without such findings is dropped;
an answer with no anatomy at all gives all "not_mentioned" with error "no anatomy mentioned". An empty
report gives all "not_mentioned" with error "empty report" without a request. A non-English report
is sent like any other (the prompt asks to parse it in its language; unlike the rules backend, which
refuses it).

Cache. One JSON file per answer under ``cache_dir``, named by sha256 of (prompt version, a digest
of the prompt file, model, a digest of the disease catalog, report text); ``entry_key`` computes it.
Each file is written atomically (temp file + ``os.replace``) as soon as its report is done, so a
re-run sends no request for finished reports and a run killed midway loses nothing it finished. The
final outcome is cached, "unparsed" included (with its reason and the raw answers), so a re-run does
not pay again for answers the model cannot get right; ``retry_unparsed=True`` re-sends those. What is
NOT cached: transient failures (connection errors, timeouts, 429/5xx after all retries). When one
happens the run stops submitting work, lets requests in flight finish (they are cached) and raises
``LLMServerError``: a re-run resumes. Identical report texts are sent once.

Errors. 401/403 (reachability check or any request) raise ``LLMAuthError`` naming the env var,
not the key; the key is also scrubbed from every error message this module builds.

Reachability. Before the first request ``client.models.list()`` (timeout min(10, timeout_s), no
retries) must answer, else ``LLMUnreachableError`` naming the base URL. It is skipped when every
report is cached or empty (a cached re-run works offline). A model name missing from a non-empty
model list is logged as a warning (some servers serve any name).

API: ``parse_reports_llm(cases, cfg, stats=None)``, ``write_reports_llm(manifest, out, cfg,
stats=None)``; ``LLMStats`` counts requests, cache hits, retries, repairs, unparsed, tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from . import catalog as _cat
from .catalog import Disease
from .reports import ERR_EMPTY, ERR_NO_ANATOMY, PRESENCES, REPORT_SCHEMA, clean_text

log = logging.getLogger(__name__)

BACKEND = "llm"
DEFAULT_PROMPT = "report_v2"
CACHE_FORMAT = 1
API_KEY_PLACEHOLDER = "not-needed"

DEFAULTS: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8000/v1",
    "model": None,  # required
    "api_key_env": "OPENAI_API_KEY",
    "concurrency": 4,
    "timeout_s": 120.0,
    "max_retries": 4,
    "backoff_s": 1.0,
    "cache_dir": ".cache/ctvlp/reports_llm",
    "catalog": "demo",
    "temperature": 0.0,
    "max_tokens": 1024,
    "response_format": "auto",
    "retry_unparsed": False,
    "prompt": DEFAULT_PROMPT,
}
MODES = ("json_schema", "json_object_schema", "json_object", "none")
RETRY_STATUS = frozenset({408, 409, 429})
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
REPAIR_ANSWER_CHARS = 4000  # the failed answer sent back in the repair request is cut to this

ERR_UNREACHABLE = "LLM server unreachable"

# response_format mode found per (base_url, model) in this process: later runs do not probe again
_MODE_MEMO: dict[tuple[str, str], str] = {}
_MODE_MEMO_LOCK = threading.Lock()


class LLMUnreachableError(RuntimeError):
    """The endpoint did not answer the reachability check (raised before any work)."""


class LLMServerError(RuntimeError):
    """A request failed for a transient reason (after all retries); finished reports are cached."""


class LLMAuthError(RuntimeError):
    """The endpoint rejected the API key (401/403)."""


# ----------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class Prompt:
    version: str
    digest: str  # sha256 of the template file
    system: str
    user: str
    repair: str
    anatomies: dict[str, str]


@lru_cache(maxsize=None)
def load_prompt(name: str = DEFAULT_PROMPT) -> Prompt:
    """Load ``ctvlp/prompts/<name>.yaml`` (package data); its version is its file name."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"bad prompt name {name!r}")
    res = resources.files("ctvlp").joinpath("prompts", f"{name}.yaml")
    if not res.is_file():
        raise FileNotFoundError(f"prompt template {name!r} not found in ctvlp/prompts/")
    raw = res.read_text(encoding="utf-8")
    data = yaml.safe_load(raw)
    if data.get("version") != name:
        raise ValueError(f"prompt {name}.yaml has version {data.get('version')!r}; it must be {name!r}")
    covers = {str(k): str(v) for k, v in (data.get("anatomies") or {}).items()}
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


PROMPT_VERSION = DEFAULT_PROMPT


def _fill(template: str, **values: str) -> str:
    """Replace {name} placeholders in one pass; other braces (JSON examples, report text) stay."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


_PLAIN_SYNONYM = re.compile(r"^[A-Za-z][A-Za-z0-9 '\-]*$")


def _disease_line(d: Disease) -> str:
    syn = [s for s in d.synonyms if _PLAIN_SYNONYM.match(s) and s.lower() != d.name.lower()][:3]
    own = {d.anatomy, *(s.lower() for s in _cat.anatomy_by_name(d.anatomy).synonyms)}
    where = d.anatomy if d.organ.lower() in own else f"any site, filed under {d.anatomy}"
    also = f"; also: {', '.join(syn)}" if syn else ""
    return f"- {d.id}: {d.name} ({where}{also})"


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
    anatomies = "\n".join(f"- {a}: {c}" for a, c in prompt.anatomies.items())
    dl = "\n".join(_disease_line(d) for d in diseases) or "(none)"
    report = report.strip()
    return [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": _fill(prompt.user, anatomies=anatomies, diseases=dl, report=report,
                                          fence=report_fence(report))},
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
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "report_anatomies", "strict": True, "schema": schema}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


# ----------------------------------------------------------------------------- validation


def _norm_name(s: str) -> str:
    return re.sub(r"[\s\-]+", "_", s.strip().lower())


class _Finding(BaseModel):
    model_config = ConfigDict(extra="ignore")
    disease: str
    presence: Literal["present", "uncertain", "absent"]

    @field_validator("presence", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("disease")
    @classmethod
    def _known_disease(cls, v: str, info: ValidationInfo) -> str:
        alias: dict[str, str] = (info.context or {})["disease_alias"]
        key = _norm_name(v)
        if key not in alias:
            raise ValueError(f"unknown disease {v!r} (use an id from the catalog list)")
        return alias[key]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    anatomy: str
    text: str
    status: Literal["normal", "abnormal", "not_mentioned"]
    findings: list[_Finding]

    @field_validator("status", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return _norm_name(v) if isinstance(v, str) else v

    @field_validator("anatomy")
    @classmethod
    def _known_anatomy(cls, v: str, info: ValidationInfo) -> str:
        key = _norm_name(v)
        if key not in (info.context or {})["anatomies"]:
            raise ValueError(f"unknown anatomy {v!r} (use a name from the anatomy list)")
        return key


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    anatomies: list[_Entry]


class AnswerError(ValueError):
    """An answer that cannot be used; the message is what the repair request tells the model."""


def _extract_json(content: str) -> Any:
    s = content.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", s, re.S)
    if fence:
        s = fence.group(1)
    try:
        return json.loads(s)
    except json.JSONDecodeError as first:
        i, j = s.find("{"), s.rfind("}")
        if 0 <= i < j and (i > 0 or j < len(s) - 1):
            try:
                return json.loads(s[i : j + 1])
            except json.JSONDecodeError:
                pass
        raise AnswerError(f"invalid JSON: {first.msg} at char {first.pos}") from None


def _format_validation(e: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "answer"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = e.error_count() - limit
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
    ctx = {
        "anatomies": set(_cat.anatomy_names()),
        "disease_alias": {**{_norm_name(d.name): d.id for d in diseases}, **{_norm_name(d.id): d.id for d in diseases}},
    }
    try:
        answer = _Answer.model_validate(data, context=ctx)
    except ValidationError as e:
        raise AnswerError(_format_validation(e)) from None
    return _merge(answer, diseases)


def _merge(answer: _Answer, diseases: Sequence[Disease]) -> dict[str, dict]:
    by_id = {d.id: d for d in diseases}
    rank = {p: i for i, p in enumerate(PRESENCES)}
    texts: dict[str, list[str]] = {}
    status: dict[str, str] = {}
    best: dict[str, str] = {}
    first_text: dict[str, str] = {}  # disease id -> text of the entry that mentioned it
    for e in answer.anatomies:
        for f in e.findings:
            if f.disease not in best or rank[f.presence] < rank[best[f.disease]]:
                best[f.disease] = f.presence
            first_text.setdefault(f.disease, e.text.strip())
        if e.status == "not_mentioned":
            continue
        t = e.text.strip()
        if t and t not in texts.setdefault(e.anatomy, []):
            texts[e.anatomy].append(t)
        texts.setdefault(e.anatomy, [])
        if status.get(e.anatomy) != "abnormal":
            status[e.anatomy] = e.status
    findings: dict[str, list[dict]] = {}
    for d in diseases:  # catalog order
        if d.id in best:
            findings.setdefault(d.anatomy, []).append({"disease_id": d.id, "presence": best[d.id]})
    out: dict[str, dict] = {}
    for a in _cat.anatomy_names():
        fs = findings.get(a, [])
        bad = any(f["presence"] != "absent" for f in fs)
        if a not in status and not fs:
            continue
        if a not in status:  # only a finding of it was mentioned (under another anatomy)
            src = [first_text[f["disease_id"]] for f in fs if first_text.get(f["disease_id"])]
            texts[a] = list(dict.fromkeys(src))
        st = "abnormal" if bad or status.get(a) == "abnormal" else "normal"
        out[a] = {"text": " ".join(texts.get(a, [])), "status": st, "findings": fs}
    # keep only findings of a known catalog disease (always true after validation)
    assert all(f["disease_id"] in by_id for v in out.values() for f in v["findings"])
    return out


# ----------------------------------------------------------------------------- stats


@dataclass
class LLMStats:
    """What one run did; pass an instance to ``parse_reports_llm`` to inspect it (tests, logs)."""

    cases: int = 0  # input rows
    unique_reports: int = 0  # distinct non-empty report texts
    empty: int = 0  # empty reports (no request)
    cache_hits: int = 0  # distinct reports answered from the cache
    reports_requested: int = 0  # distinct reports sent to the server in this run
    requests: int = 0  # chat-completion requests sent (probes, repairs and retries included)
    format_probes: int = 0  # requests refused for their response_format while finding the mode
    retries: int = 0  # requests repeated after a transient failure
    repairs: int = 0  # repair requests (an invalid answer sent back with its error)
    unparsed: int = 0  # distinct reports whose final outcome is unparsed (cached ones included)
    transient_failures: int = 0  # reports abandoned after max_retries (not cached; run raised)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_in_flight: int = 0  # most requests in flight at once, as measured by the client
    mode: str | None = None  # response_format mode in use
    request_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end), perf_counter
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("request_spans")
        return d


# ----------------------------------------------------------------------------- cache


@lru_cache(maxsize=32)
def _catalog_digest_cached(diseases: tuple[Disease, ...]) -> str:
    payload = json.dumps([[d.id, d.name, d.anatomy, d.organ, list(d.synonyms)] for d in diseases])
    return hashlib.sha256(payload.encode()).hexdigest()


def _catalog_digest(diseases: Sequence[Disease]) -> str:
    return _catalog_digest_cached(tuple(diseases))


def entry_key(report: str, prompt: Prompt, model: str, diseases: Sequence[Disease]) -> str:
    """Cache key: sha256 over prompt version + prompt digest + model + catalog digest + sha256(report)."""
    report_sha = hashlib.sha256(report.encode()).hexdigest()
    payload = "\0".join([prompt.version, prompt.digest, model, _catalog_digest(diseases), report_sha])
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_cache(path: Path) -> dict | None:
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


# ----------------------------------------------------------------------------- config


def resolve_config(cfg: dict) -> dict:
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown reports_llm config key(s) {unknown}; known: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if not c["model"] or not isinstance(c["model"], str):
        raise ValueError("reports_llm config needs `model` (the served model name)")
    if not isinstance(c["base_url"], str) or not re.match(r"^https?://", c["base_url"]):
        raise ValueError(f"reports_llm base_url must be an http(s) URL, not {c['base_url']!r}")
    if c["response_format"] not in ("auto", *MODES):
        raise ValueError(f"reports_llm response_format must be auto or one of {MODES}")
    for k in ("concurrency", "max_tokens"):
        if int(c[k]) < 1:
            raise ValueError(f"reports_llm {k} must be >= 1")
    if int(c["max_retries"]) < 0:
        raise ValueError("reports_llm max_retries must be >= 0")
    if float(c["timeout_s"]) <= 0:
        raise ValueError("reports_llm timeout_s must be > 0")
    if c["api_key_env"] is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(c["api_key_env"])):
        raise ValueError("reports_llm api_key_env must be the NAME of an environment variable")
    return c


# ----------------------------------------------------------------------------- parser


class _Transient(Exception):
    pass


class _Rejected(Exception):
    """A 400-class answer to one request (not about the response format)."""


class _FormatRejected(Exception):
    """While probing: the server refused the response_format (llama-cpp's server answers 500)."""


# statuses with which servers refuse a response_format they do not know (llama-cpp-python's server
# turns its request-validation error into a 500), recognised only while probing and only when the
# error message names the response format
FORMAT_REJECT_STATUS = frozenset({400, 415, 422, 500, 501})
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema")


class LLMReportParser:
    """Parses reports with one endpoint; holds the client, the chosen response mode and the stats."""

    def __init__(self, cfg: dict, stats: LLMStats | None = None):
        self.cfg = resolve_config(cfg)
        self.stats = stats if stats is not None else LLMStats()
        self.prompt = load_prompt(self.cfg["prompt"])
        self.diseases = _cat.diseases(self.cfg["catalog"])
        self.schema = answer_schema(self.diseases)
        self.cache_dir = Path(self.cfg["cache_dir"])
        self.base_url = self.cfg["base_url"].rstrip("/")
        env = self.cfg["api_key_env"]
        key = os.environ.get(env, "") if env else ""
        self._secret = key or None
        self._api_key = key or API_KEY_PLACEHOLDER
        rf = self.cfg["response_format"]
        with _MODE_MEMO_LOCK:
            known = _MODE_MEMO.get((self.base_url, self.cfg["model"])) if rf == "auto" else None
        self._modes = list(MODES) if rf == "auto" else [rf]
        self._mode_i = self._modes.index(known) if known else 0
        self._mode_decided = rf != "auto" or known is not None
        self.stats.mode = None if rf == "auto" and not known else self._modes[self._mode_i]
        self._mode_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._client = None

    # -- helpers
    def _scrub(self, msg: str) -> str:
        if self._secret:
            msg = msg.replace(self._secret, "***")
        return msg

    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("the LLM report backend needs the `openai` package (pip install openai)") from e
            self._client = openai.OpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=float(self.cfg["timeout_s"]),
                max_retries=0,  # retries are ours (counted, with jitter)
            )
        return self._client

    def check_reachable(self) -> None:
        import openai

        c = self.client().with_options(timeout=min(10.0, float(self.cfg["timeout_s"])), max_retries=0)
        try:
            models = c.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise LLMAuthError(
                f"LLM server at {self.base_url} rejected the API key from env var "
                f"{self.cfg['api_key_env']!r} ({'set' if self._secret else 'unset'}); HTTP {e.status_code}"
            ) from None
        except openai.APIStatusError as e:  # it answered: reachable (some servers lack /models)
            log.warning("LLM server at %s answered /models with HTTP %s", self.base_url, e.status_code)
            return
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise LLMUnreachableError(
                f"{ERR_UNREACHABLE}: no answer from {self.base_url} ({type(e).__name__}: "
                f"{self._scrub(str(e))}); start the server or fix reports_llm.base_url"
            ) from None
        ids = [m.id for m in getattr(models, "data", []) or []]
        if ids and self.cfg["model"] not in ids:
            log.warning(
                "model %r is not in the model list of %s (%s); sending it anyway",
                self.cfg["model"], self.base_url, ", ".join(ids[:10]),
            )

    def _backoff(self, attempt: int, exc: Exception) -> float:
        delay = min(float(self.cfg["backoff_s"]) * 2**attempt, MAX_BACKOFF_S) * (0.5 + random.random())
        resp = getattr(exc, "response", None)
        ra = resp.headers.get("retry-after") if resp is not None else None
        if ra:
            try:
                delay = max(delay, min(float(ra), MAX_RETRY_AFTER_S))
            except ValueError:
                pass
        return delay

    def _send(self, messages: list[dict], mode: str, probing: bool = False):
        """One request with retries on transient errors. Returns the completion."""
        import openai

        kwargs: dict[str, Any] = dict(
            model=self.cfg["model"],
            messages=messages,
            temperature=float(self.cfg["temperature"]),
            max_tokens=int(self.cfg["max_tokens"]),
        )
        rf = response_format_for(mode, self.schema)
        if rf is not None:
            kwargs["response_format"] = rf
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Transient("run stopped after another request failed")
            with self._stats_lock:
                self.stats.requests += 1
                self._in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
            t0 = time.perf_counter()
            try:
                resp = self.client().chat.completions.create(**kwargs)
                err: Exception | None = None
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                err, retry = e, True
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise LLMAuthError(
                    f"LLM server at {self.base_url} rejected the API key from env var "
                    f"{self.cfg['api_key_env']!r}; HTTP {e.status_code}"
                ) from None
            except openai.APIStatusError as e:
                err, retry = e, (e.status_code in RETRY_STATUS or e.status_code >= 500)
            finally:
                with self._stats_lock:
                    self._in_flight -= 1
                    self.stats.request_spans.append((t0, time.perf_counter()))
            if (
                err is not None and probing and getattr(err, "status_code", None) in FORMAT_REJECT_STATUS
                and any(w in self._status_message(err).lower() for w in _FORMAT_WORDS)
            ):
                with self._stats_lock:
                    self.stats.format_probes += 1
                raise _FormatRejected(self._status_message(err)) from None
            if err is None:
                u = getattr(resp, "usage", None)
                if u is not None:
                    with self._stats_lock:
                        self.stats.prompt_tokens += int(getattr(u, "prompt_tokens", 0) or 0)
                        self.stats.completion_tokens += int(getattr(u, "completion_tokens", 0) or 0)
                return resp
            if not retry:
                raise _Rejected(self._status_message(err)) from None
            if attempt >= int(self.cfg["max_retries"]):
                raise _Transient(f"{self._status_message(err)} (after {attempt} retries)") from None
            time.sleep(self._backoff(attempt, err))
            attempt += 1
            with self._stats_lock:
                self.stats.retries += 1

    def _status_message(self, e: Exception) -> str:
        code = getattr(e, "status_code", None)
        body = getattr(e, "body", None)
        msg = None
        if isinstance(body, dict):
            inner = body.get("error", body)
            msg = inner.get("message") if isinstance(inner, dict) else str(inner)
            if msg is None and "detail" in body:
                msg = json.dumps(body["detail"])[:500]
        msg = msg or str(e)
        msg = " ".join(str(msg).split())[:500]
        return self._scrub(f"HTTP {code}: {msg}" if code else f"{type(e).__name__}: {msg}")

    def _chat(self, messages: list[dict]):
        """Send with the decided response mode; on the first request(s), find the mode."""
        if self._mode_decided:
            return self._send(messages, self._modes[self._mode_i])
        with self._mode_lock:
            if self._mode_decided:
                return self._send(messages, self._modes[self._mode_i])
            while True:
                mode = self._modes[self._mode_i]
                try:
                    resp = self._send(messages, mode, probing=True)
                except _FormatRejected as e:
                    if self._mode_i + 1 >= len(self._modes):
                        raise _Rejected(str(e)) from None
                    log.info("response_format %s refused by %s (%s); trying %s",
                             mode, self.base_url, e, self._modes[self._mode_i + 1])
                    self._mode_i += 1
                    continue
                self._mode_decided = True
                self.stats.mode = mode
                with _MODE_MEMO_LOCK:
                    _MODE_MEMO[(self.base_url, self.cfg["model"])] = mode
                log.info("LLM structured output mode: %s", mode)
                return resp

    # -- one report
    def _parse_one(self, report: str) -> dict:
        """Request + validate (+ one repair). Returns a cache entry; raises _Transient."""
        messages = build_messages(self.prompt, self.diseases, report)
        raw: list[str | None] = []
        errors: list[str] = []
        mtok = int(self.cfg["max_tokens"])
        for attempt in range(2):
            try:
                resp = self._chat(messages)
            except _Rejected as e:
                errors.append(f"request rejected: {e}")
                break
            choice = resp.choices[0] if resp.choices else None
            content = choice.message.content if choice is not None else None
            finish = getattr(choice, "finish_reason", None) if choice is not None else None
            raw.append(content)
            try:
                anatomies = validate_answer(content, self.diseases, finish, mtok)
            except AnswerError as e:
                errors.append(str(e))
                if attempt == 0:
                    with self._stats_lock:
                        self.stats.repairs += 1
                    messages = messages + [
                        {"role": "assistant", "content": (content or "")[:REPAIR_ANSWER_CHARS]},
                        {"role": "user", "content": _fill(self.prompt.repair, error=str(e))},
                    ]
                continue
            error = None if anatomies else ERR_NO_ANATOMY
            return self._entry("parsed", error, anatomies, raw, len(raw), errors)
        if errors[0].startswith("request rejected"):
            reason = errors[0]
        elif len(errors) == 1:
            reason = f"invalid answer: {errors[0]}"
        else:
            reason = f"invalid answer: {errors[0]}; after repair: {errors[1]}"
        return self._entry("unparsed", reason[:1000], {}, raw, len(raw), errors)

    def _entry(self, outcome: str, error: str | None, anatomies: dict, raw: list, n: int, errors: list) -> dict:
        return {
            "cache_format": CACHE_FORMAT,
            "outcome": outcome,
            "error": error,
            "anatomies": anatomies,
            "prompt_version": self.prompt.version,
            "model": self.cfg["model"],
            "catalog": str(self.cfg["catalog"]),
            "response_format": self.stats.mode,
            "answers": n,
            "errors": errors,
            "raw": [r[:20000] if isinstance(r, str) else r for r in raw],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # -- rows
    def _rows(self, case_id: str, entry: dict | None, error: str | None = None) -> list[dict]:
        if entry is None:
            anatomies, err, unparsed = {}, error, False
        else:
            unparsed = entry["outcome"] == "unparsed"
            anatomies, err = entry["anatomies"], entry["error"]
        rows = []
        for a in _cat.anatomy_names():
            v = anatomies.get(a)
            rows.append(
                {
                    "case_id": case_id,
                    "anatomy": a,
                    "text": v["text"] if v else "",
                    "status": "unparsed" if unparsed else (v["status"] if v else "not_mentioned"),
                    "findings": list(v["findings"]) if v else [],
                    "backend": BACKEND,
                    "model": self.cfg["model"],
                    "prompt_version": self.prompt.version,
                    "error": err,
                }
            )
        return rows

    # -- many reports
    def parse(self, cases: pl.DataFrame, *, progress: bool = False) -> pl.DataFrame:
        missing = {"case_id", "report_text"} - set(cases.columns)
        if missing:
            raise ValueError(f"cases lack column(s) {sorted(missing)}")
        t_start = time.perf_counter()
        st = self.stats
        pairs = [(str(c), t) for c, t in cases.select("case_id", "report_text").iter_rows()]
        st.cases = len(pairs)
        keys: dict[str, str] = {}  # key -> report text
        case_key: list[str | None] = []
        for _, text in pairs:
            text = clean_text(text)  # as the rules backend reads it: NFKC, no control/invisible characters
            if text is None or not str(text).strip():
                st.empty += 1
                case_key.append(None)
                continue
            k = entry_key(str(text), self.prompt, self.cfg["model"], self.diseases)
            keys.setdefault(k, str(text))
            case_key.append(k)
        st.unique_reports = len(keys)
        entries: dict[str, dict] = {}
        todo: list[str] = []
        for k in keys:
            e = _read_cache(self.cache_dir / f"{k}.json")
            if e is not None and not (e["outcome"] == "unparsed" and self.cfg["retry_unparsed"]):
                entries[k] = e
                st.cache_hits += 1
            else:
                todo.append(k)
        if todo:
            self.check_reachable()
            self._run(todo, keys, entries, progress)
        st.unparsed = sum(1 for e in entries.values() if e["outcome"] == "unparsed")
        rows: list[dict] = []
        for (case_id, _), k in zip(pairs, case_key, strict=True):
            rows.extend(self._rows(case_id, entries.get(k) if k else None, None if k else ERR_EMPTY))
        st.wall_s = time.perf_counter() - t_start
        log.info("reports_llm: %s", {k: v for k, v in st.as_dict().items()})
        return pl.DataFrame(rows, schema=REPORT_SCHEMA)

    def _run(self, todo: list[str], keys: dict[str, str], entries: dict[str, dict], progress: bool) -> None:
        st = self.stats
        self._stop.clear()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="reports (llm)", unit="report")

        def work(k: str) -> dict:
            if self._stop.is_set():
                raise _Transient("run stopped after another request failed")
            with self._stats_lock:
                st.reports_requested += 1
            entry = self._parse_one(keys[k])
            _write_atomic(self.cache_dir / f"{k}.json", entry)  # as results arrive
            return entry

        failure: str | None = None
        n_failed = 0
        n_unparsed = 0
        with ThreadPoolExecutor(max_workers=int(self.cfg["concurrency"]), thread_name_prefix="reports-llm") as ex:
            futs: dict[Future, str] = {ex.submit(work, k): k for k in todo}
            pending = set(futs)
            try:
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for f in done:
                        k = futs[f]
                        if f.cancelled():
                            continue
                        exc = f.exception()
                        if exc is None:
                            entries[k] = f.result()
                            n_unparsed += entries[k]["outcome"] == "unparsed"
                        elif isinstance(exc, _Transient):
                            n_failed += 1
                            if failure is None:
                                failure = str(exc)
                                self._stop.set()
                                for p in pending:
                                    p.cancel()
                        else:
                            self._stop.set()
                            for p in pending:
                                p.cancel()
                            raise exc
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(
                                prompt_tok=st.prompt_tokens, compl_tok=st.completion_tokens,
                                unparsed=n_unparsed,
                                refresh=False,
                            )
            except BaseException:
                self._stop.set()
                for p in futs:
                    p.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
        if failure is not None:
            st.transient_failures = n_failed
            done_now = sum(1 for k in todo if k in entries)
            raise LLMServerError(
                f"LLM server at {self.base_url} failed: {failure}. {done_now} of {len(todo)} reports sent in this "
                f"run finished and are cached in {self.cache_dir} ({st.cache_hits} were cached before); "
                "re-run to resume"
            )


# ----------------------------------------------------------------------------- API


def parse_reports_llm(
    cases: pl.DataFrame, cfg: dict, *, stats: LLMStats | None = None, progress: bool = False
) -> pl.DataFrame:
    """Parse ``cases`` (columns case_id, report_text) into a REPORT_SCHEMA frame (36 rows per case).

    ``stats``: an ``LLMStats`` to fill (requests, cache hits, retries, repairs, unparsed, tokens).
    Raises ``LLMUnreachableError`` before any work when the server does not answer, and
    ``LLMServerError`` when a request fails for a transient reason after all retries (what finished is
    cached; a re-run resumes).
    """
    return LLMReportParser(cfg, stats).parse(cases, progress=progress)


def write_reports_llm(
    manifest_path: str | Path, out_path: str | Path, cfg: dict, *, stats: LLMStats | None = None
) -> pl.DataFrame:
    """Read a manifest Parquet (case_id, report_text, ...), parse its reports, write REPORT_SCHEMA Parquet."""
    manifest = pl.read_parquet(manifest_path)
    df = parse_reports_llm(manifest, cfg, stats=stats, progress=True)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, out)
    return df
