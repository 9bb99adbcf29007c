"""Metadata a capture program kept beside the frames instead of in their headers.

Jocular (a live-observing stacker) saves StarlightLive/Lodestar frames whose FITS header holds
nothing but a date, and writes the session's exposure, camera and telescope into `info.json`
in the same folder. We use it only to fill fields the header left empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.io.header import parse_angle
from daemon.pipeline.frame import FrameType


def jocular_fields(frame_path: str) -> dict[str, Any]:
    """FrameMeta fields from a Jocular `info.json` next to `frame_path` ({} if none/unreadable)."""
    info_path = Path(frame_path).with_name("info.json")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict) or "n_subs" not in info and "sub_type" not in info:
        return {}  # some other program's info.json
    fields: dict[str, Any] = {}
    try:
        if info.get("exposure") is not None:
            fields["exposure_s"] = float(info["exposure"])
    except (TypeError, ValueError):
        pass
    for key, field in (("camera", "camera"), ("telescope", "telescope"), ("Name", "target")):
        if isinstance(info.get(key), str) and info[key].strip():
            fields[field] = info[key].strip()
    ra, dec = parse_angle(info.get("RA", ""), hours=True), parse_angle(info.get("Dec", ""), hours=False)
    if ra is not None and dec is not None:
        fields["ra_deg"], fields["dec_deg"] = ra, dec
    sub_type = str(info.get("sub_type", "")).lower()
    if sub_type in {t.value for t in FrameType}:
        fields["frame_type"] = FrameType(sub_type)
    return fields
