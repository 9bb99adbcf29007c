"""The live pipeline: one frame in, one stacked (or rejected, with a reason) frame out.

calibrate -> measure stars -> register against the cached reference -> quality gate ->
debayer -> warp into the reference -> normalise the sky background -> running stack.

Pure (no I/O, no asyncio): the service calls `process` in a worker thread and persists
`state()`; the CLI calls exactly the same code. Everything is float32.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from daemon.pipeline.align import describe, register
from daemon.pipeline.calibrate import Masters, calibrate
from daemon.pipeline.debayer import debayer
from daemon.pipeline.frame import Frame, FrameMeta
from daemon.pipeline.fused import RegisteredMosaic, is_affine, is_identity, mosaic_sky, stack_mosaic
from daemon.pipeline.geometry import SUPERPIXEL, StackGeometry
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.quality import QualityHistory, assess
from daemon.pipeline.reference import REFERENCE_MARGIN, GridFrame, Reference, grid_frame, reference_score
from daemon.pipeline.resolution import stack_memory_note
from daemon.pipeline.stack import RunningStack
from daemon.pipeline.stars import Stars, measure
from daemon.pipeline.warp import warp


@dataclass
class FrameResult:
    path: str | None
    accepted: bool
    reason: str | None  # why rejected ("clouds: 12 of 140 reference stars", ...)
    stars: int
    fwhm_px: float | None
    eccentricity: float | None
    background: float | None  # ADU
    dx: float | None
    dy: float | None
    rotation_deg: float | None
    weight: float
    processing_ms: float
    registered: np.ndarray | None = None  # aligned frame for the spool, None when rejected
    #: Samples rejected by the running stack from this frame (pixels).
    rejected_pixels: int = 0


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


class LivePipeline:
    """Stateful live stacker. Not re-entrant: one `process` at a time (the service runs
    them in one worker thread); `stack_image` may be called from another thread."""

    def __init__(self, settings: LiveSettings | None = None, masters: Masters | None = None, *,
                 memory_bytes: int | None = None):
        """`masters` are compacted (`Masters.compact`: bias, dark and flat folded into 6 bytes
        a pixel, the arrays released); they can still be shared with other pipelines and `calibrate`.
        `memory_bytes`: the memory the process may use (`daemon.io.limits.process_memory_bytes`),
        for debayer "auto" (`memory_note`); None: unknown, full resolution."""
        self.settings = settings or LiveSettings()
        self.memory_bytes = memory_bytes
        self.masters = masters
        if masters is not None:
            masters.compact()
        self._lock = threading.Lock()
        self.reset()

    # ------------------------------------------------------------------ contract
    def reset(self) -> None:
        """Forget the stack and the reference (a new target or a new session)."""
        with getattr(self, "_lock", threading.Lock()):
            self._ref: Reference | None = None
            self._stack: RunningStack | None = None
            self._prepared: RunningStack | None = None  # see `prepare`
            self._history = QualityHistory()
            self._provenance: list[dict] = []
            self.n_stacked = 0
            self.total_exposure_s = 0.0
            self.n_rejected = 0

    def stack_shape(self, frame_shape: tuple[int, int], bayer: str | None) -> tuple[int, ...]:
        """The shape of the stack that frames of `frame_shape` (H, W: the mosaic's for colour)
        and CFA pattern `bayer` (None: mono) go to."""
        h, w = (int(n) for n in frame_shape)
        if not bayer:
            return (h, w)
        if self.debayer_method((h, w)) == "superpixel":
            return (h // 2, w // 2, 3)
        return (h, w, 3)

    def prepare(self, frame_shape: tuple[int, int], bayer: str | None) -> RunningStack | None:
        """Make the running stack for frames of this shape and CFA pattern (see `stack_shape`)
        before the first of them arrives, with its memory written once (`RunningStack(prefault=True)`).

        Why: a new stack's statistics are hundreds of MB (26 Mpx colour: ~1 GB), and the first
        frame otherwise touches them first, paying for every page. The service calls this
        while the camera takes a plan's first exposure. The first frame takes the stack
        when its own shape matches, else it is freed then (`reset` frees it too). Returns
        the stack made; None (and nothing made) when this pipeline has a stack already."""
        if self._stack is not None:
            return None
        self._prepared = None  # the previous one freed first: never two
        shape = self.stack_shape(frame_shape, bayer)
        self._prepared = RunningStack(shape, self.settings.stack_settings, prefault=True)
        return self._prepared

    def set_reference(self, frame: Frame) -> None:
        """Make `frame` the registration reference. The stack is emptied (its coordinates
        change); the reference is not stacked by this call - `process` it to stack it."""
        data = self._calibrate(frame)
        stars, metrics = self._measure(data, frame)
        self.reset()
        self._ref = self._make_reference(frame, stars, metrics)
        self._ref.candidates_left = 0  # the observer's choice holds

    def measure_frame(self, frame: Frame):
        """Calibrate (in place, once, as `process` does) and measure `frame`: its
        `FrameMetrics` (stars, FWHM, elongation, background, noise). Nothing is stacked."""
        return self._measure(self._calibrate(frame), frame)[1]

    def process(self, frame: Frame, *, consume: bool = False) -> FrameResult:
        """Calibrate, measure, judge, register and stack one frame.

        `consume=True`: the caller hands over the pixels and will not read `frame.data` again
        (the service, the bench). A colour mosaic is then dropped (`frame.data = None`) as
        soon as it is debayered, before the warp allocates its output (one mosaic less at the
        peak). A mono frame's pixels are the warp's input, freed when the caller drops it."""
        t0 = time.perf_counter()
        s = self.settings
        path = frame.meta.path
        data = self._calibrate(frame)
        stars, metrics = self._measure(data, frame)
        n_stars = int(metrics.n_stars)
        fwhm, ecc, bkg = _num(metrics.fwhm_px), _num(metrics.eccentricity), _num(metrics.background)
        elong = _num(metrics.elongation)

        def result(accepted: bool, reason: str | None, **kw) -> FrameResult:
            if not accepted:
                self.n_rejected += 1
            return FrameResult(
                path=path, accepted=accepted, reason=reason, stars=n_stars, fwhm_px=fwhm,
                eccentricity=ecc, background=bkg, processing_ms=(time.perf_counter() - t0) * 1e3,
                **{"dx": None, "dy": None, "rotation_deg": None, "weight": 0.0, **kw},
            )

        just_set = self._ref is None
        if just_set:
            if n_stars < max(s.min_stars, 1):
                return result(False, f"clouds: only {n_stars} stars, not enough for a reference "
                                     f"(minimum {s.min_stars})")
            self._ref = self._make_reference(frame, stars, metrics)
            self._ref.candidates_left = s.reference_frames - 1
        ref = self._ref
        if data.shape != ref.frame_shape or frame.meta.bayer != ref.bayer:
            return result(False, f"frame {data.shape[1]}x{data.shape[0]} {frame.meta.bayer or 'mono'} does not "
                                 f"match the reference {ref.frame_shape[1]}x{ref.frame_shape[0]} {ref.bayer or 'mono'}")

        if just_set:
            matrix, reg_ok, reg_reason, dx, dy, rot = ref.grid_from_ref, True, None, 0.0, 0.0, 0.0
        else:
            reg = register(stars, ref.stars, model=s.registration_model)
            matrix, reg_ok, reg_reason = reg.matrix, bool(reg.ok), reg.reason
            dx = dy = rot = None
            if reg.ok:
                # Frame -> reference -> the stack's grid; the shift reported is the grid's.
                matrix = ref.grid_from_ref @ np.asarray(reg.matrix, np.float64)
                d = describe(matrix, data.shape[:2])
                dx, dy, rot = d.dx, d.dy, d.rotation_deg

        verdict = assess(
            n_stars=n_stars, fwhm_px=fwhm, eccentricity=ecc, background=bkg,
            ref_stars=ref.n_stars, ref_noise=ref.noise, history=self._history,
            settings=s.quality_settings, registration_ok=reg_ok, registration_reason=reg_reason,
            elongation=elong,
        )
        self._history.observe(fwhm, elong, n_stars, s.history, background=bkg)
        if not verdict.accepted:
            return result(False, verdict.reason, dx=dx, dy=dy, rotation_deg=rot)

        weight = self._weight(metrics, stars)
        if ref.candidates_left > 0 and not just_set:
            ref.candidates_left -= 1
            if reference_score(n_stars, fwhm) > REFERENCE_MARGIN * reference_score(ref.n_stars, ref.fwhm_px):
                self._ref = ref = dataclasses.replace(
                    ref, path=path, stars=stars, n_stars=n_stars, fwhm_px=fwhm,
                    grid_from_ref=np.asarray(matrix, np.float64).copy())
        grid = np.asarray(matrix, np.float64).copy()  # frame -> stack grid, kept in the provenance
        method = self.debayer_method(data.shape) if frame.meta.bayer else None
        if method == "bilinear":
            # Full-resolution colour: the sky from the mosaic (fused or not, the same offsets).
            sky = mosaic_sky(data, frame.meta.bayer)
            stack = self._stack_for(data.shape + (3,), sky)
            offset = self._offset(sky)
            if s.fused and is_affine(matrix):
                mosaic = RegisteredMosaic(data, frame.meta.bayer, np.asarray(matrix, np.float64),
                                          tuple(float(v) for v in offset), s.interpolation,
                                          "drizzle" if s.debayer == "drizzle" else "bilinear", s.drizzle_pixfrac)
                if consume and data is frame.data:
                    frame.data = None  # the mosaic lives on in `mosaic` (for the spool) only
                del data
                with self._lock:
                    rejected = stack_mosaic(stack, mosaic.data, mosaic.bayer, mosaic.matrix, weight, offset,
                                            interpolation=s.interpolation)
                return self._stacked(stack, frame, weight, result, mosaic, rejected, grid, offset,
                                     dx=dx, dy=dy, rot=rot, n_stars=n_stars, fwhm=fwhm, bkg=bkg, elong=elong)
            img = debayer(data, frame.meta.bayer, method="bilinear")
            del data
            if consume:
                frame.data = None
            registered = self._warp(img, np.asarray(matrix, np.float64), True)
            del img
            self._add_offset(registered, offset)
            with self._lock:
                rejected = stack.add(registered, weight)
            return self._stacked(stack, frame, weight, result, registered, rejected, grid, offset,
                                 dx=dx, dy=dy, rot=rot, n_stars=n_stars, fwhm=fwhm, bkg=bkg, elong=elong)
        img, matrix = self._debayer(data, frame.meta.bayer, matrix)
        # The frame's own pixels are never modified past calibration, unless the caller gives
        # them up (`consume`) where they need no warp (the reference): they become the
        # registered frame, not a copy of it (new memory: 104 MB at 26 Mpx mono).
        owned = img is not frame.data or (consume and img.flags.writeable and is_identity(matrix))
        del data  # the calibrated mosaic: freed before the warp allocates its output ...
        if consume and owned:
            frame.data = None  # ... when nobody else holds it (or taken as the registered frame)
        registered = self._warp(img, matrix, owned)
        del img
        sky = self._sky(registered)
        stack = self._stack_for(registered.shape, sky)
        offset = self._offset(sky)
        self._add_offset(registered, offset)
        with self._lock:
            rejected = stack.add(registered, weight)
        return self._stacked(stack, frame, weight, result, registered, rejected, grid, offset,
                             dx=dx, dy=dy, rot=rot, n_stars=n_stars, fwhm=fwhm, bkg=bkg, elong=elong)

    def _stack_for(self, shape: tuple[int, ...], sky: list[float]) -> RunningStack:
        """The running stack (made for `shape` with the first frame, whose `sky` becomes the
        reference level)."""
        if self._stack is None:
            self._ref.sky = sky
            prepared, self._prepared = self._prepared, None
            if prepared is not None and prepared.shape == tuple(shape):
                return prepared
            del prepared  # a frame of another shape: freed before the stack it needs is made
            return RunningStack(shape, self.settings.stack_settings)
        return self._stack

    def _offset(self, sky: list[float]) -> np.ndarray:
        """Per-plane ADU bringing a frame's sky to the reference's (zeros when
        normalize_background is off)."""
        if not self.settings.normalize_background:
            return np.zeros(len(sky), np.float32)
        return np.asarray(self._ref.sky, np.float32) - np.asarray(sky, np.float32)

    @staticmethod
    def _add_offset(registered: np.ndarray, offset: np.ndarray) -> None:
        if not offset.any():
            return
        if registered.ndim == 2:
            registered += offset[0]
        elif registered.shape[2] <= 4 and registered.flags.c_contiguous:
            # Per-channel scalar add by OpenCV: numpy broadcasting a 3-vector over an
            # (H, W, 3) image runs 3-element inner loops (~4x slower). Same float32 sums.
            cv2.add(registered, tuple(float(v) for v in offset) + (0.0,) * (4 - offset.size), dst=registered)
        else:
            registered += offset

    def _stacked(self, stack: RunningStack, frame: Frame, weight: float, result, registered, rejected: int,
                 grid: np.ndarray, offset: np.ndarray, *, dx, dy, rot, n_stars, fwhm, bkg, elong) -> FrameResult:
        """Book a frame just added to `stack`: counts, exposure, provenance (with the frame's
        transform into the grid and its sky offset: `respool` makes its spool copy again from
        them), history."""
        path = frame.meta.path
        with self._lock:
            self._stack = stack
            self.n_stacked += 1
            exposure = float(frame.meta.exposure_s or 0.0)
            self.total_exposure_s += exposure
            self._provenance.append({
                "path": path, "weight": weight,
                "date_obs": frame.meta.date_obs.isoformat() if frame.meta.date_obs else None,
                "exposure_s": exposure, "dx": dx, "dy": dy, "rotation_deg": rot,
                "stars": n_stars, "fwhm_px": fwhm, "capture": capture_fields(frame.meta),
                "matrix": grid.tolist(), "offset": [float(v) for v in offset],
            })
        self._history.accept(fwhm, bkg, self.settings.history, elongation=elong, n_stars=n_stars)
        return result(True, None, dx=dx, dy=dy, rotation_deg=rot, weight=weight,
                      registered=registered, rejected_pixels=rejected)

    def respool(self, frame: Frame) -> tuple[np.ndarray | RegisteredMosaic, float]:
        """The spool's copy of a frame this stack already holds, made again from its file (a
        spool write that failed): calibrated and brought into the grid with the transform and
        sky offset recorded when it was stacked, exactly as `process` made it; nothing in the
        stack changes. Returns (registered frame or RegisteredMosaic, weight). KeyError when the
        stack holds no frame of that path or its record has no transform (stacked by an older
        version)."""
        record = next((p for p in self._provenance if p.get("path") == frame.meta.path and "matrix" in p), None)
        if record is None:
            raise KeyError(f"{frame.meta.path}: not a frame of this stack with a recorded transform")
        s = self.settings
        data = self._calibrate(frame)
        matrix = np.asarray(record["matrix"], np.float64)
        offset = np.asarray(record["offset"], np.float32)
        if (self.debayer_method(data.shape) if frame.meta.bayer else None) == "bilinear":
            if s.fused and is_affine(matrix):
                return RegisteredMosaic(data, frame.meta.bayer, matrix, tuple(float(v) for v in offset),
                                        s.interpolation, "drizzle" if s.debayer == "drizzle" else "bilinear",
                                        s.drizzle_pixfrac), float(record["weight"])
            img = debayer(data, frame.meta.bayer, method="bilinear")
        else:
            img, matrix = self._debayer(data, frame.meta.bayer, matrix)
        registered = self._warp(img, matrix, img is not frame.data)
        self._add_offset(registered, offset)
        return registered, float(record["weight"])

    def replay(self, frames: Iterable[tuple[np.ndarray | RegisteredMosaic, float]]) -> int:
        """Add frames again to a stack restored from an older snapshot (`daemon.checkpoint`):
        each a registered frame (float32 ADU, background-normalised, as it was stacked) or a
        `RegisteredMosaic`, with its weight, in stacking order. The counts, provenance and
        history are already the checkpoint's; only the stack's statistics catch up. Returns
        the frames added; ValueError when there is no stack to add to."""
        if self._stack is None:
            raise ValueError("replay: no stack was restored")
        n = 0
        for item, weight in frames:
            with self._lock:
                if isinstance(item, RegisteredMosaic):
                    stack_mosaic(self._stack, item.data, item.bayer, item.matrix, weight,
                                 np.asarray(item.offset, np.float32), interpolation=item.interpolation)
                else:
                    self._stack.add(np.ascontiguousarray(item, np.float32), weight)
            n += 1
        return n

    def stack_image(self) -> np.ndarray | None:
        """The current stack, (H, W) or (H, W, 3) float32, NaN where nothing is stacked yet.
        A read-only view (a copy would cost 300 MB on a 26 Mpx colour sensor), valid until the
        next `process`/`reset`: copy it to keep it across frames."""
        with self._lock:
            return None if self._stack is None else self._stack.image()

    def provenance(self) -> list[dict]:
        """Per stacked frame: path, weight, date_obs (ISO), exposure_s, dx, dy, rotation_deg,
        stars, fwhm_px."""
        with self._lock:
            return [dict(p) for p in self._provenance]

    @property
    def reference_path(self) -> str | None:
        return None if self._ref is None else self._ref.path

    @property
    def reference_wcs(self) -> dict | None:
        """The grid frame's celestial WCS cards ({key: value}, the array convention of
        daemon.io.wcs): its header's, or its plate solve's; None when it has none."""
        return None if self._ref is None or not self._ref.wcs else dict(self._ref.wcs)

    @property
    def wcs_solved(self) -> bool:
        """`reference_wcs` comes from a plate solve (not from the frame's header)."""
        return self._ref is not None and self._ref.wcs_solved

    def grid_frame(self) -> GridFrame | None:
        """The frame whose pixel grid the stack uses, as the plate solver needs it (a copy)."""
        with self._lock:
            return grid_frame(self._ref)

    def set_reference_wcs(self, path: str, cards: dict) -> bool:
        """Make `cards` (a plate solve of `path`, array convention) the stack's WCS source.
        False, and nothing changed, when `path` is not the grid frame (any more)."""
        with self._lock:
            if self._ref is None or self._ref.grid_path != path:
                return False
            self._ref.wcs, self._ref.wcs_solved = dict(cards), True
            return True

    @property
    def geometry(self) -> StackGeometry:
        """Where the stack's pixels lie on the reference frame (superpixel: half scale)."""
        return SUPERPIXEL if self._at_superpixel else StackGeometry()

    @property
    def rejection_settings(self) -> dict:
        """The settings that shaped the stack, for the FITS header."""
        return dataclasses.asdict(self.settings)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """Flat dict: values are numpy arrays or JSON-able; keys with a dot are arrays of
        the stack ("stack.mean") or the reference stars ("ref_stars.x")."""
        with self._lock:
            st: dict[str, Any] = {
                "version": 1,
                "n_stacked": self.n_stacked,
                "total_exposure_s": self.total_exposure_s,
                "n_rejected": self.n_rejected,
                "provenance": [dict(p) for p in self._provenance],
                "history": dataclasses.asdict(self._history),
                "reference": None,
            }
            if self._ref is not None:
                r = self._ref
                st["reference"] = {
                    "path": r.path, "n_stars": r.n_stars, "noise": r.noise, "snr": r.snr,
                    "frame_shape": list(r.frame_shape), "bayer": r.bayer, "sky": list(r.sky),
                    "grid_from_ref": np.asarray(r.grid_from_ref).tolist(), "fwhm_px": r.fwhm_px,
                    "candidates_left": r.candidates_left, "wcs": r.wcs, "grid_path": r.grid_path,
                    "wcs_solved": r.wcs_solved,
                    "stars_arrays": [], "stars_values": {},
                }
                for f in dataclasses.fields(r.stars):
                    if f.metadata.get("cache"):
                        continue  # caches (e.g. registration's pattern index) are rebuilt
                    value = getattr(r.stars, f.name)
                    if isinstance(value, np.ndarray):
                        st["reference"]["stars_arrays"].append(f.name)
                        st[f"ref_stars.{f.name}"] = value
                    else:
                        st["reference"]["stars_values"][f.name] = list(value) if isinstance(value, tuple) else value
            if self._stack is not None:
                for key, value in self._stack.state().items():
                    st[f"stack.{key}"] = value
            return st

    @classmethod
    def from_state(cls, state: dict, settings: LiveSettings | None = None,
                   masters: Masters | None = None, *, memory_bytes: int | None = None) -> LivePipeline:
        pipe = cls(settings, masters, memory_bytes=memory_bytes)
        pipe.n_stacked = int(state["n_stacked"])
        pipe.total_exposure_s = float(state["total_exposure_s"])
        pipe.n_rejected = int(state.get("n_rejected", 0))
        pipe._provenance = [dict(p) for p in state["provenance"]]
        pipe._history = QualityHistory(**state["history"])
        ref = state.get("reference")
        if ref is not None:
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in ref["stars_values"].items()}
            stars = Stars(**{name: np.asarray(state[f"ref_stars.{name}"]) for name in ref["stars_arrays"]}, **values)
            pipe._ref = Reference(
                path=ref["path"], stars=stars, n_stars=int(ref["n_stars"]), noise=ref["noise"],
                snr=ref["snr"], frame_shape=tuple(ref["frame_shape"]), bayer=ref["bayer"], sky=list(ref["sky"]),
                wcs=ref.get("wcs"), grid_path=ref.get("grid_path"), wcs_solved=bool(ref.get("wcs_solved")),
                grid_stars=stars if ref.get("grid_path") == ref["path"] else None,
                grid_from_ref=np.asarray(ref.get("grid_from_ref", np.eye(3)), np.float64),
                fwhm_px=ref.get("fwhm_px"), candidates_left=int(ref.get("candidates_left", 0)),
            )
        stack_keys = {k[len("stack."):]: v for k, v in state.items() if k.startswith("stack.")}
        if stack_keys:
            pipe._stack = RunningStack.from_state(stack_keys, pipe.settings.stack_settings)
        return pipe

    # ------------------------------------------------------------------ stages
    def _calibrate(self, frame: Frame) -> np.ndarray:
        """The calibrated mosaic. Calibrated in place in `frame.data` when that is a writeable
        float32 array (as `load_frame` returns), and the frame marked `calibrated`, so a frame
        given twice (set_reference then process, a re-run) is calibrated once; else a new array."""
        if self.masters is None or frame.calibrated:
            return np.asarray(frame.data, dtype=np.float32)
        data = calibrate(frame.data, float(frame.meta.exposure_s or 0.0), self.masters, in_place=True)
        if data is frame.data:
            frame.calibrated = True
        return data

    def _measure(self, data: np.ndarray, frame: Frame):
        return measure(data, bayer=frame.meta.bayer, plate_scale=frame.meta.plate_scale_arcsec)

    def _make_reference(self, frame: Frame, stars, metrics) -> Reference:
        return Reference(
            path=frame.meta.path, stars=stars, n_stars=int(metrics.n_stars), noise=_num(metrics.noise),
            snr=_snr(stars, metrics), frame_shape=tuple(frame.data.shape), bayer=frame.meta.bayer,
            wcs=dict(frame.meta.wcs) if frame.meta.wcs else None, fwhm_px=_num(metrics.fwhm_px),
            grid_path=frame.meta.path, grid_stars=stars, grid_meta=frame.meta,
        )

    def _weight(self, metrics, stars) -> float:
        """Relative weight (reference = 1): inverse noise variance or squared star SNR."""
        ref = self._ref
        if self.settings.weighting == "noise" and ref.noise and metrics.noise:
            return float((ref.noise / float(metrics.noise)) ** 2)
        if self.settings.weighting == "snr" and ref.snr:
            snr = _snr(stars, metrics)
            if snr:
                return float((snr / ref.snr) ** 2)
        return 1.0

    def debayer_method(self, shape: tuple[int, ...]) -> str:
        """The debayer method used for frames of this (mosaic) shape: once a colour stack
        exists, the one it was made with (it keeps its resolution when the setting or the
        memory differs after a restart: its frames go on being stacked); else "superpixel"
        where set or where full resolution does not fit (`memory_note`), else "bilinear"."""
        stack, ref = self._stack, self._ref
        if stack is not None and ref is not None and ref.bayer and len(stack.shape) == 3:
            return "bilinear" if stack.shape[:2] == tuple(ref.frame_shape[:2]) else "superpixel"
        return "superpixel" if self.settings.debayer == "superpixel" or self.memory_note(shape) else "bilinear"

    def memory_note(self, frame_shape: tuple[int, ...]) -> str | None:
        """`stack_memory_note` of colour frames of this mosaic shape under these settings and
        this machine's memory: why they go to a superpixel stack; None where they do not."""
        if self.settings.debayer != "auto":
            return None
        return stack_memory_note(frame_shape, self.settings.stack_settings, self.memory_bytes)

    @property
    def _at_superpixel(self) -> bool:
        """Whether this pipeline's frames are colour and stacked at superpixel resolution."""
        ref = self._ref
        return ref is not None and bool(ref.bayer) and self.debayer_method(ref.frame_shape) == "superpixel"

    @property
    def resolution_note(self) -> str | None:
        """`memory_note` of this pipeline's colour stack when it is at superpixel resolution for
        want of memory (for `status`); None otherwise."""
        return self.memory_note(self._ref.frame_shape) if self._at_superpixel else None

    @property
    def holds_frames(self) -> bool:
        """`LiveSettings.holds_frames` for this pipeline's frames: False once its reference is a
        colour frame stacked at superpixel resolution (debayer "auto" short of memory too)."""
        return self.settings.holds_frames and not self._at_superpixel

    def _debayer(self, data: np.ndarray, bayer: str | None, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour mosaic -> RGB (and the matrix in its pixel grid); mono passes through
        (the same array, no copy)."""
        m = np.asarray(matrix, dtype=np.float64)
        if not bayer:
            return data, m
        method = self.debayer_method(data.shape)
        img = debayer(data, bayer, method=method)
        if method == "superpixel":
            # Superpixel (i, j) is centred on full-resolution (2i + 0.5, 2j + 0.5).
            up = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])
            m = np.linalg.inv(up) @ m @ up
        return img, m

    def _warp(self, img: np.ndarray, m: np.ndarray, owned: bool = True) -> np.ndarray:
        """Into the reference frame; NaN outside the frame; always an array the pipeline may
        modify. The identity needs no resampling (a copy only if `img` is not `owned`)."""
        if is_identity(m):
            return img if owned else img.copy()
        return warp(img, m, img.shape[:2], interpolation=self.settings.interpolation)

    @staticmethod
    def _sky(image: np.ndarray) -> list[float]:
        """Per-plane sky level (ADU): median over a sparse grid of ~40k pixels."""
        h, w = image.shape[:2]
        step = max(1, int(np.sqrt(h * w / 40000)))
        sub = image[::step, ::step]
        if sub.ndim == 2:
            sub = sub[..., None]
        return [float(np.nanmedian(sub[..., c])) for c in range(sub.shape[-1])]


#: FrameMeta fields kept per stacked frame for the stack's header (daemon.products).
CAPTURE_FIELDS = ("camera", "telescope", "target", "filter", "gain", "offset", "binning", "pixel_size_um",
                  "focal_length_mm", "sensor_temp_c", "set_temp_c", "site_lat_deg", "site_lon_deg",
                  "ra_deg", "dec_deg")


def capture_fields(meta: FrameMeta) -> dict:
    """The capture metadata of one frame as a JSON-able dict (None for unknown)."""
    out = {}
    for name in CAPTURE_FIELDS:
        value = getattr(meta, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _snr(stars, metrics) -> float | None:
    """Star signal-to-noise proxy: median flux of the 20 brightest stars over (noise x FWHM)."""
    try:
        flux = np.sort(np.asarray(stars.flux, dtype=np.float64))[::-1][:20]
    except AttributeError:
        return None
    noise, fwhm = _num(metrics.noise), _num(metrics.fwhm_px)
    if flux.size == 0 or not noise or not fwhm:
        return None
    return float(np.median(flux) / (noise * fwhm))
