# The full method (ViSD-Boost, phase 4's model) is evaluated into results/eval/; each other
# ablation variant into results/eval/ablation/<variant>/.
wildcard_constraints:
    evaldir="eval|eval/ablation/(fvlm|fvlm_icl|fvlm_dcl|clip)",


rule evaluate_zeroshot:
    input:
        unpack(model_of),
        manifest=R("qc/cases.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    output:
        table=report(R("{evaldir}/zeroshot.md"), caption="../report/zeroshot.rst", category="Zero-shot diagnosis"),
        csv=R("{evaldir}/zeroshot.csv"),
        by_organ=report(R("{evaldir}/zeroshot_by_organ.md"), caption="../report/zeroshot_by_organ.rst",
                        category="Zero-shot diagnosis"),
        by_type=R("{evaldir}/zeroshot_by_type.md"),
        parquet=R("{evaldir}/zeroshot.parquet"),
        predictions=R("{evaldir}/predictions.parquet"),
    params:
        **settings("evaluate", "train", "model", "seed"),
        model_dir=parent_of("weights"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("table"),
    log:
        R("logs/{evaldir}/evaluate_zeroshot.log"),
    benchmark:
        R("benchmarks/{evaldir}/evaluate_zeroshot.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp evaluate --config {params.config_file:q} --sections {params.sections} --model {params.model_dir:q} --manifest {input.manifest:q}"
        " --results {params.results:q} --ground-truth {input.ground_truth:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"


rule linear_probe:
    input:
        unpack(model_of),
        manifest=R("qc/cases.parquet"),
        reports=R("reports/reports.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    output:
        table=report(R("{evaldir}/linear_probe.md"), caption="../report/linear_probe.rst", category="Linear probe"),
        csv=R("{evaldir}/linear_probe.csv"),
        parquet=R("{evaldir}/linear_probe.parquet"),
        by_organ=R("{evaldir}/linear_probe_by_organ.md"),
        by_type=R("{evaldir}/linear_probe_by_type.md"),
        predictions=R("{evaldir}/linear_probe_predictions.parquet"),
    params:
        **settings("evaluate", "train", "model", "seed"),
        model_dir=parent_of("weights"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("table"),
    log:
        R("logs/{evaldir}/linear_probe.log"),
    benchmark:
        R("benchmarks/{evaldir}/linear_probe.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp linear-probe --config {params.config_file:q} --sections {params.sections} --model {params.model_dir:q} --manifest {input.manifest:q}"
        " --reports {input.reports:q} --results {params.results:q} --ground-truth {input.ground_truth:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule figures:
    input:
        weights=R("train/boost/model.safetensors"),
        config=R("train/boost/config.json"),
        baseline=R("train/align/model.safetensors"),
        predictions=R("eval/predictions.parquet"),
        manifest=R("qc/cases.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    output:
        roc=report(R("eval/figures/roc_per_organ.png"), caption="../report/roc.rst", category="Figures"),
        tsne=report(R("eval/figures/tsne.png"), caption="../report/tsne.rst", category="Figures"),
        histograms=report(R("eval/figures/activation_histograms.png"), caption="../report/histograms.rst",
                          category="Figures"),
        maps=report(R("eval/figures/activation_maps.png"), caption="../report/maps.rst", category="Figures"),
    params:
        **settings("evaluate", "train", "seed"),
        model_dir=parent_of("weights"),
        baseline_dir=parent_of("baseline"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("roc"),
    log:
        R("logs/eval/figures.log"),
    benchmark:
        R("benchmarks/eval/figures.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp figures --config {params.config_file:q} --sections {params.sections} --model {params.model_dir:q}"
        " --baseline-model {params.baseline_dir:q} --predictions {input.predictions:q}"
        " --manifest {input.manifest:q} --results {params.results:q}"
        " --ground-truth {input.ground_truth:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule ablation:
    input:
        visd=R("eval/zeroshot.csv"),
        **{v: R(f"eval/ablation/{v}/zeroshot.csv") for v in ("clip", "fvlm", "fvlm_icl", "fvlm_dcl")},
    output:
        table=report(R("eval/ablation.md"), caption="../report/ablation.rst", category="Zero-shot diagnosis"),
        csv=R("eval/ablation.csv"),
    log:
        R("logs/ablation.log"),
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp ablation --variant clip={input.clip:q} --variant fvlm={input.fvlm:q} --variant fvlm_icl={input.fvlm_icl:q}"
        " --variant fvlm_dcl={input.fvlm_dcl:q} --variant visd={input.visd:q} --out {output.table:q} > {log:q} 2>&1"
