"""`lightbucket solve FILES... [--json]`: plate-solve frames with astrometry.net.

Detects the stars of each frame (as the pipeline does) and solves that star list with
`solve-field`, hinted by the header (RA/DEC or OBJCTRA/OBJCTDEC, FOCALLEN, pixel size and
binning) unless --ra/--dec/--scale are given. Prints per frame the centre (RA, Dec), the pixel
scale, rotation and parity, or why it did not solve. With --json, one JSON object per frame
(JSON Lines) with exactly the keys path, ok, ra_deg, dec_deg, scale_arcsec_px, rotation_deg,
parity, reason. Exit status: 0 all solved, 1 some frame did not.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from daemon.cli.register import _clean


def add_parser(sub) -> None:
    p = sub.add_parser("solve", help="plate-solve frames (astrometry.net)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("frames", nargs="+", metavar="FILE", help="FITS or raw frames")
    p.add_argument("--json", action="store_true", help="one JSON object per frame on stdout")
    p.add_argument("--ra", type=float, metavar="DEG", help="RA hint, degrees J2000 (default: header)")
    p.add_argument("--dec", type=float, metavar="DEG", help="Dec hint, degrees J2000 (default: header)")
    p.add_argument("--radius", type=float, default=5.0, metavar="DEG",
                   help="search radius around the position hint, degrees (default 5)")
    p.add_argument("--scale", type=float, metavar="ARCSEC",
                   help="pixel scale hint, arcsec/px (default: FOCALLEN and pixel size)")
    p.add_argument("--scale-error", type=float, default=0.15, metavar="FRACTION",
                   help="fractional uncertainty of the scale hint (default 0.15)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S",
                   help="give up on a frame after this many seconds (default 10)")
    p.set_defaults(func=run)


def _text(path: str, rec: dict) -> str:
    if not rec["ok"]:
        return f"{path}: NOT SOLVED: {rec['reason']}"
    return (f"{path}: RA {rec['ra_deg']:.5f} Dec {rec['dec_deg']:+.5f}  scale "
            f"{rec['scale_arcsec_px']:.3f}\"/px  up is {rec['rotation_deg']:.2f} deg E of N  "
            f"parity {rec['parity']}")


def run(args) -> int:
    from daemon.io.load import load_frame  # the pipeline's numba kernels load with it
    from daemon.solve import hints_from_meta, solve_frame

    failed = 0
    for path in args.frames:
        try:
            frame = load_frame(path)
        except (ValueError, OSError) as exc:
            rec = {"path": path, "ok": False, "ra_deg": None, "dec_deg": None, "scale_arcsec_px": None,
                   "rotation_deg": None, "parity": None,
                   "reason": f"unreadable: {getattr(exc, 'reason', None) or exc}"}
        else:
            hints = replace(hints_from_meta(frame.meta, radius_deg=args.radius), scale_error=args.scale_error)
            if args.ra is not None and args.dec is not None:
                hints = replace(hints, ra_deg=args.ra, dec_deg=args.dec)
            if args.scale:
                hints = replace(hints, scale_arcsec_px=args.scale)
            rec = solve_frame(frame, hints, time_limit_s=args.time_limit).as_dict(path)
        failed += not rec["ok"]
        rec = _clean(rec)
        print(json.dumps(rec) if args.json else _text(path, rec), file=sys.stdout, flush=True)
    return 1 if failed else 0
