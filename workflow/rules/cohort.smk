checkpoint cohort:
    output:
        manifest=R("cohort/manifest.parquet"),
        ground_truth=R("cohort/ground_truth.parquet"),
        exclusions=R("cohort/exclusions.parquet"),
    params:
        # the disease catalog matters here only to match label columns
        **settings("cohort", "seed", "evaluate.catalog"),
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
        "ctvlp cohort --config {params.config_file:q} --sections {params.sections} --out {params.out:q} > {log:q} 2>&1"
