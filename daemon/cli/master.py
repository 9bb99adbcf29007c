"""`lightbucket master {bias,dark,flat,darkflat} FILES... -o OUT.fits`: build a master frame."""

from __future__ import annotations

import logging

from daemon.io.errors import FrameError

log = logging.getLogger("lightbucket.master")


def add_parser(sub) -> None:
    p = sub.add_parser("master", help="combine bias/dark/flat/darkflat frames into a master",
                       description="Sigma-clipped mean (or median) of calibration frames, read in row "
                                   "bands so large sensors fit in little memory.")
    p.add_argument("kind", choices=("bias", "dark", "flat", "darkflat"))
    p.add_argument("files", nargs="+", metavar="FILE", help="FITS or camera raw frames")
    p.add_argument("-o", "--output", required=True, metavar="OUT.fits")
    p.add_argument("--method", choices=("sigma", "median"), default="sigma")
    p.add_argument("--kappa", type=float, default=3.0, help="sigma-clipping threshold (default 3)")
    p.add_argument("--bias", metavar="B", help="master bias to subtract (darks, flats)")
    p.add_argument("--darkflat", metavar="DF", help="master dark flat to subtract (flats)")
    p.add_argument("--memory-mb", type=float, default=512, help="working memory for combining (MiB)")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon.masters import MasterError, build_master

    try:
        summary = build_master(args.kind, args.files, args.output, method=args.method, kappa=args.kappa,
                               bias=args.bias, darkflat=args.darkflat, memory_mb=args.memory_mb)
    except (FrameError, MasterError, OSError) as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.output}: master {args.kind} of {summary['n_frames']} frames "
          f"({summary['shape'][1]}x{summary['shape'][0]} px, {summary['rejected']} pixels rejected)")
    return 0
