"""The web server's handlers against a fake daemon: auth, API shape, live channel, tiles.
(The real daemon and a real browser: tests/test_web_browser.py.)"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import ConfigError, WebConfig, config_from_dict
from daemon.io.load import load_frame
from daemon.pipeline.stretch import StretchSettings, apply_transfer, stretch_uint8
from daemon.web.auth import RateLimiter
from daemon.web.server import WebServer, make_app
from daemon.web.tiles import crop_for_tile, thumbnail_of, tile_jpeg
from tests.test_daemon_service import make_frame


class FakeDaemon:
    """Implements daemon.web.server.Daemon; records the commands it runs."""

    def __init__(self):
        self.state = "running"
        self.commands: list[dict] = []
        self.listeners = []

    def status(self) -> dict:
        return {"state": self.state, "stack": "M27_L_300s_bin1", "stacks": {"M27_L_300s_bin1": 3},
                "stacked_current": 3, "frames": {"stacked": 3, "rejected": 1}}

    async def command(self, payload: dict) -> dict:
        self.commands.append(payload)
        if payload.get("action") == "pause":
            self.state = "paused"
            self.emit("status", self.status())
        return {"id": payload.get("id"), "ok": True, "action": payload.get("action")}

    def subscribe(self, callback):
        self.listeners.append(callback)
        return lambda: self.listeners.remove(callback)

    def emit(self, kind, payload):
        for cb in list(self.listeners):
            cb(kind, payload)

    def preview(self):
        return b"\xff\xd8fakejpeg", {"stack": "M27_L_300s_bin1", "width": 100, "height": 80}

    async def stack_preview(self, stack):
        if stack != "M27_L_300s_bin1":
            raise KeyError(f"no stack named {stack!r}")
        return b"\xff\xd8other", 4000, 3000

    async def tile(self, stack, x, y, size):
        if stack != "M27_L_300s_bin1":
            raise KeyError(f"no stack named {stack!r}")
        return b"\xff\xd8tile"


def run(coro):
    return asyncio.run(coro)


async def _client(daemon, password="s3cret"):
    app = make_app(daemon, WebConfig(port=0, password=password))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def test_reading_is_open_and_matches_the_daemon():
    async def go():
        d = FakeDaemon()
        c = await _client(d)
        try:
            r = await c.get("/api/status")
            assert r.status == 200 and await r.json() == d.status()
            d.emit("frame", {"path": "/c/a.fits", "accepted": True, "fwhm_px": 2.5})
            d.emit("frame", {"path": "/c/b.fits", "accepted": False, "reason": "clouds"})
            frames = (await (await c.get("/api/frames")).json())["frames"]
            assert [f["path"] for f in frames] == ["/c/a.fits", "/c/b.fits"]
            assert (await (await c.get("/api/frames?n=1")).json())["frames"][0]["reason"] == "clouds"
            assert (await (await c.get("/api/frames?n=-1")).json())["frames"] == []
            r = await c.get("/api/preview.jpg")
            assert r.content_type == "image/jpeg" and await r.read() == b"\xff\xd8fakejpeg"
            assert (await c.get("/api/stack/M27_L_300s_bin1/tile?x=10&y=10")).status == 200
            assert (await c.get("/api/stack/nope/tile?x=10&y=10")).status == 404
            assert (await c.get("/api/stack/M27_L_300s_bin1/tile?y=10")).status == 400
            page = await c.get("/")
            assert page.status == 200 and "app.js" in await page.text()
            assert (await c.get("/static/app.js")).status == 200
            assert (await c.get("/static/../server.py")).status in (403, 404)
        finally:
            await c.close()
    run(go())


def test_stack_preview_and_last_sub_thumbnail():
    made: list[str] = []

    async def thumbnail(path: str) -> bytes:
        made.append(path)
        await asyncio.sleep(0.05)
        return b"\xff\xd8" + path.encode()

    async def go():
        d = FakeDaemon()
        c = TestClient(TestServer(make_app(d, WebConfig(port=0, password="p"), thumbnail=thumbnail)))
        await c.start_server()
        try:
            r = await c.get("/api/stack/M27_L_300s_bin1/preview.jpg")
            assert r.status == 200 and r.headers["X-Image-Width"] == "4000" and r.headers["X-Image-Height"] == "3000"
            assert (await c.get("/api/stack/nope/preview.jpg")).status == 404
            assert (await c.get("/api/last_sub.jpg")).status == 404  # no frame yet
            d.emit("frame", {"path": "/c/a.fits", "accepted": True})
            d.emit("frame", {"path": "/c/bad.fits", "accepted": False, "error": True, "reason": "corrupt"})
            async def fetch():
                return await (await c.get("/api/last_sub.jpg")).read()

            bodies = await asyncio.gather(*[fetch() for _ in range(5)])  # at once
            assert set(bodies) == {b"\xff\xd8/c/a.fits"} and made == ["/c/a.fits"]  # made once, not of the corrupt file
        finally:
            await c.close()
    run(go())


def test_commands_need_the_password():
    async def go():
        d = FakeDaemon()
        c = await _client(d)
        try:
            cmd = json.dumps({"id": 1, "action": "pause"})
            r = await c.post("/api/cmd", data=cmd)
            assert r.status == 401 and (await r.json())["ok"] is False
            r = await c.post("/api/cmd", data=cmd, headers={"Authorization": "Bearer wrong"})
            assert r.status == 401
            assert d.commands == [] and d.state == "running"  # nothing changed
            r = await c.post("/api/cmd", data=cmd, headers={"Authorization": "Bearer s3cret"})
            assert r.status == 200 and await r.json() == {"id": 1, "ok": True, "action": "pause"}
            assert d.state == "paused"
            r = await c.post("/api/cmd", data=b"[1]", headers={"Authorization": "Bearer s3cret"})
            assert r.status == 400 and len(d.commands) == 1
        finally:
            await c.close()
    run(go())


def test_page_session_is_csrf_safe():
    async def go():
        d = FakeDaemon()
        c = await _client(d)
        try:
            cmd = json.dumps({"id": "a", "action": "pause"})
            assert (await c.post("/api/login", json={"password": "nope"})).status == 401
            r = await c.post("/api/login", json={"password": "s3cret"})
            body = await r.json()
            assert r.status == 200 and body["ok"]
            cookie = r.cookies["lb_session"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            # the cookie alone (what a cross-site form would carry) is not enough
            assert (await c.post("/api/cmd", data=cmd)).status == 401
            # a foreign page cannot log the phone in either (login CSRF), nor can a sandboxed one
            for origin in ("http://evil.example", "null"):
                assert (await c.post("/api/login", json={"password": "s3cret"},
                                     headers={"Origin": origin})).status == 403
            # a foreign page's script with the token is refused by its Origin
            r = await c.post("/api/cmd", data=cmd, headers={"X-CSRF-Token": body["csrf"],
                                                            "Origin": "http://evil.example"})
            assert r.status == 401 and d.commands == []
            r = await c.post("/api/cmd", data=cmd, headers={"X-CSRF-Token": body["csrf"]})
            assert r.status == 200 and d.state == "paused"
            s = await (await c.get("/api/session")).json()
            assert s == {"password_set": True, "logged_in": True, "csrf": body["csrf"]}
            await c.post("/api/logout")
            assert (await c.post("/api/cmd", data=cmd, headers={"X-CSRF-Token": body["csrf"]})).status == 401
        finally:
            await c.close()
    run(go())


def test_login_attempts_are_rate_limited():
    async def go():
        c = await _client(FakeDaemon())
        try:
            codes = [(await c.post("/api/login", json={"password": f"guess{i}"})).status for i in range(5)]
            assert codes == [401] * 5
            r = await c.post("/api/login", json={"password": "s3cret"})  # right, but too soon
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0
            r = await c.post("/api/cmd", data="{}", headers={"Authorization": "Bearer s3cret"})
            assert r.status == 429  # the same budget for Bearer guesses
        finally:
            await c.close()
    run(go())
    lim = RateLimiter(max_failures=2, window_s=10)
    lim.failed("a", now=0)
    lim.failed("a", now=1)
    assert lim.retry_after_s("a", now=2) == 8 and lim.retry_after_s("b", now=2) == 0
    assert lim.retry_after_s("a", now=10.5) == 0  # the first failure has left the window


def test_without_password_the_page_is_view_only():
    async def go():
        d = FakeDaemon()
        c = await _client(d, password=None)
        try:
            r = await c.post("/api/cmd", data=json.dumps({"id": 1, "action": "pause"}),
                             headers={"Authorization": "Bearer "})
            assert r.status == 403 and "no [web] password" in (await r.json())["error"]
            assert (await c.post("/api/login", json={"password": ""})).status == 403
            assert (await (await c.get("/api/session")).json())["password_set"] is False
            assert d.commands == []
        finally:
            await c.close()
    run(go())


def test_live_channel_pushes_status_and_frames():
    async def go():
        d = FakeDaemon()
        c = await _client(d)
        try:
            ws = await c.ws_connect("/api/live")
            first = json.loads((await ws.receive()).data)
            assert first == {"kind": "status", "data": d.status()}
            d.emit("frame", {"path": "/c/x.fits", "accepted": True})
            await c.post("/api/cmd", data=json.dumps({"id": 2, "action": "pause"}),
                         headers={"Authorization": "Bearer s3cret"})
            got = [json.loads((await ws.receive(timeout=5)).data) for _ in range(2)]
            assert got[0] == {"kind": "frame", "data": {"path": "/c/x.fits", "accepted": True}}
            assert got[1]["kind"] == "status" and got[1]["data"]["state"] == "paused"
            await ws.close()
        finally:
            await c.close()
        assert d.listeners == []  # unsubscribed when the server stopped
    run(go())


def test_tile_is_the_full_resolution_preview_stretch():
    """A crop stretched with the whole stack's transfer equals that region of the full-size
    stretch (an image under the preview's max edge is stretched at full resolution)."""
    rng = np.random.default_rng(3)
    image = rng.normal(1000, 20, (300, 400, 3)).astype(np.float32)
    image[100:110, 200:210] += 5000  # a star
    image[0:5, 0:5] = np.nan  # not stacked yet
    full = stretch_uint8(image, StretchSettings(max_edge=1280))
    tile = crop_for_tile(image, 205, 105, 64)
    assert (tile.x0, tile.y0) == (173, 73) and tile.pixels.shape == (64, 64, 3)
    assert not tile.pixels.flags.writeable and not np.shares_memory(tile.pixels, image)
    assert np.array_equal(apply_transfer(tile.pixels, tile.transfer), full[73:137, 173:237])
    edge = crop_for_tile(image, 0, 0, 64)  # shifted inside, NaN black
    assert (edge.x0, edge.y0) == (0, 0)
    assert (apply_transfer(edge.pixels, edge.transfer)[0:5, 0:5] == 0).all()
    assert tile_jpeg(tile)[:2] == b"\xff\xd8"


def test_web_config_defaults_and_tls_pair():
    cfg = config_from_dict({"capture": {"dir": "c"}, "state": {"dir": "s"}, "web": {}}, "t.toml")
    assert cfg.web == WebConfig(host="0.0.0.0", port=8080, password=None)
    assert config_from_dict({"capture": {"dir": "c"}, "state": {"dir": "s"}}, "t.toml").web is None
    with pytest.raises(ConfigError, match=r"t.toml: \[web\] cert_file and key_file"):
        config_from_dict({"capture": {"dir": "c"}, "state": {"dir": "s"}, "web": {"cert_file": "x.pem"}}, "t.toml")
    with pytest.raises(ConfigError, match=r"\[web\] prot: unknown key"):
        config_from_dict({"capture": {"dir": "c"}, "state": {"dir": "s"}, "web": {"prot": 1}}, "t.toml")


def test_https_with_cert_and_key(tmp_path):
    """[web] cert_file/key_file: the server speaks TLS and the session cookie is Secure."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    async def go():
        server = WebServer(FakeDaemon(), WebConfig(host="127.0.0.1", port=0, password="pw", cert_file=cert,
                                                   key_file=key))
        await server.start()
        try:
            assert server.url.startswith("https://127.0.0.1:")
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.check_hostname = False
            async with aiohttp.ClientSession() as s:
                async with s.get(server.url + "api/status", ssl=ctx) as r:
                    assert r.status == 200 and (await r.json())["state"] == "running"
                async with s.post(server.url + "api/login", json={"password": "pw"}, ssl=ctx) as r:
                    assert r.cookies["lb_session"]["secure"]
                with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port
                    async with s.get(server.url.replace("https", "http") + "api/status") as r:
                        await r.read()
        finally:
            await server.stop()
    run(go())
    bad = WebServer(FakeDaemon(), WebConfig(port=0, cert_file=tmp_path / "none.pem", key_file=key))
    with pytest.raises(ValueError, match="none.pem"):
        run(bad.start())


def test_last_sub_thumbnail_is_the_frame_itself(tmp_path):
    """The thumbnail is the sub as received (stretched), not the stack: it follows the frame's
    own pixels (rank correlation; a shifted crop is the control); an unreadable file is an
    error naming it."""
    path = make_frame(tmp_path / "L_7.fits", 7)
    data = np.asarray(load_frame(path).data, float)
    jpeg = thumbnail_of(str(path))
    thumb = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE).astype(float)
    assert thumb.shape == data.shape  # under THUMB_EDGE: not resized

    def rank_corr(a, b):
        return np.corrcoef(np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel())))[0, 1]

    assert rank_corr(thumb, data) > 0.9 > 0.5 > rank_corr(thumb[:-6], data[6:])
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  = T" + b"\0" * 100)
    with pytest.raises((OSError, ValueError), match="broken.fits"):
        thumbnail_of(str(bad))
