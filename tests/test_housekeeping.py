"""Housekeeping: the one atomic-write helper every complete-or-absent file goes through, the
LICENSE pyproject declares, and a CITATION.cff that names the works ctvlp implements and uses."""

import ast
import os
import shutil
import subprocess
from importlib import metadata

import pytest
import yaml

from ctvlp import workspace

from conftest import REPO

PACKAGE = REPO / "src" / "ctvlp"


# ---- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    path = tmp_path / "table.txt"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    assert workspace.write_text_atomic(path, "first") == path
    assert path.read_text() == "first" and synced == [False, True]  # the file, then the folder
    workspace.atomic_write(path, lambda tmp: tmp.write_bytes(b"second"))
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.txt"]
    with pytest.raises(FileNotFoundError):  # a missing folder is the caller's error (a failed checkpoint)
        workspace.write_text_atomic(tmp_path / "missing" / "x.txt", "text")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")

    def half(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        workspace.atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_safetensors_bundle_and_snapshot_writes_go_through_the_helper(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from ctvlp import config
    from ctvlp.model.io import atomic_save

    written = []

    def recording(path, writer):
        written.append(path.name)
        return workspace.atomic_write(path, writer)

    monkeypatch.setattr("ctvlp.model.io.atomic_write", recording)
    monkeypatch.setattr("ctvlp.config.write_text_atomic",
                        lambda path, text: recording(path, lambda tmp: tmp.write_text(text, encoding="utf-8")))
    atomic_save({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    snap = config.snapshot({"seed": 1}, tmp_path / "config")
    assert written == ["model.safetensors", snap.name]
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model.safetensors"))["w"].shape == (2,)


def test_no_module_renames_files_into_place_on_its_own():
    """os.replace / Path.replace appear only in workspace.py (the helper and replace_dir) and in
    the few places that rename a finished file or folder, not to write one; the LLM client's cache
    is another engineer's (src/ctvlp/reports/llm)."""
    allowed = {"workspace.py", "training/loop.py"}  # loop.py: the finished metrics.csv, renamed once
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in allowed or rel.startswith("reports/llm/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os":
                found.append(f"{rel}:{node.lineno}")
    assert found == []


# ---- LICENSE and CITATION.cff --------------------------------------------------------------------


def test_license_is_the_apache_2_text_pyproject_declares():
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    assert metadata.metadata("ctvlp")["License"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text and "END OF TERMS AND CONDITIONS" in text


# the keys of the Citation File Format 1.2.0 schema
CFF_TOP = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
           "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
           "repository-artifact", "repository-code", "title", "type", "url", "version"}
CFF_REQUIRED = {"authors", "cff-version", "message", "title"}
REFERENCE_REQUIRED = {"authors", "title", "type"}
PERSON = {"family-names", "given-names", "name-particle", "name-suffix", "affiliation", "email", "orcid", "address",
          "alias", "city", "country", "fax", "post-code", "region", "tel", "website"}
ENTITY = {"name", "address", "alias", "city", "country", "date-end", "date-start", "email", "fax", "location",
          "orcid", "post-code", "region", "tel", "website"}


def cff() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))


def test_citation_cff_has_the_1_2_0_structure():
    data = cff()
    assert data["cff-version"] == "1.2.0"
    assert CFF_REQUIRED <= set(data) <= CFF_TOP
    assert data["license"] == "Apache-2.0" and data["version"] == metadata.version("ctvlp")
    for ref in [data["preferred-citation"], *data["references"]]:
        assert REFERENCE_REQUIRED <= set(ref), ref["title"]
        assert isinstance(ref["year"], int)
        for author in ref["authors"]:
            assert set(author) <= PERSON or set(author) <= ENTITY, author
            assert "family-names" in author or "name" in author


def test_citation_cff_cites_visd_boost_and_what_it_builds_on():
    data = cff()
    preferred = data["preferred-citation"]
    assert preferred["title"].startswith("Boosting Vision Semantic Density with Anatomy Normality Modeling")
    assert "ICCV" in preferred["conference"]["name"] and preferred["year"] == 2025
    refs = {r["authors"][0]["family-names"]: r for r in data["references"]}
    assert set(refs) == {"Shui", "Hamamci", "Wasserthal"}  # fVLM, CT-RATE, TotalSegmentator
    assert "ICLR 2025" in refs["Shui"]["conference"]["name"]
    assert refs["Hamamci"]["year"] == 2024
    assert refs["Wasserthal"]["journal"] == "Radiology: Artificial Intelligence" and refs["Wasserthal"]["year"] == 2023


@pytest.mark.skipif(shutil.which("cffconvert") is None, reason="cffconvert is not installed (pip install cffconvert)")
def test_citation_cff_validates_with_cffconvert():
    out = subprocess.run(["cffconvert", "--validate", "-i", str(REPO / "CITATION.cff")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
