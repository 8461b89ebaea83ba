"""The closing lines of a workflow run (ctvlp.summary, printed by the Snakefile's onsuccess), read
from results folders the evaluation's own table writer made; no Snakemake needed."""

import polars as pl

from ctvlp.evaluation.metrics import METRICS, write_tables
from ctvlp.summary import run_summary
from ctvlp.workspace import write_parquet_atomic


def metric_table(aucs: dict[str, tuple[str, float]]) -> pl.DataFrame:
    """Per-disease rows as metrics_table returns them: {disease_id: (type, auc)}."""
    return pl.DataFrame([{"disease_id": d, "disease": d, "organ": "lung", "type": kind,
                          **{m: auc if m == "auc" else 0.5 for m in METRICS}, "auc_ci_low": auc - 0.1,
                          "auc_ci_high": auc + 0.05, "threshold": 0.5, "test_positives": 5, "test_evaluable": 20,
                          "test_not_evaluable": 0} for d, (kind, auc) in aucs.items()])


def results_folder(tmp_path, *, excluded=(("c1", "segment"), ("c2", "preprocess"), ("c2", "ingest"),
                                          ("c3", "ground_truth"))):
    results = tmp_path / "results"
    write_tables(metric_table({"a": ("local", 0.8), "b": ("local", 0.9), "c": ("diffuse", 0.6)}), results / "eval",
                 mean_ci=(0.71, 0.83))
    write_tables(metric_table({"a": ("local", 0.7), "c": ("diffuse", 0.5)}), results / "eval", stem="linear_probe",
                 mean_ci=(0.52, 0.68))
    write_parquet_atomic(pl.DataFrame({"case_id": [c for c, _ in excluded], "stage": [s for _, s in excluded],
                                       "reason": ["why"] * len(excluded)},
                                      schema={"case_id": pl.Utf8, "stage": pl.Utf8, "reason": pl.Utf8}),
                         results / "qc" / "excluded.parquet")
    write_parquet_atomic(pl.DataFrame({"case_id": ["c3", "c4", "c5"]}), results / "qc" / "cases.parquet")
    (results / "qc" / "summary.md").write_text("# QC summary\n")
    return results


def test_a_finished_run_names_its_result_exclusions_and_report(tmp_path):
    results = results_folder(tmp_path)
    lines = run_summary(results)
    text = "\n".join(lines)
    assert lines[0] == f"ctvlp: summary of {results}/"
    zeroshot = next(line for line in lines if "Zero-shot" in line)
    # the mean of 0.8, 0.9, 0.6 with the bootstrap CI of the mean; the local (0.85) and diffuse (0.6) means
    assert "mean AUC 0.767 (95% CI 0.710-0.830) over 3 diseases" in zeroshot
    assert "local 0.850, diffuse 0.600" in zeroshot and str(results / "eval" / "zeroshot.md") in zeroshot
    probe = next(line for line in lines if "Linear probe" in line)
    assert "mean AUC 0.600 (95% CI 0.520-0.680) over 2 diseases" in probe
    # c1 and c2 (twice) are excluded; c3's ground_truth note is on a kept case, not an exclusion
    excluded = next(line for line in lines if "Excluded cases" in line)
    assert excluded.startswith("  Excluded cases: 2 (3 kept); reasons in ")
    assert str(results / "qc" / "excluded.parquet") in excluded and str(results / "qc" / "summary.md") in excluded
    assert lines[-1] == f"  Report: make it with `snakemake --report {results / 'report.html'}`"
    assert "nan" not in text


def test_an_existing_report_is_named_with_the_command_that_updates_it(tmp_path):
    results = results_folder(tmp_path)
    (results / "report.html").write_text("<html></html>")
    lines = run_summary(results, configfile="study/config.yaml")
    assert lines[-1] == (f"  Report: {results / 'report.html'} (`snakemake --configfile study/config.yaml --report "
                         f"{results / 'report.html'}` brings it up to date)")


def test_a_run_without_evaluation_or_exclusions_says_only_what_it_has(tmp_path):
    results = results_folder(tmp_path, excluded=())
    for stem in ("zeroshot", "linear_probe"):
        (results / "eval" / f"{stem}.parquet").unlink()
    lines = run_summary(results)
    assert not any("AUC" in line for line in lines)
    assert "  Excluded cases: 0 (3 kept)" in lines  # no reasons to point at
    assert lines[-1].startswith("  Report: make it with `snakemake --report")


def test_an_empty_results_folder_gives_only_the_heading(tmp_path):
    assert run_summary(tmp_path / "results") == [f"ctvlp: summary of {tmp_path / 'results'}/"]


def test_a_mean_without_a_bootstrap_shows_no_interval(tmp_path):
    results = tmp_path / "results"
    write_tables(metric_table({"a": ("local", 0.8)}), results / "eval")  # evaluate.bootstrap: 0 -> NaN CI
    zeroshot = run_summary(results)[1]
    assert "mean AUC 0.800 over 1 disease; local 0.800  (" in zeroshot and "CI" not in zeroshot and "diffuse" not in zeroshot
