"""Does the web server slow stacking down? Per-frame latency with and without page clients.

    .venv/bin/python -m bench.web                       # 1280x1024 mono, 3 cases
    .venv/bin/python -m bench.web --frames 30 --size 4144x2822

Three cases over the same synthetic frames, each with a fresh service in this process (as
`lightbucket run` runs it, no MQTT):

1. no `[web]`;
2. `[web]`, nobody connected;
3. `[web]` with `--clients` (20) clients polling `/api/status` and `/api/frames?n=50` every
   `--poll-s` (1 s) and `/api/preview.jpg` and `/api/last_sub.jpg` (read back from the sub's
   file in a thread) every 5th time, plus one WebSocket live channel, from a separate process
   (a phone's work is not the daemon's).

Frames are copied into the watched folder (temp name, then rename) every `--interval` s, slow
enough that the queue stays empty, so latency = watcher + load + pipeline + publish: from the
rename to the frame event, on one clock. The first 2 frames are not timed (reference, kernels
warming up). Prints a Markdown table (median, 90th percentile, the worker's own processing_ms,
requests served).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from astropy.io import fits

from daemon.config import config_from_dict
from daemon.service import Service
from daemon.simulate import Exposure, expose, fits_header, random_star_field, transform_matrix
from drivers.indiserver import free_port

WARMUP = 2


def make_frames(folder: Path, n: int, w: int, h: int) -> list[Path]:
    """n dithered synthetic mono frames (uint16 FITS with INDI's headers) in `folder`."""
    field = random_star_field((h, w), max(200, w * h // 4000), seed=5, margin=0.05)
    rng = np.random.default_rng(11)
    paths = []
    for i in range(n):
        dx, dy = rng.uniform(-5, 5, 2) if i else (0.0, 0.0)
        data = expose((h, w), field, Exposure(exposure_s=10.0, matrix=transform_matrix(dx, dy, 0.0), seed=100 + i))
        path = folder / f"light_{i:03d}.fits"
        fits.writeto(path, data, fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="BENCH")))
        paths.append(path)
    return paths


async def clients_main(url: str, n: int, poll_s: float, duration_s: float, done: dict) -> None:
    """The page's load: n polling clients and one live channel, for duration_s; counts in `done`."""
    done.update(requests=0, errors=0, live_messages=0, bytes=0)
    stop = time.monotonic() + duration_s

    async def poller(session: aiohttp.ClientSession, k: int) -> None:
        i = k  # spread the preview fetches
        while time.monotonic() < stop:
            paths = ["api/status", "api/frames?n=50"] + (["api/preview.jpg", "api/last_sub.jpg"] if i % 5 == 0 else [])
            for p in paths:
                try:
                    async with session.get(url + p) as r:
                        done["bytes"] += len(await r.read())
                        done["requests"] += 1
                except aiohttp.ClientError:
                    done["errors"] += 1
            i += 1
            await asyncio.sleep(poll_s)

    async def live(session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(url + "api/live") as ws:
            while time.monotonic() < stop:
                try:
                    await ws.receive(timeout=max(stop - time.monotonic(), 0.1))
                    done["live_messages"] += 1
                except TimeoutError:
                    break

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(live(session), *[poller(session, k) for k in range(n)])


async def one_case(name: str, frames: list[Path], root: Path, args, clients: int) -> dict:
    capture = root / name / "capture"
    capture.mkdir(parents=True)
    raw = {"capture": {"dir": str(capture)}, "state": {"dir": str(root / name / "state")}}
    port = free_port()
    if name.startswith("web"):
        raw["web"] = {"host": "127.0.0.1", "port": port, "password": "bench"}
    service = Service(config_from_dict(raw, "bench"))
    written: dict[str, float] = {}
    seen: dict[str, tuple[float, float]] = {}

    def on_event(kind: str, payload: dict) -> None:
        if kind == "frame":
            seen[Path(payload["path"]).name] = (time.monotonic(), payload.get("processing_ms") or 0.0)

    service.subscribe(on_event)
    runner = asyncio.create_task(service.run())
    while service.state != "running":
        await asyncio.sleep(0.05)
    proc = None
    if clients:
        duration = len(frames) * args.interval + 20
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.web", "--clients-only", f"http://127.0.0.1:{port}/", str(clients),
            str(args.poll_s), str(duration), stdout=subprocess.PIPE)
        await asyncio.sleep(2.0)  # the clients are connected and polling
    for f in frames:
        tmp = capture / f".{f.name}.part"
        shutil.copy(f, tmp)
        written[f.name] = time.monotonic()
        tmp.replace(capture / f.name)
        await asyncio.sleep(args.interval)
    deadline = time.monotonic() + 60
    while len(seen) < len(frames) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    served = None
    if proc is not None:
        proc.terminate()
        out, _ = await proc.communicate()
        served = json.loads(out or b"null")
    service.request_stop()
    await runner
    timed = [f.name for f in frames[WARMUP:] if f.name in seen]
    lat = sorted(seen[n][0] - written[n] for n in timed)
    return {"case": name, "frames": len(timed), "median_s": statistics.median(lat),
            "p90_s": lat[int(0.9 * (len(lat) - 1))], "max_s": lat[-1],
            "processing_ms": statistics.median(seen[n][1] for n in timed), "served": served}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", default="1280x1024")
    p.add_argument("--interval", type=float, default=0.8, help="seconds between frames")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="each case this many times, interleaved")
    p.add_argument("--clients-only", nargs=4, metavar=("URL", "N", "POLL_S", "DURATION_S"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients_only:
        url, n, poll, duration = args.clients_only
        result: dict = {}

        def report(*_):
            print(json.dumps(result), flush=True)
            os._exit(0)

        signal.signal(signal.SIGTERM, report)

        try:
            asyncio.run(clients_main(url, int(n), float(poll), float(duration), result))
        finally:
            report()
    w, h = (int(v) for v in args.size.lower().split("x"))
    results = []
    with tempfile.TemporaryDirectory(prefix="lightbucket-bench-web-") as tmp:
        root = Path(tmp)
        (root / "stage").mkdir()
        frames = make_frames(root / "stage", args.frames, w, h)
        asyncio.run(one_case("warm-up", frames[:4], root, args, 0))  # numba's cached kernels loaded
        cases = (("no-web", 0), ("web-idle", 0), (f"web-{args.clients}-clients", args.clients))
        for k in range(args.rounds):
            for name, clients in cases:
                results.append(asyncio.run(one_case(f"{name}", frames, root / str(k), args, clients)))
                print(f"{name}: {results[-1]}", file=sys.stderr)
    print(f"\n{args.size} mono, {args.frames} frames ({WARMUP} untimed) every {args.interval:g} s, "
          f"{args.clients} clients polling every {args.poll_s:g} s + 1 WebSocket\n")
    print("| case (in run order) | frames | latency median s | p90 s | max s | worker ms (median) | served |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = r["served"]
        served = f"{s['requests']} requests, {s['live_messages']} live messages, {s['errors']} errors" if s else "-"
        print(f"| {r['case']} | {r['frames']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {r['max_s']:.3f} "
              f"| {r['processing_ms']:.0f} | {served} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
