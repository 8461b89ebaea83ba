# ctvlp workflow: CT cohort -> anatomy segmentation -> preprocessing -> report parsing ->
# anatomy-wise vision-language training -> zero-shot evaluation.
# All logic lives in the `ctvlp` package; rules only call its subcommands.
from snakemake.utils import min_version

min_version("8.0")


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


onstart:
    # the results folder (checked above, marked as ctvlp's now) and the run's config for the stages
    write_run_config()


onsuccess:
    # the data QC summary: how many cases went on, and each exclusion with its reason
    summary = Path(results_path("qc/summary.md"))
    if summary.is_file():
        print(summary.read_text())
    truth = Path(results_path("cohort/ground_truth.parquet"))
    if truth.is_file() and pl.read_parquet(truth, columns=["case_id"]).is_empty():
        print("No ground-truth labels in this cohort: evaluation was skipped (it needs cohort.table.label_cols "
              f"or cohort.ctrate.labels_csv). The trained model is in {results_path('train/boost')}")
