"""Per-frame latency and peak memory of the live pipeline against a naive baseline.

    .venv/bin/python -m bench.run                          # full run: 3 sizes, mono + OSC
    .venv/bin/python -m bench.run --sizes 4144x2822 --osc  # one case
    .venv/bin/python -m bench.run --quick                  # smoke run (tiny, 2 frames)

What it does, per sensor size and colour mode:

1. Generates a synthetic session once with `daemon.simulate` (dithered star field, hot pixels,
   vignetting, one satellite trail, Bayer mosaic for OSC) as uint16 FITS files carrying the
   headers INDI writes (`simulate.fits_header`), plus master bias/dark/flat. Sessions are
   cached in bench/results/sessions/ (git-ignored) and reused by later runs.
2. Runs the live pipeline as the service does per frame (`daemon.io.load.FrameLoader` ->
   `LivePipeline.process(consume=True)` -> `spool.encode` and `Spool.append` of the registered
   frame on the spool thread -> preview JPEG of the stack, made after every frame), on a
   thread of its own with the service's malloc settings (`daemon.memory`), over the frames in
   a *fresh subprocess*, so its peak RSS (`ru_maxrss`) is its own. Stage times come from
   wrapping the pipeline's own stage functions (calibrate, measure, register, debayer, warp,
   RunningStack.add, preview_jpeg) with timers that count exclusive time (a stage called
   inside another is not counted twice). "other" is what `process` spends outside those
   (quality gate, sky level, weights, copies).
3. Runs the naive baseline over the same files in another fresh subprocess (see `naive_worker`
   for exactly what it does).
4. Prints and saves a Markdown table (median over the timed frames, after the warm-up) with the
   machine line, and writes everything to JSON (--out).

The first `--warmup` frames (default 2: the reference frame and one more) are processed but
not timed. The live stack's own rejection warm-up (LiveSettings.warmup frames) *is* inside the
timed frames: that is what a user sees, and the median is robust to its one expensive frame
(the max is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: Named sensor sizes (width x height, px).
SIZES = {"1280x1024": (1280, 1024), "4144x2822": (4144, 2822), "6248x4176": (6248, 4176)}
QUICK_SIZE = "320x240"

#: Stage columns of the table, in pipeline order.
#: "fused": the colour path at full resolution, debayer + warp + reject+stack band by band
#: (`daemon.pipeline.fused.stack_mosaic`), which cannot be split into those stages.
STAGES = ("load", "calibrate", "debayer", "detect", "match", "warp", "reject+stack", "fused", "spool", "preview",
          "other")

#: Targets from issue 19 (2-core x86, colour at full resolution): seconds per frame end to
#: end, peak RSS, speed-up over the naive full-resolution pipeline, bytes written per frame
#: (spool + checkpoint share) over the raw frame's, first frame over a warm one.
TARGET_S = {("4144x2822", "osc"): 0.2, ("6248x4176", "osc"): 0.45}
TARGET_RSS = {("6248x4176", "osc"): 1.5e9}
TARGET_RATIO = {("4144x2822", "osc"): 10.0}
TARGET_WRITTEN = {("6248x4176", "osc"): 1.5}
TARGET_FIRST = 2.0

#: Long edge of the preview JPEG (px): the daemon's default [output] preview_max_edge. The daemon
#: rate-limits previews (preview_interval_s); the benchmark makes one after *every* frame.
PREVIEW_EDGE = 1280

SESSION_VERSION = 2  # bump when the generated sessions change
EXPOSURE_S = 30.0
BAYER = "RGGB"


# ---------------------------------------------------------------------------- sessions
def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (minimum 64x64)")
    return w, h


def n_stars_for(w: int, h: int) -> int:
    """Stars in the field: ~1 per 8000 px, 80..2000 (a 26 MP frame of a rich field detects
    thousands; the cap keeps generation fast and detection work is per pixel anyway)."""
    return int(np.clip(w * h / 8000, 80, 2000))


def _sensor(bayer: str | None, w: int, h: int):
    from daemon.simulate import Sensor

    return Sensor(bias_adu=500.0, dark_current_adu_s=0.2, read_noise_adu=3.0,
                  n_hot_pixels=max(10, w * h // 20000), hot_pixel_adu_s=50.0,
                  bayer=bayer, vignetting=0.2)


def _frame_job(args: tuple) -> None:
    """Render and write one light frame (runs in a pool worker)."""
    from astropy.io import fits

    from daemon import simulate as sim

    path, w, h, bayer, i, n_stars, seed = args
    rng = np.random.default_rng(seed * 1000 + i)
    field = sim.random_star_field((h, w), n_stars, seed=seed, margin=0.1)
    if i == 0:
        matrix = None  # the reference frame sits on the reference grid
    else:
        # Dither of up to 20 px and field rotation of up to 0.3 deg, as a real session.
        matrix = sim.transform_matrix(rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-0.3, 0.3),
                                      center=((w - 1) / 2, (h - 1) / 2))
    trails = []
    if i == 4:  # one satellite for the rejection to deal with
        trails = [sim.Trail(0, h * 0.2, w - 1, h * 0.7, adu_per_px=3000.0)]
    exp = sim.Exposure(exposure_s=EXPOSURE_S, matrix=matrix, fwhm_px=3.0 + 0.2 * rng.standard_normal(),
                       sky_adu_s=10.0, trails=trails, star_rgb=(0.9, 1.0, 0.8), sky_rgb=(1.1, 1.0, 0.9),
                       seed=seed * 1000 + i)
    data = sim.expose((h, w), field, exp, _sensor(bayer, w, h))
    start = datetime(2026, 11, 24, 21, 0, 0, tzinfo=UTC)
    hdr = sim.fits_header(exposure_s=EXPOSURE_S, bayer=bayer,
                          date_obs=sim.session_times(start, EXPOSURE_S, i + 1)[-1])
    header = fits.Header()
    for k, v in hdr.items():
        header[k] = v
    tmp = Path(str(path) + ".part")
    fits.PrimaryHDU(data=data, header=header).writeto(tmp, overwrite=True)
    tmp.rename(path)


def make_session(root: Path, w: int, h: int, bayer: str | None, n_frames: int, seed: int = 1) -> Path:
    """Generate (or reuse) a session folder: frame_NNN.fits (uint16) and masters.npz.

    The masters are the sensor's expectation (noise-free), as a master built from many
    frames approximates, in `daemon.pipeline.calibrate`'s conventions: bias (ADU), dark
    current only (bias removed) for `dark_exposure_s`, flat normalised to a median of 1 per
    CFA position, defect map (the hot pixels).
    """
    mode = "osc" if bayer else "mono"
    folder = root / f"{w}x{h}-{mode}-v{SESSION_VERSION}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{i:03d}.fits" for i in range(n_frames)]
    todo = [p for p in paths if not p.exists()]
    if todo:
        t0 = time.perf_counter()
        jobs = [(p, w, h, bayer, int(p.stem.split("_")[1]), n_stars_for(w, h), seed) for p in todo]
        if len(jobs) > 1 and w * h > 1_000_000:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
                pool.map(_frame_job, jobs, chunksize=1)
        else:
            for j in jobs:
                _frame_job(j)
        print(f"  generated {len(todo)} frames {w}x{h} {mode} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    masters = folder / "masters.npz"
    if not masters.exists():
        sensor = _sensor(bayer, w, h)
        shape = (h, w)
        flat = sensor.flat_field(shape)
        chans = sensor.channel_map(shape)
        if chans is not None:
            flat = flat * np.asarray((1.1, 1.0, 0.9), np.float32)[chans]
        # Median 1 per CFA position (daemon.pipeline.calibrate's convention): dividing by it
        # removes vignetting without changing the colour balance.
        step = 2 if bayer else 1
        for r in range(step):
            for c in range(step):
                flat[r::step, c::step] /= np.median(flat[r::step, c::step])
        hot = sensor.hot_pixel_mask(shape)
        dark = np.full(shape, sensor.dark_current_adu_s * EXPOSURE_S, np.float32)  # dark current only
        dark[hot] += sensor.hot_pixel_adu_s * EXPOSURE_S
        np.savez(masters, bias=np.full(shape, sensor.bias_adu, np.float32), dark=dark,
                 dark_exposure_s=np.float64(EXPOSURE_S), flat=flat.astype(np.float32), defects=hot,
                 bayer=np.array(bayer or ""))
    return folder


def session_paths(folder: Path, n: int) -> list[Path]:
    return [folder / f"frame_{i:03d}.fits" for i in range(n)]


def load_master_arrays(folder: Path) -> dict:
    with np.load(folder / "masters.npz") as z:
        d = {k: z[k] for k in z.files}
    d["dark_exposure_s"] = float(d["dark_exposure_s"])
    d["bayer"] = str(d["bayer"]) or None
    return d


# ---------------------------------------------------------------------------- timing
class StageTimer:
    """Exclusive wall time per stage for the current frame: when a timed stage calls another,
    the inner time is counted for the inner stage only."""

    def __init__(self) -> None:
        self.frame: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, child_time]

    def reset(self) -> None:
        self.frame = {}

    @contextmanager
    def stage(self, name: str):
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.frame[name] = self.frame.get(name, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self.stage(name):
                return fn(*a, **kw)

        timed.__wrapped__ = fn
        return timed


def instrument_live(timer: StageTimer) -> None:
    """Wrap the pipeline's stage functions where `daemon.pipeline.live` finds them (it imports
    them lazily from their modules, or at module level: both places are patched)."""
    import importlib

    import daemon.pipeline.live as live

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
    from daemon.pipeline.stack import RunningStack

    RunningStack.add = timer.wrap("reject+stack", RunningStack.add)
    import daemon.pipeline.fused as fused

    orig = fused.stack_mosaic
    fused.stack_mosaic = timer.wrap("fused", orig)
    if live.stack_mosaic is orig:
        live.stack_mosaic = fused.stack_mosaic


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------- workers
def just_written(path: Path) -> None:
    """Bring a frame file into the page cache, untimed, as if the camera had just written it
    (which is what the daemon sees). The sessions are generated once and reused, and this VM
    reclaims cold page cache (kdamond), so without this "load" timed a disk read of the
    file at random: 40-230 ms for the same 52 MB frame. Read through a small buffer, so the
    process's peak RSS is not touched."""
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def live_worker(folder: Path, n_total: int, settings_kw: dict) -> dict:
    """The live pipeline over the session, as the daemon runs it: load, process, spool, preview.

    The spool is written as the service writes it (`Service._spool`): on its own thread while
    the next frame is processed, at most one write in flight. Stage "spool" is the float16
    encoding (on this thread, as in the service) and the time a frame waits for the previous
    frame's write (zero when the write kept up); the write itself is timed on its thread
    ("spool_write_s") and is in the CPU time of the frames it overlaps.
    """
    from daemon.io.load import FrameLoader
    from daemon.pipeline.calibrate import Masters
    from daemon.pipeline.live import LivePipeline, LiveSettings
    from daemon.products import preview_jpeg
    from daemon.spool import Spool, encode, writer_thread

    timer = StageTimer()
    instrument_live(timer)
    m = load_master_arrays(folder)
    masters = Masters(bias=m["bias"], dark=m["dark"], dark_exposure_s=m["dark_exposure_s"], flat=m["flat"],
                      defects=m["defects"], bayer=m["bayer"])
    del m
    # As the daemon before it reports READY (daemon.warmup): the kernels compiled or loaded
    # from numba's cache, so the first frame is timed as a user sees it.
    from daemon.warmup import warm_up

    warmup_s = warm_up()
    pipe = LivePipeline(LiveSettings(**settings_kw), masters)
    load = FrameLoader()  # as the service loads: into the previous frame's array when free
    spool_dir = tempfile.TemporaryDirectory(prefix="lb-bench-spool-")
    spool = Spool(spool_dir.name)
    spooler = writer_thread()
    pending = None
    write_s: list[float] = []

    spool_bytes: list[int] = []

    def spool_write(image, **kw) -> None:
        t = time.perf_counter()
        entry = spool.append(image, **kw)
        write_s.append(time.perf_counter() - t)
        spool_bytes.append((spool.dir / entry["file"]).stat().st_size)

    rss_before = _rss_bytes()
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
            with timer.stage("spool"):  # as the service: encoded here, written by the spool thread,
                encoded = encode(result.registered)  # one write in flight
                result.registered = None
                if pending is not None:
                    pending.result()
                pending = spooler.submit(
                    spool_write, encoded, weight=result.weight, path=str(path),
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
        frames.append({"path": path.name, "total_s": total, "cpu_s": cpu, "stages": stages, "accepted": result.accepted,
                       "reason": result.reason, "stars": result.stars, "dx": result.dx, "dy": result.dy,
                       "rejected_pixels": getattr(result, "rejected_pixels", None),
                       "process_ms": result.processing_ms, "preview_bytes": len(jpeg)})
        del result
    if pending is not None:
        pending.result()
    spooler.shutdown()
    n_spooled = len(spool)
    peak_rss = _rss_bytes()
    # The checkpoint the service would write now (its stacks' state), untimed: its size is
    # what one checkpoint writes (every state.checkpoint_every_s, 30 s: once per frame of
    # this session's 30 s exposures).
    from daemon import checkpoint

    # Two checkpoints: the first writes the stack's snapshot, the second (as every one within
    # checkpoint.SNAPSHOT_EVERY_S after it) only the rest. Per frame of 30 s exposures: the
    # second's size plus the snapshot's share (one per SNAPSHOT_EVERY_S).
    with tempfile.TemporaryDirectory(prefix="lb-bench-ckpt-") as ckpt_dir:
        t = time.perf_counter()
        checkpoint.save(Path(ckpt_dir), {"stacks": {"bench": {"pipeline": pipe.state()}}})
        ckpt_s = time.perf_counter() - t
        snapshot_bytes = sum(p.stat().st_size for p in Path(ckpt_dir).glob("stack-*.npz"))
        small = checkpoint.save(Path(ckpt_dir), {"stacks": {"bench": {"pipeline": pipe.state()}}}).stat().st_size
        ckpt_bytes = small + snapshot_bytes * EXPOSURE_S / checkpoint.SNAPSHOT_EVERY_S
    image = pipe.stack_image()
    resolution = None if image is None else f"{image.shape[1]}x{image.shape[0]}"
    del image
    spool_dir.cleanup()
    return {"frames": frames, "peak_rss": peak_rss, "rss_before_frames": rss_before,
            "n_stacked": pipe.n_stacked, "n_spooled": n_spooled, "spool_write_s": write_s,
            "spool_bytes": spool_bytes, "checkpoint_bytes": ckpt_bytes, "checkpoint_s": ckpt_s,
            "snapshot_bytes": snapshot_bytes,
            "raw_bytes": session_paths(folder, 1)[0].stat().st_size, "resolution": resolution,
            "warmup_s": warmup_s}


def naive_worker(folder: Path, n_total: int, bin2: bool = False) -> dict:
    """What a user with numpy, astropy, OpenCV and astroalign writes first:

    - load: `astropy.io.fits.getdata(path).astype(np.float32)`, EXPTIME from the header;
    - calibrate: `(raw - bias - dark_current * t / t_dark) / flat` on full frames (numpy),
      no defect repair;
    - debayer (OSC): `cv2.cvtColor(uint16 mosaic, COLOR_Bayer..2RGB)` (OpenCV's bilinear),
      back to float32; with `bin2` (the baseline of a superpixel live stack: like with like)
      the 2x2 superpixel by numpy slicing instead, R, (G1 + G2) / 2, B at half resolution;
    - detect + match: `astroalign.find_transform(green, reference_green)` (mono: the frame),
      which detects the stars of both images every call, as `astroalign.register` does;
    - warp: `astroalign.apply_transform(T, channel, reference)` once per channel (3 for OSC:
      the green solution applied to R, G and B), as `astroalign.register` does per image;
    - stack: running mean in float64, `mean += (img - mean) / n`, no rejection.
    Frames astroalign cannot register (MaxIterError) are skipped, as a user's try/except would.
    Detection cannot be separated from matching inside find_transform, so it is all in "match".
    """
    import astroalign as aa
    import cv2
    from astropy.io import fits

    timer = StageTimer()
    m = load_master_arrays(folder)
    bias, dark, flat, t_dark, bayer = m["bias"], m["dark"], m["flat"], m["dark_exposure_s"], m["bayer"]
    codes = {"RGGB": cv2.COLOR_BayerBG2RGB, "BGGR": cv2.COLOR_BayerRG2RGB,
             "GRBG": cv2.COLOR_BayerGB2RGB, "GBRG": cv2.COLOR_BayerGR2RGB}
    ref_lum = None
    mean = None
    n = 0
    frames = []
    rss_before = _rss_bytes()
    for path in session_paths(folder, n_total):
        just_written(path)
        timer.reset()
        t0, c0 = time.perf_counter(), _cpu_s()
        ok = True
        with timer.stage("load"):
            with fits.open(path) as hdul:
                raw = hdul[0].data.astype(np.float32)
                exposure = float(hdul[0].header["EXPTIME"])
        with timer.stage("calibrate"):
            cal = (raw - bias - dark * (exposure / t_dark)) / flat
        if bayer and bin2:
            with timer.stage("debayer"):
                cell = {c: [(k // 2, k % 2) for k, ch in enumerate(bayer) if ch == c] for c in "RGB"}
                planes = [np.mean([cal[dy::2, dx::2] for dy, dx in cell[c]], axis=0) for c in "RGB"]
                img = np.dstack(planes).astype(np.float32)
                lum = img[..., 1]
        elif bayer:
            with timer.stage("debayer"):
                img = cv2.cvtColor(np.clip(cal, 0, 65535).astype(np.uint16), codes[bayer]).astype(np.float32)
                lum = img[..., 1]
        else:
            img = lum = cal
        if ref_lum is None:
            ref_lum = lum.copy()
            aligned = img
        else:
            try:
                with timer.stage("match"):
                    transform, _ = aa.find_transform(lum, ref_lum)
                with timer.stage("warp"):
                    if img.ndim == 2:
                        aligned = aa.apply_transform(transform, img, ref_lum)[0]
                    else:
                        aligned = np.dstack([aa.apply_transform(transform, img[..., c], ref_lum)[0]
                                             for c in range(img.shape[2])])
            except aa.MaxIterError:
                ok = False
        if ok:
            with timer.stage("reject+stack"):
                n += 1
                if mean is None:
                    mean = aligned.astype(np.float64)
                else:
                    mean += (aligned - mean) / n
        total, cpu = time.perf_counter() - t0, _cpu_s() - c0
        frames.append({"path": path.name, "total_s": total, "cpu_s": cpu, "stages": dict(timer.frame),
                       "accepted": ok})
    return {"frames": frames, "peak_rss": _rss_bytes(), "rss_before_frames": rss_before, "n_stacked": n,
            "resolution": None if mean is None else f"{mean.shape[1]}x{mean.shape[0]}"}


def run_worker(kind: str, folder: Path, n_total: int, settings_kw: dict, timeout_s: float) -> dict:
    """Run one worker in a fresh interpreter (same environment) and return its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "bench.run", "--worker", kind, "--session", str(folder),
           "--worker-frames", str(n_total), "--worker-out", str(out),
           "--worker-settings", json.dumps(settings_kw)]
    try:
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed on {folder.name} (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        res = json.loads(out.read_text())
        # 1-minute load average before and after: other processes on the machine inflate
        # wall times (the CPU-time column is less sensitive to them).
        res["loadavg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return res
    finally:
        out.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- summary
def summarize(run: dict, warmup: int) -> dict:
    """Median (and max) per stage and end to end over the frames after the warm-up."""
    timed = run["frames"][warmup:]
    stages = {}
    for s in STAGES:
        vals = [f["stages"][s] for f in timed if s in f["stages"]]
        stages[s] = statistics.median(vals) if vals else None
    totals = [f["total_s"] for f in timed]
    return {"stages": stages, "median_s": statistics.median(totals), "max_s": max(totals),
            "cpu_median_s": statistics.median(f["cpu_s"] for f in timed),
            "first_frame_s": run["frames"][0]["total_s"], "loadavg": run.get("loadavg"),
            "min_s": min(totals), "n_timed": len(timed), "accepted": sum(bool(f["accepted"]) for f in timed),
            "peak_rss": run["peak_rss"], "n_stacked": run["n_stacked"],
            "spool_write_median_s": statistics.median(run["spool_write_s"]) if run.get("spool_write_s") else None,
            "resolution": run.get("resolution"),
            "spool_bytes_median": statistics.median(run["spool_bytes"]) if run.get("spool_bytes") else None,
            "checkpoint_bytes": run.get("checkpoint_bytes"), "checkpoint_s": run.get("checkpoint_s"),
            "snapshot_bytes": run.get("snapshot_bytes"),
            "raw_bytes": run.get("raw_bytes")}


def live_settings_line(overrides: dict) -> str:
    """The LiveSettings the live worker ran with (defaults plus overrides) in one line."""
    import dataclasses

    from daemon.pipeline.live import LiveSettings

    st = dataclasses.asdict(LiveSettings(**overrides))
    keys = [k for k in ("debayer", "interpolation", "reject", "kappa", "warmup", "weighting", "registration_model")
            if k in st]
    return ", ".join(f"{k}={st[k]}" for k in keys) + (f" (overridden: {overrides})" if overrides else "")


def machine_info() -> dict:
    cpu = "unknown"
    flags: list[str] = []
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = [f for f in value.split() if f in ("avx2", "avx512f", "fma", "neon", "asimd")]
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
    except OSError:
        pass
    import cv2
    import scipy

    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "MKL_", "NUMEXPR", "GOTO", "NVPL"))}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit, "cpu": cpu, "cpu_mhz": mhz, "cpu_flags": flags, "machine": platform.machine(),
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
        "scipy": scipy.__version__, "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(),
        "blas_env": env or "none set (OPENBLAS_CORETYPE unset)",
    }


def machine_line(m: dict) -> str:
    mhz = f" @ {m['cpu_mhz']:.0f} MHz" if m.get("cpu_mhz") else ""
    blas = m["blas_env"] if isinstance(m["blas_env"], str) else ", ".join(f"{k}={v}" for k, v in m["blas_env"].items())
    return (f"{m['cpu']}{mhz} ({'/'.join(m['cpu_flags'])}), {m['usable_cores']} cores, {m['memory_gb']} GB, "
            f"{m['machine']}; Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}, "
            f"OpenCV {m['opencv']} ({m['opencv_threads']} threads); BLAS env: {blas}; commit {m.get('commit')}")


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1e3:.1f} ms" if v < 0.01 else f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def _gb(v: int) -> str:
    return f"{v / 1e9:.2f} GB"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.0f} MB" if v >= 1e7 else f"{v / 1e6:.1f} MB"


def markdown(results: list[dict], machine: dict, args_line: str, settings_line: str = "defaults") -> str:
    lines = [f"Machine: {machine_line(machine)}", "", f"Command: `{args_line}`", "",
             f"Live settings: {settings_line}", ""]
    lines += ["| size | mode | stack resolution live / naive | live s/frame median (max) | live CPU s/frame | "
              "first frame | naive s/frame | speed-up | live peak RSS | naive peak RSS | spool written/frame | "
              "checkpoint share/frame (snapshot) | written/frame over raw | stacked live/naive | "
              "load avg live/naive | targets |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        live, naive = r["live"], r["naive"]
        ratio = naive["median_s"] / live["median_s"]
        r["ratio"] = ratio
        key = (r["size"], r["mode"])
        full = live.get("resolution") == r["size"]
        checks = []
        if key in TARGET_RATIO and full:
            t = TARGET_RATIO[key]
            checks.append(f"x{t:.0f} {'ok' if ratio >= t else 'MISS'}")
        if key in TARGET_S and full:
            t = TARGET_S[key]
            checks.append(f"<= {t} s {'ok' if live['median_s'] <= t else 'MISS'}")
        if key in TARGET_RSS and full:
            t = TARGET_RSS[key]
            checks.append(f"RSS <= {t / 1e9:.1f} GB {'ok' if live['peak_rss'] <= t else 'MISS'}")
        spool_b, ckpt_b, raw_b = live.get("spool_bytes_median"), live.get("checkpoint_bytes"), live.get("raw_bytes")
        over_raw = (spool_b or 0) / raw_b + (ckpt_b or 0) / raw_b if raw_b else None
        if key in TARGET_WRITTEN and full and over_raw is not None:
            t = TARGET_WRITTEN[key]
            checks.append(f"written <= {t}x raw {'ok' if over_raw <= t else 'MISS'}")
        first = live.get("first_frame_s")
        warm = live["median_s"]
        if first is not None:
            checks.append(f"first <= {TARGET_FIRST:.0f}x warm {'ok' if first <= TARGET_FIRST * warm else 'MISS'}")
        loads = "/".join(f"{max(x['loadavg']):.1f}" if x.get("loadavg") else "—" for x in (live, naive))
        res = f"{live.get('resolution') or '—'} / {naive.get('resolution') or '—'}"
        lines.append(f"| {r['size']} | {r['mode']} | {res} | {_fmt_s(live['median_s'])} ({_fmt_s(live['max_s'])}) | "
                     f"{_fmt_s(live.get('cpu_median_s'))} | {_fmt_s(first)} | {_fmt_s(naive['median_s'])} | "
                     f"{ratio:.1f}x | {_gb(live['peak_rss'])} | {_gb(naive['peak_rss'])} | {_mb(spool_b)} | "
                     f"{_mb(ckpt_b)} ({_mb(live.get('snapshot_bytes'))}) | "
                     f"{'—' if over_raw is None else f'{over_raw:.2f}x'} | "
                     f"{live['n_stacked']}/{naive['n_stacked']} | {loads} | {'; '.join(checks) or '—'} |")
    lines += ["", "Per stage, median seconds per frame over the timed frames:", "",
              "| size | mode | pipeline | " + " | ".join(STAGES) + " | total |",
              "|---|---|---|" + "---|" * (len(STAGES) + 1)]
    for r in results:
        for name in ("live", "naive"):
            s = r[name]
            cells = " | ".join(_fmt_s(s["stages"][st]) for st in STAGES)
            lines.append(f"| {r['size']} | {r['mode']} | {name} | {cells} | {_fmt_s(s['median_s'])} |")
    lines += ["", "Live \"spool\" is the float16 encoding and the wait for the previous frame's spool write; "
              "the write itself runs on the spool thread, overlapping the next frame, as in the service "
              "(median write time: "
              + ", ".join(f"{r['size']} {r['mode']} {_fmt_s(r['live'].get('spool_write_median_s'))}" for r in results)
              + "). \"checkpoint share/frame\": what checkpoints write per frame of these 30 s exposures (one "
              "checkpoint every 30 s without the stack's statistics, plus their snapshot once every "
              "30 min, its size in brackets); \"written/frame over raw\" is (spool + checkpoint share) over "
              "the raw frame file's size."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES),
                   help="comma-separated WIDTHxHEIGHT list (default: %(default)s)")
    p.add_argument("--frames", type=int, default=10, help="timed frames after the warm-up (>= 10; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (reference + 1; default 2)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--mono", action="store_true", help="mono sessions only")
    mode.add_argument("--osc", action="store_true", help="colour (RGGB) sessions only")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SIZE} unless --sizes is given, 2 timed frames, 1 warm-up, "
                        "sessions in a temporary folder")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-reject", action="store_true", help="live stack without outlier rejection")
    p.add_argument("--debayer", help="LiveSettings.debayer for the live pipeline (default: the pipeline's own)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other LiveSettings field for the live pipeline, e.g. --set interpolation=bilinear "
                        "(value parsed as JSON, else taken as a string)")
    p.add_argument("--sessions", type=Path, default=RESULTS / "sessions",
                   help="where generated sessions are cached (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write all results as JSON here (default: bench/results/<time>.json)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per worker, seconds")
    # Internal: the subprocess workers.
    p.add_argument("--worker", choices=("live", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--session", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-settings", default="{}", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "live":
            # On a thread of its own, as the service runs the pipeline (its "pipeline" executor;
            # glibc gives such a thread its own malloc arena).
            from concurrent.futures import ThreadPoolExecutor

            from daemon.memory import retain_freed_memory

            retain_freed_memory()  # as the service does, before its threads start (daemon.memory)
            with ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pipeline:
                res = pipeline.submit(live_worker, args.session, args.worker_frames,
                                      json.loads(args.worker_settings)).result()
        else:
            res = naive_worker(args.session, args.worker_frames, **json.loads(args.worker_settings))
        args.worker_out.write_text(json.dumps(res))
        return 0

    if args.quick:
        if args.sizes == parser.get_default("sizes"):
            args.sizes = QUICK_SIZE
        if args.frames == parser.get_default("frames"):
            args.frames = 2
        if args.warmup == parser.get_default("warmup"):
            args.warmup = 1
    elif args.frames < 10:
        parser.error("--frames must be >= 10 for a real run (use --quick for a smoke run)")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first frame becomes the reference)")
    sizes = []
    for text in args.sizes.split(","):
        w, h = parse_size(text.strip())
        sizes.append((f"{w}x{h}", w, h))
    modes = ["mono"] if args.mono else ["osc"] if args.osc else ["mono", "osc"]
    settings_kw: dict = {"reject": not args.no_reject}
    if args.debayer:
        settings_kw["debayer"] = args.debayer
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set needs FIELD=VALUE, got {item!r}")
        try:
            settings_kw[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings_kw[key.strip()] = value
    n_total = args.warmup + args.frames

    machine = machine_info()
    print(f"Machine: {machine_line(machine)}", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory(prefix="lb-bench-") if args.quick else None
    sessions_root = Path(tmp.name) if tmp else args.sessions
    results = []
    try:
        for name, w, h in sizes:
            for mode in modes:
                folder = make_session(sessions_root, w, h, BAYER if mode == "osc" else None, n_total)
                print(f"{name} {mode}: live ...", file=sys.stderr)
                live = run_worker("live", folder, n_total, settings_kw, args.timeout)
                entry = {"size": name, "mode": mode, "live_raw": live, "live": summarize(live, args.warmup)}
                print(f"  live median {entry['live']['median_s']:.3f} s, peak RSS {_gb(live['peak_rss'])}",
                      file=sys.stderr)
                if not args.no_naive:
                    print(f"{name} {mode}: naive ...", file=sys.stderr)
                    naive_kw = {"bin2": mode == "osc" and settings_kw.get("debayer") == "superpixel"}
                    naive = run_worker("naive", folder, n_total, naive_kw, args.timeout)
                    entry["naive_raw"] = naive
                    entry["naive"] = summarize(naive, args.warmup)
                    print(f"  naive median {entry['naive']['median_s']:.3f} s", file=sys.stderr)
                results.append(entry)
    finally:
        if tmp:
            tmp.cleanup()

    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.no_naive:
        for r in results:  # a table without the baseline: mark it rather than invent numbers
            r["naive"] = {"stages": {s: None for s in STAGES}, "median_s": float("nan"), "max_s": float("nan"),
                          "peak_rss": 0, "n_stacked": 0}
    table = markdown(results, machine, command.strip(), live_settings_line(settings_kw))
    print(table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "command": command.strip(), "settings": settings_kw,
                               "warmup": args.warmup, "frames": args.frames, "results": results,
                               "table": table}, indent=1, default=str))
    out.with_suffix(".md").write_text(table)
    print(f"results: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
