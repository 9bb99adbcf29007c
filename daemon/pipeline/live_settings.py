"""Settings of the live pipeline ([stack] and [quality]), a plain dataclass that checks itself.

A module of its own so that what reads them (the config check at start, `lightbucket stack
--set`, the benchmark) need not import the pipeline's kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from daemon.pipeline.quality import QualitySettings
from daemon.pipeline.stack import StackSettings
from daemon.pipeline.warp import INTERPOLATIONS

WEIGHTINGS = ("noise", "snr", "equal")
#: "auto" (the default): full resolution where the machine's memory allows, else superpixel
#: (`daemon.pipeline.resolution`); "bilinear": full resolution always, fused
#: (`daemon.pipeline.fused`); "drizzle": the live stack as "bilinear", the final re-stack by
#: Bayer drizzle; "superpixel": half resolution, a quarter of the pixels (for machines short
#: of memory).
DEBAYER_METHODS = ("bilinear", "auto", "drizzle", "superpixel")


@dataclass(frozen=True)
class LiveSettings:
    """Settings of the live pipeline, built from the config sections [stack] and [quality].

    Stack: kappa (sigma), warmup (frames), warmup_kappa (sigma), sigma_floor (fraction of the
    plane's noise), reject (bool), weighting ("noise": 1/noise^2, "snr": star SNR^2,
    "equal"), debayer ("auto": full resolution where the machine's memory allows, else
    superpixel, saying why; "bilinear": full resolution always; "drizzle": full
    resolution, and the final re-stack drops each CFA sample onto the output grid instead of
    interpolating: sharper stars, more noise per pixel, see `daemon.pipeline.drizzle`;
    "superpixel": half resolution and 4x lighter), drizzle_pixfrac (drop size of the
    drizzle, fraction of a pixel, 0.1..1), fused (colour at full resolution band by band,
    `daemon.pipeline.fused`; False: whole-frame debayer, warp and stack, the reference the
    fused path is tested against), interpolation of the warp ("bicubic": stacked stars as
    sharp as a single frame's; "bilinear" is 2x faster but widens 3-px stars by ~5 %),
    normalize_background (bring each frame's sky to the reference level),
    registration_model ("similarity", "affine", ...), reference_frames (the registration
    reference is the best of the first this many accepted frames: most stars, smallest
    FWHM; 1 = the first frame).
    Quality: see daemon.pipeline.quality.QualitySettings for the meaning of each field.
    """

    # [stack]
    kappa: float = 3.0
    warmup: int = 5
    warmup_kappa: float = 3.0
    sigma_floor: float = 1.0
    reject: bool = True
    weighting: str = "noise"
    debayer: str = "auto"
    drizzle_pixfrac: float = 0.7
    fused: bool = True
    interpolation: str = "bicubic"
    normalize_background: bool = True
    registration_model: str = "similarity"
    reference_frames: int = 3
    # [quality]: the fields of QualitySettings, with its defaults (one source for them)
    min_star_fraction: float = QualitySettings.min_star_fraction
    min_stars: int = QualitySettings.min_stars
    max_fwhm_px: float = QualitySettings.max_fwhm_px
    fwhm_factor: float = QualitySettings.fwhm_factor
    max_eccentricity: float = QualitySettings.max_eccentricity
    elongation_excess: float = QualitySettings.elongation_excess
    background_jump: float = QualitySettings.background_jump
    background_jump_noise: float = QualitySettings.background_jump_noise
    session_kappa: float = QualitySettings.session_kappa
    session_warmup: int = QualitySettings.session_warmup
    history: int = QualitySettings.history
    session_change: int = QualitySettings.session_change

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"stack.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.debayer not in DEBAYER_METHODS:
            raise ValueError(f"stack.debayer must be one of {DEBAYER_METHODS}, got {self.debayer!r}")
        if not 0.1 <= self.drizzle_pixfrac <= 1.0:
            raise ValueError(f"stack.drizzle_pixfrac must be within 0.1..1, got {self.drizzle_pixfrac}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"stack.interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.reject and self.warmup < 4:
            raise ValueError(f"stack.warmup must be >= 4, got {self.warmup}")
        if self.kappa <= 0 or self.warmup_kappa <= 0:
            raise ValueError("stack.kappa and stack.warmup_kappa must be > 0")
        if self.reference_frames < 1:
            raise ValueError(f"stack.reference_frames must be >= 1, got {self.reference_frames}")
        if not 0 <= self.session_change <= self.history:
            raise ValueError(f"quality.session_change must be within 0..quality.history ({self.history}), "
                             f"got {self.session_change}")

    @property
    def stack_settings(self) -> StackSettings:
        return StackSettings(self.kappa, self.warmup, self.warmup_kappa, self.sigma_floor, self.reject)

    @property
    def holds_frames(self) -> bool:
        """Whether a frame's pixels live through its whole processing (mono; colour at full
        resolution on the fused path), rather than a colour mosaic being freed once debayered
        (superpixel, or fused off): then the frame loader may keep them for the next frame
        (`daemon.io.load.FrameLoader`, keep_large) without raising the session's peak. "auto"
        counts as full resolution (`LivePipeline.holds_frames` knows what a stack became)."""
        return self.fused and self.debayer != "superpixel"

    @property
    def quality_settings(self) -> QualitySettings:
        names = {f.name for f in dataclasses.fields(QualitySettings)}
        return QualitySettings(**{n: getattr(self, n) for n in names})

    @classmethod
    def from_config(cls, stack: dict | None = None, quality: dict | None = None) -> LiveSettings:
        """Build from the [stack] and [quality] config tables; unknown keys are an error
        naming the key."""
        qual_names = {f.name for f in dataclasses.fields(QualitySettings)}
        stack_names = {f.name for f in dataclasses.fields(cls)} - qual_names
        kwargs: dict[str, Any] = {}
        for section, table, allowed in (("stack", stack or {}, stack_names), ("quality", quality or {}, qual_names)):
            for key, value in table.items():
                if key not in allowed:
                    raise ValueError(f"unknown config key {section}.{key} (known: {', '.join(sorted(allowed))})")
                kwargs[key] = value
        return cls(**kwargs)
