# The cohort: manifest, ground truth and exclusions from the configured source (cohort.source).
# A checkpoint: the per-case stages fan out over the manifest's cases.
#
# It re-runs when what it read changed: the table or CT-RATE CSVs (and a YAML disease catalog) are
# its input files (rows added, removed or edited: Snakemake's mtime trigger), and the params hold a
# digest of the rest (cohort_reads in common.smk): for a table, the size and mtime of every image
# and mask file it names and of every file under its DICOM folders (the cohort reads their headers and picks a
# study's series); for CT-RATE, the volume file names under volumes_root. Downstream, the per-case
# stamps redo only the cases whose row or files changed.


checkpoint cohort:
    input:
        cohort_inputs,
    output:
        manifest=results_path("cohort/manifest.parquet"),
        ground_truth=results_path("cohort/ground_truth.parquet"),
        exclusions=results_path("cohort/exclusions.parquet"),
    params:
        # the disease catalog matters here only to match label columns; min_slices to pick a DICOM study's series
        **settings("cohort", "seed", "evaluate.catalog", "preprocess.min_slices"),
        out=parent_of("manifest"),
        reads=cohort_reads,
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
        " --out {params.out:q} --progress-fd 3 3>&2 > {log:q} 2>&1"
