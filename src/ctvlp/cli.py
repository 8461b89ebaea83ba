"""ctvlp: anatomy-level vision-language pretraining on 3D CT, one subcommand per workflow stage.

Snakemake rules call these subcommands; every stage also runs by hand.

Settings come from `--config FILE` (default config.yaml; the workflow passes the run's validated
config, written under results/.ctvlp/config/), validated against the schema. `--sections` limits
a stage to the sections its rule tracks: reading any other one fails loudly. Nothing of the
config travels on the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import config as cfgmod
from .workspace import UnsafePathError

log = logging.getLogger("ctvlp")


def _settings(args) -> dict:
    cfg = cfgmod.load(args.config)
    if args.sections:
        return cfgmod.restrict(cfg, [s for s in args.sections.split(",") if s])
    return cfg


def _manifest_row(manifest: str, case_id: str) -> dict:
    import polars as pl

    from .workspace import check_case_id

    try:
        check_case_id(case_id)
    except ValueError as e:
        raise SystemExit(f"--case: {e}") from None
    rows = pl.read_parquet(manifest).filter(pl.col("case_id") == case_id)
    if len(rows) != 1:
        raise SystemExit(f"case {case_id!r} appears {len(rows)} times in {manifest} (expected once)")
    return rows.row(0, named=True)


def cmd_validate_config(args):
    cfg = cfgmod.load(args.config)
    print(json.dumps(cfg, indent=1))


def cmd_demo_data(args):
    from .demo_data import write_cohort

    s = _settings(args)
    c = s["cohort"]
    path = write_cohort(args.out, n_cases=c["n_cases"], seed=s["seed"], split=tuple(c["split"]))
    log.info("wrote %s", path)


def cmd_cohort(args):
    s = _settings(args)
    c = s["cohort"]
    if c["source"] == "demo":
        return cmd_demo_data(args)
    from . import ingest

    if c["source"] == "ctrate":
        o = c["ctrate"]
        missing = [k for k in ("volumes_root", "metadata_csv", "reports_csv") if not o[k]]
        if missing:
            raise SystemExit(f"cohort.source ctrate needs cohort.ctrate.{', cohort.ctrate.'.join(missing)}")
        man, gt, exc = ingest.ctrate(o["volumes_root"], o["metadata_csv"], o["reports_csv"], o["labels_csv"],
                                     split=o["split"], one_recon_per_scan=o["one_recon_per_scan"],
                                     val_fraction=o["val_fraction"], seed=s["seed"],
                                     fallback_encoding=c["text_fallback_encoding"])
    else:
        o = c["table"]
        if not o["path"]:
            raise SystemExit("cohort.source table needs cohort.table.path")
        man, gt, exc = ingest.table(o["path"], image_col=o["image_col"], report_col=o["report_col"],
                                    id_col=o["id_col"], split_col=o["split_col"], label_cols=o["label_cols"],
                                    split_fractions=tuple(c["split"]), seed=s["seed"],
                                    patient_col=o["patient_col"], mask_col=o["mask_col"],
                                    disease_catalog=s["evaluate"]["catalog"], unsafe_ids=c["unsafe_ids"],
                                    fallback_encoding=c["text_fallback_encoding"])
    ingest.write(man, gt, exc, args.out)
    log.info("%d cases in the manifest, %d exclusions (see %s/exclusions.parquet)", len(man), len(exc), args.out)


def _per_case(stage: str, case_id: str, out_dir: str, run) -> None:
    """Run one case's stage into a fresh folder that replaces ``out_dir`` only when complete; a
    data problem becomes ``out_dir``/excluded.json with its reason."""
    from .qc import CaseExcluded, write_exclusion
    from .workspace import replace_dir

    try:
        with replace_dir(out_dir) as tmp:
            run(tmp)
    except CaseExcluded as e:
        with replace_dir(out_dir) as tmp:
            write_exclusion(tmp, case_id, e.stage or stage, e.reason)


def cmd_segment(args):
    from . import imaging

    s = _settings(args)
    cfg = {**s["segment"], "preprocess": s["preprocess"]}
    if cfg["backend"] == "precomputed" and not cfg.get("path"):
        raise SystemExit("segment.backend precomputed needs segment.path (a folder of segmentations)")
    row = _manifest_row(args.manifest, args.case)

    def run(out):
        tab = imaging.segment_case(row, cfg, out)
        log.info("%s: %d anatomies present, %d complete", args.case, tab["present"].sum(), tab["complete"].sum())

    _per_case("segment", args.case, args.out_dir, run)


def cmd_preprocess(args):
    from . import imaging
    from .qc import CaseExcluded, read_exclusion

    s = _settings(args)["preprocess"]
    row = _manifest_row(args.manifest, args.case)

    def run(out):
        upstream = read_exclusion(args.segment_dir)
        if upstream:  # excluded at segmentation: carry the record forward, nothing to preprocess
            raise CaseExcluded(upstream["reason"], upstream["stage"])
        meta = imaging.preprocess_case(row, Path(args.segment_dir) / "anatomy.nii.gz", s, out)
        log.info("%s: %s @ %s mm -> %s @ %s mm; %s", args.case, meta["original_size"],
                 [round(v, 2) for v in meta["original_spacing"]], meta["size"], meta["spacing"], meta["hu_decision"])

    _per_case("preprocess", args.case, args.out_dir, run)


def cmd_qc(args):
    from .qc import collect

    s = _settings(args)["preprocess"]
    collect(args.manifest, args.cohort_exclusions, args.segment_root, args.preprocessed_root, args.out,
            strict=s["strict"])


def cmd_reports(args):
    from .reports import write_reports

    s = _settings(args)["reports"]
    if s["backend"] == "rules":
        write_reports(args.manifest, args.out, s["catalog"])
        return
    from .reports_llm import write_reports_llm

    cfg = {**s["llm"], "catalog": s["catalog"]}
    if not cfg["model"]:
        raise SystemExit("reports.backend llm needs reports.llm.model (the served model name)")
    cfg["cache_dir"] = cfg["cache_dir"] or str(Path(args.out).parent / "llm_cache")
    write_reports_llm(args.manifest, args.out, cfg)


def cmd_train(args):
    from .phases import run

    s = _settings(args)
    summary = run(args.phase, args.manifest, args.reports, args.results, args.out_dir, s["model"], s["train"],
                  s["seed"], init=args.init, contrast=args.contrast)
    log.info("phase %s: %d steps; final validation loss %s", args.phase, summary["steps"],
             summary["history"][-1] if summary.get("history") else None)


def cmd_linear_probe(args):
    from . import probe

    s = _settings(args)
    crop = s["train"]["crop_size"] if s["evaluate"]["crop"] == "anatomy" else None
    pred = probe.linear_probe(args.model, args.manifest, args.reports, args.results, args.ground_truth,
                              s["evaluate"]["catalog"], s["train"]["device"], crop, s["seed"])
    paths = probe.write(pred, args.out_dir, s["evaluate"]["threshold"], s["evaluate"]["bootstrap"], s["seed"])
    print(paths["md"].read_text(encoding="utf-8"))


def cmd_figures(args):
    from . import figures

    s = _settings(args)
    crop = s["train"]["crop_size"] if s["evaluate"]["crop"] == "anatomy" else None
    paths = figures.make_all(args.model, args.predictions, args.manifest, args.results, args.ground_truth,
                             args.out_dir, s["evaluate"]["catalog"], s["train"]["device"],
                             baseline_model_dir=args.baseline_model, n_cases=args.n_cases, crop_size=crop,
                             seed=s["seed"])
    for name, path in paths.items():
        log.info("%s: %s", name, path)


def cmd_ablation(args):
    from . import evaluate

    tables = dict(item.split("=", 1) for item in args.variant)
    table = evaluate.ablation_table(tables)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out.with_suffix(".csv"))
    out.write_text(evaluate.markdown(table))
    print(out.read_text(encoding="utf-8"))


def cmd_evaluate(args):
    from . import evaluate

    s = _settings(args)
    crop = s["train"]["crop_size"] if s["evaluate"]["crop"] == "anatomy" else None
    pred = evaluate.predict(args.model, args.manifest, args.results, args.ground_truth,
                            s["evaluate"]["catalog"], s["train"]["device"], crop)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred.write_parquet(out / "predictions.parquet")
    table, mean_ci = evaluate.metrics_table(pred, s["evaluate"]["threshold"], s["evaluate"]["bootstrap"], s["seed"])
    paths = evaluate.write_tables(table, out, mean_ci=mean_ci)
    print(paths["md"].read_text(encoding="utf-8"))


def cmd_predict(args):
    from . import predict

    model = predict.load_model(args.model, args.config, args.thresholds, args.device)
    pred = model.predict(args.scan, mask=args.mask)
    out = args.out or Path(args.model) / "predictions" / str(pred["case_id"][0])
    paths = predict.write(pred, out)
    from .evaluate import markdown

    print(markdown(pred.select("disease", "anatomy", "probability", "threshold", "decision", "reason")))
    log.info("wrote %s and %s", paths["csv"], paths["json"])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ctvlp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default="config.yaml", help="config YAML or JSON (default: config.yaml)")
        p.add_argument("--sections", default=None,
                       help="comma-separated config sections (or section.key) this stage may read; "
                            "others fail loudly (the workflow passes what each rule tracks)")
        p.set_defaults(func=func)
        return p

    add("validate-config", cmd_validate_config, "validate a config and print it with defaults")
    p = add("cohort", cmd_cohort, "write the cohort manifest from the configured source (demo, ctrate, table)")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, ground_truth.parquet, ...)")
    p = add("demo-data", cmd_demo_data, "write the built-in synthetic cohort")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, images/, masks/)")
    p = add("segment", cmd_segment, "group one case's TotalSegmentator classes into the 36 anatomies")
    p.add_argument("--case", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out-dir", required=True, help="case folder: anatomy.nii.gz + anatomies.parquet, "
                   "or excluded.json with the reason")
    p = add("preprocess", cmd_preprocess, "check, convert to HU, resample and scale one case")
    p.add_argument("--case", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--segment-dir", required=True, help="the case's folder from `ctvlp segment`")
    p.add_argument("--out-dir", required=True, help="case folder: image.npy, anatomy.npy, meta.json, "
                   "or excluded.json with the reason")
    p = add("qc", cmd_qc, "collect per-case QC and exclusions; list the cases that go on")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cohort-exclusions", default=None, help="exclusions.parquet from `ctvlp cohort`")
    p.add_argument("--segment-root", required=True)
    p.add_argument("--preprocessed-root", required=True)
    p.add_argument("--out", required=True, help="folder for qc.parquet, excluded.parquet, cases.parquet, summary.md")
    p = add("reports", cmd_reports, "parse reports into per-anatomy text and status")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p = add("train", cmd_train, "train one phase (visual_cl, align, normality, boost) or the CLIP baseline (global)")
    for a in ("--manifest", "--reports", "--results", "--out-dir"):
        p.add_argument(a, required=True)
    p.add_argument("--phase", default="align", choices=["visual_cl", "align", "normality", "boost", "global"])
    p.add_argument("--init", default=None, help="folder of the previous phase's model to start from")
    p.add_argument("--contrast", default="disease", choices=["disease", "instance"],
                   help="phase 1: disease-level (Eq. 2) or instance-level (ablation baseline)")
    p = add("linear-probe", cmd_linear_probe,
            "linear probe: frozen vision encoder + logistic regression per disease on report-derived labels")
    for a in ("--model", "--manifest", "--reports", "--results", "--ground-truth", "--out-dir"):
        p.add_argument(a, required=True)
    p = add("figures", cmd_figures, "ROC per organ, t-SNE, activation histograms and maps (PNG)")
    for a in ("--model", "--predictions", "--manifest", "--results", "--ground-truth", "--out-dir"):
        p.add_argument(a, required=True)
    p.add_argument("--baseline-model", default=None, help="a model without VSDB, e.g. results/train/align")
    p.add_argument("--n-cases", type=int, default=100, help="test cases in the t-SNE")
    p = add("ablation", cmd_ablation, "the ablation table from each variant's zeroshot.csv")
    p.add_argument("--variant", action="append", required=True, help="NAME=path/to/zeroshot.csv (repeat)")
    p.add_argument("--out", required=True, help="ablation.md (and .csv beside it)")
    p = add("evaluate", cmd_evaluate, "zero-shot diagnosis tables")
    for a in ("--model", "--manifest", "--results", "--ground-truth", "--out-dir"):
        p.add_argument(a, required=True)

    p = add("predict", cmd_predict, "per-disease probabilities and decisions for one CT scan")
    p.add_argument("scan", help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--mask", default=None, help="its TotalSegmentator multilabel mask (else segment.backend runs)")
    p.add_argument("--model", required=True, help="trained model folder (model.safetensors + config.json)")
    p.add_argument("--thresholds", default=None,
                   help="results/eval/zeroshot.csv: per-disease thresholds chosen on validation (for decisions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output prefix for .csv and .json (default MODEL/predictions/<scan>)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (cfgmod.ConfigError, UnsafePathError) as e:
        sys.exit(str(e))
    except RuntimeError as e:  # evaluation without labels: say so plainly, no traceback
        if type(e).__name__ != "NoLabelsError":
            raise
        sys.exit(f"ctvlp {args.command}: {e}")


if __name__ == "__main__":
    main()
