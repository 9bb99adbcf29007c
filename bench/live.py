"""The live worker: lightbucket's pipeline over a session, as the daemon runs it.

Before its frames it does what the daemon does before READY (`daemon.warmup.ensure_warm`:
every numba kernel loaded from the cache, compiled where the cache lacks it), timed as
"ready_s"; so the first frames are timed as a user sees the first frames of a night.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

from astropy.io import fits

import daemon.pipeline.fused as fused
import daemon.pipeline.live as live
from bench.sessions import EXPOSURE_S, load_master_arrays, session_paths
from bench.timing import MemoryPeaks, StageTimer, _cpu_s, _rss_bytes, just_written, resident_bytes
from daemon import checkpoint
from daemon.io.load import FrameLoader
from daemon.memory import freeze_startup_objects, retain_freed_memory
from daemon.pipeline.calibrate import Masters
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.stack import RunningStack
from daemon.products import preview_jpeg
from daemon.spool import Spool, SpoolWriter
from daemon.warmup import ensure_warm

#: Long edge of the preview JPEG (px): the daemon's default [output] preview_max_edge. The daemon
#: rate-limits previews (preview_interval_s); the benchmark makes one after *every* frame.
PREVIEW_EDGE = 1280


def instrument_live(timer: StageTimer) -> None:
    """Wrap the pipeline's stage functions where `daemon.pipeline.live` finds them (it imports
    them lazily from their modules, or at module level: both places are patched)."""
    targets = [
        ("daemon.pipeline.calibrate", "calibrate", "calibrate"),
        ("daemon.pipeline.stars", "measure", "detect"),
        ("daemon.pipeline.align", "register", "match"),
        ("daemon.pipeline.debayer", "debayer", "debayer"),
        ("daemon.pipeline.warp", "warp", "warp"),
    ]
    for modname, attr, stage in targets:
        mod = importlib.import_module(modname)
        orig = getattr(mod, attr)
        wrapped = timer.wrap(stage, orig)
        setattr(mod, attr, wrapped)
        if getattr(live, attr, None) is orig:
            setattr(live, attr, wrapped)
    RunningStack.add = timer.wrap("reject+stack", RunningStack.add)
    orig = fused.stack_mosaic
    fused.stack_mosaic = timer.wrap("fused", orig)
    if live.stack_mosaic is orig:
        live.stack_mosaic = fused.stack_mosaic


def live_worker(folder: Path, n_total: int, settings_kw: dict, state_dir: str | None = None,
                prepare: bool = True) -> dict:
    """The live pipeline over the session, as the daemon runs it: load, process, spool, preview.

    The spool is written as the service writes it (`SpoolWriter`): on its own thread while
    the next frame is processed, at most one write in flight. Stage "spool" is the time a
    frame waits for the previous frame's write (zero when the write kept up) and the float16
    encoding into that frame's copy (on this thread, as in the service); the write itself is
    timed on its thread ("spool_write_s") and is in the CPU time of the frames it overlaps. The spool and the
    checkpoint go to a temporary folder under `state_dir` (default: the system's temp folder;
    give the disk a real state folder would be on to time its writes). `prepare`: the stack
    is made before the first frame, as the service makes it while its camera takes a plan's
    first exposure (`Session.prepare`; timed as "prepare_s"); else the first frame makes it,
    as for frames of another capture program.
    """
    memory = MemoryPeaks()
    timer = StageTimer(memory)
    instrument_live(timer)
    # As the daemon before it reports READY (daemon.warmup): every kernel loaded from numba's
    # cache (compiled where it lacks one), so the first frame is timed as a user sees it.
    t = time.perf_counter()
    compiled_s = ensure_warm()
    freeze_startup_objects()  # as the service before READY
    ready_s = time.perf_counter() - t
    # What stays resident through the night, step by step (bytes, VmRSS after each).
    resident = {"ready": resident_bytes()}
    m = load_master_arrays(folder)
    masters = Masters(bias=m["bias"], dark=m["dark"], dark_exposure_s=m["dark_exposure_s"], flat=m["flat"],
                      defects=m["defects"], bayer=m["bayer"])
    del m
    # As the service: its masters are loaded when it is made, malloc's settings (daemon.memory)
    # applied when it runs, so the masters' full-size arrays are returned once compacted, not
    # kept for the frames.
    retain_freed_memory()
    pipe = LivePipeline(LiveSettings(**settings_kw), masters)
    del masters
    resident["masters"] = resident_bytes()
    # As the service loads: into the previous frame's array when free.
    load = FrameLoader(keep_large=pipe.settings.holds_frames)
    prepare_s = None
    if prepare:  # for the camera's frames: their size and CFA pattern (INDI's CCD_FRAME, CCD_CFA)
        header = fits.getheader(session_paths(folder, 1)[0])
        t = time.perf_counter()
        shape = (header["NAXIS2"], header["NAXIS1"])
        pipe.prepare(shape, header.get("BAYERPAT") or None)
        resident["stack"] = resident_bytes()
        load.reserve(shape)
        prepare_s = time.perf_counter() - t
        resident["frame"] = resident_bytes()
    spool_dir = tempfile.TemporaryDirectory(prefix="lb-bench-spool-", dir=state_dir)
    spools = SpoolWriter(spool_dir.name)  # the service's: its thread, its buffer reuse
    write_s: list[float] = []
    spool_bytes: list[int] = []
    append = Spool.append

    def timed_append(spool, image, **kw) -> dict:  # on the spool thread
        t = time.perf_counter()
        entry = append(spool, image, **kw)
        write_s.append(time.perf_counter() - t)
        spool_bytes.append((spool.dir / entry["file"]).stat().st_size)
        return entry

    Spool.append = timed_append  # restored once the frames are spooled

    frames = []
    for path in session_paths(folder, n_total):
        just_written(path)
        timer.reset()
        t0, c0 = time.perf_counter(), _cpu_s()
        with timer.stage("load"):
            frame = load(str(path))
        with timer.stage("process"):
            result = pipe.process(frame, consume=True)
        if result.accepted and result.registered is not None:
            with timer.stage("spool"):  # as the service (`Session`): encoded here into the previous
                encoded = spools.encode(result.registered)  # frame's copy once written, then
                result.registered = None  # written by the spool thread, one write in flight
                spools.submit("bench", str(path), encoded, weight=result.weight,
                              date_obs=frame.meta.date_obs.isoformat() if frame.meta.date_obs else None,
                              exposure_s=frame.meta.exposure_s)
                del encoded
        result.registered = None
        del frame
        with timer.stage("preview"):
            image = pipe.stack_image()
            jpeg = preview_jpeg(image, max_edge=PREVIEW_EDGE) if image is not None else b""
            del image
        total, cpu = time.perf_counter() - t0, _cpu_s() - c0
        stages = dict(timer.frame)
        stages["other"] = stages.pop("process", 0.0)
        memory.boundary("between")  # (this frame's last interval)
        frames.append({"rss_peaks": dict(memory.frame),
                       "path": path.name, "total_s": total, "cpu_s": cpu, "stages": stages, "accepted": result.accepted,
                       "reason": result.reason, "stars": result.stars, "dx": result.dx, "dy": result.dy,
                       "rejected_pixels": getattr(result, "rejected_pixels", None),
                       "process_ms": result.processing_ms, "preview_bytes": len(jpeg)})
        del result
    spools.shutdown()
    Spool.append = append
    n_spooled = len(Spool(spools.folder("bench")))
    memory.boundary("spool")  # (the last write)
    peak_rss_frames = memory.peak if memory.available else _rss_bytes()
    # The checkpoints the service would write now (its stacks' state), untimed: one every
    # state.checkpoint_every_s (30 s: once per frame of these 30 s exposures). The first
    # writes the stack's snapshot (its time: how long the service's worker is held up once
    # per snapshot), the second, as every one until the next snapshot is due (after
    # SNAPSHOT_EVERY_S and SNAPSHOT_EVERY_FRAMES), only the rest. Per frame: the second's size
    # plus the snapshot's share. The stack is the session's last: past its rejection warm-up
    # with `bench.run --steady` frames (a night's snapshots come after 30 min and 60 frames,
    # long after it), else still in it, whose bookkeeping the snapshot holds too (an upper
    # bound).
    with tempfile.TemporaryDirectory(prefix="lb-bench-ckpt-", dir=state_dir) as ckpt_dir:
        t = time.perf_counter()
        checkpoint.save(Path(ckpt_dir), {"stacks": {"bench": {"pipeline": pipe.state()}}})
        ckpt_s = time.perf_counter() - t
        snapshot_bytes = sum(p.stat().st_size for p in Path(ckpt_dir).glob("stack-*.npz"))
        small = checkpoint.save(Path(ckpt_dir), {"stacks": {"bench": {"pipeline": pipe.state()}}}).stat().st_size
        frames_per_snapshot = max(checkpoint.SNAPSHOT_EVERY_S / EXPOSURE_S, checkpoint.SNAPSHOT_EVERY_FRAMES)
        ckpt_bytes = small + snapshot_bytes / frames_per_snapshot
    memory.boundary("checkpoint")
    # The frames' peak, or the checkpoint's if that is higher (`memory`'s resets lower ru_maxrss).
    peak_rss = memory.peak if memory.available else _rss_bytes()
    image = pipe.stack_image()
    resolution = None if image is None else f"{image.shape[1]}x{image.shape[0]}"
    del image
    spool_dir.cleanup()
    return {"frames": frames, "peak_rss": peak_rss, "peak_rss_frames": peak_rss_frames,
            "rss_resident": resident,
            "n_stacked": pipe.n_stacked, "n_spooled": n_spooled, "spool_write_s": write_s,
            "spool_bytes": spool_bytes, "checkpoint_bytes": ckpt_bytes, "checkpoint_s": ckpt_s,
            "snapshot_bytes": snapshot_bytes,
            "raw_bytes": session_paths(folder, 1)[0].stat().st_size, "resolution": resolution,
            "ready_s": ready_s, "compiled_s": compiled_s, "prepare_s": prepare_s}
