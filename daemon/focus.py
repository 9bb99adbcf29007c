"""Autofocus arithmetic: the focus curve's fit, the sweep, backlash, and when to refocus.

Pure (numpy/scipy, no I/O); `daemon.autofocus` drives the focuser and camera with it.

Why a hyperbola: the half-flux radius of a defocused star grows linearly with the distance from
focus far out (the cone of light) and flattens at focus (seeing), which is a hyperbola
HFR(x) = a * sqrt(1 + ((x - c) / b)^2) with its minimum a at c. Near focus a parabola fits as
well; both are fitted and the one with the smaller residual gives the best position. A fit is
refused (ok False, with a reason) when its minimum lies outside the sampled positions: the
sweep must then move towards the smaller radii (`next_sweep`).

Backlash: every move that ends a sweep step or the final move approaches its target from the
same side (from below, i.e. moving outward), overshooting by `backlash_steps` first when the
focuser would otherwise arrive from above (`approach`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import curve_fit


@dataclass(frozen=True)
class FocusFit:
    """A fitted focus curve. Positions in focuser steps, radii in px.

    ok: a minimum was found inside the sweep; best_position / best_hfr_px: the fit's minimum;
    model: "hyperbola" or "parabola"; rms_px: the fit's residual; reason: why not, when not ok.
    """

    ok: bool
    best_position: int | None = None
    best_hfr_px: float | None = None
    model: str | None = None
    rms_px: float | None = None
    reason: str = ""
    params: tuple[float, ...] = field(default=(), compare=False)


def _hyperbola(x, a, b, c):
    return a * np.sqrt(1.0 + ((x - c) / b) ** 2)


def fit_curve(positions, hfr_px, min_points: int = 5) -> FocusFit:
    """Fit HFR against focuser position.

    Parameters
    ----------
    positions : focuser positions (steps) of the samples.
    hfr_px : median half-flux radius (px) at each; NaN/None for a frame without stars (ignored).
    min_points : fewer valid samples than this: not ok.

    Returns a `FocusFit`; never raises for bad data.
    """
    x = np.asarray(positions, dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in hfr_px], dtype=np.float64)
    good = np.isfinite(x) & np.isfinite(y) & (y > 0)
    x, y = x[good], y[good]
    if x.size < min_points:
        return FocusFit(ok=False, reason=f"{x.size} samples with stars, at least {min_points} needed")
    lo, hi = float(x.min()), float(x.max())
    i = int(np.argmin(y))
    span = max(hi - lo, 1.0)
    candidates: list[tuple[float, str, float, tuple]] = []
    # Hyperbola, started from the smallest sample and the outer slope.
    slope = max(abs(y[-1] - y[0]) / span, (y.max() - y.min()) / span, 1e-9)
    p0 = (max(y[i], 1e-3), max(y[i] / slope, span / 20), x[i])
    try:
        p, _ = curve_fit(_hyperbola, x, y, p0=p0, maxfev=5000,
                         bounds=([1e-3, span / 1000, lo - span], [y.max() * 2, span * 10, hi + span]))
        rms = float(np.sqrt(np.mean((_hyperbola(x, *p) - y) ** 2)))
        candidates.append((rms, "hyperbola", float(p[2]), tuple(float(v) for v in p)))
    except (RuntimeError, ValueError):
        pass
    # Parabola (in a centred, scaled variable for conditioning).
    u = (x - x.mean()) / span
    q = np.polyfit(u, y, 2)
    if q[0] > 0:
        vertex = -q[1] / (2 * q[0]) * span + x.mean()
        rms = float(np.sqrt(np.mean((np.polyval(q, u) - y) ** 2)))
        candidates.append((rms, "parabola", float(vertex), tuple(float(v) for v in q)))
    if not candidates:
        return FocusFit(ok=False, reason="no curve with a minimum fits the samples (flat or falling)")
    rms, model, best, params = min(candidates)
    if not lo <= best <= hi:
        side = "below" if best < lo else "above"
        return FocusFit(ok=False, best_position=int(round(best)), model=model, rms_px=rms, params=params,
                        reason=f"the minimum lies {side} the sweep {lo:.0f}..{hi:.0f}")
    if model == "hyperbola":
        best_hfr = float(params[0])
    else:
        best_hfr = float(np.polyval(params, (best - x.mean()) / span))
    return FocusFit(ok=True, best_position=int(round(best)), best_hfr_px=best_hfr, model=model,
                    rms_px=rms, params=params)


def sweep(center: int, step: int, points: int, low: float = 0, high: float = math.inf) -> list[int]:
    """`points` positions `step` apart centred on `center`, ascending, shifted to fit low..high."""
    half = (points - 1) // 2
    first = center - half * step
    last = first + (points - 1) * step
    if first < low:
        first = int(math.ceil(low))
    elif last > high:
        first = int(math.floor(high)) - (points - 1) * step
    return [int(first + k * step) for k in range(points) if low <= first + k * step <= high]


def next_sweep(positions, hfr_px, step: int, points: int, low: float = 0,
               high: float = math.inf) -> list[int] | None:
    """After a sweep whose minimum was at an edge: the next sweep towards the smaller radii
    (centred one half-sweep past the best sample), or None when the curve has a minimum inside."""
    x = np.asarray(positions, dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in hfr_px], dtype=np.float64)
    good = np.isfinite(y)
    if not good.any():
        return None
    i = int(np.nanargmin(y))
    best = x[i]
    if 0 < i < x.size - 1 and good[0] and good[-1]:
        return None
    direction = -1 if i == 0 or (not good[0] and i < x.size // 2) else 1
    return sweep(int(best + direction * step * ((points - 1) // 2)), step, points, low, high)


def approach(current: int, target: int, backlash_steps: int) -> list[int]:
    """The moves that bring the focuser to `target` always moving outward (increasing) at the
    end: [target] when it is above `current`, else [target - backlash_steps, target]."""
    if target >= current or backlash_steps <= 0:
        return [int(target)]
    return [int(target - backlash_steps), int(target)]


@dataclass
class RefocusTrigger:
    """When to focus again during a night (pure; the service feeds it every accepted frame).

    Due when the median FWHM of the last `min_frames` accepted frames has risen to
    `fwhm_factor` times the best FWHM since the last focus run, or when the temperature has
    fallen `temp_drop_c` (deg C) below the temperature of the last focus run. Until the first
    run the best is the night's best; after a run, the best since that run: a run cannot beat
    the seeing, so a night whose seeing got worse must not refocus after every few frames.
    Call `focused` after every run, whether it succeeded or not. FWHM in px of one camera and
    binning (a new trigger per plan); the temperature is the tube's (the focuser's probe), not
    a cooled sensor's.
    """

    fwhm_factor: float = 1.3
    temp_drop_c: float = 2.0
    min_frames: int = 3
    best_fwhm: float | None = None
    focus_temp_c: float | None = None
    _recent: list[float] = field(default_factory=list)
    _runs: int = 0

    def __post_init__(self) -> None:
        if not self.fwhm_factor > 1.0:
            raise ValueError(f"focus.refocus_fwhm_factor must be > 1, got {self.fwhm_factor!r}")
        if not self.temp_drop_c > 0.0:
            raise ValueError(f"focus.refocus_temp_drop_c must be > 0 C, got {self.temp_drop_c!r}")
        if int(self.min_frames) < 1:
            raise ValueError(f"focus.refocus_min_frames must be >= 1, got {self.min_frames!r}")

    def focused(self, temp_c: float | None) -> None:
        """A focus run just ended (at temperature temp_c): start over."""
        self.best_fwhm, self.focus_temp_c, self._recent = None, temp_c, []
        self._runs += 1

    def frame(self, fwhm_px: float | None, temp_c: float | None = None) -> str | None:
        """Record an accepted frame; returns the reason to refocus now, or None."""
        if temp_c is not None and self.focus_temp_c is None:
            self.focus_temp_c = temp_c
        if temp_c is not None and self.focus_temp_c is not None and \
                self.focus_temp_c - temp_c >= self.temp_drop_c:
            return f"temperature {temp_c:.1f} C, {self.focus_temp_c - temp_c:.1f} C below the last focus"
        if fwhm_px is None or not math.isfinite(fwhm_px):
            return None
        self._recent = (self._recent + [fwhm_px])[-self.min_frames:]
        if self.best_fwhm is None or fwhm_px < self.best_fwhm:
            self.best_fwhm = fwhm_px
        if len(self._recent) >= self.min_frames:
            typical = float(np.median(self._recent))
            if typical >= self.fwhm_factor * self.best_fwhm:
                best = "the best since the last focus" if self._runs else "the night's best"
                return f"FWHM {typical:.2f} px, {typical / self.best_fwhm:.2f}x {best} {self.best_fwhm:.2f}"
        return None
