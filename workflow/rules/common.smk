import os
from pathlib import Path

import polars as pl

from ctvlp import config as cfgmod
from ctvlp import workspace

# Fill defaults and stop at start with the offending key on any unknown key or wrong type.
config.update(cfgmod.validate(config))

# Refuse a results folder that is /, empty, the checkout (or holds it), or someone else's non-empty
# folder, before any job: Snakemake itself deletes stale outputs inside it.
_results_problem = workspace.results_problem(config["results"], protected=[workflow.basedir, os.getcwd()],
                                             force=config["results_force"])
if _results_problem:
    raise cfgmod.ConfigError(_results_problem)

# The run's validated config, written when the workflow starts (onstart in the Snakefile) and read
# by every stage: no config value travels on a command line. Named by its content, so two runs
# with different configs never overwrite each other's file. A Path param is not a rerun trigger;
# the digest of the sections a rule passes is.
CONFIG_FILE = Path(config["results"], ".ctvlp", "config", f"{cfgmod.digest(config)[:16]}.json")


def write_run_config():
    workspace.prepare_results(config["results"], protected=[workflow.basedir, os.getcwd()],
                              force=config["results_force"])
    cfgmod.snapshot(config, CONFIG_FILE.parent)


def R(path):
    """A path under the configured results folder."""
    return f"{config['results']}/{path}"


def settings(*sections):
    """Rule params for `ctvlp --config {params.config_file} --sections {params.sections}`: the stage
    may read only these sections (or section.key entries), and a change to them re-runs the rule."""
    return dict(config_file=CONFIG_FILE, sections=",".join(sections),
                settings=cfgmod.digest(cfgmod.restrict(config, list(sections))))


def case_ids():
    manifest = checkpoints.cohort.get().output.manifest
    return pl.read_parquet(manifest, columns=["case_id"])["case_id"].to_list()


def has_labels():
    """Whether the cohort came with ground-truth labels (evaluation needs them)."""
    truth = checkpoints.cohort.get().output.ground_truth
    return not pl.read_parquet(truth, columns=["case_id"]).is_empty()


def final_targets(wildcards):
    """Everything `snakemake` builds by default; evaluation only when the cohort has labels."""
    if not has_labels():
        return [R("qc/summary.md"), R("train/boost/model.safetensors")]
    return [R(f) for f in ("eval/zeroshot.md", "eval/zeroshot_by_organ.md", "eval/zeroshot_by_type.md",
                           "eval/linear_probe.md", "eval/figures/roc_per_organ.png", "eval/figures/tsne.png",
                           "eval/figures/activation_histograms.png", "eval/figures/activation_maps.png")]


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
        **settings("model", "train", "seed"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("weights"),
        init=lambda w, input: f"--init {Path(input.init).parent}" if "init" in input.keys() else "",
        contrast=lambda w: "instance" if w.chain == "ablation/fvlm_icl" else "disease",
        phase=phase,
    )


TRAIN_SHELL = (
    "ctvlp train --phase {params.phase} --config {params.config_file:q} --sections {params.sections}"
    " --manifest {input.manifest:q}"
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
