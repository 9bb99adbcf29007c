"""The daemon's web server: the phone page, the JSON API and the live channel (aiohttp).

Why it looks like this: the server runs on the daemon's event loop, which also feeds the
pipeline thread and pings the systemd watchdog, so no handler may block it or touch the
pipeline's state. Every handler reads through a `Daemon` (status snapshot, command function,
event subscription, preview bytes, tiles made on the worker); anything CPU-heavy (a tile's
stretch, the last sub's thumbnail) runs in a thread. Clients that read slowly lose the oldest
live events, never stall the daemon.

Routes (docs/web.md):
    GET  /                         the page (static/index.html; app.js, style.css beside it)
    GET  /api/status               the MQTT `status` JSON
    GET  /api/frames?n=            recent frame events (oldest first), as on MQTT `frame`
    GET  /api/preview.jpg          the current stack's preview JPEG (as on MQTT `preview`)
    GET  /api/preview.json         its `preview/meta`
    GET  /api/last_sub.jpg         a thumbnail of the last frame received (not the stack)
    GET  /api/stack/<name>/preview.jpg  that stack's preview (headers X-Image-Width/-Height: full size)
    GET  /api/stack/<name>/tile    full-resolution crop: x, y (centre, px), size (px, <= 1024)
    GET  /api/session              {"password_set", "logged_in", "csrf"}
    POST /api/login, /api/logout   the page's session (daemon.web.auth)
    POST /api/cmd                  a command (MQTT `cmd` JSON) -> the `cmd/result` JSON
    GET  /api/live                 WebSocket: {"kind": "status"|"frame"|"preview"|..., "data": {...}}
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from daemon.config import WebConfig
from daemon.web.auth import COOKIE, CSRF_HEADER, Auth
from daemon.web.tiles import sub_thumbnail

log = logging.getLogger(__name__)

#: Frame events kept for /api/frames and the page's charts (a long night of short subs).
FRAMES_KEPT = 2000
#: Events queued per live client before its oldest are dropped.
LIVE_QUEUE = 256
MAX_TILE_PX = 1024


class Daemon(Protocol):
    """What the web server needs from the daemon; every method is called on the event loop and
    returns at once (or awaits without blocking it)."""

    def status(self) -> dict:
        """The status JSON, as published on MQTT `status`."""

    async def command(self, payload: dict) -> dict:
        """Run one command (the MQTT `cmd` JSON) and return its `cmd/result` JSON."""

    def subscribe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """Call `callback(kind, payload)` on the loop for every event the daemon publishes
        (kind: "status", "frame", "preview", "cmd/result", "acquisition"); returns the
        function that unsubscribes."""

    def preview(self) -> tuple[bytes, dict] | None:
        """The latest preview (JPEG bytes, preview/meta JSON), or None before the first."""

    async def stack_preview(self, stack: str) -> tuple[bytes, int, int]:
        """The preview of any stack (not only the current one): JPEG bytes and the stack's full
        width and height (px). Raises KeyError for an unknown or empty stack."""

    async def tile(self, stack: str, x: int, y: int, size: int) -> bytes:
        """A full-resolution JPEG crop of stack `stack` centred on pixel (x, y) (x = column,
        y = row), `size` px square (clipped at the edges), stretched like the preview.
        Raises KeyError for an unknown or empty stack."""


def _static_dir() -> Path:
    return Path(str(resources.files("daemon.web") / "static"))


class EventHub:
    """The recent frame events and the live clients' queues, fed by `Daemon.subscribe`."""

    def __init__(self, keep: int = FRAMES_KEPT):
        self.frames: collections.deque[dict] = collections.deque(maxlen=keep)
        self.last_sub: str | None = None  # path of the last frame received
        self.clients: set[asyncio.Queue] = set()
        self.dropped = 0

    def __call__(self, kind: str, payload: dict) -> None:
        if kind == "frame":
            self.frames.append(payload)
            if payload.get("path") and not payload.get("error"):
                self.last_sub = str(payload["path"])
        if not self.clients:
            return
        message = json.dumps({"kind": kind, "data": payload}, default=str)  # once for all clients
        for q in self.clients:
            if q.full():
                q.get_nowait()
                self.dropped += 1
            q.put_nowait(message)

    def join(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(LIVE_QUEUE)
        self.clients.add(q)
        return q

    def leave(self, q: asyncio.Queue) -> None:
        self.clients.discard(q)


def _json(data: Any, status: int = 200, **kw) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str), **kw)


def _client(request: web.Request) -> str:
    return request.remote or "?"


def _same_origin(request: web.Request) -> bool:
    """A browser's Origin must be this server (a page elsewhere may not post here); clients
    that send no Origin (curl, scripts) pass."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    host = request.headers.get("Host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


@web.middleware
async def _headers(request: web.Request, handler):
    resp = await handler(request)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                            "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
    return resp


def make_app(daemon: Daemon, cfg: WebConfig, *, hub: EventHub | None = None,
             thumbnail: Callable[[str], Awaitable[bytes]] | None = None) -> web.Application:
    """The aiohttp application: the page, the API and the live channel over `daemon`.

    Parameters
    ----------
    daemon : Daemon
        The running service (or a fake in tests).
    cfg : WebConfig
        [web]: the password (None: view-only).
    hub : EventHub, optional
        Subscribed to `daemon` when the app starts; a fresh one by default.
    thumbnail : async callable(path) -> JPEG bytes, optional
        Makes the last sub's thumbnail (default `daemon.web.tiles.sub_thumbnail`, in a thread).
    """
    hub = hub or EventHub()
    auth = Auth(cfg.password)
    thumb = thumbnail or sub_thumbnail
    thumbs: dict[str, asyncio.Future] = {}  # path -> its JPEG (made once however many ask), the last one only
    static = _static_dir()
    app = web.Application(middlewares=[_headers], client_max_size=64 * 1024)
    unsubscribe: list[Callable[[], None]] = []

    async def on_startup(app: web.Application) -> None:
        unsubscribe.append(daemon.subscribe(hub))

    async def on_cleanup(app: web.Application) -> None:
        while unsubscribe:
            unsubscribe.pop()()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    async def status(request: web.Request) -> web.Response:
        return _json(daemon.status(), headers={"Cache-Control": "no-store"})

    async def frames(request: web.Request) -> web.Response:
        try:
            n = int(request.query.get("n", FRAMES_KEPT))
        except ValueError:
            raise web.HTTPBadRequest(text="n: expected an integer") from None
        n = max(n, 0)
        items = list(hub.frames)[-n:] if n else []
        return _json({"frames": items})

    async def preview_jpg(request: web.Request) -> web.Response:
        p = daemon.preview()
        if p is None:
            raise web.HTTPNotFound(text="no preview yet: nothing stacked")
        return web.Response(body=p[0], content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def preview_json(request: web.Request) -> web.Response:
        p = daemon.preview()
        return _json(p[1] if p else None)

    async def last_sub(request: web.Request) -> web.Response:
        path = hub.last_sub
        if path is None:
            raise web.HTTPNotFound(text="no frame received yet")
        if path not in thumbs:
            thumbs.clear()
            thumbs[path] = asyncio.ensure_future(thumb(path))
        try:
            jpeg = await asyncio.shield(thumbs[path])
        except (OSError, ValueError) as exc:
            raise web.HTTPNotFound(text=f"{path}: {exc}") from None
        return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def tile(request: web.Request) -> web.Response:
        q = request.query
        try:
            x, y = int(float(q["x"])), int(float(q["y"]))
            size = int(q.get("size", 512))
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="tile: x and y (pixels) required, size optional") from None
        if not 16 <= size <= MAX_TILE_PX:
            raise web.HTTPBadRequest(text=f"tile: size must be 16..{MAX_TILE_PX} px")
        try:
            jpeg = await daemon.tile(request.match_info["name"], x, y, size)
        except KeyError as exc:
            raise web.HTTPNotFound(text=f"tile: {exc.args[0] if exc.args else 'no such stack'}") from None
        return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def stack_preview(request: web.Request) -> web.Response:
        try:
            jpeg, width, height = await daemon.stack_preview(request.match_info["name"])
        except KeyError as exc:
            raise web.HTTPNotFound(text=f"preview: {exc.args[0] if exc.args else 'no such stack'}") from None
        return web.Response(body=jpeg, content_type="image/jpeg",
                            headers={"Cache-Control": "no-store", "X-Image-Width": str(width),
                                     "X-Image-Height": str(height)})

    async def session(request: web.Request) -> web.Response:
        s = auth.session(request.cookies.get(COOKIE))
        return _json({"password_set": auth.enabled, "logged_in": s is not None, "csrf": s.csrf if s else None},
                     headers={"Cache-Control": "no-store"})

    async def login(request: web.Request) -> web.Response:
        if not _same_origin(request):
            return _json({"ok": False, "error": "cross-origin login refused"}, 403)
        if not auth.enabled:
            return _json({"ok": False, "error": "no [web] password set: the page is view-only"}, 403)
        try:
            body = await request.json()
            given = body["password"] if isinstance(body, dict) else None
        except (ValueError, KeyError):
            given = None
        if not isinstance(given, str):
            return _json({"ok": False, "error": "expected {\"password\": \"...\"}"}, 400)
        result = auth.login(given, _client(request))
        if isinstance(result, float):
            return _json({"ok": False, "error": f"too many attempts: try again in {result:.0f} s"}, 429,
                         headers={"Retry-After": str(int(result) + 1)})
        if result is None:
            log.warning("web: failed login from %s", _client(request))
            return _json({"ok": False, "error": "wrong password"}, 401)
        token, s = result
        resp = _json({"ok": True, "csrf": s.csrf})
        resp.set_cookie(COOKIE, token, max_age=int(auth.session_s), httponly=True, samesite="Strict",
                        secure=request.secure, path="/")
        return resp

    async def logout(request: web.Request) -> web.Response:
        if not _same_origin(request):
            return _json({"ok": False, "error": "cross-origin request refused"}, 403)
        auth.logout(request.cookies.get(COOKIE))
        resp = _json({"ok": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def cmd(request: web.Request) -> web.Response:
        if not auth.enabled:
            return _json({"id": None, "ok": False, "error": "no [web] password set: commands are disabled"}, 403)
        header = request.headers.get("Authorization")
        if header is not None:
            ok = auth.check_bearer(header, _client(request))
            if isinstance(ok, float):
                return _json({"id": None, "ok": False, "error": f"too many attempts: try again in {ok:.0f} s"},
                             429, headers={"Retry-After": str(int(ok) + 1)})
        else:
            ok = _same_origin(request) and auth.check_session(request.cookies.get(COOKIE),
                                                              request.headers.get(CSRF_HEADER))
        if not ok:
            return _json({"id": None, "ok": False, "error": "password required: log in, or send "
                          "'Authorization: Bearer <password>'"}, 401, headers={"WWW-Authenticate": "Bearer"})
        raw = await request.read()
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return _json({"id": None, "ok": False, "error": f"not valid JSON: {exc}"}, 400)
        if not isinstance(payload, dict):
            return _json({"id": None, "ok": False, "error": "a command must be a JSON object"}, 400)
        reply = await daemon.command(payload)
        log.info("web: command %s from %s: %s", payload.get("action"), _client(request),
                 "ok" if reply.get("ok") else reply.get("error"))
        return _json(reply)

    async def live(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        q = hub.join()
        try:
            await ws.send_str(json.dumps({"kind": "status", "data": daemon.status()}, default=str))

            async def reader() -> None:  # notices the client's close; nothing is read from it
                async for msg in ws:
                    if msg.type == WSMsgType.ERROR:
                        return

            read = asyncio.create_task(reader())
            try:
                while not read.done():
                    get = asyncio.ensure_future(q.get())
                    await asyncio.wait({get, read}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        break
                    await ws.send_str(get.result())
            finally:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away mid-send
        finally:
            hub.leave(q)
            await ws.close()
        return ws

    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/frames", frames)
    app.router.add_get("/api/preview.jpg", preview_jpg)
    app.router.add_get("/api/preview.json", preview_json)
    app.router.add_get("/api/last_sub.jpg", last_sub)
    app.router.add_get("/api/stack/{name}/tile", tile)
    app.router.add_get("/api/stack/{name}/preview.jpg", stack_preview)
    app.router.add_get("/api/session", session)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_post("/api/cmd", cmd)
    app.router.add_get("/api/live", live)
    app.router.add_static("/static/", static, show_index=False)
    return app


def ssl_context(cfg: WebConfig) -> ssl.SSLContext | None:
    """HTTPS with [web] cert_file/key_file; raises ValueError naming the file if unreadable."""
    if cfg.cert_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"[web] cert_file {cfg.cert_file} / key_file {cfg.key_file}: {exc}") from None
    return ctx


class WebServer:
    """Start/stop the app on [web] host:port (HTTPS with cert_file/key_file).

    Parameters
    ----------
    daemon : Daemon
        The service the page shows and commands.
    cfg : WebConfig
        [web]; port 0 picks a free port (`port` tells which, after `start`).
    """

    def __init__(self, daemon: Daemon, cfg: WebConfig, **app_kw):
        self.cfg = cfg
        self.app = make_app(daemon, cfg, **app_kw)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.cfg.cert_file else "http"
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Listen; raises OSError (port in use, address not available) or ValueError (TLS files)."""
        ctx = ssl_context(self.cfg)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, ssl_context=ctx)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])  # the bound port (also for port 0)
        log.info("web page at %s (listening on %s:%d)%s", self.url, self.cfg.host, self.port,
                 "" if self.cfg.password else "; no [web] password: view-only")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
