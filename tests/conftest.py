"""Shared fixtures: where the real frames are, and small helpers every area needs."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_set(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {name!r} not found at {path}")
    return path


@pytest.fixture
def als_m27() -> Path:
    """Six colour (RGGB) frames of M27 from ALS's samples."""
    return shared_set("als_m27")


@pytest.fixture
def jocular_arp145() -> Path:
    """Seventeen mono Lodestar frames of Arp 145 with Jocular's quirky headers."""
    return shared_set("jocular_arp145")
