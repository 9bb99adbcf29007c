"""Each stack's grid frame plate-solved once, off the stacking path, for the stack's WCS.

Why a thread of its own and not the stacking worker: a solve takes seconds (up to its time
limit) and may fail, and a frame must never wait for it. `ReferenceSolver` runs the solves one
at a time on its own thread (solve-field itself is a subprocess at a lower CPU priority) and
hands each answer back on the event loop. The service asks for a solve after each accepted
frame (`request`: returns at once; a stack's grid frame is solved once, later requests for it
are ignored) and, when the answer comes (`on_solved`, called on the loop), gives the WCS to the
stack's pipeline (`LivePipeline.set_reference_wcs`, on the worker) and publishes the `solve`
event (`solve_event`). Until then, and when the solve fails, the stack keeps the WCS of the
frame's header, if it had one (PLTSOLVD = F in the written stack).

The frame solved is the *grid frame* (`daemon.pipeline.reference`), the one whose pixel grid
the stack uses, so its WCS maps exactly into every stack written from that pipeline (live,
final, drizzled; `daemon.io.wcs.stack_wcs`). Its star list, measured by the pipeline, is used
when the pipeline still has it; otherwise the file is read and measured again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from daemon.config import SolveSettings
from daemon.io.load import FrameError, load_frame
from daemon.pipeline.reference import GridFrame
from daemon.solve import Solution, SolveHints, hints_from_meta, solve_frame, solve_stars
from daemon.wcs import separation_arcsec

log = logging.getLogger(__name__)


def grid_hints(grid: GridFrame, settings: SolveSettings,
               target: tuple[float, float] | None = None) -> SolveHints:
    """Hints for a grid frame: its header's position and scale; the target (RA, Dec degrees,
    where the mount was sent) instead of the header's position when given."""
    base = hints_from_meta(grid.meta, radius_deg=settings.radius_deg) if grid.meta is not None \
        else SolveHints(radius_deg=settings.radius_deg)
    base = replace(base, scale_error=settings.scale_error)
    if target is not None:
        base = replace(base, ra_deg=float(target[0]), dec_deg=float(target[1]))
    return base


def solve_grid_frame(grid: GridFrame, settings: SolveSettings,
                     target: tuple[float, float] | None = None) -> Solution:
    """Solve a stack's grid frame (blocking: run it on a worker thread).

    Parameters
    ----------
    grid : the `GridFrame` (its stars when known, else its file is read and measured).
    settings : `SolveSettings`.
    target : (RA, Dec) degrees J2000 the mount was sent to, or None (the header's position).

    Returns a `Solution` whose WCS is for the grid frame's array; never raises (an unreadable
    file, or an unknown pixel scale without `settings.blind`, is a failed `Solution` saying so).
    """
    frame = None
    if grid.x is None or grid.meta is None:
        try:
            frame = load_frame(grid.path)
        except (FrameError, OSError, ValueError) as exc:
            return Solution(ok=False, reason=f"{grid.path}: unreadable: {getattr(exc, 'reason', None) or exc}")
        grid = replace(grid, meta=frame.meta)
    hints = grid_hints(grid, settings, target)
    if hints.scale_arcsec_px is None and not settings.blind:
        return Solution(ok=False, reason="pixel scale unknown (no FOCALLEN or pixel size in the header): "
                                         "not solved blind", width=grid.width, height=grid.height)
    if frame is None:
        return solve_stars(grid.x, grid.y, grid.flux, grid.width, grid.height, hints,
                           time_limit_s=settings.time_limit_s)
    return solve_frame(frame, hints, time_limit_s=settings.time_limit_s)


def solve_event(stack: str, path: str, solution: Solution, target: tuple[float, float] | None = None) -> dict:
    """The `solve` event (MQTT `acquisition`, the page, the status's `solve`): where the
    stack's reference frame points and how far from the target.

    Keys: event "solve", stack, path, ok, ra_deg, dec_deg (the frame's centre), scale_arcsec_px,
    rotation_deg, parity, reason (None when ok), error_arcsec (centre to target; None without a
    target or a solution), elapsed_s, n_stars.
    """
    error = None
    if solution.ok and target is not None:
        error = round(separation_arcsec(solution.ra_deg, solution.dec_deg, float(target[0]), float(target[1])), 1)
    rec = solution.as_dict(path)
    return {"event": "solve", "stack": stack, **rec, "error_arcsec": error,
            "elapsed_s": round(float(solution.elapsed_s), 2), "n_stars": int(solution.n_stars)}


OnSolved = Callable[[str, str, Solution], Awaitable[None] | None]


class ReferenceSolver:
    """Solves each stack's grid frame once, on its own thread; answers on the event loop.

    on_solved(stack, path, solution) is called on the loop when a solve ends (ok or not); it
    may be a coroutine function. `solve` is the blocking solve (tests replace it).
    Use from the event loop only (`request`, `solution`, `forget`, `drain`, `close`).
    """

    def __init__(self, on_solved: OnSolved | None = None, settings: SolveSettings | None = None,
                 *, solve: Callable[..., Solution] = solve_grid_frame):
        self.settings = settings or SolveSettings()
        self._on_solved = on_solved
        self._solve = solve
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightbucket-solve")
        self._asked: dict[str, str] = {}  # stack -> the grid frame asked for
        self._solutions: dict[str, Solution] = {}
        self._pending: set[asyncio.Future] = set()

    def request(self, stack: str, grid: GridFrame | None, target: tuple[float, float] | None = None) -> bool:
        """Ask for `grid` (the stack's grid frame) to be solved; returns at once. False (no
        new solve) without a grid frame, when its WCS is solved already (a restored stack), or
        when this stack's grid frame was asked for before (pending or answered)."""
        if grid is None or grid.wcs_solved or self._asked.get(stack) == grid.path:
            return False
        self._asked[stack] = grid.path
        self._solutions.pop(stack, None)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._solve, grid, self.settings, target)
        self._pending.add(fut)
        fut.add_done_callback(lambda f: self._done(f, stack, grid.path))
        return True

    def _done(self, fut: asyncio.Future, stack: str, path: str) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        sol = fut.result() if exc is None else Solution(ok=False, reason=f"solver error: {exc}")
        if exc is not None:
            log.error("plate solve of %s failed: %s", path, exc)
        if self._asked.get(stack) != path:
            return  # the stack was reset or its grid frame changed meanwhile: a stale answer
        self._solutions[stack] = sol
        if sol.ok:
            log.info("%s: reference %s solved: RA %.4f Dec %+.4f, %.3f\"/px (%.1f s)", stack, path,
                     sol.ra_deg, sol.dec_deg, sol.scale_arcsec_px, sol.elapsed_s)
        else:
            log.warning("%s: reference %s not solved: %s", stack, path, sol.reason)
        if self._on_solved is not None:
            try:
                out = self._on_solved(stack, path, sol)
            except Exception:  # noqa: BLE001 - the caller's bug must not stop later answers
                log.exception("%s: handling the plate solve of %s failed", stack, path)
                return
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._pending.add(task)
                task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a plate solve failed: %s", task.exception())

    async def solve_file(self, path: str, target: tuple[float, float] | None = None) -> Solution:
        """Solve one frame file on the solver's thread (after the solves queued before it):
        the night's pointing check (`daemon.centering.PointingCheck`). Hints: its header's
        scale, the target's position when given. Never raises for a frame that does not solve."""
        loop = asyncio.get_running_loop()
        grid = GridFrame(path=str(path), width=0, height=0)
        fut = loop.run_in_executor(self._executor, self._solve, grid, self.settings, target)
        self._pending.add(fut)
        try:
            return await fut
        except Exception as exc:  # noqa: BLE001 - a solver bug is an answer, not a crash of the caller
            log.error("plate solve of %s failed: %s", path, exc)
            return Solution(ok=False, reason=f"solver error: {exc}")
        finally:
            self._pending.discard(fut)

    def solution(self, stack: str) -> Solution | None:
        """The answer for this stack's grid frame, None while pending or never asked."""
        return self._solutions.get(stack)

    def forget(self, stack: str) -> None:
        """The stack was reset: a pending answer for it is dropped, its next grid frame solved."""
        self._asked.pop(stack, None)
        self._solutions.pop(stack, None)

    async def drain(self) -> None:
        """Wait until every solve asked for has been answered (and on_solved has run)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def close(self) -> None:
        """Stop taking solves; queued ones are dropped, one running ends within its time limit
        (the interpreter's exit waits for it at most that long)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
