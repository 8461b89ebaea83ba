# The cohort: manifest, ground truth and exclusions from the configured source (cohort.source).
# A checkpoint: the per-case stages fan out over the manifest's cases.


checkpoint cohort:
    output:
        manifest=results_path("cohort/manifest.parquet"),
        ground_truth=results_path("cohort/ground_truth.parquet"),
        exclusions=results_path("cohort/exclusions.parquet"),
    params:
        # the disease catalog matters here only to match label columns; min_slices to pick a DICOM study's series
        **settings("cohort", "seed", "evaluate.catalog", "preprocess.min_slices"),
        out=parent_of("manifest"),
    log:
        results_path("logs/cohort.log"),
    benchmark:
        results_path("benchmarks/cohort.tsv")
    threads: min(8, os.cpu_count() or 1)  # the demo cohort renders cases in parallel (capped at --cores)
    resources:
        mem_mb=4000,
        runtime=lambda w, attempt: attempt * 120,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp cohort --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --out {params.out:q} > {log:q} 2>&1"
