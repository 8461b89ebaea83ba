checkpoint cohort:
    output:
        manifest=R("cohort/manifest.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    params:
        settings=settings("cohort", "seed"),
        out=parent_of("manifest"),
    log:
        R("logs/cohort.log"),
    benchmark:
        R("benchmarks/cohort.tsv")
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp demo-data --params {params.settings:q} --out {params.out:q} > {log:q} 2>&1"
