"""Tests of the rule-based report parser (ctvlp.reports) and the CT-RATE label benchmark.

Every example sentence here is written for these tests; none is taken from a real report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from ctvlp import catalog
from ctvlp.cohort import demo
from ctvlp.reports import rules
from ctvlp.reports import schema as report_schema
from ctvlp.reports.stage import write_reports

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "report_labels.py"
REAL_CSV = ROOT.parent / "shared" / "data" / "real_reports" / "ctrate_manual_labels_val200.csv"
# measured macro F1 of the rules backend on REAL_CSV (in-sample: the reports the lexicon was refined on):
# 0.9763 (rules-1 and rules-2); floor = measured - margin
MACRO_F1_FLOOR = 0.95

DEMO = catalog.diseases("demo")
CTRATE = catalog.diseases("ctrate")
N_ANATOMIES = len(catalog.anatomies())


def parse(text: str, diseases=DEMO) -> dict[str, dict]:
    rows = rules.parse_report(text, diseases)
    assert [r["anatomy"] for r in rows] == catalog.anatomy_names()
    return {r["anatomy"]: r for r in rows}


def status(text: str, diseases=DEMO) -> dict[str, str]:
    return {a: r["status"] for a, r in parse(text, diseases).items() if r["status"] != "not_mentioned"}


def findings(text: str, diseases=DEMO) -> dict[str, str]:
    return {f["disease_id"]: f["presence"] for r in parse(text, diseases).values() for f in r["findings"]}


# ----------------------------------------------------------------------------- negation


def test_negated_finding_leaves_organ_normal():
    rows = parse("No focal hepatic lesion.")
    assert rows["liver"]["status"] == "normal"
    assert rows["liver"]["text"] == "No focal hepatic lesion."
    assert rows["liver"]["findings"] == []
    assert rows["liver"]["error"] is None
    assert rows["spleen"]["status"] == "not_mentioned" and rows["spleen"]["text"] == ""


def test_negation_scope_ends_at_but():
    f = findings("No pleural effusion, but a 6 mm nodule in the right upper lobe.")
    assert f == {"pleural_effusion": "absent", "lung_nodule": "present"}
    assert status("No pleural effusion, but a 6 mm nodule in the right upper lobe.")["lung"] == "abnormal"


def test_post_negation_and_pseudo_negation():
    assert findings("Pericardial effusion was not observed.", CTRATE) == {"pericardial_effusion": "absent"}
    assert findings("Consolidation is not seen in either lung.", CTRATE) == {"consolidation": "absent"}
    # "no significant change" denies a change, not the nodule
    assert findings("No significant change in the size of the lung nodule.")["lung_nodule"] == "present"
    # a denial stops at a positive predicate that came before it
    f = findings("Bilateral bronchiectasis is seen, pleural effusion was not detected.", CTRATE)
    assert f == {"bronchiectasis": "present", "pleural_effusion": "absent"}


def test_all_negated_normal_report():
    st = status("The lungs are clear. No pleural effusion. Heart size is normal. No cardiomegaly. "
                "The kidneys are unremarkable without hydronephrosis.")
    assert st == {"lung": "normal", "heart": "normal", "kidney": "normal"}


def test_negation_scope_ends_at_a_new_finding():
    # "and" / a comma before a verb that brings a finding ends the denial
    assert status("The liver is not enlarged and contains a cyst.") == {"liver": "abnormal"}
    f = findings("The heart is not enlarged and shows a pericardial effusion.", CTRATE)
    assert f == {"cardiomegaly": "absent", "pericardial_effusion": "present"}
    assert findings("The kidneys are not enlarged, with a 2 cm renal cyst.") == {"kidney_cyst": "present"}
    assert findings("Without pleural effusion; a nodule is seen in the right lung.") == {
        "pleural_effusion": "absent", "lung_nodule": "present"}
    # a negated list still denies every item
    assert findings("No pleural effusion, pneumothorax or lung nodule.") == {
        "pleural_effusion": "absent", "lung_nodule": "absent"}
    assert status("No cyst and no mass in the liver.") == {"liver": "normal"}


def test_denied_normal_cue_is_abnormal():
    assert status("The liver is not normal in size and contains a large cyst.") == {"liver": "abnormal"}
    assert status("The liver is not normal in size.") == {"liver": "abnormal"}
    assert status("The thyroid gland is not within normal limits.") == {"thyroid_gland": "abnormal"}
    assert status("The liver is normal in size.") == {"liver": "normal"}


# ----------------------------------------------------------------------------- abnormal unless stated normal

# finding words that no catalog and no generic term knows
UNSEEN_FINDINGS = [
    ("The liver contains a 3 cm hemangioma.", "liver"),
    ("A splenic infarct is seen.", "spleen"),
    ("Renal angiomyolipoma on the left.", "kidney"),
    ("Liver cirrhosis.", "liver"),
    ("Adrenal adenoma on the right.", "adrenal_gland"),
    ("Gallbladder polyp.", "gallbladder"),
    ("Aortic dissection.", "aorta"),
    ("Schmorl nodes in the lumbar spine.", "lumbar_spine"),
    ("Multinodular goiter of the thyroid.", "thyroid_gland"),
    ("The esophagus is patulous.", "esophagus"),
    ("The gallbladder wall is thick.", "gallbladder"),
    ("The kidneys are small.", "kidney"),
    ("Liver: 2 cm hemangioma, otherwise normal.", "liver"),
    ("The spleen is normal in size and contains a granuloma.", "spleen"),
]


@pytest.mark.parametrize("catalog_name", ["demo", "ctrate", "abdomen"])
@pytest.mark.parametrize("text,anatomy", UNSEEN_FINDINGS)
def test_unseen_finding_makes_anatomy_abnormal(text, anatomy, catalog_name):
    rows = parse(text, catalog.diseases(catalog_name))
    assert rows[anatomy]["status"] == "abnormal", (text, catalog_name)
    assert rows[anatomy]["text"] == text
    assert {a for a, r in rows.items() if r["status"] == "abnormal"} == {anatomy}
    if catalog_name == "ctrate":  # a chest catalog: none of these is a catalog finding there
        assert rows[anatomy]["findings"] == []


@pytest.mark.parametrize("text,anatomy", [
    ("A thyroid nodule of 12 mm.", "thyroid_gland"),
    ("The main pancreatic duct is dilated.", "pancreas"),
    ("Cholelithiasis.", "gallbladder"),
])
def test_generic_finding_words_make_anatomy_abnormal(text, anatomy):
    assert status(text, CTRATE) == {anatomy: "abnormal"}


def test_unexplained_finding_is_filed_under_its_own_clause():
    st = status("The liver contains a hemangioma and the spleen is normal.")
    assert st == {"liver": "abnormal", "spleen": "normal"}
    st = status("Hemangiomas in the liver and spleen are seen.")
    assert st == {"liver": "abnormal", "spleen": "abnormal"}
    # a normal subject joined by "and" is covered; the object of a verb is not
    assert status("Periportal structures and the liver are normal.") == {"liver": "normal"}


# stated normal, negated, or neutral (technique, comparison, measurement): never abnormal
NORMAL_OR_NEUTRAL = [
    ("The liver is normal.", "liver"),
    ("The liver and spleen are unremarkable.", "spleen"),
    ("No focal liver lesion.", "liver"),
    ("The pancreas is within normal limits.", "pancreas"),
    ("The portal vein is patent.", "portal_vein"),
    ("A mass was not observed in the spleen.", "spleen"),
    ("No pathological finding in the kidneys.", "kidney"),
    ("Adrenal glands are normal in size and shape.", "adrenal_gland"),
    ("The thyroid gland has a normal appearance.", "thyroid_gland"),
    ("Normal appearance of the pancreas.", "pancreas"),
    ("The kidneys are of normal size and show symmetric enhancement.", "kidney"),
    ("The trachea and main bronchi are patent.", "trachea"),
    ("The urinary bladder is well distended.", "urinary_bladder"),
    ("The vertebral bodies have preserved heights.", "lumbar_spine"),
    ("The liver shows homogeneous attenuation.", "liver"),
    ("Hilar structures and the mediastinum are normal, the aorta is unremarkable.", "aorta"),
    # words the neutral lists do not know, covered by the normal statement
    ("Hepatic vasculature is normal.", "liver"),
    ("The kidneys show normal corticomedullary differentiation.", "kidney"),
    ("Periportal vasculature and the liver are unremarkable.", "liver"),
    ("The liver was evaluated.", "liver"),
    ("The study area includes the upper abdomen with the liver.", "liver"),
    ("The liver is partially included in the study area.", "liver"),
    ("Compared with the previous CT, the liver is unchanged.", "liver"),
    ("The spleen measures 11 cm.", "spleen"),
    ("As far as can be evaluated within the limits of the non-contrast examination, the spleen is natural.",
     "spleen"),
]


@pytest.mark.parametrize("text,anatomy", NORMAL_OR_NEUTRAL)
def test_normal_and_neutral_sentences_stay_normal(text, anatomy):
    rows = parse(text)
    assert rows[anatomy]["status"] == "normal", text
    assert "abnormal" not in {r["status"] for r in rows.values()}, text


# ----------------------------------------------------------------------------- look-alike letters


def test_cyrillic_and_greek_lookalikes_are_read_as_latin():
    cyr_o, cyr_c, greek_o = "\u043e", "\u0441", "\u03bf"
    assert findings(f"Hepatic steat{cyr_o}sis.") == {"fatty_liver": "present"}
    assert findings(f"A renal {cyr_c}yst.") == {"kidney_cyst": "present"}
    assert findings("A RENAL \u0421YST.") == {"kidney_cyst": "present"}  # upper-case Cyrillic Es
    assert findings(f"N{cyr_o} pleural effusion.") == {"pleural_effusion": "absent"}
    assert status(f"The liver is n{greek_o}rmal.") == {"liver": "normal"}
    assert status(f"The liver contains a {cyr_c}yst.") == {"liver": "abnormal"}


def test_unconfuse_keeps_positions_and_other_scripts():
    from ctvlp.reports.lexicon import norm, unconfuse

    text = "A \u0441yst, \u0441\u0443\u0455t and \u043f\u0435\u0447\u0435\u043d\u044c."
    out = unconfuse(text)
    assert out == "A cyst, cyst and \u043f\u0435\u0447\u0435\u043d\u044c."
    assert len(norm(text)) == len(text)


def test_report_in_lookalike_letters_is_still_english():
    swap = str.maketrans({"e": "\u0435", "o": "\u043e", "a": "\u0430", "c": "\u0441", "p": "\u0440"})
    text = "The liver contains a large hemangioma. The spleen is normal. Both lungs are clear.".translate(swap)
    assert status(text) == {"liver": "abnormal", "spleen": "normal", "lung": "normal"}


def test_russian_report_is_not_english():
    text = ("\u041f\u0435\u0447\u0435\u043d\u044c \u043d\u0435 \u0443\u0432\u0435\u043b\u0438\u0447\u0435"
            "\u043d\u0430. \u041f\u043e\u0447\u043a\u0438 \u0432 \u043d\u043e\u0440\u043c\u0435. "
            "\u041b\u0435\u0433\u043a\u0438\u0435 \u0431\u0435\u0437 \u043e\u0447\u0430\u0433\u043e"
            "\u0432\u044b\u0445 \u0438\u0437\u043c\u0435\u043d\u0435\u043d\u0438\u0439.")
    rows = rules.parse_report(text, DEMO)
    assert {r["error"] for r in rows} == {"report does not look like English"}


# ----------------------------------------------------------------------------- synonyms


def test_anatomy_synonyms():
    assert status("The renal cortex is of normal thickness.") == {"kidney": "normal"}
    assert status("Cardiac size is within normal limits.") == {"heart": "normal"}
    assert status("Mild splenic enlargement.") == {"spleen": "abnormal"}


def test_disease_synonym_assigns_sentence_to_anatomy():
    rows = parse("Hepatic steatosis.")
    assert rows["liver"]["status"] == "abnormal"
    assert rows["liver"]["findings"] == [{"disease_id": "fatty_liver", "presence": "present"}]
    # without any liver word, the disease still files the sentence under the liver
    rows = parse("Diffuse steatosis is noted.")
    assert rows["liver"]["text"] == "Diffuse steatosis is noted."
    assert rows["liver"]["status"] == "abnormal"


def test_plural_forms_match():
    assert findings("Bilateral pleural effusions.") == {"pleural_effusion": "present"}
    assert findings("Two nodular opacities in the left lung.") == {"lung_nodule": "present"}
    assert status("Both lungs are clear.") == {"lung": "normal"}


def test_located_disease_in_another_organ_is_not_counted():
    # a nodule of the adrenal gland is no lung nodule
    rows = parse("A 12 mm nodule is seen in the left adrenal gland.", CTRATE)
    assert rows["adrenal_gland"]["status"] == "abnormal"
    assert rows["lung"]["status"] == "not_mentioned"
    assert findings("A 12 mm nodule is seen in the left adrenal gland.", CTRATE) == {}
    # an anatomy-agnostic finding (lymph nodes) counts wherever it is
    assert findings("Enlarged lymph nodes in the right inguinal region.", CTRATE) == {"lymphadenopathy": "present"}


def test_weak_anatomy_words():
    # "segment" alone points to the liver, a lung segment name does not
    assert status("A hypodense lesion in segment 7.") == {"liver": "abnormal"}
    assert status("Atelectasis in the posterobasal segment of the right lower lobe.") == {"lung": "abnormal"}


def test_ctrate_pattern_language():
    assert findings("Heart size is increased.", CTRATE) == {"cardiomegaly": "present"}
    assert findings("Heart size is not increased.", CTRATE) == {"cardiomegaly": "absent"}
    # context: calcification with an aortic site vs a coronary site
    f = findings("Calcified atherosclerotic plaques are seen in the aortic arch and coronary arteries.", CTRATE)
    assert f == {"arterial_wall_calcification": "present", "coronary_artery_wall_calcification": "present"}
    f = findings("Calcified plaques in the coronary arteries.", CTRATE)
    assert f == {"coronary_artery_wall_calcification": "present"}
    # forbidden context: a density increase qualified as a sequela is no opacity
    f = findings("Linear density increases in the left lower lobe compatible with fibrotic sequelae.", CTRATE)
    assert f == {"pulmonary_fibrotic_sequela": "present"}
    # exclusion
    assert findings("Subcutaneous emphysema along the chest wall.", CTRATE) == {}


# ----------------------------------------------------------------------------- uncertainty


def test_uncertainty_cues():
    rows = parse("Possible small left pleural effusion.")
    assert rows["lung"]["findings"] == [{"disease_id": "pleural_effusion", "presence": "uncertain"}]
    assert rows["lung"]["status"] == "abnormal"  # only completely healthy organs are normal
    assert findings("A renal cyst cannot be excluded.") == {"kidney_cyst": "uncertain"}
    assert findings("Small hypodense lesion in the right kidney (renal cyst?).") == {"kidney_cyst": "uncertain"}
    # committed wording stays present
    assert findings("Findings are consistent with hepatic steatosis.") == {"fatty_liver": "present"}
    # negation wins over uncertainty
    assert findings("No suspicious pulmonary nodule.") == {"lung_nodule": "absent"}


# ----------------------------------------------------------------------------- multi-anatomy


def test_sentence_with_several_anatomies():
    rows = parse("The liver and spleen are unremarkable.")
    assert rows["liver"]["status"] == rows["spleen"]["status"] == "normal"
    assert rows["liver"]["text"] == rows["spleen"]["text"] == "The liver and spleen are unremarkable."
    st = status("The liver is normal, with a 2 cm cyst in the right kidney.")
    assert st == {"liver": "normal", "kidney": "abnormal"}
    st = status("Calcified plaques in the aorta and coronary arteries.", CTRATE)
    assert st == {"aorta": "abnormal", "heart": "abnormal"}


def test_pronoun_sentence_follows_previous_anatomy():
    st = status("The ascending aorta measures 45 mm. It is wider than normal.")
    assert st == {"aorta": "abnormal"}


# ----------------------------------------------------------------------------- sentences


def test_sentence_split_keeps_decimals_dates_and_abbreviations():
    text = ("Compared with the study of 03.02.2020. A 2.5 cm mass in the liver, approx. 3 cm from the dome. "
            "Spleen 11.2 cm, e.g. normal. Lesion no. 4 is stable.")
    assert rules.split_sentences(text) == [
        "Compared with the study of 03.02.2020.",
        "A 2.5 cm mass in the liver, approx. 3 cm from the dome.",
        "Spleen 11.2 cm, e.g. normal.",
        "Lesion no. 4 is stable.",
    ]
    # units and "etc." end a sentence before a capital
    assert rules.split_sentences("A nodule of 5 mm. The liver is normal. Cysts, stones etc. No mass.") == [
        "A nodule of 5 mm.", "The liver is normal.", "Cysts, stones etc.", "No mass.",
    ]


def test_impression_after_quote_separator():
    # CT-RATE appends the impression after a quote ("" in the raw CSV)
    for sep in ('"', '""', ' " ', '. "'):
        text = f"The liver is unremarkable{sep}Mild cardiomegaly"
        sents = rules.split_sentences(text)
        assert len(sents) == 2, (sep, sents)
        assert sents[1] == "Mild cardiomegaly"
        assert '"' not in " ".join(sents)
        st = status(text)
        assert st == {"liver": "normal", "heart": "abnormal"}
    # a quoted term inside a sentence does not split it
    assert len(rules.split_sentences('The so called "tree in bud" pattern in the left lung.')) == 1


def test_line_breaks_and_numbered_impression():
    text = "FINDINGS:\nThe lungs are clear.\n\nIMPRESSION:\n1. Renal calculus.\n2. Gallstones."
    st = status(text)
    assert st == {"lung": "normal", "kidney": "abnormal", "gallbladder": "abnormal"}


def test_report_with_only_impression():
    rows = parse('" Small sliding hiatal hernia. Bilateral pleural effusion."', CTRATE)
    assert rows["esophagus"]["status"] == "abnormal"
    assert rows["esophagus"]["findings"] == [{"disease_id": "hiatal_hernia", "presence": "present"}]
    assert rows["lung"]["status"] == "abnormal"


# ----------------------------------------------------------------------------- errors and edge cases


@pytest.mark.parametrize("text", ["", "   ", "\n\t", None])
def test_empty_report(text):
    rows = rules.parse_report(text, DEMO)
    assert len(rows) == N_ANATOMIES
    assert {r["status"] for r in rows} == {"not_mentioned"}
    assert {r["error"] for r in rows} == {"empty report"}
    assert {r["text"] for r in rows} == {""}


def test_report_without_anatomy():
    rows = rules.parse_report("Comparison was made with the prior examination from last spring.", DEMO)
    assert {r["status"] for r in rows} == {"not_mentioned"}
    assert {r["error"] for r in rows} == {"no anatomy mentioned"}


@pytest.mark.parametrize(
    "text",
    [
        ("Die Leber ist unauffällig. Die Aorta ist normal kalibriert. Kein Pleuraerguss, keine "
         "Lymphadenopathie. Das Herz ist nicht vergrößert."),
        ("Karaciğer boyutu normal sınırlardadır. Aorta çapı normal olarak izlendi. Her iki akciğerde "
         "nodül saptanmadı. Kalp boyutları doğaldır."),
    ],
)
def test_non_english_report_is_not_called_normal(text):
    rows = rules.parse_report(text, DEMO)
    assert {r["status"] for r in rows} == {"not_mentioned"}
    errors = {r["error"] for r in rows}
    assert len(errors) == 1 and errors.pop() == "report does not look like English"


def test_long_report():
    filler = ("The trachea and both main bronchi are patent. The thoracic aorta has a normal calibre. "
              "No pleural or pericardial effusion. ")
    text = filler * 80 + "A 9 mm nodule in the right middle lobe. Mild hepatic steatosis."
    assert len(text) > 8000
    t0 = time.perf_counter()
    rows = parse(text)
    assert time.perf_counter() - t0 < 2.0
    assert rows["lung"]["status"] == "abnormal" and rows["liver"]["status"] == "abnormal"
    assert rows["trachea"]["status"] == "normal" and rows["aorta"]["status"] == "normal"
    # repeated sentences are kept once per anatomy
    assert rows["trachea"]["text"] == "The trachea and both main bronchi are patent."
    f = {x["disease_id"]: x["presence"] for x in rows["lung"]["findings"]}
    assert f == {"pleural_effusion": "absent", "lung_nodule": "present"}


def test_deterministic():
    text = "Possible small left pleural effusion. Hepatic steatosis. Heart size is normal."
    assert rules.parse_report(text, DEMO) == rules.parse_report(text, DEMO)


# ----------------------------------------------------------------------------- data frames


def _cases() -> pl.DataFrame:
    return pl.DataFrame({
        "case_id": [101, 102, 103],
        "report_text": ["Hepatic steatosis. The lungs are clear.", "", "Bilateral pleural effusions."],
        "split": ["train", "val", "test"],
    })


def test_parse_reports_schema_and_rows():
    df = rules.parse_reports(_cases(), "demo")
    assert df.schema == pl.Schema(report_schema.REPORT_SCHEMA)
    assert df.columns == list(report_schema.REPORT_SCHEMA)
    assert df.height == 3 * N_ANATOMIES
    assert df.select("case_id", "anatomy").is_unique().all()
    assert df.group_by("case_id").len()["len"].to_list() == [N_ANATOMIES] * 3
    assert set(df["case_id"]) == {"101", "102", "103"}
    assert set(df["status"]) <= set(report_schema.STATUSES) - {"unparsed"}
    assert set(df["backend"]) == {"rules"} and set(df["model"]) == {"rules"}
    assert set(df["prompt_version"]) == {rules.PARSER_VERSION}
    assert set(df.filter(pl.col("case_id") == "102")["error"]) == {"empty report"}
    assert df.filter(pl.col("case_id") != "102")["error"].null_count() == 2 * N_ANATOMIES
    liver = df.filter((pl.col("case_id") == "101") & (pl.col("anatomy") == "liver")).row(0, named=True)
    assert liver["status"] == "abnormal"
    assert liver["findings"] == [{"disease_id": "fatty_liver", "presence": "present"}]
    presences = df.explode("findings").drop_nulls("findings").unnest("findings")["presence"]
    assert set(presences) <= set(report_schema.PRESENCES)


def test_parse_reports_needs_columns():
    with pytest.raises(ValueError, match="report_text"):
        rules.parse_reports(pl.DataFrame({"case_id": ["a"]}), "demo")


def test_write_reports_roundtrip(tmp_path):
    manifest = tmp_path / "manifest.parquet"
    _cases().write_parquet(manifest)
    out = tmp_path / "sub" / "reports.parquet"
    write_reports(manifest, out, {"backend": "rules", "catalog": "ctrate"})
    df = pl.read_parquet(out)
    assert df.schema == pl.Schema(report_schema.REPORT_SCHEMA)
    assert df.height == 3 * N_ANATOMIES
    lung = df.filter((pl.col("case_id") == "103") & (pl.col("anatomy") == "lung")).row(0, named=True)
    assert lung["findings"] == [{"disease_id": "pleural_effusion", "presence": "present"}]


# ----------------------------------------------------------------------------- CT-RATE catalog

CTRATE_COLUMNS = [
    ("medical_material", "Medical material"), ("arterial_wall_calcification", "Arterial wall calcification"),
    ("cardiomegaly", "Cardiomegaly"), ("pericardial_effusion", "Pericardial effusion"),
    ("coronary_artery_wall_calcification", "Coronary artery wall calcification"),
    ("hiatal_hernia", "Hiatal hernia"), ("lymphadenopathy", "Lymphadenopathy"), ("emphysema", "Emphysema"),
    ("atelectasis", "Atelectasis"), ("lung_nodule", "Lung nodule"), ("lung_opacity", "Lung opacity"),
    ("pulmonary_fibrotic_sequela", "Pulmonary fibrotic sequela"), ("pleural_effusion", "Pleural effusion"),
    ("mosaic_attenuation_pattern", "Mosaic attenuation pattern"),
    ("peribronchial_thickening", "Peribronchial thickening"), ("consolidation", "Consolidation"),
    ("bronchiectasis", "Bronchiectasis"), ("interlobular_septal_thickening", "Interlobular septal thickening"),
]


def test_ctrate_catalog_ids_names_anatomies():
    assert [(d.id, d.name) for d in CTRATE] == CTRATE_COLUMNS
    anat = {d.id: d.anatomy for d in CTRATE}
    assert anat["arterial_wall_calcification"] == "aorta"
    assert anat["hiatal_hernia"] == "esophagus"
    assert {anat[i] for i in ("cardiomegaly", "pericardial_effusion", "coronary_artery_wall_calcification",
                              "medical_material")} == {"heart"}
    assert anat["lymphadenopathy"] == "lung"
    assert {d.id for d in CTRATE if not d.zero_shot} == {"medical_material", "lymphadenopathy"}
    for d in CTRATE:
        assert len(d.synonyms) >= 3, d.id
        assert any(d.name.lower() in p.lower() for p in d.positive_prompts), d.id


# ----------------------------------------------------------------------------- benchmark

HEADER = ["AccessionNo", "report_text"] + [name for _, name in CTRATE_COLUMNS]


def _run_benchmark(csv: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARK), "--csv", str(csv), *extra],
                          capture_output=True, text=True, encoding="utf-8", timeout=600, check=True,
                          env={**os.environ, "PYTHONUTF8": "1"})  # its tables are drawn with box characters


def test_benchmark_on_handwritten_csv(tmp_path):
    rows = [
        ("a1", "Mild cardiomegaly. No pleural effusion. Small sliding hiatal hernia.",
         {"Cardiomegaly", "Hiatal hernia"}),
        ("a2", "Bilateral pleural effusion with adjacent atelectasis. A pacemaker is in place.",
         {"Pleural effusion", "Atelectasis", "Medical material"}),
        ("a3", "The lungs are clear. Heart size is normal.", set()),
    ]
    df = pl.DataFrame([{"AccessionNo": a, "report_text": t, **{n: int(n in pos) for n in HEADER[2:]}}
                       for a, t, pos in rows])
    csv = tmp_path / "labels.csv"
    df.write_csv(csv)
    out = tmp_path / "out"
    res = _run_benchmark(csv, "--out", str(out))
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"macro_f1=(\d\.\d{4})", last)
    assert m, last
    table = pl.read_csv(out / "report_labels.csv")
    assert table["label"].to_list() == HEADER[2:]
    f1 = dict(zip(table["label"], table["f1"]))
    assert f1["Cardiomegaly"] == f1["Pleural effusion"] == f1["Medical material"] == 1.0
    md = (out / "report_labels.md").read_text(encoding="utf-8")
    import platform

    assert platform.node() in md and "macro F1" in md
    assert (out / "report_labels_predictions.csv").is_file()


def test_rules_f1_regression_guard_on_development_reports():
    """Regression guard, not an accuracy claim: the rules parser's macro F1 on the 200 real CT-RATE
    reports its lexicon was refined on (in-sample) must not fall below MACRO_F1_FLOOR. A change to
    the rules that loses ground on these reports fails here; F1 on unseen reports is not measured
    (there is no held-out set)."""
    if not REAL_CSV.is_file():
        pytest.skip(f"CT-RATE manual label CSV not found at {REAL_CSV}")
    res = _run_benchmark(REAL_CSV)
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"macro_f1=(\d\.\d{4})", last)
    assert m, f"last line is not macro_f1=<value>: {last!r}"
    assert float(m.group(1)) >= MACRO_F1_FLOOR, res.stdout


# ----------------------------------------------------------------------------- demo cohort


def test_demo_reports_status_matches_ground_truth():
    by_anatomy: dict[str, list[str]] = {}
    for d in DEMO:
        by_anatomy.setdefault(d.anatomy, []).append(d.id)
    checked = 0
    for i in range(4):
        case = demo.generate_case(i, 0)
        rows = parse(case.report)
        for anatomy, ids in by_anatomy.items():
            truth = "abnormal" if any(case.labels[d] for d in ids) else "normal"
            got = rows[anatomy]["status"]
            if truth == "abnormal":
                assert got == "abnormal", (i, anatomy, rows[anatomy]["text"])
            else:
                assert got in ("normal", "not_mentioned"), (i, anatomy, rows[anatomy]["text"])
            checked += 1
        present = {f["disease_id"] for r in rows.values() for f in r["findings"] if f["presence"] == "present"}
        assert present == {d for d, v in case.labels.items() if v}, (i, case.report)
    assert checked == 4 * len(by_anatomy)
