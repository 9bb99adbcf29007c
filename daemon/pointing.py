"""Where the stacks point: each stack's reference plate solve and the night's pointing check.

The service hands every judged frame to `Pointing.frame_done` (on the loop); solving runs on
the `ReferenceSolver`'s own thread, never on the stacking path, and its answers come back on the
loop:
- a stack's grid frame, once per stack: its WCS goes to the stack (on the worker: the session
  owns the stacks) and the `solve` event out (status `solve`: the current stack's);
- with [plan] pointing_check_s, a stacked frame of the running light plan every that many
  seconds (`PointingCheck`, kept by the plan's `daemon.upkeep.Upkeep`): the `pointing` event
  (status `pointing`) and, when it is far from the target and the plan says pointing_recenter,
  a re-centring asked of the plan, done before its next frame.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from daemon.reference_solve import ReferenceSolver, solve_event
from daemon.solve import Solution, solver_installed

if TYPE_CHECKING:
    from daemon.service import Service
    from daemon.session import Outcome

log = logging.getLogger("lightbucket")


class Pointing:
    """The service's plate solves (loop only). `solves`: each stack's `solve` event; `last`:
    the latest `pointing` event."""

    def __init__(self, service: Service):
        self.service = service
        self.solves: dict[str, dict] = {}
        self.last: dict | None = None
        self.solver: ReferenceSolver | None = None
        self._checks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Create the solver when [solve] enabled says so (default: when solve-field is installed)."""
        solve = self.service.config.solve
        if solve.enabled or (solve.enabled is None and solver_installed()):
            self.solver = ReferenceSolver(self._solved, solve)

    def status(self, current: str | None) -> dict:
        """The status's `solve` (the current stack's) and `pointing`."""
        return {"solve": self.solves.get(current or ""), "pointing": self.last}

    def _target(self, stack: str | None) -> tuple[float, float] | None:
        summary = self.service.snapshot.stacks.get(stack or "")
        return self.service.plans.target_of(summary.key.target if summary else None)

    def frame_done(self, out: Outcome, runner=None) -> None:
        """A frame judged: its stack's grid frame solved when not yet; the running plan's
        (`runner`, a PlanRunner or None) stacked frame checked when the check is due."""
        if self.solver is None:
            return
        if out.grid is not None:
            self.solver.request(out.stack, out.grid, self._target(out.stack))
        if runner is not None and out.outcome == "stacked" and runner.upkeep.check_due(out.path):
            task = asyncio.create_task(self._check(str(out.path), runner), name="pointing check")
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check(self, path: str, runner) -> None:
        target = (runner.ra, runner.dec) if runner.ra is not None else (runner.plan.ra_deg, runner.plan.dec_deg)
        solution = await self.solver.solve_file(path, target)
        event = runner.upkeep.check.verdict(path, solution, *target)
        if event["far"]:
            log.warning("pointing: %s: %s", path, event["reason"])
        if event["recenter"]:
            runner.request_recenter()
        self.last = event
        self.service.publish_event("acquisition", event)
        self.service.publish_status()

    async def _solved(self, stack: str, path: str, solution: Solution) -> None:
        """A stack's reference frame plate-solved (or not): its WCS to the stack, the event out."""
        if solution.ok:
            await self.service.job(lambda session: session.set_reference_wcs(stack, path, solution.wcs))
            await self.service.write_products(force=True)
        event = solve_event(stack, path, solution, self._target(stack))
        self.solves[stack] = event
        self.service.publish_event("acquisition", event)
        self.service.publish_status()

    def forget(self, stack: str) -> None:
        """Stack `stack` was reset or got a new reference: solve its next grid frame."""
        self.solves.pop(stack, None)
        if self.solver is not None:
            self.solver.forget(stack)

    async def drain(self) -> None:
        """Wait for the pointing checks in hand to be answered and published."""
        while self._checks:
            await asyncio.gather(*list(self._checks), return_exceptions=True)

    async def close(self) -> None:
        """Drop the checks in hand and stop the solver."""
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        if self.solver is not None:
            self.solver.close()
