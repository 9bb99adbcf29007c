"""Plate solving: a frame's detected stars -> its place on the sky, with astrometry.net.

Why from the star list and not the image: the pipeline has already measured the stars
(`daemon.pipeline.stars`), so the solver gets an xylist (a FITS table of x, y, flux) and
skips its own source extraction; a solve then costs the index search only. Why
`solve-field` as a subprocess and not its library: it runs in its own process group with a
CPU limit AND a wall-clock kill, so a search that does not converge is an answer ("no
solution within 8 s") and never a stuck thread, and nothing in this process can crash with it.

Conventions: star positions are the pipeline's (x = column, y = row, 0-based, centre of the
first pixel at 0, 0, rows top-down as the loader gives them); the WCS cards returned follow
FITS (1-based CRPIX) for that same array, so `astropy.wcs.WCS(cards)` with origin 0 maps the
pipeline's x, y to RA, Dec. The fit is a linear TAN (`--tweak-order 1`): it maps exactly
through the binning, flips and scalings a stack applies (`daemon.wcs`).

Failure modes (all a `Solution(ok=False, reason=...)`): too few stars, solve-field not
installed, no index file for the field, no solution within the time limit.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from daemon import wcs as wcsmath
from daemon.pipeline.stars import measure

#: Fewer stars than this cannot make two quads: not worth a search.
MIN_STARS = 6
#: The brightest stars kept in the xylist (the search looks at the brightest first anyway).
MAX_STARS = 300
#: Frames up to this many pixels are searched for stars at full resolution (`solve_frame`).
DETECT_FULL_PIXELS = 8_000_000
#: `nice`, when there is one: solve-field runs below the stacking worker's priority.
NICE = shutil.which("nice")
#: The WCS cards kept from solve-field's answer (linear TAN).
WCS_KEYS = ("CTYPE1", "CTYPE2", "EQUINOX", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
            "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CUNIT1", "CUNIT2", "LONPOLE", "LATPOLE")


def solver_installed() -> bool:
    """True when astrometry.net's `solve-field` is on PATH."""
    return shutil.which("solve-field") is not None


@dataclass(frozen=True)
class SolveHints:
    """What is known before solving; every field optional.

    ra_deg, dec_deg: where the frame is thought to point (J2000, degrees); radius_deg: how
    far from there to search (degrees). scale_arcsec_px: expected pixel scale of the star
    list's pixels; scale_error: its fractional uncertainty (0.15 = +-15 %).
    """

    ra_deg: float | None = None
    dec_deg: float | None = None
    radius_deg: float = 5.0
    scale_arcsec_px: float | None = None
    scale_error: float = 0.15


def hints_from_meta(meta, radius_deg: float = 5.0, scale_factor: float = 1.0) -> SolveHints:
    """Hints from a `FrameMeta` (header RA/DEC or OBJCTRA/OBJCTDEC, FOCALLEN and the binned
    pixel size). scale_factor: star-list pixels per frame pixel scale ratio (2 when the list
    is in 2x2 superpixels)."""
    scale = meta.plate_scale_arcsec
    return SolveHints(ra_deg=meta.ra_deg, dec_deg=meta.dec_deg, radius_deg=radius_deg,
                      scale_arcsec_px=None if scale is None else scale * scale_factor)


@dataclass(frozen=True)
class Solution:
    """A solve's answer. Angles in degrees (J2000), scale in arcsec per pixel.

    ra_deg/dec_deg: the sky position of the frame's centre pixel; rotation_deg: astrometry.net's
    "up is N degrees E of N"; parity: "pos" or "neg" as astrometry.net names it (neg: det CD > 0).
    wcs: linear TAN cards for the frame's pixel grid (see the module docstring); reason: why not,
    when ok is False.
    """

    ok: bool
    reason: str = ""
    ra_deg: float | None = None
    dec_deg: float | None = None
    scale_arcsec_px: float | None = None
    rotation_deg: float | None = None
    parity: str | None = None
    wcs: dict[str, Any] | None = None
    width: int = 0
    height: int = 0
    n_stars: int = 0
    elapsed_s: float = 0.0
    index: str | None = field(default=None, compare=False)

    def as_dict(self, path: str | None = None) -> dict:
        """The JSON record (`lightbucket solve --json`, MQTT): exactly the documented keys."""
        return {"path": path, "ok": self.ok, "ra_deg": self.ra_deg, "dec_deg": self.dec_deg,
                "scale_arcsec_px": self.scale_arcsec_px, "rotation_deg": self.rotation_deg,
                "parity": self.parity, "reason": self.reason or None}


def solution_from_wcs(cards: Mapping[str, Any], width: int, height: int, **extra) -> Solution:
    """A `Solution` describing WCS `cards` on a width x height pixel grid."""
    ra, dec = wcsmath.center(cards, width, height)
    return Solution(ok=True, ra_deg=ra, dec_deg=dec, scale_arcsec_px=wcsmath.scale_arcsec(cards),
                    rotation_deg=wcsmath.rotation_deg(cards), parity=wcsmath.parity(cards),
                    wcs=dict(cards), width=width, height=height, **extra)


def write_xylist(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, flux: np.ndarray | None,
                 width: int, height: int, max_stars: int = MAX_STARS) -> int:
    """Write an astrometry.net xylist: a FITS binary table X, Y (FITS 1-based), FLUX.

    Parameters
    ----------
    path : file to write (overwritten).
    x, y : star positions, pipeline convention (0-based, px).
    flux : brightness for ordering (None: keep the given order).
    width, height : the frame's size (px), written as IMAGEW/IMAGEH.
    max_stars : keep only this many of the brightest.

    Returns the number of rows written. Rows are sorted brightest first.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    f = np.ones_like(x) if flux is None else np.asarray(flux, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(f)
    x, y, f = x[keep], y[keep], f[keep]
    order = np.argsort(-f, kind="stable")[:max_stars]
    cols = [fits.Column(name="X", format="D", array=x[order] + 1.0),
            fits.Column(name="Y", format="D", array=y[order] + 1.0),
            fits.Column(name="FLUX", format="D", array=f[order])]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["IMAGEW"] = int(width)
    hdu.header["IMAGEH"] = int(height)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    return int(order.size)


def solve_field_args(xyls: str, out_dir: str, width: int, height: int, hints: SolveHints,
                     cpulimit_s: int, config: str | None = None) -> list[str]:
    """The solve-field command line for an xylist (pure; see `solve_stars`)."""
    args = ["solve-field", xyls, "--width", str(int(width)), "--height", str(int(height)),
            "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
            "--dir", out_dir, "--temp-dir", out_dir, "--overwrite", "--no-plots",
            "--no-verify", "--tweak-order", "1", "--crpix-center", "--cpulimit", str(int(cpulimit_s)),
            "--new-fits", "none", "--index-xyls", "none", "--rdls", "none", "--corr", "none",
            "--match", "none", "--wcs", str(Path(out_dir) / "solution.wcs"),
            "--solved", str(Path(out_dir) / "solution.solved")]
    if config:
        args += ["--config", config]
    if hints.scale_arcsec_px:
        lo = hints.scale_arcsec_px * (1.0 - hints.scale_error)
        hi = hints.scale_arcsec_px * (1.0 + hints.scale_error)
        args += ["--scale-units", "arcsecperpix", "--scale-low", f"{lo:.4f}", "--scale-high", f"{hi:.4f}"]
    if hints.ra_deg is not None and hints.dec_deg is not None:
        args += ["--ra", f"{hints.ra_deg % 360.0:.6f}", "--dec", f"{hints.dec_deg:.6f}",
                 "--radius", f"{hints.radius_deg:.3f}"]
    return args


def _run(args: list[str], wall_s: float) -> tuple[int | None, str]:
    """Run in a new process group at a lower CPU priority (`nice`, so a solve never slows the
    stacking worker it shares the cores with); kill the whole group after wall_s seconds.
    Returns (exit status, or None when killed; the output)."""
    if NICE is not None:
        args = [NICE, "-n", "10", *args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=wall_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return None, out or ""


def solve_stars(x, y, flux, width: int, height: int, hints: SolveHints | None = None, *,
                time_limit_s: float = 10.0, config: str | None = None,
                started: float | None = None) -> Solution:
    """Solve a star list with astrometry.net's solve-field.

    Parameters
    ----------
    x, y : star positions (px, pipeline convention), any order.
    flux : brightness (same length), or None.
    width, height : frame size (px) the positions belong to.
    hints : position and scale hints (`SolveHints`); None: a blind solve (slow).
    time_limit_s : the answer comes within this many seconds (solve-field's --cpulimit, and
        the whole process group killed when the wall clock reaches it).
    config : an astrometry.net config file (index paths); None: the system's.
    started : the `time.monotonic()` the time limit counts from (default: now), so that a
        caller's own work (the star detection) is inside the limit.

    Returns a `Solution`; never raises for a frame that does not solve.
    """
    t0 = time.monotonic() if started is None else started
    hints = hints or SolveHints()
    n = int(np.count_nonzero(np.isfinite(np.asarray(x, dtype=float))))
    if n < MIN_STARS:
        return Solution(ok=False, reason=f"{n} stars detected, at least {MIN_STARS} needed",
                        width=width, height=height, n_stars=n, elapsed_s=time.monotonic() - t0)
    if not solver_installed():
        return Solution(ok=False, reason="astrometry.net's solve-field is not installed",
                        width=width, height=height, n_stars=n)
    cpulimit = max(1, int(math.ceil(time_limit_s)))
    with tempfile.TemporaryDirectory(prefix="lightbucket-solve-") as tmp:
        xyls = str(Path(tmp) / "stars.xyls")
        n = write_xylist(xyls, x, y, flux, width, height)
        budget = max(0.5, time_limit_s - (time.monotonic() - t0))
        rc, out = _run(solve_field_args(xyls, tmp, width, height, hints, cpulimit, config), wall_s=budget)
        elapsed = time.monotonic() - t0
        wcs_path = Path(tmp) / "solution.wcs"
        if rc is None:
            reason = f"no solution within {time_limit_s:g} s (killed)"
        elif (Path(tmp) / "solution.solved").exists() and wcs_path.exists():
            header = fits.getheader(wcs_path)
            cards = {k: header[k] for k in WCS_KEYS if k in header}
            for k in ("CTYPE1", "CTYPE2"):  # order 1: no SIP terms, and none are kept
                cards[k] = str(cards.get(k, "RA---TAN" if k == "CTYPE1" else "DEC--TAN")).replace("-SIP", "")
            index = next((ln.rsplit(" ", 1)[-1].rstrip(".") for ln in out.splitlines()
                          if "solved with index" in ln), None)
            return solution_from_wcs(cards, width, height, n_stars=n, elapsed_s=elapsed, index=index)
        elif rc != 0:
            reason = f"solve-field failed (exit {rc}): {_last_line(out)}"
        elif "CPU time limit" in out or elapsed >= cpulimit:
            reason = f"no solution within {time_limit_s:g} s"
        else:
            reason = f"no solution from {n} stars (no index matched{_hint_text(hints)})"
    return Solution(ok=False, reason=reason, width=width, height=height, n_stars=n, elapsed_s=elapsed)


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _hint_text(h: SolveHints) -> str:
    parts = []
    if h.scale_arcsec_px:
        parts.append(f"scale {h.scale_arcsec_px:.2f}\"/px +-{h.scale_error:.0%}")
    if h.ra_deg is not None and h.dec_deg is not None:
        parts.append(f"within {h.radius_deg:g} deg of {h.ra_deg:.3f} {h.dec_deg:+.3f}")
    return f"; hints: {', '.join(parts)}" if parts else "; no hints"


def solve_frame(frame, hints: SolveHints | None = None, *, time_limit_s: float = 10.0,
                stars=None, config: str | None = None) -> Solution:
    """Measure (unless `stars` given) and solve one `Frame`; hints default to its header's.

    Stars are detected with `daemon.pipeline.stars.measure` (full-resolution positions), so
    the returned WCS is for the frame's own pixel grid. time_limit_s bounds the whole call,
    the detection included.
    """
    t0 = time.monotonic()
    h, w = frame.data.shape[:2]
    if stars is None:
        # Full-resolution detection up to DETECT_FULL_PIXELS: a binned detection image loses
        # the small stars of a short, sharp frame (a 1.5 px FWHM simulator star vanishes).
        k = 1 if h * w <= DETECT_FULL_PIXELS else None
        stars, _ = measure(frame.data, bayer=frame.meta.bayer, plate_scale=frame.meta.plate_scale_arcsec,
                           bin_factor=k)
    hints = hints or hints_from_meta(frame.meta)
    return solve_stars(stars.x, stars.y, stars.flux, w, h, hints, time_limit_s=time_limit_s, config=config,
                       started=t0)
