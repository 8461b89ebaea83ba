"""What does it take for anatomy-wise alignment to learn the demo's diseases? Phase 2 (fVLM) variants
side by side on the same test cases, each difference to the first variant with a paired CI.

    python benchmarks/alignment_levers.py --results results_ablation \\
        --variant baseline= --variant epochs60=train.epochs=60 \\
        --variant more_data@results_scale= --label cpu

Each ``--variant NAME[@RESULTS]=KEY=VALUE,KEY=VALUE`` trains phase 2 (``align``, from scratch, as the
ablation's fVLM; ``chain=visual_cl+align`` trains phase 1 first, as the ablation's + disease CL;
``chain=normality+boost,init=FOLDER`` trains phases 3 and 4 on a trained model, e.g. with
``model.fusion=replace``; ``chain=none,init=FOLDER`` evaluates a trained model as it is) with the run config of ``--results`` (its ``.ctvlp/config``) changed by the dotted
overrides (values read as YAML), on the cases of RESULTS (default ``--results``: a results folder
with more training cases, e.g. ``cohort.train_cases``, has the same validation and test cases), into
``RESULTS/levers/NAME/``; a variant whose weights are there with the same settings is not retrained.
Every variant is evaluated like the workflow's ``evaluate_zeroshot`` (prompt style chosen on the
validation split), and additionally on its own TRAINING cases (how well alignment fits what it was
trained on, which tells under- from over-fitting). Writes ``alignment_levers_<label>.md`` into --out,
with the machine, the command and each variant's training time.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from machine import cpu  # benchmarks/ is on sys.path
from sklearn.metrics import roc_auc_score
from text_ceiling import per_disease_auc

from ctvlp import catalog
from ctvlp import config as cfgmod
from ctvlp.evaluation import metrics, zeroshot
from ctvlp.evaluation.embed import embed_cases
from ctvlp.evaluation.stage import evaluate_zeroshot
from ctvlp.imaging.storage import paths_from
from ctvlp.model.io import load_model, pick_device
from ctvlp.training.phases import run


def run_config(results: Path) -> dict:
    """The newest run config the workflow wrote into ``results`` (.ctvlp/config/<digest>.json)."""
    found = sorted((results / ".ctvlp" / "config").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{results} holds no run config (.ctvlp/config/*.json): run the workflow there first")
    return json.loads(found[-1].read_text(encoding="utf-8"))


def parse_variant(spec: str, default_results: Path) -> tuple[str, Path, dict]:
    """NAME[@RESULTS]=KEY=VALUE,KEY=VALUE -> (name, results folder, {dotted key: value}); a value
    may be a YAML list, e.g. ``train.crop_size=[128,96,72]``."""
    head, _, body = spec.partition("=")
    name, _, results = head.partition("@")
    overrides = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", body)):  # commas inside [...] belong to a list value
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name}: {item!r} is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, Path(results) if results else default_results, overrides


PHASE_ORDER = ("visual_cl", "align", "normality", "boost")


def check_chain(name: str, chain: list[str], init) -> None:
    """A chain is consecutive phases in training order ending in align or boost; one that starts
    after align needs ``init`` (the model folder it continues from); ``none`` (with init) trains nothing."""
    if chain == ["none"]:
        if not init:
            raise SystemExit(f"variant {name}: chain=none evaluates a trained model as it is: give init=FOLDER")
        return
    first = PHASE_ORDER.index(chain[0]) if chain[0] in PHASE_ORDER else -1
    if first < 0 or chain != list(PHASE_ORDER[first:first + len(chain)]) or chain[-1] not in ("align", "boost"):
        raise SystemExit(f"variant {name}: chain must be consecutive phases of {'+'.join(PHASE_ORDER)} ending in "
                         f"align or boost, not {'+'.join(chain)}")
    if chain[0] in ("normality", "boost") and not init:
        raise SystemExit(f"variant {name}: chain {'+'.join(chain)} continues a trained model: give init=FOLDER")


def apply(settings: dict, overrides: dict) -> dict:
    out = cfgmod.validate(copy.deepcopy(settings))  # keys newer than the run config get their defaults
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node[part]
        if last not in node:
            raise SystemExit(f"unknown config key {key}")
        node[last] = value
    return cfgmod.validate(out)


def training_fit(model_dir: Path, results: Path, style: str, catalog_name: str, device) -> dict[str, float]:
    """Zero-shot AUC per disease on the model's own training cases (whole volumes, as the test)."""
    model = load_model(model_dir, device)
    cases = pl.read_parquet(results / "qc" / "cases.parquet").filter(pl.col("split") == "train")
    ids, paths = cases["case_id"].to_list(), paths_from(cases)
    with torch.no_grad():
        embs = embed_cases(model, [paths[c] for c in ids], device)
    emb = torch.from_numpy(np.stack([embs[c][0] for c in ids])).to(device)
    complete = np.stack([embs[c][1] for c in ids])
    return per_disease_auc(model, emb, complete, ids, results, catalog_name, style)


def validation_predictions(model_dir: Path, val_results: Path, folder: Path, catalog_name: str, device) -> pl.DataFrame:
    """Zero-shot predictions on the VALIDATION split of ``val_results`` (prompt style chosen there),
    with split relabelled "test" so that the test-split metrics (bootstrap, paired difference) apply."""
    cases = pl.read_parquet(val_results / "qc" / "cases.parquet").filter(pl.col("split") == "val")
    if cases.is_empty():
        raise SystemExit(f"{val_results} has no validation cases")
    path = folder / "val_cases.parquet"
    cases.write_parquet(path)
    pred, _ = zeroshot.predict(model_dir, path, val_results / "cohort" / "ground_truth.parquet", catalog_name,
                               device)
    return pred.with_columns(pl.lit("test").alias("split"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results_ablation"))
    parser.add_argument("--variant", action="append", required=True, help="NAME[@RESULTS]=KEY=VALUE,...")
    parser.add_argument("--val-results", type=Path, default=None,
                        help="also score every variant on the VALIDATION split of this results folder (its "
                             "validation cases must be disjoint from the test cases, e.g. cohort.val_cases after "
                             "the same cohort.test_cases): what a choice between the variants is made on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = run_config(args.results)
    val_ids = _split_ids(args.val_results)["val"] if args.val_results else set()
    if val_ids & _split_ids(args.results)["test"]:  # a choice made there would be made on test cases
        raise SystemExit(f"the validation cases of {args.val_results} include test cases of {args.results}: "
                         "give it validation cases after the same cohort.test_cases (cohort.val_cases)")
    variants, rows, val_pred = {}, {}, {}
    for spec in args.variant:
        name, results, overrides = parse_variant(spec, args.results)
        chain = str(overrides.pop("chain", "align")).split("+")  # e.g. chain=visual_cl+align (Eq. 2, then Eq. 1)
        contrast = overrides.pop("contrast", "disease")
        start_from = overrides.pop("init", None)
        check_chain(name, chain, start_from)
        settings = apply(base, overrides)
        settings["train"]["threads"] = args.threads
        folder = results / "levers" / name
        as_is = chain == ["none"]  # evaluate the init model without training
        model_dir = Path(start_from) if as_is else folder / chain[-1]
        stamp = {"model": settings["model"], "train": settings["train"], "seed": settings["seed"], "chain": chain,
                 "contrast": contrast, **({"init": str(start_from)} if start_from else {}),
                 **({"weights_mtime": (model_dir / "model.safetensors").stat().st_mtime} if as_is else {})}
        done = folder / "settings.json"
        trained = (model_dir / "model.safetensors").exists() and done.exists() and \
            json.loads(done.read_text(encoding="utf-8")) == stamp
        start = time.perf_counter()
        if not trained:
            init = start_from
            folder.mkdir(parents=True, exist_ok=True)
            for phase in [] if as_is else chain:
                run(phase, results / "qc" / "cases.parquet", results / "reports" / "reports.parquet", folder / phase,
                    settings["model"], settings["train"], settings["seed"], init=init, contrast=contrast)
                init = folder / phase
            done.write_text(json.dumps(stamp), encoding="utf-8")
            train_s = time.perf_counter() - start
            (folder / "train_seconds.txt").write_text(f"{train_s:.1f}\n", encoding="utf-8")
        train_s = float((folder / "train_seconds.txt").read_text(encoding="utf-8"))
        # results of an unchanged variant are reused (a retrained one is evaluated afresh)
        if not trained or not (folder / "eval" / "predictions.parquet").exists():
            evaluate_zeroshot(settings, model_dir, results / "qc" / "cases.parquet",
                              results / "cohort" / "ground_truth.parquet", folder / "eval")
            (folder / "train_fit.json").unlink(missing_ok=True)
        style = pl.read_csv(folder / "eval" / "prompt_styles.csv").filter(pl.col("chosen"))["style"][0]
        if not (folder / "train_fit.json").exists():
            fit = training_fit(model_dir, results, style, settings["evaluate"]["catalog"],
                               pick_device(settings["train"]["device"]))
            (folder / "train_fit.json").write_text(json.dumps(fit), encoding="utf-8")
        fit = json.loads((folder / "train_fit.json").read_text(encoding="utf-8"))
        split_ids = _split_ids(results)
        n_train = len(split_ids["train"])
        variants[name] = folder / "eval"
        train_ids = split_ids["train"]
        if train_ids & val_ids:  # e.g. cohort.train_cases of one folder are cohort.val_cases of another
            print(f"{name}: {len(train_ids & val_ids)} of its training cases are validation cases of "
                  f"{args.val_results}: not scored there", flush=True)
        elif args.val_results:
            cached = folder / f"val_predictions_{args.val_results.name}.parquet"
            if not trained or not cached.exists():
                validation_predictions(model_dir, args.val_results, folder, settings["evaluate"]["catalog"],
                                       settings["train"]["device"]).write_parquet(cached)
            val_pred[name] = pl.read_parquet(cached)
        local = [a for d, a in fit.items() if d in _local_ids(settings)]
        rows[name] = {"overrides": ", ".join([*(f"{k}={v}" for k, v in overrides.items()),
                                              *([f"chain={'+'.join(chain)}"] if chain != ["align"] else []),
                                              *([f"init={start_from}"] if start_from else [])]) or "(none)",
                      "train_cases": n_train, "train_seconds": round(train_s),
                      "train_fit_auc": float(np.mean(list(fit.values()))), "train_fit_local": float(np.mean(local))}
        print(name, rows[name], flush=True)
    reference = next(iter(variants))
    table = metrics.ablation_table(variants, reference=reference, seed=base["seed"])
    table = table.join(pl.DataFrame([{"variant": k, **v} for k, v in rows.items()]), on="variant")
    val_cols = []
    if val_pred:
        local = _local_ids(base_settings := apply(base, {}))
        val_rows = []
        for name in variants:
            if name not in val_pred:
                val_rows.append({"variant": name})
                continue
            pred = val_pred[name]
            auc = _aucs(pred)
            diff = metrics.paired_difference(pred, val_pred[reference], seed=base_settings["seed"]) \
                if name != reference else (float("nan"),) * 3
            val_rows.append({"variant": name, "val_auc": float(np.mean(list(auc.values()))),
                             "val_local": float(np.mean([a for d, a in auc.items() if d in local])),
                             "val_diffuse": float(np.mean([a for d, a in auc.items() if d not in local])),
                             f"val_diff_vs_{reference}": diff[0], "val_diff_ci_low": diff[1],
                             "val_diff_ci_high": diff[2], "val_cases": pred["case_id"].n_unique()})
        val_table = pl.DataFrame(val_rows, infer_schema_length=None)
        table = table.join(val_table, on="variant", how="left")
        val_cols = [c for c in val_table.columns if c != "variant"]
    per_disease = pl.concat([pl.read_csv(f / "zeroshot.csv").select("disease_id", "type", "auc")
                            .with_columns(pl.lit(v).alias("variant")) for v, f in variants.items()])
    wide = per_disease.filter(pl.col("disease_id") != "mean").pivot("variant", index=["disease_id", "type"],
                                                                    values="auc")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"alignment_levers_{args.label}.md"
    cols = ["variant", "overrides", "train_cases", "train_seconds", "auc", "auc_ci_low", "auc_ci_high",
            f"diff_vs_{reference}", "diff_ci_low", "diff_ci_high", "auc_local", "auc_diffuse", "train_fit_auc",
            "train_fit_local", "test_cases", "prompt_style"]
    decide = (["variant", *val_cols], ) if val_cols else ()
    path.write_text(
        f"# Alignment levers ({dt.date.today()})\n\nMachine: {cpu()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"torch {torch.__version__}, {args.threads} threads.\n\n"
        f"Command: `python benchmarks/alignment_levers.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        "Phase 2 (fVLM) only, from scratch, each variant's test AUCs on the same test cases; the difference "
        f"of each mean AUC to `{reference}` with its paired bootstrap 95% CI; train_fit: zero-shot AUC on the "
        "variant's own training cases. Prompt style chosen on the validation split.\n\n"
        + metrics.markdown(table.select(cols))
        + "".join(f"\nOn the validation split of `{args.val_results}` (what a choice is made on; prompt style "
                  "chosen there; paired CI of the difference):\n\n" + metrics.markdown(table.select(c))
                  for c in decide)
        + "\nPer disease (test AUC):\n\n" + metrics.markdown(wide),
        encoding="utf-8")
    print(path.read_text(encoding="utf-8"))


def _split_ids(results: Path) -> dict[str, set[str]]:
    """The case ids of each split of a results folder (its qc/cases.parquet)."""
    path = results / "qc" / "cases.parquet"
    if not path.exists():
        raise SystemExit(f"{results} has no {path.relative_to(results)}: run the workflow there first")
    cases = pl.read_parquet(path, columns=["case_id", "split"])
    return {s: set(cases.filter(pl.col("split") == s)["case_id"]) for s in ("train", "val", "test")}


def _aucs(pred: pl.DataFrame) -> dict[str, float]:
    """AUC per disease over the evaluable rows of ``pred`` (both classes present)."""
    out = {}
    for (disease,), g in pred.filter(pl.col("evaluable")).group_by(["disease_id"], maintain_order=True):
        y = g["label"].to_numpy()
        if 0 < y.sum() < len(y):
            out[disease] = float(roc_auc_score(y, g["score"].to_numpy()))
    return out


def _local_ids(settings: dict) -> set[str]:
    return {d.id for d in catalog.diseases(settings["evaluate"]["catalog"]) if d.type == "local"}


if __name__ == "__main__":
    main()
