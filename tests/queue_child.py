"""Run a night's queue in a process of its own (for the kill -9 test in tests/test_night.py).

Usage: python -m tests.queue_child '<json>' with port, capture, queue_file, site [lat, lon],
plans [{PlanSettings keys}, ...]. Prints nothing; the queue file and the frames are the result.
"""

from __future__ import annotations

import asyncio
import json
import sys
import types

from daemon.night import run_queue
from daemon.plan_queue import PlanQueue
from daemon.settings import CameraSettings, IndiSettings, MountSettings, PlanSettings, SiteSettings


class _Quiet:
    async def publish(self, kind, payload):
        pass


def main(args: dict) -> None:
    plans = [PlanSettings(**p) for p in args["plans"]]
    config = types.SimpleNamespace(
        indi=IndiSettings(port=args["port"]), camera=CameraSettings(binning=2, upload_prefix="light"),
        site=SiteSettings(*args["site"]), mount=MountSettings(settle_s=0.5),
        capture=types.SimpleNamespace(dir=args["capture"]), plan=None)
    queue = PlanQueue.load(args["queue_file"], plans)
    asyncio.run(run_queue(config, queue, _Quiet(), asyncio.Event(), save_to=args["queue_file"]))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
