# The full method (ViSD-Boost, phase 4's model) is evaluated into results/eval/; each other
# ablation variant into results/eval/ablation/<variant>/.
wildcard_constraints:
    evaldir="eval|eval/ablation/(fvlm|fvlm_icl|fvlm_dcl|clip)",


rule evaluate_zeroshot:
    input:
        unpack(model_of),
        cases=results_path("qc/cases.parquet"),
        ground_truth=results_path("cohort/ground_truth.parquet"),
    output:
        table=results_path("{evaldir}/zeroshot.md"),
        csv=results_path("{evaldir}/zeroshot.csv"),
        by_organ=results_path("{evaldir}/zeroshot_by_organ.md"),
        by_type=results_path("{evaldir}/zeroshot_by_type.md"),
        # the tables as HTML pages: the report shows them inline (a .md or .csv only as a download)
        html=report(results_path("{evaldir}/zeroshot.html"), caption="../report/zeroshot.rst",
                    category="Zero-shot diagnosis", subcategory="{evaldir}", labels={"table": "per disease"}),
        by_organ_html=report(results_path("{evaldir}/zeroshot_by_organ.html"), caption="../report/zeroshot_by_organ.rst",
                             category="Zero-shot diagnosis", subcategory="{evaldir}", labels={"table": "per organ"}),
        by_type_html=report(results_path("{evaldir}/zeroshot_by_type.html"), caption="../report/zeroshot_by_type.rst",
                            category="Zero-shot diagnosis", subcategory="{evaldir}",
                            labels={"table": "local vs diffuse"}),
        parquet=results_path("{evaldir}/zeroshot.parquet"),
        predictions=results_path("{evaldir}/predictions.parquet"),
    params:
        **settings("evaluate", "train", "model", "seed"),
        model_dir=parent_of("weights"),
        out_dir=parent_of("table"),
    log:
        results_path("logs/{evaldir}/evaluate_zeroshot.log"),
    benchmark:
        results_path("benchmarks/{evaldir}/evaluate_zeroshot.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=EVAL_GPU,
        runtime=lambda w, attempt: attempt * 4 * 60,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp evaluate --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --model {params.model_dir:q} --cases {input.cases:q} --ground-truth {input.ground_truth:q}"
        " --out-dir {params.out_dir:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


rule linear_probe:
    input:
        unpack(model_of),
        cases=results_path("qc/cases.parquet"),
        reports=results_path("reports/reports.parquet"),
        ground_truth=results_path("cohort/ground_truth.parquet"),
    output:
        table=results_path("{evaldir}/linear_probe.md"),
        html=report(results_path("{evaldir}/linear_probe.html"), caption="../report/linear_probe.rst",
                    category="Linear probe", subcategory="{evaldir}", labels={"table": "per disease"}),
        by_organ_html=report(results_path("{evaldir}/linear_probe_by_organ.html"),
                             caption="../report/linear_probe_by_organ.rst", category="Linear probe",
                             subcategory="{evaldir}", labels={"table": "per organ"}),
        by_type_html=report(results_path("{evaldir}/linear_probe_by_type.html"),
                            caption="../report/linear_probe_by_type.rst", category="Linear probe",
                            subcategory="{evaldir}", labels={"table": "local vs diffuse"}),
        csv=results_path("{evaldir}/linear_probe.csv"),
        parquet=results_path("{evaldir}/linear_probe.parquet"),
        by_organ=results_path("{evaldir}/linear_probe_by_organ.md"),
        by_type=results_path("{evaldir}/linear_probe_by_type.md"),
        predictions=results_path("{evaldir}/linear_probe_predictions.parquet"),
    params:
        **settings("evaluate", "train", "model", "seed"),
        model_dir=parent_of("weights"),
        out_dir=parent_of("table"),
    log:
        results_path("logs/{evaldir}/linear_probe.log"),
    benchmark:
        results_path("benchmarks/{evaldir}/linear_probe.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=EVAL_GPU,
        runtime=lambda w, attempt: attempt * 4 * 60,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp linear-probe --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --model {params.model_dir:q} --cases {input.cases:q} --reports {input.reports:q}"
        " --ground-truth {input.ground_truth:q} --out-dir {params.out_dir:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


rule figures:
    input:
        weights=results_path("train/boost/model.safetensors"),
        config=results_path("train/boost/config.json"),
        baseline=results_path("train/align/model.safetensors"),
        predictions=results_path("eval/predictions.parquet"),
        cases=results_path("qc/cases.parquet"),
        ground_truth=results_path("cohort/ground_truth.parquet"),
        thresholds=results_path("eval/zeroshot.csv"),  # the ROC's operating points
        # a training-curve figure per phase of the full method
        metrics=[results_path(f"train/{phase}/metrics.csv") for phase in CHAINS["train"]],
    output:
        **{f"training_{phase}": report(results_path(f"eval/figures/training_{phase}.png"),
                                       caption=f"../report/train_{phase}.rst", category="Training",
                                       subcategory="train", labels={"phase": phase, "figure": "curves"})
           for phase in CHAINS["train"]},
        roc=report(results_path("eval/figures/roc_per_organ.png"), caption="../report/roc.rst", category="Figures"),
        tsne=report(results_path("eval/figures/tsne.png"), caption="../report/tsne.rst", category="Figures"),
        histograms=report(results_path("eval/figures/activation_histograms.png"), caption="../report/histograms.rst",
                          category="Figures"),
        maps=report(results_path("eval/figures/activation_maps.png"), caption="../report/maps.rst", category="Figures"),
    params:
        **settings("evaluate", "train", "seed"),
        model_dir=parent_of("weights"),
        baseline_dir=parent_of("baseline"),
        out_dir=parent_of("roc"),
    log:
        results_path("logs/eval/figures.log"),
    benchmark:
        results_path("benchmarks/eval/figures.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=EVAL_GPU,
        runtime=lambda w, attempt: attempt * 4 * 60,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp figures --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --model {params.model_dir:q} --baseline-model {params.baseline_dir:q} --predictions {input.predictions:q}"
        " --cases {input.cases:q} --ground-truth {input.ground_truth:q} --out-dir {params.out_dir:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


ABLATION_VARIANTS = {"clip": "eval/ablation/clip", "fvlm": "eval/ablation/fvlm", "fvlm_icl": "eval/ablation/fvlm_icl",
                     "fvlm_dcl": "eval/ablation/fvlm_dcl", "visd": "eval"}


rule ablation:
    input:
        **{f"{v}_table": results_path(f"{d}/zeroshot.csv") for v, d in ABLATION_VARIANTS.items()},
        **{f"{v}_predictions": results_path(f"{d}/predictions.parquet") for v, d in ABLATION_VARIANTS.items()},
    output:
        table=results_path("eval/ablation.md"),
        csv=results_path("eval/ablation.csv"),
        html=report(results_path("eval/ablation.html"), caption="../report/ablation.rst", category="Zero-shot diagnosis",
                    subcategory="ablation", labels={"table": "ablation"}),
    params:
        **settings("evaluate.bootstrap", "seed"),
        variants=lambda w, input: " ".join(f"--variant {v}={shlex.quote(str(Path(input[f'{v}_table']).parent))}"
                                           for v in ABLATION_VARIANTS),
    log:
        results_path("logs/ablation.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp ablation --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " {params.variants} --out {output.table:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


# The self-contained model `ctvlp predict --model results/model SCAN` runs without a config: the
# full method's weights with bundle.json (the settings it was trained with, the anatomy grouping,
# the disease prompts and prompt style, the text model's hash, and the thresholds chosen on
# validation; without labels there is no evaluation, and the bundle holds no thresholds).
from ctvlp import bundle as model_bundle


rule bundle:
    input:
        weights=results_path("train/boost/model.safetensors"),
        config=results_path("train/boost/config.json"),
        # once evaluation has run: only a cohort with labels is evaluated
        thresholds=lambda w: results_path("eval/zeroshot.csv") if has_labels() else [],
    output:
        weights=results_path("model/model.safetensors"),
        config=results_path("model/config.json"),
        bundle=results_path("model/bundle.json"),
    params:
        **settings(*model_bundle.sections()),
        model_dir=parent_of("weights"),
        out_dir=parent_of("bundle"),
        thresholds=lambda w, input: f"--thresholds {shlex.quote(str(input.thresholds))}" if input.thresholds else "",
    log:
        results_path("logs/bundle.log"),
    benchmark:
        results_path("benchmarks/bundle.tsv")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp bundle --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --model {params.model_dir:q} {params.thresholds} --out {params.out_dir:q} --progress-fd 3 3>&2 > {log:q} 2>&1"
