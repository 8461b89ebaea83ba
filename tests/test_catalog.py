"""Tests of the package catalogs: anatomies, TotalSegmentator class ids, disease catalogs."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from ctvlp import catalog

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LABEL_MAP_JSON = SHARED / "data" / "real_ct" / "totalsegmentator" / "label_map_total.json"
PAPER = SHARED / "papers" / "visd-boost-cvpr2025.txt"

# The paper's 15 abdominal organs (display name -> catalog anatomy) and diseases per organ (Table 10).
ORGAN_ANATOMY = {
    "adrenal gland": "adrenal_gland",
    "bladder": "urinary_bladder",
    "colon": "colon",
    "esophagus": "esophagus",
    "gallbladder": "gallbladder",
    "heart": "heart",
    "kidney": "kidney",
    "liver": "liver",
    "lung": "lung",
    "pancreas": "pancreas",
    "portal vein": "portal_vein",
    "small intestine": "small_intestine",
    "spleen": "spleen",
    "stomach": "stomach",
    "sacrum": "sacrum",
}
ORGAN_COUNTS = {
    "adrenal gland": 2,
    "bladder": 2,
    "colon": 8,
    "esophagus": 2,
    "gallbladder": 3,
    "heart": 2,
    "kidney": 4,
    "liver": 8,
    "lung": 5,
    "pancreas": 5,
    "portal vein": 2,
    "small intestine": 5,
    "spleen": 3,
    "stomach": 2,
    "sacrum": 1,
}

# Table 9 of the paper, disease as the paper writes it -> our id.
TABLE9_LOCAL = {
    "kidney cyst": "kidney_cyst",
    "kidney stone": "renal_calculus",
    "adrenal gland nodule": "adrenal_nodule",
    "stomach cancer": "gastric_cancer",
    "gallstone": "gallstone",
    "pancreatic cancer": "pancreatic_cancer",
    "small intestine diverticulum": "small_intestine_diverticulum",
    "small intestine intussusception": "intussusception",
    "colon cancer": "colon_cancer",
    "rectal cancer": "rectal_cancer",
    "colon diverticulum": "colon_diverticulum",
    "colon appendicolith": "appendicolith",
    "liver cyst": "liver_cyst",
    "liver cancer": "liver_cancer",
    "liver abscess": "liver_abscess",
    "liver metastase": "liver_metastasis",
    "spleen infarction": "spleen_infarction",
    "spleen hemangioma": "spleen_hemangioma",
    "bladder diverticulum": "bladder_diverticulum",
    "bladder stone": "bladder_stone",
    "esophageal varicose veins": "esophageal_varices",
    "sacrum osteitis": "sacrum_osteitis",
}
TABLE9_DIFFUSE = {
    "colon obstruction": "colon_obstruction",
    "colonic gas": "colonic_gas",
    "colon effusion": "colon_effusion",
    "colon appendicitis": "appendicitis",
    "small intestine obstruction": "small_intestine_obstruction",
    "small intestine gas": "small_intestine_gas",
    "small intestine fluid accumulation": "small_intestine_fluid_accumulation",
    "cardiomegaly": "cardiomegaly",
    "pericardial effusion": "pericardial_effusion",
    "liver glisson's capsule effusion": "glisson_capsule_effusion",
    "liver cirrhosis": "liver_cirrhosis",
    "intrahepatic bile duct dilatation": "intrahepatic_bile_duct_dilatation",
    "fatty liver": "fatty_liver",
    "bronchiectasis": "bronchiectasis",
    "emphysema": "emphysema",
    "pneumonia": "pneumonia",
    "pleural effusion": "pleural_effusion",
    "atelectasis": "atelectasis",
    "kidney atrophy": "kidney_atrophy",
    "hydronephrosis": "hydronephrosis",
    "adrenal hypertrophy": "adrenal_hypertrophy",
    "gastric wall thickening": "gastric_wall_thickening",
    "cholecystitis": "cholecystitis",
    "pancreatitis": "pancreatitis",
    "pancreatic duct dilatation": "pancreatic_duct_dilatation",
    "pancreas steatosis": "pancreas_steatosis",
    "pancreas atrophy": "pancreas_atrophy",
    "splenomegaly": "splenomegaly",
    "portal vein hypertension": "portal_hypertension",
    "portal vein thrombosis": "portal_vein_thrombosis",
    "esophageal hiatal hernia": "hiatal_hernia",
    "gallbladder adenomyomatosis": "gallbladder_adenomyomatosis",
}
# Counts stated by the paper's Table 9 (22 local + 32 diffuse = 54).
N_LOCAL, N_DIFFUSE = 22, 32

NEGATION = re.compile(r"\b(no|not|without|unremarkable|normal)\b", re.IGNORECASE)


def _label_map() -> dict[int, str]:
    if not LABEL_MAP_JSON.is_file():
        pytest.skip(f"TotalSegmentator v2 label map not found at {LABEL_MAP_JSON}")
    return {int(k): v for k, v in json.loads(LABEL_MAP_JSON.read_text(encoding="utf-8")).items()}


def _mentions(text: str, phrases) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in phrases)


# ----------------------------------------------------------------------------- anatomies


def test_36_anatomies_with_unique_names_and_indices():
    anas = catalog.anatomies()
    assert len(anas) == 36
    names = [a.name for a in anas]
    assert len(set(names)) == 36, [n for n, c in Counter(names).items() if c > 1]
    assert [a.index for a in anas] == list(range(1, 37))
    assert catalog.anatomy_names() == names
    for a in anas:
        assert catalog.anatomy_by_name(a.name) is a
    with pytest.raises(KeyError, match="unknown anatomy"):
        catalog.anatomy_by_name("appendix")


def test_v2_classes_equal_label_map_json():
    assert catalog.totalseg_classes("v2") == _label_map()


def test_every_v2_class_in_exactly_one_anatomy():
    label_map = _label_map()
    assert len(label_map) == 117
    owners = Counter(n for a in catalog.anatomies() for n in a.totalseg_v2)
    json_names = set(label_map.values())
    missing = sorted(json_names - set(owners))
    twice = sorted(n for n, c in owners.items() if c > 1)
    unknown = sorted(set(owners) - json_names)
    assert not missing, f"v2 classes in no anatomy: {missing}"
    assert not twice, f"v2 classes in several anatomies: {twice}"
    assert not unknown, f"anatomy v2 names absent from label_map_total.json: {unknown}"


def test_v1_classes_unique_and_in_exactly_one_anatomy():
    v1 = catalog.totalseg_classes("v1")
    assert len(v1) == 104
    assert sorted(v1) == list(range(1, 105))
    assert len(set(v1.values())) == 104
    owners = Counter(n for a in catalog.anatomies() for n in a.totalseg_v1)
    assert set(owners) == set(v1.values()), (
        f"unassigned: {sorted(set(v1.values()) - set(owners))}, "
        f"unknown: {sorted(set(owners) - set(v1.values()))}"
    )
    assert all(c == 1 for c in owners.values()), [n for n, c in owners.items() if c > 1]


def test_v2_ids_are_1_to_117():
    v2 = catalog.totalseg_classes("v2")
    assert sorted(v2) == list(range(1, 118))
    assert len(set(v2.values())) == 117
    with pytest.raises(ValueError, match="unknown TotalSegmentator class version"):
        catalog.totalseg_classes("v9")


def test_class_ids_match_installed_totalsegmentator():
    mtb = pytest.importorskip(
        "totalsegmentator.map_to_binary", reason="totalsegmentator is not installed"
    )
    class_map = mtb.class_map
    assert dict(class_map["total"]) == catalog.totalseg_classes("v2")
    v1_key = next((k for k in ("total_v1", "total_v1_104") if k in class_map), None)
    assert v1_key is not None, f"no v1 'total' class map among {sorted(class_map)}"
    assert dict(class_map[v1_key]) == catalog.totalseg_classes("v1")


def test_anatomies_cover_organs_chest_and_body():
    names = set(catalog.anatomy_names())
    missing_organs = set(ORGAN_ANATOMY.values()) - names
    assert not missing_organs, f"abdominal organs without an anatomy: {missing_organs}"
    chest = {"lung", "heart", "esophagus", "aorta", "trachea"}
    assert chest <= names, chest - names
    vessels = {"aorta", "pulmonary_vessels", "venae_cavae", "portal_vein", "iliac_vessels", "supraaortic_arteries"}
    bones = {"sacrum", "cervical_spine", "thoracic_spine", "lumbar_spine", "ribs", "sternum", "hip", "femur", "shoulder_girdle"}
    muscles = {"gluteal_muscles", "autochthon", "iliopsoas"}
    for group in (vessels, bones, muscles):
        assert group <= names, group - names


def test_every_anatomy_has_v2_classes_and_synonyms():
    for a in catalog.anatomies():
        assert a.totalseg_v2, a.name
        assert a.synonyms, a.name
        assert a.label == a.name.replace("_", " ")


# ----------------------------------------------------------------------------- lookup table


@pytest.mark.parametrize(
    ("version", "cls", "anatomy"),
    [
        ("v2", "liver", "liver"),
        ("v2", "spleen", "spleen"),
        ("v2", "lung_upper_lobe_left", "lung"),
        ("v2", "lung_middle_lobe_right", "lung"),
        ("v2", "lung_lower_lobe_right", "lung"),
        ("v2", "kidney_cyst_left", "kidney"),
        ("v2", "atrial_appendage_left", "heart"),
        ("v2", "vertebrae_S1", "sacrum"),
        ("v2", "duodenum", "small_intestine"),
        ("v2", "portal_vein_and_splenic_vein", "portal_vein"),
        ("v2", "skull", "head"),
        ("v1", "liver", "liver"),
        ("v1", "lung_lower_lobe_left", "lung"),
        ("v1", "heart_myocardium", "heart"),
        ("v1", "heart_ventricle_right", "heart"),
        ("v1", "pulmonary_artery", "pulmonary_vessels"),
        ("v1", "face", "head"),
        ("v1", "small_bowel", "small_intestine"),
    ],
)
def test_class_to_anatomy_lut_known_classes(version, cls, anatomy):
    lut = catalog.class_to_anatomy_lut(version)
    assert lut[catalog.class_id(cls, version)] == catalog.anatomy_by_name(anatomy).index


def test_class_to_anatomy_lut_shape_and_ids():
    # a few ids checked literally, independent of class_id()
    v2 = catalog.class_to_anatomy_lut("v2")
    v1 = catalog.class_to_anatomy_lut("v1")
    idx = {a.name: a.index for a in catalog.anatomies()}
    assert v2.shape == (118,) and v1.shape == (105,)
    assert v2[0] == 0 and v1[0] == 0
    assert v2[5] == idx["liver"] and v1[5] == idx["liver"]
    assert [v2[i] for i in range(10, 15)] == [idx["lung"]] * 5
    assert [v1[i] for i in range(13, 18)] == [idx["lung"]] * 5  # v1: lung lobes are 13..17
    assert (v2[1:] > 0).all() and (v1[1:] > 0).all()
    assert set(v2[1:].tolist()) == set(range(1, 37))  # every anatomy has a v2 class
    with pytest.raises(ValueError):
        v2[0] = 1  # read-only
    with pytest.raises(KeyError):
        catalog.class_id("appendix")


# ----------------------------------------------------------------------------- abdomen catalog


def test_abdomen_54_diseases_over_15_organs():
    dis = catalog.diseases("abdomen")
    assert len(dis) == 54
    assert len({d.id for d in dis}) == 54
    assert dict(Counter(d.organ for d in dis)) == ORGAN_COUNTS
    for d in dis:
        assert d.anatomy == ORGAN_ANATOMY[d.organ], (d.id, d.organ, d.anatomy)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", d.id), d.id


def test_abdomen_local_diffuse_follows_table9():
    dis = {d.id: d for d in catalog.diseases("abdomen")}
    types = Counter(d.type for d in dis.values())
    assert types == {"local": N_LOCAL, "diffuse": N_DIFFUSE}
    assert len(TABLE9_LOCAL) == N_LOCAL and len(TABLE9_DIFFUSE) == N_DIFFUSE
    assert set(TABLE9_LOCAL.values()) | set(TABLE9_DIFFUSE.values()) == set(dis)
    for kind, table in (("local", TABLE9_LOCAL), ("diffuse", TABLE9_DIFFUSE)):
        for paper_name, did in table.items():
            assert dis[did].type == kind, f"{did} ({paper_name}) is {kind} in Table 9"


def test_table9_transcription_matches_paper_text():
    if not PAPER.is_file():
        pytest.skip(f"paper text not found at {PAPER}")
    rows = {}
    for line in PAPER.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^(Local|Diffuse)\t(.+)$", line)
        if m and "," in m.group(2):
            rows[m.group(1)] = [s.strip() for s in m.group(2).split(",")]
    assert set(rows) == {"Local", "Diffuse"}, "Table 9 not found in the paper text"
    assert len(rows["Local"]) == N_LOCAL
    assert len(rows["Diffuse"]) == N_DIFFUSE
    assert rows["Local"] == list(TABLE9_LOCAL)
    assert rows["Diffuse"] == list(TABLE9_DIFFUSE)


def test_abdomen_prompts_and_synonyms():
    known = set(catalog.anatomy_names())
    for d in catalog.diseases("abdomen"):
        assert d.anatomy in known
        assert d.name and d.synonyms, d.id
        assert len(set(d.synonyms)) == len(d.synonyms), d.id
        assert d.positive_prompts and d.negative_prompts, d.id
        for p in d.positive_prompts:
            assert _mentions(p, (d.name, *d.synonyms)), (d.id, p)
            assert not NEGATION.search(p), (d.id, p)
            assert "{" not in p and "_" not in p, (d.id, p)
        for p in d.negative_prompts:
            assert NEGATION.search(p), (d.id, p)
            assert "{" not in p and "_" not in p, (d.id, p)
        assert not set(d.positive_prompts) & set(d.negative_prompts), d.id


def test_abdomen_radiology_synonyms():
    syn = {d.id: {s.lower() for s in d.synonyms} for d in catalog.diseases("abdomen")}
    assert "hepatic steatosis" in syn["fatty_liver"]
    assert "cholelithiasis" in syn["gallstone"]
    assert "nephrolithiasis" in syn["renal_calculus"]
    assert "splenic enlargement" in syn["splenomegaly"]
    assert "varices" in syn["esophageal_varices"]
    assert {"hcc", "hepatocellular carcinoma"} <= syn["liver_cancer"]


def test_abdomen_shares_ids_with_demo():
    # a disease in both catalogs has the same id, anatomy and type
    abd = {d.id: d for d in catalog.diseases("abdomen")}
    for d in catalog.diseases("demo"):
        if d.id in abd:
            assert (abd[d.id].anatomy, abd[d.id].type) == (d.anatomy, d.type), d.id


# ----------------------------------------------------------------------------- demo catalog


def test_demo_catalog():
    dis = catalog.diseases("demo")
    assert len(dis) >= 12
    assert len({d.id for d in dis}) == len(dis)
    assert len({d.anatomy for d in dis}) >= 8
    assert {d.type for d in dis} == {"local", "diffuse"}
    for d in dis:
        assert d.positive_prompts and d.negative_prompts, d.id
        for p in d.positive_prompts:
            assert _mentions(p, (d.name, *d.synonyms)), (d.id, p)


# ----------------------------------------------------------------------------- CT-RATE catalog


def test_ctrate_catalog():
    if not resources.files("ctvlp.catalogs").joinpath("diseases_ctrate.yaml").is_file():
        pytest.skip("catalogs/diseases_ctrate.yaml has not been written yet")
    dis = catalog.diseases("ctrate")
    assert len(dis) == 18
    assert len({d.id for d in dis}) == 18
    not_zero_shot = sorted(d.name.lower() for d in dis if not d.zero_shot)
    assert len(not_zero_shot) == 2, not_zero_shot
    assert any("medical material" in n for n in not_zero_shot), not_zero_shot
    assert any("lymphadenopathy" in n for n in not_zero_shot), not_zero_shot
    assert sum(d.zero_shot for d in dis) == 16
    assert {d.anatomy for d in dis} <= {"lung", "heart", "esophagus", "aorta"}
    for d in dis:
        assert d.positive_prompts and d.negative_prompts, d.id


# ----------------------------------------------------------------------------- user catalogs


USER_YAML = """\
name: mine
prompt_templates:
  positive: ["There is {name}."]
  negative: ["There is no {name}.", "The {anatomy} is unremarkable."]
diseases:
  - {id: liver_lesion, name: liver lesion, anatomy: liver, type: local, synonyms: [hepatic lesion]}
  - id: bladder_wall_thickening
    name: bladder wall thickening
    anatomy: urinary_bladder
    organ: bladder
    type: diffuse
    synonyms: [thickened bladder wall]
    prompts:
      positive: ["The bladder wall is thickened."]
"""


def test_user_catalog_from_path(tmp_path):
    path = tmp_path / "my_diseases.yaml"
    path.write_text(USER_YAML)
    dis = catalog.diseases(str(path))
    assert [d.id for d in dis] == ["liver_lesion", "bladder_wall_thickening"]
    lesion, wall = dis
    assert lesion.positive_prompts == ("There is liver lesion.",)
    assert lesion.negative_prompts == ("There is no liver lesion.", "The liver is unremarkable.")
    assert lesion.organ == "liver" and lesion.zero_shot is True
    assert wall.positive_prompts == ("The bladder wall is thickened.",)
    assert wall.negative_prompts == (
        "There is no bladder wall thickening.",
        "The urinary bladder is unremarkable.",
    )
    assert wall.organ == "bladder" and wall.type == "diffuse"
    assert wall.synonyms == ("thickened bladder wall",)


def test_user_catalog_unknown_anatomy(tmp_path):
    path = tmp_path / "bad_anatomy.yaml"
    path.write_text(USER_YAML.replace("anatomy: liver,", "anatomy: appendix,"))
    with pytest.raises(ValueError, match=r"liver_lesion.*unknown anatomy 'appendix'"):
        catalog.diseases(str(path))


def test_user_catalog_duplicate_ids(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(USER_YAML.replace("id: bladder_wall_thickening", "id: liver_lesion"))
    with pytest.raises(ValueError, match="duplicate ids"):
        catalog.diseases(str(path))


def test_user_catalog_bad_type_and_missing_file(tmp_path):
    path = tmp_path / "bad_type.yaml"
    path.write_text(USER_YAML.replace("type: local", "type: focal"))
    with pytest.raises(ValueError, match="local or diffuse"):
        catalog.diseases(str(path))
    with pytest.raises(FileNotFoundError, match="neither"):
        catalog.diseases(str(tmp_path / "absent.yaml"))
