"""The benchmark's synthetic sessions: dithered star fields as the camera writes them.

Each session is generated once with `daemon.simulate` (dithered and slightly rotated star
field, hot pixels, vignetting, one satellite trail, a Bayer mosaic for colour) as uint16
FITS files carrying the headers INDI writes (`simulate.fits_header`), plus noise-free
master bias/dark/flat/defects, and cached under bench/results/sessions/ (git-ignored).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

from daemon import simulate as sim

SESSION_VERSION = 2  # bump when the generated sessions change
EXPOSURE_S = 30.0
BAYER = "RGGB"


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
    return sim.Sensor(bias_adu=500.0, dark_current_adu_s=0.2, read_noise_adu=3.0,
                  n_hot_pixels=max(10, w * h // 20000), hot_pixel_adu_s=50.0,
                  bayer=bayer, vignetting=0.2)


def _frame_job(args: tuple) -> None:
    """Render and write one light frame (runs in a pool worker)."""
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
