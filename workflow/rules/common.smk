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


# ---- training phases and evaluated models (train.smk, evaluate.smk) ----

def phase_inputs(init_phase=None):
    """Data every phase reads, plus the previous phase's model where the chain has one."""

    def inner(w):
        inputs = {"manifest": R("qc/cases.parquet"), "reports": R("reports/reports.parquet")}
        if init_phase and not (init_phase == "visual_cl" and w.chain == "ablation/fvlm"):
            inputs["init"] = R(f"{w.chain}/{init_phase}/model.safetensors")
        return inputs

    return inner


def phase_rule_params(phase):
    return dict(
        settings=settings("model", "train", "seed"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("weights"),
        init=lambda w, input: f"--init {Path(input.init).parent}" if "init" in input.keys() else "",
        contrast=lambda w: "instance" if w.chain == "ablation/fvlm_icl" else "disease",
        phase=phase,
    )


TRAIN_SHELL = (
    "ctvlp train --phase {params.phase} --params {params.settings:q} --manifest {input.manifest:q}"
    " --reports {input.reports:q} --results {params.results:q} --out-dir {params.out_dir:q} {params.init}"
    " --contrast {params.contrast} > {log:q} 2>&1"
)


VARIANT_MODEL = {
    "fvlm": "ablation/fvlm/align",
    "fvlm_icl": "ablation/fvlm_icl/align",
    "fvlm_dcl": "train/align",
    "clip": "ablation/clip/global",
}


def model_of(w):
    folder = "train/boost" if w.evaldir == "eval" else VARIANT_MODEL[w.evaldir.split("/")[-1]]
    return {"weights": R(f"{folder}/model.safetensors"), "config": R(f"{folder}/config.json")}
