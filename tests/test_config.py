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
