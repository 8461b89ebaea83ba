checkpoint cohort:
    output:
        manifest=R("cohort/manifest.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
    params:
        settings=settings("cohort", "seed"),
        out=R("cohort"),
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
