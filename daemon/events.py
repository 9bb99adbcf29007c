"""The JSON the daemon publishes, built from values (no service state): the `frame` event of
one file and the `status` document. MQTT, the page's API and its live channel send these
same documents (docs/mqtt.md describes the fields)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from daemon.session import Outcome, SessionSnapshot

log = logging.getLogger("lightbucket")

#: Frame-event fields taken from the pipeline's FrameResult.
RESULT_FIELDS = ("accepted", "reason", "stars", "fwhm_px", "eccentricity", "dx", "dy", "rotation_deg",
                 "background", "weight", "processing_ms")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def frame_event(out: Outcome) -> dict:
    """The `frame` event of a stacked, rejected or unreadable file, and its log line. Header
    values the loader could not use are listed under "warnings" (when there are any)."""
    name = str(out.path)
    extra = {"warnings": list(out.warnings)} if out.warnings else {}
    if out.outcome == "error":
        log.warning("frame %s: not stacked: %s", name, out.reason)
        return {"path": name, "accepted": False, "error": True, "reason": out.reason, "stack": out.stack,
                **extra, "time": _now()}
    r = out.result
    metrics = f"stars={r.stars} fwhm={_fmt(r.fwhm_px)}px dx={_fmt(r.dx)} dy={_fmt(r.dy)} {r.processing_ms:.0f}ms"
    if r.accepted:
        log.info("frame %s: stacked #%d in %s (%s)", name, out.n_stacked, out.stack, metrics)
    else:
        log.info("frame %s: rejected: %s (%s)", name, r.reason, metrics)
    return {"path": name, **{k: getattr(r, k, None) for k in RESULT_FIELDS}, "stack": out.stack, **extra,
            "time": _now()}


def status_document(snap: SessionSnapshot, *, state: str, queue: int, pending: set[str], **extra) -> dict:
    """The `status` JSON from the session's snapshot and the loop's own state.

    pending: ledger keys of the files queued or in hand (they count as received); extra: the
    loop's latest values (last_frame, last_reject, plan, mqtt, disk_free_bytes, state_bytes),
    placed after the counts.
    """
    stack = snap.stacks.get(snap.current or "")
    return {
        "state": state,
        "session": snap.session,
        "stack": snap.current if stack else None,
        "target": stack.key.target if stack else None,
        "filter": stack.key.filter if stack else None,
        "exposure_s": stack.key.exposure_s if stack else None,
        "frames": {"received": len(snap.files | pending), **snap.counts},
        "stacked_current": stack.frames if stack else 0,
        "total_exposure_s": stack.total_exposure_s if stack else 0.0,
        "resolution_note": stack.resolution_note if stack else None,
        "stacks": {n: s.frames for n, s in snap.stacks.items()},
        "queue": queue,
        **extra,
        "time": _now(),
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
