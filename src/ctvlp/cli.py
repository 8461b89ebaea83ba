"""ctvlp: anatomy-level vision-language pretraining on 3D CT, one subcommand per workflow stage.

Snakemake rules call these subcommands; every stage also runs by hand. This module only parses
arguments and hands them to the stage's package.

Settings come from `--config FILE` (default config.yaml; the workflow passes the run's validated
config, written under results/.ctvlp/config/), validated against the schema. `--sections` limits
a stage to the sections its rule tracks: reading any other one fails loudly. Nothing of the
config travels on the command line. `--threads` (the rule's {threads}) caps the threads of torch,
SimpleITK and the numeric libraries. `--progress-fd N` sends the progress lines (ctvlp.progress) to
the open file descriptor N as well: the workflow's rules open fd 3 on Snakemake's stderr, so the
terminal shows a line per shard, epoch or batch while the rule's log file gets every record. These
three are internal (the workflow passes them): accepted, but hidden from --help.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from importlib import metadata
from pathlib import Path

from . import config as cfgmod
from . import progress, runlock
from .evaluation.schema import NoLabelsError
from .workspace import UnreadableTableError, UnsafeCaseIdError, UnsafePathError

log = logging.getLogger("ctvlp")
# read by torch, MKL/OpenBLAS, polars and ITK when they start: set before any of them is imported
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def _settings(args) -> dict:
    cfg = cfgmod.load(args.config)
    if args.sections:
        return cfgmod.restrict(cfg, [s for s in args.sections.split(",") if s])
    return cfg


def _use_threads(n: int | None) -> None:
    """Cap every library's threads at ``n``; the stages import those libraries only after this."""
    if n:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(n)


def cmd_validate_config(args):
    print(json.dumps(cfgmod.load(args.config), indent=1))


def cmd_cohort(args):
    from .cohort.stage import build_cohort

    build_cohort(_settings(args), args.out, threads=args.threads or 1)


def cmd_example(args):
    from .cohort.example import write_example

    paths = write_example(args.out, n_cases=args.n_cases, seed=args.seed, results=args.results,
                          workers=args.threads or 1)
    print(f"wrote {paths['table']} (the cases), {paths['images']}/, {paths['masks']}/ and {paths['config']};\n"
          f"run it: snakemake --cores all --configfile {paths['config']}")


def _one_case_or_shard(args) -> bool:
    """True for a shard run (--shard, --shard-size, --out-root, --table), False for one case
    (--case, --out-dir); anything else is a usage error."""
    shard = [args.shard, args.shard_size, args.out_root, args.table]
    if args.case is not None and args.out_dir and not any(v is not None for v in shard):
        return False
    if args.case is None and args.out_dir is None and all(v is not None for v in shard):
        return True
    raise SystemExit(f"ctvlp {args.command}: give --case and --out-dir (one case), or --shard, --shard-size, "
                     "--out-root and --table (a shard of the manifest's cases)")


def cmd_segment(args):
    from .imaging import stage

    if _one_case_or_shard(args):
        stage.run_shard("segment", args.manifest, args.shard, args.shard_size, _settings(args), args.out_root,
                        args.table)
    else:
        stage.segment(args.manifest, args.case, _settings(args), args.out_dir)


def cmd_preprocess(args):
    from .imaging import stage

    if _one_case_or_shard(args):
        stage.run_shard("preprocess", args.manifest, args.shard, args.shard_size, _settings(args), args.out_root,
                        args.table, segment_root=args.segment_root)
    else:
        stage.preprocess(args.manifest, args.case, _settings(args), args.segment_dir, args.out_dir)


def cmd_qc(args):
    from .imaging.qc import collect

    collect(args.manifest, args.cohort_exclusions, args.segment_root, args.preprocessed_root, args.out,
            strict=_settings(args)["preprocess"]["strict"])


def cmd_reports(args):
    from .reports.stage import write_reports

    write_reports(args.manifest, args.out, _settings(args)["reports"])


def training_seed(settings: dict) -> int:
    """``train.seed`` when set (training randomness only: initialisation, crops, batches), else the
    global ``seed`` (which also draws the cohort and its split)."""
    own = settings["train"].get("seed")
    return settings["seed"] if own is None else own


def cmd_train(args):
    from .training.phases import run

    settings = _settings(args)
    train = {**settings["train"], "threads": args.threads or settings["train"]["threads"]}
    summary = run(args.phase, args.cases, args.reports, args.out_dir, settings["model"], train, training_seed(settings),
                  init=args.init, contrast=args.contrast)
    final = summary.get("final_val_loss")
    progress.log.info("phase %s done: %d steps; final validation loss %s", args.phase, summary["steps"],
                      "n/a" if final is None else f"{final:.4f}")


def cmd_evaluate(args):
    from .evaluation.stage import evaluate_zeroshot

    paths = evaluate_zeroshot(_settings(args), args.model, args.cases, args.ground_truth, args.out_dir)
    print(paths["md"].read_text(encoding="utf-8"))


def cmd_linear_probe(args):
    from .evaluation.stage import linear_probe

    paths = linear_probe(_settings(args), args.model, args.cases, args.reports, args.ground_truth, args.out_dir)
    print(paths["md"].read_text(encoding="utf-8"))


def cmd_figures(args):
    from .evaluation.stage import make_figures

    paths = make_figures(_settings(args), args.model, args.predictions, args.cases, args.ground_truth, args.out_dir,
                         baseline_model_dir=args.baseline_model, n_cases=args.n_cases)
    for name, path in paths.items():
        log.info("%s: %s", name, path)


def cmd_ablation(args):
    from .evaluation.metrics import markdown
    from .evaluation.stage import ablation

    settings = _settings(args)
    table = ablation(dict(item.split("=", 1) for item in args.variant), args.out, settings["evaluate"]["bootstrap"],
                     settings["seed"])
    print(markdown(table))


def cmd_predict(args):
    from . import predict
    from .evaluation.metrics import markdown

    model = predict.load_model(args.model, args.config, args.thresholds, args.device,
                               allow_text_model_mismatch=args.allow_text_model_mismatch)
    if model.bundle is not None:
        b = model.bundle
        log.info("model bundle %s: trained with ctvlp %s, catalog %s, prompt style %s, %s", args.model,
                 b["ctvlp_version"], b["diseases"]["catalog"], b["diseases"]["prompt_style"],
                 "thresholds chosen on validation" if b["thresholds"] else "no thresholds (not evaluated)")
    pred = model.predict(args.scan, mask=args.mask)
    out = args.out or Path("predictions") / str(pred["case_id"][0])
    paths = predict.write(pred, out)
    print(markdown(pred.select("disease", "anatomy", "probability", "threshold", "decision", "reason")))
    log.info("wrote %s and %s", paths["csv"], paths["json"])


def cmd_bundle(args):
    from . import bundle

    path = bundle.write(_settings(args), args.model, args.out, args.thresholds)
    content = json.loads(path.read_text(encoding="utf-8"))
    log.info("wrote %s: catalog %s, prompt style %s (%s), %s; text model %s sha256 %s", path,
             content["diseases"]["catalog"], content["diseases"]["prompt_style"], content["diseases"]["prompt_style_from"],
             f"{len(content['thresholds']['values'])} thresholds" if content["thresholds"] else "no thresholds",
             content["text_model"]["name"], content["text_model"]["sha256"][:16])


def cmd_unlock(args):
    held = runlock.unlock(args.results)
    print(f"removed the lock of {args.results}: {runlock.describe(held, args.results)}" if held is not None
          else f"{args.results} holds no lock")


def _version() -> str:
    try:
        return metadata.version("ctvlp")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


# what each subcommand looks like when run by hand (its epilog)
EXAMPLES = {
    "validate-config": "ctvlp validate-config --config config.yaml > config.resolved.json",
    "cohort": "ctvlp cohort --config config.yaml --out results/cohort",
    "example": "ctvlp example my_study --n-cases 40\n  snakemake --cores all --configfile my_study/config.yaml",
    "segment": "ctvlp segment --manifest results/cohort/manifest.parquet --case case_0001 "
               "--out-dir work/segment/case_0001",
    "preprocess": "ctvlp preprocess --manifest results/cohort/manifest.parquet --case case_0001 "
                  "--segment-dir work/segment/case_0001 --out-dir work/preprocessed/case_0001",
    "qc": "ctvlp qc --manifest results/cohort/manifest.parquet --cohort-exclusions results/cohort/exclusions.parquet "
          "--segment-root results/segment --preprocessed-root results/preprocessed --out results/qc",
    "reports": "ctvlp reports --manifest results/cohort/manifest.parquet --out results/reports/reports.parquet",
    "train": "ctvlp train --phase align --cases results/qc/cases.parquet --reports results/reports/reports.parquet "
             "--init results/train/visual_cl --out-dir results/train/align",
    "evaluate": "ctvlp evaluate --model results/train/boost --cases results/qc/cases.parquet "
                "--ground-truth results/cohort/ground_truth.parquet --out-dir results/eval",
    "linear-probe": "ctvlp linear-probe --model results/train/boost --cases results/qc/cases.parquet --reports "
                    "results/reports/reports.parquet --ground-truth results/cohort/ground_truth.parquet "
                    "--out-dir results/eval",
    "figures": "ctvlp figures --model results/train/boost --predictions results/eval/predictions.parquet --cases "
               "results/qc/cases.parquet --ground-truth results/cohort/ground_truth.parquet --out-dir "
               "results/figures --baseline-model results/train/align",
    "ablation": "ctvlp ablation --variant fvlm=results/eval/ablation/fvlm --variant ours=results/eval "
                "--out results/eval/ablation.md",
    "predict": "ctvlp predict --model results/model scan.nii.gz --mask scan_seg.nii.gz --out predictions/scan",
    "bundle": "ctvlp bundle --model results/train/boost --thresholds results/eval/zeroshot.csv --out results/model",
    "unlock": "ctvlp unlock --results results",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctvlp", description=__doc__.splitlines()[0],
                                     epilog="Each subcommand's --help shows its options and an example. The "
                                            "workflow (snakemake) runs them in order.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print ctvlp's version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG records too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, *required):
        """A subcommand with the common options; ``required``: (option, help) pairs."""
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default="config.yaml", help="config YAML or JSON (default: config.yaml)")
        # internal: the workflow passes them; accepted by hand too, but not shown in --help
        # --sections: comma-separated config sections (or section.key) this stage may read, others fail loudly
        p.add_argument("--sections", default=None, help=argparse.SUPPRESS)
        # --threads: the rule's {threads}, a cap on torch, SimpleITK and the numeric libraries
        p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
        # --progress-fd: an open file descriptor (the rule's 3>&2) that gets the progress lines only
        p.add_argument("--progress-fd", type=int, default=None, help=argparse.SUPPRESS)
        for option, option_help in required:
            p.add_argument(option, required=True, help=option_help)
        p.set_defaults(func=func)
        return p

    manifest = ("--manifest", "the cohort's manifest.parquet (from `ctvlp cohort`)")
    model = ("--model", "a trained model folder (e.g. results/train/boost)")
    cases = ("--cases", "the QC'd cases table, cases.parquet (from `ctvlp qc`)")
    reports = ("--reports", "the parsed reports, reports.parquet (from `ctvlp reports`)")
    truth = ("--ground-truth", "the cohort's ground_truth.parquet (from `ctvlp cohort`)")

    add("validate-config", cmd_validate_config, "validate a config and print it with defaults")
    p = add("cohort", cmd_cohort, "write the cohort manifest from the configured source (demo, ctrate, table)")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, ground_truth.parquet, ...)")
    p = add("example", cmd_example, "write the demo cohort as a plain table (CSV, NIfTI images and masks, "
            "reports, labels) plus a config for cohort.source: table, to copy for your own data")
    p.add_argument("out", help="a new or empty folder (or one `ctvlp example` wrote before)")
    p.add_argument("--n-cases", type=int, default=160, help="synthetic cases (default 160, as the demo)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0, as the demo)")
    p.add_argument("--results", default=None, help="results folder the config names (default OUT/results)")

    def per_case(p, folder_help):
        p.add_argument("--case", default=None, help="one case (with --out-dir)")
        p.add_argument("--out-dir", default=None, help=f"the case's folder: {folder_help}, or excluded.json with the reason")
        p.add_argument("--shard", type=int, default=None, help="a shard of the manifest's cases (the workflow's jobs)")
        p.add_argument("--shard-size", type=int, default=None, help="cases per shard")
        p.add_argument("--out-root", default=None, help="with --shard: case folders go to OUT_ROOT/<case_id>")
        p.add_argument("--table", default=None, help="with --shard: the shard's table (Parquet: case, status, reason)")

    p = add("segment", cmd_segment, "group TotalSegmentator classes into the 36 anatomies (one case or a shard)",
            manifest)
    per_case(p, "anatomy.nii.gz + anatomies.parquet")
    p = add("preprocess", cmd_preprocess, "check, convert to HU, resample and scale (one case or a shard)", manifest)
    per_case(p, "image.npy, anatomy.npy, meta.json")
    p.add_argument("--segment-dir", default=None, help="one case: its folder from `ctvlp segment`")
    p.add_argument("--segment-root", default=None, help="a shard: the folder of segment's case folders")
    p = add("qc", cmd_qc, "collect per-case QC and exclusions; list the cases that go on", manifest,
            ("--segment-root", "the folder of segment's case folders"),
            ("--preprocessed-root", "the folder of preprocess's case folders"))
    p.add_argument("--cohort-exclusions", default=None, help="exclusions.parquet from `ctvlp cohort`")
    p.add_argument("--out", required=True,
                   help="folder for qc.parquet, excluded.parquet, cases.parquet, summary.md, summary.html")
    add("reports", cmd_reports, "parse reports into per-anatomy text and status", manifest,
        ("--out", "the parsed reports table to write (reports.parquet)"))
    p = add("train", cmd_train, "train one phase (visual_cl, align, normality, boost) or the CLIP baseline (global)",
            cases, reports, ("--out-dir", "the phase's folder: weights, config.json, metrics.csv, summary"))
    p.add_argument("--phase", default="align", choices=["visual_cl", "align", "normality", "boost", "global"],
                   help="the training phase (default align)")
    p.add_argument("--init", default=None, help="folder of the previous phase's model to start from")
    p.add_argument("--contrast", default="disease", choices=["disease", "instance"],
                   help="phase 1: disease-level (Eq. 2) or instance-level (ablation baseline)")
    add("evaluate", cmd_evaluate, "zero-shot diagnosis tables", model, cases, truth,
        ("--out-dir", "folder for zeroshot.md/.csv and predictions.parquet"))
    add("linear-probe", cmd_linear_probe,
        "linear probe: frozen vision encoder + logistic regression per disease on report-derived labels",
        model, cases, reports, truth, ("--out-dir", "folder for linear_probe.md, .csv and .parquet"))
    p = add("figures", cmd_figures, "ROC per organ, t-SNE, activation histograms and maps (PNG)", model,
            ("--predictions", "predictions.parquet from `ctvlp evaluate`"), cases, truth,
            ("--out-dir", "folder for the PNG figures"))
    p.add_argument("--baseline-model", default=None, help="a model without VSDB, e.g. results/train/align")
    p.add_argument("--n-cases", type=int, default=100, help="test cases in the t-SNE")
    p = add("ablation", cmd_ablation, "the ablation table from each variant's zeroshot.csv")
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=folder with its zeroshot.csv and predictions.parquet (repeat; fvlm is the reference)")
    p.add_argument("--out", required=True, help="ablation.md (and .csv beside it)")
    p = add("predict", cmd_predict, "per-disease probabilities and decisions for one CT scan",
            ("--model", ("a model bundle (the workflow's results/model, or `ctvlp bundle`'s --out), or a model "
                         "folder with --config")))
    next(a for a in p._actions if a.dest == "config").help = (
        "optional with a model bundle: runtime keys (train.device, segment.device, ...); refused where it "
        "contradicts a key the bundle fixes. Required for a model folder without bundle.json")
    p.set_defaults(config=None)
    p.add_argument("scan", help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--mask", default=None, help="its TotalSegmentator multilabel mask (else segment.backend runs)")
    p.add_argument("--thresholds", default=None,
                   help="only for a model folder without bundle.json: results/eval/zeroshot.csv (a bundle holds them)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--allow-text-model-mismatch", action="store_true",
                   help="predict even if the text model's files differ from those the model was trained with")
    p.add_argument("--out", default=None, help="output prefix for .csv and .json (default predictions/<scan>)")
    p = add("bundle", cmd_bundle, "a self-contained model folder for `ctvlp predict`: the weights, config.json and "
            "bundle.json (settings, anatomy grouping, prompts, thresholds, text model hash)",
            ("--model", "the trained model folder (e.g. results/train/boost)"),
            ("--out", "the bundle folder to write (e.g. results/model)"))
    p.add_argument("--thresholds", default=None,
                   help="results/eval/zeroshot.csv: thresholds and prompt style chosen on validation (leave out "
                        "when the cohort has no labels: a bundle without thresholds)")
    add("unlock", cmd_unlock, "remove the lock of a results folder left by a workflow run that is gone "
        "(needed when it ran on another host; a dead run on this host is taken over by itself)",
        ("--results", "the results folder whose lock to remove"))
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the workflow's terminal: progress lines only (the log gets everything); not in a torchrun
    # worker, which does not inherit the descriptor (its number may name another file there)
    if args.progress_fd is not None and "LOCAL_RANK" not in os.environ:
        progress.attach_terminal(args.progress_fd, args.command)
    if not progress.interactive():  # no carriage-return redraws in a log file: every tqdm bar off
        os.environ.setdefault("TQDM_DISABLE", "1")
    _use_threads(args.threads)
    job = os.environ.get("SLURM_JOB_ID")
    log.info("ctvlp %s on %s%s", args.command, socket.gethostname(), f" (SLURM job {job})" if job else "")
    try:
        if args.command not in ("validate-config", "unlock"):  # one workflow run per results folder
            runlock.check([getattr(args, name, None) for name in ("out", "out_dir", "out_root", "table")])
        args.func(args)
    except (cfgmod.ConfigError, UnsafePathError, UnsafeCaseIdError, NoLabelsError, UnreadableTableError,
            runlock.RunLockedError) as e:
        sys.exit(f"ctvlp {args.command}: {e}")  # the user's input, said plainly: no traceback


if __name__ == "__main__":
    main()
