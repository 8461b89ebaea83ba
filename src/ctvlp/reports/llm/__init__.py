"""Radiology report parsing with an LLM behind any OpenAI-compatible endpoint (backend "llm").

Produces exactly the frame of the rules backend (``ctvlp.reports.schema.REPORT_SCHEMA``): one row
per (case, anatomy) for all 36 anatomies of ``catalog.anatomies()``, with backend "llm", model = the
configured model name and prompt_version = the prompt file's version ("report_v2").

Modules, each importing only those before it: ``prompt`` (template, messages, answer schema,
response formats), ``answer`` (validation and merging of one answer), ``cache`` (keys and atomic
entries), ``client`` (the server: key, reachability, retries, format probing, errors), ``parser``
(config resolution, many reports through a thread pool, rows, stats).

Config (``cfg`` dict): the keys of the config schema's ``reports.llm`` section (the schema of
``ctvlp.config``, which holds every default, type and bound) plus
``catalog`` (the schema's ``reports.catalog``). ``parser.resolve_config`` checks them with
``ctvlp.config.validate`` (a ``ConfigError`` names the key; unknown keys are an error; a None value
means the schema's default) and adds what the schema cannot say: ``model`` is required and
``base_url`` must be an http(s) URL.
  base_url       OpenAI-compatible endpoint, e.g. "http://127.0.0.1:8000/v1"
  model          served model name (sent with every request and written to the `model` column)
  api_key_env    NAME of the environment variable holding the API key. The key itself never
                 appears in config, logs, outputs or exceptions; an unset/empty variable (a local
                 server) sends the placeholder "not-needed". A value shaped like a token (sk-,
                 hf_, ghp_, github_pat_, xox, AKIA, long high-entropy) is refused by the config
                 check, without being shown.
  concurrency    requests in flight (a thread pool)
  timeout_s      per-request timeout (seconds)
  max_retries    retries of one request, at most, whatever their causes: timeouts, connection
                 errors, 408/409/429 and 5xx are retried by the openai SDK (its backoff: 0.5 s *
                 2**n capped at 8 s, minus up to 25 % jitter, or the server's Retry-After when it
                 is at most 120 s; a longer one is not retried); 200 answers that are not a chat
                 completion by the client (``client.LLMClient.backoff``). All are counted in
                 ``stats.retries``
  backoff_s      first backoff delay before re-sending a 200 answer that is not a chat completion
                 (backoff_s * 2**n, capped at 30 s, times a 0.5-1.5 jitter); the SDK's backoff
                 above is not configurable
  cache_dir      on-disk answer cache (see below). No default here (the schema's is null):
                 ``parse_reports`` raises ValueError without it; the reports stage
                 (``ctvlp.reports.stage.write_reports``) fills it with ``llm_cache/`` beside its output
  catalog        disease catalog name or YAML path (``catalog.diseases``)
  temperature    sampling temperature (0: as deterministic as the server allows)
  max_tokens     completion token limit per request
  response_format  "auto" | "json_schema" | "json_object_schema" | "json_object" | "none"
  retry_unparsed   no effect (kept for older configs): unparsed outcomes are never cached
  max_unparsed_in_row  stop the run when this many reports in a row end unparsed, or when it ends
                 with every report unparsed and none cached (0: never)
  prompt         prompt template name (package data ``ctvlp/prompts/<name>.yaml``), e.g. "report_v2"

Prompt. ``prompts/report_v2.yaml`` (system + user + repair templates, and what each anatomy covers)
asks the model for ``{"anatomies": [{"anatomy", "text", "status", "findings": [{"disease",
"presence"}]}]}``: only the anatomies the report describes, each with its sentences, normal/abnormal
and the catalog diseases it mentions with presence present/absent/uncertain -- the <region, finding,
existence> triplets of ASG. The anatomy list and the catalog are in the prompt before the report
(fenced by a line naming a digest of the report, so that no report text can close its block), so
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
report gives all "not_mentioned" with error "empty report" without a request. Reports are read as
the rules backend reads them (``schema.clean_text``). A non-English report is sent like any other
(the prompt asks to parse it in its language; unlike the rules backend, which refuses it).

Cache. One JSON file per validated answer under ``cache_dir``, named by sha256 of (prompt version, a
digest of the prompt file, model, a digest of the disease catalog, report text); ``entry_key``
computes it. Each file is written atomically (temp file + ``os.replace``) as soon as its report is
parsed, so a re-run sends no request for parsed reports and a run killed midway loses nothing it
finished. Only validated answers are cached: a report that ended unparsed is sent again by a re-run,
and a file that is not a usable answer (an "unparsed" entry of an older ctvlp, a wrong shape) is
removed when read. Never cached either: transient failures (connection errors, timeouts, 429/5xx,
200 answers that are not a chat completion, after all retries). When one happens the run stops
submitting work, lets requests in flight finish (parsed ones are cached) and raises
``LLMServerError`` naming the URL and the problem: a re-run resumes. Identical report texts are sent
once.

Errors (all ``LLMError``; the reports stage turns them into a non-zero exit with the message).
401/403 (reachability check or any request) raise ``LLMAuthError`` naming the env var, not the key.
404/405/410 on a chat request raise ``LLMSystematicError`` at once (a wrong URL or model: every
request would fail), as do ``max_unparsed_in_row`` unparsed reports in a row. A 200 whose body is
not a chat completion (truncated JSON, an HTML page, a JSON error object, no choices, a non-JSON
content type) is retried, then ``LLMServerError``.

Secrets. The key, and credentials in ``base_url`` (only as ${NAME} references to environment
variables; the config check refuses literal ones), are expanded by the client, sent as headers
(the URL the HTTP stack sees and logs holds none), and redacted from every message built here, the
cache entries and every log record (a filter on the root logger's handlers); messages show the URL
redacted.

Reachability. Before the first request ``client.models.list()`` (timeout min(10, timeout_s), no
retries) must answer, else ``LLMUnreachableError`` naming the base URL. It is skipped when every
report is cached or empty (a cached re-run works offline). A model name missing from a non-empty
model list is logged as a warning (some servers serve any name).

API: ``parse_reports(cases, cfg, stats=None, progress=False)``; ``LLMStats`` counts requests, cache
hits, retries, repairs, unparsed, tokens. Writing the Parquet of a manifest is the reports stage's
(``ctvlp.reports.stage.write_reports``).
"""

from __future__ import annotations

import polars as pl

from .answer import validate_answer
from .cache import entry_key
from .client import LLMAuthError, LLMError, LLMServerError, LLMSystematicError, LLMUnreachableError
from .parser import BACKEND, LLMReportParser, LLMStats
from .prompt import PROMPT_VERSION, answer_schema, build_messages, load_prompt, report_fence

__all__ = [
    "BACKEND",
    "PROMPT_VERSION",
    "LLMAuthError",
    "LLMError",
    "LLMReportParser",
    "LLMServerError",
    "LLMStats",
    "LLMSystematicError",
    "LLMUnreachableError",
    "answer_schema",
    "build_messages",
    "entry_key",
    "load_prompt",
    "parse_reports",
    "report_fence",
    "validate_answer",
]


def parse_reports(
    cases: pl.DataFrame, cfg: dict, *, stats: LLMStats | None = None, progress: bool = False
) -> pl.DataFrame:
    """Parse ``cases`` (columns case_id, report_text) into a REPORT_SCHEMA frame (36 rows per case).

    ``cfg``: see the module docstring (``cache_dir`` is required here). ``stats``: an ``LLMStats``
    to fill (requests, cache hits, retries, repairs, unparsed, tokens). ``progress``: a progress bar.
    Raises ``ConfigError`` for a bad config, ``LLMUnreachableError`` before any work when the server
    does not answer, ``LLMAuthError`` when it refuses the key, ``LLMServerError`` when a request
    fails for a transient reason after all retries and ``LLMSystematicError`` when every request
    would fail (what was parsed is cached; a re-run resumes).
    """
    return LLMReportParser(cfg, stats).parse(cases, progress=progress)
