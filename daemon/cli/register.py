"""`lightbucket register FRAMES... [--reference F] [--json]`: align frames to a reference.

Prints per frame the transform (dx, dy in px, rotation in degrees, scale), matched stars,
RMS residual and the star metrics, or the reason the frame failed. With --json, one JSON
object per frame on stdout (JSON Lines) with the 3x3 `matrix` mapping the frame's pixel
coordinates (x = column, y = row, 0-based, centre of the first pixel at 0, 0) onto the
reference's. Exit status: 0 all registered, 1 some frame failed, 2 the reference failed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "register",
        help="measure stars and align frames to a reference",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("frames", nargs="+", metavar="FRAME", help="FITS or raw frames")
    p.add_argument("--reference", metavar="F", help="reference frame (default: the first FRAME)")
    p.add_argument("--json", action="store_true", help="one JSON object per frame on stdout")
    p.add_argument("--model", choices=("similarity", "affine", "homography"), default="similarity",
                   help="transform model fitted to the matched stars (default: similarity)")
    p.add_argument("--max-rms", type=float, default=1.0, metavar="PX",
                   help="fail a frame whose residual exceeds this many px RMS (default 1.0)")
    p.set_defaults(func=run)


def _load(path: str):
    from daemon.io.load import load_frame

    return load_frame(path)


def _measure(path: str):
    """(stars, metrics, shape) of one frame, or raise ValueError naming the file and why."""
    from daemon.pipeline.stars import measure

    frame = _load(path)
    stars, metrics = measure(frame.data, bayer=frame.meta.bayer, plate_scale=frame.meta.plate_scale_arcsec)
    return stars, metrics


def _clean(value):
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _text_line(rec: dict) -> str:
    name = Path(rec["path"]).name
    m = rec.get("metrics") or {}
    stars = (f"stars {m.get('n_stars', '-')}  FWHM {_fmt(m.get('fwhm_px'), '.2f', ' px')}"
             + (f" ({m['fwhm_arcsec']:.2f}\")" if m.get("fwhm_arcsec") else "")
             + f"  ecc {_fmt(m.get('eccentricity'), '.2f')}  bkg {_fmt(m.get('background'), '.1f')}"
             f"  noise {_fmt(m.get('noise'), '.2f')} ADU") if m else ""
    if not rec["ok"]:
        return f"{name}: FAILED: {rec['reason']}" + (f"  [{stars}]" if stars else "")
    flip = "  MIRRORED" if rec.get("mirrored") else ""
    return (f"{name}: dx {rec['dx']:+.2f} px  dy {rec['dy']:+.2f} px  rot {rec['rotation_deg']:+.3f} deg"
            f"  scale {rec['scale']:.5f}  matched {rec['n_matched']}  rms {rec['rms_px']:.3f} px{flip}"
            f"  [{stars}]")


def run(args) -> int:
    from daemon.pipeline.align import register

    ref_path = args.reference or args.frames[0]
    out = sys.stdout
    try:
        ref_stars, _ = _measure(ref_path)
    except (ValueError, OSError) as exc:
        print(f"lightbucket register: reference {ref_path}: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"reference {ref_path}: {len(ref_stars)} stars used of {ref_stars.n_total}", file=out)
    failed = 0
    for path in args.frames:
        rec: dict = {"path": path}
        try:
            stars, metrics = _measure(path)
        except (ValueError, OSError) as exc:
            rec.update(ok=False, reason=f"unreadable: {getattr(exc, 'reason', None) or exc}", matrix=None,
                       metrics=None)
        else:
            reg = register(stars, ref_stars, model=args.model, max_rms_px=args.max_rms)
            rec.update(reg.as_dict())
            rec["metrics"] = metrics.as_dict()
        failed += not rec["ok"]
        rec = _clean(rec)
        if args.json:
            print(json.dumps(rec), file=out, flush=True)
        else:
            print(_text_line(rec), file=out, flush=True)
    return 1 if failed else 0
