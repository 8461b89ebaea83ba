import pytest
import yaml

from ctvlp import cli, config

from conftest import REPO


def test_default_config_is_valid_and_complete():
    cfg = config.load(REPO / "config.yaml")
    schema = config.load_schema()
    # every section of the schema is present after validation, with every key filled
    for name, sub in schema["properties"].items():
        assert name in cfg
        if sub.get("type") == "object":
            assert set(cfg[name]) == set(sub["properties"]), name


def test_every_config_key_is_described():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub or sub.get("type") == "object", f"{path}{key} lacks a description"
            assert "default" in sub, f"{path}{key} lacks a default"
            walk(sub, f"{path}{key}.")

    walk(config.load_schema(), "")


def test_defaults_fill_missing_sections():
    cfg = config.validate({"train": {"epochs": 3}})
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["lr"] == pytest.approx(1e-4)
    assert cfg["preprocess"]["spacing"] == [1.0, 1.0, 5.0]


@pytest.mark.parametrize(
    "bad, key",
    [({"train": {"epochs": "ten"}}, "train.epochs"),
     ({"trian": {}}, "trian"),
     ({"model": {"unknown_knob": 1}}, "unknown_knob"),
     ({"preprocess": {"spacing": [1, 1]}}, "preprocess.spacing"),
     ({"segment": {"backend": "magic"}}, "segment.backend")],
)
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(config.ConfigError, match=key):
        config.validate(bad)


def test_cli_stops_at_start_on_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": "eight"}}))
    with pytest.raises(SystemExit, match="train.batch_size"):
        cli.main(["validate-config", "--config", str(path)])


def test_a_stage_that_reads_a_section_its_rule_did_not_pass_stops(tmp_path):
    """The cohort stage of a table source reads evaluate.catalog (to match label columns): run with
    only the cohort and seed sections it stops loudly, instead of matching against a default catalog."""
    (tmp_path / "t.csv").write_text("case_id,image,report\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"cohort": {"source": "table", "table": {"path": str(tmp_path / "t.csv")}}}))
    with pytest.raises(SystemExit, match="read config section 'evaluate'.*did not pass"):
        cli.main(["cohort", "--config", str(cfg), "--sections", "cohort,seed", "--out", str(tmp_path / "out")])


def test_the_schema_ships_as_package_data():
    """A non-editable install finds the schema inside the package, not through the repository."""
    from importlib import resources

    text = resources.files("ctvlp").joinpath("config.schema.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == config.load_schema()
    assert "config.schema.yaml" in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_the_workflow_and_validate_config_read_the_repository_configs_alike():
    """Snakemake's own loader (the workflow's config) and ctvlp's strict loader give the same data
    for every config in the repository, so the strict check refuses only what it should."""
    from snakemake.common.configfile import load_configfile

    for path in [REPO / "config.yaml", *REPO.glob("config.*.yaml"), REPO / ".test" / "config.yaml"]:
        assert config.read_file(path) == load_configfile(str(path)), path
        assert config.validate(load_configfile(str(path))) == config.load(path), path


@pytest.mark.parametrize("text, words", [
    ("train: {epochs: 3}\ntrain: {lr: 0.1}\n", "'train' appears twice .*lines 1 and 2"),
    ("seed: &s 1\nshard_size: *s\n", "line 1: YAML anchor &s"),
    ("__use_yte__: true\n", "__use_yte__"),
    ("preprocess: {spacing: [1.0, .nan, 1.0]}\n", r"preprocess.spacing\[1\]"),
    ("cohort: {split: [0, 0, 0]}\n", "cohort.split"),
    ("results: 'a/{b}'\n", "'results': .*brace"),
])
def test_cli_validate_config_refuses_what_the_workflow_refuses(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=words):
        cli.main(["validate-config", "--config", str(path)])
