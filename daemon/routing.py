"""Which stack a frame goes to: one per (target, filter, exposure, binning).

Frames of another target, filter, exposure or binning never mix: each combination is a stack
of its own, named so that it can be a file name ('M27_L_300s_bin1'). A frame whose header
lacks a value goes where frames without that value go ('unknown', 'none', 0 s, bin 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.names import safe_filename
from daemon.pipeline.frame import FrameMeta


@dataclass(frozen=True)
class StackKey:
    """What a stack holds: target name, filter name, exposure (s) and binning of its frames."""

    target: str
    filter: str
    exposure_s: float
    binning: int

    @property
    def name(self) -> str:
        """File-system safe stack name: 'M27_L_300s_bin1' ('M27_L_exp-unknown_bin1' for frames
        that do not say their exposure)."""
        exposure = f"{self.exposure_s:g}s" if self.exposure_s > 0 else "exp-unknown"
        return safe_filename(f"{self.target}_{self.filter}_{exposure}_bin{self.binning}")

    @classmethod
    def of(cls, meta: FrameMeta) -> StackKey:
        """The key of a frame from its metadata."""
        binning = meta.binning[0] if isinstance(meta.binning, (tuple, list)) else int(meta.binning or 1)
        return cls(meta.target or "unknown", meta.filter or "none", float(meta.exposure_s or 0.0), int(binning))
