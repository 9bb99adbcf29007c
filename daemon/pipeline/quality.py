"""Frame quality gate: decide, before stacking, whether a frame is worth its weight.

A frame is judged against its own night, not against fixed numbers: the star count, FWHM,
elongation and sky background are compared with the median and MAD of the recent accepted
frames (a window of `history` frames), so a night of uniformly elongated stars (an alt-az
mount, a small refractor's tilt) or soft seeing stacks all its frames, while a frame trailed
by wind or a bumped mount, or blurred by a passing cloud, stands out and is rejected. Until
`session_warmup` frames are accepted the session is the median of all frames seen so far,
with no MAD yet (a MAD of two numbers means nothing). Absolute limits (`min_stars`,
`max_eccentricity`, `max_fwhm_px`) are only a backstop where a frame is unusable by any
standard.

A rejection is "clearly worse than the session": beyond `session_kappa` MADs AND beyond a
minimum physical excess (`elongation_excess`, `fwhm_factor`, `min_star_fraction`), so a
session whose frames happen to agree to 0.01 does not reject a frame for 0.02.

A change that lasts is the night's new state, not a run of bad frames: when the last
`session_change` frames measured (this one included) were all beyond the session on the
same measure (elongation, FWHM or sky background: a meridian flip that leaves the stars a
little longer, seeing that stays worse, a neighbour's light switched on), the session on
that measure is those frames, so the rest of the night is not rejected for good. A frame
still has to agree with them, and clouds (the star count) never become the norm.

Each rejection carries a human-readable reason naming the measured value, the session's
and the distance in MADs, because the observer at the telescope needs to know *why* (cloud?
wind? focus?) to act: `trailing: elongation 1.62 vs session 1.19 (+8.1 MAD)`. The gate is
pure: it sees the frame's metrics, the reference's and the session history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the gate; each can be switched off with 0.

    min_star_fraction: fewer stars than this fraction of the session median (of the reference
        before the warm-up) means cloud or haze (fraction).
    min_stars: absolute minimum of detected stars to register at all (count).
    max_fwhm_px: backstop FWHM limit (px); 0 = off.
    fwhm_factor: reject when the FWHM exceeds this factor times the session median (ratio)
        and `session_kappa` MADs above it.
    max_eccentricity: backstop: median star eccentricity above this is unusable whatever the
        session (0..1; 0.85 is an elongation of 1.9).
    elongation_excess: reject as trailed when the median star elongation (a/b) exceeds the
        session's by this much (ratio units, 0.15: stars 15 % longer) and by `session_kappa`
        MADs.
    background_jump: reject when the sky background moves by more than this fraction of the
        recent background level (fraction) ...
    background_jump_noise: ... and by more than this many times the reference noise (sigma),
        and by `session_kappa` MADs of the recent backgrounds, so that a near-zero calibrated
        background does not make every frame a jump.
    session_kappa: how many MADs (median absolute deviations of the window; 1 MAD = 0.67
        sigma of a normal distribution) a frame must be worse than the session (MAD).
    session_warmup: accepted frames before the window's median and MAD are used (count).
    history: number of recent accepted frames forming the session window (count).
    session_change: this many frames in a row beyond the session on one measure (elongation,
        FWHM, background) are a lasting change: the session on that measure becomes those
        frames (count; 0 = never). Half the window by default: as many as would move the
        window's median were the rejected frames in it.
    """

    min_star_fraction: float = 0.5
    min_stars: int = 8
    max_fwhm_px: float = 0.0
    fwhm_factor: float = 1.3
    max_eccentricity: float = 0.85
    elongation_excess: float = 0.15
    background_jump: float = 0.5
    background_jump_noise: float = 10.0
    session_kappa: float = 5.0
    session_warmup: int = 5
    history: int = 20
    session_change: int = 10


@dataclass
class Verdict:
    accepted: bool
    reason: str | None = None
    #: The check that failed: "registration", "clouds", "fwhm", "trailing", "background", or None.
    check: str | None = None


#: Smallest MAD used per metric, so that a session of near-identical frames does not make a
#: tiny difference look like many MADs: elongation (ratio), FWHM and star count (fractions of
#: the median).
_MAD_FLOOR_ELONGATION = 0.01
_MAD_FLOOR_FWHM = 0.01
_MAD_FLOOR_STARS = 0.02


@dataclass
class QualityHistory:
    """Metrics of the session (for its medians); JSON-able.

    fwhm_px, background, elongation, n_stars: the recent accepted frames (the window).
    seen: [fwhm_px, elongation, n_stars, background] of every frame measured, accepted or
    not, the last `history` of them (None where not measured): the session during the
    warm-up, and the frames that show a lasting change.
    """

    fwhm_px: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)
    elongation: list[float] = field(default_factory=list)
    n_stars: list[float] = field(default_factory=list)
    seen: list[list[float | None]] = field(default_factory=list)

    def accept(self, fwhm_px: float | None, background: float | None, keep: int, *,
               elongation: float | None = None, n_stars: int | None = None) -> None:
        """Add an accepted frame's metrics to the window of the last `keep` frames."""
        if fwhm_px is not None and fwhm_px > 0:
            self.fwhm_px = (self.fwhm_px + [float(fwhm_px)])[-keep:]
        if background is not None:
            self.background = (self.background + [float(background)])[-keep:]
        if elongation is not None and math.isfinite(elongation):
            self.elongation = (self.elongation + [float(elongation)])[-keep:]
        if n_stars is not None:
            self.n_stars = (self.n_stars + [float(n_stars)])[-keep:]

    def observe(self, fwhm_px: float | None, elongation: float | None, n_stars: int, keep: int,
                background: float | None = None) -> None:
        """Record a measured frame, accepted or not."""
        self.seen = (self.seen + [[fwhm_px, elongation, float(n_stars), background]])[-keep:]


@dataclass(frozen=True)
class _Session:
    median: float
    mad: float | None  # None during the warm-up
    n: int

    def describe(self, value: float, fmt: str) -> str:
        if self.mad is None:
            return f"vs session {self.median:{fmt}} (warm-up, {self.n} frame{'s' if self.n != 1 else ''})"
        return f"vs session {self.median:{fmt}} ({(value - self.median) / self.mad:+.1f} MAD)"


def _session(window: list[float], seen: list[list[float | None]], col: int, warmup: int,
             floor: float) -> _Session | None:
    """Median and MAD (floored at `floor`) of the window once it holds `warmup` frames, else
    the median of all frames seen so far (of the window when none were recorded), with no
    MAD; None with nothing to compare with."""
    if len(window) >= max(warmup, 1):
        med = median(window)
        mad = median(abs(v - med) for v in window)
        return _Session(med, max(mad, floor), len(window))
    pool = [row[col] for row in seen if row[col] is not None] or list(window)
    if not pool:
        return None
    return _Session(median(pool), None, len(pool))


def _lasting(seen: list[list[float | None]], col: int, value: float, n: int, beyond) -> list[float] | None:
    """The values of the last `n` frames, this one (`value`) the last, when all of them are
    `beyond(v)` the session: a lasting change. None otherwise (or with `n` = 0)."""
    if n <= 0:
        return None
    recent = [row[col] if len(row) > col else None for row in seen[-(n - 1):]] if n > 1 else []
    recent.append(value)
    if len(recent) < n or any(v is None or not beyond(v) for v in recent):
        return None
    return recent


def _changed(values: list[float], floor: float) -> _Session:
    """The session of a lasting change: median and MAD (floored) of its frames."""
    med = median(values)
    return _Session(med, max(median(abs(v - med) for v in values), floor), len(values))


def elongation_of(eccentricity: float | None) -> float | None:
    """a/b of an ellipse of eccentricity e: 1 / sqrt(1 - e^2); None for None."""
    if eccentricity is None or not math.isfinite(eccentricity):
        return None
    return 1.0 / math.sqrt(max(1.0 - eccentricity ** 2, 1e-6))


def assess(
    *,
    n_stars: int,
    fwhm_px: float | None,
    eccentricity: float | None,
    background: float | None,
    ref_stars: int,
    ref_noise: float | None,
    history: QualityHistory,
    settings: QualitySettings = QualitySettings(),
    registration_ok: bool = True,
    registration_reason: str | None = None,
    elongation: float | None = None,
) -> Verdict:
    """Judge one frame against the session.

    Parameters
    ----------
    n_stars : stars detected in the frame (count).
    fwhm_px : median star FWHM (px), None if no star was measured.
    eccentricity : median star eccentricity (0..1), None if unmeasured.
    background : median sky level (ADU).
    ref_stars, ref_noise : the reference frame's star count and sky noise (ADU).
    history : the session so far (`QualityHistory`); not modified here.
    settings : thresholds (`QualitySettings`).
    registration_ok, registration_reason : the registration's outcome.
    elongation : median star a/b; derived from `eccentricity` when None.

    Checks run from the most to the least specific cause: a cloudy frame also fails
    registration and has odd FWHM, but "clouds" is what the observer needs.
    """
    s = settings
    k = s.session_kappa
    if elongation is None:
        elongation = elongation_of(eccentricity)
    if s.min_star_fraction:
        sess = _session(history.n_stars, [], 2, s.session_warmup, 0.0)
        if sess is not None and sess.mad is not None:
            mad = max(sess.mad, _MAD_FLOOR_STARS * sess.median, 1.0)
            limit = sess.median - max(k * mad, (1 - s.min_star_fraction) * sess.median)
            if n_stars < limit:
                return Verdict(False, f"clouds: {n_stars} stars vs session {sess.median:.0f} "
                                      f"({(n_stars - sess.median) / mad:+.1f} MAD)", "clouds")
        elif ref_stars > 0 and n_stars < s.min_star_fraction * ref_stars:
            return Verdict(False, f"clouds: {n_stars} of {ref_stars} reference stars", "clouds")
    if s.min_stars and n_stars < s.min_stars:
        return Verdict(False, f"clouds: only {n_stars} stars (minimum {s.min_stars})", "clouds")
    if background is not None and history.background and s.background_jump:
        recent = median(history.background)
        spread = median(abs(v - recent) for v in history.background) if len(history.background) >= 3 else 0.0
        limit = _background_limit(recent, spread, ref_noise, s)
        if abs(background - recent) > limit:
            lasting = _lasting(history.seen, 3, background, s.session_change,
                               lambda v, r=recent, lim=limit: abs(v - r) > lim)
            if lasting is not None:
                new = _changed(lasting, 0.0)
                recent, limit = new.median, _background_limit(new.median, new.mad, ref_noise, s)
        jump = background - recent
        if abs(jump) > limit:
            return Verdict(
                False,
                f"background jump: {background:.1f} ADU vs recent {recent:.1f} ADU "
                f"({jump:+.1f}, limit {limit:.1f})",
                "background",
            )
    if s.elongation_excess and elongation is not None:
        sess = _session(history.elongation, history.seen, 1, s.session_warmup, _MAD_FLOOR_ELONGATION)
        if sess is not None:
            limit = sess.median + max(s.elongation_excess, k * sess.mad if sess.mad else 0.0)
            if elongation > limit:
                lasting = _lasting(history.seen, 1, elongation, s.session_change, lambda v, lim=limit: v > lim)
                if lasting is not None:
                    sess = _changed(lasting, _MAD_FLOOR_ELONGATION)
                    limit = sess.median + max(s.elongation_excess, k * sess.mad)
            if elongation > limit:
                return Verdict(False, f"trailing: elongation {elongation:.2f} {sess.describe(elongation, '.2f')}",
                               "trailing")
    if s.max_eccentricity and eccentricity is not None and eccentricity > s.max_eccentricity:
        return Verdict(
            False, f"trailing: eccentricity {eccentricity:.2f} > {s.max_eccentricity:.2f}", "trailing"
        )
    if fwhm_px is not None:
        if s.max_fwhm_px and fwhm_px > s.max_fwhm_px:
            return Verdict(False, f"FWHM {fwhm_px:.2f} px > limit {s.max_fwhm_px:.2f} px", "fwhm")
        if s.fwhm_factor:
            sess = _session(history.fwhm_px, history.seen, 0, s.session_warmup, 0.0)
            if sess is not None:
                sess, limit = _fwhm_limit(sess, s)
                if fwhm_px > limit:
                    lasting = _lasting(history.seen, 0, fwhm_px, s.session_change, lambda v, lim=limit: v > lim)
                    if lasting is not None:
                        sess, limit = _fwhm_limit(_changed(lasting, 0.0), s)
                if fwhm_px > limit:
                    return Verdict(
                        False,
                        f"FWHM {fwhm_px:.2f} px > {s.fwhm_factor:g}x session median {sess.median:.2f} px"
                        + (f" ({(fwhm_px - sess.median) / sess.mad:+.1f} MAD)" if sess.mad else ""),
                        "fwhm",
                    )
    if not registration_ok:
        return Verdict(False, f"registration failed: {registration_reason or 'no match'}", "registration")
    return Verdict(True)


def _fwhm_limit(sess: _Session, s: QualitySettings) -> tuple[_Session, float]:
    """The FWHM session with its MAD floored, and the FWHM beyond which a frame is blurred."""
    mad = max(sess.mad, _MAD_FLOOR_FWHM * sess.median) if sess.mad is not None else None
    limit = max(s.fwhm_factor * sess.median, sess.median + s.session_kappa * mad if mad else 0.0)
    return _Session(sess.median, mad, sess.n), limit


def _background_limit(recent: float, spread: float, ref_noise: float | None, s: QualitySettings) -> float:
    """How far (ADU) the sky may move from `recent`, whose frames spread by `spread` (MAD)."""
    return max(s.background_jump * abs(recent), s.background_jump_noise * (ref_noise or 0.0), s.session_kappa * spread)
