rule train_align:
    input:
        manifest=R("qc/cases.parquet"),
        reports=R("reports/reports.parquet"),
    output:
        weights=R("train/align/model.safetensors"),
        config=R("train/align/config.json"),
        metrics=report(R("train/align/metrics.csv"), caption="../report/train_metrics.rst", category="Training"),
    params:
        settings=settings("model", "train", "seed"),
        results=parent_of("manifest", up=1),
        out_dir=parent_of("weights"),
    log:
        R("logs/train_align.log"),
    benchmark:
        R("benchmarks/train_align.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        "ctvlp train --params {params.settings:q} --manifest {input.manifest:q} --reports {input.reports:q}"
        " --results {params.results:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
