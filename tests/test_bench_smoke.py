"""Smoke run of the benchmark so it does not rot: the real pipeline and the real naive
baseline over a tiny synthetic session, in subprocesses, as `bench.run --quick` runs them.
No timing is asserted (speed lives in bench/); only that every stage was measured and the
comparison came out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.report import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_produces_full_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--sizes", "320x240", "--frames", "2", "--steady", "2",
         "--set", "warmup=4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert res["table"] == table and table in proc.stdout
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]
    # Header row of the per-stage table names every stage.
    header = next(line for line in table.splitlines() if line.startswith("| size | mode | pipeline"))
    assert [c.strip() for c in header.strip("|").split("|")][3:-1] == list(STAGES)
    assert {(r["size"], r["mode"]) for r in res["results"]} == {("320x240", "mono"), ("320x240", "osc")}
    for r in res["results"]:
        live, naive = r["live"], r["naive"]
        assert live["n_timed"] == 2 and naive["n_timed"] == 2
        # Every frame was stacked by both (reference + 2), so the timings are of real work;
        # the live worker went on past the stack's warm-up bookkeeping (3 x 4 frames) to two
        # frames more, timed apart ("steady").
        assert naive["n_stacked"] == 3 and live["n_stacked"] == 14 == len(r["live_raw"]["frames"])
        assert live["steady_frames"] == [13, 14] and live["steady_accepted"] == 2
        assert live["steady_stages"]["fused" if r["mode"] == "osc" else "reject+stack"] > 0
        assert f"| 320x240 | {r['mode']} | live, steady |" in table
        # Colour at full resolution goes the fused way (debayer + warp + stack in bands), mono
        # through the separate stages; each row names the resolution both pipelines stacked at.
        stages = ("fused",) if r["mode"] == "osc" else ("warp", "reject+stack")
        for stage in ("load", "calibrate", "detect", "match", "spool", "preview") + stages:
            assert live["stages"][stage] > 0, (r["mode"], stage)
        assert live["stages"]["debayer"] is None
        assert live["resolution"] == naive["resolution"] == "320x240"
        assert f"| 320x240 | {r['mode']} | 320x240 / 320x240 |" in table
        # Bytes written: the spool's file per frame (colour: the float16 mosaic, the raw
        # frame's size) and one checkpoint.
        assert live["spool_bytes_median"] <= 1.1 * live["raw_bytes"]
        assert live["snapshot_bytes"] > 320 * 240 * 4 > live["checkpoint_bytes"]
        # Start-up as the daemon's (every kernel loaded before the frames) and the first frames
        # (the reference, the first registered one) against the median, in their own table.
        assert live["ready_s"] > 0 and live["first_frame_s"] > 0 and live["first_registered_s"] > 0
        assert live["prepare_s"] > 0  # the stack made before the first frame, as the daemon with a camera
        assert any(line.startswith(f"| 320x240 | {r['mode']} | ") and "x |" in line
                   for line in table.split("Start-up and disk")[1].splitlines())
        assert naive["stages"]["match"] > 0 and naive["stages"]["warp"] > 0
        # The spool thread wrote every stacked frame once, as the service's does.
        assert r["live_raw"]["n_spooled"] == live["n_stacked"] and live["spool_write_median_s"] > 0
        assert r["ratio"] > 0 and live["peak_rss"] > 10e6 and naive["peak_rss"] > 10e6
        # Memory: resident after each step of the start, and each frame's peak by stage in the
        # memory table (where Linux lets the peak be reset: this machine class does).
        mem = live["memory"]
        assert set(mem["resident"]) == {"ready", "masters", "stack", "frame"}
        assert mem["resident"]["ready"] > 10e6 and mem["split"] == 12
        assert live["peak_rss"] >= max(mem["before_steady"][0], mem["steady"][0], *mem["resident"].values())
        assert mem["before_steady"][1] in set(STAGES) | {"between"}
        assert all(f["rss_peaks"]["load"] > 10e6 for f in r["live_raw"]["frames"])
        assert any(line.startswith(f"| 320x240 | {r['mode']} | ") and "GB (" in line
                   for line in table.split("Memory of the live session")[1].splitlines())
        # The live pipeline registered the dithered frames (not an identity warp of everything).
        dxs = [f["dx"] for f in r["live_raw"]["frames"][1:]]
        assert all(d is not None and abs(d) > 0.5 for d in dxs), dxs


def test_quick_benchmark_compares_superpixel_with_a_binned_naive_pipeline(tmp_path):
    """Like with like: a superpixel live stack against a naive pipeline that bins 2x2."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--sizes", "320x240", "--osc", "--debayer", "superpixel",
         "--frames", "2", "--no-prepare", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["live"]["resolution"] == r["naive"]["resolution"] == "160x120"
    assert r["live"]["stages"]["debayer"] > 0 and r["live"]["stages"]["fused"] is None
    assert r["live"]["n_stacked"] == r["naive"]["n_stacked"] == 3  # --quick: no steady frames
    assert r["live"]["prepare_s"] is None and r["live"]["first_frame_s"] > 0  # the first frame made the stack
    assert "steady_median_s" not in r["live"]
