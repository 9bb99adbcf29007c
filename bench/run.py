"""Per-frame latency, memory and disk writes of the live pipeline against a naive baseline.

    .venv/bin/python -m bench.run                          # full run: 3 sizes, mono + colour
    .venv/bin/python -m bench.run --sizes 4144x2822 --osc  # one case
    .venv/bin/python -m bench.run --osc --debayer superpixel  # half resolution vs 2x2 binning
    .venv/bin/python -m bench.run --quick                  # smoke run (tiny, 2 frames)

What it does:

0. Unless --quick (or --no-fresh-cache): a fresh, empty numba cache for this run
   (NUMBA_CACHE_DIR), warmed as `scripts/bootstrap.sh` does (`python -m daemon.warmup`, timed:
   "bootstrap_s"), so the first frames are those of a night after a fresh install.
Then per sensor size and colour mode:
1. Generates a synthetic session once (`bench.sessions`), cached in bench/results/sessions/.
2. Runs the live pipeline as the service does (`bench.live.live_worker`: what the daemon does
   before READY, the stack made ahead of the first frame as the daemon makes it while its camera
   takes a plan's first exposure (not with --no-prepare), then per frame `FrameLoader` ->
   `LivePipeline.process(consume=True)` ->
   spool encode and write on the spool thread -> preview JPEG of the stack after every frame)
   on a thread of its own with the service's malloc settings (`daemon.memory`), in a *fresh
   subprocess*, so its peak RSS (`ru_maxrss`) is its own. Stage times come from wrapping the
   pipeline's own stage functions with timers that count exclusive time; "other" is what
   `process` spends outside them (quality gate, sky level, weights, copies).
3. Runs the naive baseline over the same files in another fresh subprocess (`bench.naive`):
   at full resolution, or binning 2x2 when the live pipeline runs at superpixel resolution
   (like with like; each row names both resolutions).
4. Prints and saves the Markdown tables (`bench.report`: medians over the timed frames) with
   the machine line, and everything as JSON (--out).

The first `--warmup` frames (default 2: the reference frame and one more) are not in the
medians; their times are reported as the "first frames" (the reference, the first registered
frame) against the median. The live stack's own rejection warm-up (LiveSettings.warmup
frames) *is* inside the timed frames: that is what a user sees, and the median is robust to
its one expensive frame (the max is reported too). Those timed frames all fall in the first
minutes of a night, while the stack still keeps its warm-up bookkeeping (its first 3 x warmup
frames); the live worker then goes on to `--steady` frames more (default 10) after that
bookkeeping, timed apart: the "steady" columns, what every later frame of a night costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.naive import naive_worker
from bench.report import STAGES, _gb, live_settings_line, machine_info, machine_line, markdown, summarize
from bench.sessions import BAYER, make_session, parse_size
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.stack import StackSettings
from daemon.session import live_overrides, live_settings_from

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: Named sensor sizes (width x height, px).
SIZES = {"1280x1024": (1280, 1024), "4144x2822": (4144, 2822), "6248x4176": (6248, 4176)}
QUICK_SIZE = "320x240"


def bootstrap_cache(cache_dir: Path, timeout_s: float) -> float:
    """Warm an empty numba cache as `scripts/bootstrap.sh` does (`python -m daemon.warmup`
    with NUMBA_CACHE_DIR = `cache_dir`); returns the seconds it took (compiling)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "daemon.warmup"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m daemon.warmup failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t


def run_worker(kind: str, folder: Path, n_total: int, settings_kw: dict, timeout_s: float,
               env: dict | None = None, state_dir: Path | None = None, prepare: bool = True) -> dict:
    """Run one worker in a fresh interpreter (this environment, plus `env`) and return its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "bench.run", "--worker", kind, "--session", str(folder),
           "--worker-frames", str(n_total), "--worker-out", str(out),
           "--worker-settings", json.dumps(settings_kw)]
    if state_dir is not None:
        cmd += ["--worker-state-dir", str(state_dir)]
    if not prepare:
        cmd += ["--worker-no-prepare"]
    try:
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
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


def live_frames(n_total: int, steady: int, stack: StackSettings) -> int:
    """Frames the live worker stacks: the timed ones (`n_total`, warm-up included), then, for
    `steady` > 0, on to the end of the stack's rejection warm-up bookkeeping (its first 3 x
    warmup frames, `RunningStack`) and `steady` frames more."""
    if steady <= 0:
        return n_total
    return max(n_total, 3 * stack.warmup if stack.reject else 0) + steady


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES),
                   help="comma-separated WIDTHxHEIGHT list (default: %(default)s)")
    p.add_argument("--frames", type=int, default=10, help="timed frames after the warm-up (>= 10; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (reference + 1; default 2)")
    p.add_argument("--steady", type=int, default=None,
                   help="live frames timed apart once the stack's rejection warm-up and its bookkeeping are "
                        "over (after its first 3 x warmup frames): the rest of a night (default 10; 0 with "
                        "--quick; 0: none)")
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
    p.add_argument("--fresh-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="a fresh numba cache warmed as scripts/bootstrap.sh does, for the first-frame "
                        "measurement (default: yes, but no with --quick)")
    p.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                   help="make the stack before the first frame, as the daemon does while its camera takes a "
                        "plan's first exposure (default); --no-prepare: the first frame makes it, as for "
                        "frames of another capture program")
    p.add_argument("--state-dir", type=Path,
                   help="where the live worker's spool and checkpoints go (default: the temp folder); "
                        "the disk a state folder would be on, to time its writes")
    # Internal: the subprocess workers.
    p.add_argument("--worker", choices=("live", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--session", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-settings", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--worker-state-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-no-prepare", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "live":
            # On a thread of its own, as the service runs the pipeline (its "pipeline" executor;
            # glibc gives such a thread its own malloc arena). Imported here: numba and the
            # pipeline stay out of the parent and the naive worker.
            from bench.live import live_worker

            with ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pipeline:
                res = pipeline.submit(live_worker, args.session, args.worker_frames,
                                      json.loads(args.worker_settings), args.worker_state_dir,
                                      not args.worker_no_prepare).result()
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
    settings_kw: dict = {"reject": False} if args.no_reject else {}
    if args.debayer:
        settings_kw["debayer"] = args.debayer
    try:  # --set as the daemon's and lightbucket stack's (daemon.session.live_overrides)
        tables = live_overrides(args.set)
        live_settings_from(tables["stack"], tables["quality"], "--set")
    except ValueError as exc:
        parser.error(str(exc))
    settings_kw.update({**tables["stack"], **tables["quality"]})
    n_total = args.warmup + args.frames
    steady = (0 if args.quick else 10) if args.steady is None else args.steady
    if steady < 0:
        parser.error("--steady must be >= 0")
    n_live = live_frames(n_total, steady, LiveSettings(**settings_kw).stack_settings)

    machine = machine_info()
    print(f"Machine: {machine_line(machine)}", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory(prefix="lb-bench-") if args.quick else None
    sessions_root = Path(tmp.name) if tmp else args.sessions
    fresh = (not args.quick) if args.fresh_cache is None else args.fresh_cache
    cache = tempfile.TemporaryDirectory(prefix="lb-bench-numba-") if fresh else None
    live_env = {"NUMBA_CACHE_DIR": cache.name} if cache else {}
    results = []
    bootstrap_s = None
    try:
        if cache:
            print("fresh numba cache: python -m daemon.warmup ...", file=sys.stderr)
            bootstrap_s = bootstrap_cache(Path(cache.name), args.timeout)
            print(f"  compiled in {bootstrap_s:.1f} s", file=sys.stderr)
        for name, w, h in sizes:
            for mode in modes:
                folder = make_session(sessions_root, w, h, BAYER if mode == "osc" else None, n_live)
                print(f"{name} {mode}: live ...", file=sys.stderr)
                live = run_worker("live", folder, n_live, settings_kw, args.timeout, live_env, args.state_dir,
                                  args.prepare)
                entry = {"size": name, "mode": mode, "live_raw": live,
                         "live": summarize(live, args.warmup, n_total, steady)}
                print(f"  live median {entry['live']['median_s']:.3f} s, peak RSS {_gb(live['peak_rss'])}",
                      file=sys.stderr)
                if not args.no_naive:
                    print(f"{name} {mode}: naive ...", file=sys.stderr)
                    naive_kw = {"bin2": mode == "osc" and settings_kw.get("debayer") == "superpixel"}
                    naive = run_worker("naive", folder, n_total, naive_kw, args.timeout)
                    entry["naive_raw"] = naive
                    entry["naive"] = summarize(naive, args.warmup, n_total)
                    print(f"  naive median {entry['naive']['median_s']:.3f} s", file=sys.stderr)
                results.append(entry)
    finally:
        for t in (tmp, cache):
            if t:
                t.cleanup()

    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.no_naive:
        for r in results:  # a table without the baseline: mark it rather than invent numbers
            r["naive"] = {"stages": {s: None for s in STAGES}, "median_s": float("nan"), "max_s": float("nan"),
                          "peak_rss": 0, "n_stacked": 0}
    table = markdown(results, machine, command.strip(), live_settings_line(settings_kw), bootstrap_s)
    print(table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "command": command.strip(), "settings": settings_kw,
                               "warmup": args.warmup, "frames": args.frames, "steady": steady,
                               "prepare": args.prepare,
                               "bootstrap_s": bootstrap_s,
                               "results": results, "table": table}, indent=1, default=str))
    out.with_suffix(".md").write_text(table)
    print(f"results: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
