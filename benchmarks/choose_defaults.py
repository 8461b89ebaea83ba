"""Defaults chosen on validation, by a script (issue 22): every candidate setting of each dimension
in ``CANDIDATES`` trained and scored zero-shot on the VALIDATION split only, and one setting picked
per dimension by ``RULE``. The candidates and the rule are fixed here, in code, before anything runs.

    python benchmarks/choose_defaults.py --results results_ablation --val-results results_val --label cpu
    python benchmarks/choose_defaults.py ... --only epochs --only fusion   # a partial run
    python benchmarks/choose_defaults.py ... --dry-run                     # the plan, nothing trained

One factor at a time around a reference: the reference settings are the run config of ``--results``
(its ``.ctvlp/config``) with the FIRST candidate of every dimension applied; each candidate is the
reference with that candidate's settings. Dimensions of the alignment (everything but ``fusion`` and
``codebook``) train phase 2 (``align``) from scratch on the training cases of ``--results``, as
``alignment_levers.py`` does (``unmentioned`` then changes what Eq. 1 trains on); ``fusion`` and
``codebook`` train phases 3 and 4 (``normality+boost``) on the reference's phase-2 model. A candidate
with the reference's settings is the reference: identical settings train once. Trained models are
cached under ``RESULTS/choose_defaults/models/<digest of the settings>/``, so a rerun (or a later
``--only``) does not retrain, and their validation predictions beside them.

Scoring, like the workflow's ``evaluate_zeroshot`` (evaluate.crop, prompt style chosen on validation),
on the validation cases of ``--val-results`` (e.g. a results folder of ``cohort.val_cases: 400`` after
the same ``cohort.test_cases``: 424 validation cases). Test labels are never read: the ground truth is
loaded filtered to the validation case ids before any model is (``load_validation``), the only cases
embedded are validation cases, and ``choose`` takes validation predictions only (it refuses any other
row). The validation cases must be disjoint from the test and training cases of ``--results``.

Writes ``choose_defaults_<label>.md`` and ``.csv`` into --out: the machine, the command, the rule, each
candidate's validation mean AUC with its bootstrap 95% CI, its paired difference to the dimension's
first candidate with its paired bootstrap 95% CI, its training time, the pick per dimension and the
config.yaml values the picks amount to.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from alignment_levers import _aucs, _split_ids, apply, check_chain, run_config  # benchmarks/ is on sys.path
from machine import cpu

from ctvlp import config as cfgmod
from ctvlp.evaluation import metrics, zeroshot
from ctvlp.evaluation.embed import crop_size

# dimension -> candidates (name, dotted config overrides); the FIRST is the baseline of the dimension
# and the cheaper (or current) setting, which keeps a tie
CANDIDATES: dict[str, tuple[tuple[str, dict], ...]] = {
    "token_stage": (("stage3", {"model.token_stage": 3}), ("stage2", {"model.token_stage": 2})),
    "text_head": (("locked", {"model.train_text_head": False}), ("trained", {"model.train_text_head": True})),
    "text_center": (("off", {"model.text_center": False}), ("on", {"model.text_center": True})),
    "epochs": (("30", {"train.epochs": 30}), ("60", {"train.epochs": 60})),
    "fusion": (("residual", {"model.fusion": "residual"}), ("replace", {"model.fusion": "replace"})),
    "codebook": (("K16_C64", {"model.vq_codes": 16, "model.vq_dim": 64}),
                 ("K100_C128", {"model.vq_codes": 100, "model.vq_dim": 128})),
    "unmentioned": (("as_normal", {"train.unmentioned_as_normal": True}),
                    ("left_out", {"train.unmentioned_as_normal": False})),
}
BOOST_DIMENSIONS = ("fusion", "codebook")  # phases 3-4 on the reference's phase-2 model
N_RESAMPLES = 1000  # bootstrap resamples of validation cases (CIs and paired differences)
LEVEL = 0.95

RULE = ("Per dimension, on the validation split only: a candidate other than the first-listed one "
        "replaces it only if its paired bootstrap 95% CI of the difference in mean zero-shot AUC to the "
        "first-listed candidate lies entirely above 0; of those, the one with the highest validation mean "
        "AUC is picked. Otherwise (a tie, or no candidate clearly better) the first-listed, cheaper "
        "setting stays.")


@dataclass
class Candidate:
    dimension: str
    name: str
    overrides: dict
    chain: list[str]
    settings: dict = field(repr=False)
    folder: Path | None = None  # where it is trained (models/<digest>)
    init: Path | None = None  # the phase-2 model phases 3-4 start from


@dataclass
class Validation:
    """The validation split of a results folder: its cases (a val-only qc table written beside the
    models) and their ground truth. Nothing else of the folder's labels is ever held."""
    results: Path
    cases: pl.DataFrame
    truth: pl.DataFrame

    @property
    def ids(self) -> set[str]:
        return set(self.cases["case_id"])


def load_validation(val_results: Path) -> Validation:
    """The validation cases of ``val_results`` and the ground truth of those cases only: the filter
    runs in the Parquet scan, so no other case's label is materialised."""
    cases = pl.read_parquet(val_results / "qc" / "cases.parquet").filter(pl.col("split") == "val")
    if cases.is_empty():
        raise SystemExit(f"{val_results} has no validation cases")
    ids = cases["case_id"].to_list()
    truth = (pl.scan_parquet(val_results / "cohort" / "ground_truth.parquet")
             .filter(pl.col("case_id").is_in(ids)).collect())
    return Validation(val_results, cases, truth)


def reference_overrides(dimensions=CANDIDATES) -> dict:
    """The first candidate's overrides of every dimension: the reference settings."""
    out = {}
    for candidates in dimensions.values():
        out.update(candidates[0][1])
    return out


def stamp_of(settings: dict, chain: list[str], init: Path | None, results: Path) -> dict:
    """What a trained candidate depends on (runtime keys such as threads left out)."""
    tracked = cfgmod.tracked({"model": settings["model"], "train": settings["train"]})
    return {**tracked, "seed": settings["seed"], "chain": chain, "results": str(Path(results).resolve()),
            **({"init": str(init)} if init else {})}


def plan(base: dict, results: Path, only: list[str] | None = None, threads: int = 2,
         dimensions=CANDIDATES) -> tuple[Candidate, list[Candidate]]:
    """(the reference's phase-2 candidate, the candidates of the dimensions asked for), each with its
    settings and cache folder."""
    models = results / "choose_defaults" / "models"

    def make(dimension, name, overrides, chain, init=None):
        settings = apply(base, {**reference_overrides(dimensions), **overrides})
        settings["train"]["threads"] = threads
        check_chain(f"{dimension}/{name}", chain, init)
        folder = models / cfgmod.digest(stamp_of(settings, chain, init, results))[:16]
        return Candidate(dimension, name, overrides, chain, settings, folder, init)

    reference = make("reference", "reference", {}, ["align"])
    picked = []
    for dimension in only or list(dimensions):
        if dimension not in dimensions:
            raise SystemExit(f"unknown dimension {dimension!r}; one of {', '.join(dimensions)}")
        for name, overrides in dimensions[dimension]:
            if dimension in BOOST_DIMENSIONS:
                picked.append(make(dimension, name, overrides, ["normality", "boost"], reference.folder / "align"))
            else:
                picked.append(make(dimension, name, overrides, ["align"]))
    return reference, picked


def is_trained(c: Candidate) -> bool:
    done = c.folder / "settings.json"
    return ((c.folder / c.chain[-1] / "model.safetensors").exists() and done.exists()
            and json.loads(done.read_text(encoding="utf-8")) == _full_stamp(c))


def _full_stamp(c: Candidate) -> dict:
    stamp = stamp_of(c.settings, c.chain, c.init, _results_of(c))
    weights = c.init / "model.safetensors" if c.init is not None else None
    if weights is not None:  # a retrained phase-2 model makes phases 3-4 stale
        stamp["init_mtime"] = weights.stat().st_mtime if weights.exists() else None
    return stamp


def _results_of(c: Candidate) -> Path:
    return c.folder.parents[2]  # RESULTS/choose_defaults/models/<digest>


def train(c: Candidate) -> float:
    """Train the candidate's chain into its folder unless there already; its training seconds."""
    from ctvlp.training.phases import run  # heavy; not needed by --dry-run or the tests of choose

    if not is_trained(c):
        results = _results_of(c)
        c.folder.mkdir(parents=True, exist_ok=True)
        (c.folder / "val_predictions").mkdir(exist_ok=True)
        for old in (c.folder / "val_predictions").glob("*.parquet"):
            old.unlink()  # predictions of earlier weights
        start, init = time.perf_counter(), c.init
        for phase in c.chain:
            run(phase, results / "qc" / "cases.parquet", results / "reports" / "reports.parquet", c.folder / phase,
                c.settings["model"], c.settings["train"], c.settings["seed"], init=init)
            init = c.folder / phase
        (c.folder / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n", encoding="utf-8")
        (c.folder / "settings.json").write_text(json.dumps(_full_stamp(c)), encoding="utf-8")
    return float((c.folder / "train_seconds.txt").read_text(encoding="utf-8"))


def validation_predictions(c: Candidate, val: Validation) -> pl.DataFrame:
    """Zero-shot predictions of the candidate's model on the validation cases (cached beside it)."""
    cached = c.folder / "val_predictions" / f"{val.results.resolve().name}.parquet"
    if not cached.exists():
        cases = c.folder / "val_predictions" / f"{val.results.resolve().name}_cases.parquet"
        val.cases.write_parquet(cases)
        pred, _ = zeroshot.predict(c.folder / c.chain[-1], cases, val.truth, c.settings["evaluate"]["catalog"],
                                   c.settings["train"]["device"], crop_size(c.settings),
                                   c.settings["evaluate"]["prompt_style"])
        pred.write_parquet(cached)
    return pl.read_parquet(cached)


def _as_test(pred: pl.DataFrame) -> pl.DataFrame:
    """Validation rows relabelled "test", the split ``metrics``' bootstrap functions read."""
    return pred.with_columns(pl.lit("test").alias("split"))


def choose(candidates: list[str], preds: dict[str, pl.DataFrame], seed: int = 0,
           n_resamples: int = N_RESAMPLES) -> tuple[str, pl.DataFrame]:
    """``RULE`` on the validation predictions ``preds`` {candidate: predictions} of one dimension,
    ``candidates`` in their listed order (the first the baseline). Only validation rows are accepted.
    Returns the pick and a table (candidate, val_auc with CI, paired difference to the first with CI,
    val_cases, picked)."""
    for name in candidates:
        splits = set(preds[name]["split"].unique())
        if splits != {"val"}:
            raise ValueError(f"choose takes validation predictions only; {name} has splits {sorted(splits)}")
    first = candidates[0]
    rows = []
    for name in candidates:
        pred = _as_test(preds[name])
        aucs = _aucs(pred)
        _, (low, high) = metrics.bootstrap_auc(pred, n_resamples, LEVEL, seed=seed)
        diff = (metrics.paired_difference(pred, _as_test(preds[first]), n_resamples, LEVEL, seed=seed)
                if name != first else (0.0, 0.0, 0.0))
        rows.append({"candidate": name, "val_auc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
                     "val_auc_ci_low": float(low), "val_auc_ci_high": float(high), "diff_vs_first": diff[0],
                     "diff_ci_low": diff[1], "diff_ci_high": diff[2], "val_diseases": len(aucs),
                     "val_cases": pred["case_id"].n_unique()})
    better = [r for r in rows[1:] if r["diff_ci_low"] > 0]  # NaN compares False: never replaces
    pick = max(better, key=lambda r: r["val_auc"])["candidate"] if better else first
    return pick, pl.DataFrame(rows).with_columns((pl.col("candidate") == pick).alias("picked"))


def nested(overrides: dict) -> dict:
    """{"model.fusion": "x"} -> {"model": {"fusion": "x"}} (the config.yaml shape)."""
    out: dict = {}
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def _check_disjoint(results: Path, val: Validation) -> None:
    splits = _split_ids(results)
    if val.ids & splits["test"]:
        raise SystemExit(f"the validation cases of {val.results} include test cases of {results}: give it "
                         "validation cases after the same cohort.test_cases (cohort.val_cases)")
    if val.ids & splits["train"]:
        raise SystemExit(f"the validation cases of {val.results} include training cases of {results}")


def print_plan(reference: Candidate, candidates: list[Candidate]) -> None:
    print(f"Rule: {RULE}\n")
    print(f"reference (phase 2, first candidate of every dimension): {reference.folder} "
          f"[{'trained' if is_trained(reference) else 'to train'}]")
    for c in candidates:
        state = "trained" if is_trained(c) else "to train"
        shared = " (= reference)" if c.folder == reference.folder else ""
        print(f"  {c.dimension:12s} {c.name:10s} {_overrides_text(c.overrides):55s} chain={'+'.join(c.chain):17s} "
              f"{c.folder}{shared} [{state}]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results_ablation"),
                        help="results folder whose run config and training cases the candidates train with")
    parser.add_argument("--val-results", type=Path, default=Path("results_val"),
                        help="results folder whose VALIDATION split scores the candidates (disjoint from the "
                             "test and training cases of --results, e.g. cohort.val_cases: 400)")
    parser.add_argument("--only", action="append", choices=list(CANDIDATES), help="only this dimension (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    val = load_validation(args.val_results)  # first: validation labels only, before any model
    _check_disjoint(args.results, val)
    base = run_config(args.results)
    reference, candidates = plan(base, args.results, args.only, args.threads)
    print_plan(reference, candidates)
    if args.dry_run:
        return None
    torch.set_num_threads(args.threads)
    if any(c.init is not None for c in candidates):
        train(reference)
    seconds, preds = {}, {}
    for c in candidates:
        seconds[(c.dimension, c.name)] = train(c)
        preds[(c.dimension, c.name)] = validation_predictions(c, val)
        print(f"{c.dimension}/{c.name}: trained ({seconds[(c.dimension, c.name)]:.0f} s), validation scored",
              flush=True)
    tables, picks = [], {}
    for dimension in dict.fromkeys(c.dimension for c in candidates):
        mine = [c for c in candidates if c.dimension == dimension]
        pick, table = choose([c.name for c in mine], {c.name: preds[(dimension, c.name)] for c in mine},
                             seed=base.get("seed", 0))
        picks[dimension] = next(c for c in mine if c.name == pick)
        extra = pl.DataFrame([{"candidate": c.name, "overrides": _overrides_text(c.overrides),
                               "chain": "+".join(c.chain), "train_seconds": round(seconds[(dimension, c.name)]),
                               "model": str(c.folder)} for c in mine])
        tables.append(table.join(extra, on="candidate", how="left")
                      .with_columns(pl.lit(dimension).alias("dimension")))
    table = pl.concat(tables).select("dimension", "candidate", "overrides", "chain", "val_auc", "val_auc_ci_low",
                                     "val_auc_ci_high", "diff_vs_first", "diff_ci_low", "diff_ci_high",
                                     "train_seconds", "val_cases", "val_diseases", "picked", "model")
    chosen = {}
    for c in picks.values():
        chosen.update(c.overrides)
    write(args, argv, table, picks, chosen, val)
    return table


def write(args, argv, table: pl.DataFrame, picks: dict, chosen: dict, val: Validation) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"choose_defaults_{args.label}.md"
    table.write_csv(path.with_suffix(".csv"))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = "\n".join(f"- **{d}**: `{c.name}` ({_overrides_text(c.overrides)})" for d, c in picks.items())
    path.write_text(
        f"# Defaults chosen on validation ({dt.date.today()})\n\n"
        f"Machine: {cpu()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}, "
        f"{args.threads} threads.\n\nCommand: `python benchmarks/choose_defaults.py {command}`\n\n"
        f"Trained on the training cases of `{args.results}`; scored on the {len(val.ids)} validation cases of "
        f"`{val.results}` only (no test label is read). One factor at a time around the reference (the first "
        "candidate of every dimension); fusion and codebook: phases 3-4 on the reference's phase-2 model, "
        "the other dimensions: phase 2 from scratch. val_auc: mean zero-shot AUC over the diseases with both "
        "classes, with its bootstrap 95% CI over validation cases; diff_vs_first: paired difference to the "
        "dimension's first candidate with its paired bootstrap 95% CI; train_seconds: the candidate's own "
        f"phases ({N_RESAMPLES} resamples).\n\n**Rule (fixed in the script before the run):** {RULE}\n\n"
        + metrics.markdown(table.drop("model"))
        + f"\nPicks:\n\n{lines}\n\nThe resulting config.yaml values:\n\n```yaml\n"
        + yaml.safe_dump(nested(chosen), sort_keys=False) + "```\n",
        encoding="utf-8")
    print(path.read_text(encoding="utf-8"))
    return path


if __name__ == "__main__":
    main()
