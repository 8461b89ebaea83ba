"""The disease signs of the demo cohort: one registry entry per disease of
``catalog.diseases("demo")``.

``DISEASES`` maps each disease id to a ``DemoDisease``: how the disease alters the normal organs
(``alters``: ``anatomy.AnatomyChanges`` hooks, applied while the anatomy is drawn), how its sign is
painted (``paint``: adds its ``Lesion`` masks and returns what it records for the report) and the
keys of that record (``records``: location, size, sides ...). The report sentences of a disease
are ``report_text.WORDING[disease_id]``. A new disease: its catalog entry, one ``DemoDisease`` here
(with its painter and any anatomy hook) and one ``DiseaseWording`` there.

The registry's order is the painting order, and it matters: every draw comes from one generator,
signs that grow their organ come first, local lesions avoid the voxels of earlier ones, and the
diffuse signs recorded as a whole organ come last, so that their region is the final organ mask.

Kidney cysts are labelled kidney_left/kidney_right (not TotalSegmentator's kidney_cyst_* classes),
so the mask never gives a disease away; an adrenal nodule grows the adrenal label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ctvlp import catalog

from .anatomy import TOTALSEG, AnatomyChanges, KidneyChange, Phantom, anatomy_mask
from .canvas import draw_hu, place_sphere, sphere_mask, uniform

LOBE_TEXT = {
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}


@dataclass
class Lesion:
    disease_id: str
    mask: np.ndarray  # bool, same shape as the image: voxels rendered for this sign


class SignPainter:
    """The state shared while the signs of one case are painted: the phantom, the generator, the
    lesions so far and the voxels they occupy, and the pleural effusion (which lung signs avoid)."""

    def __init__(self, phantom: Phantom, rng: np.random.Generator, lesion_scale: float = 1.0):
        self.phantom = phantom
        self.scale = float(lesion_scale)  # local lesions' drawn radii x this (cohort.lesion_scale)
        self.cv = phantom.canvas
        self.lab = self.cv.lab
        self.rng = rng
        self.lesions: list[Lesion] = []
        self.occupied = np.zeros(self.cv.shape, bool)
        self.effusion = np.zeros(self.cv.shape, bool)

    def side(self) -> str:
        return "left" if self.rng.random() < 0.5 else "right"

    def sides(self, p_left: float, p_right: float, p_both: float) -> list[str]:
        choice = self.rng.choice(3, p=[p_left, p_right, p_both])
        return [["left"], ["right"], ["left", "right"]][choice]

    def add(self, disease_id: str, m: np.ndarray, occupy: bool = True) -> None:
        self.lesions.append(Lesion(disease_id, m))
        if occupy:  # local signs: later lesions do not overlap them
            self.occupied[m] = True

    def spheres(self, disease_id, region, r_range, n, hu_range, depth=1.0, prefer=None, r_min=None,
                rim=None) -> list[dict]:
        """Up to ``n`` round lesions inside ``region`` (free voxels only); a draw that would be
        mostly clipped is skipped. ``rim``: HU added to the outer shell on a contrast scan.
        Returns one dict per lesion: center, r (mm), hu, mask."""
        cv, rng, occupied = self.cv, self.rng, self.occupied
        out = []
        for _ in range(n):
            r = uniform(rng, *r_range) * self.scale
            placed = place_sphere(cv, region & ~occupied, r, rng, depth=depth, prefer=prefer,
                                  r_min=r_min)
            if placed is None:
                continue
            c, r = placed
            sl, q = cv.ellipsoid(c, (r, r, r))
            m = np.zeros(cv.shape, bool)
            m[sl] = q <= 1.0
            m &= region & ~occupied
            if m.sum() * cv.voxel_ml * 1000 < 0.45 * (4 / 3) * math.pi * r**3:
                continue  # mostly clipped; try the next draw
            value = uniform(rng, *hu_range)
            cv.hu[m] = value
            if rim is not None and self.phantom.contrast:
                outer = np.zeros(cv.shape, bool)
                outer[sl] = q >= 0.55
                cv.hu[m & outer] = value + rim
            self.add(disease_id, m)
            out.append({"center": c, "r": r, "hu": value, "mask": m})
        return out

    def at_least_one_sphere(self, disease_id, region, r_range, n, hu_range, **kw) -> list[dict]:
        """``spheres``, retried one at a time (five times at most) until one is placed."""
        out = self.spheres(disease_id, region, r_range, n, hu_range, **kw)
        tries = 0
        while not out and tries < 5:
            out = self.spheres(disease_id, region, r_range, 1, hu_range, **kw)
            tries += 1
        if not out:
            raise RuntimeError(f"could not place a {disease_id} lesion")
        return out

    # -- where a lesion lies, in the report's words
    def pole(self, kidney: np.ndarray, point) -> str:
        w = self.cv.relative_position(kidney, point)[2]
        return "upper pole" if w > 0.62 else "lower pole" if w < 0.38 else "interpolar region"

    def liver_location(self, liver: np.ndarray, lesion: dict) -> dict:
        """Size, Couinaud segment and HU of a liver lesion."""
        u, v, w = self.cv.relative_position(liver, lesion["center"])  # u: 0 = left, 1 = right
        if u < 0.3:
            segment = "II" if w > 0.5 else "III"
        elif u < 0.45:
            segment = "IVa" if w > 0.5 else "IVb"
        elif v > 0.5:
            segment = "VIII" if w > 0.5 else "V"
        else:
            segment = "VII" if w > 0.5 else "VI"
        return {"size": round(2 * lesion["r"]), "segment": segment, "hu": round(lesion["hu"])}


# --------------------------------------------------------------------------------------------
# signs that grow their organ
# --------------------------------------------------------------------------------------------


def _paint_adrenal_nodule(painter: SignPainter) -> dict:
    cv, lab, rng = painter.cv, painter.lab, painter.rng
    side = painter.side()
    adrenal = painter.phantom.adrenals[side]
    r = uniform(rng, 8, 14) * painter.scale
    sgn = 1 if side == "right" else -1
    c = adrenal.centre + np.array([sgn * r * 0.45, -r * 0.2,
                                   uniform(rng, -0.3, 0.3) * adrenal.radii[2]])
    soft = [0, adrenal.class_id, TOTALSEG.liver, TOTALSEG.spleen, TOTALSEG.pancreas,
            TOTALSEG.stomach, TOTALSEG.small_bowel, TOTALSEG.colon]
    sl, q = cv.ellipsoid(c, (r, r, r))
    m = np.zeros(cv.shape, bool)
    m[sl] = (q <= 1.0) & painter.phantom.inner[sl] & np.isin(lab[sl], soft)
    lab[m] = adrenal.class_id
    value = uniform(rng, 10, 30)
    cv.hu[m] = value
    painter.add("adrenal_nodule", m)
    return {"side": side, "size": round(2 * r), "hu": round(value)}


def _paint_kidney_cyst(painter: SignPainter) -> dict:
    """A cyst that may be exophytic: it grows the kidney label into the fat around it."""
    cv, lab, rng = painter.cv, painter.lab, painter.rng
    side = painter.side()
    class_id = painter.phantom.kidneys[side].class_id
    kidney = lab == class_id
    r = uniform(rng, 8, 18) * painter.scale
    c, r = place_sphere(cv, kidney, r, rng, depth=0.55, r_min=6.0)
    sl, q = cv.ellipsoid(c, (r, r, r))
    m = np.zeros(cv.shape, bool)
    m[sl] = (q <= 1.0) & painter.phantom.inner[sl] & np.isin(lab[sl], [0, class_id])
    lab[m] = class_id
    value = uniform(rng, 0, 10)
    cv.hu[m] = value
    painter.add("kidney_cyst", m)
    return {"side": side, "size": round(2 * r), "pole": painter.pole(kidney, c)}


# --------------------------------------------------------------------------------------------
# diffuse signs painted into their organ
# --------------------------------------------------------------------------------------------


def _paint_hydronephrosis(painter: SignPainter) -> dict:
    """Fluid in the central part of the kidney(s)."""
    cv, lab, rng = painter.cv, painter.lab, painter.rng
    sides = painter.sides(0.4, 0.4, 0.2)
    region = np.zeros(cv.shape, bool)
    for side in sides:
        kidney = painter.phantom.kidneys[side]
        sl, q = cv.ellipsoid(kidney.centre, kidney.radii * 0.74, kidney.rotation)
        if sl is None:
            continue
        region[sl] |= (q <= 1.0) & (lab[sl] == kidney.class_id)
    region &= ~painter.occupied
    cv.hu[region] = uniform(rng, 0, 10)
    painter.add("hydronephrosis", region, occupy=False)
    return {"sides": sides, "grade": "moderate" if rng.random() < 0.6 else "severe"}


def _paint_pleural_effusion(painter: SignPainter) -> dict:
    """A fluid layer in the dependent part of the lower lobe(s)."""
    cv, lab, rng = painter.cv, painter.lab, painter.rng
    sides = painter.sides(0.3, 0.3, 0.4)
    ys = cv.axes[1][None, :, None]
    depths = []
    for side in sides:
        lobe = lab == getattr(TOTALSEG, f"lung_lower_lobe_{side}")
        yy = np.flatnonzero(lobe.any(axis=(0, 2)))
        if yy.size == 0:
            continue
        depth = uniform(rng, 22, 50)
        y_posterior = cv.axes[1][yy[0]]
        painter.effusion |= lobe & (ys < y_posterior + depth)
        depths.append(depth)
    cv.hu[painter.effusion] = uniform(rng, 5, 20)
    painter.add("pleural_effusion", painter.effusion.copy(), occupy=False)
    return {"sides": sides, "size": "small" if max(depths) < 32 else "moderate"}


def _paint_emphysema(painter: SignPainter) -> dict:
    """Low lung attenuation (``_emphysematous_lung_hu``) and bullae in the upper lobes."""
    cv, lab, rng = painter.cv, painter.lab, painter.rng
    lung = anatomy_mask(lab, "lung")
    upper = np.isin(lab, [TOTALSEG.lung_upper_lobe_left, TOTALSEG.lung_upper_lobe_right])
    effusion = painter.effusion
    bullae = []
    for _ in range(int(rng.integers(2, 6))):
        placed = place_sphere(cv, upper & ~effusion, uniform(rng, 10, 24), rng, depth=0.6)
        if placed is None:
            continue
        c, r = placed
        m = sphere_mask(cv, c, r) & lung & ~effusion
        cv.hu[m] = -1000.0
        bullae.append(round(2 * r))
    painter.add("emphysema", lung & ~effusion, occupy=False)
    return {"bullae": bullae}


def _emphysematous_lung_hu(rng) -> float:
    return draw_hu(rng, -950, 6)


# --------------------------------------------------------------------------------------------
# local signs inside their organ
# --------------------------------------------------------------------------------------------


def _paint_liver_cyst(painter: SignPainter) -> dict:
    rng = painter.rng
    liver = painter.lab == TOTALSEG.liver
    out = painter.at_least_one_sphere("liver_cyst", liver, (6, 15), int(rng.integers(1, 4)),
                                      (0, 10), depth=0.9, r_min=5.0)
    return {"lesions": [painter.liver_location(liver, o) for o in out]}


def _paint_liver_metastasis(painter: SignPainter) -> dict:
    rng = painter.rng
    liver = painter.lab == TOTALSEG.liver
    out = painter.at_least_one_sphere("liver_metastasis", liver, (5, 12), int(rng.integers(3, 9)),
                                      (20, 35), depth=0.9, r_min=5.0, rim=uniform(rng, 15, 30))
    return {"lesions": [painter.liver_location(liver, o) for o in out]}


def _paint_lung_nodule(painter: SignPainter) -> dict:
    lab, rng = painter.lab, painter.rng
    lung = anatomy_mask(lab, "lung") & ~painter.effusion
    out = painter.at_least_one_sphere("lung_nodule", lung, (4.5, 8), int(rng.integers(1, 4)),
                                      (20, 60), depth=1.0, r_min=4.5)
    for o in out:
        class_id = int(np.bincount(lab[o.pop("mask")]).argmax())
        o["lobe"] = LOBE_TEXT[catalog.totalseg_classes("v2")[class_id]]
        o["size"] = round(2 * o["r"])
    return {"lesions": out}


def _paint_gallstone(painter: SignPainter) -> dict:
    rng = painter.rng
    gallbladder = painter.lab == TOTALSEG.gallbladder
    out = painter.at_least_one_sphere("gallstone", gallbladder, (3.5, 7), int(rng.integers(1, 4)),
                                      (300, 800), depth=1.0, prefer="dependent", r_min=3.0)
    return {"lesions": [{"size": round(2 * o["r"])} for o in out]}


def _paint_renal_calculus(painter: SignPainter) -> dict:
    cv, rng = painter.cv, painter.rng
    side = painter.side()
    organ = painter.phantom.kidneys[side]
    kidney = painter.lab == organ.class_id
    # bias towards the central collecting system
    sl, q = cv.ellipsoid(organ.centre, organ.radii * 0.8, organ.rotation)
    central = np.zeros(cv.shape, bool)
    central[sl] = q <= 1.0
    region = kidney & central if (kidney & central & ~painter.occupied).any() else kidney
    out = painter.at_least_one_sphere("renal_calculus", region, (3.0, 5.0), int(rng.integers(1, 3)),
                                      (600, 1200), depth=1.0, r_min=3.0)
    return {"side": side,
            "lesions": [{"size": round(2 * o["r"]), "pole": painter.pole(kidney, o["center"])}
                        for o in out]}


def _paint_bladder_stone(painter: SignPainter) -> dict:
    bladder = painter.lab == TOTALSEG.urinary_bladder
    out = painter.at_least_one_sphere("bladder_stone", bladder, (4, 8), 1, (400, 900), depth=1.0,
                                      prefer="dependent", r_min=4.0)
    return {"size": round(2 * out[0]["r"])}


# --------------------------------------------------------------------------------------------
# diffuse signs of the organ itself, recorded as its final mask
# --------------------------------------------------------------------------------------------


def _fatty_liver_hu(rng) -> float:
    return uniform(rng, -10, 15)


def _paint_fatty_liver(painter: SignPainter) -> dict:
    region = (painter.lab == TOTALSEG.liver) & ~painter.occupied
    record = {"hu": round(float(np.median(painter.cv.hu[region])))}
    painter.add("fatty_liver", region, occupy=False)
    return record


def _atrophic_kidney_sides(rng) -> list[str]:
    return [["left"], ["right"], ["left", "right"]][rng.choice(3, p=[0.4, 0.4, 0.2])]


def _atrophic_kidney(rng, radii) -> KidneyChange:
    return KidneyChange(radii * uniform(rng, 0.58, 0.68), enhanced_cortex_drop=25,
                        medulla_fraction=0.45)


def _paint_kidney_atrophy(painter: SignPainter) -> dict:
    sides = painter.phantom.changed_kidneys
    m = np.zeros(painter.cv.shape, bool)
    lengths = {}
    for side in sides:
        kidney = painter.lab == painter.phantom.kidneys[side].class_id
        m |= kidney
        lengths[side] = painter.cv.extent_cm(kidney, 2)
    painter.add("kidney_atrophy", m, occupy=False)
    return {"sides": sides, "lengths": lengths}


def _enlarged_spleen(rng, centre, radii):
    f = uniform(rng, 1.5, 1.8)
    centre = centre + np.array([0.0, (f - 1) * radii[1] * 0.35, -(f - 1) * radii[2] * 0.6])
    return centre, radii * np.array([1.0 + (f - 1) * 0.5, f, f])


def _paint_splenomegaly(painter: SignPainter) -> dict:
    spleen = painter.lab == TOTALSEG.spleen
    painter.add("splenomegaly", spleen, occupy=False)
    return {"cm": painter.cv.extent_cm(spleen, 2)}


def _enlarged_heart(rng, centre, radii):
    f = uniform(rng, 1.3, 1.45)
    g = 1.0 + (f - 1.0) * 0.6
    centre = centre + np.array([-(f - 1) * radii[0] * 0.35, 0.0, -(g - 1) * radii[2] * 0.3])
    return centre, radii * np.array([f, g, g])


def _paint_cardiomegaly(painter: SignPainter) -> dict:
    heart = anatomy_mask(painter.lab, "heart")
    painter.add("cardiomegaly", heart, occupy=False)
    return {"cm": painter.cv.extent_cm(heart, 0)}


def _thin_pancreas(rng) -> tuple[float, float]:
    thickness = uniform(rng, 0.45, 0.55)
    return thickness, uniform(rng, 10, 28)


def _paint_pancreas_atrophy(painter: SignPainter) -> dict:
    painter.add("pancreas_atrophy", painter.lab == TOTALSEG.pancreas, occupy=False)
    return {}


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoDisease:
    """One demo disease: its anatomy hooks, its painter and the keys of what it records."""
    id: str
    paint: Callable[[SignPainter], dict]  # paints the sign, adds its Lesion(s), returns the record
    records: tuple[str, ...]  # keys of the record (read by report_text.WORDING[id])
    alters: Mapping[str, Callable] = field(default_factory=dict)  # AnatomyChanges field -> hook


DISEASES: dict[str, DemoDisease] = {d.id: d for d in (  # in painting order (see the docstring)
    DemoDisease("adrenal_nodule", _paint_adrenal_nodule, ("side", "size", "hu")),
    DemoDisease("kidney_cyst", _paint_kidney_cyst, ("side", "size", "pole")),
    DemoDisease("hydronephrosis", _paint_hydronephrosis, ("sides", "grade")),
    DemoDisease("pleural_effusion", _paint_pleural_effusion, ("sides", "size")),
    DemoDisease("emphysema", _paint_emphysema, ("bullae",),
                alters={"lung_hu": _emphysematous_lung_hu}),
    DemoDisease("liver_cyst", _paint_liver_cyst, ("lesions",)),  # size, segment, hu each
    DemoDisease("liver_metastasis", _paint_liver_metastasis, ("lesions",)),  # size, segment, hu
    DemoDisease("lung_nodule", _paint_lung_nodule, ("lesions",)),  # center, r, hu, lobe, size
    DemoDisease("gallstone", _paint_gallstone, ("lesions",)),  # size
    DemoDisease("renal_calculus", _paint_renal_calculus, ("side", "lesions")),  # size, pole
    DemoDisease("bladder_stone", _paint_bladder_stone, ("size",)),
    DemoDisease("fatty_liver", _paint_fatty_liver, ("hu",), alters={"liver_hu": _fatty_liver_hu}),
    DemoDisease("kidney_atrophy", _paint_kidney_atrophy, ("sides", "lengths"),
                alters={"kidney_sides": _atrophic_kidney_sides, "kidney": _atrophic_kidney}),
    DemoDisease("splenomegaly", _paint_splenomegaly, ("cm",), alters={"spleen": _enlarged_spleen}),
    DemoDisease("cardiomegaly", _paint_cardiomegaly, ("cm",), alters={"heart": _enlarged_heart}),
    DemoDisease("pancreas_atrophy", _paint_pancreas_atrophy, (),
                alters={"pancreas": _thin_pancreas}),
)}


def anatomy_changes(labels: dict[str, int]) -> AnatomyChanges:
    """The anatomy hooks of the positive diseases in ``labels``."""
    hooks: dict[str, Callable] = {}
    for disease in DISEASES.values():
        if not labels.get(disease.id):
            continue
        for name, hook in disease.alters.items():
            if name in hooks:
                raise ValueError(f"two demo diseases alter the same anatomy hook {name!r}")
            hooks[name] = hook
    return AnatomyChanges(**hooks)


def render_signs(phantom: Phantom, labels: dict[str, int], rng: np.random.Generator,
                 lesion_scale: float = 1.0) -> tuple[list[Lesion], dict[str, dict]]:
    """Paint the sign of every positive disease, in registry order, onto the phantom's canvas;
    returns the lesions and each positive disease's record. ``lesion_scale`` multiplies the drawn
    radius of every local lesion (a lesion that does not fit shrinks, as at scale 1)."""
    painter = SignPainter(phantom, rng, lesion_scale)
    records: dict[str, dict] = {}
    for disease in DISEASES.values():
        if not labels.get(disease.id):
            continue
        record = disease.paint(painter)
        if set(record) != set(disease.records):
            raise RuntimeError(f"{disease.id} recorded {sorted(record)}, not {disease.records}")
        records[disease.id] = record
    return painter.lesions, records
