"""Package catalogs: the 36 anatomies, TotalSegmentator class ids, and disease catalogs.

Catalogs are YAML package data (src/ctvlp/catalogs/); this module only loads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

DISEASE_CATALOGS = ("demo", "abdomen", "ctrate")


def _load_yaml(name: str) -> dict:
    return yaml.safe_load(resources.files("ctvlp.catalogs").joinpath(name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Anatomy:
    index: int  # 1..36; 0 is background in anatomy label maps
    name: str
    synonyms: tuple[str, ...]
    totalseg_v2: tuple[str, ...]
    totalseg_v1: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


@dataclass(frozen=True)
class Disease:
    id: str
    name: str
    anatomy: str
    organ: str
    type: str  # "local" or "diffuse"
    synonyms: tuple[str, ...]
    # zero-shot prompt ensembles per style: ((style, positive prompts, negative prompts), ...); the
    # negative prompts negate the finding ("There is no X."), never "the organ is unremarkable"
    prompts: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    zero_shot: bool

    @property
    def prompt_styles(self) -> tuple[str, ...]:
        return tuple(style for style, _, _ in self.prompts)

    def prompts_of(self, style: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(positive, negative) prompts of ``style`` (default: the catalog's first style)."""
        for name, positive, negative in self.prompts:
            if style is None or name == style:
                return positive, negative
        raise KeyError(f"disease {self.id!r} has no prompt style {style!r} (styles: {', '.join(self.prompt_styles)})")

    @property
    def positive_prompts(self) -> tuple[str, ...]:
        return self.prompts_of()[0]

    @property
    def negative_prompts(self) -> tuple[str, ...]:
        return self.prompts_of()[1]


@lru_cache(maxsize=None)
def anatomies() -> tuple[Anatomy, ...]:
    rows = _load_yaml("anatomies.yaml")["anatomies"]
    return tuple(
        Anatomy(
            index=i,
            name=r["name"],
            synonyms=tuple(r.get("synonyms", ())),
            totalseg_v2=tuple(r["totalseg_v2"]),
            totalseg_v1=tuple(r["totalseg_v1"]),
        )
        for i, r in enumerate(rows, start=1)
    )


def anatomy_names() -> list[str]:
    return [a.name for a in anatomies()]


def anatomy_by_name(name: str) -> Anatomy:
    for a in anatomies():
        if a.name == name:
            return a
    raise KeyError(f"unknown anatomy {name!r}; known: {', '.join(anatomy_names())}")


@lru_cache(maxsize=None)
def totalseg_classes(version: str = "v2") -> dict[int, str]:
    """Label id -> class name of TotalSegmentator task 'total' ('v2': 117 classes, 'v1': 104)."""
    table = _load_yaml("totalseg_classes.yaml")
    if version not in table:
        raise ValueError(f"unknown TotalSegmentator class version {version!r}; use 'v1' or 'v2'")
    return {int(k): v for k, v in table[version].items()}


@lru_cache(maxsize=None)
def class_to_anatomy_lut(version: str = "v2") -> np.ndarray:
    """Lookup table: TotalSegmentator label id -> anatomy index (0 = background)."""
    classes = totalseg_classes(version)
    lut = np.zeros(max(classes) + 1, dtype=np.uint8)
    field = "totalseg_v2" if version == "v2" else "totalseg_v1"
    by_name = {name: a.index for a in anatomies() for name in getattr(a, field)}
    for cid, name in classes.items():
        lut[cid] = by_name[name]
    lut.setflags(write=False)
    return lut


def class_id(name: str, version: str = "v2") -> int:
    for cid, n in totalseg_classes(version).items():
        if n == name:
            return cid
    raise KeyError(f"{name!r} is not a TotalSegmentator {version} class")


@lru_cache(maxsize=None)
def diseases(catalog: str = "demo") -> tuple[Disease, ...]:
    """Load a disease catalog by name ('demo', 'abdomen', 'ctrate') or by path to a YAML file."""
    if catalog in DISEASE_CATALOGS:
        data = _load_yaml(f"diseases_{catalog}.yaml")
    else:
        path = Path(catalog)
        if not path.is_file():
            raise FileNotFoundError(
                f"disease catalog {catalog!r} is neither one of {DISEASE_CATALOGS} nor a file"
            )
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    # prompt_templates (one style, the format before styles existed) reads as the style "report"
    styles = data.get("prompt_styles") or ({"report": data["prompt_templates"]} if "prompt_templates" in data else {})
    if not styles:
        raise ValueError(f"disease catalog {catalog!r} has no prompt_styles")
    known = set(anatomy_names())
    out = []
    for r in data["diseases"]:
        if r["anatomy"] not in known:
            raise ValueError(f"disease {r['id']!r}: unknown anatomy {r['anatomy']!r}")
        if r["type"] not in ("local", "diffuse"):
            raise ValueError(f"disease {r['id']!r}: type must be local or diffuse, not {r['type']!r}")
        fill = {"name": r["name"], "Name": r["name"][:1].upper() + r["name"][1:],
                "anatomy": r["anatomy"].replace("_", " ")}
        own = r.get("prompts", {})  # {style: {positive, negative}}: where a template reads badly
        prompts = []
        for style, template in styles.items():
            given = own if {"positive", "negative"} & set(own) else own.get(style, {})  # flat: every style
            positive = tuple(given.get("positive") or [t.format(**fill) for t in template["positive"]])
            negative = tuple(given.get("negative") or [t.format(**fill) for t in template["negative"]])
            prompts.append((style, positive, negative))
        if len(prompts) > 1:  # every style's prompts together: an ensemble of both wordings
            prompts.append(("ensemble", tuple(p for _, pos, _ in prompts for p in pos),
                            tuple(n for _, _, neg in prompts for n in neg)))
        out.append(
            Disease(
                id=r["id"],
                name=r["name"],
                anatomy=r["anatomy"],
                organ=r.get("organ", r["anatomy"]),
                type=r["type"],
                synonyms=tuple(r.get("synonyms", ())),
                prompts=tuple(prompts),
                zero_shot=bool(r.get("zero_shot", True)),
            )
        )
    ids = [d.id for d in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"disease catalog {catalog!r} has duplicate ids: {', '.join(dupes)}")
    return tuple(out)
