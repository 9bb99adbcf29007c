"""No compile wait (issue 19): after `python -m daemon.warmup` (what scripts/bootstrap.sh runs)
a fresh process stacks frames without compiling a single numba kernel: every kernel it calls
comes from numba's cache. Checked through numba's own compile statistics, not by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import numba, numpy as np
from daemon.pipeline.frame import Frame, FrameMeta
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.simulate import Exposure, Sensor, expose, random_star_field, transform_matrix
shape = (150, 200)  # another size than the warm-up's: kernels are per type, not per size
field = random_star_field(shape, 60, seed=3, margin=0.1, flux_range=(3000.0, 30000.0))
for bayer in (None, "GRBG"):
    pipe = LivePipeline(LiveSettings(warmup=4))
    for i in range(13):
        m = None if i == 0 else transform_matrix(1.1 * i, 0.7 * i, 0.1, center=(100, 75))
        data = expose(shape, field, Exposure(exposure_s=5.0, matrix=m, seed=i),
                      Sensor(read_noise_adu=3.0, bayer=bayer), as_uint16=False)
        assert pipe.process(Frame(data, FrameMeta(path=str(i), exposure_s=5.0, bayer=bayer))).accepted
misses, hits = {}, 0
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("daemon"):
        for name, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                hits += sum(obj.stats.cache_hits.values())
                if obj.stats.cache_misses:
                    misses[mod.__name__ + "." + name] = len(obj.stats.cache_misses)
print(json.dumps({"hits": hits, "misses": misses}))
"""


def test_warm_up_leaves_every_kernel_a_night_uses_in_numbas_cache():
    env = dict(os.environ)  # the suite's own cache (a cold one costs a minute of compiling here)
    warm = subprocess.run([sys.executable, "-m", "daemon.warmup"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "compiled and cached" in warm.stdout
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["misses"] == {} and stats["hits"] >= 5, stats


def test_daemon_warms_at_every_start_and_compiles_once_per_code_and_cache(tmp_path, monkeypatch):
    """ensure_warm (called before READY) runs the warm-up at every start (loading the kernels
    into the process); it reports a compile (seconds) only when this code was not warmed into
    this cache yet, and leaves a stamp saying it was."""
    import daemon.warmup as warmup

    calls = []
    monkeypatch.setattr(warmup.numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(warmup, "warm_up", lambda: calls.append("load") or 0.5)
    monkeypatch.setattr(warmup, "compile_parallel", lambda jobs: calls.append(("compile", jobs)) or 1.5)
    monkeypatch.setattr(warmup, "_loaded", False)  # as in a fresh process
    assert warmup.ensure_warm() == 1.5 and calls == [("compile", warmup.compile_jobs())]
    assert [p.name.startswith("lightbucket-warm-") for p in tmp_path.iterdir()] == [True]
    monkeypatch.setattr(warmup, "_loaded", False)  # the next start: a fresh process
    assert warmup.ensure_warm() is None and calls[1:] == ["load"]
    # A second service in the same process: its kernels are loaded already.
    assert warmup.ensure_warm() is None and calls[1:] == ["load"]


def test_compile_jobs_one_per_core_within_the_memory_available():
    """A process per core compiles (numba compiles on one), but never more than the memory
    available holds (a compiler takes up to ~1 GB: a 2 GB Pi 4 compiles in one), nor more than
    there are parts; always at least one."""
    import daemon.warmup as warmup

    gb = 1 << 30
    assert warmup.compile_jobs(cpus=2, available_bytes=20 * gb) == 2
    assert warmup.compile_jobs(cpus=4, available_bytes=int(1.6 * gb)) == 1
    assert warmup.compile_jobs(cpus=4, available_bytes=3 * gb) == 3
    assert warmup.compile_jobs(cpus=64, available_bytes=200 * gb) == len(warmup.PARTS)
    assert warmup.compile_jobs(cpus=1, available_bytes=0) == 1
    with pytest.raises(ValueError, match="unknown warm-up part"):
        warmup.warm_up(("colour", "no-such-part"))


FIRST_FRAMES = r"""
import json, sys
import numba, numpy as np
from daemon.warmup import ensure_warm
ensure_warm()  # what the daemon does before READY
from daemon.pipeline.frame import Frame, FrameMeta
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.products import preview_jpeg
from daemon.simulate import Exposure, Sensor, expose, random_star_field, transform_matrix
from daemon.spool import encode

def loads():
    out = {}
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("daemon"):
            for name, obj in vars(mod).items():
                if isinstance(obj, numba.core.registry.CPUDispatcher):
                    n = sum(obj.stats.cache_hits.values()) + sum(obj.stats.cache_misses.values())
                    if n:
                        out[mod.__name__ + "." + name] = n
    return out

before = loads()
shape = (150, 200)
field = random_star_field(shape, 60, seed=3, margin=0.1, flux_range=(3000.0, 30000.0))
for bayer in (None, "GRBG"):
    pipe = LivePipeline(LiveSettings(warmup=4))
    for i in range(3):  # the first frames of a night: the reference, then registered ones
        m = None if i == 0 else transform_matrix(1.1 * i, 0.7 * i, 0.1, center=(100, 75))
        data = expose(shape, field, Exposure(exposure_s=5.0, matrix=m, seed=i),
                      Sensor(read_noise_adu=3.0, bayer=bayer), as_uint16=False)
        r = pipe.process(Frame(data, FrameMeta(path=str(i), exposure_s=5.0, bayer=bayer)), consume=True)
        assert r.accepted
        encode(r.registered)
        for edge in (64, 1280):  # downscaled, and as it is (the stack's own read-only view)
            preview_jpeg(pipe.stack_image(), max_edge=edge)
after = loads()
print(json.dumps({"warm_up_loads": sum(before.values()),
                  "frame_loads": {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}}))
"""


def test_first_frames_after_ready_load_no_kernel():
    """After ensure_warm (before READY) a fresh process's first frames, mono and colour, with
    their spool encoding and preview, neither compile nor load a single kernel from numba's
    cache: everything they call is in the process already. Control: the warm-up itself did
    load kernels (a fresh process starts with none)."""
    warm = subprocess.run([sys.executable, "-m", "daemon.warmup"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", FIRST_FRAMES], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["warm_up_loads"] >= 10 and stats["frame_loads"] == {}, stats
