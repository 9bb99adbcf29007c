"""Frame quality gate: decide, before stacking, whether a frame is worth its weight.

Each rejection carries a human-readable reason naming the measured value and the limit,
because the observer at the telescope needs to know *why* (cloud? wind? focus?) to act.
The gate is pure: it sees the frame's metrics, the reference's and the session history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the gate; each can be switched off with 0.

    min_star_fraction: fewer detected stars than this fraction of the reference's means
        cloud or haze (fraction).
    min_stars: absolute minimum of detected stars to register at all (count).
    max_fwhm_px: hard FWHM limit (px); 0 = off.
    fwhm_factor: reject when FWHM exceeds this factor times the session median (ratio).
    max_eccentricity: median star eccentricity above this means trailing or wind (0..1).
    background_jump: reject when the sky background moves by more than this fraction of the
        recent background level (fraction) ...
    background_jump_noise: ... and by more than this many times the reference noise (sigma),
        so that a near-zero calibrated background does not make every frame a jump.
    history: number of recent accepted frames forming the session median / recent background.
    """

    min_star_fraction: float = 0.5
    min_stars: int = 8
    max_fwhm_px: float = 0.0
    fwhm_factor: float = 1.5
    max_eccentricity: float = 0.6
    background_jump: float = 0.5
    background_jump_noise: float = 10.0
    history: int = 10


@dataclass
class Verdict:
    accepted: bool
    reason: str | None = None
    #: The check that failed: "registration", "clouds", "fwhm", "trailing", "background", or None.
    check: str | None = None


@dataclass
class QualityHistory:
    """Metrics of recently accepted frames (for session medians); JSON-able."""

    fwhm_px: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def accept(self, fwhm_px: float | None, background: float | None, keep: int) -> None:
        if fwhm_px is not None and fwhm_px > 0:
            self.fwhm_px = (self.fwhm_px + [float(fwhm_px)])[-keep:]
        if background is not None:
            self.background = (self.background + [float(background)])[-keep:]


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
) -> Verdict:
    """Judge one frame. Checks run from the most to the least specific cause: a cloudy frame
    also fails registration and has odd FWHM, but "clouds" is what the observer needs."""
    s = settings
    if s.min_star_fraction and ref_stars > 0 and n_stars < s.min_star_fraction * ref_stars:
        return Verdict(False, f"clouds: {n_stars} of {ref_stars} reference stars", "clouds")
    if s.min_stars and n_stars < s.min_stars:
        return Verdict(False, f"clouds: only {n_stars} stars (minimum {s.min_stars})", "clouds")
    if background is not None and history.background and s.background_jump:
        recent = median(history.background)
        jump = background - recent
        limit = max(s.background_jump * abs(recent), s.background_jump_noise * (ref_noise or 0.0))
        if abs(jump) > limit:
            return Verdict(
                False,
                f"background jump: {background:.1f} ADU vs recent {recent:.1f} ADU "
                f"({jump:+.1f}, limit {limit:.1f})",
                "background",
            )
    if s.max_eccentricity and eccentricity is not None and eccentricity > s.max_eccentricity:
        return Verdict(
            False, f"trailing: eccentricity {eccentricity:.2f} > {s.max_eccentricity:.2f}", "trailing"
        )
    if fwhm_px is not None:
        if s.max_fwhm_px and fwhm_px > s.max_fwhm_px:
            return Verdict(False, f"FWHM {fwhm_px:.2f} px > limit {s.max_fwhm_px:.2f} px", "fwhm")
        if s.fwhm_factor and history.fwhm_px:
            med = median(history.fwhm_px)
            if fwhm_px > s.fwhm_factor * med:
                return Verdict(
                    False,
                    f"FWHM {fwhm_px:.2f} px > {s.fwhm_factor:g}x session median {med:.2f} px",
                    "fwhm",
                )
    if not registration_ok:
        return Verdict(False, f"registration failed: {registration_reason or 'no match'}", "registration")
    return Verdict(True)
