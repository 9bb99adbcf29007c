#!/usr/bin/env bash
# Installs everything lightbucket needs on Debian 12 / Raspberry Pi OS (bookworm): the Debian
# packages, then a .venv in the project with the project and its extras. Idempotent and quick
# when nothing changed. Sourced by scripts/demo and scripts/test.
#
# LIGHTBUCKET_EXTRAS chooses the extras (comma-separated):
#   indi   device control over INDI (pyindi-client, built from source, and indi-bin);
#   test   the test suite's tools (mosquitto, chromium, playwright, ruff, ...);
#   bench  the benchmark's reference pipeline (astroalign).
# Default "indi,test,bench": a development machine runs the whole suite, INDI included. On a
# Pi: LIGHTBUCKET_EXTRAS= (empty) for a daemon that watches another program's captures,
# LIGHTBUCKET_EXTRAS=indi for one that drives the camera and mount itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${LIGHTBUCKET_EXTRAS-indi,test,bench}"
has_extra() { [[ ",$EXTRAS," == *",$1,"* ]]; }

# Always: Python, and astrometry.net with the Tycho-2 index files (the offline plate solver:
# fields of about 22 arcmin to several degrees; README "Plate solving and index files").
DEBS=(python3 python3-venv python3-pip
      astrometry.net astrometry-data-tycho2-07 astrometry-data-tycho2-08
      astrometry-data-tycho2-09 astrometry-data-tycho2-10-19)
# indi: indiserver and its drivers; dbus-python (under pyindi-client) builds from source.
if has_extra indi; then
    DEBS+=(indi-bin libdbus-1-dev libglib2.0-dev pkg-config python3-dev build-essential)
fi
# test: the mosquitto the tests start on free ports (and mosquitto_sub/_pub, docs/mqtt.md),
# the system chromium the page's tests drive headless (nothing is downloaded), indiserver
# and its simulators, and a compiler for pidng.
if has_extra test; then
    DEBS+=(mosquitto mosquitto-clients chromium chromium-driver indi-bin python3-dev build-essential)
fi

missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
    # The Debian mosquitto package starts a system broker on :1883. lightbucket never relies
    # on it (tests and the demo start their own on a free port); leave it as the user wants.
fi

VENV="$ROOT/.venv"
STAMP="$VENV/.lightbucket-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "bootstrap: installing lightbucket[$EXTRAS] into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    spec="$ROOT"; [ -n "$EXTRAS" ] && spec="$ROOT[$EXTRAS]"
    "$VENV/bin/python" -m pip install -q -e "$spec" >&2
    echo "$want" > "$STAMP"
fi
# Byte-compile the project now: under systemd the service cannot write beside its code
# (ProtectSystem=strict), so Python would compile it again at every start. Quick when current.
"$VENV/bin/python" -m compileall -q "$ROOT/daemon" "$ROOT/drivers" >&2
# Compile numba's kernels for the installed code now (minutes: a process per core, as memory
# allows; loaded in about a second afterwards), so the first frame of the night does not wait
# for the compiler. They go beside the code, or to NUMBA_CACHE_DIR when set: the systemd
# unit's cache folder is another one (docs/systemd.md), which the daemon warms itself before
# it reports READY.
"$VENV/bin/python" -m daemon.warmup >&2
# The systemd unit's own cache (docs/systemd.md), when this is the installed copy and the unit's
# user and cache folder exist: warmed as that user too, so that no start after an upgrade
# compiles (a cold cache is compiled before READY: minutes on a Pi).
if [ "$ROOT" = /opt/lightbucket ] && [ -d /var/cache/lightbucket ] && id lightbucket >/dev/null 2>&1; then
    AS_SERVICE=(sudo -u lightbucket); [ "$(id -u)" -eq 0 ] && AS_SERVICE=(runuser -u lightbucket --)
    "${AS_SERVICE[@]}" env NUMBA_CACHE_DIR=/var/cache/lightbucket "$VENV/bin/python" -m daemon.warmup >&2
fi
