"""Star-pattern registration: which transform maps this frame's stars onto the reference's.

Method (pure numpy/scipy, no I/O):
1. Triangles from each of the brightest stars and pairs of its nearest neighbours, described
   by two side ratios, which do not change under shift, rotation, scale or mirroring.
2. A cKDTree over the reference's descriptors (built once per reference and cached on its
   `Stars`) gives candidate triangle pairs; each pair proposes a similarity (3 points).
3. Every proposal is scored at once (vectorised): how many of the frame's bright stars land
   within `match_tol_px` of a reference star. The best proposal wins (RANSAC by exhaustive
   vote over the candidates, which is cheaper here than random sampling).
4. All one-to-one matches under it are refitted by least squares (similarity by default,
   affine or homography as options), twice with a tightening tolerance.

Failure is an answer: `Registration(ok=False, reason=...)`, never an exception. A mirrored
frame (reflection, e.g. a diagonal added to the optical train) is matched with the correct
reflecting matrix and flagged `mirrored=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree

from daemon.pipeline.stars import Stars

MODELS = ("similarity", "affine", "homography")
#: Proposals scored at a time (see `register`): the first batch, doubled for each next one.
_FIRST_BATCH, _MAX_BATCH = 32, 1024


@dataclass
class Registration:
    """Result of registering a frame. `matrix` maps frame pixels (x, y, 1) onto reference
    pixels (x = column, y = row, 0-based). dx, dy (px) are where the frame's centre pixel
    lands in the reference minus the frame centre (the image drift, independent of any rotation
    centre); rotation_deg is counter-clockwise in x-right/y-down axes (+x turns towards +y);
    scale is reference px per frame px. None for all of them when `ok` is False."""

    ok: bool
    reason: str | None
    matrix: np.ndarray | None
    dx: float | None = None
    dy: float | None = None
    rotation_deg: float | None = None
    scale: float | None = None
    mirrored: bool = False
    n_matched: int = 0
    rms_px: float | None = None

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "reason": self.reason,
            "matrix": None if self.matrix is None else np.asarray(self.matrix).tolist(),
            "dx": self.dx, "dy": self.dy, "rotation_deg": self.rotation_deg, "scale": self.scale,
            "mirrored": self.mirrored, "n_matched": self.n_matched, "rms_px": self.rms_px,
        }


def _fail(reason: str, n_matched: int = 0) -> Registration:
    return Registration(ok=False, reason=reason, matrix=None, n_matched=n_matched)


# --------------------------------------------------------------------------- triangles


@dataclass
class _PatternIndex:
    """Triangles of one star list: vertex indices (T, 3) ordered by opposite side, longest
    first, descriptors (T, 2), and a tree over the descriptors."""

    tri: np.ndarray
    desc: np.ndarray
    tree: cKDTree | None


def _triangles(xy: np.ndarray, n_neighbours: int) -> _PatternIndex:
    n = len(xy)
    if n < 3:
        return _PatternIndex(np.zeros((0, 3), int), np.zeros((0, 2)), None)
    k = min(n_neighbours, n - 1)
    _, nn = cKDTree(xy).query(xy, k=k + 1)
    pairs = np.array(list(combinations(range(1, k + 1), 2)))
    tri = np.concatenate([np.column_stack([nn[:, 0], nn[:, a], nn[:, b]]) for a, b in pairs])
    tri = np.sort(tri, axis=1)
    # Duplicates out through one int64 key per triangle (np.unique over rows is ~5x slower).
    _, first = np.unique((tri[:, 0] * n + tri[:, 1]) * n + tri[:, 2], return_index=True)
    tri = tri[np.sort(first)]
    p = xy[tri]  # (T, 3, 2)
    # Side opposite vertex i.
    side = np.stack([
        np.linalg.norm(p[:, 1] - p[:, 2], axis=1),
        np.linalg.norm(p[:, 0] - p[:, 2], axis=1),
        np.linalg.norm(p[:, 0] - p[:, 1], axis=1),
    ], axis=1)
    order = np.argsort(-side, axis=1)
    side = np.take_along_axis(side, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    good = side[:, 2] > 1e-6 * np.maximum(side[:, 0], 1.0)
    # Tiny triangles: centroid noise dominates their shape.
    good &= side[:, 0] > 5.0
    tri, side = tri[good], side[good]
    desc = np.column_stack([side[:, 1] / side[:, 0], side[:, 2] / side[:, 1]])
    return _PatternIndex(tri, desc, cKDTree(desc) if len(desc) else None)


# --------------------------------------------------------------------------- fits


def _similarity_batch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation or reflection, uniform scale, shift) for a batch.

    src, dst: (K, P, 2). Returns (K, 3, 3). Umeyama's method WITHOUT forcing det > 0, so a
    mirrored set of points yields its reflection, which the caller can then flag. In 2-D the
    orthogonal factor of the cross-covariance C has a closed form (no batched SVD, ~10x
    faster for thousands of proposals): the best rotation has angle atan2(C10 - C01, C00 + C11)
    and the best reflection atan2(C10 + C01, C00 - C11); the one with the larger norm wins
    (that is the sign of det C), and that norm is the sum of C's singular values.
    """
    ms, md = src.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
    s0, d0 = src - ms, dst - md
    cov = np.matmul(d0.transpose(0, 2, 1), s0) / src.shape[1]  # sum_p d0[p, i] s0[p, j]
    c00, c01, c10, c11 = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 0], cov[:, 1, 1]
    rot_c, rot_s = c00 + c11, c10 - c01
    ref_c, ref_s = c00 - c11, c10 + c01
    rot_n, ref_n = np.hypot(rot_c, rot_s), np.hypot(ref_c, ref_s)
    mirror = ref_n > rot_n
    norm = np.where(mirror, ref_n, rot_n)
    safe = np.where(norm > 0, norm, 1.0)
    cos = np.where(norm > 0, np.where(mirror, ref_c, rot_c) / safe, 1.0)
    sin = np.where(norm > 0, np.where(mirror, ref_s, rot_s) / safe, 0.0)
    var = (s0**2).sum(axis=(1, 2)) / src.shape[1]
    scale = norm / np.where(var > 0, var, 1.0)
    m = np.zeros((src.shape[0], 3, 3))
    m[:, 0, 0] = scale * cos
    m[:, 1, 0] = scale * sin
    m[:, 0, 1] = scale * np.where(mirror, sin, -sin)
    m[:, 1, 1] = scale * np.where(mirror, -cos, cos)
    m[:, :2, 2] = md[:, 0] - np.matmul(m[:, :2, :2], ms[:, 0, :, None])[..., 0]
    m[:, 2, 2] = 1.0
    return m


def fit_transform(src: np.ndarray, dst: np.ndarray, model: str = "similarity") -> np.ndarray:
    """Least-squares 3x3 matrix mapping src (N, 2) onto dst (N, 2)."""
    if model == "similarity":
        return _similarity_batch(src[None], dst[None])[0]
    if model == "affine":
        a = np.column_stack([src, np.ones(len(src))])
        sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
        return np.vstack([sol.T, [0.0, 0.0, 1.0]])
    if model == "homography":
        return _homography(src, dst)
    raise ValueError(f"unknown transform model {model!r}; expected one of {', '.join(MODELS)}")


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Normalised DLT (Hartley) least squares over all points."""

    def norm(p):
        c = p.mean(axis=0)
        s = math.sqrt(2) / max(np.sqrt(((p - c) ** 2).sum(axis=1)).mean(), 1e-12)
        return np.array([[s, 0, -s * c[0]], [0, s, -s * c[1]], [0, 0, 1.0]])

    ts, td = norm(src), norm(dst)
    ps = apply(ts, src)
    pd = apply(td, dst)
    n = len(src)
    a = np.zeros((2 * n, 9))
    x, y = ps[:, 0], ps[:, 1]
    u, v = pd[:, 0], pd[:, 1]
    a[0::2, 0:3] = np.column_stack([x, y, np.ones(n)])
    a[0::2, 6:9] = -u[:, None] * np.column_stack([x, y, np.ones(n)])
    a[1::2, 3:6] = np.column_stack([x, y, np.ones(n)])
    a[1::2, 6:9] = -v[:, None] * np.column_stack([x, y, np.ones(n)])
    _, _, vt = np.linalg.svd(a)
    h = vt[-1].reshape(3, 3)
    h = np.linalg.inv(td) @ h @ ts
    return h / h[2, 2]


def apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 3x3 matrix."""
    p = xy @ matrix[:2, :2].T + matrix[:2, 2]
    if matrix[2, 0] or matrix[2, 1] or matrix[2, 2] != 1.0:
        w = xy @ matrix[2, :2] + matrix[2, 2]
        p = (xy @ matrix[:2, :2].T + matrix[:2, 2]) / w[:, None]
    return p


# --------------------------------------------------------------------------- matching


def _one_to_one(dist: np.ndarray, idx: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices and reference indices of nearest-neighbour pairs within tol, each
    reference star used once (the closest frame star keeps it)."""
    ok = np.isfinite(dist) & (dist <= tol)
    fi = np.nonzero(ok)[0]
    ri = idx[ok]
    order = np.argsort(dist[ok], kind="stable")
    fi, ri = fi[order], ri[order]
    _, first = np.unique(ri, return_index=True)
    return fi[first], ri[first]


def _reference_index(reference: Stars, n_pattern: int, n_neighbours: int) -> tuple[_PatternIndex, cKDTree]:
    key = ("pattern", n_pattern, n_neighbours, len(reference))
    cache = reference.index_cache
    if key not in cache:
        xy = reference.xy
        cache[key] = _triangles(xy[:n_pattern], n_neighbours)
    if ("tree", len(reference)) not in cache:
        cache[("tree", len(reference))] = cKDTree(reference.xy)
    return cache[key], cache[("tree", len(reference))]


def register(
    stars: Stars,
    reference: Stars,
    model: str = "similarity",
    *,
    n_pattern: tuple[int, ...] = (40, 80, 150),
    n_neighbours: int = 6,
    max_stars: int = 500,
    match_tol_px: float = 3.0,
    min_matches: int = 8,
    max_rms_px: float = 1.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_candidates: int = 4000,
    min_fraction: float = 0.25,
) -> Registration:
    """Transform mapping `stars` (this frame) onto `reference`; see the module docstring.

    `n_pattern`: sizes of the brightest-star subsets tried for the triangle search, in order,
    until one gives a consistent match (bigger sets survive cloud and crowding, cost more).
    `match_tol_px`: a star is matched if it lands this close to a reference star under a
    candidate transform. A frame needs `min_matches` matched stars, at least `min_fraction`
    of the stars both lists could share in their overlap, and a least-squares residual
    below `max_rms_px` to be registered. `scale_range` bounds the plausible scale.
    """
    if model not in MODELS:
        return _fail(f"unknown transform model {model!r}")
    n_f, n_r = len(stars), len(reference)
    if n_f < min_matches or n_r < min_matches:
        return _fail(f"too few stars: {n_f} in frame, {n_r} in reference (need {min_matches})")
    fxy = stars.xy[:max_stars]
    ref_all = reference.xy[:max_stars]
    best: tuple[int, float, np.ndarray] | None = None
    for n_pat in n_pattern:
        ref_idx, ref_tree = _reference_index(reference, n_pat, n_neighbours)
        if min(n_pat, n_f, n_r) < 3 or ref_idx.tree is None:
            continue
        frm_idx = _triangles(fxy[:n_pat], n_neighbours)
        if frm_idx.tree is None:
            continue
        cand = _candidates(frm_idx, ref_idx, max_candidates)
        if cand is None:
            continue
        fi, ri = cand
        probe = fxy[: max(n_pat, 60)]
        good_enough = max(min_matches, 0.3 * min(len(probe), n_r))
        # Proposals in growing batches, closest descriptors first: a real frame's right
        # proposal is almost always among the first few dozen, so scoring usually stops after
        # the first batch (scoring all 4000 at once cost ~100x more); a hard frame still gets
        # every candidate, in a few bigger batches.
        b0, size = 0, _FIRST_BATCH
        while b0 < len(fi):
            bf, br = fi[b0:b0 + size], ri[b0:b0 + size]
            b0, size = b0 + size, min(2 * size, _MAX_BATCH)
            src = fxy[:n_pat][frm_idx.tri[bf]]  # (K, 3, 2)
            dst = reference.xy[:n_pat][ref_idx.tri[br]]
            mats = _similarity_batch(src, dst)
            sc = np.sqrt(np.abs(mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0]))
            keep = (sc >= scale_range[0]) & (sc <= scale_range[1])
            # The three vertices themselves must fit (a proposal from a shape coincidence of
            # a mirrored triangle with a different orientation does not).
            # (batched matmul rather than einsum: the same sums, up to 30x faster for thousands
            # of proposals)
            res = np.matmul(src, mats[:, :2, :2].transpose(0, 2, 1)) + mats[:, None, :2, 2] - dst
            keep &= np.sqrt((res**2).sum(axis=2)).max(axis=1) < match_tol_px
            mats = mats[keep]
            if len(mats) == 0:
                continue
            # Score every proposal on the frame's brightest stars.
            pts = np.matmul(probe[None], mats[:, :2, :2].transpose(0, 2, 1)) + mats[:, None, :2, 2]
            d, _ = ref_tree.query(pts.reshape(-1, 2), distance_upper_bound=match_tol_px)
            score = np.isfinite(d.reshape(len(mats), len(probe))).sum(axis=1)
            j = int(np.argmax(score))
            n_hit = int(score[j])
            if best is None or n_hit > best[0]:
                best = (n_hit, float(n_pat), mats[j])
            if n_hit >= good_enough:
                break
        # Good enough: a clear majority-consistent proposal; stop escalating.
        if best is not None and best[0] >= good_enough:
            break
    if best is None:
        return _fail("no consistent match: no similar star triangles between frame and reference")
    if best[0] < min_matches:
        return _fail(f"no consistent match: best pattern agreed on {best[0]} stars (need {min_matches})",
                     n_matched=best[0])
    reg = _refine(fxy, ref_all, best[2], model, match_tol_px, min_matches, max_rms_px, stars.shape)
    if reg.ok:
        # Significance: a true match pairs up a good share of the stars both lists could have
        # in common; a chance alignment of a few among hundreds (tested: random lists of 100
        # stars reach 10 "matches" at 3 px) does not.
        n_common = _n_overlapping(reg.matrix, fxy, ref_all, stars.shape, reference.shape)
        if reg.n_matched < min_fraction * n_common:
            return _fail(f"no consistent match: only {reg.n_matched} of {n_common} stars in the "
                         f"overlap agree", reg.n_matched)
    return reg


def _n_overlapping(matrix, fxy, rxy, f_shape, r_shape) -> int:
    """How many stars could match: frame stars landing inside the reference frame and
    reference stars landing inside the frame, the smaller of the two. Shapes default to
    the star lists' bounding boxes."""

    def inside(p, shape, other):
        if shape is None:
            lo, hi = other.min(axis=0), other.max(axis=0)
        else:
            lo, hi = np.array([-0.5, -0.5]), np.array([shape[1] - 0.5, shape[0] - 0.5])
        return int(np.all((p >= lo) & (p <= hi), axis=1).sum())

    a = inside(apply(matrix, fxy), r_shape, rxy)
    b = inside(apply(np.linalg.inv(matrix), rxy), f_shape, fxy)
    return min(a, b)


def _candidates(frm: _PatternIndex, ref: _PatternIndex, max_candidates: int):
    """Pairs (frame triangle, reference triangle) with near-equal descriptors, closest first."""
    k = min(4, len(ref.desc))
    d, j = ref.tree.query(frm.desc, k=k, distance_upper_bound=0.02)
    d, j = np.atleast_2d(d.reshape(len(frm.desc), k)), np.atleast_2d(j.reshape(len(frm.desc), k))
    ok = np.isfinite(d)
    fi = np.nonzero(ok)[0]
    if fi.size == 0:
        return None
    ri, dd = j[ok], d[ok]
    order = np.argsort(dd, kind="stable")[:max_candidates]
    return fi[order], ri[order]


def _refine(fxy, rxy, matrix, model, tol, min_matches, max_rms_px, shape) -> Registration:
    """Least squares on all one-to-one matches, iterated with a tightening tolerance."""
    tree = cKDTree(rxy)
    fi = ri = np.zeros(0, int)
    rms = float("inf")
    m = matrix
    for it in range(4):
        d, idx = tree.query(apply(m, fxy), distance_upper_bound=tol)
        new_fi, new_ri = _one_to_one(d, idx, tol)
        if it and np.array_equal(new_fi, fi) and np.array_equal(new_ri, ri):
            break  # the same pairs again: the same fit again
        fi, ri = new_fi, new_ri
        need = {"similarity": 2, "affine": 3, "homography": 4}[model]
        if len(fi) < max(min_matches, need):
            return _fail(f"no consistent match: {len(fi)} stars agree (need {min_matches})", len(fi))
        m = fit_transform(fxy[fi], rxy[ri], model)
        r = np.linalg.norm(apply(m, fxy[fi]) - rxy[ri], axis=1)
        rms = float(np.sqrt(np.mean(r**2)))
        # Next pass: keep pairs within 3 sigma of the fit, never tighter than 0.5 px and never
        # looser than the start (a wrong fit must not grow its net until it catches anything).
        tol = min(tol, max(3.0 * rms, 0.5))
    if rms > max_rms_px:
        if len(fi) < 3 * min_matches:
            return _fail(f"no consistent match: best fit leaves {rms:.2f} px RMS over {len(fi)} stars", len(fi))
        return _fail(f"residual too large: {rms:.2f} px RMS over {len(fi)} stars (max {max_rms_px})", len(fi))
    return describe(m, shape, n_matched=len(fi), rms_px=rms)


def describe(matrix: np.ndarray, shape: tuple[int, int] | None, *, n_matched: int = 0,
             rms_px: float | None = None) -> Registration:
    """A successful Registration with dx, dy, rotation, scale, mirrored read off `matrix`."""
    a = matrix[:2, :2]
    det = float(np.linalg.det(a))
    mirrored = det < 0
    b = a @ np.diag([-1.0, 1.0]) if mirrored else a
    rot = math.degrees(math.atan2(b[1, 0], b[0, 0]))
    scale = math.sqrt(abs(det))
    if shape is not None:
        c = np.array([[(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0]])
    else:
        c = np.zeros((1, 2))
    dx, dy = (apply(matrix, c) - c)[0]
    return Registration(ok=True, reason=None, matrix=np.asarray(matrix, dtype=np.float64),
                        dx=float(dx), dy=float(dy), rotation_deg=rot, scale=scale,
                        mirrored=bool(mirrored), n_matched=int(n_matched), rms_px=rms_px)
