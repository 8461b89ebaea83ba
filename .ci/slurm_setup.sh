#!/usr/bin/env bash
# Install what the SLURM workflow tests need (tests/slurm_cluster.py starts a private one-node cluster):
#   - Debian's slurm-wlm (22.05: slurmctld, slurmd, client commands) and munge, from apt;
#     skipped when slurmctld, slurmd and munged are already installed;
#   - snakemake-executor-plugin-slurm (+ its jobstep plugin) into a venv, pinned to the versions
#     verified against snakemake 9.27 with `--slurm-status-command squeue` (no slurmdbd/sacct).
# No daemon is started, configured or enabled here: the tests start their own, as root.
# Idempotent: a second run finds everything and changes nothing.
#
# Usage: .ci/slurm_setup.sh [/path/to/venv/bin/python]   (default: .venv/bin/python)
# Env:   SLURM_PLUGIN_VERSION (default 2.8.0), SLURM_JOBSTEP_VERSION (default 0.6.1)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-.venv/bin/python}
[ -x "$PY" ] || { echo "slurm_setup: $PY is not an executable python" >&2; exit 2; }
PLUGIN_VER=${SLURM_PLUGIN_VERSION:-2.8.0}
JOBSTEP_VER=${SLURM_JOBSTEP_VERSION:-0.6.1}

say() { echo "slurm_setup: $*"; }
CLEANUP=()
trap 'rm -f "${CLEANUP[@]}"' EXIT
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in sbin

# ---- system packages -------------------------------------------------------------------------
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    say "slurm-wlm and munge already installed ($(slurmctld -V), $(munged -V 2>&1 | head -n1))"
else
    [ "$(id -u)" -eq 0 ] || { echo "slurm_setup: installing slurm-wlm and munge needs root" >&2; exit 1; }
    # Without systemd, apt's postinst would start the system munge/slurm services through
    # invoke-rc.d; a policy-rc.d that answers 101 forbids that (Docker images ship one).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CLEANUP+=(/usr/sbin/policy-rc.d)
    fi
    say "installing slurm-wlm and munge with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
    say "installed $(slurmctld -V), $(munged -V 2>&1 | head -n1)"
fi

# ---- python plugin ---------------------------------------------------------------------------
installed() {  # installed <dist> <version>
    [ "$("$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1")" = "$2" ]
}

if installed snakemake-executor-plugin-slurm "$PLUGIN_VER" && installed snakemake-executor-plugin-slurm-jobstep "$JOBSTEP_VER"; then
    say "snakemake-executor-plugin-slurm $PLUGIN_VER and -jobstep $JOBSTEP_VER already installed"
else
    # pin what is already in the venv so pip fails rather than replaces it
    CONSTRAINTS=$(mktemp)
    CLEANUP+=("$CONSTRAINTS")
    "$PY" - >"$CONSTRAINTS" <<'EOF'
import importlib.metadata as m
for dist in ("snakemake", "numpy", "pandas"):
    try:
        print(f"{dist}=={m.version(dist)}")
    except m.PackageNotFoundError:
        pass
EOF
    grep -q '^snakemake==' "$CONSTRAINTS" || { echo "slurm_setup: no snakemake in $PY's environment" >&2; exit 1; }
    say "installing snakemake-executor-plugin-slurm==$PLUGIN_VER, -jobstep==$JOBSTEP_VER (constraints: $(tr '\n' ' ' <"$CONSTRAINTS"))"
    "$PY" -m pip install -c "$CONSTRAINTS" \
        "snakemake-executor-plugin-slurm==$PLUGIN_VER" "snakemake-executor-plugin-slurm-jobstep==$JOBSTEP_VER"
fi

"$PY" - <<'EOF'
import importlib.metadata as m
import snakemake_executor_plugin_slurm, snakemake_executor_plugin_slurm_jobstep  # noqa: F401  (they import)
print("slurm_setup: ok: " + ", ".join(f"{d} {m.version(d)}" for d in (
    "snakemake", "snakemake-executor-plugin-slurm", "snakemake-executor-plugin-slurm-jobstep")))
EOF
