rule reports:
    input:
        manifest=R("cohort/manifest.parquet"),
    output:
        R("reports/reports.parquet"),
    params:
        **settings("reports"),
    log:
        R("logs/reports.log"),
    benchmark:
        R("benchmarks/reports.tsv")
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/reports.yaml"
    shell:
        "ctvlp reports --config {params.config_file:q} --sections {params.sections} --manifest {input.manifest:q} --out {output:q} > {log:q} 2>&1"
