"""The evaluation rules' work: zero-shot tables, the linear probe, the figures and the ablation
table, each from the workflow's settings (sections evaluate, train, model, seed)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from . import figures, metrics, probe, zeroshot
from .embed import crop_size


def evaluate_zeroshot(settings: dict, model_dir, cases, ground_truth, out_dir) -> dict[str, Path]:
    """predictions.parquet and the zero-shot tables (zeroshot.{md,csv,parquet}, by organ and type).
    ``cases``: qc/cases.parquet (as for every function here)."""
    evaluate = settings["evaluate"]
    pred, styles = zeroshot.predict(model_dir, cases, ground_truth, evaluate["catalog"], settings["train"]["device"],
                                    crop_size(settings), evaluate["prompt_style"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred.write_parquet(out / "predictions.parquet")
    styles.write_csv(out / "prompt_styles.csv")
    style = styles.filter(pl.col("chosen"))["style"][0]
    how = "chosen on the validation split" if evaluate["prompt_style"] == "auto" else "set by evaluate.prompt_style"
    note = (f"Prompt style: **{style}** ({how}; mean validation AUC per style: "
            + ", ".join(f"{r['style']} {r['val_mean_auc']:.3f}" for r in styles.iter_rows(named=True)) + ").")
    table, mean_ci = metrics.metrics_table(pred, evaluate["threshold"], evaluate["bootstrap"], settings["seed"])
    paths = metrics.write_tables(table.with_columns(pl.lit(style).alias("prompt_style")), out, mean_ci=mean_ci,
                                 note=note)
    return {**paths, "prompt_styles": out / "prompt_styles.csv"}


def linear_probe(settings: dict, model_dir, cases, reports, ground_truth, out_dir) -> dict[str, Path]:
    evaluate = settings["evaluate"]
    pred = probe.linear_probe(model_dir, cases, reports, ground_truth, evaluate["catalog"],
                              settings["train"]["device"], crop_size(settings), settings["seed"])
    return probe.write(pred, out_dir, evaluate["threshold"], evaluate["bootstrap"], settings["seed"])


def make_figures(settings: dict, model_dir, predictions, cases, ground_truth, out_dir,
                 baseline_model_dir=None, n_cases: int = 100) -> dict[str, Path]:
    return figures.make_all(model_dir, predictions, cases, ground_truth, out_dir,
                            settings["evaluate"]["catalog"], settings["train"]["device"],
                            baseline_model_dir=baseline_model_dir, n_cases=n_cases, crop_size=crop_size(settings),
                            seed=settings["seed"])


def ablation(variants: dict[str, str], out, n_resamples: int = 1000, seed: int = 0) -> pl.DataFrame:
    """The ablation table from each variant's evaluation folder (zeroshot.csv, predictions.parquet)
    into ``out`` (.md, and .csv beside it), with paired bootstrap CIs of each difference to fVLM."""
    table = metrics.ablation_table(variants, n_resamples=n_resamples, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out.with_suffix(".csv"))
    out.write_text(metrics.markdown(table))
    return table
