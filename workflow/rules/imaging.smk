# The per-case stages run over shards of the manifest's cases (shard_size per job): one process
# loads its libraries once for a shard, and a cohort of 50,000 cases is hundreds of jobs, not
# 100,000. Each case still gets its own folder (results/segment/<case>, results/preprocessed/<case>)
# with its outputs or excluded.json and the reason, written complete or not at all; a case whose
# folder was made from the same settings and input is kept, so a killed shard job resumes. A shard
# job's declared output is its table of cases (results/shards/...), which qc gathers.
#
# Stale input: a shard's params hold the size and mtime of its cases' image, mask and precomputed
# segmentation files (shard_inputs in common.smk, stat only), so a plain `snakemake` re-runs exactly
# the shards whose files changed; each case's stamp (with a content digest of those files) then
# redoes only the changed cases, also under --forcerun.


wildcard_constraints:
    shard=r"\d+",


rule segment:
    input:
        manifest=results_path("cohort/manifest.parquet"),
    output:
        results_path("shards/segment/{shard}.parquet"),
    params:
        # image checks only; the target spacing etc. must not re-run segmentation
        **settings("segment", "preprocess.min_slices", "preprocess.spacing_range", "preprocess.max_voxels",
                   "shard_size"),
        out_root=lambda w: results_path("segment"),
        shard_size=config["shard_size"],
        inputs=shard_inputs(config["segment"]),
    log:
        results_path("logs/segment/shard-{shard}.log"),
    benchmark:
        results_path("benchmarks/segment/shard-{shard}.tsv")
    threads: config["segment"]["threads"]
    resources:
        mem_mb=8000,
        gpu=SEGMENT_GPU,
        runtime=lambda w, attempt: attempt * (30 + config["shard_size"] * (10 if SEGMENT_GPU else 2)),
    conda:
        "../../envs/segment_totalseg.yaml" if config["segment"]["backend"] == "totalsegmentator" else "../../envs/imaging.yaml"
    shell:
        "ctvlp segment --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --manifest {input.manifest:q} --shard {wildcards.shard} --shard-size {params.shard_size}"
        " --out-root {params.out_root:q} --table {output:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


rule preprocess:
    input:
        manifest=results_path("cohort/manifest.parquet"),
        segment=results_path("shards/segment/{shard}.parquet"),
    output:
        results_path("shards/preprocessed/{shard}.parquet"),
    params:
        **settings("preprocess", "shard_size"),
        out_root=lambda w: results_path("preprocessed"),
        shard_size=config["shard_size"],
        segment_root=lambda w: results_path("segment"),
        inputs=shard_inputs(),
    log:
        results_path("logs/preprocess/shard-{shard}.log"),
    benchmark:
        results_path("benchmarks/preprocess/shard-{shard}.tsv")
    threads: 1
    resources:
        mem_mb=8000,
        runtime=lambda w, attempt: attempt * (30 + config["shard_size"]),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp preprocess --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --manifest {input.manifest:q} --shard {wildcards.shard} --shard-size {params.shard_size}"
        " --out-root {params.out_root:q} --segment-root {params.segment_root:q} --table {output:q} --progress-fd 3 3>&2 > {log:q} 2>&1"


rule qc:
    input:
        manifest=results_path("cohort/manifest.parquet"),
        exclusions=results_path("cohort/exclusions.parquet"),
        segment=all_shards("segment"),
        preprocessed=all_shards("preprocessed"),
    output:
        cases=results_path("qc/cases.parquet"),
        qc=results_path("qc/qc.parquet"),
        excluded=results_path("qc/excluded.parquet"),
        summary=results_path("qc/summary.md"),
        # the same counts and exclusions as sortable tables: an HTML page is shown inline in the
        # report, a Markdown file only as a download
        summary_html=report(results_path("qc/summary.html"), caption="../report/qc.rst", category="Data",
                            labels={"table": "data QC summary"}),
    params:
        **settings("preprocess.strict"),
        segment_root=lambda w: results_path("segment"),
        preprocessed_root=lambda w: results_path("preprocessed"),
        out=parent_of("cases"),
    log:
        results_path("logs/qc.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp qc --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --manifest {input.manifest:q} --cohort-exclusions {input.exclusions:q} --segment-root {params.segment_root:q}"
        " --preprocessed-root {params.preprocessed_root:q} --out {params.out:q} --progress-fd 3 3>&2 > {log:q} 2>&1"
