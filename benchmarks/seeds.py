"""Seeds (issue 22): the ablation's fVLM, + disease CL and ViSD-Boost, each trained with 3 seeds under
the chosen defaults; mean and spread of the mean zero-shot AUC across seeds beside the bootstrap CI
of the seed-averaged scores. A difference between two variants is a FINDING only when it has the
same sign in every seed AND its paired bootstrap 95% CI on the seed-averaged scores excludes 0.

Two parts.

1. Runner (``--plan`` prints, ``--run`` runs): the trainings go through
   benchmarks/alignment_levers.py (nothing is re-implemented here), one call per seed, into
   ``RESULTS/levers/<variant>_s<seed>/``:

   * seed 0 is the workflow's own models in RESULTS, evaluated as they are (``chain=none``):
     fvlm = ``ablation/fvlm/align``, fvlm_dcl = ``train/align``, visd = ``train/boost``;
   * seeds 1 and 2 are trained afresh on the same cases with ``seed=N,train.seed=N`` (the cohort
     is not re-drawn by alignment_levers, so this varies training alone): fvlm = ``chain=align``,
     fvlm_dcl = ``chain=visual_cl+align``, visd = ``chain=normality+boost`` from that seed's
     fvlm_dcl (``init=RESULTS/levers/fvlm_dcl_s<N>/align``), as the workflow's full method
     continues from its own phase-2 model.

   alignment_levers skips a variant whose weights are already there with the same settings, so
   an interrupted ``--run`` resumes.

       python benchmarks/seeds.py --results results_holdout --plan
       python benchmarks/seeds.py --results results_holdout --run

2. Aggregation (the default action): for each variant the per-seed predictions.parquet (as
   ctvlp's evaluate_zeroshot writes them), by default ``RESULTS/levers/<variant>_s<seed>/eval/``
   (seed 0 falls back to the workflow's ``eval/ablation/<variant>/`` and ``eval/`` for visd), or
   given explicitly with ``--predictions NAME=FILE,FILE,FILE`` (seed order; the same order for
   every variant, since seed k of one variant is paired with seed k of another).

       python benchmarks/seeds.py --results results_holdout --label holdout

   Per variant: the mean zero-shot AUC of each seed (mean over diseases, as the evaluation does),
   their mean, SD and min-max, and the AUC with its bootstrap 95% CI of the SEED-AVERAGED scores
   (each case x disease score averaged over the seeds, then the usual AUC and case bootstrap of
   ctvlp.evaluation.metrics); the same means over local and over diffuse diseases. Per pair (each
   variant vs fvlm, visd vs fvlm_dcl): the difference in each seed, whether its sign holds in every
   seed, and the paired bootstrap CI (metrics.paired_difference) on the seed-averaged scores.
   Writes ``seeds_<label>.md``, ``seeds_<label>.csv`` (variants) and ``seeds_<label>_pairs.csv``
   into --out, with the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from machine import cpu  # benchmarks/ is on sys.path

from ctvlp import catalog
from ctvlp.evaluation import metrics

HERE = Path(__file__).resolve().parent
VARIANTS = ("fvlm", "fvlm_dcl", "visd")
PAIRS = (("fvlm_dcl", "fvlm"), ("visd", "fvlm"), ("visd", "fvlm_dcl"))  # (variant, reference)
SEEDS = (0, 1, 2)
WORKFLOW_MODEL = {"fvlm": "ablation/fvlm/align", "fvlm_dcl": "train/align", "visd": "train/boost"}
WORKFLOW_EVAL = {"fvlm": "eval/ablation/fvlm", "fvlm_dcl": "eval/ablation/fvlm_dcl", "visd": "eval"}
TRAIN_CHAIN = {"fvlm": "align", "fvlm_dcl": "visual_cl+align", "visd": "normality+boost"}


# ---- runner ----

def variant_specs(results: Path, seed: int) -> list[str]:
    """alignment_levers ``--variant`` specs of one seed, in the order they must run (visd continues
    from the same seed's fvlm_dcl)."""
    if seed == 0:  # the workflow's models, evaluated as they are
        return [f"{v}_s0=chain=none,init={results / WORKFLOW_MODEL[v]}" for v in VARIANTS]
    specs = []
    for v in VARIANTS:
        extra = f",init={results / 'levers' / f'fvlm_dcl_s{seed}' / 'align'}" if v == "visd" else ""
        specs.append(f"{v}_s{seed}=chain={TRAIN_CHAIN[v]}{extra},seed={seed},train.seed={seed}")
    return specs


def plan(results: Path, label: str, seeds=SEEDS, threads: int = 2) -> list[list[str]]:
    """One alignment_levers command (argv) per seed."""
    return [[sys.executable, str(HERE / "alignment_levers.py"), "--results", str(results), "--threads", str(threads),
             "--label", f"seeds_{label}_s{s}", *[a for spec in variant_specs(results, s) for a in ("--variant", spec)]]
            for s in seeds]


# ---- aggregation ----

def average_seeds(preds: list[pl.DataFrame]) -> pl.DataFrame:
    """One predictions table whose score is each (case, disease) score averaged over the seeds'
    tables (matched by case_id and disease_id, not by row order); a row is evaluable only where it
    is in every seed. Rows missing from a seed are dropped; a label that differs between seeds is an
    error (the seeds must be scored on the same cases)."""
    if not preds:
        raise ValueError("no predictions to average")
    keys = ["case_id", "disease_id"]
    stacked = pl.concat([p.select(*keys, "split", "label", "evaluable", "score").with_columns(pl.lit(i).alias("_seed"))
                         for i, p in enumerate(preds)], how="vertical_relaxed")
    agg = (stacked.group_by(keys, maintain_order=True)
           .agg(pl.col("_seed").n_unique().alias("_n"), pl.col("split").n_unique().alias("_splits"),
                pl.col("label").n_unique().alias("_labels"), pl.col("evaluable").all(), pl.col("score").mean()))
    clash = agg.filter((pl.col("_labels") > 1) | (pl.col("_splits") > 1))
    if not clash.is_empty():
        raise ValueError(f"{len(clash)} case x disease rows have different labels or splits across seeds, e.g. "
                         f"{clash.row(0, named=True)}")
    agg = agg.filter(pl.col("_n") == len(preds)).drop("_n", "_splits", "_labels")
    first = preds[0].drop("evaluable", "score")
    return first.join(agg, on=keys, how="inner").select(preds[0].columns)


def mean_aucs(pred: pl.DataFrame, local: set[str]) -> dict[str, float]:
    """Mean test AUC over diseases (where defined), over local and over diffuse diseases, as
    metrics.metrics_table gives them (no bootstrap)."""
    table, _ = metrics.metrics_table(pred, n_resamples=0)
    auc = table.select("disease_id", pl.col("auc").fill_nan(None))
    mean = lambda t: t["auc"].mean() if t["auc"].null_count() < len(t) else float("nan")  # noqa: E731
    return {"all": mean(auc), "local": mean(auc.filter(pl.col("disease_id").is_in(sorted(local)))),
            "diffuse": mean(auc.filter(~pl.col("disease_id").is_in(sorted(local))))}


def _sign(x: float) -> int:
    return 0 if not np.isfinite(x) or x == 0 else (1 if x > 0 else -1)


def aggregate(preds: dict[str, list[pl.DataFrame]], local: set[str], pairs=PAIRS, n_resamples: int = 1000,
              seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(variant table, pair table) from each variant's per-seed predictions (seed k of every
    variant is paired with seed k of the others)."""
    counts = {len(v) for v in preds.values()}
    if len(counts) != 1:
        raise ValueError(f"every variant needs the same number of seeds, got {({k: len(v) for k, v in preds.items()})}")
    n_seeds = counts.pop()
    averaged = {v: average_seeds(p) for v, p in preds.items()}
    rows = []
    for v, per_seed in preds.items():
        seeds = [mean_aucs(p, local) for p in per_seed]
        table, ci = metrics.metrics_table(averaged[v], n_resamples=n_resamples, seed=seed)
        avg = mean_aucs(averaged[v], local)
        row = {"variant": v, "method": metrics.ABLATION.get(v, v), "seeds": n_seeds}
        row |= {f"auc_seed{k}": s["all"] for k, s in enumerate(seeds)}
        for part, suffix in (("all", ""), ("local", "_local"), ("diffuse", "_diffuse")):
            values = np.array([s[part] for s in seeds], dtype=float)
            row |= {f"seed_mean{suffix}": float(np.mean(values)),
                    f"seed_sd{suffix}": float(np.std(values, ddof=1)) if n_seeds > 1 else float("nan")}
            if part == "all":
                row |= {"seed_min": float(values.min()), "seed_max": float(values.max())}
            row[f"avg_auc{suffix}"] = avg[part]
            if part == "all":
                row |= {"avg_ci_low": ci[0], "avg_ci_high": ci[1]}
        row["test_cases"] = averaged[v].filter((pl.col("split") == "test") & pl.col("evaluable"))["case_id"].n_unique()
        rows.append(row)
    pair_rows = []
    for a, b in pairs:
        if a not in preds or b not in preds:
            continue
        per_seed = [metrics.paired_difference(pa, pb, n_resamples, seed=seed)
                    for pa, pb in zip(preds[a], preds[b], strict=True)]
        diffs = np.array([d[0] for d in per_seed])
        signs = {_sign(d) for d in diffs}
        same_sign = len(signs) == 1 and 0 not in signs
        diff, low, high = metrics.paired_difference(averaged[a], averaged[b], n_resamples, seed=seed)
        excludes = bool(low > 0 or high < 0)
        sign = signs.pop() if same_sign else 0
        # the CI must exclude 0 on the side every seed points to
        finding = (sign > 0 and low > 0) or (sign < 0 and high < 0)
        row = {"variant": a, "reference": b}
        row |= {f"diff_seed{k}": float(d) for k, d in enumerate(diffs)}
        row |= {f"diff_seed{k}_ci_low": float(d[1]) for k, d in enumerate(per_seed)}
        row |= {f"diff_seed{k}_ci_high": float(d[2]) for k, d in enumerate(per_seed)}
        row |= {"seed_mean_diff": float(np.mean(diffs)),
                "seed_sd_diff": float(np.std(diffs, ddof=1)) if n_seeds > 1 else float("nan"),
                "same_sign_every_seed": same_sign, "avg_diff": diff, "avg_diff_ci_low": low,
                "avg_diff_ci_high": high, "ci_excludes_0": excludes, "finding": bool(finding)}
        pair_rows.append(row)
    return pl.DataFrame(rows), pl.DataFrame(pair_rows)


def default_files(results: Path, variants=VARIANTS, seeds=SEEDS) -> dict[str, list[Path]]:
    """RESULTS/levers/<variant>_s<seed>/eval/predictions.parquet; seed 0 falls back to the
    workflow's own evaluation of the same model (RESULTS/eval/ablation/<variant>/ or RESULTS/eval/)."""
    out = {}
    for v in variants:
        files = []
        for s in seeds:
            path = results / "levers" / f"{v}_s{s}" / "eval" / "predictions.parquet"
            if s == 0 and not path.exists():
                path = results / WORKFLOW_EVAL[v] / "predictions.parquet"
            files.append(path)
        out[v] = files
    return out


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:+.3f}"


def write(variants: pl.DataFrame, pairs: pl.DataFrame, files: dict[str, list[Path]], out: Path, label: str,
          command: str, n_resamples: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    variants.write_csv(out / f"seeds_{label}.csv")
    pairs.write_csv(out / f"seeds_{label}_pairs.csv")
    n = int(variants["seeds"][0]) if len(variants) else 0
    shown = variants.select("variant", *[f"auc_seed{k}" for k in range(n)], "seed_mean", "seed_sd", "seed_min",
                            "seed_max", "avg_auc", "avg_ci_low", "avg_ci_high", "test_cases")
    split = variants.select("variant", "seed_mean_local", "seed_sd_local", "avg_auc_local", "seed_mean_diffuse",
                            "seed_sd_diffuse", "avg_auc_diffuse")
    pair_view = pairs.select(
        "variant", "reference",
        *[pl.format("{} [{}, {}]", *[pl.col(c).map_elements(_fmt, return_dtype=pl.Utf8)
                                     for c in (f"diff_seed{k}", f"diff_seed{k}_ci_low", f"diff_seed{k}_ci_high")])
          .alias(f"diff_seed{k} [CI]") for k in range(n)],
        "seed_mean_diff", "seed_sd_diff", "same_sign_every_seed", "avg_diff", "avg_diff_ci_low", "avg_diff_ci_high",
        "finding") if len(pairs) else pairs
    listing = "".join(f"- {v}: " + ", ".join(f"`{p}`" for p in fs) + "\n" for v, fs in files.items())
    path = out / f"seeds_{label}.md"
    path.write_text(
        f"# Seeds ({dt.date.today()})\n\nMachine: {cpu()}, {os.cpu_count()} cores, {platform.platform()}.\n\n"
        f"Command: `{command}`\n\n"
        f"Each variant trained with {n} seeds on the same cases; auc_seedK: mean zero-shot test AUC over diseases "
        "of seed K; seed_mean/seed_sd/min/max: across seeds (SD with ddof=1); avg_auc: AUC of the seed-averaged "
        f"scores (each case x disease score averaged over the seeds) with its case-bootstrap 95% CI "
        f"({n_resamples} resamples).\n\n" + metrics.markdown(shown)
        + "\nLocal and diffuse diseases (means over the diseases of each type):\n\n" + metrics.markdown(split)
        + "\nDifferences of mean AUC (variant - reference): per seed with that seed's paired bootstrap CI; "
        "avg_diff with the paired bootstrap 95% CI on the seed-averaged scores. **finding**: the sign holds in "
        "every seed AND the CI on the seed-averaged scores excludes 0 (on the same side).\n\n"
        + metrics.markdown(pair_view) + "\nPrediction files (seed order):\n\n" + listing,
        encoding="utf-8")
    return path


def _parse_predictions(items: list[str]) -> dict[str, list[Path]]:
    out = {}
    for item in items:
        name, sep, body = item.partition("=")
        if not sep or not body:
            raise SystemExit(f"--predictions {item!r} is not NAME=FILE,FILE,...")
        out[name] = [Path(p) for p in body.split(",")]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results_holdout"))
    parser.add_argument("--plan", action="store_true", help="print the alignment_levers commands of every seed")
    parser.add_argument("--run", action="store_true", help="run them (one per seed, in order), then aggregate")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--predictions", action="append", default=[],
                        help="NAME=FILE,FILE,... per-seed predictions.parquet of one variant (seed order); "
                             "default: those under RESULTS/levers/<variant>_s<seed>/eval/")
    parser.add_argument("--catalog", default="demo", help="disease catalog giving each disease's type")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    command = "python benchmarks/seeds.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    if args.plan or args.run:
        for cmd in plan(args.results, args.label, args.seeds, args.threads):
            print(" ".join(map(shlex.quote, cmd)), flush=True)
            if args.run:
                subprocess.run(cmd, check=True)
        if args.plan:
            return None
    files = _parse_predictions(args.predictions) if args.predictions else default_files(args.results,
                                                                                        seeds=args.seeds)
    missing = [str(p) for fs in files.values() for p in fs if not p.exists()]
    if missing:
        raise SystemExit("missing predictions (run --plan / --run first):\n  " + "\n  ".join(missing))
    preds = {v: [pl.read_parquet(p) for p in fs] for v, fs in files.items()}
    local = {d.id for d in catalog.diseases(args.catalog) if d.type == "local"}
    variants, pairs = aggregate(preds, local, n_resamples=args.resamples, seed=args.bootstrap_seed)
    path = write(variants, pairs, files, args.out, args.label, command, args.resamples)
    print(path.read_text(encoding="utf-8"))
    return variants, pairs


if __name__ == "__main__":
    main()
