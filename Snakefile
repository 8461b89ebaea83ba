# ctvlp workflow: CT cohort -> anatomy segmentation -> preprocessing -> report parsing ->
# anatomy-wise vision-language training -> zero-shot evaluation.
# All logic lives in the `ctvlp` package; rules only call its subcommands.
from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/imaging.smk"
include: "workflow/rules/reports.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        R("eval/zeroshot.md"),
        R("eval/zeroshot_by_organ.md"),
        R("eval/zeroshot_by_type.md"),
        R("eval/linear_probe.md"),
        R("eval/figures/roc_per_organ.png"),
        R("eval/figures/tsne.png"),
        R("eval/figures/activation_histograms.png"),
        R("eval/figures/activation_maps.png"),
    default_target: True


onsuccess:
    # the data QC summary: how many cases went on, and each exclusion with its reason
    summary = Path(R("qc/summary.md"))
    if summary.is_file():
        print(summary.read_text())
