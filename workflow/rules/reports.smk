# Report parsing: per-anatomy text and status from every report (reports.backend: rules or llm).


rule reports:
    input:
        manifest=results_path("cohort/manifest.parquet"),
    output:
        results_path("reports/reports.parquet"),
    params:
        **settings("reports"),
    log:
        results_path("logs/reports.log"),
    benchmark:
        results_path("benchmarks/reports.tsv")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda w, attempt: attempt * 24 * 60,  # the llm backend on a large cohort
    conda:
        "../../envs/reports.yaml"
    shell:
        "ctvlp reports --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --manifest {input.manifest:q} --out {output:q} --progress-fd 3 3>&2 > {log:q} 2>&1"
