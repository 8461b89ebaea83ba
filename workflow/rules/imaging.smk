# Per-case stages write a folder each: the outputs, or excluded.json with the reason (bad input
# is recorded, never dropped); the qc rule gathers them and lists the cases that go on.
# Case ids in the manifest are plain names (ctvlp.workspace.case_id_problem); the constraint keeps
# Snakemake itself from matching anything else as a case folder.
wildcard_constraints:
    case="[A-Za-z0-9][A-Za-z0-9._-]*",



rule segment:
    input:
        manifest=results_path("cohort/manifest.parquet"),
    output:
        directory(results_path("segment/{case}")),
    params:
        # image checks only; the target spacing etc. must not re-run segmentation
        **settings("segment", "preprocess.min_slices", "preprocess.spacing_range", "preprocess.max_voxels"),
    log:
        results_path("logs/segment/{case}.log"),
    benchmark:
        results_path("benchmarks/segment/{case}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp segment --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --case={wildcards.case:q} --manifest {input.manifest:q}"
        " --out-dir {output:q} > {log:q} 2>&1"


rule preprocess:
    input:
        manifest=results_path("cohort/manifest.parquet"),
        segment=results_path("segment/{case}"),
    output:
        directory(results_path("preprocessed/{case}")),
    params:
        **settings("preprocess"),
    log:
        results_path("logs/preprocess/{case}.log"),
    benchmark:
        results_path("benchmarks/preprocess/{case}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp preprocess --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --case={wildcards.case:q} --manifest {input.manifest:q}"
        " --segment-dir {input.segment:q} --out-dir {output:q} > {log:q} 2>&1"


rule qc:
    input:
        manifest=results_path("cohort/manifest.parquet"),
        exclusions=results_path("cohort/exclusions.parquet"),
        segment=all_cases("segment/{case}"),
        preprocessed=all_cases("preprocessed/{case}"),
    output:
        cases=results_path("qc/cases.parquet"),
        qc=results_path("qc/qc.parquet"),
        excluded=results_path("qc/excluded.parquet"),
        summary=report(results_path("qc/summary.md"), caption="../report/qc.rst", category="Data"),
    params:
        **settings("preprocess.strict"),
        segment_root=lambda w: results_path("segment"),
        preprocessed_root=lambda w: results_path("preprocessed"),
        out=parent_of("cases"),
    log:
        results_path("logs/qc.log"),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp qc --config {params.config_file:q} --sections {params.sections} --threads {threads}"
        " --manifest {input.manifest:q}"
        " --cohort-exclusions {input.exclusions:q} --segment-root {params.segment_root:q}"
        " --preprocessed-root {params.preprocessed_root:q} --out {params.out:q} > {log:q} 2>&1"
