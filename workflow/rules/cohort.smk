# The cohort: manifest, ground truth and exclusions from the configured source (cohort.source).
# A checkpoint: the per-case stages fan out over the manifest's cases.
#
# It re-runs when what it read changed: the table or CT-RATE CSVs (and a YAML disease catalog) are
# its input files (rows added, removed or edited: Snakemake's mtime trigger), and the params hold a
# digest of the rest (cohort_reads): for a table, the size and mtime of every image and mask file it
# names and of every file under its DICOM folders (the cohort reads their headers and picks a
# study's series); for CT-RATE, the volume file names under volumes_root. Downstream, the per-case
# stamps redo only the cases whose row or files changed.
from ctvlp.imaging.stage import file_identity as _file_identity


def _as_list(value):
    return [] if not value else [value] if isinstance(value, str) else list(value)


def cohort_inputs(wildcards):
    """The table, CT-RATE CSVs and YAML disease catalog the cohort reads."""
    cohort = config["cohort"]
    if cohort["source"] == "table":
        files = _as_list(cohort["table"]["path"])
    elif cohort["source"] == "ctrate":
        files = [f for key in ("metadata_csv", "reports_csv", "labels_csv") for f in _as_list(cohort["ctrate"][key])]
    else:
        files = []
    catalog = config["evaluate"]["catalog"]
    return files + ([catalog] if str(catalog).endswith((".yaml", ".yml")) else [])


def _stats_under(path):
    """{file: (size, mtime_ns)} of a file, or of every file under a folder (stat only)."""
    path = Path(path)
    files = [Path(d) / f for d, _, names in os.walk(path) for f in names] if path.is_dir() else [path]
    return {str(f): _file_identity(f, content=False) for f in files}


def cohort_reads(wildcards):
    """Digest of what the cohort reads beyond its input files (see the top of this file)."""
    cohort = config["cohort"]
    found = {}
    if cohort["source"] == "table" and cohort["table"]["path"]:
        from ctvlp.cohort.tables import read_table

        table = Path(cohort["table"]["path"])
        try:
            df = read_table(table, cohort["text_fallback_encoding"])
        except Exception as e:  # the cohort job reports it, naming the table
            return f"unreadable: {type(e).__name__}"
        for col in (cohort["table"]["image_col"], cohort["table"]["mask_col"]):
            for value in (df[col].to_list() if col and col in df.columns else []):
                if value and str(value).strip():
                    p = Path(str(value).strip()).expanduser()
                    found.update(_stats_under(p if p.is_absolute() else table.resolve().parent / p))
    elif cohort["source"] == "ctrate" and cohort["ctrate"]["volumes_root"]:
        root = Path(cohort["ctrate"]["volumes_root"])
        found = {"volumes": sorted(os.path.relpath(Path(d) / f, root) for d, _, names in os.walk(root)
                                   for f in names if ".nii" in f)}
    return cfgmod.digest(found)



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
