"""The phone page and HTTP API of the daemon (aiohttp, on the daemon's event loop).

`server.WebServer` serves the page (static/), the JSON API and a WebSocket live channel from a
`server.Daemon` interface (status, command, subscribe, preview, tile), so the handlers never
touch the service's or the worker's state; `auth.Auth` decides who may send commands.
"""
