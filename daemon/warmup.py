"""Compile (or load from numba's cache) every kernel a night uses, before the first frame.

Why: the pipeline's numba kernels are compiled on first call and cached on disk
(`cache=True`): without a warm cache the first frame of the night waits for the compiler
(tens of seconds, minutes on a Pi), and again after every upgrade; with a warm cache it
still waits for each kernel to be loaded from disk, which costs a first frame about as much
again as the whole frame. numba compiles per type signature, not per frame size, so a few
tiny synthetic frames through the same code paths as a real night (FITS decode, calibration
with masters, star detection, registration, the fused full-resolution colour path and the
whole-frame one, superpixel, mono, the warm-up re-check, spool encoding, preview, the final
re-stack and Bayer drizzle) leave every kernel compiled, cached and loaded.

`scripts/bootstrap.sh` runs `python -m daemon.warmup` after installing (the cache beside
the code, or NUMBA_CACHE_DIR) so that no start compiles; numba compiles on one core, so the
work is shared out by path (`PARTS`) between a process per core, as memory allows
(`compile_parallel`). The daemon calls `ensure_warm()`
before it reports READY, which loads every kernel into the process (compiling what the
cache lacks), so the first frame runs as the tenth does. Under systemd NUMBA_CACHE_DIR
(the unit's /var/cache/lightbucket) must be writable by the service, or every start
compiles again. Failure mode: an exception from the pipeline propagates (a broken install
should not report READY); nothing is left on disk but numba's cache and the stamp.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numba
import numpy as np

log = logging.getLogger(__name__)

_SHAPE = (96, 128)
#: True once `ensure_warm` ran the warm-up in this process.
_loaded = False


def _frames(bayer: str | None, n: int) -> list[np.ndarray]:
    from daemon.simulate import Exposure, Sensor, expose, random_star_field, transform_matrix

    field = random_star_field(_SHAPE, 40, seed=7, margin=0.12, flux_range=(3000.0, 30000.0))
    sensor = Sensor(bias_adu=300.0, dark_current_adu_s=0.1, read_noise_adu=3.0, bayer=bayer)
    out = []
    for i in range(n):
        m = None if i == 0 else transform_matrix(1.3 * i, -0.9 * i, 0.2 * i, center=(64, 48))
        out.append(expose(_SHAPE, field, Exposure(exposure_s=10.0, matrix=m, fwhm_px=2.5, seed=i), sensor))
    return out


def _write_fits(path: Path, data: np.ndarray, bayer: str | None) -> None:
    from astropy.io import fits

    from daemon.simulate import fits_header

    header = fits.Header()
    for k, v in fits_header(exposure_s=10.0, bayer=bayer).items():
        header[k] = v
    fits.PrimaryHDU(data=data, header=header).writeto(path, overwrite=True)


#: The night's paths the warm-up runs, each on its own frames: name -> (CFA pattern, live
#: settings). With "stack-end" (the end of the stack's warm-up bookkeeping) they are the parts
#: `warm_up` runs, in this order, and that `compile_parallel` shares out between processes.
_PIPELINES: dict[str, tuple[str | None, dict]] = {
    "colour": ("RGGB", {}),
    "colour-unfused": ("RGGB", {"fused": False}),
    "mono": (None, {}),
    "drizzle": ("RGGB", {"debayer": "drizzle"}),
    "superpixel": ("RGGB", {"debayer": "superpixel"}),
}
#: Every part, the costliest to compile first (so that a pool of processes given them in this
#: order ends them about together).
PARTS = ("colour", "colour-unfused", "mono", "stack-end", "drizzle", "superpixel")


def warm_up(parts: tuple[str, ...] = PARTS) -> float:
    """Run every kernel of `parts` (default all: every kernel a night uses) once on tiny
    frames; returns the seconds it took (compiling, or loading the cache). ValueError for an
    unknown part."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown warm-up part(s) {unknown}; known: {list(PARTS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightbucket-warmup-") as tmp:
        for part in parts:
            if part == "stack-end":
                _stack_end()
            else:
                _pipeline(Path(tmp) / part, *_PIPELINES[part])
    return time.perf_counter() - t0


def _pipeline(root: Path, bayer: str | None, settings: dict) -> None:
    """Six frames through the live pipeline as the service runs them (FITS decode, calibration
    with masters, detection, registration, stacking, spool, preview), then the final re-stack."""
    from daemon.io.load import FrameLoader
    from daemon.pipeline.calibrate import Masters
    from daemon.pipeline.live import LivePipeline
    from daemon.pipeline.live_settings import LiveSettings
    from daemon.pipeline.restack import restack
    from daemon.products import preview_jpeg
    from daemon.spool import Spool, encode

    root.mkdir(parents=True)
    n = 6  # > the stack's warm-up (4 here), so its re-check and steady pass run too
    paths = []
    for i, data in enumerate(_frames(bayer, n)):
        p = root / f"frame_{i}.fits"
        _write_fits(p, data, bayer)
        paths.append(p)
    masters = Masters(bias=np.full(_SHAPE, 300.0, np.float32), dark=np.full(_SHAPE, 1.0, np.float32),
                      dark_exposure_s=10.0, flat=np.ones(_SHAPE, np.float32), bayer=bayer)
    pipe = LivePipeline(LiveSettings(warmup=4, **settings), masters)
    load = FrameLoader()
    spool = Spool(root / "spool")
    for p in paths:
        result = pipe.process(load(str(p)), consume=True)
        if result.accepted and result.registered is not None:
            spool.append(encode(result.registered), weight=result.weight, path=str(p))
        result.registered = None
        image = pipe.stack_image()
        if image is not None:  # downscaled, and as it is (a mono stack's own read-only view)
            for edge in (64, max(image.shape[:2])):
                preview_jpeg(image, max_edge=edge)
    if len(spool):
        restack(*spool.restack_inputs())


def _stack_end() -> None:
    """The end of the stack's warm-up bookkeeping (after 3 x warmup frames), mono and RGB, and
    frames after it (their kernels are compiled for m2 in float32, the warm-up's bfloat16)."""
    from daemon.pipeline.stack import RunningStack, StackSettings

    rng = np.random.default_rng(0)
    for planes in (1, 3):
        stack = RunningStack((8, 8, planes), StackSettings(warmup=4))
        for _ in range(13):
            stack.add(rng.normal(100, 3, (8, 8, planes)).astype(np.float32))
        last = rng.normal(100, 3, (8, 8, planes)).astype(np.float32)
        stack.add_banded(lambda r0, r1, x=last: x[r0:r1].copy(), 4)


#: Memory one compiling process takes at its peak (numba's LLVM): bounds the processes
#: `compile_parallel` starts on a small Pi.
_COMPILER_BYTES = 1 << 30


def compile_jobs(cpus: int | None = None, available_bytes: int | None = None) -> int:
    """Processes to compile in: one per core, no more than the memory available holds (one
    `_COMPILER_BYTES` each) nor than there are parts; at least one."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if available_bytes is None:
        available_bytes = _available_bytes()
    return max(1, min(cpus, available_bytes // _COMPILER_BYTES, len(PARTS)))


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes); where there is none, room for one compiler."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _COMPILER_BYTES


def compile_parallel(jobs: int) -> float:
    """Compile every kernel into numba's cache in `jobs` worker processes, each taking the
    next of `PARTS` as it finishes one (numba compiles on one core: a process per core), then
    load them all in this process with `warm_up`, which compiles what the workers did not
    leave in the cache (two workers saving one kernel's index at once may each keep only its
    own). Returns the seconds of the whole. A part's exception propagates."""
    t0 = time.perf_counter()
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread pools copied
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            for done in [pool.submit(warm_up, (part,)) for part in PARTS]:
                done.result()
    warm_up()
    return time.perf_counter() - t0


def _stamp() -> Path | None:
    """The file that says "warm for this code": in numba's cache folder (NUMBA_CACHE_DIR, else
    beside the pipeline's code), named by a digest of the daemon's sources (path, size,
    mtime), numba's version and the CPU numba compiles for. None when there is no writable
    place for it (then the daemon always warms)."""
    root = Path(__file__).resolve().parent
    folder = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else root / "pipeline" / "__pycache__"
    digest = hashlib.sha256(f"{numba.__version__} {numba.config.CPU_NAME} {numba.config.CPU_FEATURES}".encode())
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        digest.update(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns}".encode())
    if not os.access(folder, os.W_OK):
        return None
    return folder / f"lightbucket-warm-{digest.hexdigest()[:20]}"


def ensure_warm() -> float | None:
    """Every kernel loaded into this process, as the daemon needs it before READY: from
    numba's cache (`warm_up`), or, where this code was not warmed into this cache yet (no
    `_stamp`: bootstrap skipped, or the code upgraded without it), compiled first in worker
    processes side by side (`compile_parallel`). Returns the seconds it took when it
    compiled (the stamp is then written), None when the cache was known warm and the
    kernels were only loaded."""
    global _loaded
    stamp = _stamp()
    warm = stamp is not None and stamp.exists()
    if warm and _loaded:
        return None  # this process has every kernel already (a second service in one process)
    if warm:
        warm_up()
        _loaded = True
        return None
    seconds = compile_parallel(compile_jobs())
    _loaded = True
    if stamp is not None:
        try:
            stamp.write_text(f"{seconds:.1f} s\n")
        except OSError:  # advisory: the next start says it compiled again
            pass
    return seconds


def main() -> int:
    """`python -m daemon.warmup`: warm numba's cache for the installed code (bootstrap)."""
    from daemon.cli import ensure_numba_cache

    ensure_numba_cache()
    logging.basicConfig(level=logging.WARNING)
    jobs = compile_jobs()
    seconds = compile_parallel(jobs)
    stamp = _stamp()
    if stamp is not None:
        stamp.write_text(f"{seconds:.1f} s\n")
    print(f"lightbucket: numba kernels compiled and cached ({seconds:.1f} s, {jobs} process{'es' if jobs > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
