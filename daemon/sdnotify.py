"""systemd notify protocol (sd_notify(3)) without libsystemd: one datagram per message.

$NOTIFY_SOCKET is a filesystem path or, starting with '@', an abstract socket name (a leading
NUL byte). Outside systemd the variable is unset and every call is a silent no-op.
$WATCHDOG_USEC (with $WATCHDOG_PID, when set, naming us) gives the watchdog period.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | bytes | None = None
        if address:
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send 'KEY=value' lines in one datagram; False when not under systemd or on error."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # MSG_DONTWAIT: a receiver that does not read (queue full) must never block the
            # event loop; the message is dropped instead (the next ping will get through).
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
            return True
        except OSError:  # BlockingIOError (queue full), no listener, ...
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half the systemd watchdog timeout (s), as sd_watchdog_enabled(3) advises; None if off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None
