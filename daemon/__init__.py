"""lightbucket: observatory acquisition and live-stacking daemon.

`daemon.pipeline` is the functional core (numpy in, numpy out, no I/O); the rest of
`daemon` is the imperative shell (files, MQTT, systemd); `drivers` talks INDI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightbucket")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
