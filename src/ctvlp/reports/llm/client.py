"""Talking to the OpenAI-compatible server: the ``openai`` client, the reachability check, one chat
request with retries and the ``response_format`` probing whose result is remembered per
(base_url, model) for the rest of the process.

Secrets. The API key is read only from the environment variable named by ``api_key_env``;
credentials in ``base_url`` are references to environment variables (``https://${USER}:${PASS}@
host/v1``, ``ctvlp.config.url_credentials_problem``), expanded here and sent as HTTP basic auth
(its Authorization header replaces the bearer key's, as it did when such a URL went to the HTTP
stack), so the URL the HTTP stack sees and logs holds none. Every value read is registered with
``redact``: removed from each message built here, and from every log record (a filter on the root
logger's handlers). Messages show the configured URL redacted (``ctvlp.config.redact_url``).

Responses. The body of a 200 answer is checked here (``parse_completion``), not by the SDK: a body
that is not a chat completion (truncated or invalid JSON, an HTML page, a JSON error object, no
choices, a non-JSON content type) is a transient failure. A 404, 405 or 410 means every request
would fail (a wrong URL or model): ``LLMSystematicError`` at once; 401/403: ``LLMAuthError`` at
once; any other 4xx: ``RequestRejected`` (this report only).

Retries. The SDK retries what it knows (``max_retries`` on its client): connection errors,
timeouts, 408, 409, 429 and 5xx, waiting 0.5 s * 2**n capped at 8 s, minus up to 25 % jitter, or
the server's Retry-After / retry-after-ms when it is at most 120 s (a longer one: no retry). Only
what the SDK lacks is ours: a 200 whose body is not a completion is sent again after
``backoff`` (backoff_s * 2**n capped at MAX_BACKOFF_S, times a 0.5-1.5 jitter). The two share one
budget: at most ``max_retries`` retries per request, whatever their causes (each SDK call gets the
retries left). The SDK does not count its retries; an event hook on its HTTP client (httpx's
public ``event_hooks``) does: every request sent is counted in ``stats.requests`` and every retry
(the SDK's ``x-stainless-retry-count`` header, or without it each later request of one SDK
call, and ours) in ``stats.retries``. The same hooks stop
the SDK's retries when the run has stopped (``stopped``: before its next try the request hook
raises ``RunStopped``, which the SDK passes through) and, while probing, when a 5xx refuses the
response_format (an ``x-should-retry: false`` header set on that answer, which the SDK obeys)."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ... import config as _config
from .prompt import MODES, response_format_for

log = logging.getLogger(__name__)

API_KEY_PLACEHOLDER = "not-needed"  # sent when the key's variable is unset or empty (a local server)
ERR_UNREACHABLE = "LLM server unreachable"

# statuses the SDK retries (besides any 5xx, timeouts and connection errors): still failing after its
# retries, they are transient failures (TransientError), not a rejected request
RETRY_STATUS = frozenset({408, 409, 429})
# statuses that no retry or other report can fix: the URL or the model is wrong (401/403: LLMAuthError)
SYSTEMATIC_STATUS = frozenset({404, 405, 410})
BODY_SNIPPET_CHARS = 120  # of a body that is not a completion, shown in the reason
MAX_BACKOFF_S = 30.0  # our backoff (200 answers that are not completions)
MAX_RETRY_AFTER_S = 60.0
RETRY_COUNT_HEADER = "x-stainless-retry-count"  # sent by the SDK: retries taken before this request

# statuses with which servers refuse a response_format they do not know (llama-cpp-python's server
# turns its request-validation error into a 500), recognised only while probing and only when the
# error message names the response format
FORMAT_REJECT_STATUS = frozenset({400, 415, 422, 500, 501})
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema")

# response_format mode found per (base_url, model) in this process: later runs do not probe again
_MODE_MEMO: dict[tuple[str, str], str] = {}
_MODE_MEMO_LOCK = threading.Lock()


class LLMError(RuntimeError):
    """A run of the llm backend stopped; the message names the (redacted) URL and the reason."""


class LLMUnreachableError(LLMError):
    """The endpoint did not answer the reachability check (raised before any work)."""


class LLMServerError(LLMError):
    """A request failed for a transient reason (after all retries); finished reports are cached."""


class LLMAuthError(LLMError):
    """The endpoint rejected the API key (401/403)."""


class LLMSystematicError(LLMError):
    """Every request would fail: the endpoint answered 404/405/410, or too many reports in a row
    ended unparsed (``max_unparsed_in_row``); finished reports are cached."""


class TransientError(Exception):
    """A request failed after all retries (connection error, timeout, 408/409/429, 5xx, a body
    that is not a chat completion), or the run was stopped; the report is not cached."""


class RunStopped(TransientError):
    """A request not sent, or not retried, because the run stopped after another one failed."""


class InvalidCompletion(ValueError):
    """A 200 answer whose body is not a chat completion; the message says what is wrong."""


class RequestRejected(Exception):
    """A 400-class answer to one request (not about the response format)."""


class _FormatRejected(Exception):
    """While probing: the server refused the response_format (llama-cpp's server answers 500)."""


@dataclass
class RequestStats:
    """What the client counts of its requests (``LLMStats`` adds the per-report counts)."""

    requests: int = 0  # chat-completion HTTP requests sent (probes, repairs and all retries included)
    format_probes: int = 0  # requests refused for their response_format while finding the mode
    retries: int = 0  # requests repeated after a transient failure (by the SDK or by us)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_in_flight: int = 0  # most SDK calls in flight at once (one call: a request and its SDK retries)
    mode: str | None = None  # response_format mode in use
    request_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end), perf_counter

    def as_dict(self) -> dict:
        values = dict(self.__dict__)
        values.pop("request_spans")
        return values


@dataclass
class _Call:
    """One ``_send`` in progress in this thread, as the HTTP client's event hooks see it."""

    probing: bool
    retries: int = 0  # retries of this request so far (the SDK's and ours)
    sdk_retries: int = 0  # retries taken by the current SDK call
    sdk_requests: int = 0  # requests sent by the current SDK call


@dataclass(frozen=True)
class Completion:
    """What the parser uses of one chat completion."""

    content: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _snippet(body: bytes) -> str:
    text = " ".join(body[: BODY_SNIPPET_CHARS * 4].decode("utf-8", "replace").split())
    return redact(text[:BODY_SNIPPET_CHARS]) + ("..." if len(text) > BODY_SNIPPET_CHARS else "")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_completion(content_type: str | None, body: bytes) -> Completion:
    """The completion in a 200 answer's body; ``InvalidCompletion`` naming the problem when it is
    not one: a non-JSON content type, an empty body, invalid JSON, not an object, an error object,
    no choices, a choice without a message, content that is not text. Pure: unit-testable."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and not (media == "application/json" or media.endswith("+json")):
        raise InvalidCompletion(f"content type {media!r}, not JSON (body: {_snippet(body)!r})")
    if not body.strip():
        raise InvalidCompletion("empty body")
    try:
        data = json.loads(body)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        where = f" at char {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise InvalidCompletion(f"invalid JSON ({reason}{where} of {len(body)} bytes; truncated?)") from None
    if not isinstance(data, dict):
        raise InvalidCompletion(f"JSON {type(data).__name__}, not a completion object")
    choices = data.get("choices")
    if not choices:
        error = data.get("error")
        if error:
            message = error.get("message", error) if isinstance(error, dict) else error
            raise InvalidCompletion(f"an error object in a 200 answer: {redact(' '.join(str(message).split()))[:500]}")
        raise InvalidCompletion("no choices" if isinstance(choices, list) else "no `choices` list")
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise InvalidCompletion("`choices` is not a list of objects")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise InvalidCompletion("the first choice has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise InvalidCompletion(f"message content is a JSON {type(content).__name__}, not text")
    finish = choices[0].get("finish_reason")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(
        content=content,
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


# ---- secrets: every value read from the environment, removed from messages and log records

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
MIN_SECRET_CHARS = 4  # shorter values are not redacted (they would mangle every message)


def redact(text: str) -> str:
    """``text`` without any registered secret and without the literal credentials of any URL."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, _config.REDACTED)
    return _config.redact_text(text)


class _RedactFilter(logging.Filter):
    """Rewrites a log record whose message holds a secret (any logger: on the handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to logging
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_FILTER = _RedactFilter()


def register_secrets(*values: str | None) -> None:
    """Redact ``values`` from messages and from every record of the root logger's handlers."""
    with _SECRETS_LOCK:
        _SECRETS.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def endpoint(base_url: str) -> tuple[str, tuple[str, str] | None]:
    """``base_url`` without credentials, and the (user, password) its ${NAME} references name,
    read from the environment and registered as secrets (None: no credentials). ConfigError
    naming the variable when one is unset."""
    scheme, userinfo, rest = _config.split_userinfo(base_url)
    if not userinfo:
        return base_url, None
    parts = []
    for part in userinfo.split(":", 1):
        ref = _config.ENV_REF.fullmatch(part)
        if ref and not os.environ.get(ref.group(1)):
            raise _config.ConfigError(
                f"config key 'reports.llm.base_url' ({_config.redact_url(base_url)}): environment variable "
                f"{ref.group(1)} is not set or empty")
        parts.append(os.environ[ref.group(1)] if ref else part)
    register_secrets(*(value for value, part in zip(parts, userinfo.split(":", 1)) if _config.ENV_REF.fullmatch(part)))
    user, password = (parts + [""])[:2]
    return scheme + rest, (user, password)


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
        self.base_url = _config.redact_url(base_url.rstrip("/"))  # as shown in every message
        self._url, self._basic_auth = endpoint(base_url.rstrip("/"))
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
        register_secrets(key)
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
        self._local = threading.local()  # .call: the _Call of this thread's request, if any

    # -- helpers
    @staticmethod
    def scrub(message: str) -> str:
        """``message`` without the API key, the URL's credentials or any other registered secret."""
        return redact(message)

    def openai_client(self):
        """The ``openai.OpenAI`` client, made on first use, retrying up to ``max_retries`` times,
        with the URL's credentials, if any, as basic auth (the URL it holds and logs has none), and
        our event hooks on its HTTP client (counting, stopping, probing)."""
        if self._client is None:
            openai = _openai()
            self._client = openai.OpenAI(
                base_url=self._url,
                api_key=self._api_key,
                timeout=self.timeout_s,
                max_retries=self.max_retries,
                http_client=openai.DefaultHttpxClient(  # the SDK's defaults (timeouts, limits, redirects)
                    auth=self._basic_auth,  # a (user, password) tuple, or None
                    event_hooks={"request": [self._on_request], "response": [self._on_response]},
                ),
            )
        return self._client

    def _on_request(self, request) -> None:
        """Event hook, before each HTTP request of a chat call in this thread (the SDK's retries
        included): ``RunStopped`` when the run has stopped (the SDK re-raises it, no retry); else
        count the request, and the SDK's retry it is, if it is one."""
        call = getattr(self._local, "call", None)
        if call is None:  # not a chat request (the reachability check)
            return
        if self.stopped.is_set():
            raise RunStopped("run stopped after another request failed")
        header = request.headers.get(RETRY_COUNT_HEADER, "")
        taken = int(header) if header.isdigit() else call.sdk_requests  # no header: every later request
        call.sdk_requests += 1
        with self._stats_lock:
            self.stats.requests += 1
            if taken > call.sdk_retries:
                self.stats.retries += taken - call.sdk_retries
                call.retries += taken - call.sdk_retries
                call.sdk_retries = taken

    def _on_response(self, response) -> None:
        """Event hook, on each HTTP answer of a chat call in this thread: while probing, tell the
        SDK not to retry (``x-should-retry: false``) an answer that refuses the response_format
        (llama-cpp-python's server answers 500, which the SDK would retry)."""
        call = getattr(self._local, "call", None)
        if call is None or not call.probing or response.status_code not in FORMAT_REJECT_STATUS:
            return
        response.read()
        text = response.content[:20000].decode("utf-8", "replace").lower()
        if any(word in text for word in _FORMAT_WORDS):
            response.headers["x-should-retry"] = "false"

    def _auth_error(self, status_code: Any, key_state: str = "") -> LLMAuthError:
        basic = " and the user and password of reports.llm.base_url (sent instead)" if self._basic_auth else ""
        return LLMAuthError(
            f"LLM server at {self.base_url} rejected the API key from env var "
            f"{self.api_key_env!r}{key_state}{basic}; HTTP {status_code}"
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
        except (ValueError, TypeError, AttributeError) as error:  # it answered, but not a model list
            log.warning("LLM server at %s answered /models with something that is not a model list (%s)",
                        self.base_url, self.scrub(f"{type(error).__name__}: {error}")[:300])
            return
        data = getattr(models, "data", None)
        ids = [m.id for m in data if isinstance(getattr(m, "id", None), str)] if isinstance(data, list) else []
        if ids and self.model not in ids:
            log.warning(
                "model %r is not in the model list of %s (%s); sending it anyway",
                self.model, self.base_url, ", ".join(ids[:10]),
            )

    def backoff(self, attempt: int, error: Exception) -> float:
        """Seconds to wait before our retry ``attempt`` (0-based) of an answer that is not a
        completion (the SDK waits before its own): backoff_s * 2**attempt capped at MAX_BACKOFF_S,
        times a 0.5-1.5 jitter; at least the server's Retry-After, if any (up to
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
        if isinstance(error, InvalidCompletion):
            return self.scrub(f"HTTP 200 with a body that is not a chat completion: {error}")
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

    def _systematic(self, error: Exception) -> LLMSystematicError:
        return LLMSystematicError(
            f"LLM server at {self.base_url} answered a chat request for model {self.model!r} with "
            f"{self.status_message(error)}: every request would fail. Check reports.llm.base_url (OpenAI-compatible "
            "endpoints usually end in /v1) and reports.llm.model"
        )

    # -- requests
    def _create(self, request: dict, max_retries: int) -> Completion:
        """One chat request, retried by the SDK up to ``max_retries`` times; the body checked by
        ``parse_completion`` (``InvalidCompletion``)."""
        raw = self.openai_client().with_options(max_retries=max_retries).chat.completions.with_raw_response.create(
            **request)
        http = raw.http_response
        return parse_completion(http.headers.get("content-type"), http.content)

    def _send(self, messages: list[dict], mode: str, probing: bool = False) -> Completion:
        """One request, retried on transient failures (by the SDK; by us when a 200 is not a
        completion), at most ``max_retries`` times in all. Returns the completion."""
        openai = _openai()
        request: dict[str, Any] = {
            "model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens,
        }
        response_format = response_format_for(mode, self.schema)
        if response_format is not None:
            request["response_format"] = response_format
        stats = self.stats
        call = _Call(probing)
        attempt = 0  # our retries (answers that are not completions)
        while True:
            if self.stopped.is_set():
                raise RunStopped("run stopped after another request failed")
            with self._stats_lock:
                self._in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, self._in_flight)
            started = time.perf_counter()
            call.sdk_retries = call.sdk_requests = 0
            self._local.call = call
            try:
                completion = self._create(request, self.max_retries - call.retries)
                failure: Exception | None = None
            except InvalidCompletion as error:
                failure = error
            except (openai.APIConnectionError, openai.APITimeoutError) as error:  # the SDK's retries are spent
                raise TransientError(f"{self.status_message(error)} (after {call.retries} retries)") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise self._auth_error(error.status_code) from None
            except openai.APIStatusError as error:
                if error.status_code in SYSTEMATIC_STATUS:
                    raise self._systematic(error) from None
                message = self.status_message(error)
                if (probing and error.status_code in FORMAT_REJECT_STATUS
                        and any(word in message.lower() for word in _FORMAT_WORDS)):
                    with self._stats_lock:
                        stats.format_probes += 1
                    raise _FormatRejected(message) from None
                if error.status_code in RETRY_STATUS or error.status_code >= 500:  # the SDK's retries are spent
                    raise TransientError(f"{message} (after {call.retries} retries)") from None
                raise RequestRejected(message) from None
            finally:
                self._local.call = None
                with self._stats_lock:
                    self._in_flight -= 1
                    stats.request_spans.append((started, time.perf_counter()))
            if failure is None:
                with self._stats_lock:
                    stats.prompt_tokens += completion.prompt_tokens
                    stats.completion_tokens += completion.completion_tokens
                return completion
            if call.retries >= self.max_retries:
                raise TransientError(f"{self.status_message(failure)} (after {call.retries} retries)") from None
            time.sleep(self.backoff(attempt, failure))
            attempt += 1
            call.retries += 1
            with self._stats_lock:
                stats.retries += 1

    def chat(self, messages: list[dict]):
        """Send ``messages`` with the decided response mode; on the first request(s), find the mode
        (one request at a time while probing). Returns the completion; raises ``RequestRejected``,
        ``TransientError``, ``LLMAuthError`` or ``LLMSystematicError``."""
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
