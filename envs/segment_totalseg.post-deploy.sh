#!/usr/bin/env bash
# Snakemake (--use-conda) runs this once in the new environment of envs/segment_totalseg.yaml, after conda
# created it, from Snakemake's working directory: ctvlp's checkout, where the Snakefile is (or set
# CTVLP_SOURCE to the checkout). Snakemake runs a copy (.snakemake/conda/<hash>.post-deploy.sh), so
# no path here is relative to this file. --no-deps: the env file holds ctvlp's dependencies.
set -euo pipefail
src="${CTVLP_SOURCE:-$PWD}"
if ! grep -qs '^name = "ctvlp"$' "$src/pyproject.toml"; then
    echo "ctvlp post-deploy: $src is not ctvlp's checkout (no pyproject.toml naming ctvlp); run snakemake" \
         "from the checkout or set CTVLP_SOURCE to it" >&2
    exit 1
fi
python -m pip install --no-deps --editable "$src"
# TotalSegmentator and nnU-Net from PyPI at the versions of requirements.lock (their own
# dependencies too; torch is the env's conda-forge build, which pip counts as installed)
python -m pip install -c "$src/requirements.lock" totalsegmentator nnunetv2
