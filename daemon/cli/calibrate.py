"""`lightbucket calibrate LIGHT... [--bias B] [--dark D] [--flat F] [--darkflat DF] -o DIR`."""

from __future__ import annotations

import logging
from pathlib import Path

from daemon.io.errors import FrameError

log = logging.getLogger("lightbucket.calibrate")

#: Cards of the light that no longer describe the calibrated file (rewritten by write_fits).
_DROP = {"ROWORDER", "BAYERPAT", "COLORTYP", "XBAYROFF", "YBAYROFF", "BAYOFFX", "BAYOFFY"}


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate lights with master bias/dark/flat into float32 FITS")
    p.add_argument("lights", nargs="+", metavar="LIGHT", help="FITS or camera raw lights")
    p.add_argument("--bias", metavar="B")
    p.add_argument("--dark", metavar="D")
    p.add_argument("--flat", metavar="F")
    p.add_argument("--darkflat", metavar="DF")
    p.add_argument("--no-defects", action="store_true", help="do not repair hot/cold pixels")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon.io.fits import header_values, open_fits_image, write_fits
    from daemon.io.load import is_fits, load_frame
    from daemon.masters import MasterError, load_masters
    from daemon.pipeline.calibrate import calibrate, dark_scale, mismatch_warnings

    try:
        masters = load_masters(bias=args.bias, dark=args.dark, flat=args.flat, darkflat=args.darkflat,
                               find_defects=not args.no_defects)
    except (FrameError, MasterError) as exc:
        log.error("masters: %s", exc)
        return 1
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for light in args.lights:
        try:
            frame = load_frame(light)
            for note in mismatch_warnings(frame.meta, masters):
                log.warning("%s: %s", light, note)
            data = calibrate(frame.data, frame.meta.exposure_s, masters)
        except (FrameError, ValueError) as exc:
            log.error("%s: %s", light, exc)
            failures += 1
            continue
        header: dict = {}
        if is_fits(light):
            header = {k: v for k, v in header_values(open_fits_image(light).header).items()
                      if k not in _DROP}
        header["BAYERPAT"] = frame.meta.bayer
        header["CALSTAT"] = ("".join(c for c, a in (("B", masters.bias), ("D", masters.dark),
                                                      ("F", masters.flat)) if a is not None), "calibrated with")
        header["DARKSCAL"] = (dark_scale(frame.meta.exposure_s, masters), "dark scale factor")
        header["HISTORY"] = f"lightbucket calibrate: {masters.summary()}"
        out = outdir / (Path(light).stem + ".fits")
        write_fits(out, data, header)
        print(out)
    return 1 if failures else 0
