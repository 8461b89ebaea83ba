"""The normal anatomy phantom of the demo cohort, lung apex to bladder floor, labelled with
TotalSegmentator v2 class ids (``ctvlp.catalog``).

``render_anatomy`` draws the scan grid (spacing, table position), the patient's size and contrast
phase, and paints body wall, muscles, lungs (five lobes), heart, bowel, stomach, liver, gallbladder,
spleen, pancreas, kidneys, adrenals, bladder, vessels, airway, esophagus and bones (vertebrae,
sacrum, hips, sternum, ribs). A disease that changes an organ itself (size, attenuation) does so
through an ``AnatomyChanges`` hook, supplied by its entry in ``lesions.DISEASES``; the anatomy
knows nothing of diseases. Every draw comes from one generator in a fixed order, so a case is a
deterministic function of that generator's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ctvlp import catalog

from .canvas import Canvas, draw_hu, on_spacing_grid, rotation, uniform

FOV_MM = (340.0, 260.0, 520.0)  # x (left-right), y (anterior-posterior), z (cranio-caudal)
INPLANE_MM = (1.6, 2.6)
SLICE_MM = (2.5, 4.5)


class _TotalSegClassIds:
    """``TOTALSEG.liver`` is the TotalSegmentator v2 class id of "liver"."""

    def __getattr__(self, name: str) -> int:
        return catalog.class_id(name, "v2")


TOTALSEG = _TotalSegClassIds()
VERTEBRAE = [  # (class name, centre z mm rel. to body centre, height mm)
    ("vertebrae_T4", 229, 21),
    ("vertebrae_T5", 203, 21),
    ("vertebrae_T6", 177, 21),
    ("vertebrae_T7", 151, 21),
    ("vertebrae_T8", 125, 22),
    ("vertebrae_T9", 99, 22),
    ("vertebrae_T10", 73, 22),
    ("vertebrae_T11", 47, 22),
    ("vertebrae_T12", 20, 23),
    ("vertebrae_L1", -8, 25),
    ("vertebrae_L2", -38, 26),
    ("vertebrae_L3", -68, 26),
    ("vertebrae_L4", -98, 26),
    ("vertebrae_L5", -127, 25),
]


def anatomy_mask(lab: np.ndarray, anatomy: str) -> np.ndarray:
    """Voxels of the label volume ``lab`` whose class belongs to the catalog anatomy ``anatomy``."""
    lut = catalog.class_to_anatomy_lut("v2")
    return lut[lab] == catalog.anatomy_by_name(anatomy).index


class Organ(NamedTuple):
    """An organ painted as one ellipsoid, for the signs placed in it later."""
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    class_id: int


@dataclass(frozen=True)
class KidneyChange:
    """How a changed kidney differs from a normal one."""
    radii: np.ndarray  # its semi-axes (mm)
    enhanced_cortex_drop: float  # HU taken off its cortex on a contrast-enhanced scan
    medulla_fraction: float  # radius fraction of its inner (medulla) shell; a normal kidney 0.65


_MoveAndResize = Callable[[np.random.Generator, np.ndarray, np.ndarray], tuple]  # -> centre, radii


@dataclass(frozen=True)
class AnatomyChanges:
    """Hooks by which a disease alters the normal organs; None keeps the organ normal. Each hook
    draws from the anatomy's generator at the point where the organ is drawn."""
    lung_hu: Callable[[np.random.Generator], float] | None = None
    heart: _MoveAndResize | None = None
    liver_hu: Callable[[np.random.Generator], float] | None = None
    spleen: _MoveAndResize | None = None
    pancreas: Callable[[np.random.Generator], tuple[float, float]] | None = None  # (thickness, hu)
    kidney_sides: Callable[[np.random.Generator], list[str]] | None = None  # which kidneys change
    kidney: Callable[[np.random.Generator, np.ndarray], KidneyChange] | None = None


@dataclass
class Phantom:
    canvas: Canvas
    contrast: bool
    inner: np.ndarray  # inside the abdominal/thoracic muscle wall
    kidneys: dict[str, Organ]  # "left"/"right"
    adrenals: dict[str, Organ]
    changed_kidneys: list[str] = field(default_factory=list)  # sides altered by ``kidney``


class _Body:
    """Organ positions and sizes relative to the body centre, scaled by the patient, jittered."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, scale: float):
        self.rng, self.centre, self.scale = rng, centre, scale

    def at(self, x, y, z, jitter=3.0) -> np.ndarray:
        wobble = self.rng.normal(0, jitter, 3).clip(-2 * jitter, 2 * jitter)
        return self.centre + self.scale * (np.array([x, y, z], float) + wobble)

    def radii(self, *r, jitter=0.07) -> np.ndarray:
        return self.scale * np.array(r, float) * self.rng.uniform(1 - jitter, 1 + jitter, 3)

    def hu(self, mean, sd=4.0) -> float:
        return draw_hu(self.rng, mean, sd)

    def uniform(self, low, high) -> float:
        return uniform(self.rng, low, high)


@dataclass
class _Wall:
    """The body's cross-section per slice: semi-axes (mm, per z) outside fat and muscle."""
    semi_x: np.ndarray
    semi_y: np.ndarray
    fat: float
    muscle: float
    below_fat: np.ndarray  # inside the subcutaneous fat
    inner: np.ndarray  # inside the muscle wall


def render_anatomy(rng: np.random.Generator, changes: AnatomyChanges) -> Phantom:
    """Paint the normal anatomy (altered by ``changes``) on a fresh canvas."""
    contrast = bool(rng.random() < 0.8)
    cv, body = _grid(rng)
    wall = _body_wall(cv, body)
    inner = wall.inner
    _back_muscles(cv, body, wall)
    _lungs(cv, body, inner, changes)
    _heart(cv, body, inner, contrast, changes)
    _bowel(cv, body, inner)
    _stomach(cv, body, inner)
    _liver_and_gallbladder(cv, body, inner, changes)
    _spleen(cv, body, inner, changes)
    _pancreas(cv, body, inner, changes)
    changed_kidneys = changes.kidney_sides(rng) if changes.kidney_sides else []
    kidneys = _kidneys(cv, body, inner, contrast, changed_kidneys, changes)
    adrenals = _adrenals(cv, body, inner)
    cv.ellipsoid_paint(body.at(0, 35, -172), body.radii(42, 34, 28, jitter=0.15),
                       TOTALSEG.urinary_bladder, body.hu(5, 3), clip=inner)
    _vessels(cv, body, inner, contrast)
    _airway_and_esophagus(cv, body, inner)
    _spine_and_pelvis(cv, body, wall.below_fat)
    _ribs(cv, body, wall)
    return Phantom(cv, contrast, inner, kidneys, adrenals, changed_kidneys)


def _grid(rng) -> tuple[Canvas, _Body]:
    spacing_xy = on_spacing_grid(uniform(rng, *INPLANE_MM))
    spacing_z = on_spacing_grid(uniform(rng, *SLICE_MM))
    spacing = np.array([spacing_xy, spacing_xy, spacing_z])
    shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, spacing))
    origin = -(np.array(shape) - 1) * spacing / 2.0
    # table position; small in z so that the lungs (apex) and bladder stay inside the scan
    origin += on_spacing_grid(rng.uniform([-20, -20, -8], [20, 20, 8]))
    cv = Canvas(shape, spacing, origin)
    scale = uniform(rng, 0.9, 1.1)  # the patient's size
    centre = origin + (np.array(shape) - 1) * spacing / 2.0 + rng.uniform(-10, 10, 3)
    return cv, _Body(rng, centre, scale)


def _body_wall(cv: Canvas, body: _Body) -> _Wall:
    """Elliptic cylinder with z-varying semi-axes, subcutaneous fat and muscle wall; the interior
    (inside the muscle wall) scales with the patient, muscle and fat add outwards."""
    s, centre = body.scale, body.centre
    z_knots = np.array([-260, -150, -90, 0, 80, 160, 260], float)
    x_knots = np.array([118, 120, 112, 110, 114, 112, 104], float)
    y_knots = np.array([76, 78, 82, 84, 84, 80, 74], float)
    z_rel = (cv.axes[2] - centre[2]) / s
    fat = body.uniform(8, 25)
    muscle = body.uniform(7, 12)
    semi_x = np.interp(z_rel, z_knots, x_knots) * s + fat + muscle
    semi_y = np.interp(z_rel, z_knots, y_knots) * s + fat + muscle
    x = (cv.axes[0] - centre[0])[:, None, None]
    y = (cv.axes[1] - centre[1])[None, :, None]

    def inside(a, b):
        return (x / a[None, None, :]) ** 2 + (y / b[None, None, :]) ** 2 <= 1.0

    skin = inside(semi_x, semi_y)
    below_fat = inside(semi_x - fat, semi_y - fat)
    inner = inside(semi_x - fat - muscle, semi_y - fat - muscle)
    cv.hu[skin] = body.hu(-100, 6)
    cv.hu[below_fat] = body.hu(45, 4)
    cv.hu[inner] = body.hu(-90, 6)
    return _Wall(semi_x, semi_y, fat, muscle, below_fat, inner)


def _back_muscles(cv: Canvas, body: _Body, wall: _Wall) -> None:
    """Paraspinal and psoas muscles (may lie within the muscle wall)."""
    at, s = body.at, body.scale
    for side, sgn in (("left", -1), ("right", 1)):
        cv.tube_paint([at(sgn * 30, -82, 240, 0), at(sgn * 30, -84, 40, 0),
                       at(sgn * 28, -80, -150, 0)],
                      24 * s, getattr(TOTALSEG, f"autochthon_{side}"), body.hu(50),
                      clip=wall.below_fat)
    for side, sgn in (("left", -1), ("right", 1)):
        cv.tube_paint([at(sgn * 32, -48, 0, 0), at(sgn * 48, -40, -110, 0),
                       at(sgn * 72, -5, -215, 0)],
                      17 * s, getattr(TOTALSEG, f"iliopsoas_{side}"), body.hu(50), clip=wall.inner)


def _lungs(cv: Canvas, body: _Body, inner, changes: AnatomyChanges) -> None:
    """Two ellipsoids, split into lobes by fissure planes."""
    lung_hu = changes.lung_hu(body.rng) if changes.lung_hu else body.hu(-850, 12)
    for side, sgn in (("right", 1), ("left", -1)):
        c = body.at(sgn * 70 + (0 if sgn > 0 else -5), -8, 118)
        r = body.radii(60 if sgn > 0 else 56, 88, 100)
        sl, q = cv.ellipsoid(c, r)
        if sl is None:
            continue
        lung = (q <= 1.0) & inner[sl]
        _, dy, dz = cv.offsets(sl, c)
        # oblique fissure: the lower lobe is posterior-inferior
        lower = (dz < -0.85 * dy + 0.05 * r[2]) & lung
        upper = lung & ~lower
        if side == "right":
            middle = upper & (dz < 0.05 * r[2])  # horizontal fissure
            cv.paint(sl, upper & ~middle, TOTALSEG.lung_upper_lobe_right, lung_hu)
            cv.paint(sl, middle, TOTALSEG.lung_middle_lobe_right, lung_hu)
            cv.paint(sl, lower, TOTALSEG.lung_lower_lobe_right, lung_hu)
        else:
            cv.paint(sl, upper, TOTALSEG.lung_upper_lobe_left, lung_hu)
            cv.paint(sl, lower, TOTALSEG.lung_lower_lobe_left, lung_hu)


def _heart(cv: Canvas, body: _Body, inner, contrast: bool, changes: AnatomyChanges) -> None:
    """Anterior-left; contrast blood pool inside a myocardial wall."""
    radii = body.radii(62, 48, 52)
    centre = body.at(-22, 22, 80)
    if changes.heart:
        centre, radii = changes.heart(body.rng, centre, radii)
    rot = rotation(rz=body.uniform(25, 40), ry=body.uniform(-15, -5))
    blood = body.hu(130, 10) if contrast else body.hu(40, 3)
    cv.ellipsoid_paint(centre, radii, TOTALSEG.heart,
                       body.hu(95, 6) if contrast else body.hu(45, 3),
                       rot=rot, clip=inner, shell=(0.8, blood))


def _bowel(cv: Canvas, body: _Body, inner) -> None:
    """Small bowel loops and colon (painted before the solid organs, which override them)."""
    rng, at, s = body.rng, body.at, body.scale
    small_bowel_hu = body.hu(40)
    for _ in range(int(rng.integers(9, 14))):
        p0 = at(body.uniform(-60, 60), body.uniform(-15, 55), body.uniform(-135, -45), 0)
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        p1 = p0 + direction * s * body.uniform(20, 45)
        loop_r = s * body.uniform(11, 15)
        content = -950.0 if rng.random() < 0.25 else body.hu(15, 5)
        cv.tube_paint([p0, p1], loop_r, TOTALSEG.small_bowel, small_bowel_hu, clip=inner,
                      lumen=(loop_r - 3 * s, content))
    colon_pts = [at(0, -35, -205), at(0, -38, -172), at(-30, -15, -150), at(-55, 5, -130),
                 at(-95, -5, -110), at(-98, -8, -40), at(-88, 35, -10), at(-40, 55, -30),
                 at(40, 55, -35), at(92, 30, -20), at(96, 0, -60), at(92, 5, -125)]
    colon_r = 21 * s
    for p0, p1 in zip(colon_pts[:-1], colon_pts[1:]):
        sl, dist = cv.capsule(p0, p1, colon_r)
        if sl is None:
            continue
        cv.paint(sl, dist <= colon_r, TOTALSEG.colon, body.hu(40), clip=inner)
        lumen = (dist <= colon_r - 3 * s) & (cv.lab[sl] == TOTALSEG.colon)
        if rng.random() < 0.55:  # gas, with an air-fluid level for the dependent part
            _, dy, _ = cv.offsets(sl, (p0 + p1) / 2)
            cv.paint(sl, lumen & (dy > -0.3 * colon_r), None, -950.0)
            cv.paint(sl, lumen & (dy <= -0.3 * colon_r), None, body.hu(10, 5))
        else:  # mottled stool
            mottled = rng.random(lumen.shape) < 0.3
            stool_hu = np.where(mottled, -600.0, body.hu(-20, 10)).astype(np.float32)
            cv.paint(sl, lumen, None, stool_hu)


def _stomach(cv: Canvas, body: _Body, inner) -> None:
    """Wall, fluid, anterior (non-dependent) gas."""
    centre, radii = body.at(-48, 22, 18), body.radii(42, 34, 48)
    rot = rotation(rz=body.uniform(-20, 0))
    sl, q = cv.ellipsoid(centre, radii, rot)
    if sl is not None:
        cv.paint(sl, q <= 1, TOTALSEG.stomach, body.hu(45), clip=inner)
        lumen = (q <= 0.72) & (cv.lab[sl] == TOTALSEG.stomach)
        _, dy, _ = cv.offsets(sl, centre)
        gas_level = body.uniform(-0.2, 0.6) * radii[1]
        cv.paint(sl, lumen & (dy > gas_level), None, -950.0)
        cv.paint(sl, lumen & (dy <= gas_level), None, body.hu(12, 5))


def _liver_and_gallbladder(cv: Canvas, body: _Body, inner, changes: AnatomyChanges) -> None:
    """Liver (right lobe + left lobe) and the gallbladder in the fossa under it."""
    at, radii = body.at, body.radii
    liver_hu = changes.liver_hu(body.rng) if changes.liver_hu else body.uniform(55, 65)
    cv.ellipsoid_paint(at(60, -5, 15), radii(66, 76, 70), TOTALSEG.liver, liver_hu, clip=inner)
    cv.ellipsoid_paint(at(2, 34, 30), radii(56, 34, 34), TOTALSEG.liver, liver_hu,
                       rot=rotation(rz=body.uniform(-10, 10)), clip=inner)
    gb_centre, gb_radii = at(42, 40, -22), radii(15, 16, 34)
    cv.ellipsoid_paint(gb_centre, gb_radii, TOTALSEG.gallbladder, body.hu(35),
                       rot=rotation(ry=body.uniform(-25, -10)), clip=inner,
                       shell=(0.75, body.hu(10, 4)))


def _spleen(cv: Canvas, body: _Body, inner, changes: AnatomyChanges) -> None:
    """Posterolateral left."""
    centre, radii = body.at(-82, -36, 20), body.radii(26, 45, 52)
    if changes.spleen:
        centre, radii = changes.spleen(body.rng, centre, radii)
    cv.ellipsoid_paint(centre, radii, TOTALSEG.spleen, body.hu(50),
                       rot=rotation(rz=body.uniform(15, 30)), clip=inner)


def _pancreas(cv: Canvas, body: _Body, inner, changes: AnatomyChanges) -> None:
    """Head, body, tail."""
    pancreas_hu = body.hu(45)
    thickness = 1.0
    if changes.pancreas:
        thickness, pancreas_hu = changes.pancreas(body.rng)
    for c, r in (((24, -4, -24), (18, 15, 19)), ((-12, 6, -13), (30, 11, 13)),
                 ((-52, -12, -3), (26, 10, 11))):
        part_radii = body.radii(*r)
        part_radii[1] *= thickness
        part_radii[2] *= thickness
        cv.ellipsoid_paint(body.at(*c, jitter=2.0), part_radii, TOTALSEG.pancreas, pancreas_hu,
                           clip=inner)


def _kidneys(cv: Canvas, body: _Body, inner, contrast: bool, changed: list[str],
             changes: AnatomyChanges) -> dict[str, Organ]:
    """Right lower than left; enhancing cortex around the medulla."""
    kidneys = {}
    for side, sgn, z in (("right", 1, -45), ("left", -1, -34)):
        centre, radii = body.at(sgn * 68, -46, z), body.radii(27, 28, 52)
        change = changes.kidney(body.rng, radii) if side in changed else None
        if change is not None:
            radii = change.radii
        rot = rotation(rz=sgn * body.uniform(15, 30), ry=sgn * body.uniform(8, 18))
        class_id = getattr(TOTALSEG, f"kidney_{side}")
        cortex = body.hu(150, 12) if contrast else body.hu(35, 3)
        medulla = body.hu(105, 10) if contrast else body.hu(30, 3)
        if change is not None and contrast:
            cortex -= change.enhanced_cortex_drop
        medulla_fraction = change.medulla_fraction if change is not None else 0.65
        cv.ellipsoid_paint(centre, radii, class_id, cortex, rot=rot, clip=inner,
                           shell=(medulla_fraction, medulla))
        kidneys[side] = Organ(centre, radii, rot, class_id)
    return kidneys


def _adrenals(cv: Canvas, body: _Body, inner) -> dict[str, Organ]:
    """Above and medial to the upper poles."""
    adrenals = {}
    for side, sgn, z in (("right", 1, 20), ("left", -1, 27)):
        centre, radii = body.at(sgn * 44, -38, z, 2.0), body.radii(6, 13, 18)
        class_id = getattr(TOTALSEG, f"adrenal_gland_{side}")
        rot = rotation(rz=sgn * 30)
        cv.ellipsoid_paint(centre, radii, class_id, body.hu(30), rot=rot, clip=inner)
        adrenals[side] = Organ(centre, radii, rot, class_id)
    return adrenals


def _vessels(cv: Canvas, body: _Body, inner, contrast: bool) -> None:
    at, s = body.at, body.scale
    arterial = body.hu(155, 15) if contrast else body.hu(42, 3)
    venous = body.hu(125, 12) if contrast else body.hu(40, 3)
    cv.tube_paint([at(4, 26, 110, 0), at(4, 26, 162, 0), at(-20, 14, 180, 0), at(-32, -14, 174, 0),
                   at(-30, -34, 158, 0), at(-29, -36, 60, 0), at(-18, -26, -10, 0),
                   at(-10, -20, -100, 0)], 12 * s, TOTALSEG.aorta, arterial, clip=inner)
    for side, sgn in (("left", -1), ("right", 1)):
        cv.tube_paint([at(-10, -20, -100, 0), at(sgn * 42, -14, -150, 0), at(sgn * 72, 5, -215, 0)],
                      6.5 * s, getattr(TOTALSEG, f"iliac_artery_{side}"), arterial, clip=inner)
        cv.tube_paint([at(18, -28, -105, 0), at(sgn * 36, -28, -150, 0), at(sgn * 66, -8, -215, 0)],
                      8 * s, getattr(TOTALSEG, f"iliac_vena_{side}"), venous, clip=inner)
    cv.tube_paint([at(18, -28, -105, 0), at(22, -22, -10, 0), at(28, -10, 40, 0), at(22, 5, 62, 0)],
                  11 * s, TOTALSEG.inferior_vena_cava, venous, clip=inner)
    cv.tube_paint([at(22, 5, 62, 0), at(14, 10, 150, 0)], 10 * s, TOTALSEG.superior_vena_cava,
                  venous, clip=inner)
    cv.tube_paint([at(52, 4, 8, 0), at(14, -6, -16, 0), at(-38, -14, -8, 0), at(-72, -30, 8, 0)],
                  6.5 * s, TOTALSEG.portal_vein_and_splenic_vein,
                  body.hu(150, 12) if contrast else venous, clip=inner)


def _airway_and_esophagus(cv: Canvas, body: _Body, inner) -> None:
    at, s = body.at, body.scale
    cv.tube_paint([at(0, 2, 240, 0), at(0, 0, 152, 0)], 10 * s, TOTALSEG.trachea, body.hu(30),
                  lumen=(7.5 * s, -990.0), clip=inner)
    for sgn in (1, -1):  # main bronchi
        cv.tube_paint([at(0, 0, 152, 0), at(sgn * 32, -6, 124, 0)], 7 * s, TOTALSEG.trachea,
                      body.hu(30), lumen=(5 * s, -990.0), clip=inner)
    cv.tube_paint([at(-4, -20, 240, 0), at(-8, -24, 90, 0), at(-18, -12, 45, 0), at(-32, 2, 28, 0)],
                  8.5 * s, TOTALSEG.esophagus, body.hu(38), lumen=(2.5 * s, -900.0), clip=inner)


def _spine_and_pelvis(cv: Canvas, body: _Body, below_fat) -> None:
    """Vertebrae with posterior elements, spinal cord, thecal sac, sacrum, hips, sternum."""
    at, radii, s = body.at, body.radii, body.scale
    for name, z, height in VERTEBRAE:
        class_id = getattr(TOTALSEG, name)
        rad = 19.0 if name.startswith("vertebrae_T") else 23.0
        cv.ellipsoid_paint(at(0, -52, z, 0), s * np.array([rad, rad * 0.85, height / 2]), class_id,
                           body.hu(650, 30), clip=below_fat, shell=(0.82, body.hu(270, 25)))
        cv.ellipsoid_paint(at(0, -82, z - 3, 0), s * np.array([24, 13, height / 2 - 1]), class_id,
                           body.hu(480, 30), clip=below_fat)
    cv.tube_paint([at(0, -76, 260, 0), at(0, -76, -10, 0)], 7 * s, TOTALSEG.spinal_cord,
                  body.hu(32), clip=below_fat)
    cv.tube_paint([at(0, -76, -10, 0), at(0, -78, -140, 0)], 6 * s, 0, body.hu(10))  # CSF
    cv.ellipsoid_paint(at(0, -64, -175, 0), radii(44, 17, 42), TOTALSEG.sacrum, body.hu(380, 25),
                       rot=rotation(rx=-25), clip=below_fat)
    for side, sgn in (("left", -1), ("right", 1)):
        class_id = getattr(TOTALSEG, f"hip_{side}")
        cv.ellipsoid_paint(at(sgn * 102, -30, -172, 0), radii(11, 52, 44), class_id,
                           body.hu(420, 25), rot=rotation(rz=-sgn * 30), clip=below_fat)
        cv.ellipsoid_paint(at(sgn * 86, 8, -212, 0), radii(24, 24, 20), class_id,
                           body.hu(420, 25), clip=below_fat)
    cv.tube_paint([at(0, 96, 230, 0), at(0, 98, 90, 0)], 9 * s, TOTALSEG.sternum,
                  body.hu(350, 25), clip=below_fat)


def _ribs(cv: Canvas, body: _Body, wall: _Wall) -> None:
    """Ribs 4..12 as bands just inside the muscle wall, sloping down anteriorly."""
    centre, s = body.centre, body.scale
    zs = cv.axes[2]
    x = (cv.axes[0] - centre[0])[:, None, None]
    y = (cv.axes[1] - centre[1])[None, :, None]
    rib_hu = body.hu(480, 30)
    for k, (_, vertebra_z, _) in enumerate(VERTEBRAE[:9]):  # T4..T12 -> ribs 4..12
        n = k + 4
        z0 = centre[2] + s * (vertebra_z - 6)
        ks = np.flatnonzero((zs > z0 - s * 95) & (zs < z0 + s * 8))
        if ks.size == 0:
            continue
        sl = (slice(None), slice(None), slice(ks[0], ks[-1] + 1))
        a = (wall.semi_x - wall.fat - wall.muscle * 0.2)[sl[2]][None, None, :]
        b = (wall.semi_y - wall.fat - wall.muscle * 0.2)[sl[2]][None, None, :]
        q = (x / a) ** 2 + (y / b) ** 2
        band = (q <= 1.0) & (q >= (1.0 - 8.0 * s / b) ** 2)
        z_rib = z0 + (y + 60 * s).clip(0, None) * (-0.45 if n < 11 else -0.2)  # slope anteriorly
        if n >= 11:
            band &= y < 0
        band &= np.abs(zs[sl[2]][None, None, :] - z_rib) < 4.5 * s
        band &= ~((np.abs(x) < 28 * s) & (y < -40 * s))  # spine
        band &= ~((np.abs(x) < 22 * s) & (y > 0))  # sternum / costal cartilage gap
        cv.paint(sl, band & (x < 0), catalog.class_id(f"rib_left_{n}", "v2"), rib_hu)
        cv.paint(sl, band & (x >= 0), catalog.class_id(f"rib_right_{n}", "v2"), rib_hu)
