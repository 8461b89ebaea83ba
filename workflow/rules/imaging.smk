rule segment:
    input:
        manifest=R("cohort/manifest.parquet"),
    output:
        anatomy_map=R("segment/{case}.nii.gz"),
        table=R("segment/{case}.anatomies.parquet"),
    params:
        settings=settings("segment"),
    log:
        R("logs/segment/{case}.log"),
    benchmark:
        R("benchmarks/segment/{case}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp segment --params {params.settings:q} --case {wildcards.case:q} --manifest {input.manifest:q}"
        " --out-map {output.anatomy_map:q} --out-table {output.table:q} > {log:q} 2>&1"


rule preprocess:
    input:
        manifest=R("cohort/manifest.parquet"),
        anatomy_map=R("segment/{case}.nii.gz"),
    output:
        image=R("preprocessed/{case}.image.npy"),
        anatomy=R("preprocessed/{case}.anatomy.npy"),
        meta=R("preprocessed/{case}.json"),
    params:
        settings=settings("preprocess"),
    log:
        R("logs/preprocess/{case}.log"),
    benchmark:
        R("benchmarks/preprocess/{case}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/imaging.yaml"
    shell:
        "ctvlp preprocess --params {params.settings:q} --case {wildcards.case:q} --manifest {input.manifest:q}"
        " --anatomy {input.anatomy_map:q} --out-image {output.image:q} --out-anatomy {output.anatomy:q}"
        " --out-meta {output.meta:q} > {log:q} 2>&1"
