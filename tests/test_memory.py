"""daemon.memory: a freed frame-sized block is reused by the next frame without new page
faults, on the pipeline's thread as in the service; blocks above 64 MB (26 Mpx frames) are
not kept; and what is kept goes back to the kernel on release. Start-up's objects are kept
out of the garbage collector's passes, and what comes later is still collected.

Page faults and RSS are the kernel's own counts (getrusage, /proc), each measured in a fresh
interpreter: the malloc settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from daemon.memory import retain_freed_memory

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

def frames(mb):
    n = mb * 2**20 // 4
    a = np.empty(n, np.float32); a[:] = 1.0; del a  # the previous frame's array, freed
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    b = np.empty(n, np.float32); b[:] = 2.0  # the next frame's
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    del b
    return faults

retained = retain_freed_memory() if sys.argv[1] == "retain" else None
with ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pipeline:  # as the service
    faults40 = pipeline.submit(frames, 40).result()
    faults100 = pipeline.submit(frames, 100).result()
print(json.dumps({"retained": retained, "faults40": faults40, "faults100": faults100, "rss": rss_mb()}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_freed_frame_memory_is_reused_up_to_64_mb():
    default, kept = _probe("default"), _probe("retain")
    assert kept["retained"] is True
    # glibc's default: a 40 MB block is a fresh mmap, faulted in again page by page (10240
    # pages of 4 kB, or 20 transparent huge pages); kept: the same pages, no new faults.
    assert default["faults40"] >= 15
    assert kept["faults40"] < 5
    # 100 MB does not fit a thread's 64 MB heap: mapped fresh either way.
    assert kept["faults100"] >= 40
    # The 40 MB kept stays resident (the 100 MB went back at once).
    assert 30 < kept["rss"] - default["rss"] < 60


FREEZE = r"""
import gc, json, weakref
import daemon.pipeline.live  # what the daemon has imported before READY, or some of it
from daemon.memory import freeze_startup_objects

class Node:
    pass

def cycle():
    node = Node()
    node.me = node  # freed by the cycle collector only
    return weakref.ref(node)

gc.disable()  # collections only where this probe makes them
before = cycle()  # start-up's garbage
frozen = freeze_startup_objects()
before_freed = before() is None
after = cycle()  # the night's
walked = len(gc.get_objects())  # what a full collection walks now
gc.collect()
print(json.dumps({"frozen": frozen, "walked": walked, "before": before_freed, "after": after() is None}))
"""


def test_start_up_objects_leave_the_collectors_passes_and_later_cycles_are_still_freed():
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    # The imports alone leave tens of thousands of tracked objects; frozen, a full
    # collection walks only what came after (the probe's own few).
    assert got["frozen"] > 10_000
    assert got["walked"] < 100
    assert got["before"] is True  # start-up's garbage went in the last collection, not frozen
    assert got["after"] is True  # the night's cycles are still collected
