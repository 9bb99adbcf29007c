"""Bounded decode: a frame over the limit is refused before its pixels exist (peak RSS of a
real process), and the default limit follows the memory the process may really use."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.io.limits import MEMORY_SHARE, cgroup_memory_limit, default_max_frame_bytes, process_memory_bytes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

#: Writes a tile-compressed (RICE) FITS of zeros that decodes to SIDE x SIDE int16 pixels.
_WRITE = """
import sys
import numpy as np
from astropy.io import fits
side = int(sys.argv[2])
fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((side, side), np.int16), compression_type="RICE_1")]
             ).writeto(sys.argv[1])
"""

#: Loads a frame in a fresh process: peak RSS before and after, and what happened. The peak
#: left by the imports is reset first (Linux: "5" to /proc/self/clear_refs sets VmHWM to the
#: current RSS), so the peak after is the load's own; else getrusage's ru_maxrss.
_LOAD = """
import json, resource, sys
from daemon.io.load import FrameError, LoadOptions, load_frame

def peak():
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
before = peak()
try:
    frame = load_frame(sys.argv[1], options=LoadOptions(max_frame_bytes=int(sys.argv[2])))
    outcome = "decoded %dx%d" % frame.data.shape[::-1]
except FrameError as exc:
    outcome = "refused: " + exc.reason
after = peak()
print(json.dumps({"before": before, "after": after, "outcome": outcome}))
"""


def _run(script: str, *args: object) -> dict | None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=ENV,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else None


def test_compressed_frame_over_the_limit_never_raises_the_peak_rss(tmp_path):
    side = 8000  # 4 MB on disk (tile-compressed zeros), 244 MiB once decoded as float32
    path = tmp_path / "bomb.fits"
    _run(_WRITE, path, side)
    assert path.stat().st_size < 8 << 20
    refused = _run(_LOAD, path, 64 << 20)
    assert refused["outcome"].startswith("refused: too large: 8000x8000 pixels would decode to 244 MiB"), refused
    grown = refused["after"] - refused["before"]
    # control: the same file under a limit it fits decodes, and the peak shows it
    decoded = _run(_LOAD, path, 512 << 20)
    assert decoded["outcome"] == "decoded 8000x8000", decoded
    assert decoded["after"] - decoded["before"] > 244 << 20
    assert grown < 16 << 20, f"refusing raised the peak RSS by {grown / 2**20:.0f} MiB"


def _cgroup_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_v2_limit_is_the_tightest_on_the_path(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/lightbucket.service\n")
    fs = tmp_path / "fs"
    _cgroup_tree(fs, {"memory.max": "max\n", "system.slice/memory.max": str(3 << 30),
                      "system.slice/lightbucket.service/memory.max": "max\n"})
    assert cgroup_memory_limit(proc, fs) == 3 << 30  # the slice's MemoryMax= holds the service too
    (fs / "system.slice/lightbucket.service/memory.max").write_text(str(1 << 30))
    assert cgroup_memory_limit(proc, fs) == 1 << 30
    for f in fs.rglob("memory.max"):  # control: no limit anywhere
        f.write_text("max\n")
    assert cgroup_memory_limit(proc, fs) is None


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpuset:/\n4:memory:/docker/abc\n0::/\n")
    fs = tmp_path / "fs"
    _cgroup_tree(fs, {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                      "memory/docker/abc/memory.limit_in_bytes": str(2 << 30)})
    assert cgroup_memory_limit(proc, fs) == 2 << 30
    (fs / "memory/docker/abc/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(proc, fs) is None
    assert cgroup_memory_limit(tmp_path / "absent", fs) is None


def test_default_limit_follows_an_address_space_rlimit():
    free = default_max_frame_bytes()
    limited = _run("""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
        from daemon.io.limits import default_max_frame_bytes, process_memory_bytes
        print(json.dumps({"memory": process_memory_bytes(), "limit": default_max_frame_bytes()}))
    """)
    assert limited["memory"] == min(3 << 30, process_memory_bytes())
    assert limited["limit"] == max(64 << 20, limited["memory"] // MEMORY_SHARE)
    if process_memory_bytes() > 3 << 30:  # a machine with more memory than the rlimit allows
        assert limited["limit"] < free


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY, reason="rlimit set")
def test_default_limit_is_a_share_of_physical_memory_without_caps():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cap = cgroup_memory_limit()
    assert process_memory_bytes() == min(physical, cap or physical)
