"""Shared fixtures: where the real frames are, and small helpers every area needs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
_HOME = pytest.StashKey[tuple[str | None, str]]()


def pytest_configure(config: pytest.Config) -> None:
    """Each test process (each xdist worker: `./scripts/test` runs three) gets a HOME of its
    own, so INDI's drivers read and write their ~/.indi (saved device settings, the mount's
    ParkData.xml) there and never in the user's, nor in another worker's at the same time."""
    home = tempfile.mkdtemp(prefix=f"lightbucket-test-home-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    config.stash[_HOME] = (os.environ.get("HOME"), home)
    os.environ["HOME"] = home


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow (real-time INDI simulators, daemons in subprocesses) first, otherwise in
    file order: xdist deals whole files out in this order (`--dist loadfile
    --no-loadscope-reorder`, scripts/test), so the long ones start at once instead of leaving
    one worker busy after the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _own_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """And each test a HOME of its own within it: the simulators of one test would otherwise
    hand their saved state (a parked mount, a site, a flip hour angle) to the next test's on
    the same worker, which then depends on the order the files are dealt out in."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def pytest_unconfigure(config: pytest.Config) -> None:
    previous, home = config.stash.get(_HOME, (None, None))
    if home is None:
        return
    if previous is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = previous
    shutil.rmtree(home, ignore_errors=True)


def shared_set(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {name!r} not found at {path}")
    return path


def require_tools(*tools: str) -> None:
    """Fail (never skip) when a system tool the project installs is missing: a skip here would
    let a green run hide a missing install step. ./scripts/test installs them (bootstrap.sh)."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; ./scripts/test installs it "
                    "(Debian: apt install indi-bin mosquitto)", pytrace=False)


@pytest.fixture
def indi_installed() -> None:
    require_tools("indiserver", "indi_simulator_ccd", "indi_simulator_telescope")


@pytest.fixture
def als_m27() -> Path:
    """Six colour (RGGB) frames of M27 from ALS's samples."""
    return shared_set("als_m27")


@pytest.fixture
def jocular_arp145() -> Path:
    """Seventeen mono Lodestar frames of Arp 145 with Jocular's quirky headers."""
    return shared_set("jocular_arp145")


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto of the test's own on a free port (never the system's on 1883)."""
    from tests.mqtt_broker import MOSQUITTO, Broker

    require_tools(MOSQUITTO)
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
