"""The data QC summary as an HTML page of sortable tables (shown inline in Snakemake's report):
it holds the numbers of the qc tables - the counts, each exclusion with its case and reason, the
exclusions per stage and reason, the HU decisions and warnings of the kept cases."""

import html
import json

import polars as pl
import pytest

from ctvlp.cohort.schema import EXCLUSIONS_SCHEMA
from ctvlp.imaging import qc
from ctvlp.imaging.exclusion import write_exclusion
from htmlpage import tables

META = {"source_path": "x.nii.gz", "hu_slope": 1.0, "hu_intercept": 0.0, "original_size": [64, 64, 40],
        "original_spacing": [1.0, 1.0, 2.5], "size": [8, 8, 10], "spacing": [8.0, 8.0, 8.0],
        "hu_stats": {"p1": -1000.0, "p50": 30.0, "p99": 900.0}, "anatomy_voxels": {"lung": 10}}
HOSTILE = 'ev<il>"&\x07id'


@pytest.fixture
def collected(tmp_path):
    """qc.collect over a cohort of seven: three kept (one with an HU warning, one rescaled), two
    stopped at segmentation for the same reason, one at preprocessing, one dropped at ingest, and
    a label note (stage ground_truth) on a kept case."""
    kept = {"k1": ("values already HU (air present)", []),
            "k2": ("values already HU (air present)", ["no air in the field of view (1st percentile -200 HU)"]),
            "k3": ("manifest rescale applied: HU = 1.0 * value + -1024.0", [])}
    stopped = {"s1": ("segment", "too few slices (3 < 16)"), HOSTILE: ("segment", "too few slices (3 < 16)"),
               "p1": ("preprocess", "values do not look like CT HU <odd> & worse")}
    pl.DataFrame({"case_id": [*kept, *stopped]}).write_parquet(tmp_path / "manifest.parquet")
    pl.DataFrame([{"case_id": "i1", "stage": "ingest", "reason": "empty report"},
                  {"case_id": "k1", "stage": "ground_truth", "reason": "no row in the labels table"}],
                 schema=EXCLUSIONS_SCHEMA).write_parquet(tmp_path / "exclusions.parquet")
    for cid, (decision, warnings) in kept.items():
        (tmp_path / "pre" / cid).mkdir(parents=True)
        (tmp_path / "pre" / cid / "meta.json").write_text(json.dumps(
            {**META, "case_id": cid, "hu_decision": decision, "warnings": warnings}))
    for cid, (stage, reason) in stopped.items():
        write_exclusion(tmp_path / ("seg" if stage == "segment" else "pre") / cid, cid, stage, reason)
    (tmp_path / "seg").mkdir(exist_ok=True)
    out = qc.collect(tmp_path / "manifest.parquet", tmp_path / "exclusions.parquet", tmp_path / "seg",
                     tmp_path / "pre", tmp_path / "qc")
    assert out == {"kept": 3, "excluded": 4}
    return tmp_path / "qc"


def test_qc_summary_html_holds_the_qc_tables_numbers(collected):
    page = (collected / "summary.html").read_text(encoding="utf-8")
    t = tables(page)
    assert list(t) == ["Counts", "Exclusions per stage and reason", "Excluded cases", "Kept cases per HU decision",
                       "Kept cases with HU warnings"]
    assert page.count('class="sortable"') == 5 and 'addEventListener("click"' in page and "src=" not in page
    # the counts, as summary.md states them
    counts = dict(t["Counts"][1])
    assert counts == {"cases in the manifest": "6", "cases processed and kept": "3", "exclusions recorded": "4",
                      "kept cases with missing or incomplete labels (stage ground_truth)": "1",
                      "kept cases with HU warnings": "1"}
    md = (collected / "summary.md").read_text(encoding="utf-8")
    assert all(f"- {check}: {n}\n" in md for check, n in counts.items())
    assert '<td class="num" data-v="4">4</td>' in page  # a count is a number, sorted as one
    # every row of excluded.parquet, with its case and reason (a hostile id shown escaped, not raw)
    excluded = pl.read_parquet(collected / "excluded.parquet")
    assert len(excluded) == 5
    header, rows = t["Excluded cases"]
    assert header == ["case_id", "stage", "reason"]
    shown = [[ascii(c)[1:-1] if c == HOSTILE else c, s, r] for c, s, r in excluded.iter_rows()]
    assert sorted(rows) == sorted(shown)
    assert html.escape("ev<il>") in page and "ev<il>" not in page and "\x07" not in page
    assert "values do not look like CT HU &lt;odd&gt; &amp; worse" in page
    # exclusions per stage and reason: the two identical segmentation reasons counted together, first
    assert t["Exclusions per stage and reason"][1] == [
        ["segment", "too few slices (3 < 16)", "2"], ["ground_truth", "no row in the labels table", "1"],
        ["ingest", "empty report", "1"], ["preprocess", "values do not look like CT HU <odd> & worse", "1"]]
    # per-case checks of the kept cases: HU decisions counted, the warned case listed with its warning
    assert sorted(t["Kept cases per HU decision"][1]) == [
        ["manifest rescale applied: HU = 1.0 * value + -1024.0", "1"], ["values already HU (air present)", "2"]]
    assert t["Kept cases with HU warnings"][1] == [
        ["k2", "values already HU (air present)", "no air in the field of view (1st percentile -200 HU)"]]


def test_qc_summary_html_without_exclusions_says_so(tmp_path):
    pl.DataFrame({"case_id": ["k1"]}).write_parquet(tmp_path / "manifest.parquet")
    (tmp_path / "pre/k1").mkdir(parents=True)
    (tmp_path / "pre/k1/meta.json").write_text(json.dumps(
        {**META, "case_id": "k1", "hu_decision": "values already HU (air present)", "warnings": []}))
    qc.collect(tmp_path / "manifest.parquet", None, tmp_path / "seg", tmp_path / "pre", tmp_path / "qc")
    page = (tmp_path / "qc/summary.html").read_text(encoding="utf-8")
    t = tables(page)
    assert dict(t["Counts"][1]) == {"cases in the manifest": "1", "cases processed and kept": "1",
                                    "exclusions recorded": "0", "kept cases with HU warnings": "0"}
    assert t["Excluded cases"][1] == [] and "No case was excluded." in page
    assert t["Kept cases with HU warnings"][1] == [] and "No kept case has an HU warning." in page
