"""The evaluation rules' work: zero-shot tables, the linear probe, the figures and the ablation
table, each from the workflow's settings (sections evaluate, train, model, seed)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ..htmltable import write_html_table
from . import figures, metrics, probe, zeroshot
from .embed import crop_size

TITLES = {"zeroshot": "Zero-shot diagnosis, test split", "linear_probe": "Linear probe, test split"}


def html_tables(paths: dict[str, Path], stem: str, note: str = "") -> dict[str, Path]:
    """An HTML page beside each of ``metrics.write_tables``' CSV tables (the report shows HTML
    inline, a CSV only as a download): <stem>.html, <stem>_by_organ.html, <stem>_by_type.html."""
    title = TITLES.get(stem, stem)
    return {"html": write_html_table(paths["csv"], paths["csv"].with_suffix(".html"), title, note, "disease_id"),
            **{f"by_{by}_html": write_html_table(paths[f"by_{by}_csv"], paths[f"by_{by}_csv"].with_suffix(".html"),
                                                 f"{title}: mean per {by}")
               for by in ("organ", "type")}}


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
    return {**paths, **html_tables(paths, "zeroshot", note.replace("**", "")),
            "prompt_styles": out / "prompt_styles.csv"}


def linear_probe(settings: dict, model_dir, cases, reports, ground_truth, out_dir) -> dict[str, Path]:
    evaluate = settings["evaluate"]
    pred = probe.linear_probe(model_dir, cases, reports, ground_truth, evaluate["catalog"],
                              settings["train"]["device"], crop_size(settings), settings["seed"])
    paths = probe.write(pred, out_dir, evaluate["threshold"], evaluate["bootstrap"], settings["seed"])
    return {**paths, **html_tables(paths, "linear_probe")}


TRAIN_PHASES = ("visual_cl", "align", "normality", "boost")  # the full method's chain (common.smk CHAINS)


def make_figures(settings: dict, model_dir, predictions, cases, ground_truth, out_dir,
                 baseline_model_dir=None, n_cases: int = 100) -> dict[str, Path]:
    """The figures of ``figures.make_all``, with a training-curve figure per phase of the chain the
    model ends (each phase's metrics.csv in a sibling folder of ``model_dir``)."""
    training = {p: Path(model_dir).parent / p / "metrics.csv" for p in TRAIN_PHASES}
    return figures.make_all(model_dir, predictions, cases, ground_truth, out_dir,
                            settings["evaluate"]["catalog"], settings["train"]["device"],
                            baseline_model_dir=baseline_model_dir, n_cases=n_cases, crop_size=crop_size(settings),
                            seed=settings["seed"], training={p: f for p, f in training.items() if f.exists()})


def ablation(variants: dict[str, str], out, n_resamples: int = 1000, seed: int = 0) -> pl.DataFrame:
    """The ablation table from each variant's evaluation folder (zeroshot.csv, predictions.parquet)
    into ``out`` (.md, and .csv beside it), with paired bootstrap CIs of each difference to fVLM."""
    table = metrics.ablation_table(variants, n_resamples=n_resamples, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out.with_suffix(".csv"))
    out.write_text(metrics.markdown(table))
    write_html_table(table, out.with_suffix(".html"), "Ablation: mean zero-shot AUC per variant, test split")
    return table
