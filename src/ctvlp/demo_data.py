"""Built-in synthetic cohort: CT-like volumes, TotalSegmentator v2 masks, reports and labels.

Every case is a deterministic function of ``(index, seed)``: a thorax-abdomen-pelvis CT in HU
(int16, array order (X, Y, Z) as nibabel stores it, RAS+ world coordinates in mm), a multilabel
organ mask with TotalSegmentator v2 class ids, ground-truth labels for the 16 diseases of the
``demo`` catalog, the rendered imaging sign of every positive disease, and a free-text radiology
report ("FINDINGS:" / "IMPRESSION:") that states every positive finding by its catalog name or one
of its synonyms and never states a negative one as present.

Orientation: in nibabel's RAS+ world space +x points to the patient's Right, +y Anterior and
+z Superior. Affines here are ``diag(sx, sy, sz)`` plus an origin, so the voxel index i grows
towards the patient's right: the liver and gallbladder lie at larger x than the spleen and the
stomach, and the heart lies slightly to the left (smaller x) of the midline.

Defaults: ``PREVALENCE = 0.2`` for every disease, drawn independently per case; ``write_cohort``
assigns splits by iterative stratification (deterministic from the seed), so a cohort of
``DEFAULT_N_CASES = 160`` with ``DEFAULT_SEED = 0`` has at least 3 positives of every disease in
each of the val and test splits (checked by the tests).

Rendering notes:
- Native spacing: in-plane 1.6-2.6 mm, slices 2.5-4.5 mm, rounded to multiples of 1/256 mm (so
  that NIfTI's float32 header fields hold them exactly); FOV 340 x 260 x 520 mm (lung apex to bladder floor).
- 80 % of the cases are contrast-enhanced (aorta ~155 HU, enhancing renal cortex ~150 HU, blood
  pool of the heart ~130 HU), the rest unenhanced (~40 HU); parenchymal organs keep the same HU.
- Lesion radii follow the brief, except lower bounds raised so that every sign stays visible after
  resampling to 5 mm: lung nodule r 4.5-8 mm, renal calculus r 3-5 mm, gallstone r 3.5-7 mm.
- Kidney cysts are labelled kidney_left/kidney_right (not TotalSegmentator's kidney_cyst_* classes),
  so the mask never gives a disease away; an adrenal nodule grows the adrenal label.
- ``Case.lesions`` holds one entry per local lesion and one entry per diffuse sign (its changed
  region: fatty liver = liver, emphysema = lung, effusion = fluid layer in the lower lobes, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctvlp import catalog

__all__ = [
    "Case",
    "Lesion",
    "DEFAULT_SEED",
    "DEFAULT_N_CASES",
    "PREVALENCE",
    "case_labels",
    "generate_case",
    "assign_splits",
    "write_cohort",
]

DEFAULT_SEED = 0
DEFAULT_N_CASES = 160
PREVALENCE = 0.2
SOURCE = "demo"

FOV_MM = (340.0, 260.0, 520.0)  # x (left-right), y (anterior-posterior), z (cranio-caudal)
INPLANE_MM = (1.6, 2.6)
SLICE_MM = (2.5, 4.5)
HU_MIN, HU_MAX = -1024, 3071
_SPACING_QUANTUM = 1.0 / 256.0  # spacing/origin on a dyadic grid: exact in NIfTI float32 fields


@dataclass
class Lesion:
    disease_id: str
    mask: np.ndarray  # bool, same shape as the image: voxels rendered for this sign


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # int16 HU, (X, Y, Z)
    mask: np.ndarray  # uint8 TotalSegmentator v2 class ids
    affine: np.ndarray  # 4x4 RAS+ mm
    spacing: tuple[float, float, float]
    labels: dict[str, int]
    lesions: list[Lesion] = field(default_factory=list)
    report: str = ""


# --------------------------------------------------------------------------------------------
# random streams
# --------------------------------------------------------------------------------------------


def _streams(index: int, seed: int) -> tuple[np.random.Generator, ...]:
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative integers")
    ss = np.random.SeedSequence([int(seed), int(index)])
    return tuple(np.random.default_rng(s) for s in ss.spawn(3))  # labels, geometry, text


def _disease_ids() -> list[str]:
    return [d.id for d in catalog.diseases("demo")]


def case_labels(index: int, seed: int) -> dict[str, int]:
    """Ground-truth labels of case ``index`` (cheap: no volume is rendered)."""
    rng = _streams(index, seed)[0]
    draws = rng.random(len(_disease_ids()))
    return {d: int(u < PREVALENCE) for d, u in zip(_disease_ids(), draws)}


# --------------------------------------------------------------------------------------------
# geometry: a canvas that paints primitives inside their bounding boxes only
# --------------------------------------------------------------------------------------------


def _rotation(rz: float = 0.0, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    a, b, c = np.deg2rad([rz, ry, rx])
    rz_m = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry_m = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx_m = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz_m @ ry_m @ rx_m


class _Canvas:
    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray):
        self.shape = shape
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.axes = [
            (self.origin[d] + np.arange(shape[d]) * self.spacing[d]).astype(np.float32)
            for d in range(3)
        ]
        self.hu = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)
        self.voxel_ml = float(np.prod(self.spacing)) / 1000.0

    # -- index helpers
    def bbox(self, lo, hi):
        sl = []
        for d in range(3):
            i0 = max(int(math.floor((lo[d] - self.origin[d]) / self.spacing[d])), 0)
            i1 = min(int(math.ceil((hi[d] - self.origin[d]) / self.spacing[d])) + 1, self.shape[d])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def offsets(self, sl, c):
        return (
            (self.axes[0][sl[0]] - np.float32(c[0]))[:, None, None],
            (self.axes[1][sl[1]] - np.float32(c[1]))[None, :, None],
            (self.axes[2][sl[2]] - np.float32(c[2]))[None, None, :],
        )

    def world(self, idx) -> np.ndarray:
        return self.origin + np.asarray(idx, float) * self.spacing

    # -- primitives: return (slices, q) with q = normalised squared radius (<= 1 inside)
    def ellipsoid(self, c, r, rot=None):
        c = np.asarray(c, float)
        r = np.maximum(np.asarray(r, float), 1e-3)
        if rot is None:
            ext = r
        else:
            ext = np.sqrt(((rot * r[None, :]) ** 2).sum(axis=1))
        sl = self.bbox(c - ext, c + ext)
        if sl is None:
            return None, None
        dx, dy, dz = self.offsets(sl, c)
        if rot is None:
            q = (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2
        else:
            rt = rot.astype(np.float32)
            q = None
            for i in range(3):
                u = dx * rt[0, i] + dy * rt[1, i] + dz * rt[2, i]
                t = (u / np.float32(r[i])) ** 2
                q = t if q is None else q + t
        return sl, q

    def capsule(self, p0, p1, r):
        """Distance (mm) to segment p0-p1 within its bounding box; returns (slices, dist)."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        sl = self.bbox(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if sl is None:
            return None, None
        v = (p1 - p0).astype(np.float32)
        vv = float(v @ v) or 1e-6
        dx, dy, dz = self.offsets(sl, p0)
        t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / np.float32(vv), 0.0, 1.0)
        d2 = (dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2
        return sl, np.sqrt(d2)

    def paint(self, sl, m, label=None, hu=None, clip=None, only=None):
        if sl is None:
            return
        shp = self.lab[sl].shape
        if m.shape != shp:
            m = np.broadcast_to(m, shp)
        if clip is not None:
            m = m & clip[sl]
        if only is not None:  # restrict to voxels whose current label is in `only`
            m = m & np.isin(self.lab[sl], only)
        if label is not None:
            self.lab[sl][m] = label
        if hu is not None:
            view = self.hu[sl]
            view[m] = hu if np.isscalar(hu) else np.broadcast_to(hu, m.shape)[m]

    def ellipsoid_paint(self, c, r, label, hu, rot=None, clip=None, shell=None, only=None):
        sl, q = self.ellipsoid(c, r, rot)
        if sl is None:
            return
        m = q <= 1.0
        self.paint(sl, m, label, hu, clip=clip, only=only)
        if shell is not None:  # (fraction of radius, hu) for the inner part
            k, hu_in = shell
            self.paint(sl, q <= k * k, None, hu_in, clip=clip, only=[label])

    def tube_paint(self, pts, r, label, hu, clip=None, lumen=None, only=None):
        for p0, p1 in zip(pts[:-1], pts[1:]):
            sl, d = self.capsule(p0, p1, r)
            if sl is None:
                continue
            self.paint(sl, d <= r, label, hu, clip=clip, only=only)
            if lumen is not None:
                rl, hl = lumen
                self.paint(sl, d <= rl, None, hl, clip=clip, only=[label])


# --------------------------------------------------------------------------------------------
# class ids
# --------------------------------------------------------------------------------------------


class _Ids:
    def __getattr__(self, name: str) -> int:
        return catalog.class_id(name, "v2")


_C = _Ids()
_VERTEBRAE = [  # (class name, centre z mm rel. to body centre, height mm)
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
_LUNG_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
               "lung_middle_lobe_right", "lung_lower_lobe_right")
_LOBE_TEXT = {
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}


def _anatomy_mask(lab: np.ndarray, anatomy: str) -> np.ndarray:
    lut = catalog.class_to_anatomy_lut("v2")
    return lut[lab] == catalog.anatomy_by_name(anatomy).index


# --------------------------------------------------------------------------------------------
# lesion placement
# --------------------------------------------------------------------------------------------


def _crop(mask: np.ndarray, pad: int = 1):
    idx = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        idx.append(slice(max(nz[0] - pad, 0), min(nz[-1] + pad + 1, mask.shape[ax])))
    return tuple(idx)


def _place_sphere(cv: _Canvas, region: np.ndarray, r: float, rng, depth: float = 1.0,
                  prefer: str | None = None, r_min: float | None = None):
    """Pick a centre inside `region` at least depth*r (mm) from its boundary.

    Shrinks r (not below r_min) when the region is too thin. Returns (centre_mm, r) or None.
    """
    from scipy import ndimage

    sl = _crop(region)
    if sl is None:
        return None
    sub = region[sl]
    dist = ndimage.distance_transform_edt(np.pad(sub, 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
    dmax = float(dist.max())
    need = depth * r
    if dmax < need:
        r_new = dmax / max(depth, 1e-6)
        if r_min is not None and r_new < r_min:
            r_new = r_min
        r = r_new
        need = min(depth * r, dmax)
    cand = np.argwhere(dist >= need - 1e-6)
    if cand.size == 0:
        return None
    if prefer == "dependent":  # most posterior (lowest y) candidates: supine patient
        ys = cand[:, 1]
        cand = cand[ys <= np.quantile(ys, 0.1)]
    pick = cand[rng.integers(len(cand))]
    centre = cv.world([pick[d] + sl[d].start for d in range(3)])
    centre = centre + rng.uniform(-0.5, 0.5, 3) * cv.spacing
    return centre, float(r)


def _sphere_mask(cv: _Canvas, c, r):
    sl, q = cv.ellipsoid(c, (r, r, r))
    m = np.zeros(cv.shape, bool)
    if sl is not None:
        m[sl] = q <= 1.0
    return m


# --------------------------------------------------------------------------------------------
# the phantom
# --------------------------------------------------------------------------------------------


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _render(index: int, seed: int, labels: dict[str, int]):
    rng = _streams(index, seed)[1]
    pos = {d for d, v in labels.items() if v}
    info: dict = {"contrast": bool(rng.random() < 0.8)}
    contrast = info["contrast"]

    # ---- grid
    sxy = round(_u(rng, *INPLANE_MM) / _SPACING_QUANTUM) * _SPACING_QUANTUM
    sz = round(_u(rng, *SLICE_MM) / _SPACING_QUANTUM) * _SPACING_QUANTUM
    spacing = np.array([sxy, sxy, sz])
    shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, spacing))
    origin = -(np.array(shape) - 1) * spacing / 2.0
    # table position; small in z so that the lungs (apex) and bladder stay inside the scan
    origin += np.round(rng.uniform([-20, -20, -8], [20, 20, 8]) / _SPACING_QUANTUM) * _SPACING_QUANTUM
    cv = _Canvas(shape, spacing, origin)

    s = _u(rng, 0.9, 1.1)  # global scale
    centre = origin + (np.array(shape) - 1) * spacing / 2.0 + rng.uniform(-10, 10, 3)

    def P(x, y, z, jit=3.0):
        wobble = rng.normal(0, jit, 3).clip(-2 * jit, 2 * jit)
        return centre + s * (np.array([x, y, z], float) + wobble)

    def R(*r, jit=0.07):
        return s * np.array(r, float) * rng.uniform(1 - jit, 1 + jit, 3)

    def hu(mean, sd=4.0):
        return float(mean + rng.normal(0, sd))

    # ---- body: elliptic cylinder with z-varying semi-axes, subcutaneous fat and muscle wall
    # interior (inside the muscle wall) scales with the patient; muscle and fat add outwards
    zc = np.array([-260, -150, -90, 0, 80, 160, 260], float)
    ac = np.array([118, 120, 112, 110, 114, 112, 104], float)
    bc = np.array([76, 78, 82, 84, 84, 80, 74], float)
    zrel = (cv.axes[2] - centre[2]) / s
    fat = _u(rng, 8, 25)
    muscle = _u(rng, 7, 12)
    A = np.interp(zrel, zc, ac) * s + fat + muscle
    B = np.interp(zrel, zc, bc) * s + fat + muscle
    X = (cv.axes[0] - centre[0])[:, None, None]
    Y = (cv.axes[1] - centre[1])[None, :, None]

    def ell(a, b):
        return (X / a[None, None, :]) ** 2 + (Y / b[None, None, :]) ** 2 <= 1.0

    body = ell(A, B)
    below_fat = ell(A - fat, B - fat)
    inner = ell(A - fat - muscle, B - fat - muscle)
    cv.hu[body] = hu(-100, 6)
    cv.hu[below_fat] = hu(45, 4)
    cv.hu[inner] = hu(-90, 6)
    del body

    # ---- paraspinal and psoas muscles (may lie within the muscle wall)
    for side, sgn in (("left", -1), ("right", 1)):
        cid = getattr(_C, f"autochthon_{side}")
        cv.tube_paint([P(sgn * 30, -82, 240, 0), P(sgn * 30, -84, 40, 0),
                       P(sgn * 28, -80, -150, 0)],
                      24 * s, cid, hu(50), clip=below_fat)
    for side, sgn in (("left", -1), ("right", 1)):
        cid = getattr(_C, f"iliopsoas_{side}")
        cv.tube_paint([P(sgn * 32, -48, 0, 0), P(sgn * 48, -40, -110, 0), P(sgn * 72, -5, -215, 0)],
                      17 * s, cid, hu(50), clip=inner)

    # ---- lungs: two ellipsoids, split into lobes by fissure planes
    lung_hu = hu(-950, 6) if "emphysema" in pos else hu(-850, 12)
    for side, sgn in (("right", 1), ("left", -1)):
        c = P(sgn * 70 + (0 if sgn > 0 else -5), -8, 118)
        r = R(60 if sgn > 0 else 56, 88, 100)
        sl, q = cv.ellipsoid(c, r)
        if sl is None:
            continue
        m = (q <= 1.0) & inner[sl]
        _, dy, dz = cv.offsets(sl, c)
        # oblique fissure: the lower lobe is posterior-inferior
        lower = (dz < -0.85 * dy + 0.05 * r[2]) & m
        upper = m & ~lower
        if side == "right":
            middle = upper & (dz < 0.05 * r[2])  # horizontal fissure
            cv.paint(sl, upper & ~middle, _C.lung_upper_lobe_right, lung_hu)
            cv.paint(sl, middle, _C.lung_middle_lobe_right, lung_hu)
            cv.paint(sl, lower, _C.lung_lower_lobe_right, lung_hu)
        else:
            cv.paint(sl, upper, _C.lung_upper_lobe_left, lung_hu)
            cv.paint(sl, lower, _C.lung_lower_lobe_left, lung_hu)

    # ---- heart (anterior-left), contrast blood pool with myocardial wall
    hr = R(62, 48, 52)
    hc = P(-22, 22, 80)
    if "cardiomegaly" in pos:
        f = _u(rng, 1.3, 1.45)
        g = 1.0 + (f - 1.0) * 0.6
        hc = hc + np.array([-(f - 1) * hr[0] * 0.35, 0.0, -(g - 1) * hr[2] * 0.3])
        hr = hr * np.array([f, g, g])
        info["cardiomegaly_factor"] = f
    rot_h = _rotation(rz=_u(rng, 25, 40), ry=_u(rng, -15, -5))
    blood = hu(130, 10) if contrast else hu(40, 3)
    cv.ellipsoid_paint(hc, hr, _C.heart, hu(95, 6) if contrast else hu(45, 3), rot=rot_h,
                       clip=inner, shell=(0.8, blood))

    # ---- small bowel loops and colon (painted before solid organs, which override them)
    sb_hu = hu(40)
    for _ in range(int(rng.integers(9, 14))):
        p0 = P(_u(rng, -60, 60), _u(rng, -15, 55), _u(rng, -135, -45), 0)
        d = rng.normal(0, 1, 3)
        d /= np.linalg.norm(d)
        p1 = p0 + d * s * _u(rng, 20, 45)
        rr = s * _u(rng, 11, 15)
        content = -950.0 if rng.random() < 0.25 else hu(15, 5)
        cv.tube_paint([p0, p1], rr, _C.small_bowel, sb_hu, clip=inner, lumen=(rr - 3 * s, content))
    colon_pts = [P(0, -35, -205), P(0, -38, -172), P(-30, -15, -150), P(-55, 5, -130),
                 P(-95, -5, -110), P(-98, -8, -40), P(-88, 35, -10), P(-40, 55, -30),
                 P(40, 55, -35), P(92, 30, -20), P(96, 0, -60), P(92, 5, -125)]
    cr = 21 * s
    for p0, p1 in zip(colon_pts[:-1], colon_pts[1:]):
        sl, d = cv.capsule(p0, p1, cr)
        if sl is None:
            continue
        cv.paint(sl, d <= cr, _C.colon, hu(40), clip=inner)
        lumen = (d <= cr - 3 * s) & (cv.lab[sl] == _C.colon)
        if rng.random() < 0.55:  # gas, with an air-fluid level for the dependent part
            _, dy, _ = cv.offsets(sl, (p0 + p1) / 2)
            cv.paint(sl, lumen & (dy > -0.3 * cr), None, -950.0)
            cv.paint(sl, lumen & (dy <= -0.3 * cr), None, hu(10, 5))
        else:  # mottled stool
            mot = rng.random(lumen.shape) < 0.3
            cv.paint(sl, lumen, None, np.where(mot, -600.0, hu(-20, 10)).astype(np.float32))

    # ---- stomach: wall, fluid, anterior (non-dependent) gas
    stc, str_ = P(-48, 22, 18), R(42, 34, 48)
    rot_s = _rotation(rz=_u(rng, -20, 0))
    sl, q = cv.ellipsoid(stc, str_, rot_s)
    if sl is not None:
        cv.paint(sl, q <= 1, _C.stomach, hu(45), clip=inner)
        lum = (q <= 0.72) & (cv.lab[sl] == _C.stomach)
        _, dy, _ = cv.offsets(sl, stc)
        gas_level = _u(rng, -0.2, 0.6) * str_[1]
        cv.paint(sl, lum & (dy > gas_level), None, -950.0)
        cv.paint(sl, lum & (dy <= gas_level), None, hu(12, 5))

    # ---- liver (right lobe + left lobe), fatty liver lowers its attenuation
    liver_hu = _u(rng, -10, 15) if "fatty_liver" in pos else _u(rng, 55, 65)
    cv.ellipsoid_paint(P(60, -5, 15), R(66, 76, 70), _C.liver, liver_hu, clip=inner)
    cv.ellipsoid_paint(P(2, 34, 30), R(56, 34, 34), _C.liver, liver_hu,
                       rot=_rotation(rz=_u(rng, -10, 10)), clip=inner)

    # ---- gallbladder in the fossa under the liver
    gbc, gbr = P(42, 40, -22), R(15, 16, 34)
    cv.ellipsoid_paint(gbc, gbr, _C.gallbladder, hu(35), rot=_rotation(ry=_u(rng, -25, -10)),
                       clip=inner, shell=(0.75, hu(10, 4)))

    # ---- spleen (posterolateral left)
    spc, spr = P(-82, -36, 20), R(26, 45, 52)
    if "splenomegaly" in pos:
        f = _u(rng, 1.5, 1.8)
        spc = spc + np.array([0.0, (f - 1) * spr[1] * 0.35, -(f - 1) * spr[2] * 0.6])
        spr = spr * np.array([1.0 + (f - 1) * 0.5, f, f])
        info["splenomegaly_factor"] = f
    cv.ellipsoid_paint(spc, spr, _C.spleen, hu(50), rot=_rotation(rz=_u(rng, 15, 30)), clip=inner)

    # ---- pancreas: head, body, tail
    pan_hu = hu(45)
    thick = 1.0
    if "pancreas_atrophy" in pos:
        thick = _u(rng, 0.45, 0.55)
        pan_hu = _u(rng, 10, 28)
    for c, r in (((24, -4, -24), (18, 15, 19)), ((-12, 6, -13), (30, 11, 13)),
                 ((-52, -12, -3), (26, 10, 11))):
        rr = R(*r)
        rr[1] *= thick
        rr[2] *= thick
        cv.ellipsoid_paint(P(*c, jit=2.0), rr, _C.pancreas, pan_hu, clip=inner)

    # ---- kidneys (right lower than left), cortex/medulla, atrophy
    atrophy_sides: list[str] = []
    if "kidney_atrophy" in pos:
        atrophy_sides = [["left"], ["right"], ["left", "right"]][rng.choice(3, p=[0.4, 0.4, 0.2])]
    info["atrophy_sides"] = atrophy_sides
    kidneys = {}
    for side, sgn, z in (("right", 1, -45), ("left", -1, -34)):
        kc, kr = P(sgn * 68, -46, z), R(27, 28, 52)
        if side in atrophy_sides:
            f = _u(rng, 0.58, 0.68)
            kr = kr * f
        rot_k = _rotation(rz=sgn * _u(rng, 15, 30), ry=sgn * _u(rng, 8, 18))
        cid = getattr(_C, f"kidney_{side}")
        cortex = hu(150, 12) if contrast else hu(35, 3)
        medulla = hu(105, 10) if contrast else hu(30, 3)
        if side in atrophy_sides and contrast:
            cortex -= 25
        cv.ellipsoid_paint(kc, kr, cid, cortex, rot=rot_k, clip=inner,
                           shell=(0.45 if side in atrophy_sides else 0.65, medulla))
        kidneys[side] = (kc, kr, rot_k, cid)

    # ---- adrenal glands above/medial to the upper poles
    adrenals = {}
    for side, sgn, z in (("right", 1, 20), ("left", -1, 27)):
        ac_, ar = P(sgn * 44, -38, z, 2.0), R(6, 13, 18)
        cid = getattr(_C, f"adrenal_gland_{side}")
        cv.ellipsoid_paint(ac_, ar, cid, hu(30), rot=_rotation(rz=sgn * 30), clip=inner)
        adrenals[side] = (ac_, ar, cid)

    # ---- urinary bladder
    blc = P(0, 35, -172)
    cv.ellipsoid_paint(blc, R(42, 34, 28, jit=0.15), _C.urinary_bladder, hu(5, 3), clip=inner)

    # ---- vessels
    art = hu(155, 15) if contrast else hu(42, 3)
    ven = hu(125, 12) if contrast else hu(40, 3)
    ar = 12 * s
    cv.tube_paint([P(4, 26, 110, 0), P(4, 26, 162, 0), P(-20, 14, 180, 0), P(-32, -14, 174, 0),
                   P(-30, -34, 158, 0), P(-29, -36, 60, 0), P(-18, -26, -10, 0),
                   P(-10, -20, -100, 0)], ar, _C.aorta, art, clip=inner)
    for side, sgn in (("left", -1), ("right", 1)):
        cv.tube_paint([P(-10, -20, -100, 0), P(sgn * 42, -14, -150, 0), P(sgn * 72, 5, -215, 0)],
                      6.5 * s, getattr(_C, f"iliac_artery_{side}"), art, clip=inner)
        cv.tube_paint([P(18, -28, -105, 0), P(sgn * 36, -28, -150, 0), P(sgn * 66, -8, -215, 0)],
                      8 * s, getattr(_C, f"iliac_vena_{side}"), ven, clip=inner)
    cv.tube_paint([P(18, -28, -105, 0), P(22, -22, -10, 0), P(28, -10, 40, 0), P(22, 5, 62, 0)],
                  11 * s, _C.inferior_vena_cava, ven, clip=inner)
    cv.tube_paint([P(22, 5, 62, 0), P(14, 10, 150, 0)], 10 * s, _C.superior_vena_cava, ven,
                  clip=inner)
    cv.tube_paint([P(52, 4, 8, 0), P(14, -6, -16, 0), P(-38, -14, -8, 0), P(-72, -30, 8, 0)],
                  6.5 * s, _C.portal_vein_and_splenic_vein, hu(150, 12) if contrast else ven,
                  clip=inner)

    # ---- airway and esophagus
    cv.tube_paint([P(0, 2, 240, 0), P(0, 0, 152, 0)], 10 * s, _C.trachea, hu(30),
                  lumen=(7.5 * s, -990.0), clip=inner)
    for sgn in (1, -1):
        cv.tube_paint([P(0, 0, 152, 0), P(sgn * 32, -6, 124, 0)], 7 * s, _C.trachea, hu(30),
                      lumen=(5 * s, -990.0), clip=inner)
    cv.tube_paint([P(-4, -20, 240, 0), P(-8, -24, 90, 0), P(-18, -12, 45, 0), P(-32, 2, 28, 0)],
                  8.5 * s, _C.esophagus, hu(38), lumen=(2.5 * s, -900.0), clip=inner)

    # ---- bones: vertebrae with posterior elements, spinal cord, sacrum, hips, ribs, sternum
    for name, z, h in _VERTEBRAE:
        cid = getattr(_C, name)
        rad = 19.0 if name.startswith("vertebrae_T") else 23.0
        body_c = P(0, -52, z, 0)
        cv.ellipsoid_paint(body_c, s * np.array([rad, rad * 0.85, h / 2]), cid, hu(650, 30),
                           clip=below_fat, shell=(0.82, hu(270, 25)))
        cv.ellipsoid_paint(P(0, -82, z - 3, 0), s * np.array([24, 13, h / 2 - 1]), cid,
                           hu(480, 30), clip=below_fat)
    cv.tube_paint([P(0, -76, 260, 0), P(0, -76, -10, 0)], 7 * s, _C.spinal_cord, hu(32),
                  clip=below_fat)
    cv.tube_paint([P(0, -76, -10, 0), P(0, -78, -140, 0)], 6 * s, 0, hu(10))  # thecal sac (CSF)
    cv.ellipsoid_paint(P(0, -64, -175, 0), R(44, 17, 42), _C.sacrum, hu(380, 25),
                       rot=_rotation(rx=-25), clip=below_fat)
    for side, sgn in (("left", -1), ("right", 1)):
        cid = getattr(_C, f"hip_{side}")
        cv.ellipsoid_paint(P(sgn * 102, -30, -172, 0), R(11, 52, 44), cid, hu(420, 25),
                           rot=_rotation(rz=-sgn * 30), clip=below_fat)
        cv.ellipsoid_paint(P(sgn * 86, 8, -212, 0), R(24, 24, 20), cid, hu(420, 25),
                           clip=below_fat)
    cv.tube_paint([P(0, 96, 230, 0), P(0, 98, 90, 0)], 9 * s, _C.sternum, hu(350, 25),
                  clip=below_fat)
    _ribs(cv, centre, s, A, B, fat, muscle, rng)

    return cv, info, inner, kidneys, adrenals


def _ribs(cv, centre, s, A, B, fat, muscle, rng):
    """Ribs as bands just inside the muscle wall, sloping down anteriorly."""
    zs = cv.axes[2]
    X = (cv.axes[0] - centre[0])[:, None, None]
    Y = (cv.axes[1] - centre[1])[None, :, None]
    hu_rib = float(480 + rng.normal(0, 30))
    for k, (name, zv, _) in enumerate(_VERTEBRAE[:9]):  # T4..T12 -> ribs 4..12
        n = k + 4
        z0 = centre[2] + s * (zv - 6)
        ks = np.flatnonzero((zs > z0 - s * 95) & (zs < z0 + s * 8))
        if ks.size == 0:
            continue
        sl = (slice(None), slice(None), slice(ks[0], ks[-1] + 1))
        a = (A - fat - muscle * 0.2)[sl[2]][None, None, :]
        b = (B - fat - muscle * 0.2)[sl[2]][None, None, :]
        q = (X / a) ** 2 + (Y / b) ** 2
        band = (q <= 1.0) & (q >= (1.0 - 8.0 * s / b) ** 2)
        zrib = z0 + (Y + 60 * s).clip(0, None) * (-0.45 if n < 11 else -0.2)  # slope anteriorly
        if n >= 11:
            band &= Y < 0
        band &= np.abs(zs[sl[2]][None, None, :] - zrib) < 4.5 * s
        band &= ~((np.abs(X) < 28 * s) & (Y < -40 * s))  # spine
        band &= ~((np.abs(X) < 22 * s) & (Y > 0))  # sternum / costal cartilage gap
        left = band & (X < 0)
        right = band & (X >= 0)
        cv.paint(sl, left, catalog.class_id(f"rib_left_{n}", "v2"), hu_rib)
        cv.paint(sl, right, catalog.class_id(f"rib_right_{n}", "v2"), hu_rib)


# --------------------------------------------------------------------------------------------
# diseases
# --------------------------------------------------------------------------------------------


def _render_diseases(cv: _Canvas, info, inner, kidneys, adrenals, labels, rng):
    pos = [d for d, v in labels.items() if v]
    lesions: list[Lesion] = []
    findings: dict[str, dict] = {}
    occupied = np.zeros(cv.shape, bool)
    contrast = info["contrast"]

    def add(did, m, occupy=True):
        lesions.append(Lesion(did, m))
        if occupy:  # local signs: later lesions do not overlap them
            occupied[m] = True

    def local(did, region, r_range, n, hu_range, depth=1.0, prefer=None, r_min=None, rim=None):
        out = []
        for _ in range(n):
            r = _u(rng, *r_range)
            placed = _place_sphere(cv, region & ~occupied, r, rng, depth=depth, prefer=prefer,
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
            val = _u(rng, *hu_range)
            cv.hu[m] = val
            if rim is not None and contrast:
                rm = np.zeros(cv.shape, bool)
                rm[sl] = q >= 0.55
                cv.hu[m & rm] = val + rim
            add(did, m)
            out.append({"center": c, "r": r, "hu": val, "mask": m})
        return out

    def retry_local(did, region, r_range, n, hu_range, **kw):
        out = local(did, region, r_range, n, hu_range, **kw)
        tries = 0
        while not out and tries < 5:
            out = local(did, region, r_range, 1, hu_range, **kw)
            tries += 1
        if not out:
            raise RuntimeError(f"could not place a {did} lesion")
        return out

    lab = cv.lab
    # 1. signs that grow their organ: adrenal nodule, kidney cyst (may be exophytic)
    if "adrenal_nodule" in pos:
        side = "left" if rng.random() < 0.5 else "right"
        ac, ar, cid = adrenals[side]
        r = _u(rng, 8, 14)
        sgn = 1 if side == "right" else -1
        c = ac + np.array([sgn * r * 0.45, -r * 0.2, _u(rng, -0.3, 0.3) * ar[2]])
        soft = [0, cid, _C.liver, _C.spleen, _C.pancreas, _C.stomach, _C.small_bowel, _C.colon]
        sl, q = cv.ellipsoid(c, (r, r, r))
        m = np.zeros(cv.shape, bool)
        m[sl] = (q <= 1.0) & inner[sl] & np.isin(lab[sl], soft)
        lab[m] = cid
        val = _u(rng, 10, 30)
        cv.hu[m] = val
        add("adrenal_nodule", m)
        findings["adrenal_nodule"] = {"side": side, "size": round(2 * r), "hu": round(val)}

    if "kidney_cyst" in pos:
        side = "left" if rng.random() < 0.5 else "right"
        kc, kr, rot, cid = kidneys[side]
        kid = lab == cid
        r = _u(rng, 8, 18)
        placed = _place_sphere(cv, kid, r, rng, depth=0.55, r_min=6.0)
        c, r = placed
        sl, q = cv.ellipsoid(c, (r, r, r))
        m = np.zeros(cv.shape, bool)
        m[sl] = (q <= 1.0) & inner[sl] & np.isin(lab[sl], [0, cid])
        lab[m] = cid
        val = _u(rng, 0, 10)
        cv.hu[m] = val
        add("kidney_cyst", m)
        findings["kidney_cyst"] = {"side": side, "size": round(2 * r), "pole": _pole(cv, kid, c)}

    # 2. diffuse signs
    if "hydronephrosis" in pos:
        sides = [["left"], ["right"], ["left", "right"]][rng.choice(3, p=[0.4, 0.4, 0.2])]
        region = np.zeros(cv.shape, bool)
        for side in sides:
            kc, kr, rot, cid = kidneys[side]
            sl, q = cv.ellipsoid(kc, kr * 0.74, rot)
            if sl is None:
                continue
            region[sl] |= (q <= 1.0) & (lab[sl] == cid)
        region &= ~occupied
        cv.hu[region] = _u(rng, 0, 10)
        add("hydronephrosis", region, occupy=False)
        findings["hydronephrosis"] = {"sides": sides,
                                      "grade": "moderate" if rng.random() < 0.6 else "severe"}

    effusion = np.zeros(cv.shape, bool)
    if "pleural_effusion" in pos:
        sides = [["left"], ["right"], ["left", "right"]][rng.choice(3, p=[0.3, 0.3, 0.4])]
        ys = cv.axes[1][None, :, None]
        depths = []
        for side in sides:
            lobe = lab == getattr(_C, f"lung_lower_lobe_{side}")
            yy = np.flatnonzero(lobe.any(axis=(0, 2)))
            if yy.size == 0:
                continue
            depth = _u(rng, 22, 50)
            y_post = cv.axes[1][yy[0]]
            effusion |= lobe & (ys < y_post + depth)
            depths.append(depth)
        cv.hu[effusion] = _u(rng, 5, 20)
        add("pleural_effusion", effusion.copy(), occupy=False)
        findings["pleural_effusion"] = {
            "sides": sides, "size": "small" if max(depths) < 32 else "moderate"}

    if "emphysema" in pos:
        lung = _anatomy_mask(lab, "lung")
        upper = np.isin(lab, [_C.lung_upper_lobe_left, _C.lung_upper_lobe_right])
        bullae = []
        for _ in range(int(rng.integers(2, 6))):
            placed = _place_sphere(cv, upper & ~effusion, _u(rng, 10, 24), rng, depth=0.6)
            if placed is None:
                continue
            c, r = placed
            m = _sphere_mask(cv, c, r) & lung & ~effusion
            cv.hu[m] = -1000.0
            bullae.append(round(2 * r))
        add("emphysema", lung & ~effusion, occupy=False)
        findings["emphysema"] = {"bullae": bullae}

    # 3. local signs inside their organ
    if "liver_cyst" in pos:
        liver = lab == _C.liver
        out = retry_local("liver_cyst", liver, (6, 15), int(rng.integers(1, 4)), (0, 10),
                          depth=0.9, r_min=5.0)
        findings["liver_cyst"] = {"lesions": [_liver_loc(cv, liver, o) for o in out]}
    if "liver_metastasis" in pos:
        liver = lab == _C.liver
        out = retry_local("liver_metastasis", liver, (5, 12), int(rng.integers(3, 9)), (20, 35),
                          depth=0.9, r_min=5.0, rim=_u(rng, 15, 30))
        findings["liver_metastasis"] = {"lesions": [_liver_loc(cv, liver, o) for o in out]}
    if "lung_nodule" in pos:
        lung = _anatomy_mask(lab, "lung") & ~effusion
        out = retry_local("lung_nodule", lung, (4.5, 8), int(rng.integers(1, 4)), (20, 60),
                          depth=1.0, r_min=4.5)
        for o in out:
            cid = int(np.bincount(lab[o.pop("mask")]).argmax())
            o["lobe"] = _LOBE_TEXT[catalog.totalseg_classes("v2")[cid]]
            o["size"] = round(2 * o["r"])
        findings["lung_nodule"] = {"lesions": out}
    if "gallstone" in pos:
        gb = lab == _C.gallbladder
        out = retry_local("gallstone", gb, (3.5, 7), int(rng.integers(1, 4)), (300, 800),
                          depth=1.0, prefer="dependent", r_min=3.0)
        findings["gallstone"] = {"lesions": [{"size": round(2 * o["r"])} for o in out]}
    if "renal_calculus" in pos:
        side = "left" if rng.random() < 0.5 else "right"
        kc, kr, rot, cid = kidneys[side]
        kid = lab == cid
        # bias towards the central collecting system
        sl, q = cv.ellipsoid(kc, kr * 0.8, rot)
        central = np.zeros(cv.shape, bool)
        central[sl] = q <= 1.0
        region = kid & central if (kid & central & ~occupied).any() else kid
        out = retry_local("renal_calculus", region, (3.0, 5.0), int(rng.integers(1, 3)),
                          (600, 1200), depth=1.0, r_min=3.0)
        findings["renal_calculus"] = {
            "side": side,
            "lesions": [{"size": round(2 * o["r"]), "pole": _pole(cv, kid, o["center"])}
                        for o in out]}
    if "bladder_stone" in pos:
        bl = lab == _C.urinary_bladder
        out = retry_local("bladder_stone", bl, (4, 8), 1, (400, 900), depth=1.0,
                          prefer="dependent", r_min=4.0)
        findings["bladder_stone"] = {"size": round(2 * out[0]["r"])}

    # 4. diffuse signs recorded as their changed region (final organ masks)
    if "fatty_liver" in pos:
        region = (lab == _C.liver) & ~occupied
        findings["fatty_liver"] = {"hu": round(float(np.median(cv.hu[region])))}
        add("fatty_liver", region, occupy=False)
    if "kidney_atrophy" in pos:
        m = np.zeros(cv.shape, bool)
        lengths = {}
        for side in info["atrophy_sides"]:
            k = lab == kidneys[side][3]
            m |= k
            lengths[side] = _extent_cm(cv, k, 2)
        add("kidney_atrophy", m, occupy=False)
        findings["kidney_atrophy"] = {"sides": info["atrophy_sides"], "lengths": lengths}
    if "splenomegaly" in pos:
        sp = lab == _C.spleen
        add("splenomegaly", sp, occupy=False)
        findings["splenomegaly"] = {"cm": _extent_cm(cv, sp, 2)}
    if "cardiomegaly" in pos:
        h = _anatomy_mask(lab, "heart")
        add("cardiomegaly", h, occupy=False)
        findings["cardiomegaly"] = {"cm": _extent_cm(cv, h, 0)}
    if "pancreas_atrophy" in pos:
        pa = lab == _C.pancreas
        add("pancreas_atrophy", pa, occupy=False)
        findings["pancreas_atrophy"] = {}

    # measurements for normal phrasing
    findings["_spleen_cm"] = _extent_cm(cv, lab == _C.spleen, 2)
    findings["_contrast"] = contrast
    return lesions, findings


def _extent_cm(cv: _Canvas, m: np.ndarray, axis: int) -> float:
    other = tuple(a for a in range(3) if a != axis)
    nz = np.flatnonzero(m.any(axis=other))
    if nz.size == 0:
        return 0.0
    return round(float((nz[-1] - nz[0] + 1) * cv.spacing[axis]) / 10.0, 1)


def _rel(cv: _Canvas, organ: np.ndarray, c) -> np.ndarray:
    """Position of world point c within the organ's bounding box, each axis in [0, 1]."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(organ.any(axis=other))
        lo, hi = cv.axes[ax][nz[0]], cv.axes[ax][nz[-1]]
        out.append(float(np.clip((c[ax] - lo) / max(hi - lo, 1e-3), 0, 1)))
    return np.array(out)


def _pole(cv, kidney, c) -> str:
    w = _rel(cv, kidney, c)[2]
    return "upper pole" if w > 0.62 else "lower pole" if w < 0.38 else "interpolar region"


def _liver_loc(cv, liver, o) -> dict:
    u, v, w = _rel(cv, liver, o["center"])  # u: 0 = patient's left, 1 = right (RAS+)
    if u < 0.3:
        seg = "II" if w > 0.5 else "III"
    elif u < 0.45:
        seg = "IVa" if w > 0.5 else "IVb"
    elif v > 0.5:
        seg = "VIII" if w > 0.5 else "V"
    else:
        seg = "VII" if w > 0.5 else "VI"
    return {"size": round(2 * o["r"]), "segment": seg, "hu": round(o["hu"])}


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

# noun phrases per catalog term: (singular with article, plural); None = no such form
_NP: dict[str, tuple[str | None, str | None]] = {
    "liver cyst": ("a liver cyst", "liver cysts"),
    "hepatic cyst": ("a hepatic cyst", "hepatic cysts"),
    "cyst in the liver": ("a cyst in the liver", "cysts in the liver"),
    "simple cyst": ("a simple cyst", "simple cysts"),
    "cystic lesion": ("a cystic lesion", "cystic lesions"),
    "liver metastases": (None, "liver metastases"),
    "hepatic metastases": (None, "hepatic metastases"),
    "metastatic lesions": (None, "metastatic lesions"),
    "metastases": (None, "metastases"),
    "metastasis": (None, "metastasis"),
    "secondary deposits": (None, "secondary deposits"),
    "kidney cyst": ("a kidney cyst", None),
    "renal cyst": ("a renal cyst", None),
    "cortical cyst": ("a cortical cyst", None),
    "cyst in the kidney": ("a cyst in the kidney", None),
    "renal calculus": ("a renal calculus", "renal calculi"),
    "kidney stone": ("a kidney stone", "kidney stones"),
    "nephrolithiasis": ("nephrolithiasis", "nephrolithiasis"),
    "renal stone": ("a renal stone", "renal stones"),
    "calculus": ("a calculus", None),
    "calculi": (None, "calculi"),
    "dilated collecting system": ("a dilated collecting system", "dilated collecting systems"),
    "atrophic kidney": ("an atrophic kidney", "atrophic kidneys"),
    "small kidney": ("a small kidney", "small kidneys"),
    "shrunken kidney": ("a shrunken kidney", "shrunken kidneys"),
    "enlarged spleen": ("an enlarged spleen", None),
    "enlarged heart": ("an enlarged heart", None),
    "pleural effusion": ("a pleural effusion", "pleural effusions"),
    "pleural fluid": ("a pleural fluid collection", "pleural fluid collections"),
    "effusion": ("an effusion", "effusions"),
    "lung nodule": ("a lung nodule", "lung nodules"),
    "pulmonary nodule": ("a pulmonary nodule", "pulmonary nodules"),
    "nodule": ("a nodule", "nodules"),
    "nodular opacity": ("a nodular opacity", "nodular opacities"),
    "gallstones": (None, "gallstones"),
    "gallstone": ("a gallstone", None),
    "calculus in the gallbladder": ("a calculus in the gallbladder", "calculi in the gallbladder"),
    "bladder stone": ("a bladder stone", None),
    "bladder calculus": ("a bladder calculus", None),
    "vesical calculus": ("a vesical calculus", None),
    "stone in the bladder": ("a stone in the bladder", None),
    "adrenal nodule": ("an adrenal nodule", None),
    "adrenal mass": ("an adrenal mass", None),
    "adrenal adenoma": ("an adrenal adenoma", None),
    "adrenal lesion": ("an adrenal lesion", None),
    "atrophic pancreas": ("an atrophic pancreas", None),
    "bullae": (None, "bullae"),
}


def _terms(did: str) -> list[str]:
    d = {x.id: x for x in catalog.diseases("demo")}[did]
    return [d.name, *d.synonyms]


def _np_of(term: str, plural: bool) -> str | None:
    if term in _NP:
        return _NP[term][1 if plural else 0]
    return term  # mass noun: "hydronephrosis", "hepatic steatosis", ...


def _pick_np(rng, did: str, plural: bool = False, exclude_post: bool = False) -> str:
    """A noun phrase for disease `did` from its catalog name/synonyms."""
    opts = []
    for t in _terms(did):
        np_ = _np_of(t, plural)
        if np_ is None or (exclude_post and (" in the " in t or " of the " in t)):
            continue
        opts.append(np_)
    return str(rng.choice(opts))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

_NORMAL = {
    "lung": ["The lungs are clear.", "The lungs are clear without focal consolidation.",
             "No focal consolidation, nodule or mass in the lungs.",
             "Normal appearance of both lungs.", "The lungs are well expanded and clear.",
             "No pleural effusion or pneumothorax; the lungs are clear."],
    "heart": ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly.",
              "Normal cardiac size without pericardial thickening."],
    "liver": ["The liver is normal in size and attenuation.", "No focal hepatic lesion.",
              "Unremarkable liver.", "The liver is normal in attenuation without focal lesion.",
              "Liver: normal size and contour, no focal lesion."],
    "gallbladder": ["The gallbladder is unremarkable.", "No gallstones.", "Normal gallbladder.",
                    "Gallbladder: no radiopaque stones or wall thickening."],
    "spleen": ["Unremarkable spleen.", "The spleen is normal in size.",
               "Normal spleen ({spleen_cm} cm).", "No splenomegaly.",
               "The spleen measures {spleen_cm} cm and is unremarkable."],
    "pancreas": ["The pancreas is unremarkable.", "Normal pancreas.",
                 "The pancreas is normal in size and attenuation.",
                 "No pancreatic mass or atrophy."],
    "adrenal_gland": ["The adrenal glands are normal.", "Unremarkable adrenal glands.",
                      "No adrenal nodule.", "Both adrenal glands are normal in thickness."],
    "kidney": ["Kidneys: no hydronephrosis or calculi.", "Both kidneys are normal in size.",
               "The kidneys are unremarkable.", "Normal kidneys without hydronephrosis.",
               "No renal calculi, cysts or hydronephrosis."],
    "urinary_bladder": ["The urinary bladder is unremarkable.", "Normal urinary bladder.",
                        "The bladder is unremarkable without intraluminal stone.",
                        "Urinary bladder: normal."],
}
_NORMAL_CONTRAST = {"kidney": ["Both kidneys enhance symmetrically without hydronephrosis."]}
_NORMAL_EXTRA = {  # anatomies without demo diseases, mentioned now and then
    "trachea": ["The trachea is patent.", "The trachea and carina are unremarkable."],
    "aorta": ["The aorta is normal in caliber.", "No aortic aneurysm.",
              "Normal caliber of the thoracic aorta and abdominal aorta."],
    "esophagus": ["The esophagus is unremarkable.", "No esophageal wall thickening."],
    "stomach": ["The stomach is unremarkable.",
                "The stomach is partially distended with fluid and gas."],
    "small_intestine": ["Small bowel loops are normal in caliber.", "No small bowel obstruction."],
    "colon": ["The colon is unremarkable.", "No colonic wall thickening."],
    "spine": ["No aggressive osseous lesion of the thoracic spine or lumbar spine.",
              "The thoracic vertebrae and lumbar vertebrae are intact."],
}
_NEGATION = {
    "liver_cyst": ["No cystic liver lesion.", "No hepatic cyst."],
    "liver_metastasis": ["No suspicious hepatic lesion to suggest metastases.",
                         "No liver metastases."],
    "fatty_liver": ["No hepatic steatosis.", "No fatty liver."],
    "kidney_cyst": ["No renal cyst.", "No kidney cyst."],
    "renal_calculus": ["No renal calculi.", "No nephrolithiasis."],
    "hydronephrosis": ["No hydronephrosis.", "No hydronephrosis on either side."],
    "kidney_atrophy": ["No renal atrophy.", "No kidney atrophy."],
    "splenomegaly": ["No splenomegaly."],
    "cardiomegaly": ["No cardiomegaly."],
    "pleural_effusion": ["No pleural effusion.", "No pleural effusion on either side."],
    "emphysema": ["No emphysema.", "No emphysematous changes in the lungs."],
    "lung_nodule": ["No suspicious pulmonary nodule.", "No lung nodule."],
    "gallstone": ["No gallstones.", "No radiopaque gallstones."],
    "bladder_stone": ["No bladder stone.", "No bladder calculus."],
    "adrenal_nodule": ["No adrenal nodule.", "No adrenal mass."],
    "pancreas_atrophy": ["No pancreatic atrophy."],
}
_ORDER = ["lung", "trachea", "heart", "aorta", "esophagus", "liver", "gallbladder", "spleen",
          "pancreas", "adrenal_gland", "kidney", "stomach", "small_intestine", "colon",
          "urinary_bladder", "spine"]


def _sides_text(sides: list[str]) -> str:
    return "bilateral" if len(sides) == 2 else sides[0]


def _positive_sentences(did: str, f: dict, rng) -> tuple[list[str], str]:
    """Findings sentences and an impression item (with a verbatim catalog term)."""
    ch = lambda xs: str(rng.choice(xs))  # noqa: E731
    count = {"liver_cyst": len(f.get("lesions", ())), "liver_metastasis": 2,
             "renal_calculus": len(f.get("lesions", ())), "lung_nodule": len(f.get("lesions", ())),
             "gallstone": len(f.get("lesions", ()))}.get(did, 1)
    t_imp = ch([t for t in _terms(did) if _np_of(t, count > 1) is not None])
    if did == "liver_cyst":
        les = sorted(f["lesions"], key=lambda o: -o["size"])
        big = les[0]
        loc = ch([f"segment {big['segment']} of the liver", f"hepatic segment {big['segment']}"])
        if len(les) == 1:
            s = ch([
                f"A {big['size']} mm well-defined hypodense lesion in {loc}, consistent with "
                f"{_pick_np(rng, did)}.",
                f"There is {_pick_np(rng, did, exclude_post=True)} in {loc}, measuring "
                f"{big['size']} mm.",
                f"{_cap(loc)} contains a {big['size']} mm fluid-attenuation lesion "
                f"({big['hu']} HU), compatible with {_pick_np(rng, did)}.",
            ])
        else:
            n = _NUM[len(les)]
            s = ch([
                f"{_cap(n)} hypodense lesions in the liver, the largest {big['size']} mm in {loc}, "
                f"consistent with {_pick_np(rng, did, plural=True)}.",
                f"Multiple {_pick_np(rng, did, plural=True, exclude_post=True)} in the liver, up "
                f"to {big['size']} mm ({loc}).",
                f"{_cap(n)} fluid-attenuation liver lesions measuring "
                f"{', '.join(str(o['size']) for o in les)} mm, compatible with "
                f"{_pick_np(rng, did, plural=True)}.",
            ])
        return [s], f"{_cap(t_imp)}" + ch(["", f", {big['size']} mm", f" ({len(les)})"])
    if did == "liver_metastasis":
        les = sorted(f["lesions"], key=lambda o: -o["size"])
        big = les[0]
        n = len(les)
        np_ = _pick_np(rng, did, plural=True)
        loc = f"segment {big['segment']}"
        s = ch([
            f"Multiple hypoattenuating liver lesions, the largest {big['size']} mm in {loc}, "
            f"consistent with {np_}.",
            f"{_cap(_NUM[n])} ill-defined hypodense lesions throughout the liver measuring up to "
            f"{big['size']} mm ({loc}), compatible with {np_}.",
            f"The liver contains {n} solid-appearing lesions up to {big['size']} mm, in keeping "
            f"with {np_}.",
            f"{_cap(_pick_np(rng, did, plural=True))}: at least {n} lesions scattered throughout "
            f"the liver, the largest in hepatic {loc} ({big['size']} mm).",
        ])
        return [s], _cap(t_imp) + ch(["", " (multiple)", f", largest {big['size']} mm"])
    if did == "fatty_liver":
        hu_ = f["hu"]
        s = ch([
            f"The liver is diffusely hypoattenuating (approximately {hu_} HU), consistent with "
            f"{ch([t for t in _terms(did) if 'attenuation' not in t])}.",
            f"{_cap(_pick_np(rng, did))} is noted, with liver attenuation of about {hu_} HU.",
            f"Diffusely low attenuation of the liver relative to the spleen, compatible with "
            f"{ch([t for t in _terms(did) if 'attenuation' not in t])}.",
        ])
        return [s], _cap(t_imp)
    if did == "kidney_cyst":
        np_ = _pick_np(rng, did)
        s = ch([
            f"A {f['size']} mm fluid-attenuation lesion in the {f['pole']} of the {f['side']} "
            f"kidney, consistent with {np_}.",
            f"There is {_pick_np(rng, did, exclude_post=True)} in the {f['pole']} of the "
            f"{f['side']} kidney measuring {f['size']} mm.",
            f"{_cap(f['side'])} kidney: {f['size']} mm well-circumscribed water-attenuation "
            f"lesion, compatible with {np_}.",
        ])
        return [s], f"{_cap(t_imp)} ({f['side']}, {f['size']} mm)"
    if did == "renal_calculus":
        les = f["lesions"]
        big = max(les, key=lambda o: o["size"])
        if len(les) == 1:
            s = ch([
                f"A {big['size']} mm dense focus in the {big['pole']} of the {f['side']} kidney, "
                f"consistent with {_pick_np(rng, did)}.",
                f"{_cap(_pick_np(rng, did, exclude_post=True))} measuring {big['size']} mm in the "
                f"{f['side']} kidney ({big['pole']}).",
            ]) if "nephrolithiasis" not in t_imp else (
                f"{_cap(f['side'])} nephrolithiasis: a {big['size']} mm calcific focus in the "
                f"{big['pole']}.")
        else:
            s = ch([
                f"Two dense foci in the {f['side']} kidney, up to {big['size']} mm, consistent "
                f"with {_pick_np(rng, did, plural=True)}.",
                f"Two {ch(['renal calculi', 'kidney stones', 'renal stones', 'calculi'])} in the "
                f"{f['side']} kidney, the largest {big['size']} mm in the {big['pole']}.",
            ])
        return [s], f"{_cap(t_imp)} ({f['side']} kidney, {big['size']} mm)"
    if did == "hydronephrosis":
        side = _sides_text(f["sides"])
        g = f["grade"]
        if len(f["sides"]) == 1:
            where = f"{side} renal collecting system"
        else:
            where = "collecting systems of both kidneys"
        s = ch([
            f"{_cap(g)} {side} hydronephrosis.",
            f"The {where} {'is' if len(f['sides']) == 1 else 'are'} dilated, consistent with "
            f"{_pick_np(rng, did, plural=len(f['sides']) > 1)}.",
            f"{_cap(g)} dilatation of the {where} with fluid-filled calyces, in keeping with "
            f"{_pick_np(rng, did, plural=len(f['sides']) > 1)}.",
        ])
        return [s], f"{_cap(g)} {side} {t_imp}" if t_imp == "hydronephrosis" else (
            f"{_cap(t_imp)} ({side}, {g})")
    if did == "kidney_atrophy":
        sides = f["sides"]
        if len(sides) == 1:
            sd = sides[0]
            cm = f["lengths"][sd]
            s = ch([
                f"The {sd} kidney is small, measuring {cm} cm in length, with cortical thinning, "
                f"consistent with {_pick_np(rng, did)}.",
                f"{_cap(sd)} kidney: reduced size ({cm} cm) and thin cortex, compatible with "
                f"{_pick_np(rng, did)}.",
            ])
            imp = f"{_cap(t_imp)} ({sd})"
        else:
            s = (f"Both kidneys are small (right {f['lengths']['right']} cm, left "
                 f"{f['lengths']['left']} cm) with cortical thinning, consistent with bilateral "
                 f"{_pick_np(rng, did, plural=True)}.")
            imp = f"{_cap(t_imp)} (bilateral)"
        return [s], imp
    if did == "splenomegaly":
        cm = f["cm"]
        s = ch([
            f"The spleen is enlarged, measuring {cm} cm in craniocaudal extent, consistent with "
            f"{_pick_np(rng, did)}.",
            f"{_cap(_pick_np(rng, did))} ({cm} cm craniocaudal).",
            f"There is {_pick_np(rng, did)} with a craniocaudal span of {cm} cm.",
        ])
        return [s], _cap(t_imp) + ch(["", f" ({cm} cm)"])
    if did == "cardiomegaly":
        cm = f["cm"]
        s = ch([
            f"The heart is enlarged, consistent with {_pick_np(rng, did)}.",
            f"{_cap(_pick_np(rng, did))}, with a transverse cardiac diameter of {cm} cm.",
            f"There is {_pick_np(rng, did)} without pericardial thickening.",
        ])
        return [s], _cap(t_imp)
    if did == "pleural_effusion":
        sides = f["sides"]
        side = _sides_text(sides)
        plural = len(sides) == 2
        size = f["size"]
        lobes = "lower lobes" if plural else f"{side} lower lobe"
        np_ = _np_with_adj(rng, did, f"{size} {side}", plural)
        s = ch([
            f"There {'are' if plural else 'is'} {np_} layering dependently, with adjacent "
            f"compressive atelectasis of the {lobes}.",
            f"{_cap(np_)} posterior to the {lobes}.",
            f"Dependent fluid in the {'pleural spaces' if plural else side + ' pleural space'}, "
            f"consistent with {np_}.",
        ])
        imp_term = t_imp if t_imp != "effusion" else "pleural effusion"
        if plural:
            return [s], f"Bilateral {imp_term}" + ("" if imp_term.endswith("fluid") else "s")
        return [s], f"{_cap(size)} {side} {imp_term}"
    if did == "emphysema":
        b = f["bullae"]
        np_ = _pick_np(rng, did)
        s = ch([
            f"{_cap(np_)} in both lungs, predominantly in the upper lobes.",
            f"Diffuse hyperlucency of the lungs with attenuation of the pulmonary vasculature, "
            f"consistent with {np_}.",
            f"The lungs show {np_}, most pronounced in the upper lobes.",
        ])
        out = [s]
        if b:
            out.append(ch([f"Apical bullae up to {max(b)} mm in the upper lobes.",
                           f"Subpleural bullae in the upper lobes, the largest {max(b)} mm."]))
        return out, _cap(t_imp)
    if did == "lung_nodule":
        les = sorted(f["lesions"], key=lambda o: -o["size"])
        big = les[0]
        if len(les) == 1:
            np_ = _np_with_adj(rng, did, f"{big['size']} mm solid", False)
            s = ch([f"{_cap(np_)} in the {big['lobe']}.",
                    f"There is {np_} in the {big['lobe']}.",
                    f"In the {big['lobe']} there is {np_}."])
            imp = f"{_cap(t_imp)} in the {big['lobe']}, {big['size']} mm"
        else:
            lobes = sorted({o["lobe"] for o in les})
            where = " and the ".join(lobes)
            np_ = _np_with_adj(rng, did, "solid", True)
            s = ch([f"{_cap(_NUM[len(les)])} {np_} up to {big['size']} mm in the {where}.",
                    f"There are {_NUM[len(les)]} {np_} in the {where}, the largest {big['size']} "
                    f"mm in the {big['lobe']}."])
            imp = f"{_cap(t_imp)} ({len(les)}), largest {big['size']} mm"
        return [s], imp
    if did == "gallstone":
        les = f["lesions"]
        big = max(o["size"] for o in les)
        if len(les) == 1:
            s = ch([
                f"A {big} mm calcified focus in the dependent gallbladder, consistent with "
                f"{_pick_np(rng, did)}.",
                f"There is {_pick_np(rng, did, exclude_post=True)} measuring {big} mm in the "
                f"dependent portion of the gallbladder.",
            ])
        else:
            s = ch([
                f"{_cap(_NUM[len(les)])} dense foci layering in the gallbladder, the largest "
                f"{big} mm, consistent with {_pick_np(rng, did, plural=True)}.",
                f"Multiple {_pick_np(rng, did, plural=True, exclude_post=True)} in the "
                f"gallbladder, up to {big} mm.",
            ])
        return [s], _cap(t_imp) + ch(["", f", up to {big} mm"])
    if did == "bladder_stone":
        sz = f["size"]
        s = ch([
            f"A {sz} mm dense focus in the dependent urinary bladder, consistent with "
            f"{_pick_np(rng, did)}.",
            f"There is {_pick_np(rng, did, exclude_post=True)} measuring {sz} mm in the dependent "
            f"bladder.",
            f"Urinary bladder: {sz} mm calcified intraluminal focus, compatible with "
            f"{_pick_np(rng, did)}.",
        ])
        return [s], f"{_cap(t_imp)}, {sz} mm"
    if did == "adrenal_nodule":
        sd, sz, h = f["side"], f["size"], f["hu"]
        np_ = _pick_np(rng, did)
        s = ch([
            f"A {sz} mm low-attenuation nodule arising from the {sd} adrenal gland ({h} HU), "
            f"consistent with {np_}.",
            f"{_cap(sd)} adrenal gland: {sz} mm low-attenuation focus, likely {np_}.",
            f"There is {_np_with_adj(rng, did, f'{sz} mm {sd}', False)} measuring {h} HU.",
        ])
        return [s], f"{_cap(sd)} {t_imp}, {sz} mm" if t_imp.startswith("adrenal") else (
            f"{_cap(t_imp)} ({sd}, {sz} mm)")
    if did == "pancreas_atrophy":
        np_ = _pick_np(rng, did)
        s = ch([
            f"The pancreas is diffusely thinned with fatty replacement, consistent with {np_}.",
            f"There is {np_}.",
            f"Diffuse volume loss of the pancreas, compatible with {np_}.",
        ])
        return [s], _cap(t_imp)
    raise KeyError(did)


def _np_with_adj(rng, did: str, adj: str, plural: bool) -> str:
    """Noun phrase with adjectives between article and term, e.g. 'a 6 mm solid lung nodule'."""
    opts = []
    for t in _terms(did):
        if " in the " in t or " of the " in t:
            continue
        form = _np_of(t, plural)
        if form is None:
            continue
        if form.startswith(("a ", "an ")):
            head = form.split(" ", 1)[1]
            phrase = f"{adj} {head}"
            art = "an" if phrase[0] in "aeiou8" or phrase.startswith(("11", "18")) else "a"
            opts.append(f"{art} {phrase}")
        else:
            opts.append(f"{adj} {form}")
    return str(rng.choice(opts))


def _make_report(labels: dict[str, int], findings: dict, rng) -> str:
    diseases = catalog.diseases("demo")
    by_anat: dict[str, list[str]] = {}
    for d in diseases:
        by_anat.setdefault(d.anatomy, []).append(d.id)
    lines: list[str] = []
    impression: list[str] = []
    fmt = {"spleen_cm": findings.get("_spleen_cm", 10.0)}
    for anat in _ORDER:
        ids = by_anat.get(anat, [])
        positives = [d for d in ids if labels[d]]
        sentences: list[str] = []
        if positives:
            for d in positives:
                ss, imp = _positive_sentences(d, findings[d], rng)
                sentences.extend(ss)
                impression.append(imp)
            for d in ids:
                if not labels[d] and rng.random() < 0.25:
                    sentences.append(str(rng.choice(_NEGATION[d])))
        elif ids:
            if rng.random() < 0.75:
                pool = list(_NORMAL[anat])
                if findings.get("_contrast"):
                    pool += _NORMAL_CONTRAST.get(anat, [])
                sentences.append(str(rng.choice(pool)).format(**fmt))
                for d in ids:
                    if rng.random() < 0.15:
                        neg = str(rng.choice(_NEGATION[d]))
                        if neg not in sentences:
                            sentences.append(neg)
        else:
            if rng.random() < 0.35:
                sentences.append(str(rng.choice(_NORMAL_EXTRA[anat])))
        if sentences:
            lines.append(" ".join(sentences))
    if not lines:
        lines.append("No abnormality in the visualized chest, abdomen and pelvis.")
    if rng.random() < 0.3:
        lines.append(str(rng.choice(["No free fluid.", "No lymphadenopathy.",
                                     "No free intraperitoneal air."])))
    if not impression:
        imp_text = str(rng.choice(["No acute abnormality.", "No acute abnormality.",
                                   "No acute abnormality in the chest, abdomen or pelvis.",
                                   "No acute abnormality. Unremarkable examination."]))
    else:
        order = rng.permutation(len(impression)) if rng.random() < 0.3 else range(len(impression))
        items = [impression[i] for i in order]
        if len(items) > 1 and rng.random() < 0.6:
            imp_text = "\n".join(f"{k}. {it}." for k, it in enumerate(items, 1))
        else:
            imp_text = " ".join(f"{it}." for it in items)
    return "FINDINGS:\n" + "\n".join(lines) + "\n\nIMPRESSION:\n" + imp_text


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def generate_case(index: int, seed: int) -> Case:
    """Render synthetic case ``index`` of the cohort ``seed`` (deterministic)."""
    labels = case_labels(index, seed)
    _, _, rng_text = _streams(index, seed)
    cv, info, inner, kidneys, adrenals = _render(index, seed, labels)
    rng_dis = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
    lesions, findings = _render_diseases(cv, info, inner, kidneys, adrenals, labels, rng_dis)
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 11]))
    sigma = float(noise_rng.uniform(5, 25))
    img = cv.hu
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    image = np.rint(img).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(cv.spacing)
    affine[:3, 3] = cv.origin
    report = _make_report(labels, findings, rng_text)
    return Case(
        case_id=f"demo_{index:04d}",
        image=image,
        mask=cv.lab,
        affine=affine,
        spacing=tuple(float(x) for x in cv.spacing),
        labels=labels,
        lesions=lesions,
        report=report,
    )


def _split_counts(n: int, split: tuple[float, float, float]) -> list[int]:
    fr = np.asarray(split, float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {split!r}")
    if n < 3:
        raise ValueError("need at least 3 cases so that train, val and test are non-empty")
    fr = fr / fr.sum()
    raw = fr * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    for j in range(3):  # every split non-empty
        if counts[j] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[j] = 1
    return [int(c) for c in counts]


def assign_splits(labels: list[dict[str, int]], seed: int,
                  split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Iterative stratification (Sechidis et al. 2011) of multilabel cases into train/val/test.

    Exact split sizes from the fractions, deterministic from the seed.
    """
    names = ("train", "val", "test")
    n = len(labels)
    counts = _split_counts(n, split)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5917]))
    ids = sorted({k for lab in labels for k in lab})
    Y = np.array([[lab.get(k, 0) for k in ids] for lab in labels], int).reshape(n, len(ids))
    fr = np.array(counts, float) / n
    need = fr[:, None] * Y.sum(axis=0)[None, :]  # desired positives per split and label
    cap = np.array(counts, float)
    out = np.full(n, -1)
    order = rng.permutation(n)
    while (out < 0).any():
        left = (out < 0)
        pos_left = Y[left].sum(axis=0)
        if pos_left.sum() == 0:
            for i in order:
                if out[i] < 0:
                    cand = np.flatnonzero(cap == cap.max())
                    j = int(rng.choice(cand))
                    out[i], cap[j] = j, cap[j] - 1
            break
        lab_ = int(np.argmin(np.where(pos_left > 0, pos_left, np.inf)))
        for i in order:
            if out[i] >= 0 or not Y[i, lab_]:
                continue
            ok = cap > 0
            score = np.where(ok, need[:, lab_], -np.inf)
            cand = np.flatnonzero(score == score.max())
            if len(cand) > 1:
                c2 = cap[cand]
                cand = cand[c2 == c2.max()]
            j = int(rng.choice(cand))
            out[i] = j
            cap[j] -= 1
            need[j] -= Y[i]
    # refine by label-balancing swaps between splits (sizes stay exact)
    target = fr[:, None] * Y.sum(axis=0)[None, :]
    C = np.stack([Y[out == j].sum(axis=0) for j in range(3)]).astype(float)

    def loss(C_):
        short = np.clip(np.minimum(3.0, np.floor(target)) - C_, 0, None)
        return float((((C_ - target) ** 2) / np.maximum(target, 1.0)).sum() + 10.0 * short.sum())

    cur = loss(C)
    for _ in range(40 * n):
        a, b = rng.integers(n, size=2)
        ja, jb = out[a], out[b]
        if ja == jb:
            continue
        d = (Y[b] - Y[a]).astype(float)
        C[ja] += d
        C[jb] -= d
        new = loss(C)
        if new < cur:
            out[a], out[b], cur = jb, ja, new
        else:
            C[ja] -= d
            C[jb] += d
    return [names[j] for j in out]


def write_cohort(out_dir: str | Path, n_cases: int, seed: int,
                 split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Path:
    """Write ``n_cases`` synthetic cases (NIfTI images and masks) plus manifest and ground truth.

    Returns the path of ``out_dir/manifest.parquet``.
    """
    import nibabel as nib
    import polars as pl
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    all_labels = [case_labels(i, seed) for i in range(n_cases)]
    splits = assign_splits(all_labels, seed, split)
    anat = {d.id: d.anatomy for d in catalog.diseases("demo")}
    rows, gt = [], []
    for i in tqdm(range(n_cases), desc="demo cohort", unit="case"):
        case = generate_case(i, seed)
        img_path = out_dir / "images" / f"{case.case_id}.nii.gz"
        msk_path = out_dir / "masks" / f"{case.case_id}.nii.gz"
        for arr, path, dtype in ((case.image, img_path, np.int16), (case.mask, msk_path, np.uint8)):
            nii = nib.Nifti1Image(arr.astype(dtype, copy=False), case.affine)
            nii.header.set_data_dtype(dtype)
            nii.header.set_xyzt_units("mm")
            nii.set_qform(case.affine, code=1)
            nii.set_sform(case.affine, code=1)
            nib.save(nii, str(path))
        rows.append({
            "case_id": case.case_id,
            "split": splits[i],
            "image_path": str(img_path),
            "mask_path": str(msk_path),
            "report_text": case.report,
            "source": SOURCE,
            "spacing_x": case.spacing[0],
            "spacing_y": case.spacing[1],
            "spacing_z": case.spacing[2],
            "shape_x": int(case.image.shape[0]),
            "shape_y": int(case.image.shape[1]),
            "shape_z": int(case.image.shape[2]),
            "rescale_slope": None,
            "rescale_intercept": None,
            "source_id": case.case_id,
            "ingest_note": None,
        })
        for did, v in case.labels.items():
            gt.append({"case_id": case.case_id, "disease_id": did, "anatomy": anat[did],
                       "label": int(v)})
    from .ingest import GROUND_TRUTH_SCHEMA, MANIFEST_SCHEMA, write

    manifest = pl.DataFrame(rows, schema=MANIFEST_SCHEMA)
    truth = pl.DataFrame(gt, schema=GROUND_TRUTH_SCHEMA)

    return write(manifest, truth, None, out_dir)["manifest"]
