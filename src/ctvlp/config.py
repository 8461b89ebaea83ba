"""Configuration: load YAML, fill schema defaults, validate with errors that name the key.

The schema (package data ``ctvlp/config.schema.yaml``, so a non-editable install runs too) holds
every key's type, bounds and default.
``validate`` adds the checks a JSON schema cannot express (a window's lower bound below its upper
bound, a codec name that exists). A value that may be a secret is never echoed in an error.

Stages get their settings from a config file (the workflow writes the run's validated config to
``<results>/.ctvlp/config/<digest>.json``, ``snapshot``) restricted to the sections their rule
declares (``restrict``): reading any other section fails loudly instead of falling back to a
default, and nothing of the config travels on a command line.
"""

from __future__ import annotations

import codecs
import copy
import functools
import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .workspace import write_text_atomic

SCHEMA = "config.schema.yaml"  # package data
# keys whose values are never shown in an error message: a user may have pasted a secret there
SECRET_KEYS = {("reports", "llm", "api_key_env")}

# ---- secrets ----------------------------------------------------------------------------------
# A config holds no secret: the LLM key comes from the environment variable that
# reports.llm.api_key_env names, and credentials in reports.llm.base_url are references to
# environment variables (https://${USER_VAR}:${PASSWORD_VAR}@host/v1), expanded only by the client.
# Values that look like a secret are refused without being shown; URLs are shown redacted.

URL_KEYS = {("reports", "llm", "base_url")}  # URLs shown (errors) and written (snapshot) redacted
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
# known token shapes: the vendor prefix, then a long random part
_TOKEN = re.compile(
    r"(?:sk|rk|pk|hf|ghp|gho|ghu|ghs|ghr|ghx|glpat|npm|pypi|xox[a-z]?|dapi|shpat|sq0atp)[-_](?=[A-Za-z0-9_-]{16,}$)"
    r"(?=.*(?:\d|[a-z].*[A-Z]|[A-Z].*[a-z]))"
    r"|github_pat_|(?:AKIA|ASIA)[0-9A-Z]{16}$|AIza[0-9A-Za-z_-]{30,}|eyJ[A-Za-z0-9_-]{10,}"
)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s]*)@")  # up to the authority's last @
REDACTED = "***"


def _entropy(text: str) -> float:
    from collections import Counter
    from math import log2

    return -sum(n / len(text) * log2(n / len(text)) for n in Counter(text).values()) if text else 0.0


def looks_like_token(value: str) -> bool:
    """Whether ``value`` is shaped like an API key or access token rather than a name: a known
    vendor prefix (sk-, hf_, ghp_, github_pat_, xox, AKIA, ...) before a long random part, or a
    long high-entropy run of letters and digits."""
    if _TOKEN.match(value):
        return True
    for chunk in re.split(r"[_\-.]", value):
        if (len(chunk) >= 20 and re.search(r"\d", chunk) and re.search(r"[A-Za-z]", chunk)
                and _entropy(chunk) >= 3.2):
            return True
    return False


def env_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the NAME of an environment variable holding a secret (None: it can).
    The reason never contains ``name``: it may be the secret itself."""
    if not ENV_NAME.fullmatch(name):
        return ("must be the NAME of an environment variable (letters, digits and '_', not starting with a digit, "
                "at most 64 characters)")
    if looks_like_token(name):
        return ("looks like an API key or token, not the NAME of an environment variable: put the key in an "
                "environment variable (export OPENAI_API_KEY=...) and write that variable's name here")
    return None


def split_userinfo(url: str) -> tuple[str, str, str]:
    """(scheme://, userinfo, the rest) of ``url``; userinfo is "" when there is none."""
    match = re.match(r"(?i)([a-z][a-z0-9+.-]*://)([^/?#]*)(.*)", url, re.DOTALL)
    if not match:
        return "", "", url
    scheme, netloc, rest = match.groups()
    userinfo, at, host = netloc.rpartition("@")
    return (scheme, userinfo, host + rest) if at else (scheme, "", netloc + rest)


def _redact_userinfo(userinfo: str) -> str:
    return ":".join(part if ENV_REF.fullmatch(part) or not part else REDACTED for part in userinfo.split(":", 1))


def redact_url(url: str) -> str:
    """``url`` fit to show or write: literal credentials (user:password@) and the query string
    replaced by ``***``; references to environment variables (${NAME}) kept."""
    scheme, userinfo, rest = split_userinfo(url)
    if not scheme:
        return REDACTED if looks_like_token(url) else url
    host_path, query, _ = rest.partition("?")
    out = scheme + (_redact_userinfo(userinfo) + "@" if userinfo else "") + host_path.partition("#")[0]
    return out + (f"?{REDACTED}" if query else "")


def redact_text(text: str) -> str:
    """``text`` with the literal credentials of every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(lambda m: m.group(1) + _redact_userinfo(m.group(2)) + "@", text)


def url_credentials_problem(url: str) -> str | None:
    """Why ``url`` (an endpoint) holds a secret a config must not hold (None: it holds none):
    a literal password, a literal user name without a password (a token), or a query string."""
    _, userinfo, rest = split_userinfo(url)
    fix = (" Put each credential in an environment variable and name it in the URL: "
           "https://${LLM_USER}:${LLM_PASSWORD}@host/v1 (the client expands them; the config, its snapshot and "
           "the logs keep the names)")
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if colon and password and not ENV_REF.fullmatch(password):
            return "holds a literal password, which would be copied into the run's config snapshot and logs." + fix
        if not colon and user and not ENV_REF.fullmatch(user):
            return "holds a literal credential before '@' (a user name or token)." + fix
        if user and colon and not password and not ENV_REF.fullmatch(user):
            return "holds a literal credential before '@' (a user name or token)." + fix
    if "?" in rest or "#" in rest:
        return ("holds a query string or fragment, which OpenAI clients do not send with a base URL (and which may "
                "hold a key): give the API key through the variable named by reports.llm.api_key_env")
    return None


def _secret_errors(config: dict) -> list[str]:
    """Secrets pasted where a config expects a name or a URL, refused without showing them."""
    reports = config.get("reports") if isinstance(config, dict) else None
    llm = reports.get("llm") if isinstance(reports, dict) else None
    if not isinstance(llm, dict):
        return []
    errors = []
    name = llm.get("api_key_env")
    if isinstance(name, str) and ENV_NAME.fullmatch(name) and looks_like_token(name):
        errors.append(f"config key 'reports.llm.api_key_env': {env_name_problem(name)} (the value given is not shown, "
                      "in case it is the secret itself)")
    url = llm.get("base_url")
    problem = url_credentials_problem(url) if isinstance(url, str) else None
    if problem:
        errors.append(f"config key 'reports.llm.base_url' ({redact_url(url)}): {problem}")
    return errors


def redact_config(config: dict) -> dict:
    """A copy of ``config`` fit to write: secret-looking names replaced by ``***``, URLs redacted
    (``redact_url``). A validated config holds neither; this is the last guard of ``snapshot``."""
    out = copy.deepcopy(config)
    for keys in SECRET_KEYS | URL_KEYS:
        node = out
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if not isinstance(value, str):
            continue
        if keys in URL_KEYS:
            node[keys[-1]] = redact_url(value)
        elif env_name_problem(value):
            node[keys[-1]] = REDACTED
    return out


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("ctvlp").joinpath(SCHEMA).read_text(encoding="utf-8")


def load_schema() -> dict:
    """The config schema: one for the CLI and the workflow."""
    return yaml.safe_load(_schema_text())


def _fill_defaults(node: Any, schema: dict) -> Any:
    if schema.get("type") == "object" and isinstance(node, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                node[key] = _fill_defaults(node[key], sub)
    return node


def _message(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if tuple(error.absolute_path) in SECRET_KEYS:
        return (f"config key '{where}': must be the NAME of an environment variable (letters, digits and "
                "'_', not starting with a digit); the value given is not shown, in case it is the secret itself")
    return redact_text(f"config key '{where}': {error.message}")


def _nonfinite(node, where: str):
    """(key, value) of every NaN or infinite number in ``node``."""
    if isinstance(node, float) and not math.isfinite(node):
        yield where or "<top level>", node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _nonfinite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _nonfinite(value, f"{where}[{i}]")


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _semantic_errors(config: dict) -> list[str]:
    """Checks across values that the schema cannot express."""
    errors = []
    split = config.get("cohort", {}).get("split")
    if isinstance(split, list) and split and not sum(split) > 0:
        errors.append(f"config key 'cohort.split': the train/val/test fractions must sum to more than zero, "
                      f"got {split}")
    for key in PATH_KEYS:
        value = _lookup(config, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and ("{" in item or "}" in item):
                errors.append(f"config key '{key}': {item!r} holds a brace ('{{' or '}}'), which Snakemake reads as "
                              "a wildcard in a path; rename the file or folder")
    pre = config.get("preprocess", {})
    for key in ("hu_window", "spacing_range"):
        lo, hi = pre.get(key, (0, 1))
        if not lo < hi:
            errors.append(f"config key 'preprocess.{key}': needs lower < upper, got [{lo}, {hi}]")
    params = model_parameters(config.get("model", {}))
    if params > MAX_MODEL_PARAMETERS:
        errors.append(f"config section 'model': these settings ask for about {params / 1e9:.1f} billion parameters "
                      f"({params * 4 / 2**30:.0f} GiB in fp32), more than {MAX_MODEL_PARAMETERS / 1e9:.0f} billion; "
                      "check widths, embed_dim and vq_dim")
    encoding = config.get("cohort", {}).get("text_fallback_encoding")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            errors.append(f"config key 'cohort.text_fallback_encoding': unknown text encoding {encoding!r}")
    return errors


MAX_MODEL_PARAMETERS = 2_000_000_000


def model_parameters(model: dict) -> int:
    """A rough parameter count of the model a "model" section builds (3D ResNet18: two basic
    blocks of two 3x3x3 convolutions per stage; per-anatomy projections; the VQ-VAE's two
    transformers), to refuse absurd settings before anything is allocated."""
    widths = model.get("widths") or [64, 128, 256, 512]
    conv = sum(27 * (w_in * w + 3 * w * w) for w_in, w in zip([1, *widths[:-1]], widths))
    channels = sum(widths[model.get("token_stage", 4) - 1:])
    heads = 36 * channels * model.get("embed_dim", 512) + 4 * channels * channels
    vq = 2 * model.get("vq_depth", 2) * 12 * model.get("vq_dim", 1024) ** 2 if model.get("vq_codes") else 0
    return int(conv + heads + vq)


def validate(config: dict | None, schema: dict | None = None) -> dict:
    """Return a validated copy of ``config`` with defaults filled in; raise ConfigError otherwise."""
    schema = schema or load_schema()
    if isinstance(config, dict) and YTE_KEY in config:
        raise ConfigError(f"invalid configuration:\n  config key '{YTE_KEY}': a ctvlp config is plain data, not a "
                          "YTE template (Snakemake evaluates the Python in a file that sets it); remove it")
    nonfinite = [f"config key '{where}': {value} is not a finite number (NaN and infinity are refused)"
                 for where, value in _nonfinite(config or {}, "")]
    if nonfinite:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(nonfinite))
    config = _fill_defaults(copy.deepcopy(config or {}), schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)
    )
    lines = [_message(e) for e in errors] + _secret_errors(config) or _semantic_errors(config)
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


def validate_section(name: str, values: dict, what: str, fill: bool = False) -> dict:
    """One section (e.g. a saved model's "model" settings) checked against the schema's part for
    it (types, bounds, unknown keys); ``what`` names the source in the error. Returns ``values``
    with the schema's defaults filled in (``fill``) or as given."""
    try:
        checked = validate({name: values})[name]
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return checked if fill else values


# ---- reading config files ---------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB; this bounds what a hostile one can cost
YTE_KEY = "__use_yte__"
# keys holding paths (or names that may be paths): a brace would be read as a Snakemake wildcard
PATH_KEYS = ("results", "cohort.table.path", "cohort.ctrate.volumes_root", "cohort.ctrate.metadata_csv",
             "cohort.ctrate.reports_csv", "cohort.ctrate.labels_csv", "segment.path", "segment.weights_dir",
             "reports.llm.cache_dir", "model.text_model", "evaluate.catalog")


class _Refused(Exception):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors and aliases (a few lines of them expand into gigabytes: the "billion
    laughs"), and with every mapping key once (PyYAML, like Snakemake, silently keeps the last)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"YAML alias *{event.anchor} is not allowed in a ctvlp config (write the value out)",
                           event.start_mark.line + 1)
        if getattr(event, "anchor", None):
            raise _Refused(f"YAML anchor &{event.anchor} is not allowed in a ctvlp config (write the value out)",
                           event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                try:
                    key = self.construct_object(key_node, deep=True)
                    again = key in seen
                except TypeError:  # an unhashable key: the constructor below says so
                    continue
                if again:
                    raise _Refused(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                   "YAML would silently keep only the last", line)
                seen[key] = line
        return super().construct_mapping(node, deep)


def _json_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _json_constant(name):
    raise ValueError(f"{name} is not a number a config may hold")


def parse_text(text: str, name: str, json_file: bool = False):
    """The data of a config file's ``text`` (YAML, or JSON with ``json_file``) read strictly:
    no YAML anchors or aliases, no duplicate keys, no ``__use_yte__``; ConfigError naming ``name``
    and the line otherwise. Values are checked later (``validate``)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {name} is larger than {MAX_CONFIG_BYTES >> 10} KiB; a ctvlp config is a "
                          "few kB (is it the right file?)")
    try:
        if json_file:  # JSON by its suffix: YAML 1.1 would read JSON's 1e-06 as a string
            data = json.loads(text, object_pairs_hook=_json_pairs, parse_constant=_json_constant)
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _Refused as e:
        raise ConfigError(f"config file {name}, line {e.line}: {e}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"config file {name} is not valid {'JSON' if json_file else 'YAML'}: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping of sections, not {type(data).__name__}")
    if data and YTE_KEY in data:
        raise ConfigError(
            f"config file {name} sets {YTE_KEY}: Snakemake evaluates the Python expressions of such a file as a "
            "YTE template (a file given with --configfile is evaluated before the workflow can check it). A ctvlp "
            f"config is plain data: remove {YTE_KEY} and write the values out")
    return data


def read_file(path: str | Path):
    """The data of the config file ``path`` read strictly (``parse_text``), not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 10} KiB; a ctvlp config is a "
                          "few kB (is it the right file?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    return parse_text(text, str(path), json_file=path.suffix.lower() == ".json")


def check_files(paths) -> None:
    """Read each config file in ``paths`` strictly (ConfigError on the first problem): the
    workflow's check of the files Snakemake read with its own loader (which expands aliases, keeps
    the last of duplicate keys and evaluates YTE templates)."""
    for path in dict.fromkeys(str(p) for p in paths):
        read_file(path)


def load(path: str | Path) -> dict:
    """A config file (YAML, or the JSON of ``snapshot``) read strictly (``parse_text``) and
    validated, with defaults filled in."""
    return validate(read_file(path) or {})


# ---- what a stage may read -------------------------------------------------------------------


class Settings(dict):
    """The sections a stage's rule passed; reading another one fails loudly (a silent schema
    default would hide that the rule does not track that setting)."""

    def __init__(self, values: dict, passed: list[str]):
        super().__init__(values)
        self.passed = passed

    def __missing__(self, key):
        raise ConfigError(f"this stage read config section {key!r}, which its rule did not pass "
                          f"(passed: {', '.join(self.passed) or 'none'}); add it to the rule's settings")


def restrict(config: dict, sections: list[str]) -> Settings:
    """``config`` reduced to ``sections``: names of sections ("train") or of single keys
    ("preprocess.min_slices")."""
    out: dict = {}
    for name in sections:
        head, _, key = name.partition(".")
        if head not in config:
            raise ConfigError(f"unknown config section {head!r}")
        if not key:
            out[head] = config[head]
        elif isinstance(config[head], dict) and key in config[head]:
            out.setdefault(head, {})[key] = config[head][key]
        else:
            raise ConfigError(f"unknown config key {name!r}")
    return Settings(out, list(sections))


# settings that change how a stage runs but not what it computes: not part of a rule's rerun trigger
RUNTIME_KEYS = {"train": ("threads", "device", "gpus", "checkpoint_every", "checkpoint_minutes", "tensorboard", "resume",
                          "workers", "sync_every", "channels_last", "compile")}


def tracked(settings: dict) -> dict:
    """``settings`` without the ``RUNTIME_KEYS`` (what a rule's rerun trigger digests)."""
    return {name: ({k: v for k, v in values.items() if k not in RUNTIME_KEYS[name]}
                   if name in RUNTIME_KEYS and isinstance(values, dict) else values)
            for name, values in settings.items()}


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def snapshot(config: dict, folder: str | Path) -> Path:
    """Write the validated ``config`` as ``folder/<digest>.json`` (once; same content, same
    name) and return the path. Stages read their sections from it. Written redacted
    (``redact_config``): a validated config holds no secret, and an unvalidated one leaks none."""
    folder = Path(folder)
    path = folder / f"{digest(config)[:16]}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(redact_config(config), indent=1, sort_keys=True))
    return path
