"""`lightbucket demo`: a short simulated night, end to end, with the daemon's own code.

With INDI's simulators installed (Debian: indi-bin; `scripts/demo` installs it) the demo starts
its own indiserver with `indi_simulator_ccd` and `indi_simulator_telescope` (our deterministic
`gsc` on its PATH, so the CCD draws a real star field with seeing, noise and periodic error),
then runs the service exactly as `lightbucket run` would:

1. a dark plan (with the lights' exposure) -> a master dark, built and used automatically;
2. a light plan on NGC 7789: slew, track, expose, dither every few frames; each frame lands in
   the capture folder and reaches the live stack through the folder watcher;
3. at the plan's end, the final winsorized sigma-clipped re-stack (as the daemon does after
   every light plan that runs to its end), the stretched preview, and a summary.

`--synthetic` (or no indi-bin) skips INDI: generated frames with known dithers and a satellite
trail are written into the capture folder one by one, as another capture program would.
Add `--mqtt HOST:PORT` to publish status, frames and the preview to a broker while it runs.
While it runs, the live page is served on `--web` (default 0.0.0.0:8080, another free port if
that one is taken; password `--web-password`, default "demo"); its address is printed first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from daemon.web import page_url

log = logging.getLogger("lightbucket.demo")

SIMULATORS = ("indi_simulator_telescope", "indi_simulator_ccd")
TARGET = {"target": "NGC 7789", "ra": "23h57m24s", "dec": "+56d42m30s", "filter": "Luminance"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a short simulated session end to end (INDI simulators)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    p.add_argument("--frames", type=int, default=12, help="light frames (default: %(default)s)")
    p.add_argument("--darks", type=int, default=5, help="dark frames for the master (default: %(default)s)")
    p.add_argument("--exposure", type=float, default=2.0, help="seconds per frame (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true", help="generated frames instead of INDI's simulators")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="also publish over MQTT to this broker")
    p.add_argument("--web", metavar="HOST:PORT", default="0.0.0.0:8080",
                   help="serve the live page here while the demo runs, 'off' for none (default: %(default)s)")
    p.add_argument("--web-password", default="demo", help="the page's password for commands (default: %(default)s)")
    p.set_defaults(func=run)


def have_simulators() -> bool:
    return all(shutil.which(x) for x in ("indiserver", *SIMULATORS))


def web_address(spec: str) -> tuple[str, int] | None:
    """`HOST:PORT` -> (host, port), the port replaced by a free one when it is 0 or taken; None for 'off'."""
    from drivers.indiserver import free_port

    if spec == "off":
        return None
    host, _, port = spec.rpartition(":")
    host, port = host or "0.0.0.0", int(port)
    if port:
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
        except OSError:
            port = 0
    return host, port or free_port()


def demo_config(out: Path, args, indi: bool, web: tuple[str, int] | None = None):
    from daemon.config import config_from_dict
    from drivers.indiserver import free_port

    raw: dict = {
        "capture": {"dir": str(out / "capture")},
        "state": {"dir": str(out / "state"), "output_dir": str(out)},
    }
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
        raw["mqtt"] = {"host": host or "127.0.0.1", "port": int(port), "rig": "demo", "preview_interval_s": 2.0}
    if web is not None:
        raw["web"] = {"host": web[0], "port": web[1], "password": args.web_password}
    if indi:
        raw["indi"] = {"port": free_port(), "drivers": list(SIMULATORS), "filter_wheel": "CCD Simulator"}
        raw["camera"] = {"binning": 1, "gain": 90}
        raw["plan"] = {**TARGET, "exposure_s": args.exposure, "count": args.frames,
                       "dither_every": 3, "dither_px": 8.0, "settle_s": 1.0}
    return config_from_dict(raw, source="lightbucket demo")


async def write_synthetic_frames(capture: Path, n: int, exposure_s: float) -> list[Path]:
    """Frames as another capture program writes them: temp name, then rename into place.
    Known truth: dithers of up to 6 px, 0.3 deg of field rotation, a satellite trail in one."""
    import numpy as np
    from astropy.io import fits

    from daemon.simulate import (
        Exposure,
        Sensor,
        Trail,
        expose,
        fits_header,
        random_star_field,
        session_times,
        transform_matrix,
    )

    shape = (768, 1024)
    field = random_star_field(shape, 400, seed=42, margin=0.05)
    times = session_times(datetime.now(UTC), exposure_s, n)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        dx, dy = rng.uniform(-6, 6, 2) if i else (0.0, 0.0)
        trail = Trail(0, 100, shape[1], shape[0] - 60, adu_per_px=3000.0) if i == n // 2 else None
        exp = Exposure(exposure_s=exposure_s, matrix=transform_matrix(dx, dy, 0.03 * i), seed=1000 + i,
                       trails=[trail] if trail else [])
        data = await asyncio.to_thread(expose, shape, field, exp, Sensor())
        hdr = fits.Header(fits_header(exposure_s=exposure_s, filter_name="L", target="Synthetic field",
                                      date_obs=times[i]))
        path = capture / f"light_synthetic_{i + 1:03d}.fits"
        tmp = capture / f".{path.name}.part"
        await asyncio.to_thread(fits.writeto, tmp, data, hdr, overwrite=True)
        tmp.replace(path)
        paths.append(path)
        log.info("wrote %s (dither %+.1f %+.1f px%s)", path.name, dx, dy, ", satellite trail" if trail else "")
        await asyncio.sleep(0.2)
    return paths


async def session(config, args, indi: bool) -> dict:
    from daemon.service import Service
    from daemon.settings import PlanSettings

    service = Service(config, acquire_at_start=False)
    runner = asyncio.create_task(service.run())
    summary: dict = {}
    try:
        while service.state != "running":  # restored, watching, MQTT up
            if runner.done():
                return {"error": f"the daemon stopped: {runner.result()}"}
            await asyncio.sleep(0.1)
        if indi:
            darks = await service.plans.run(PlanSettings(**{**config.plan.__dict__, "frame_type": "dark",
                                                         "count": args.darks, "dither_every": 0}))
            summary["darks"] = darks
            if darks.get("state") != "done":
                return {**summary, "error": f"dark plan {darks.get('state')}: {darks.get('error', '')}"}
            lights = await service.plans.run(config.plan)
            summary["lights"] = lights
            paths = lights["paths"]
        else:
            paths = await write_synthetic_frames(Path(config.capture.dir), args.frames, args.exposure)
        if not await service.wait_processed(paths, 120):
            summary["error"] = "not every frame was processed within 2 minutes"
        if summary.get("lights", {}).get("final"):  # a light plan that ran to its end re-stacks itself
            summary["restack"] = {"ok": True, "path": summary["lights"]["final"]}
        else:
            reply = await service.handle_command(json.dumps({"id": "demo", "action": "restack"}).encode())
            summary["restack"] = reply
        summary["stack"] = service.snapshot.stacks.get(service.snapshot.current or "")
        summary["counts"] = dict(service.snapshot.counts)
        return summary
    finally:
        service.request_stop()
        await runner


def run(args) -> int:
    out = Path(args.out).resolve()
    indi = not args.synthetic and have_simulators()
    if not args.synthetic and not indi:
        print("lightbucket demo: INDI's simulators are not installed (Debian: apt install indi-bin); "
              "running the synthetic demo instead", file=sys.stderr)
    # A demo starts from nothing: an earlier demo's capture and state would be resumed.
    for sub in ("capture", "state"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    web = web_address(args.web)
    config = demo_config(out, args, indi, web)
    print(f"lightbucket demo: {'INDI simulators' if indi else 'synthetic frames'}, "
          f"{args.frames} x {args.exposure:g} s, output in {out}", file=sys.stderr)
    if web is not None:
        print(f"lightbucket demo: live page at {page_url(*web)} while the demo runs "
              f"(password for commands: {args.web_password})", file=sys.stderr, flush=True)
    summary = asyncio.run(session(config, args, indi))
    return report(summary, out)


def report(summary: dict, out: Path) -> int:
    stack = summary.get("stack")
    restack = summary.get("restack") or {}
    counts = summary.get("counts", {})
    lines = ["", "lightbucket demo finished:"]
    if "darks" in summary:
        lines.append(f"  darks:       {summary['darks']['frames']} -> master {summary['darks'].get('master')}")
    if "lights" in summary:
        lights = summary["lights"]
        lines.append(f"  lights:      {lights['frames']} through INDI ({lights.get('faults', 0)} faults)")
    lines.append(f"  frames:      {counts.get('stacked', 0)} stacked, {counts.get('rejected', 0)} rejected, "
                 f"{counts.get('errors', 0)} errors")
    if stack is not None:
        lines.append(f"  live stack:  {out / (stack.key.name + '.fits')} "
                     f"({stack.frames} frames, {stack.total_exposure_s:g} s)")
    if restack.get("ok"):
        lines.append(f"  final stack: {restack['path']} (winsorized sigma clipping)")
    else:
        lines.append(f"  final stack: not written: {restack.get('error')}")
    preview = out / "preview.jpg"
    lines.append(f"  preview:     {preview if preview.exists() else 'not written'}")
    if summary.get("error"):
        lines.append(f"  problem:     {summary['error']}")
    print("\n".join(lines))
    ok = not summary.get("error") and restack.get("ok") and preview.exists() and counts.get("stacked", 0) > 0
    return 0 if ok else 1
