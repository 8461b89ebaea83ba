import json
from pathlib import Path

import polars as pl

from ctvlp.config import validate as validate_config

# Fill defaults and stop at start with the offending key on any unknown key or wrong type.
config.update(validate_config(config))


def R(path):
    """A path under the configured results folder."""
    return f"{config['results']}/{path}"


def settings(*sections):
    """Config sections as JSON for `ctvlp --params`; a change re-runs only rules that use them."""
    return json.dumps({s: config[s] for s in sections}, sort_keys=True)


def settings_with(sections, **some_keys):
    """Like `settings`, plus only the named keys of other sections (settings_with(["segment"],
    preprocess=["min_slices"])): a change to the section's other keys does not re-run the rule."""
    out = {s: config[s] for s in sections}
    out.update({s: {k: config[s][k] for k in keys} for s, keys in some_keys.items()})
    return json.dumps(out, sort_keys=True)


def case_ids():
    manifest = checkpoints.cohort.get().output.manifest
    return pl.read_parquet(manifest, columns=["case_id"])["case_id"].to_list()


def all_cases(pattern):
    def inner(wildcards):
        return [R(pattern.format(case=c)) for c in case_ids()]

    return inner


def parent_of(name, up=0):
    """Param function: the folder of a rule's input/output file (lint-clean, no hardcoded prefix)."""

    def inner(wildcards, input=None, output=None):
        files = input if name in input.keys() else output
        return str(Path(files[name]).parents[up])

    return inner


TRAIN_GPU = 1 if config["train"]["device"].startswith("cuda") else 0
