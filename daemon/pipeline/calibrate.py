"""Calibration of a light frame with master bias, dark, flat and a defect map (pure).

    calibrated = (light - bias - dark * t_light / t_dark) / flat, defects repaired

Conventions that make this one line correct:
- `Masters.dark` is *dark current only* (bias already removed) whenever `Masters.bias` is
  set, so it scales linearly with exposure; without a bias it is bias + dark current and
  is subtracted unscaled (scaling would scale the bias too).
- `Masters.flat` is bias/dark-flat subtracted and normalised to a median of 1 *per CFA
  position* (`normalise_flat`), so dividing by it removes vignetting and dust without
  changing colour balance; non-positive or non-finite flat pixels are set to 1 and marked
  as defects instead of dividing by them.
- Everything is a CFA mosaic (or mono) in the same top-down orientation as the lights.

`daemon.masters` builds and loads these arrays from files; nothing here touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from daemon.pipeline.cfa import cfa_planes
from daemon.pipeline.defects import DefectRepair
from daemon.pipeline.frame import FrameMeta

#: Normalised flat values below this are not a real response (dead pixel, dust speck core).
FLAT_FLOOR = 0.05
#: Temperature difference (deg C) between a light and its dark worth a warning.
TEMP_TOLERANCE_C = 2.0


@dataclass
class Masters:
    """Calibration masters, all float32 arrays of the lights' shape (ADU; flat relative).

    Treat the arrays as read-only once the masters are in use: `calibrate` caches the defect
    repair plan built from `defects` (rebuilt only if `defects` is replaced by another array).
    `compact()` (what the live pipeline does) folds them into a smaller form and releases
    the arrays; `shape`, `summary`, `dark_scale`, `mismatch_warnings` and `calibrate` keep
    working on compacted masters.
    """

    bias: np.ndarray | None = None
    dark: np.ndarray | None = None
    dark_exposure_s: float | None = None
    flat: np.ndarray | None = None
    defects: np.ndarray | None = None  # bool, True = bad pixel to repair
    bayer: str | None = None
    #: Metadata of each master file by kind ("bias", "dark", "flat"), for mismatch warnings.
    sources: dict[str, FrameMeta] = field(default_factory=dict)
    #: Problems found loading the masters, one readable line each (e.g. a defect map not applied).
    warnings: list[str] = field(default_factory=list)
    #: (defects array it was built from, its DefectRepair): built on first use.
    _repair: tuple | None = field(default=None, repr=False, compare=False)
    #: The masters in the compact form calibration uses, set by `compact()` (None before).
    compacted: CompactMasters | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int] | None:
        if self.compacted is not None:
            return self.compacted.shape
        for arr in (self.bias, self.dark, self.flat, self.defects):
            if arr is not None:
                return tuple(arr.shape)  # type: ignore[return-value]
        return None

    def has(self, kind: str) -> bool:
        """Whether a master of `kind` ("bias", "dark", "flat", "defects") is in use."""
        if self.compacted is not None:
            return kind in self.compacted.kinds
        return getattr(self, kind) is not None

    def summary(self) -> str:
        parts = [name for name in ("bias", "dark", "flat") if self.has(name)]
        if self.has("defects"):
            n = self.compacted.repair.n_defects if self.compacted is not None else int(self.defects.sum())
            parts.append(f"{n} defects")
        return ", ".join(parts) or "none"

    def compact(self) -> None:
        """Fold the masters into what calibrating many lights needs, and free the rest
        (26 Mpx: 338 MB -> 157 MB). Idempotent.

        - bias + dark current (a scalable dark) -> one pedestal `bias + dark` for lights of
          the dark's exposure, plus the dark current as float16 for the `(t_light / t_dark -
          1) * dark` of other exposures. float16 keeps 11 significant bits: a rounding error
          <= 2^-11 (0.05 %) of the dark current (0.02 ADU on 40 ADU), far under a master
          dark's own noise (read noise / sqrt(n frames)). Dark current beyond float16's range
          (> 65504 ADU) is a saturated hot pixel: clipped. The pedestal is kept as its median
          (a float) plus each pixel's difference from it in float16: an error <= 2^-11 of that
          difference, which is the bias pattern and the dark current (0.005 ADU on a bias
          pattern of +-10 ADU, 0.02 ADU on 40 ADU of dark current), clipped likewise.
        - the flat -> 16-bit fixed point, `flat = q * step` with `step = max(flat) / 65535`,
          when its largest value is <= `FLAT16_MAX` (every real flat: normalised to 1 per CFA
          position, vignetting and dust take it down, not up). The rounding error is <=
          step / 2 <= 3.1e-5 of the median response, 1/30 of the shot noise of a 30-frame
          master flat at half well (~1e-3 per pixel): it adds < 0.1 % to the noise the flat
          puts into each light. A flat with larger values stays float32.
        - the defect map -> its repair plan (`DefectRepair`), the boolean map freed.
        """
        if self.compacted is not None:
            return
        shape = self.shape
        kinds = tuple(k for k in ("bias", "dark", "flat", "defects") if getattr(self, k) is not None)
        scalable = self.bias is not None and self.dark is not None and bool(self.dark_exposure_s)
        dark16 = None
        parts = [a for a in (self.bias, self.dark) if a is not None]
        pedestal16, pedestal_base = _pedestal_half(parts) if parts else (None, 0.0)
        if scalable:
            dark16 = np.clip(self.dark, -65504.0, 65504.0).astype(np.float16)
        flat = None if self.flat is None else np.ascontiguousarray(self.flat, dtype=np.float32)
        flat16, flat_step = _flat_fixed_point(flat) if flat is not None else (None, 0.0)
        if flat16 is not None:
            flat = None
        self.compacted = CompactMasters(shape=shape, kinds=kinds, scalable=scalable, pedestal16=pedestal16,
                                        pedestal_base=pedestal_base, dark16=dark16, flat=flat, flat16=flat16,
                                        flat_step=flat_step, repair=self.defect_repair())
        self.bias = self.dark = self.flat = self.defects = None
        self._repair = None

    def defect_repair(self) -> DefectRepair | None:
        """The repair plan of `defects` (built once, ~35 ms at 26 MP), None without a map."""
        if self.compacted is not None:
            return self.compacted.repair
        if self.defects is None:
            return None
        if self._repair is None or self._repair[0] is not self.defects:
            self._repair = (self.defects, DefectRepair(self.defects, self.bayer))
        return self._repair[1]


@dataclass
class CompactMasters:
    """Masters as `Masters.compact` folds them (see there). Arrays of the lights' shape."""

    shape: tuple[int, int] | None
    kinds: tuple[str, ...]
    scalable: bool
    pedestal16: np.ndarray | None  # float16 ADU: bias + dark current at dark_exposure_s (or one of
    pedestal_base: float  # them), minus pedestal_base (ADU, its median)
    dark16: np.ndarray | None  # float16 ADU: dark current at dark_exposure_s (scalable darks only)
    flat: np.ndarray | None  # float32, relative (a flat that does not fit flat16)
    flat16: np.ndarray | None  # uint16: the flat is flat16 * flat_step
    flat_step: float
    repair: DefectRepair | None


#: Largest flat value stored as 16-bit fixed point by `Masters.compact` (relative response).
FLAT16_MAX = 4.0
#: Rows of a master encoded at a time by `Masters.compact` (no full-size float temporary).
_BAND_ROWS = 64


def _pedestal_half(parts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """(float16 of sum(parts) - base, base): the pedestal (the sum of the bias and dark
    masters given, ADU) as its median over a sparse grid plus each pixel's difference from it
    (see `Masters.compact`), clipped to float16's range."""
    h, w = parts[0].shape
    step = max(1, int(np.sqrt(h * w / 40000)))
    grid = sum(np.asarray(a[::step, ::step], np.float32) for a in parts)
    finite = grid[np.isfinite(grid)]
    base = np.float32(np.median(finite)) if finite.size else np.float32(0.0)
    out = np.empty((h, w), np.float16)
    for r0 in range(0, h, _BAND_ROWS):
        band = sum(np.asarray(a[r0:r0 + _BAND_ROWS], np.float32) for a in parts) - base
        out[r0:r0 + _BAND_ROWS] = np.clip(band, -65504.0, 65504.0)
    return out, float(base)


def _flat_fixed_point(flat: np.ndarray) -> tuple[np.ndarray | None, float]:
    """(uint16 q, step) with flat ~= q * step, or (None, 0) when the flat does not fit (values
    above FLAT16_MAX, non-finite). Values <= 0 become 0, which `calibrate` skips as before.
    Encoded in ~4 MB row bands: no full-size float temporary."""
    top = float(np.max(flat)) if flat.size else 0.0
    if not (0.0 < top <= FLAT16_MAX) or not np.isfinite(np.min(flat)):
        return None, 0.0
    step = np.float32(top / 65535.0)
    out = np.empty(flat.shape, np.uint16)
    rows = max(1, (4 << 20) // (4 * flat.shape[-1]))
    for r0 in range(0, flat.shape[0], rows):
        band = flat[r0:r0 + rows] / step
        np.clip(np.rint(band, out=band), 0, 65535, out=band)
        out[r0:r0 + rows] = band
    return out, float(step)


def dark_scale(exposure_s: float | None, masters: Masters) -> float:
    """Factor applied to the master dark for a light of `exposure_s` seconds."""
    if not masters.has("bias") or not exposure_s or not masters.dark_exposure_s:
        return 1.0
    return float(exposure_s) / float(masters.dark_exposure_s)


_NONE2D = np.zeros((1, 1), np.float32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _calibrate_rows(src, out, bias, dark, scale, flat, has_bias, has_dark, has_flat):  # pragma: no cover - numba
    """out = ((src - bias) - dark * scale) / flat (where flat > 0), one pass, parallel over
    rows; the same float32 operations in the same order as the numpy expression, so the
    result is bit-identical to it. `out` may be `src` (in place)."""
    h, w = src.shape
    for i in numba.prange(h):
        for j in range(w):
            v = src[i, j]
            if has_bias:
                v = v - bias[i, j]
            if has_dark:
                v = v - dark[i, j] * scale
            if has_flat:
                f = flat[i, j]
                if f > 0:
                    v = v / f
            out[i, j] = v


#: float16 bits -> float32, for reading the compact dark in the numba kernel (256 kB).
with np.errstate(invalid="ignore"):
    _HALF_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
_NONE2D_U16 = np.zeros((1, 1), np.uint16)


def _bits(half: np.ndarray | None) -> np.ndarray:
    """A float16 master as the uint16 bits the kernel decodes (a placeholder for none)."""
    return _NONE2D_U16 if half is None else half.view(np.uint16)


@numba.njit(parallel=True, cache=True, nogil=True)
def _calibrate_compact(src, out, pedestal16, base, has_pedestal, dark16, extra, has_extra, flat, has_flat,
                       flat16, flat_step, has_flat16, table):  # pragma: no cover - numba
    """out = (src - (base + pedestal16) - dark16 * extra) / flat (where flat > 0), one pass,
    parallel over rows; pedestal16 and dark16 are float16 bits decoded through `table`, the
    flat is float32 `flat` or fixed-point `flat16 * flat_step`. `out` may be `src`."""
    h, w = src.shape
    for i in numba.prange(h):
        for j in range(w):
            v = src[i, j]
            if has_pedestal:
                v = v - (base + table[pedestal16[i, j]])
            if has_extra:
                v = v - table[dark16[i, j]] * extra
            if has_flat:
                f = flat[i, j]
                if f > 0:
                    v = v / f
            elif has_flat16:
                q = flat16[i, j]
                if q > 0:
                    v = v / (np.float32(q) * flat_step)
            out[i, j] = v


def calibrate(data: np.ndarray, exposure_s: float | None, masters: Masters | None, *,
              in_place: bool = False) -> np.ndarray:
    """Calibrated light (float32 ADU): a new array, or `data` itself with `in_place=True`
    (only when `data` is a writeable C-contiguous float32 array; otherwise a new array
    anyway: check `result is data`). Raises ValueError on a size mismatch.

    One fused pass (bias, scaled dark, flat) with no full-size temporaries, then the defect
    repair on the defects only (its plan is cached on `masters`).
    """
    src = np.asarray(data)
    can = (in_place and src.dtype == np.float32 and src.ndim == 2 and src.flags.c_contiguous
           and src.flags.writeable)
    if masters is None:
        return src if can else np.array(src, dtype=np.float32, copy=True)
    compact = masters.compacted
    if compact is not None and compact.shape is not None and compact.shape != src.shape:
        raise ValueError(
            f"masters are {compact.shape[1]}x{compact.shape[0]} px but the light is "
            f"{src.shape[1]}x{src.shape[0]} px (different camera, binning or ROI)")
    for name in ("bias", "dark", "flat", "defects"):
        arr = getattr(masters, name)
        if arr is not None and arr.shape != src.shape:
            raise ValueError(
                f"master {name} is {arr.shape[1]}x{arr.shape[0]} px but the light is "
                f"{src.shape[1]}x{src.shape[0]} px (different camera, binning or ROI)")
    if src.ndim != 2:
        raise ValueError(f"calibrate needs a 2-D frame, got shape {src.shape}")
    out = src if can else np.empty(src.shape, dtype=np.float32)
    src32 = src if src.dtype == np.float32 else src.astype(np.float32)

    def arg(a: np.ndarray | None) -> np.ndarray:
        return _NONE2D if a is None else np.ascontiguousarray(a, dtype=np.float32)

    if compact is not None:
        extra = np.float32(dark_scale(exposure_s, masters) - 1.0) if compact.scalable else np.float32(0.0)
        _calibrate_compact(src32, out, _bits(compact.pedestal16), np.float32(compact.pedestal_base),
                           compact.pedestal16 is not None, _bits(compact.dark16),
                           extra, compact.dark16 is not None and extra != 0, arg(compact.flat),
                           compact.flat is not None,
                           _NONE2D_U16 if compact.flat16 is None else compact.flat16,
                           np.float32(compact.flat_step), compact.flat16 is not None, _HALF_TO_F32)
    else:
        _calibrate_rows(src32, out, arg(masters.bias), arg(masters.dark),
                        np.float32(dark_scale(exposure_s, masters)), arg(masters.flat),
                        masters.bias is not None, masters.dark is not None, masters.flat is not None)
    repair = masters.defect_repair()
    if repair is not None:
        repair.apply(out)
    return out


def normalise_flat(flat: np.ndarray, bayer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(flat / median per CFA position, guarded) and the mask of pixels it had to guard.

    The flat must already have its bias or dark-flat removed. Guarded pixels (below
    FLAT_FLOOR of the median, non-finite) become 1.0 so division leaves them unchanged;
    the mask lets the caller repair them as defects.
    """
    out = np.array(flat, dtype=np.float32, copy=True)
    for sl in cfa_planes(out.shape, bayer):
        plane = out[sl]
        finite = plane[np.isfinite(plane)]
        level = float(np.median(finite)) if finite.size else 0.0
        if level <= 0:
            raise ValueError(f"flat has no signal (median {level:.1f} ADU after bias/dark-flat "
                             "subtraction): wrong files or an over-subtracted dark flat")
        plane /= np.float32(level)
    bad = ~np.isfinite(out) | (out < FLAT_FLOOR)
    out[bad] = 1.0
    return out, bad


def mismatch_warnings(light: FrameMeta, masters: Masters) -> list[str]:
    """Human sentences on what differs between a light and the masters calibrating it."""
    notes: list[str] = []
    if masters.bayer != light.bayer:
        notes.append(f"Bayer pattern of the light is {light.bayer or 'mono'} but the masters' is "
                     f"{masters.bayer or 'mono'} (row order or camera differs)")
    for kind in ("bias", "dark", "flat"):
        src = masters.sources.get(kind)
        if src is None:
            continue
        if src.binning != light.binning:
            notes.append(f"{kind} binning {src.binning[0]}x{src.binning[1]} differs from the light's "
                         f"{light.binning[0]}x{light.binning[1]}")
        if kind == "flat":
            if src.filter and light.filter and src.filter != light.filter:
                notes.append(f"flat was taken through filter {src.filter!r}, the light through {light.filter!r}")
            continue
        if src.gain is not None and light.gain is not None and src.gain != light.gain:
            notes.append(f"{kind} gain {src.gain:g} differs from the light's {light.gain:g}")
        if src.offset is not None and light.offset is not None and src.offset != light.offset:
            notes.append(f"{kind} offset {src.offset:g} differs from the light's {light.offset:g}")
        if kind == "dark" and src.sensor_temp_c is not None and light.sensor_temp_c is not None:
            if abs(src.sensor_temp_c - light.sensor_temp_c) > TEMP_TOLERANCE_C:
                notes.append(f"dark at {src.sensor_temp_c:.1f} C, light at {light.sensor_temp_c:.1f} C: "
                             "dark current differs")
    if masters.has("dark") and not masters.has("bias") and masters.dark_exposure_s and light.exposure_s \
            and abs(masters.dark_exposure_s - light.exposure_s) > 1e-3 * light.exposure_s:
        notes.append(f"dark of {masters.dark_exposure_s:g} s used unscaled for a {light.exposure_s:g} s light: "
                     "give a bias so the dark can be scaled")
    return notes
