"""Hostile LLM servers and pasted secrets, against the llm report backend (ctvlp.reports.llm).

Every server here is a real HTTP server on 127.0.0.1 (``http.server`` in a thread, ``FakeLLM``)
answering what a broken proxy, a wrong URL or a misconfigured server answers; the ``openai``
client talks to it over HTTP as it would to any endpoint (nothing of the client is mocked). The
secrets tests run the reports stage as the workflow does (``ctvlp reports`` in a subprocess, DEBUG
logging on) and grep everything it wrote and printed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from ctvlp import catalog, config
from ctvlp.reports import llm
from ctvlp.reports.llm import cache as llm_cache
from ctvlp.reports.llm import client as llm_client
from ctvlp.reports.schema import REPORT_SCHEMA

pytest.importorskip("openai", reason="openai is not installed (run .ci/llm_setup.sh)")

MODEL = "fake-model"
KEY_ENV = "CTVLP_TEST_HOSTILE_KEY"
ANSWER = json.dumps({"anatomies": [{"anatomy": "liver", "text": "The liver is normal.", "status": "normal",
                                    "findings": []}]})
REPORTS = ["The liver is normal.", "The spleen is normal.", "No pleural effusion.", "The heart is normal."]


# ----------------------------------------------------------------------------- a real local server


def completion(content: str | None = ANSWER, finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def reply(status: int = 200, body: bytes | str | dict | list | None = None, ctype: str = "application/json",
          headers: dict | None = None, short_by: int = 0) -> tuple:
    """What the server answers: ``short_by`` > 0 announces more bytes than it sends, then closes."""
    if body is None:
        body = completion()
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return status, ctype, body, headers or {}, short_by


GOOD = reply()


class FakeLLM:
    """An OpenAI-compatible endpoint on 127.0.0.1 whose chat answers come from ``chat(n, request,
    headers)`` (n: 0-based index of the chat request); /v1/models answers ``models``. Records every
    request (method, path, headers, body)."""

    def __init__(self, chat=lambda n, request, headers: GOOD, models: tuple | None = None, auth: str | None = None):
        self.chat, self.auth = chat, auth
        self.models = models or reply(body={"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status, ctype, body, headers, short_by):
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body) + short_by))
                self.end_headers()
                self.wfile.write(body)
                if short_by:
                    self.wfile.flush()
                    self.close_connection = True

            def _handle(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake._lock:
                    fake.requests.append((method, self.path, headers, body))
                    n = sum(1 for m, p, _, _ in fake.requests if m == "POST" and p.endswith("/chat/completions")) - 1
                if fake.auth is not None and headers.get("authorization") != fake.auth:
                    return self._answer(*reply(401, {"error": {"message": "Incorrect API key provided"}}))
                if method == "GET" and self.path.rstrip("/").endswith("/v1/models"):
                    return self._answer(*fake.models)
                if method == "POST" and self.path.endswith("/v1/chat/completions"):
                    return self._answer(*fake.chat(n, json.loads(body or b"{}"), headers))
                return self._answer(*reply(404, {"error": {"message": f"no route {self.path}"}}))

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chats(self) -> int:
        return sum(1 for m, p, _, _ in self.requests if m == "POST" and p.endswith("/chat/completions"))

    def __enter__(self) -> FakeLLM:  # noqa: PYI034 - not subclassed
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def always(answer):
    return lambda n, request, headers: answer


def first_then(bad, n_bad: int, good=GOOD):
    return lambda n, request, headers: bad if n < n_bad else good


def cases_of(texts):
    return pl.DataFrame({"case_id": [f"c{i}" for i in range(len(texts))], "report_text": texts})


def cfg_for(srv: FakeLLM, tmp_path: Path, **kw) -> dict:
    cfg = {"base_url": srv.base_url, "model": MODEL, "api_key_env": KEY_ENV, "cache_dir": str(tmp_path / "cache"),
           "catalog": "demo", "max_retries": 2, "backoff_s": 0.01, "concurrency": 1, "timeout_s": 10,
           "response_format": "json_object"}
    return {**cfg, **kw}


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.json"))


# ----------------------------------------------------------------------------- 200 answers that are not completions

HTML = "<html><head><title>502 Proxy Error</title></head><body>Proxy login required</body></html>"
NOT_COMPLETIONS = {
    "truncated_json": (reply(body=json.dumps(completion())[:57]), "invalid JSON"),
    "truncated_transfer": (reply(body=json.dumps(completion())[:40], short_by=200), "APIConnectionError"),
    "html_proxy_page": (reply(body=HTML, ctype="text/html; charset=utf-8"), "content type 'text/html'"),
    "html_labelled_json": (reply(body=HTML), "invalid JSON"),
    "empty_choices": (reply(body={**completion(), "choices": []}), "no choices"),
    "choices_null": (reply(body={**completion(), "choices": None}), "no `choices` list"),
    "no_choices_key": (reply(body={"id": "x", "object": "chat.completion"}), "no `choices` list"),
    "choice_without_message": (reply(body={"choices": [{"index": 0, "finish_reason": "stop"}]}), "has no message"),
    "choices_not_objects": (reply(body={"choices": ["hello"]}), "not a list of objects"),
    "content_not_text": (reply(body=completion([{"type": "text", "text": ANSWER}])), "JSON list, not text"),
    "wrong_content_type_valid_body": (reply(ctype="text/plain"), "content type 'text/plain'"),
    "xml_body": (reply(body="<response><ok/></response>", ctype="application/xml"), "content type 'application/xml'"),
    "empty_body": (reply(body=b""), "empty body"),
    "json_array": (reply(body=[]), "JSON list, not a completion"),
    "json_null": (reply(body="null"), "JSON NoneType"),
    "json_string": (reply(body='"ok"'), "JSON str"),
    "error_object_with_200": (reply(body={"error": {"message": "upstream model overloaded"}}),
                              "upstream model overloaded"),
    "not_utf8": (reply(body=b'{"choices": [\xff\xfe]}'), "invalid JSON"),
}


@pytest.mark.parametrize("name", list(NOT_COMPLETIONS))
def test_a_200_that_is_not_a_completion_is_retried_then_stops_the_run_naming_url_and_problem(name, tmp_path):
    answer, words = NOT_COMPLETIONS[name]
    stats = llm.LLMStats()
    with FakeLLM(always(answer)) as srv:
        with pytest.raises(llm.LLMServerError) as ei:
            llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path), stats=stats)
        chats = srv.chats
    message = str(ei.value)
    assert srv.base_url in message and words in message, message
    assert "re-run to resume" in message
    assert stats.retries == 2 and chats == 3  # one request, two retries; then the run stopped
    assert cache_files(tmp_path) == []  # never cached


def test_a_200_that_is_not_a_completion_with_auto_format_probing_is_retried_too(tmp_path):
    with FakeLLM(first_then(NOT_COMPLETIONS["html_proxy_page"][0], 2)) as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path, response_format="auto"), stats=stats)
    assert stats.retries == 2 and stats.mode == "json_schema"
    assert df.filter(pl.col("anatomy") == "liver")["status"].to_list() == ["normal"]


@pytest.mark.parametrize("bad", [
    NOT_COMPLETIONS["truncated_json"][0], NOT_COMPLETIONS["html_proxy_page"][0], NOT_COMPLETIONS["empty_choices"][0],
    NOT_COMPLETIONS["wrong_content_type_valid_body"][0], reply(503, {"error": {"message": "loading"}}),
    reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"}),
], ids=["truncated_json", "html", "empty_choices", "wrong_content_type", "503", "429"])
def test_a_transient_bad_answer_is_retried_and_the_report_is_parsed_and_cached(bad, tmp_path):
    with FakeLLM(first_then(bad, 2)) as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path), stats=stats)
        assert srv.chats == 3
    assert stats.retries == 2 and stats.unparsed == 0
    assert df.filter(pl.col("anatomy") == "liver")["status"].to_list() == ["normal"]
    (entry,) = [json.loads(p.read_text()) for p in cache_files(tmp_path)]
    assert entry["outcome"] == "parsed"


# ----------------------------------------------------------------------------- systematic failures

@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_wrong_url_or_model_stops_the_run_at_once_naming_url_and_status(status, tmp_path):
    stats = llm.LLMStats()
    with FakeLLM(always(reply(status, {"error": {"message": "model 'fake-model' not found"}}))) as srv:
        with pytest.raises(llm.LLMSystematicError) as ei:
            llm.parse_reports(cases_of(REPORTS), cfg_for(srv, tmp_path), stats=stats)
        assert srv.chats == 1  # no retry, no second report
    assert srv.base_url in str(ei.value) and f"HTTP {status}" in str(ei.value) and "base_url" in str(ei.value)
    assert cache_files(tmp_path) == []


def test_a_404_on_every_path_models_included_stops_the_run(tmp_path):
    """A base_url without /v1: /models and every chat request answer 404."""
    not_found = reply(404, {"detail": "Not Found"})
    with FakeLLM(always(not_found), models=not_found) as srv, pytest.raises(llm.LLMSystematicError, match="HTTP 404"):
        llm.parse_reports(cases_of(REPORTS), cfg_for(srv, tmp_path))


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_on_chat_requests_stops_the_run_naming_the_variable_not_the_key(status, tmp_path, monkeypatch):
    secret = "sk-hostile-401-secret-0123456789"
    monkeypatch.setenv(KEY_ENV, secret)
    with FakeLLM(always(reply(status, {"error": {"message": f"Incorrect API key provided: {secret}"}}))) as srv:
        with pytest.raises(llm.LLMAuthError) as ei:
            llm.parse_reports(cases_of(REPORTS), cfg_for(srv, tmp_path))
        assert srv.chats == 1
    assert KEY_ENV in str(ei.value) and f"HTTP {status}" in str(ei.value) and srv.base_url in str(ei.value)
    assert secret not in str(ei.value)


def test_a_5xx_on_every_request_stops_the_run_after_the_retries(tmp_path):
    with FakeLLM(always(reply(500, {"error": {"message": "internal"}}))) as srv:
        stats = llm.LLMStats()
        with pytest.raises(llm.LLMServerError, match="HTTP 500"):
            llm.parse_reports(cases_of(REPORTS), cfg_for(srv, tmp_path), stats=stats)
    assert stats.retries == 2 and cache_files(tmp_path) == []


# ----------------------------------------------------------------------------- who retries what

def _chat_headers(srv: FakeLLM) -> list[dict]:
    return [h for m, p, h, _ in srv.requests if m == "POST" and p.endswith("/chat/completions")]


def test_a_503_is_retried_by_the_sdk_and_a_200_that_is_not_a_completion_by_ours(tmp_path):
    """503, then an HTML 200, then a completion: the SDK retries the 503 within its call (its
    retry-count header 1); our loop sends the request again after the HTML page in a new SDK call
    (retry count 0). Both retries are counted, in one budget of max_retries."""
    answers = [reply(503, {"error": {"message": "loading model"}}), NOT_COMPLETIONS["html_proxy_page"][0], GOOD]
    with FakeLLM(lambda n, request, headers: answers[min(n, 2)]) as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path), stats=stats)
        headers = _chat_headers(srv)
    assert df.filter(pl.col("anatomy") == "liver")["status"].to_list() == ["normal"]
    assert stats.requests == 3 and stats.retries == 2
    # the SDK numbers its retries within one call: its retry of the 503, then a new call of ours
    assert [h.get("x-stainless-retry-count") for h in headers] == ["0", "1", "0"]

    # the budget is shared: a 503 and then two HTML pages spend max_retries=2, then the run stops
    answers[2] = NOT_COMPLETIONS["html_proxy_page"][0]
    with FakeLLM(lambda n, request, headers: answers[min(n, 2)]) as srv:
        stats = llm.LLMStats()
        with pytest.raises(llm.LLMServerError, match="after 2 retries") as ei:
            llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path / "second"), stats=stats)
        assert srv.chats == 3
    assert "content type 'text/html'" in str(ei.value) and stats.retries == 2


def test_a_5xx_refusing_the_response_format_while_probing_is_not_retried_by_the_sdk(tmp_path):
    """llama-cpp-python's server refuses an unknown response_format with HTTP 500: the probe moves
    on to the next mode at once instead of letting the SDK retry the refusal."""
    refusal = reply(500, {"error": {"message": "response_format: json_schema is not supported"}})

    def chat(n, request, headers):
        return refusal if request.get("response_format", {}).get("type") == "json_schema" else GOOD

    with FakeLLM(chat) as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path, response_format="auto"), stats=stats)
        assert srv.chats == 2
    assert stats.mode == "json_object_schema" and stats.format_probes == 1 and stats.retries == 0
    assert df.filter(pl.col("anatomy") == "liver")["status"].to_list() == ["normal"]


def test_a_stopped_run_ends_the_sdks_retries(tmp_path):
    holder = {}

    def chat(n, request, headers):
        holder["client"].stopped.set()  # another worker failed while this request was in flight
        return reply(503, {"error": {"message": "busy"}})

    with FakeLLM(chat) as srv:
        holder["client"] = llm.LLMReportParser(cfg_for(srv, tmp_path)).client
        with pytest.raises(llm_client.RunStopped):
            holder["client"].chat([{"role": "user", "content": "The liver is normal."}])
        assert srv.chats == 1  # the SDK's retry was not sent
    assert holder["client"].stats.requests == 1


@pytest.mark.parametrize("answer, reason", [
    (reply(400, {"error": {"message": "context length exceeded"}}), "request rejected: HTTP 400"),
    (reply(422, {"detail": [{"msg": "bad field"}]}), "request rejected: HTTP 422"),
    (reply(body=completion("I am sorry, I cannot help with medical reports.")), "invalid answer: invalid JSON"),
    (reply(body=completion('{"anatomies": [{"anatomy": "chest"')), "invalid answer"),
    (reply(body=completion(None)), "invalid answer: empty answer"),
    (reply(body=completion(ANSWER[:20], finish="length")), "answer truncated"),
], ids=["400", "422", "prose", "truncated_answer", "null_content", "finish_length"])
def test_too_many_unparsed_reports_in_a_row_stop_the_run(answer, reason, tmp_path):
    texts = [f"Report {i}: the liver is normal." for i in range(12)]
    stats = llm.LLMStats()
    with FakeLLM(always(answer)) as srv, pytest.raises(llm.LLMSystematicError) as ei:
        llm.parse_reports(cases_of(texts), cfg_for(srv, tmp_path, max_unparsed_in_row=3), stats=stats)
    message = str(ei.value)
    assert "3 reports in a row ended unparsed" in message and reason in message and srv.base_url in message
    assert stats.reports_requested == 3 and stats.unparsed_in_row == 3  # the other 9 were never sent
    assert cache_files(tmp_path) == []


def test_a_small_run_with_every_report_unparsed_stops_and_0_turns_the_check_off(tmp_path):
    prose = always(reply(body=completion("Sure! The liver looks fine.")))
    with FakeLLM(prose) as srv:
        with pytest.raises(llm.LLMSystematicError, match="all 2 reports sent ended unparsed"):
            llm.parse_reports(cases_of(REPORTS[:2]), cfg_for(srv, tmp_path))
        df = llm.parse_reports(cases_of(REPORTS[:2]), cfg_for(srv, tmp_path, max_unparsed_in_row=0))
    assert set(df["status"]) == {"unparsed"} and df["error"].null_count() == 0
    assert cache_files(tmp_path) == []  # an unparsed outcome is never cached


def test_unparsed_reports_among_parsed_ones_do_not_stop_the_run(tmp_path):
    def chat(n, request, headers):
        return reply(400, {"error": {"message": "too long"}}) if "Report 1:" in json.dumps(request) else GOOD

    texts = [f"Report {i}: the liver is normal." for i in range(4)]
    with FakeLLM(chat) as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(texts), cfg_for(srv, tmp_path, max_unparsed_in_row=2), stats=stats)
    assert stats.unparsed == 1 and len(cache_files(tmp_path)) == 3
    assert set(df.filter(pl.col("case_id") == "c1")["status"]) == {"unparsed"}


# ----------------------------------------------------------------------------- the cache serves only validated answers

def test_after_the_url_is_fixed_everything_is_sent(tmp_path):
    with FakeLLM(always(reply(404, {"error": {"message": "not found"}}))) as bad, pytest.raises(llm.LLMSystematicError):
        llm.parse_reports(cases_of(REPORTS), cfg_for(bad, tmp_path))
    with FakeLLM() as good:
        stats = llm.LLMStats()
        llm.parse_reports(cases_of(REPORTS), cfg_for(good, tmp_path), stats=stats)
        assert good.chats == len(REPORTS)
    assert stats.cache_hits == 0 and stats.reports_requested == len(REPORTS)
    assert len(cache_files(tmp_path)) == len(REPORTS)


def _entry_path(tmp_path: Path, text: str) -> Path:
    key = llm.entry_key(text, llm.load_prompt(), MODEL, catalog.diseases("demo"))
    return tmp_path / "cache" / f"{key}.json"


def _old_entry(**kw) -> dict:
    base = llm_cache.make_entry("parsed", None, {"liver": {"text": "t", "status": "normal", "findings": []}}, [ANSWER],
                                [], prompt_version="report_v2", model=MODEL, catalog="demo",
                                response_format="json_object")
    return {**base, **kw}


BAD_CACHE_FILES = {
    "unparsed_of_an_older_run": json.dumps(_old_entry(outcome="unparsed", error="request rejected: HTTP 404",
                                                      anatomies={})),
    "parsed_with_an_error": json.dumps(_old_entry(error="request rejected: HTTP 404")),
    "unknown_status": json.dumps(_old_entry(anatomies={"liver": {"text": "t", "status": "fine", "findings": []}})),
    "unknown_anatomy": json.dumps(_old_entry(anatomies={"chest": {"text": "t", "status": "normal", "findings": []}})),
    "unknown_disease": json.dumps(_old_entry(anatomies={"liver": {"text": "t", "status": "abnormal", "findings": [
        {"disease_id": "dragon_pox", "presence": "present"}]}})),
    "anatomies_a_list": json.dumps(_old_entry(anatomies=[])),
    "other_format": json.dumps(_old_entry(cache_format=99)),
    "truncated_file": json.dumps(_old_entry())[:40],
    "a_json_list": "[]",
    "not_utf8": "\udcff",
}


@pytest.mark.parametrize("name", list(BAD_CACHE_FILES))
def test_a_cache_file_that_is_not_a_validated_answer_is_never_served(name, tmp_path):
    path = _entry_path(tmp_path, REPORTS[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(BAD_CACHE_FILES[name].encode("utf-8", "surrogateescape"))
    with FakeLLM() as srv:
        stats = llm.LLMStats()
        df = llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path), stats=stats)
        assert srv.chats == 1
    assert stats.cache_hits == 0 and stats.reports_requested == 1
    assert df.filter(pl.col("anatomy") == "liver")["status"].to_list() == ["normal"]
    assert json.loads(path.read_text())["outcome"] == "parsed"  # replaced by the validated answer


def test_a_valid_cache_entry_is_served_without_a_request(tmp_path):
    path = _entry_path(tmp_path, REPORTS[0])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_old_entry()))
    with FakeLLM(always(reply(500))) as srv:
        stats = llm.LLMStats()
        llm.parse_reports(cases_of(REPORTS[:1]), cfg_for(srv, tmp_path), stats=stats)
        assert srv.chats == 0
    assert stats.cache_hits == 1


# ----------------------------------------------------------------------------- pure checks of a completion

def test_parse_completion_takes_a_valid_completion():
    out = llm_client.parse_completion("application/json; charset=utf-8", json.dumps(completion()).encode())
    assert out.content == ANSWER and out.finish_reason == "stop" and out.prompt_tokens == 10
    assert llm_client.parse_completion(None, json.dumps(completion(None)).encode()).content is None
    odd_usage = {**completion(), "usage": {"prompt_tokens": "many", "completion_tokens": -3}}
    assert llm_client.parse_completion("application/vnd.api+json", json.dumps(odd_usage).encode()).prompt_tokens == 0


# ----------------------------------------------------------------------------- secrets in the config

def _token(prefix: str, n: int, alphabet: str = "aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0z") -> str:
    return prefix + (alphabet * 4)[:n]


TOKEN_SHAPED = {
    "hf": _token("hf_", 34), "ghp": _token("ghp_", 36), "gho": _token("gho_", 36),
    "github_pat": _token("github_pat_", 60),
    "slack": _token("xoxb_", 40), "aws": "AKIAIOSFODNN7EXAMPLE", "stripe": _token("sk_live_", 24),
    "openai_underscore": _token("sk_", 40), "gitlab": _token("glpat_", 20), "npm": _token("npm_", 36),
    "random_base62": "q7Xk2Lm9Pz4Rt8Vw3Ny6Bc1Df5Gh0Js", "random_hex": "3f9a1c7e5b2d8046af13c9e7b5d20864",
    "too_long": "A" * 65,
}
PLAIN_NAMES = ["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "HF_TOKEN", "HUGGINGFACE_HUB_TOKEN", "GITHUB_TOKEN",
               "ANTHROPIC_API_KEY", "CTVLP_TEST_LLM_KEY", "MY_LLM_KEY_2", "hf_token", "sk_key", "AKIA_KEY",
               "GROQ_API_KEY_2024_11_30", "vllm_api_key", "A" * 64]


@pytest.mark.parametrize("name", list(TOKEN_SHAPED))
def test_a_token_pasted_as_api_key_env_is_refused_without_being_shown(name):
    token = TOKEN_SHAPED[name]
    with pytest.raises(config.ConfigError) as ei:
        config.validate({"reports": {"llm": {"api_key_env": token}}})
    assert "reports.llm.api_key_env" in str(ei.value) and token not in str(ei.value)
    assert token[4:20] not in str(ei.value)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_plain_variable_names_are_accepted(name):
    assert config.validate({"reports": {"llm": {"api_key_env": name}}})["reports"]["llm"]["api_key_env"] == name


LITERAL_CREDENTIALS = {
    "user_password": ("https://alice:Pa55-w0rd-x@llm.example.org/v1", "Pa55-w0rd-x"),
    "token_as_user": (f"https://{TOKEN_SHAPED['ghp']}@llm.example.org/v1", TOKEN_SHAPED["ghp"]),
    "reference_then_literal": ("https://${LLM_USER}:hunter2-secret@llm.example.org/v1", "hunter2-secret"),
    "user_and_empty_password": ("http://tokenuser-123456:@10.0.0.5:8000/v1", "tokenuser-123456"),
    "query_key": ("https://llm.example.org/v1?api_key=k3y-in-the-query-77", "k3y-in-the-query-77"),
    "fragment": ("https://llm.example.org/v1#k3y-in-a-fragment-88", "k3y-in-a-fragment-88"),
    "password_with_at": ("https://bob:p@ss-w0rd-9@llm.example.org/v1", "ss-w0rd-9"),
}


@pytest.mark.parametrize("name", list(LITERAL_CREDENTIALS))
def test_literal_credentials_in_base_url_are_refused_without_being_shown(name):
    url, secret = LITERAL_CREDENTIALS[name]
    with pytest.raises(config.ConfigError) as ei:
        config.validate({"reports": {"llm": {"base_url": url}}})
    assert "reports.llm.base_url" in str(ei.value) and secret not in str(ei.value)
    assert "llm.example.org" in str(ei.value) or "10.0.0.5" in str(ei.value)  # the host is named


def test_the_snapshot_never_holds_a_secret(tmp_path):
    """``snapshot`` is the last guard: even a config that skipped validation is written redacted."""
    raw = config.validate({})
    raw["reports"]["llm"]["base_url"] = "https://alice:Pa55-w0rd-x@llm.example.org/v1"
    raw["reports"]["llm"]["api_key_env"] = TOKEN_SHAPED["hf"]
    text = config.snapshot(raw, tmp_path).read_text()
    assert "Pa55-w0rd-x" not in text and TOKEN_SHAPED["hf"] not in text and "llm.example.org" in text
    ok = config.validate({"reports": {"llm": {"base_url": "http://${U}:${P}@h:1/v1", "api_key_env": "MY_KEY"}}})
    assert json.loads(config.snapshot(ok, tmp_path / "ok").read_text()) == ok  # nothing to redact: as given


def test_an_unset_credential_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("CTVLP_TEST_UNSET_PASS", raising=False)
    monkeypatch.setenv("CTVLP_TEST_SET_USER", "someone")
    url = "http://${CTVLP_TEST_SET_USER}:${CTVLP_TEST_UNSET_PASS}@127.0.0.1:9/v1"
    with pytest.raises(config.ConfigError, match="CTVLP_TEST_UNSET_PASS is not set"):
        llm.parse_reports(cases_of(REPORTS[:1]), {"base_url": url, "model": MODEL, "cache_dir": str(tmp_path)})


# ----------------------------------------------------------------------------- secrets through a real run

SECRET_KEY = "sk-hostile-KEY-7d1e9a0b4c"
SECRET_USER = "alice-user-5q8w"
SECRET_PASS = "pw-S3cret-9x8y2z"
BASIC = "Basic " + base64.b64encode(f"{SECRET_USER}:{SECRET_PASS}".encode()).decode()
SECRETS = [SECRET_KEY, SECRET_USER, SECRET_PASS, BASIC.split()[1]]
CRED_URL = "http://${CTVLP_TEST_LLM_USER}:${CTVLP_TEST_LLM_PASS}@127.0.0.1:%d/v1"


def run_stage(tmp_path: Path, base_url: str, name: str) -> subprocess.CompletedProcess:
    """``ctvlp -v reports`` as the workflow's rule runs it (the run's config file, the manifest,
    the output under a results folder), with the key and the URL's credentials in the environment."""
    results = tmp_path / "results"
    manifest = results / "cohort" / "manifest.parquet"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    cases_of(REPORTS).write_parquet(manifest)
    cfg = config.validate({"results": str(results), "reports": {"backend": "llm", "catalog": "demo", "llm": {
        "base_url": base_url, "model": MODEL, "api_key_env": KEY_ENV, "max_retries": 1, "backoff_s": 0.01,
        "concurrency": 2, "timeout_s": 10, "response_format": "auto"}}})
    snap = config.snapshot(cfg, results / ".ctvlp" / "config")
    env = {**os.environ, KEY_ENV: SECRET_KEY, "CTVLP_TEST_LLM_USER": SECRET_USER, "CTVLP_TEST_LLM_PASS": SECRET_PASS}
    out = results / "reports" / "reports.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "ctvlp.cli", "-v", "reports", "--config", str(snap), "--sections", "reports",
         "--manifest", str(manifest), "--out", str(out)],
        check=False, env=env, capture_output=True, text=True, timeout=120)
    (results / "logs").mkdir(exist_ok=True)
    (results / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)  # as the rule's log: {log}
    return proc


def assert_no_secret_anywhere(tmp_path: Path) -> int:
    """No secret in any file under tmp_path (results, cache, logs, config snapshot); returns the
    number of files read."""
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret, path)
    return len(files)


def test_a_run_with_a_key_and_url_credentials_writes_and_prints_none_of_them(tmp_path):
    def chat(n, request, headers):
        if n == 0:  # a server that echoes the key in an error: a report rejected, its reason kept
            return reply(400, {"error": {"message": f"invalid request with key {SECRET_KEY} for {SECRET_USER}"}})
        return GOOD

    with FakeLLM(chat, auth=BASIC) as srv:
        ok = run_stage(tmp_path, CRED_URL % srv.port, "reports_ok")
        # the credentials reached the server, as basic auth; no request went without them
        assert all(headers.get("authorization") == BASIC for _, _, headers, _ in srv.requests)
        assert srv.chats >= len(REPORTS)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "HTTP Request: POST http://127.0.0.1" in ok.stderr  # httpx logs every request: without credentials
    df = pl.read_parquet(tmp_path / "results" / "reports" / "reports.parquet")
    assert dict(df.schema) == REPORT_SCHEMA
    errors = set(df["error"].drop_nulls())
    assert len(errors) == 1 and "***" in next(iter(errors))  # the echoed key and user, redacted

    with FakeLLM(always(NOT_COMPLETIONS["html_proxy_page"][0]), auth=BASIC) as srv:
        html = run_stage(tmp_path / "html", CRED_URL % srv.port, "reports_html")
    assert html.returncode != 0 and "content type 'text/html'" in html.stderr
    assert f"127.0.0.1:{srv.port}/v1" in html.stderr and "${CTVLP_TEST_LLM_PASS}" in html.stderr

    with FakeLLM(auth="Basic nobody") as srv:
        refused = run_stage(tmp_path / "refused", CRED_URL % srv.port, "reports_401")
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr and KEY_ENV in refused.stderr

    with FakeLLM(always(reply(404, {"error": {"message": "not found"}}))) as srv:
        wrong = run_stage(tmp_path / "wrong", srv.base_url, "reports_404")
    assert wrong.returncode != 0 and "HTTP 404" in wrong.stderr and srv.base_url in wrong.stderr
    assert not (tmp_path / "wrong" / "results" / "reports" / "reports.parquet").exists()

    assert assert_no_secret_anywhere(tmp_path) >= 12  # 4 runs: snapshot, manifest, log each; Parquet; cache
    for proc in (ok, html, refused, wrong):
        for secret in SECRETS:
            assert secret not in proc.stdout + proc.stderr


def test_log_records_of_any_logger_are_redacted(caplog):
    llm_client.register_secrets("sEcReT-value-for-log-test")
    import logging

    with caplog.at_level("INFO"):
        llm_client.register_secrets()  # the filter goes on the handlers present now (caplog's)
        logging.getLogger("some.library").info("sent %s to %s", "sEcReT-value-for-log-test",
                                               "https://bob:hunter2-pw@h/v1")
        logging.getLogger("other").warning("failed: http://bob:p@ss-w0rd-9@h:80/v1/chat (and ftp://tok3n-abc@x/)")
    assert "sEcReT-value-for-log-test" not in caplog.text and "hunter2-pw" not in caplog.text
    assert "sent *** to https://***:***@h/v1" in caplog.text
    assert "ss-w0rd-9" not in caplog.text and "tok3n-abc" not in caplog.text
    assert "failed: http://***:***@h:80/v1/chat (and ftp://***@x/)" in caplog.text


@pytest.mark.slow
def test_the_workflows_reports_rule_with_a_key_and_url_credentials_leaks_none_of_them(tmp_path, monkeypatch):
    """The workflow's own reports rule (Snakemake, the cohort before it) on a 4-case table, with the
    key and the URL's credentials in the environment: nothing under the working directory (results,
    the config snapshot, logs, .snakemake) and nothing printed holds them."""
    import yaml

    from snakemake_run import snakemake

    wd = tmp_path / "wd"
    wd.mkdir()
    made = subprocess.run([str(Path(sys.executable).with_name("ctvlp")), "example", "example", "--n-cases", "4",
                           "--results", "results"], cwd=wd, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    for name, value in ((KEY_ENV, SECRET_KEY), ("CTVLP_TEST_LLM_USER", SECRET_USER),
                        ("CTVLP_TEST_LLM_PASS", SECRET_PASS)):
        monkeypatch.setenv(name, value)
    with FakeLLM(auth=BASIC) as srv:
        cfg = yaml.safe_load((wd / "example" / "config.yaml").read_text())
        cfg["reports"] = {"backend": "llm", "catalog": cfg.get("reports", {}).get("catalog", "demo"), "llm": {
            "base_url": CRED_URL % srv.port, "model": MODEL, "api_key_env": KEY_ENV, "max_retries": 1,
            "backoff_s": 0.01, "response_format": "json_object"}}
        (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
        out = snakemake(wd, "results/reports/reports.parquet", "--configfile", str(wd / "config.yaml"))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        assert srv.chats >= 1 and all(h.get("authorization") == BASIC for _, _, h, _ in srv.requests)
    df = pl.read_parquet(wd / "results" / "reports" / "reports.parquet")
    assert set(df["backend"]) == {"llm"} and (df["status"] != "unparsed").all()
    assert (wd / "results" / "logs" / "reports.log").is_file() and list((wd / ".snakemake" / "log").glob("*.log"))
    assert "${CTVLP_TEST_LLM_PASS}" in (wd / "config.yaml").read_text()  # the config names the variables only
    assert assert_no_secret_anywhere(wd) > 10
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr
