# Shared by all the workflow files (the validated config, the results folder, the settings each
# stage reads, the case list from the cohort checkpoint, and the training chains).
import math
import os
import shlex
from pathlib import Path

import polars as pl

from ctvlp import config as cfgmod
from ctvlp import runlock
from ctvlp import workspace
from ctvlp.imaging.segmentation import preflight as segment_preflight
from ctvlp.training import launch

# Snakemake read the config files with its own loader (aliases expanded, the last of duplicate keys
# kept, a YTE template evaluated): their text is read again by ctvlp's strict loader, so that the
# workflow and `ctvlp validate-config` accept the same files (the Snakefile checked config.yaml
# before Snakemake read it; a --configfile YTE template Snakemake has evaluated already).
cfgmod.check_files(workflow.configfiles)

# --use-conda: each env's post-deploy script pip-installs ctvlp from this checkout (envs/*.post-deploy.sh),
# also when snakemake runs with --directory elsewhere
os.environ.setdefault("CTVLP_SOURCE", workflow.basedir)
# Fill defaults and stop at start with the offending key on any unknown key, wrong type, NaN or
# infinity, split fractions that sum to zero or a brace in a path.
config.update(cfgmod.validate(config))

# Refuse a results folder that is /, empty, the checkout (or holds it), or someone else's non-empty
# folder, before any job: Snakemake itself deletes stale outputs inside it.
_results_problem = workspace.results_problem(config["results"], protected=[workflow.basedir, os.getcwd()],
                                             force=config["results_force"])
if _results_problem:
    raise cfgmod.ConfigError(_results_problem)

# segment.backend totalsegmentator: its package and weights (segment.fast: only the 3 mm model's
# folder) must be there before any job, not found missing by the first segment job.
_segment_problem = segment_preflight(config["segment"])
if _segment_problem:
    raise cfgmod.ConfigError(_segment_problem)

# The run's validated config, written when the workflow starts (onstart in the Snakefile) and read
# by every stage: no config value travels on a command line. Named by its content, so two runs
# with different configs never overwrite each other's file. A Path param is not a rerun trigger;
# the digest of the sections a rule passes is.
CONFIG_FILE = Path(config["results"], ".ctvlp", "config", f"{cfgmod.digest(config)[:16]}.json")


def write_run_config():
    workspace.prepare_results(config["results"], protected=[workflow.basedir, os.getcwd()],
                              force=config["results_force"])
    cfgmod.snapshot(config, CONFIG_FILE.parent)


def take_run_lock():
    """onstart: this run's lock on the results folder (ctvlp.runlock), its token exported to the jobs."""
    results = workspace.prepare_results(config["results"], protected=[workflow.basedir, os.getcwd()],
                                        force=config["results_force"])
    runlock.acquire_for_workflow(results, checkout=workflow.basedir)


def results_path(path):
    """A path under the configured results folder."""
    return f"{config['results']}/{path}"


def settings(*sections):
    """Rule params for `ctvlp --config {params.config_file} --sections {params.sections}`: the stage
    may read only these sections (or section.key entries), and a change to them re-runs the rule
    (runtime keys such as train.threads or train.device excepted)."""
    return dict(config_file=CONFIG_FILE, sections=",".join(sections),
                settings=cfgmod.digest(cfgmod.tracked(cfgmod.restrict(config, list(sections)))))


def all_shards(stage):
    """Input function: every shard table of a per-case stage, once the cohort is known."""

    def inner(wildcards):
        manifest = checkpoints.cohort.get().output.manifest
        cases = workspace.read_parquet(manifest, columns=["case_id"]).height
        return [results_path(f"shards/{stage}/{shard}.parquet") for shard in range(math.ceil(cases / config["shard_size"]))]

    return inner


def has_labels():
    """Whether the cohort came with ground-truth labels (evaluation needs them)."""
    truth = checkpoints.cohort.get().output.ground_truth
    return not workspace.read_parquet(truth, columns=["case_id"]).is_empty()


def final_targets(wildcards):
    """Everything `snakemake` builds by default; evaluation only when the cohort has labels; the model
    bundle (results/model) either way."""
    if not has_labels():  # the model bundle without thresholds
        return [results_path("qc/summary.md"), results_path("train/boost/model.safetensors"),
                results_path("model/bundle.json")]
    return [results_path(f) for f in ("eval/zeroshot.md", "eval/zeroshot_by_organ.md", "eval/zeroshot_by_type.md",
                           "eval/linear_probe.md", "eval/figures/roc_per_organ.png", "eval/figures/tsne.png",
                           "eval/figures/activation_histograms.png", "eval/figures/activation_maps.png",
                           "model/bundle.json")]


def parent_of(name, up=0):
    """Param function: the folder of a rule's input/output file (lint-clean, no hardcoded prefix)."""

    def inner(wildcards, input=None, output=None):
        files = input if name in input.keys() else output
        return str(Path(files[name]).parents[up])

    return inner


# GPUs a job really uses: TotalSegmentator on the GPU; training (and evaluation) on cuda, or on auto
# where CUDA is present. On a cluster set train.device: cuda (the submitting host may have no GPU).
SEGMENT_GPU = 1 if config["segment"]["backend"] == "totalsegmentator" and config["segment"]["device"] == "gpu" else 0
TRAIN_ON_GPU = config["train"]["device"].startswith("cuda") or (config["train"]["device"] == "auto" and launch.cuda_present())
TRAIN_GPU = config["train"]["gpus"] if TRAIN_ON_GPU else 0
EVAL_GPU = 1 if TRAIN_ON_GPU else 0


# ---- training chains (train.smk) and evaluated models (evaluate.smk) ----
# Each chain runs phases in order; a phase starts from the chain's previous phase.
CHAINS = {
    "train": ("visual_cl", "align", "normality", "boost"),  # the full method, ViSD-Boost
    "ablation/fvlm": ("align",),  # fVLM: phase 2 only
    "ablation/fvlm_icl": ("visual_cl", "align"),  # instance-level phase 1, then phase 2
    "ablation/clip": ("global",),  # CLIP-style global alignment
}


def previous_phase(chain, phase):
    phases = CHAINS[chain]
    i = phases.index(phase)
    return phases[i - 1] if i else None


def phase_inputs(w):
    """Data every phase reads, plus the previous phase's model where the chain has one."""
    inputs = {"cases": results_path("qc/cases.parquet"), "reports": results_path("reports/reports.parquet")}
    before = previous_phase(w.chain, w.phase)
    if before:
        inputs["init"] = results_path(f"{w.chain}/{before}/model.safetensors")
    return inputs


VARIANT_MODEL = {
    "fvlm": "ablation/fvlm/align",
    "fvlm_icl": "ablation/fvlm_icl/align",
    "fvlm_dcl": "train/align",
    "clip": "ablation/clip/global",
}


def model_of(w):
    folder = "train/boost" if w.evaldir == "eval" else VARIANT_MODEL[w.evaldir.split("/")[-1]]
    return {"weights": results_path(f"{folder}/model.safetensors"), "config": results_path(f"{folder}/config.json")}


# ---- what the cohort and the per-case shards read beyond their input files (cohort.smk, imaging.smk) ----
from ctvlp.imaging.stage import file_identity as _file_identity


def _as_list(value):
    return [] if not value else [value] if isinstance(value, str) else list(value)


def cohort_inputs(wildcards):
    """The table, CT-RATE CSVs and YAML disease catalog the cohort reads."""
    cohort = config["cohort"]
    if cohort["source"] == "table":
        files = _as_list(cohort["table"]["path"])
    elif cohort["source"] == "ctrate":
        files = [f for key in ("metadata_csv", "reports_csv", "labels_csv") for f in _as_list(cohort["ctrate"][key])]
    else:
        files = []
    catalog = config["evaluate"]["catalog"]
    return files + ([catalog] if str(catalog).endswith((".yaml", ".yml")) else [])


def _stats_under(path):
    """{file: (size, mtime_ns)} of a file, or of every file under a folder (stat only)."""
    path = Path(path)
    files = [Path(d) / f for d, _, names in os.walk(path) for f in names] if path.is_dir() else [path]
    return {str(f): _file_identity(f, content=False) for f in files}


def cohort_reads(wildcards):
    """Digest of what the cohort reads beyond its input files (see the top of this file)."""
    cohort = config["cohort"]
    found = {}
    if cohort["source"] == "table" and cohort["table"]["path"]:
        from ctvlp.cohort.tables import read_table

        table = Path(cohort["table"]["path"])
        try:
            df = read_table(table, cohort["text_fallback_encoding"])
        except Exception as e:  # the cohort job reports it, naming the table
            return f"unreadable: {type(e).__name__}"
        for col in (cohort["table"]["image_col"], cohort["table"]["mask_col"]):
            for value in (df[col].to_list() if col and col in df.columns else []):
                if value and str(value).strip():
                    p = Path(str(value).strip()).expanduser()
                    found.update(_stats_under(p if p.is_absolute() else table.resolve().parent / p))
    elif cohort["source"] == "ctrate" and cohort["ctrate"]["volumes_root"]:
        root = Path(cohort["ctrate"]["volumes_root"])
        found = {"volumes": sorted(os.path.relpath(Path(d) / f, root) for d, _, names in os.walk(root)
                                   for f in names if ".nii" in f)}
    return cfgmod.digest(found)


from ctvlp.imaging.stage import shard_inputs_digest


def shard_inputs(segment_cfg=None):
    def inner(wildcards):
        return shard_inputs_digest(results_path("cohort/manifest.parquet"), int(wildcards.shard),
                                   config["shard_size"], segment_cfg)

    return inner
