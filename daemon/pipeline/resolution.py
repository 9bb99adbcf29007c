"""Whether a colour stack fits in memory at full resolution (debayer "auto").

Why: a 26 Mpx colour stack's statistics take about 1 GB at full resolution, a quarter of that
at superpixel; a 2 GB Raspberry Pi cannot run the first, and the daemon would be killed for
memory in the middle of a night. Pure: shapes and byte counts in, a sentence or None out.
"""

from __future__ import annotations

from daemon.pipeline.stack import StackSettings, stack_bytes

#: Share of the process's memory a colour stack's statistics may take at full resolution: the
#: rest of a live session (its frames, the masters, the interpreter) adds up to about as much
#: again (bench/PERFORMANCE.md), so a third leaves the system room. 26 Mpx colour (0.99 GB)
#: fits at full resolution on a 4 GB Pi, not on a 2 GB one; 12 Mpx fits on both.
STACK_MEMORY_SHARE = 1 / 3


def stack_memory_note(frame_shape: tuple[int, ...], settings: StackSettings, memory_bytes: int | None) -> str | None:
    """Why colour frames of mosaic shape `frame_shape` (H, W) go to a superpixel stack: their
    full-resolution stack's statistics (`stack_bytes` with `settings`, the warm-up bookkeeping
    included) would take more than `STACK_MEMORY_SHARE` of `memory_bytes`, the memory the
    process may use (`daemon.io.limits.process_memory_bytes`). None where they fit, or where
    the memory is unknown (None or 0)."""
    if not memory_bytes:
        return None
    h, w = (int(n) for n in frame_shape[:2])
    need = stack_bytes((h, w, 3), settings)
    if need <= STACK_MEMORY_SHARE * memory_bytes:
        return None
    return (f"a {w}x{h} colour stack at full resolution needs {need / 1e9:.2f} GB for its statistics, "
            f"more than a third of the {memory_bytes / 1e9:.1f} GB this machine gives the daemon: "
            f"stacked at superpixel (half) resolution, live and final; "
            f'[stack] debayer = "bilinear" forces full resolution')
