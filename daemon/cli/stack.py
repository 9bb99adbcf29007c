"""`lightbucket stack`: stack light frames exactly as the daemon does, frame by frame.

    lightbucket stack LIGHTS... [--bias PATH] [--dark PATH] [--flat PATH] [--darkflat PATH]
                      -o OUT.fits [--preview OUT.jpg] [--final] [--set key=value ...]

LIGHTS are files or folders (their image files, sorted by name). A calibration PATH is a
master file or a folder of raw frames, built into a master (and cached) by daemon.masters.
The reference is the best frame of the set (most stars, smallest FWHM). Frames of different
exposures are never stacked together: a mixed folder gives one stack per exposure, named
after -o (stack.fits -> stack_60s.fits, stack_2s.fits). Each frame gets a line (stars,
FWHM, shift, accepted or rejected and why); each stack ends with a summary. --final spools
the registered frames and writes the winsorized sigma-clipped re-stack instead of the live
stack. When astrometry.net is installed the reference frame is plate-solved (on a thread of its
own, while the frames stack) and the stack's WCS is the solve's (PLTSOLVD = T); --no-solve
keeps the reference header's WCS, if any.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from daemon.io.formats import format_of
from daemon.watcher import is_candidate


def add_parser(sub) -> None:
    p = sub.add_parser("stack", help="live-stack light frames into a 32-bit FITS (+ preview)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lights", nargs="+", type=Path, metavar="LIGHTS", help="light frames or folders of them")
    for kind in ("bias", "dark", "flat", "darkflat"):
        p.add_argument(f"--{kind}", type=Path, metavar="PATH",
                       help=f"master {kind} file or folder of raw {kind} frames")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.fits", help="stacked FITS to write")
    p.add_argument("--preview", type=Path, metavar="OUT.jpg", help="auto-stretched preview (.jpg or .png)")
    p.add_argument("--final", action="store_true",
                   help="re-stack all registered frames with winsorized sigma clipping at the end")
    p.add_argument("--no-solve", action="store_true",
                   help="do not plate-solve the reference frame (the stack keeps its header's WCS)")
    p.add_argument("--spool", type=Path, metavar="DIR", help="keep the spooled frames here (default: temporary)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [stack]/[quality] setting, e.g. --set kappa=2.5 (repeatable)")
    p.set_defaults(func=run)


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders as their frame files (the loader's suffixes), sorted by name.
    Other files in a folder are named on stderr, never dropped without a word (a frame's
    companions, hidden and temporary files excepted)."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        files = sorted(f for f in p.iterdir() if f.is_file() and is_candidate(f))
        out.extend(f for f in files if format_of(f))
        other = [f.name for f in files if not format_of(f)]
        if other:
            print(f"{p}: {len(other)} files not read (not a frame format: "
                  f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''})", file=sys.stderr, flush=True)
    return out


def _settings(overrides: list[str]):
    """LiveSettings from `--set` items, parsed as the daemon's `--set` is (daemon.config:
    `stack.kappa=2.5`, the value as TOML); a bare key (`kappa=2.5`) is looked up in [stack],
    then [quality]. Exits naming the item when a key or value is refused."""
    from daemon.config import ConfigError, parse_override
    from daemon.pipeline.quality import QualitySettings
    from daemon.session import live_settings_from

    quality_keys = {f.name for f in dataclasses.fields(QualitySettings)}
    tables: dict[str, dict] = {"stack": {}, "quality": {}}
    for item in overrides:
        text = item if "." in item.partition("=")[0] else f"_.{item}"
        try:
            section, key, value = parse_override(text)
        except ConfigError as exc:
            raise SystemExit(f"lightbucket stack: {exc}") from None
        if section == "_":
            section = "quality" if key in quality_keys else "stack"
        if section not in tables:
            raise SystemExit(f"lightbucket stack: --set {item!r}: only [stack] and [quality] settings apply here")
        tables[section][key] = value
    try:
        return live_settings_from(tables["stack"], tables["quality"], "--set")
    except ValueError as exc:
        raise SystemExit(f"lightbucket stack: {exc}") from None


def cache_dir() -> Path:
    """Where masters built from folders are kept: $XDG_CACHE_HOME/lightbucket/masters."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightbucket" / "masters"


def _cached_master(kind: str, folder: Path, bias: Path | None, darkflat: Path | None) -> Path:
    """Build the master of a folder of raw frames once; later runs find it by a key made of
    the files' names, sizes and times and the masters subtracted on the way."""
    from daemon.masters import build_master

    files = _expand([folder])
    if not files:
        raise SystemExit(f"lightbucket stack: --{kind} {folder}: no image files in the folder")
    key = hashlib.sha1(kind.encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for extra in (bias, darkflat):
        key.update(f"{extra.resolve() if extra else '-'}\n".encode())
    out = cache_dir() / f"{kind}-{key.hexdigest()[:16]}.fits"
    if out.exists():
        print(f"master {kind}: {len(files)} frames in {folder} -> cached {out}", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = build_master(kind, files, out, bias=bias, darkflat=darkflat)
    print(f"master {kind}: built from {summary.get('n_frames', len(files))} frames in {folder} -> {out}",
          flush=True)
    return out


def _masters(args):
    paths = {k: getattr(args, k) for k in ("bias", "dark", "flat", "darkflat") if getattr(args, k)}
    if not paths:
        return None, {}
    from daemon.io.load import FrameError
    from daemon.masters import MasterError, load_masters

    for kind, path in paths.items():
        if not path.exists():
            raise SystemExit(f"lightbucket stack: --{kind} {path}: no such file or folder")
    files: dict[str, Path] = {}
    try:
        # Order matters: the bias goes into darks and flats, the dark-flat into flats.
        for kind in ("bias", "darkflat", "dark", "flat"):
            path = paths.get(kind)
            if path is None:
                continue
            if path.is_dir():
                bias = files.get("bias") if kind != "bias" else None
                darkflat = files.get("darkflat") if kind == "flat" else None
                path = _cached_master(kind, path, bias, darkflat)
            files[kind] = path
        masters = load_masters(**files)
    except (FrameError, MasterError) as exc:
        raise SystemExit(f"lightbucket stack: calibration masters: {exc}") from None
    return masters, {k: str(v) for k, v in paths.items()}


class _GridSolve:
    """The plate solve of a stack's grid frame on a thread of its own, started as soon as the
    grid frame is known, so the frames stack meanwhile; `apply` waits for it (at most its time
    limit) and gives the WCS to the pipeline."""

    def __init__(self, pipe, enabled: bool):
        from daemon.solve import solver_installed

        self.pipe, self.enabled = pipe, enabled and solver_installed()
        self.pending = None

    def ask(self) -> None:
        if not self.enabled or self.pending is not None or (grid := self.pipe.grid_frame()) is None:
            return
        from daemon.config import SolveSettings
        from daemon.reference_solve import solve_grid_frame

        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(sol=solve_grid_frame(grid, SolveSettings())),
                                  name="lightbucket-solve", daemon=True)
        thread.start()
        self.pending = (grid.path, thread, box)

    def apply(self) -> None:
        if self.pending is None:
            return
        path, thread, box = self.pending
        thread.join()
        sol = box.get("sol")
        if sol is not None and sol.ok and self.pipe.set_reference_wcs(path, sol.wcs):
            print(f"reference {Path(path).name} solved: RA {sol.ra_deg:.5f} Dec {sol.dec_deg:+.5f}, "
                  f"{sol.scale_arcsec_px:.3f}\"/px, up {sol.rotation_deg:.2f} deg E of N ({sol.elapsed_s:.1f} s)",
                  flush=True)
        else:
            print(f"reference {Path(path).name} not solved: {sol.reason if sol else 'solver error'}; "
                  "the stack keeps its header's WCS", flush=True)


def _line(i: int, n: int, path: Path, r) -> str:
    bar_len = 20
    done = int(bar_len * i / n)
    bar = "#" * done + "-" * (bar_len - done)
    fwhm = f"{r.fwhm_px:5.2f}px" if r.fwhm_px is not None else "   -   "
    shift = (f"shift ({r.dx:+7.1f},{r.dy:+7.1f}) rot {r.rotation_deg:+6.2f}deg"
             if r.dx is not None else "shift        -                  ")
    verdict = f"accepted w={r.weight:.2f}" if r.accepted else f"REJECTED {r.reason}"
    return (f"[{bar}] {i:>{len(str(n))}}/{n} {path.name[:28]:<28} stars {r.stars:4d} FWHM {fwhm} "
            f"{shift} {verdict} ({r.processing_ms:.0f} ms)")


def _label(exposure_s: float | None) -> str:
    """A file-name tag for an exposure: 60 -> "60s", 0.5 -> "0.5s"."""
    return "unknown-exposure" if exposure_s is None else f"{exposure_s:g}s"


def _tagged(path: Path | None, tag: str | None) -> Path | None:
    """`path` with `_tag` before its suffix (stack.fits -> stack_60s.fits); as is without a tag."""
    if path is None or tag is None:
        return path
    return path.with_name(f"{path.stem}_{tag}{path.suffix}")


def _survey(lights: list[Path], settings, masters) -> tuple[dict, dict[Path, float]]:
    """Load and measure every light once: the lights grouped by exposure (seconds, None if
    unknown; an unreadable file goes with the first group, to be reported there), and each
    readable light's reference score (`daemon.pipeline.live.reference_score`)."""
    from daemon.io.load import FrameError, load_frame
    from daemon.pipeline.live import LivePipeline, reference_score

    probe = LivePipeline(settings, masters)
    groups: dict[float | None, list[Path]] = {}
    scores: dict[Path, float] = {}
    unreadable: list[Path] = []
    for path in lights:
        try:
            frame = load_frame(path)
        except FrameError:
            unreadable.append(path)
            continue
        exposure = None if frame.meta.exposure_s is None else round(float(frame.meta.exposure_s), 6)
        groups.setdefault(exposure, []).append(path)
        try:
            metrics = probe.measure_frame(frame)
        except ValueError:  # a frame that does not fit the masters: `process` says why
            continue
        scores[path] = reference_score(int(metrics.n_stars), metrics.fwhm_px)
    if unreadable:
        first = next(iter(groups), None)
        groups.setdefault(first, [])
        groups[first] = sorted(groups[first] + unreadable, key=lights.index)
    return groups, scores


def run(args) -> int:
    settings = _settings(args.set)
    lights = _expand(args.lights)
    if not lights:
        print("lightbucket stack: no light frames found", file=sys.stderr)
        return 2
    masters, master_paths = _masters(args)
    groups, scores = _survey(lights, settings, masters)
    mixed = len(groups) > 1
    if mixed:
        print("exposures: " + ", ".join(f"{len(v)} x {_label(k)}" for k, v in groups.items())
              + f" -> one stack each ({', '.join(str(_tagged(args.output, _label(k))) for k in groups)})",
              flush=True)
    stacked = 0
    # Deepest first: the stack that matters most is written first.
    for exposure in sorted(groups, key=lambda e: -1.0 if e is None else -e):
        tag = _label(exposure) if mixed else None
        stacked += _stack_one(args, groups[exposure], scores, settings, masters, master_paths,
                              _tagged(args.output, tag), _tagged(args.preview, tag))
    if stacked == 0:
        print(f"lightbucket stack: no frame was accepted out of {len(lights)}", file=sys.stderr)
        return 1
    return 0


def _stack_one(args, lights: list[Path], scores: dict[Path, float], settings, masters, master_paths,
               output: Path, preview: Path | None) -> int:
    """Stack `lights` (one exposure) into `output` (+ `preview`) against the best-scoring of
    them as the reference; prints a line per frame and a summary. Returns the frames stacked."""
    from daemon.io.load import FrameError, load_frame
    from daemon.pipeline.live import REFERENCE_MARGIN, LivePipeline
    from daemon.products import preview_jpeg, write_stack

    pipe = LivePipeline(settings, masters)
    candidates = [p for p in lights if p in scores]
    if candidates:
        # The best frame of the whole set (the earliest of those within a few % of it).
        top = max(scores[p] for p in candidates)
        best = next(p for p in candidates if scores[p] * REFERENCE_MARGIN >= top)
        try:
            pipe.set_reference(load_frame(best))
        except FrameError:
            pass
    solve = _GridSolve(pipe, not args.no_solve)
    solve.ask()
    spool = None
    tmp = None
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.final:
        from daemon.spool import Spool

        if args.spool is None:
            tmp = tempfile.TemporaryDirectory(prefix=".lightbucket-spool-", dir=output.parent.resolve())
            spool = Spool(tmp.name)
        else:
            spool = Spool(args.spool / output.stem if output != args.output else args.spool)
        spool.clear()
    t0 = time.perf_counter()
    reasons: Counter[str] = Counter()
    n = len(lights)
    try:
        for i, path in enumerate(lights, 1):
            try:
                frame = load_frame(path)
            except FrameError as exc:
                reasons["unreadable"] += 1
                print(f"{'':22} {i}/{n} {path.name}: SKIPPED {exc}", flush=True)
                continue
            result = pipe.process(frame)
            print(_line(i, n, path, result), flush=True)
            solve.ask()
            if result.accepted:
                if spool is not None:
                    spool.append(result.registered, weight=result.weight, path=str(path),
                                 date_obs=frame.meta.date_obs.isoformat() if frame.meta.date_obs else None,
                                 exposure_s=frame.meta.exposure_s)
            else:
                reasons[(result.reason or "rejected").split(":")[0]] += 1
            result.registered = None  # free the frame now, not at the next iteration
        if pipe.n_stacked == 0:
            print(f"no frame of {n} accepted for {output}", flush=True)
            return 0
        solve.apply()
        live_settings = dataclasses.asdict(settings)
        if spool is not None:
            from daemon.pipeline.restack import RestackSettings, restack

            rs = RestackSettings()
            result = restack(*spool.restack_inputs(), settings=rs)
            image = result.image
            write_stack(output, image, pipe.provenance(), masters=master_paths, reference=pipe.reference_path,
                        method="final", settings={**live_settings, **dataclasses.asdict(rs)},
                        rejected={"low": result.rejected_low, "high": result.rejected_high}, pipeline=pipe)
        else:
            image = pipe.stack_image()
            write_stack(output, pipe, masters=master_paths)
        if preview:
            fmt = "png" if preview.suffix.lower() == ".png" else "jpeg"
            preview.parent.mkdir(parents=True, exist_ok=True)
            preview.write_bytes(preview_jpeg(image, fmt=fmt))
    finally:
        if tmp is not None:
            tmp.cleanup()
    elapsed = time.perf_counter() - t0
    rejected = ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "none"
    print(f"stacked {pipe.n_stacked} of {n} frames, {pipe.total_exposure_s:.0f} s total exposure; "
          f"rejected {sum(reasons.values())} ({rejected}); reference {Path(pipe.reference_path or '-').name}; "
          f"{'final re-stack' if args.final else 'live stack'} -> {output}"
          f"{f' + {preview}' if preview else ''}; {elapsed:.1f} s ({elapsed / n:.2f} s/frame)")
    return pipe.n_stacked
