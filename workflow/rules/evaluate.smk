rule evaluate_zeroshot:
    input:
        weights=R("train/align/model.safetensors"),
        config=R("train/align/config.json"),
        manifest=R("qc/cases.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    output:
        table=report(R("eval/zeroshot.md"), caption="../report/zeroshot.rst", category="Zero-shot diagnosis"),
        csv=R("eval/zeroshot.csv"),
        by_organ=report(R("eval/zeroshot_by_organ.md"), caption="../report/zeroshot_by_organ.rst",
                        category="Zero-shot diagnosis"),
        by_type=R("eval/zeroshot_by_type.md"),
        parquet=R("eval/zeroshot.parquet"),
        predictions=R("eval/predictions.parquet"),
    params:
        settings=settings("evaluate", "train", "model", "seed"),
        model_dir=parent_of("weights"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("table"),
    log:
        R("logs/evaluate_zeroshot.log"),
    benchmark:
        R("benchmarks/evaluate_zeroshot.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp evaluate --params {params.settings:q} --model {params.model_dir:q} --manifest {input.manifest:q}"
        " --results {params.results:q} --ground-truth {input.ground_truth:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
