"""The painting canvas of the demo cohort: a HU volume and a label volume on a voxel grid, and the
primitives (ellipsoids, capsules) painted inside their bounding boxes only.

Also the small shared helpers: rotations, random draws, the spacing grid, sphere placement inside
a region and measurements of a mask (extent, relative position) that the report states.
"""

from __future__ import annotations

import math

import numpy as np

SPACING_QUANTUM = 1.0 / 256.0  # spacing/origin on a dyadic grid: exact in NIfTI float32 fields


def on_spacing_grid(mm):
    """``mm`` (a number or an array) rounded to a multiple of ``SPACING_QUANTUM``."""
    if np.ndim(mm) == 0:
        return round(mm / SPACING_QUANTUM) * SPACING_QUANTUM
    return np.round(np.asarray(mm) / SPACING_QUANTUM) * SPACING_QUANTUM


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """One uniform draw in [low, high) as a Python float."""
    return float(rng.uniform(low, high))


def draw_hu(rng: np.random.Generator, mean: float, sd: float = 4.0) -> float:
    """An attenuation around ``mean`` HU (normal, standard deviation ``sd``)."""
    return float(mean + rng.normal(0, sd))


def rotation(rz: float = 0.0, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx, angles in degrees."""
    a, b, c = np.deg2rad([rz, ry, rx])
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    about_x = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return about_z @ about_y @ about_x


class Canvas:
    """``hu`` (float32, air) and ``lab`` (uint8 class ids, background 0) on a grid given by
    ``shape``, ``spacing`` and ``origin`` (mm, RAS+; voxel i lies at origin + i * spacing)."""

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
        """Voxel slices of the world box [lo, hi] clipped to the grid, or None when empty."""
        slices = []
        for d in range(3):
            i0 = max(int(math.floor((lo[d] - self.origin[d]) / self.spacing[d])), 0)
            i1 = min(int(math.ceil((hi[d] - self.origin[d]) / self.spacing[d])) + 1, self.shape[d])
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def offsets(self, slices, centre):
        """World offsets (mm, float32) of the voxels in ``slices`` from ``centre``, broadcasting."""
        return (
            (self.axes[0][slices[0]] - np.float32(centre[0]))[:, None, None],
            (self.axes[1][slices[1]] - np.float32(centre[1]))[None, :, None],
            (self.axes[2][slices[2]] - np.float32(centre[2]))[None, None, :],
        )

    def world(self, idx) -> np.ndarray:
        return self.origin + np.asarray(idx, float) * self.spacing

    # -- primitives: return (slices, q) with q = normalised squared radius (<= 1 inside)
    def ellipsoid(self, centre, radii, rot=None):
        centre = np.asarray(centre, float)
        radii = np.maximum(np.asarray(radii, float), 1e-3)
        if rot is None:
            extent = radii
        else:
            extent = np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1))
        slices = self.bbox(centre - extent, centre + extent)
        if slices is None:
            return None, None
        dx, dy, dz = self.offsets(slices, centre)
        if rot is None:
            q = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
        else:
            rot32 = rot.astype(np.float32)
            q = None
            for i in range(3):
                along = dx * rot32[0, i] + dy * rot32[1, i] + dz * rot32[2, i]
                term = (along / np.float32(radii[i])) ** 2
                q = term if q is None else q + term
        return slices, q

    def capsule(self, p0, p1, r):
        """Distance (mm) to segment p0-p1 within its bounding box; returns (slices, dist)."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        slices = self.bbox(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if slices is None:
            return None, None
        v = (p1 - p0).astype(np.float32)
        vv = float(v @ v) or 1e-6
        dx, dy, dz = self.offsets(slices, p0)
        t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / np.float32(vv), 0.0, 1.0)
        d2 = (dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2
        return slices, np.sqrt(d2)

    def paint(self, slices, m, label=None, hu=None, clip=None, only=None):
        """Set label and/or HU where ``m`` (within ``slices``) holds, further restricted to the
        full-grid mask ``clip`` and to voxels whose current label is in ``only``."""
        if slices is None:
            return
        shape = self.lab[slices].shape
        if m.shape != shape:
            m = np.broadcast_to(m, shape)
        if clip is not None:
            m = m & clip[slices]
        if only is not None:  # restrict to voxels whose current label is in `only`
            m = m & np.isin(self.lab[slices], only)
        if label is not None:
            self.lab[slices][m] = label
        if hu is not None:
            view = self.hu[slices]
            view[m] = hu if np.isscalar(hu) else np.broadcast_to(hu, m.shape)[m]

    def ellipsoid_paint(self, centre, radii, label, hu, rot=None, clip=None, shell=None, only=None):
        """An ellipsoid; ``shell`` = (fraction of the radius, HU) repaints its inner part."""
        slices, q = self.ellipsoid(centre, radii, rot)
        if slices is None:
            return
        self.paint(slices, q <= 1.0, label, hu, clip=clip, only=only)
        if shell is not None:  # (fraction of radius, hu) for the inner part
            k, hu_inside = shell
            self.paint(slices, q <= k * k, None, hu_inside, clip=clip, only=[label])

    def tube_paint(self, pts, r, label, hu, clip=None, lumen=None, only=None):
        """A polyline of capsules of radius ``r``; ``lumen`` = (radius, HU) repaints its core."""
        for p0, p1 in zip(pts[:-1], pts[1:]):
            slices, dist = self.capsule(p0, p1, r)
            if slices is None:
                continue
            self.paint(slices, dist <= r, label, hu, clip=clip, only=only)
            if lumen is not None:
                lumen_r, lumen_hu = lumen
                self.paint(slices, dist <= lumen_r, None, lumen_hu, clip=clip, only=[label])

    # -- measurements of a full-grid mask
    def extent_cm(self, m: np.ndarray, axis: int) -> float:
        """Extent of mask ``m`` along ``axis`` in cm (one decimal), 0.0 when empty."""
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(m.any(axis=other))
        if nz.size == 0:
            return 0.0
        return round(float((nz[-1] - nz[0] + 1) * self.spacing[axis]) / 10.0, 1)

    def relative_position(self, organ: np.ndarray, point) -> np.ndarray:
        """Position of world ``point`` within the organ's bounding box, each axis in [0, 1]."""
        out = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            nz = np.flatnonzero(organ.any(axis=other))
            lo, hi = self.axes[ax][nz[0]], self.axes[ax][nz[-1]]
            out.append(float(np.clip((point[ax] - lo) / max(hi - lo, 1e-3), 0, 1)))
        return np.array(out)


# --------------------------------------------------------------------------------------------
# spheres inside a region
# --------------------------------------------------------------------------------------------


def _crop(mask: np.ndarray, pad: int = 1):
    """Slices of the bounding box of ``mask`` plus ``pad`` voxels, or None when it is empty."""
    idx = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        idx.append(slice(max(nz[0] - pad, 0), min(nz[-1] + pad + 1, mask.shape[ax])))
    return tuple(idx)


def place_sphere(cv: Canvas, region: np.ndarray, r: float, rng, depth: float = 1.0,
                 prefer: str | None = None, r_min: float | None = None):
    """Pick a centre inside `region` at least depth*r (mm) from its boundary.

    Shrinks r (not below r_min) when the region is too thin; ``prefer="dependent"`` keeps the
    most posterior tenth of the candidates. Returns (centre_mm, r) or None.
    """
    from scipy import ndimage

    box = _crop(region)
    if box is None:
        return None
    sub = region[box]
    dist = ndimage.distance_transform_edt(np.pad(sub, 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
    dmax = float(dist.max())
    need = depth * r
    if dmax < need:
        r_new = dmax / max(depth, 1e-6)
        if r_min is not None and r_new < r_min:
            r_new = r_min
        r = r_new
        need = min(depth * r, dmax)
    candidates = np.argwhere(dist >= need - 1e-6)
    if candidates.size == 0:
        return None
    if prefer == "dependent":  # most posterior (lowest y) candidates: supine patient
        ys = candidates[:, 1]
        candidates = candidates[ys <= np.quantile(ys, 0.1)]
    pick = candidates[rng.integers(len(candidates))]
    centre = cv.world([pick[d] + box[d].start for d in range(3)])
    centre = centre + rng.uniform(-0.5, 0.5, 3) * cv.spacing
    return centre, float(r)


def sphere_mask(cv: Canvas, centre, r) -> np.ndarray:
    """Full-grid mask of the ball of radius ``r`` mm around ``centre``."""
    slices, q = cv.ellipsoid(centre, (r, r, r))
    m = np.zeros(cv.shape, bool)
    if slices is not None:
        m[slices] = q <= 1.0
    return m
