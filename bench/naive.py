"""The naive baseline: what a user with numpy, astropy, OpenCV and astroalign writes first."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.sessions import load_master_arrays, session_paths
from bench.timing import StageTimer, _cpu_s, _rss_bytes, just_written


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
    # The bench extra's astroalign, imported here so that `bench.run --no-naive` runs without it.
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
