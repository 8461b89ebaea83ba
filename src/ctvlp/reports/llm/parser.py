"""Parsing many reports: the config resolved against the config schema, identical reports sent
once, cached answers reused, the rest sent through a thread pool (with a progress bar) with one
repair request per invalid answer, each validated answer cached at once, and the result as
``REPORT_SCHEMA`` rows (36 per case); ``LLMStats`` counts what a run did. A run stops
(``LLMSystematicError``) when ``max_unparsed_in_row`` reports in a row end unparsed, or when it
ends with every report unparsed: a wrong model, prompt or server, not hard reports."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ... import catalog as _cat
from ... import config as _config
from ...progress import counter as progress_counter
from ..schema import ERR_EMPTY, ERR_NO_ANATOMY, REPORT_SCHEMA, clean_text
from .answer import AnswerError, validate_answer
from .cache import entry_key, make_entry, read_entry, write_entry
from .client import (
    LLMClient,
    LLMServerError,
    LLMSystematicError,
    RequestRejected,
    RequestStats,
    RunStopped,
    TransientError,
)
from .prompt import answer_schema, build_messages, load_prompt, repair_messages

log = logging.getLogger(__name__)

BACKEND = "llm"


@dataclass
class LLMStats(RequestStats):
    """What one run did; pass an instance to ``parse_reports`` to inspect it (tests, logs). The
    request counters (requests, format_probes, retries, tokens, max_in_flight, mode,
    request_spans) are ``RequestStats``'s, filled by the client."""

    cases: int = 0  # input rows
    unique_reports: int = 0  # distinct non-empty report texts
    empty: int = 0  # empty reports (no request)
    cache_hits: int = 0  # distinct reports answered from the cache
    reports_requested: int = 0  # distinct reports sent to the server in this run
    repairs: int = 0  # repair requests (an invalid answer sent back with its error)
    unparsed: int = 0  # distinct reports whose final outcome is unparsed (never cached: re-sent by a re-run)
    unparsed_in_row: int = 0  # longest run of reports in a row (completion order) that ended unparsed
    transient_failures: int = 0  # reports abandoned after max_retries (not cached; run raised)
    wall_s: float = 0.0


def resolve_config(cfg: dict) -> dict:
    """``cfg`` (the keys of the config schema's ``reports.llm`` section, plus ``catalog``, which is
    ``reports.catalog`` there) checked by ``ctvlp.config.validate`` and completed with the schema's
    defaults; a None value means the default. Raises ``ConfigError`` naming the key. ``cache_dir``
    may stay None (the schema's default): whoever runs the parser fills it."""
    given = {key: os.fspath(value) if isinstance(value, os.PathLike) else value
             for key, value in cfg.items() if value is not None}
    reports: dict = {"llm": given}
    if "catalog" in given:
        reports["catalog"] = given.pop("catalog")
    resolved = _config.validate({"reports": reports})["reports"]
    settings = {**resolved["llm"], "catalog": resolved["catalog"]}
    if not isinstance(settings["model"], str) or not settings["model"]:
        raise _config.ConfigError("config key 'reports.llm.model': the llm backend needs `model` "
                                  "(the served model name)")
    if not re.match(r"^https?://[^/?#\s]+", settings["base_url"]):
        raise _config.ConfigError(
            f"config key 'reports.llm.base_url': must be an http(s) URL with a host, not "
            f"{_config.redact_url(settings['base_url'])!r}"
        )
    return settings


class LLMReportParser:
    """Parses reports with one endpoint; holds the resolved config, the client and the stats."""

    def __init__(self, cfg: dict, stats: LLMStats | None = None):
        self.cfg = resolve_config(cfg)
        if self.cfg["cache_dir"] is None:
            raise ValueError(
                "the llm report backend needs cache_dir (reports.llm.cache_dir, the answer cache folder); "
                "it is null, and only the reports stage fills it (llm_cache/ beside its output)"
            )
        self.stats = stats if stats is not None else LLMStats()
        self.prompt = load_prompt(self.cfg["prompt"])
        self.diseases = _cat.diseases(self.cfg["catalog"])
        self.cache_dir = Path(self.cfg["cache_dir"])
        self.client = LLMClient(
            self.cfg["base_url"],
            self.cfg["model"],
            api_key_env=self.cfg["api_key_env"],
            timeout_s=self.cfg["timeout_s"],
            max_retries=self.cfg["max_retries"],
            backoff_s=self.cfg["backoff_s"],
            temperature=self.cfg["temperature"],
            max_tokens=self.cfg["max_tokens"],
            response_format=self.cfg["response_format"],
            schema=answer_schema(self.diseases),
            stats=self.stats,
        )
        self._stats_lock = threading.Lock()

    # -- one report
    def _parse_one(self, report: str) -> dict:
        """Request + validate (+ one repair). Returns a cache entry; raises TransientError."""
        messages = build_messages(self.prompt, self.diseases, report)
        raw: list[str | None] = []
        errors: list[str] = []
        for attempt in range(2):
            try:
                completion = self.client.chat(messages)
            except RequestRejected as rejection:
                errors.append(f"request rejected: {rejection}")
                break
            content, finish = completion.content, completion.finish_reason
            raw.append(self.client.scrub(content) if content is not None else None)
            try:
                anatomies = validate_answer(content, self.diseases, finish, self.client.max_tokens)
            except AnswerError as invalid:
                errors.append(str(invalid))
                if attempt == 0:
                    with self._stats_lock:
                        self.stats.repairs += 1
                    messages = repair_messages(self.prompt, messages, content, str(invalid))
                continue
            error = None if anatomies else ERR_NO_ANATOMY
            return self._entry("parsed", error, anatomies, raw, errors)
        if errors[0].startswith("request rejected"):
            reason = errors[0]
        elif len(errors) == 1:
            reason = f"invalid answer: {errors[0]}"
        else:
            reason = f"invalid answer: {errors[0]}; after repair: {errors[1]}"
        return self._entry("unparsed", reason[:1000], {}, raw, errors)

    def _entry(self, outcome: str, error: str | None, anatomies: dict, raw: list, errors: list) -> dict:
        return make_entry(
            outcome, error, anatomies, raw, errors,
            prompt_version=self.prompt.version,
            model=self.cfg["model"],
            catalog=str(self.cfg["catalog"]),
            response_format=self.stats.mode,
        )

    # -- rows
    def _rows(self, case_id: str, entry: dict | None, error: str | None = None) -> list[dict]:
        """The 36 rows of one case (catalog order) from its cache entry (None: an empty report,
        every anatomy "not_mentioned" with ``error``)."""
        if entry is None:
            anatomies, unparsed = {}, False
        else:
            unparsed = entry["outcome"] == "unparsed"
            anatomies, error = entry["anatomies"], entry["error"]
        rows = []
        for anatomy in _cat.anatomy_names():
            parsed = anatomies.get(anatomy)
            rows.append(
                {
                    "case_id": case_id,
                    "anatomy": anatomy,
                    "text": parsed["text"] if parsed else "",
                    "status": "unparsed" if unparsed else (parsed["status"] if parsed else "not_mentioned"),
                    "findings": list(parsed["findings"]) if parsed else [],
                    "backend": BACKEND,
                    "model": self.cfg["model"],
                    "prompt_version": self.prompt.version,
                    "error": error,
                }
            )
        return rows

    # -- many reports
    def parse(self, cases: pl.DataFrame, *, progress: bool = False) -> pl.DataFrame:
        """``cases`` (columns case_id, report_text) as a ``REPORT_SCHEMA`` frame (36 rows per case)."""
        missing = {"case_id", "report_text"} - set(cases.columns)
        if missing:
            raise ValueError(f"cases lack column(s) {sorted(missing)}")
        started = time.perf_counter()
        stats = self.stats
        pairs = [(str(case_id), text) for case_id, text in cases.select("case_id", "report_text").iter_rows()]
        stats.cases = len(pairs)
        texts: dict[str, str] = {}  # cache key -> report text
        case_keys: list[str | None] = []  # per case: its cache key (None: empty report)
        for _, text in pairs:
            text = clean_text(text)  # as the rules backend reads it: NFKC, no control/invisible characters
            if text is None or not str(text).strip():
                stats.empty += 1
                case_keys.append(None)
                continue
            key = entry_key(str(text), self.prompt, self.cfg["model"], self.diseases)
            texts.setdefault(key, str(text))
            case_keys.append(key)
        stats.unique_reports = len(texts)
        entries: dict[str, dict] = {}
        todo: list[str] = []
        for key in texts:
            cached = read_entry(self.cache_dir / f"{key}.json", self.diseases)
            if cached is not None:
                entries[key] = cached
                stats.cache_hits += 1
            else:
                todo.append(key)
        if todo:
            self.client.check_reachable()
            self._run(todo, texts, entries, progress)
        stats.unparsed = sum(1 for entry in entries.values() if entry["outcome"] == "unparsed")
        rows: list[dict] = []
        for (case_id, _), key in zip(pairs, case_keys, strict=True):
            rows.extend(self._rows(case_id, entries.get(key) if key else None, None if key else ERR_EMPTY))
        stats.wall_s = time.perf_counter() - started
        log.info("reports (llm): %s", stats.as_dict())
        return pl.DataFrame(rows, schema=REPORT_SCHEMA)

    def _run(self, todo: list[str], texts: dict[str, str], entries: dict[str, dict], progress: bool) -> None:
        """Send the reports of ``todo`` (cache keys) through the thread pool, caching each validated
        answer and adding each finished entry to ``entries``. On a failure (transient after all
        retries, or systematic: the key refused, a 404, ``max_unparsed_in_row`` unparsed reports in a
        row): the worker that meets it stops the run at once (no request starts after it), requests in
        flight finish (parsed ones are cached), then ``LLMServerError``, ``LLMAuthError`` or
        ``LLMSystematicError`` is raised."""
        stats = self.stats
        stopped = self.client.stopped
        stopped.clear()
        max_in_row = int(self.cfg["max_unparsed_in_row"])
        state = {"in_row": 0, "systematic": None}  # shared by the workers, under self._stats_lock
        bar = None
        if progress:
            bar = progress_counter(len(todo), "reports (llm)", "report")

        def work(key: str) -> dict:
            if stopped.is_set():
                raise RunStopped("run stopped after another request failed")
            with self._stats_lock:
                stats.reports_requested += 1
            try:
                entry = self._parse_one(texts[key])
            except BaseException:
                stopped.set()  # before any other worker starts a request
                raise
            if entry["outcome"] == "parsed":  # only validated answers are cached, as they arrive
                write_entry(self.cache_dir / f"{key}.json", entry)
            with self._stats_lock:
                state["in_row"] = state["in_row"] + 1 if entry["outcome"] == "unparsed" else 0
                stats.unparsed_in_row = max(stats.unparsed_in_row, state["in_row"])
                if max_in_row and state["in_row"] >= max_in_row and state["systematic"] is None:
                    state["systematic"] = (f"{state['in_row']} reports in a row ended unparsed "
                                           f"(reports.llm.max_unparsed_in_row={max_in_row})")
                    stopped.set()
            return entry

        def stop(futures) -> None:
            stopped.set()
            for future in futures:
                future.cancel()

        failures: list[str] = []  # transient failures after all retries (not the stops they caused)
        n_unparsed = 0
        with ThreadPoolExecutor(max_workers=int(self.cfg["concurrency"]), thread_name_prefix="reports-llm") as pool:
            futures: dict[Future, str] = {pool.submit(work, key): key for key in todo}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = futures[future]
                        if future.cancelled():
                            continue
                        error = future.exception()
                        if error is None:
                            entries[key] = future.result()
                            n_unparsed += entries[key]["outcome"] == "unparsed"
                        elif isinstance(error, TransientError):
                            if not isinstance(error, RunStopped):
                                failures.append(str(error))
                            stop(pending)
                        else:
                            stop(pending)
                            raise error
                        if stopped.is_set():
                            stop(pending)
                        if bar is not None:
                            bar.set_postfix(
                                prompt_tok=stats.prompt_tokens, compl_tok=stats.completion_tokens,
                                unparsed=n_unparsed,
                                refresh=False,
                            )
                            bar.update(1)
            except BaseException:
                stop(futures)
                raise
            finally:
                if bar is not None:
                    bar.close()
        stats.transient_failures = len(failures)
        parsed_now = sum(1 for key in todo if key in entries and entries[key]["outcome"] == "parsed")
        cached = (f"{parsed_now} of {len(todo)} reports sent in this run were parsed and are cached in "
                  f"{self.cache_dir} ({stats.cache_hits} were cached before); re-run to resume")
        if failures:
            raise LLMServerError(f"LLM server at {self.client.base_url} failed: {failures[0]}. {cached}")
        systematic = state["systematic"]
        if systematic is None and max_in_row and n_unparsed and not parsed_now and not stats.cache_hits:
            systematic = f"all {n_unparsed} reports sent ended unparsed and none came from the cache"
        if systematic is not None:
            last = next((entries[key]["error"] for key in reversed(todo)
                         if key in entries and entries[key]["outcome"] == "unparsed"), None)
            raise LLMSystematicError(
                f"LLM server at {self.client.base_url}, model {self.cfg['model']!r}: {systematic}; the last reason: "
                f"{last}. A systematic problem (the model, its context size, the response format or the server), "
                f"not hard reports: check reports.llm and the server. {cached}"
            )
