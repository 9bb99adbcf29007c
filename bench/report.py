"""The benchmark's summary: medians per stage, the machine, the Markdown tables."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from pathlib import Path

import cv2
import numba
import numpy as np
import scipy
import sep

from daemon.pipeline.live_settings import LiveSettings

ROOT = Path(__file__).resolve().parents[1]

#: Stage columns of the table, in pipeline order.
#: "fused": the colour path at full resolution, debayer + warp + reject+stack band by band
#: (`daemon.pipeline.fused.stack_mosaic`), which cannot be split into those stages.
STAGES = ("load", "calibrate", "debayer", "detect", "match", "warp", "reject+stack", "fused", "spool", "preview",
          "other")

#: Targets from issue 19 (2-core x86, colour at full resolution): seconds per frame end to
#: end, peak RSS, speed-up over the naive full-resolution pipeline, bytes written per frame
#: (spool + checkpoint share) over the raw frame's, first frame over a warm one.
TARGET_S = {("4144x2822", "osc"): 0.2, ("6248x4176", "osc"): 0.45}
TARGET_RSS = {("6248x4176", "osc"): 1.5e9}
TARGET_RATIO = {("4144x2822", "osc"): 10.0}
TARGET_WRITTEN = {("6248x4176", "osc"): 1.5}
TARGET_FIRST = 2.0


def summarize(run: dict, warmup: int, n_timed_end: int | None = None, steady: int = 0) -> dict:
    """Median (and max) per stage and end to end over the timed frames, `warmup` to
    `n_timed_end` (default: the last); with `steady` > 0 the same over the run's last
    `steady` frames too ("steady_*": after the stack's warm-up bookkeeping, `bench.run`)."""
    timed = run["frames"][warmup:n_timed_end]
    out = _summary(run, timed)
    if steady > 0:
        frames = run["frames"][-steady:]
        late = _summary(run, frames)
        out.update({"steady_stages": late["stages"], "steady_median_s": late["median_s"],
                    "steady_max_s": late["max_s"], "steady_cpu_median_s": late["cpu_median_s"],
                    "steady_frames": (len(run["frames"]) - steady + 1, len(run["frames"])),
                    "steady_accepted": late["accepted"]})
    out["memory"] = _memory(run, steady)
    return out


def _memory(run: dict, steady: int) -> dict:
    """What stays resident (`rss_resident`: bytes after each step of the start) and the peak of
    the frames before the steady ones and of the steady ones: (bytes, the stage it came in;
    "other": the rest of `LivePipeline.process`), from the live worker's `MemoryPeaks`."""
    frames = run["frames"]
    split = len(frames) - steady if steady > 0 else len(frames)

    def peak(fs: list[dict]) -> tuple[int, str | None]:
        best: tuple[int, str | None] = (0, None)
        for f in fs:
            for stage, b in (f.get("rss_peaks") or {}).items():
                if b > best[0]:
                    best = (b, "other" if stage == "process" else stage)
        return best

    return {"resident": run.get("rss_resident") or {}, "before_steady": peak(frames[:split]),
            "steady": peak(frames[split:]), "split": split}


def _summary(run: dict, timed: list[dict]) -> dict:
    stages = {}
    for s in STAGES:
        vals = [f["stages"][s] for f in timed if s in f["stages"]]
        stages[s] = statistics.median(vals) if vals else None
    totals = [f["total_s"] for f in timed]
    return {"stages": stages, "median_s": statistics.median(totals), "max_s": max(totals),
            "cpu_median_s": statistics.median(f["cpu_s"] for f in timed),
            "first_frame_s": run["frames"][0]["total_s"],
            "first_registered_s": run["frames"][1]["total_s"] if len(run["frames"]) > 1 else None,
            "ready_s": run.get("ready_s"), "compiled_s": run.get("compiled_s"), "prepare_s": run.get("prepare_s"),
            "loadavg": run.get("loadavg"),
            "min_s": min(totals), "n_timed": len(timed), "accepted": sum(bool(f["accepted"]) for f in timed),
            "peak_rss": run["peak_rss"], "n_stacked": run["n_stacked"],
            "spool_write_median_s": statistics.median(run["spool_write_s"]) if run.get("spool_write_s") else None,
            "resolution": run.get("resolution"),
            "spool_bytes_median": statistics.median(run["spool_bytes"]) if run.get("spool_bytes") else None,
            "checkpoint_bytes": run.get("checkpoint_bytes"), "checkpoint_s": run.get("checkpoint_s"),
            "snapshot_bytes": run.get("snapshot_bytes"),
            "raw_bytes": run.get("raw_bytes")}


def live_settings_line(overrides: dict) -> str:
    """The LiveSettings the live worker ran with (defaults plus overrides) in one line."""
    st = dataclasses.asdict(LiveSettings(**overrides))
    keys = [k for k in ("debayer", "interpolation", "reject", "kappa", "warmup", "weighting", "registration_model")
            if k in st]
    return ", ".join(f"{k}={st[k]}" for k in keys) + (f" (overridden: {overrides})" if overrides else "")


def machine_info() -> dict:
    cpu = "unknown"
    flags: list[str] = []
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = [f for f in value.split() if f in ("avx2", "avx512f", "fma", "neon", "asimd")]
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
    except OSError:
        pass
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "MKL_", "NUMEXPR", "GOTO", "NVPL"))}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit, "cpu": cpu, "cpu_mhz": mhz, "cpu_flags": flags, "machine": platform.machine(),
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
        "numba": numba.__version__, "sep": sep.__version__,
        "scipy": scipy.__version__, "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(),
        "blas_env": env or "none set (OPENBLAS_CORETYPE unset)",
    }


def machine_line(m: dict) -> str:
    mhz = f" @ {m['cpu_mhz']:.0f} MHz" if m.get("cpu_mhz") else ""
    blas = m["blas_env"] if isinstance(m["blas_env"], str) else ", ".join(f"{k}={v}" for k, v in m["blas_env"].items())
    return (f"{m['cpu']}{mhz} ({'/'.join(m['cpu_flags'])}), {m['usable_cores']} cores, {m['memory_gb']} GB, "
            f"{m['machine']}; Python {m['python']}, numpy {m['numpy']}, numba {m.get('numba')}, "
            f"sep {m.get('sep')}, scipy {m['scipy']}, "
            f"OpenCV {m['opencv']} ({m['opencv_threads']} threads); BLAS env: {blas}; commit {m.get('commit')}")


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1e3:.1f} ms" if v < 0.01 else f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def _gb(v: int) -> str:
    return f"{v / 1e9:.2f} GB"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.0f} MB" if v >= 1e7 else f"{v / 1e6:.1f} MB"


def _memory_table(results: list[dict]) -> list[str]:
    """The live session's memory: what stays resident, step by step, and the frames' peaks."""
    rows = []
    for r in results:
        mem = r["live"].get("memory") or {}
        res = mem.get("resident") or {}
        if not res:
            continue
        steps = [res.get(k) for k in ("ready", "masters", "stack", "frame")]
        cells = [_gb(steps[0])] + [("+" + _mb(b - a)) if a and b else "—"
                                   for a, b in zip(steps, steps[1:], strict=False)]
        peaks = [f"{_gb(b)} ({stage})" if b else "—" for b, stage in (mem["before_steady"], mem["steady"])]
        total = _gb(r["live"]["peak_rss"])
        rows.append(f"| {r['size']} | {r['mode']} | " + " | ".join(cells + peaks) + f" | {total} |")
    if not rows:
        return []
    split = results[0]["live"]["memory"]["split"]
    return ["", "Memory of the live session: resident after each step of its start (the interpreter and "
            "every kernel loaded; the masters, compacted; the stack made ahead; the frame's array), then the "
            f"peak of frames 1-{split} (the stack's warm-up bookkeeping) and of the steady frames, with the "
            "stage it came in (`bench.timing.MemoryPeaks`).", "",
            "| size | mode | ready | + masters | + stack made ahead | + frame array | peak, frames before steady "
            "(stage) | peak, steady frames (stage) | peak |", "|---|---|---|---|---|---|---|---|---|"] + rows


def _checks(r: dict, ratio: float, over_raw: float | None, first_ratio: float | None) -> list[str]:
    """The issue-19 targets that apply to this row (colour at full resolution only)."""
    live = r["live"]
    key = (r["size"], r["mode"])
    full = live.get("resolution") == r["size"]
    checks = []
    if key in TARGET_RATIO and full:
        checks.append(f"x{TARGET_RATIO[key]:.0f} {'ok' if ratio >= TARGET_RATIO[key] else 'MISS'}")
    if key in TARGET_S and full:
        t = TARGET_S[key]
        checks.append(f"<= {t} s {'ok' if live['median_s'] <= t else 'MISS'}")
        if live.get("steady_median_s") is not None:
            checks.append(f"steady <= {t} s {'ok' if live['steady_median_s'] <= t else 'MISS'}")
    if key in TARGET_RSS and full:
        t = TARGET_RSS[key]
        checks.append(f"RSS <= {t / 1e9:.1f} GB {'ok' if live['peak_rss'] <= t else 'MISS'}")
    if key in TARGET_WRITTEN and full and over_raw is not None:
        t = TARGET_WRITTEN[key]
        checks.append(f"written <= {t}x raw {'ok' if over_raw <= t else 'MISS'}")
    if first_ratio is not None:
        checks.append(f"first <= {TARGET_FIRST:.0f}x warm {'ok' if first_ratio <= TARGET_FIRST else 'MISS'}")
    return checks


def markdown(results: list[dict], machine: dict, args_line: str, settings_line: str = "defaults",
             bootstrap_s: float | None = None) -> str:
    """The three tables: speed and memory against the naive pipeline; start-up and disk; per stage."""
    lines = [f"Machine: {machine_line(machine)}", "", f"Command: `{args_line}`", "",
             f"Live settings: {settings_line}", ""]
    lines += ["| size | mode | stack resolution live / naive | live s/frame median (max) | live CPU s/frame | "
              "live steady s/frame median (max), CPU | naive s/frame | speed-up | live peak RSS | naive peak RSS | "
              "stacked live/naive | load avg live/naive | targets |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    disk = ["| size | mode | before READY | stack made ahead | first frames: reference / first registered | "
            "first over median | spool written/frame | checkpoint share/frame | snapshot (its write) | "
            "written/frame over raw |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        live, naive = r["live"], r["naive"]
        ratio = naive["median_s"] / live["median_s"]
        r["ratio"] = ratio
        spool_b, ckpt_b, raw_b = live.get("spool_bytes_median"), live.get("checkpoint_bytes"), live.get("raw_bytes")
        over_raw = ((spool_b or 0) + (ckpt_b or 0)) / raw_b if raw_b else None
        firsts = [v for v in (live.get("first_frame_s"), live.get("first_registered_s")) if v is not None]
        first_ratio = max(firsts) / live["median_s"] if firsts else None
        checks = _checks(r, ratio, over_raw, first_ratio)
        loads = "/".join(f"{max(x['loadavg']):.1f}" if x.get("loadavg") else "—" for x in (live, naive))
        res = f"{live.get('resolution') or '—'} / {naive.get('resolution') or '—'}"
        steady = (f"{_fmt_s(live['steady_median_s'])} ({_fmt_s(live['steady_max_s'])}), "
                  f"{_fmt_s(live['steady_cpu_median_s'])}" if live.get("steady_median_s") is not None else "—")
        lines.append(f"| {r['size']} | {r['mode']} | {res} | {_fmt_s(live['median_s'])} ({_fmt_s(live['max_s'])}) | "
                     f"{_fmt_s(live.get('cpu_median_s'))} | {steady} | {_fmt_s(naive['median_s'])} | "
                     f"{ratio:.1f}x | {_gb(live['peak_rss'])} | {_gb(naive['peak_rss'])} | "
                     f"{live['n_stacked']}/{naive['n_stacked']} | {loads} | {'; '.join(checks) or '—'} |")
        compiled = " (compiled)" if live.get("compiled_s") is not None else ""
        disk.append(f"| {r['size']} | {r['mode']} | {_fmt_s(live.get('ready_s'))}{compiled} | "
                    f"{_fmt_s(live.get('prepare_s'))} | "
                    f"{_fmt_s(live.get('first_frame_s'))} / {_fmt_s(live.get('first_registered_s'))} | "
                    f"{'—' if first_ratio is None else f'{first_ratio:.1f}x'} | {_mb(spool_b)} | {_mb(ckpt_b)} | "
                    f"{_mb(live.get('snapshot_bytes'))} ({_fmt_s(live.get('checkpoint_s'))}) | "
                    f"{'—' if over_raw is None else f'{over_raw:.2f}x'} |")
    boot = ("a fresh numba cache warmed as scripts/bootstrap.sh does (`python -m daemon.warmup`: "
            f"{_fmt_s(bootstrap_s)} of compiling)" if bootstrap_s is not None
            else "the numba cache as found (no fresh bootstrap: first frames not those of a fresh install)")
    lines += ["", f"Start-up and disk, with {boot}. \"before READY\": what the live worker spends, as the "
              "daemon, loading every kernel (`daemon.warmup.ensure_warm`); \"stack made ahead\": the stack "
              "made before the first frame, as the daemon makes it while its camera takes a plan's first "
              "exposure (`Session.prepare`; — with --no-prepare: the first frame makes it, as for another "
              "program's frames); \"first over median\": the slower of the two first frames over the timed "
              "frames' median.", ""] + disk
    spans = sorted({tuple(r["live"]["steady_frames"]) for r in results if r["live"].get("steady_frames")})
    steady_note = (" \"live, steady\": frames " + ", ".join(f"{a}-{b}" for a, b in spans)
                   + ", after the stack's rejection warm-up and its bookkeeping" if spans else "")
    lines += _memory_table(results)
    lines += ["", f"Per stage, median seconds per frame over the timed frames.{steady_note}", "",
              "| size | mode | pipeline | " + " | ".join(STAGES) + " | total |",
              "|---|---|---|" + "---|" * (len(STAGES) + 1)]
    for r in results:
        rows = [("live", r["live"]["stages"], r["live"]["median_s"])]
        if r["live"].get("steady_median_s") is not None:
            rows.append(("live, steady", r["live"]["steady_stages"], r["live"]["steady_median_s"]))
        rows.append(("naive", r["naive"]["stages"], r["naive"]["median_s"]))
        for name, stages, total in rows:
            cells = " | ".join(_fmt_s(stages[st]) for st in STAGES)
            lines.append(f"| {r['size']} | {r['mode']} | {name} | {cells} | {_fmt_s(total)} |")
    lines += ["", "Live \"spool\" is the wait for the previous frame's spool write, if any, and the float16 "
              "encoding into its array; the write itself runs on the spool thread, overlapping the next frame, "
              "as in the service "
              "(median write time: "
              + ", ".join(f"{r['size']} {r['mode']} {_fmt_s(r['live'].get('spool_write_median_s'))}" for r in results)
              + "). \"checkpoint share/frame\": what checkpoints write per frame of these 30 s exposures (one "
              "checkpoint every 30 s without the stack's statistics, plus their snapshot once every "
              "30 min and 60 frames, its size and the time its write holds the worker up in brackets); "
              "\"written/frame over raw\" is (spool + checkpoint share) over the raw frame file's size."]
    return "\n".join(lines) + "\n"
