"""Talking to the OpenAI-compatible server: the ``openai`` client (the API key is read only from
the environment variable named by ``api_key_env``, never logged, and scrubbed from every message
built here), the reachability check, one chat request with retries (exponential backoff with
jitter, Retry-After honoured) and the ``response_format`` probing whose result is remembered per
(base_url, model) for the rest of the process."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .prompt import MODES, response_format_for

log = logging.getLogger(__name__)

API_KEY_PLACEHOLDER = "not-needed"  # sent when the key's variable is unset or empty (a local server)
ERR_UNREACHABLE = "LLM server unreachable"

# statuses retried (besides timeouts, connection errors and any 5xx)
RETRY_STATUS = frozenset({408, 409, 429})
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0

# statuses with which servers refuse a response_format they do not know (llama-cpp-python's server
# turns its request-validation error into a 500), recognised only while probing and only when the
# error message names the response format
FORMAT_REJECT_STATUS = frozenset({400, 415, 422, 500, 501})
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema")

# response_format mode found per (base_url, model) in this process: later runs do not probe again
_MODE_MEMO: dict[tuple[str, str], str] = {}
_MODE_MEMO_LOCK = threading.Lock()


class LLMUnreachableError(RuntimeError):
    """The endpoint did not answer the reachability check (raised before any work)."""


class LLMServerError(RuntimeError):
    """A request failed for a transient reason (after all retries); finished reports are cached."""


class LLMAuthError(RuntimeError):
    """The endpoint rejected the API key (401/403)."""


class TransientError(Exception):
    """A request failed after all retries (connection error, timeout, 408/409/429, 5xx), or the run
    was stopped; the report is not cached."""


class RequestRejected(Exception):
    """A 400-class answer to one request (not about the response format)."""


class _FormatRejected(Exception):
    """While probing: the server refused the response_format (llama-cpp's server answers 500)."""


@dataclass
class RequestStats:
    """What the client counts of its requests (``LLMStats`` adds the per-report counts)."""

    requests: int = 0  # chat-completion requests sent (probes, repairs and retries included)
    format_probes: int = 0  # requests refused for their response_format while finding the mode
    retries: int = 0  # requests repeated after a transient failure
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_in_flight: int = 0  # most requests in flight at once, as measured by the client
    mode: str | None = None  # response_format mode in use
    request_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end), perf_counter

    def as_dict(self) -> dict:
        values = dict(self.__dict__)
        values.pop("request_spans")
        return values


def _openai():
    try:
        import openai
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the LLM report backend needs the `openai` package (pip install openai)") from error
    return openai


class LLMClient:
    """One endpoint and model: sends chat requests (thread-safe) and counts them in ``stats``.

    ``stopped`` (an Event) makes every later request fail with ``TransientError`` (a run stopping
    after a failure)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        temperature: float,
        max_tokens: int,
        response_format: str,
        schema: dict,
        stats: RequestStats,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.schema = schema
        self.stats = stats
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._secret = key or None
        self._api_key = key or API_KEY_PLACEHOLDER
        auto = response_format == "auto"
        with _MODE_MEMO_LOCK:
            known = _MODE_MEMO.get((self.base_url, model)) if auto else None
        self._modes = list(MODES) if auto else [response_format]
        self._mode_index = self._modes.index(known) if known else 0
        self._mode_decided = not auto or known is not None
        self.stats.mode = self._modes[self._mode_index] if self._mode_decided else None
        self._mode_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._in_flight = 0
        self.stopped = threading.Event()
        self._client = None

    # -- helpers
    def scrub(self, message: str) -> str:
        """``message`` without the API key."""
        if self._secret:
            message = message.replace(self._secret, "***")
        return message

    def openai_client(self):
        """The ``openai.OpenAI`` client, made on first use (its own retries off: ours are counted)."""
        if self._client is None:
            self._client = _openai().OpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=self.timeout_s,
                max_retries=0,  # retries are ours (counted, with jitter)
            )
        return self._client

    def _auth_error(self, status_code: Any, key_state: str = "") -> LLMAuthError:
        return LLMAuthError(
            f"LLM server at {self.base_url} rejected the API key from env var "
            f"{self.api_key_env!r}{key_state}; HTTP {status_code}"
        )

    def check_reachable(self) -> None:
        """``models.list()`` with a short timeout and no retries: raise ``LLMUnreachableError``
        (naming the URL) when nothing answers, ``LLMAuthError`` on 401/403; warn when the model is
        missing from a non-empty model list."""
        openai = _openai()
        quick = self.openai_client().with_options(timeout=min(10.0, self.timeout_s), max_retries=0)
        try:
            models = quick.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise self._auth_error(error.status_code, f" ({'set' if self._secret else 'unset'})") from None
        except openai.APIStatusError as error:  # it answered: reachable (some servers lack /models)
            log.warning("LLM server at %s answered /models with HTTP %s", self.base_url, error.status_code)
            return
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise LLMUnreachableError(
                f"{ERR_UNREACHABLE}: no answer from {self.base_url} ({type(error).__name__}: "
                f"{self.scrub(str(error))}); start the server or fix reports.llm.base_url"
            ) from None
        ids = [m.id for m in getattr(models, "data", []) or []]
        if ids and self.model not in ids:
            log.warning(
                "model %r is not in the model list of %s (%s); sending it anyway",
                self.model, self.base_url, ", ".join(ids[:10]),
            )

    def backoff(self, attempt: int, error: Exception) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): backoff_s * 2**attempt capped at
        MAX_BACKOFF_S, times a 0.5-1.5 jitter; at least the server's Retry-After (up to
        MAX_RETRY_AFTER_S)."""
        delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * (0.5 + random.random())
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER_S))
            except ValueError:
                pass
        return delay

    def status_message(self, error: Exception) -> str:
        """A one-line reason for a failed request ("HTTP 400: ..."), at most 500 characters of the
        server's message, without the API key."""
        code = getattr(error, "status_code", None)
        body = getattr(error, "body", None)
        message = None
        if isinstance(body, dict):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, dict) else str(inner)
            if message is None and "detail" in body:
                message = json.dumps(body["detail"])[:500]
        message = message or str(error)
        message = " ".join(str(message).split())[:500]
        return self.scrub(f"HTTP {code}: {message}" if code else f"{type(error).__name__}: {message}")

    # -- requests
    def _send(self, messages: list[dict], mode: str, probing: bool = False):
        """One request with retries on transient errors. Returns the completion."""
        openai = _openai()
        request: dict[str, Any] = dict(
            model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens
        )
        response_format = response_format_for(mode, self.schema)
        if response_format is not None:
            request["response_format"] = response_format
        stats = self.stats
        attempt = 0
        while True:
            if self.stopped.is_set():
                raise TransientError("run stopped after another request failed")
            with self._stats_lock:
                stats.requests += 1
                self._in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, self._in_flight)
            started = time.perf_counter()
            try:
                completion = self.openai_client().chat.completions.create(**request)
                failure: Exception | None = None
            except (openai.APIConnectionError, openai.APITimeoutError) as error:
                failure, retry = error, True
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise self._auth_error(error.status_code) from None
            except openai.APIStatusError as error:
                failure, retry = error, (error.status_code in RETRY_STATUS or error.status_code >= 500)
            finally:
                with self._stats_lock:
                    self._in_flight -= 1
                    stats.request_spans.append((started, time.perf_counter()))
            if (
                failure is not None and probing and getattr(failure, "status_code", None) in FORMAT_REJECT_STATUS
                and any(word in self.status_message(failure).lower() for word in _FORMAT_WORDS)
            ):
                with self._stats_lock:
                    stats.format_probes += 1
                raise _FormatRejected(self.status_message(failure)) from None
            if failure is None:
                usage = getattr(completion, "usage", None)
                if usage is not None:
                    with self._stats_lock:
                        stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                        stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
                return completion
            if not retry:
                raise RequestRejected(self.status_message(failure)) from None
            if attempt >= self.max_retries:
                raise TransientError(f"{self.status_message(failure)} (after {attempt} retries)") from None
            time.sleep(self.backoff(attempt, failure))
            attempt += 1
            with self._stats_lock:
                stats.retries += 1

    def chat(self, messages: list[dict]):
        """Send ``messages`` with the decided response mode; on the first request(s), find the mode
        (one request at a time while probing). Returns the completion; raises ``RequestRejected``,
        ``TransientError`` or ``LLMAuthError``."""
        if self._mode_decided:
            return self._send(messages, self._modes[self._mode_index])
        with self._mode_lock:
            if self._mode_decided:
                return self._send(messages, self._modes[self._mode_index])
            while True:
                mode = self._modes[self._mode_index]
                try:
                    completion = self._send(messages, mode, probing=True)
                except _FormatRejected as refusal:
                    if self._mode_index + 1 >= len(self._modes):
                        raise RequestRejected(str(refusal)) from None
                    log.info("response_format %s refused by %s (%s); trying %s",
                             mode, self.base_url, refusal, self._modes[self._mode_index + 1])
                    self._mode_index += 1
                    continue
                self._mode_decided = True
                self.stats.mode = mode
                with _MODE_MEMO_LOCK:
                    _MODE_MEMO[(self.base_url, self.model)] = mode
                log.info("LLM structured output mode: %s", mode)
                return completion
