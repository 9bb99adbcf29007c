"""The phone page and HTTP API of the daemon (aiohttp, on the daemon's event loop).

`server.WebServer` serves the page (static/), the JSON API and a WebSocket live channel from a
`server.Daemon` interface (status, command, subscribe, preview, tile), so the handlers never
touch the service's or the worker's state; `auth.Auth` decides who may send commands.
"""

from __future__ import annotations

import socket


def page_url(host: str, port: int, tls: bool = False) -> str:
    """The page's address as a phone on the LAN opens it: this machine's outgoing interface
    address when listening on all interfaces (0.0.0.0), 127.0.0.1 when it has none."""
    if host in ("0.0.0.0", "::", ""):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the interface
                host = s.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    return f"{'https' if tls else 'http'}://{host}:{port}/"
