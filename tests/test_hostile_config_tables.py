"""Hostile and careless configs, input tables and damaged intermediate tables: each is refused with
a message naming the key, line, row, column or file, or its case is excluded with the reason; none
crashes a stage without saying where, and none is silently misread."""

import time
import unicodedata

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

from ctvlp import cli, config, workspace
from ctvlp.cohort import demo, generic, schema, tables
from ctvlp.evaluation import zeroshot
from ctvlp.imaging import qc, stage
from ctvlp.imaging.storage import paths_from
from ctvlp.reports.stage import write_reports

from conftest import REPO

# ---- configs: YAML the strict loader refuses ------------------------------------------------------

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]) + "\n"

BAD_YAML = {
    "alias bomb": (BOMB, "line 1: YAML anchor &a"),
    "alias into a valid key": ("seed: 1\ncohort:\n  split: &s [1, 0, 0]\nx: *s\n", "line 3: YAML anchor &s"),
    "merge key": ("base: &b {epochs: 2}\ntrain:\n  <<: *b\n", "line 1: YAML anchor &b"),
    "duplicate section": ("train:\n  epochs: 3\nseed: 1\ntrain:\n  lr: 0.1\n", "'train' appears twice .*lines 1 and 4"),
    "duplicate nested key": ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n", "'epochs' appears twice .*lines 2 and 4"),
    "duplicate in a flow map": ("preprocess: {strict: true, strict: false}\n", "'strict' appears twice"),
    "yte template": ("__use_yte__: true\nseed: ?1 + 1\n", "__use_yte__: Snakemake evaluates"),
    "yte switched off": ("__use_yte__: false\nseed: 1\n", "sets __use_yte__"),
    "python tag": ("seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "not a mapping": ("- train\n- seed\n", "mapping of sections"),
}


@pytest.mark.parametrize("name", sorted(BAD_YAML))
def test_hostile_yaml_is_refused_naming_the_line(tmp_path, name):
    text, words = BAD_YAML[name]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(config.ConfigError, match=words):
        config.load(path)
    with pytest.raises(SystemExit, match=words):  # the CLI the same, without a traceback
        cli.main(["validate-config", "--config", str(path)])
    assert time.monotonic() - start < 5  # the bomb is refused, never expanded


@pytest.mark.parametrize("text, words", [('{"seed": 1, "seed": 2}', "'seed' appears twice"),
                                         ('{"train": {"lr": NaN}}', "NaN is not a number"),
                                         ('{"train": {"lr": -Infinity}}', "-Infinity is not a number")])
def test_hostile_json_config_is_refused(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=words):
        config.load(path)


def test_an_oversized_config_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# " + "x" * config.MAX_CONFIG_BYTES + "\nseed: 1\n")
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load(path)


def test_anchors_in_strings_and_comments_are_plain_text(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# &a *a\nresults: 'out&1*2'\nseed: 3\n")
    cfg = config.load(path)
    assert cfg["results"] == "out&1*2" and cfg["seed"] == 3


# ---- configs: values validate refuses -----------------------------------------------------------


@pytest.mark.parametrize("bad, key", [
    ({"preprocess": {"spacing": [float("nan"), 1.0, 1.0]}}, r"preprocess.spacing\[0\]"),
    ({"preprocess": {"spacing_range": [0.1, float("inf")]}}, r"preprocess.spacing_range\[1\]"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"train": {"min_lr": float("-inf")}}, "train.min_lr"),
    ({"cohort": {"lesion_scale": float("nan")}}, "cohort.lesion_scale"),
    ({"cohort": {"ctrate": {"val_fraction": float("nan")}}}, "cohort.ctrate.val_fraction"),
    ({"reports": {"llm": {"timeout_s": float("inf")}}}, "reports.llm.timeout_s"),
    ({"train": {"visual_cl": {"augment": {"gamma": float("nan")}}}}, "train.visual_cl.augment.gamma"),
    ({"seed": float("nan")}, "seed"),
])
def test_nan_and_infinity_are_refused_for_every_numeric_key(bad, key):
    with pytest.raises(config.ConfigError, match=f"'{key}': .* not a finite number"):
        config.validate(bad)


def test_nan_written_in_yaml_is_refused(tmp_path):
    for value in (".nan", ".NaN", ".inf", "-.Inf", "1.0e+400"):  # the last overflows to inf
        path = tmp_path / "config.yaml"
        path.write_text(f"preprocess:\n  spacing: [1.0, {value}, 1.0]\n")
        with pytest.raises(config.ConfigError, match=r"preprocess.spacing\[1\]"):
            config.load(path)


@pytest.mark.parametrize("split", [[0, 0, 0], [0.0, 0.0, 0.0], [0, -0.0, 0]])
def test_split_fractions_must_sum_to_more_than_zero(split):
    with pytest.raises(config.ConfigError, match="'cohort.split': .*sum to more than zero"):
        config.validate({"cohort": {"split": split}})
    assert config.validate({"cohort": {"split": [0, 0, 1]}})["cohort"]["split"] == [0, 0, 1]


@pytest.mark.parametrize("section, key, value", [
    ({}, "results", "results/{shard}"),
    ({}, "results", "out}"),
    ({"cohort": {"table": {}}}, "cohort.table.path", "data/{case}.csv"),
    ({"cohort": {"ctrate": {}}}, "cohort.ctrate.volumes_root", "/data/{x}"),
    ({"cohort": {"ctrate": {}}}, "cohort.ctrate.labels_csv", ["a.csv", "b{1}.csv"]),
    ({"segment": {}}, "segment.path", "masks/{case_id}"),
    ({"reports": {"llm": {}}}, "reports.llm.cache_dir", "cache{"),
    ({"evaluate": {}}, "evaluate.catalog", "{catalog}.yaml"),
])
def test_braces_in_paths_are_refused_naming_the_key(section, key, value):
    cfg = section
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    with pytest.raises(config.ConfigError, match=f"'{key}': .*brace"):
        config.validate(cfg)


def test_the_default_and_example_configs_still_load():
    for name in ("config.yaml", ".test/config.yaml", "config.ctrate.yaml"):
        if (REPO / name).is_file():
            assert config.load(REPO / name)["results"]


# ---- tables: label cells -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    case = demo.generate_case(0, seed=3)
    img = nib.Nifti1Image(case.image.astype(np.int16), case.affine)
    img.set_qform(case.affine, code=1)
    nib.save(img, str(d / "ct.nii.gz"))
    return d / "ct.nii.gz"


def _table(path, ct, ids, **columns):
    n = len(ids)
    pl.DataFrame({"case_id": ids, "image": [str(ct)] * n, "report": ["The liver is normal."] * n, **columns},
                 schema_overrides={k: pl.Utf8 for k in columns if isinstance(columns[k][0], str)}).write_csv(path)
    return path


@pytest.mark.parametrize("value", ["300", "1e400", "0.9", "-1", "2", "yes", "1.5", "-inf", "nan", "0x1", "1 0"])
def test_a_bad_label_cell_excludes_its_case_naming_row_column_and_value(ct, tmp_path, value):
    ids = ["a", "b", "c", "d"]
    path = _table(tmp_path / "t.csv", ct, ids, liver_cyst=["1", value, "0", "1"], kidney_cyst=["0", "1", "", "0"])
    man, truth, exc = generic.ingest(path, label_cols=["liver_cyst", "kidney_cyst"], split_fractions=(1, 0, 0),
                                     disease_catalog="demo")
    assert sorted(man["case_id"]) == ids  # the images are fine: still trained on
    assert "b" not in set(truth["case_id"])  # but no ground truth from a row with a bad label
    reason = exc.filter(pl.col("case_id") == "b")["reason"].item()
    assert "t.csv line 3" in reason and "'liver_cyst'" in reason and ascii(value) in reason
    c = exc.filter(pl.col("case_id") == "c")["reason"].item()  # an empty cell: that label only
    assert "label missing" in c and "kidney_cyst" in c
    assert truth.filter(pl.col("case_id") == "a")["label"].to_list() == [0, 1]  # kidney_cyst, liver_cyst
    assert truth["label"].is_in([0, 1]).all()


@pytest.mark.parametrize("column", [["0.93", "0.12", "0.5", "1"], ["yes", "no", "no", "yes"], ["1", "2", "2", "2"],
                                    ["300", "300", "", "-1"]])
def test_a_label_column_of_wrong_values_is_refused(ct, tmp_path, column):
    path = _table(tmp_path / "t.csv", ct, ["a", "b", "c", "d"], liver_cyst=column)
    with pytest.raises(ValueError, match="label column 'liver_cyst': .* not 0 or 1"):
        generic.ingest(path, label_cols=["liver_cyst"], split_fractions=(1, 0, 0), disease_catalog="demo")


def test_labels_written_as_floats_or_booleans_are_read(ct, tmp_path):
    pl.DataFrame({"case_id": ["a", "b", "c"], "image": [str(ct)] * 3, "report": ["Liver normal."] * 3,
                  "liver_cyst": [1.0, 0.0, None], "kidney_cyst": [True, False, True]}).write_parquet(tmp_path / "t.parquet")
    _, truth, exc = generic.ingest(tmp_path / "t.parquet", label_cols=["liver_cyst", "kidney_cyst"],
                                   split_fractions=(1, 0, 0), disease_catalog="demo")
    assert dict(zip(truth["case_id"] + "/" + truth["disease_id"], truth["label"])) == {
        "a/kidney_cyst": 1, "a/liver_cyst": 1, "b/kidney_cyst": 0, "b/liver_cyst": 0, "c/kidney_cyst": 1}
    assert "t.parquet row 3" in exc.filter(pl.col("case_id") == "c")["reason"].item()


@pytest.mark.parametrize("cell, valid", [("0", (0, True)), ("1", (1, True)), (" 1.0 ", (1, True)), ("", (None, True)),
                                         (None, (None, True)), (1, (1, True)), (0.0, (0, True)), (True, (1, True)),
                                         (float("nan"), (None, True)), ("0.9", (None, False)), (2, (None, False)),
                                         (-1.0, (None, False)), ("1e400", (None, False)), ("∞", (None, False)),
                                         (float("inf"), (None, False)), ("1,0", (None, False))])
def test_label_value(cell, valid):
    assert tables.label_value(cell) == valid


# ---- tables: report size, blank ids, Unicode forms ----------------------------------------------------


@pytest.mark.parametrize("kib", [127, 129, 512, 1000])
def test_reports_up_to_the_limit_are_read(ct, tmp_path, kib):
    report = ("The liver is normal. " * (kib * 1024 // 21 + 1))[: kib * 1024]
    path = tmp_path / "t.csv"
    pl.DataFrame({"case_id": ["long", "short"], "image": [str(ct)] * 2,
                  "report": [report, "Liver normal."]}).write_csv(path)
    man, _, exc = generic.ingest(path, split_fractions=(1, 0, 0))
    assert sorted(man["case_id"]) == ["long", "short"] and exc.is_empty()
    assert man.filter(pl.col("case_id") == "long")["report_text"].item() == report.strip()


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_a_report_over_the_limit_excludes_only_its_case(ct, tmp_path, suffix):
    huge = "é" * (tables.MAX_CELL_BYTES // 2 + 10)  # under a million characters, over 1 MiB of UTF-8
    df = pl.DataFrame({"case_id": ["huge", "ok"], "image": [str(ct)] * 2, "report": [huge, "Liver normal."]})
    path = tmp_path / f"t.{suffix}"
    if suffix == "parquet":
        df.write_parquet(path)
    else:
        df.write_csv(path, separator="\t" if suffix == "tsv" else ",")
    man, _, exc = generic.ingest(path, split_fractions=(1, 0, 0))
    assert man["case_id"].to_list() == ["ok"]
    reason = exc.filter(pl.col("case_id") == "huge")["reason"].item()
    assert "'report'" in reason and "1 MiB" in reason and str(len(huge.encode())) in reason


def test_an_unclosed_quote_is_named_not_a_crash(ct, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(f'case_id,image,report\nok,{ct},Liver normal.\nbad,{ct},"Liver normal.\n'
                    + f"next,{ct},{'Spleen normal. ' * 80000}\n")
    man, _, exc = generic.ingest(path, split_fractions=(1, 0, 0))
    assert man["case_id"].to_list() == ["ok"]
    assert "quote left open" in exc.filter(pl.col("case_id") == "bad")["reason"].item()
    assert tables.csv.field_size_limit() == 131072  # the module-wide limit is put back


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_a_blank_id_is_an_exclusion_not_a_file_name(ct, tmp_path, blank):
    path = tmp_path / "t.csv"
    path.write_text(f'case_id,image,report\n"{blank}",{ct},Liver normal.\nok,{ct},Liver normal.\n,,\n')
    man, _, exc = generic.ingest(path, split_fractions=(1, 0, 0))
    assert man["case_id"].to_list() == ["ok"]  # never "ct" from ct.nii.gz; the line of commas is no case
    reason = "t.csv line 2: blank case id in column 'case_id' (the image ct.nii.gz does not name it)"
    assert exc["reason"].to_list() == [reason]


NAMES = ["Jos\u00e9", "Ma\u00efa", "\u00c5sa", "Nguy\u1ec5n"]


@pytest.mark.parametrize("name", NAMES)
def test_ids_in_two_unicode_forms_are_one_case(ct, tmp_path, name):
    nfc, nfd = unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name)
    assert nfc != nfd
    path = _table(tmp_path / "t.csv", ct, [nfc, nfd, "other"], patient=[nfc, nfd, "p2"])
    man, _, exc = generic.ingest(path, split_fractions=(0.5, 0, 0.5), patient_col="patient", unsafe_ids="slug")
    assert len(man) == 2 and man["source_id"].to_list().count(nfc) == 1
    assert "NFC" in exc.filter(pl.col("case_id") == nfc)["reason"].item()


def test_patient_ids_in_two_unicode_forms_share_a_split(ct, tmp_path):
    names = NAMES * 3
    ids = [f"c{i}" for i in range(len(names))]
    patients = [unicodedata.normalize("NFD" if i % 2 else "NFC", n) for i, n in enumerate(names)]
    path = _table(tmp_path / "t.csv", ct, ids, patient=patients)
    man, _, _ = generic.ingest(path, split_fractions=(0.5, 0, 0.5), patient_col="patient", seed=1)
    split_of = dict(zip(man["case_id"], man["split"]))
    for name in NAMES:
        assert len({split_of[c] for c, n in zip(ids, names) if n == name}) == 1, name


# ---- intermediate tables: damaged Parquet files name themselves and their rule ---------------------


@pytest.fixture()
def damaged(tmp_path):
    """A results folder whose tables are truncated halfway."""
    root = tmp_path / "results"
    table = pl.DataFrame({"case_id": [f"c{i}" for i in range(200)], "split": ["train"] * 200})
    files = {"cohort/manifest.parquet": "cohort", "cohort/ground_truth.parquet": "cohort",
             "cohort/exclusions.parquet": "cohort", "qc/cases.parquet": "qc", "reports/reports.parquet": "reports",
             "shards/segment/3.parquet": "segment", "shards/preprocessed/0.parquet": "preprocess",
             "segment/c1/anatomies.parquet": "segment", "eval/predictions.parquet": "evaluate_zeroshot",
             "eval/ablation/clip/predictions.parquet": "evaluate_zeroshot",
             "eval/linear_probe_predictions.parquet": "linear_probe"}
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return root, files


def test_every_damaged_table_names_its_file_and_the_rule_that_repairs_it(damaged):
    root, files = damaged
    for rel, rule in files.items():
        with pytest.raises(workspace.UnreadableTableError) as e:
            workspace.read_parquet(root / rel)
        assert str(root / rel) in str(e.value) and f"snakemake --forcerun {rule}`" in str(e.value)
    (root / "qc/cases.parquet").write_bytes(b"")  # empty, and missing
    with pytest.raises(workspace.UnreadableTableError, match="forcerun qc"):
        workspace.read_parquet(root / "qc/cases.parquet")
    with pytest.raises(workspace.UnreadableTableError, match="table not found: .*qc.parquet.*forcerun qc"):
        workspace.read_parquet(root / "qc/qc.parquet")


def test_stages_reading_a_damaged_table_name_it(damaged, tmp_path):
    root, _ = damaged
    manifest, cases = root / "cohort/manifest.parquet", root / "qc/cases.parquet"
    with pytest.raises(workspace.UnreadableTableError, match="manifest.parquet.*forcerun cohort"):
        stage.shard_cases(manifest, 0, 10)
    with pytest.raises(workspace.UnreadableTableError, match="manifest.parquet.*forcerun cohort"):
        qc.collect(manifest, None, root / "segment", root / "preprocessed", tmp_path / "qc")
    with pytest.raises(workspace.UnreadableTableError, match="ground_truth.parquet.*forcerun cohort"):
        zeroshot.read_ground_truth(root / "cohort/ground_truth.parquet")
    with pytest.raises(workspace.UnreadableTableError, match="manifest.parquet.*forcerun cohort"):
        write_reports(manifest, tmp_path / "reports.parquet", config.validate({})["reports"])
    with pytest.raises(workspace.UnreadableTableError, match="cases.parquet.*forcerun qc"):
        paths_from(workspace.read_parquet(cases))
    with pytest.raises(SystemExit, match="ctvlp qc: cannot read the table .*manifest.parquet.*forcerun cohort"):
        cli.main(["qc", "--config", str(REPO / ".test" / "config.yaml"), "--manifest", str(manifest),
                  "--cohort-exclusions", str(root / "cohort/exclusions.parquet"), "--segment-root",
                  str(root / "segment"), "--preprocessed-root", str(root / "preprocessed"), "--out", str(tmp_path / "q")])


def test_an_intact_table_reads_as_written(tmp_path):
    p = tmp_path / "results" / "qc" / "cases.parquet"
    p.parent.mkdir(parents=True)
    table = pl.DataFrame({"case_id": ["a", "b"], "x": [1, 2]})
    table.write_parquet(p)
    assert workspace.read_parquet(p).equals(table)
    assert workspace.read_parquet(p, columns=["case_id"]).columns == ["case_id"]


def test_cohort_tables_written_then_read_back(ct, tmp_path):
    path = _table(tmp_path / "t.csv", ct, ["a", "b"], liver_cyst=["1", "0"])
    man, truth, exc = generic.ingest(path, label_cols=["liver_cyst"], split_fractions=(1, 0, 0), disease_catalog="demo")
    paths = schema.write(man, truth, exc, tmp_path / "results" / "cohort")
    assert workspace.read_parquet(paths["manifest"])["case_id"].to_list() == ["a", "b"]
    assert workspace.read_parquet(paths["ground_truth"])["label"].to_list() == [1, 0]
    assert yaml.safe_load("a: 1") == {"a": 1}  # yaml untouched for everyone else
