# ctvlp workflow: CT cohort -> anatomy segmentation -> preprocessing -> report parsing ->
# anatomy-wise vision-language training -> zero-shot evaluation.
# All logic lives in the `ctvlp` package; rules only call its subcommands.
from pathlib import Path

from snakemake.utils import min_version

min_version("8.0")


# Snakemake reads config files with its own YAML loader: it expands aliases, keeps the last of
# duplicate keys and evaluates the Python of a YTE template (a file that sets __use_yte__: true).
# The default config file is read here first by ctvlp's strict loader, so such a file stops before
# Snakemake evaluates any of it. A file given with --configfile Snakemake reads before this file
# runs: common.smk refuses it the same way, after the fact.
from ctvlp import config as _strict_config

if Path("config.yaml").is_file():
    _strict_config.check_files(["config.yaml"])


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/imaging.smk"
include: "workflow/rules/reports.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        final_targets,
    default_target: True


# One workflow run per results folder (ctvlp.runlock): its lock lives in the results folder, not in
# this checkout's .snakemake. A run takes it at start, before any job, and stops there naming the
# holder when another live run holds it; -n, --report and --unlock take none and only warn here.
import sys as _sys

from ctvlp import runlock as _runlock

_lock_warning = _runlock.warning_if_held(config["results"])
if _lock_warning:
    print(f"Warning: {_lock_warning}", file=_sys.stderr)


onstart:
    # this run's lock on the results folder, its token exported to the jobs (before anything is written)
    take_run_lock()
    # the results folder (checked above, marked as ctvlp's now) and the run's config for the stages
    write_run_config()


onsuccess:
    _runlock.release_for_workflow(config["results"])  # the results folder's lock (taken in onstart)
    # the data QC summary: how many cases went on, and each exclusion with its reason
    summary = Path(results_path("qc/summary.md"))
    if summary.is_file():
        print(summary.read_text())
    truth = Path(results_path("cohort/ground_truth.parquet"))
    if truth.is_file() and workspace.read_parquet(truth, columns=["case_id"]).is_empty():
        print("No ground-truth labels in this cohort: there is no evaluation (it needs cohort.table.label_cols "
              "or cohort.ctrate.labels_csv).")
    # only what this results folder holds now (a run of some targets, e.g. qc only, trains nothing)
    outputs = [(what, results_path(path)) for what, path, marker in (
        ("The trained model", "train/boost", "train/boost/model.safetensors"),
        ("The model bundle (for ctvlp predict)", "model", "model/bundle.json"),
        ("The zero-shot evaluation", "eval/zeroshot.md", "eval/zeroshot.md"),
    ) if Path(results_path(marker)).is_file()]
    for what, path in outputs:
        print(f"{what}: {path}")
    # the headline result, the excluded cases and the report (ctvlp.summary: what the folder holds)
    from ctvlp.summary import run_summary as _run_summary

    _given = [str(f) for f in workflow.overwrite_configfiles or ()]
    print("\n".join(_run_summary(config["results"], configfile=" ".join(_given) or None)))


onerror:
    _runlock.release_for_workflow(config["results"])  # the results folder's lock (taken in onstart)
