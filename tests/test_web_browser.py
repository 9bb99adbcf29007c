"""The page through the real thing: `lightbucket run` as a subprocess with [web] and a real
mosquitto, driven by Debian's chromium (headless, Playwright against the system browser;
nothing is downloaded). One daemon and one browser for the module; the tests run in order.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drivers.indiserver import free_port
from tests.conftest import require_tools
from tests.mqtt_broker import MOSQUITTO, Broker, Subscriber
from tests.test_daemon_service import make_frame

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LIGHTBUCKET = ROOT / ".venv" / "bin" / "lightbucket"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "clear-skies"
RIG = "web"
STACK = "SIM-FIELD_L_10s_bin1"
VOLATILE = ("time", "disk_free_bytes", "state_bytes")


def wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Rig:
    """The daemon, its broker, a subscriber and the stage of frames to copy in."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.capture, self.stage = tmp / "capture", tmp / "stage"
        self.capture.mkdir()
        self.stage.mkdir()
        for i in range(6):
            make_frame(self.stage / f"L_{i}.fits", i)
        self.broker = Broker(tmp)
        self.broker.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "web.toml"
        config.write_text(f"""
[capture]
dir = "{self.capture}"
[state]
dir = "{tmp / 'state'}"
checkpoint_every_s = 0
[mqtt]
port = {self.broker.port}
rig = "{RIG}"
preview_interval_s = 0.5
[web]
host = "127.0.0.1"
port = {self.port}
password = "{PASSWORD}"
""")
        self.log = tmp / "daemon.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(LIGHTBUCKET), "run", "--config", str(config)], env=env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_until(lambda: self._up(), 60, "the page to be served")
        self.sub = Subscriber(self.broker.port, RIG)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited: {self.log.read_text()[-2000:]}")
        try:
            return self.get_json("/api/status")["state"] == "running"
        except OSError:
            return False

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post_cmd(self, cmd: dict, password: str | None = PASSWORD) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/api/cmd", data=json.dumps(cmd).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {password}"} if password else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def add(self, i: int) -> None:
        shutil.copy(self.stage / f"L_{i}.fits", self.capture / f".L_{i}.part")
        (self.capture / f".L_{i}.part").rename(self.capture / f"L_{i}.fits")

    def stacked(self) -> int:
        return self.get_json("/api/status")["stacked_current"]

    def close(self) -> None:
        self.sub.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.broker.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    require_tools(MOSQUITTO, CHROMIUM)
    r = Rig(tmp_path_factory.mktemp("web"))
    for i in range(3):
        r.add(i)
    wait_until(lambda: r.stacked() == 3 and r.get_json("/api/preview.json"), 60, "three frames stacked")
    yield r
    r.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def preview_pixels(page, name: str, tmp: Path) -> np.ndarray:
    """The screenshot's pixels inside the preview image's box (not the DOM's word for it)."""
    box = page.locator("#preview").bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100, box
    shot = page.screenshot(path=str(tmp / f"{name}.png"))
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    x0, y0 = int(box["x"]) + 2, int(box["y"]) + 2
    return img[y0:int(box["y"] + box["height"]) - 2, x0:int(box["x"] + box["width"]) - 2]


def test_phone_page_shows_preview_name_count_and_updates_live(rig, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#stack-name")).to_have_text(STACK)
        sync_api.expect(page.locator("#n-stacked")).to_have_text("3")
        sync_api.expect(page.locator("#link")).to_have_text("live")
        page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        pixels = preview_pixels(page, "phone", tmp_path)
        # Stars on a sky: a bright tail over a dark background, far from the flat black page.
        assert pixels.max() > 150 and np.median(pixels) < 120 and pixels.std() > 5, (pixels.max(), pixels.std())
        chart = page.locator("#c-fwhm")
        assert chart.get_attribute("data-n") == "3"
        before = page.evaluate("document.getElementById('c-fwhm').toDataURL()")
        page.evaluate("window.__same_page = true")
        rig.add(3)  # into the watched folder: no reload
        sync_api.expect(page.locator("#n-stacked")).to_have_text("4", timeout=30_000)
        sync_api.expect(chart).to_have_attribute("data-n", "4", timeout=10_000)
        assert page.evaluate("window.__same_page") is True
        assert page.evaluate("document.getElementById('c-fwhm').toDataURL()") != before
        sync_api.expect(page.locator("#frames li")).to_have_count(4)
        sync_api.expect(page.locator("#frames li").first).to_contain_text("L_3.fits")
        page.wait_for_function("() => document.getElementById('sub').naturalWidth > 0")  # the last sub
        # Tap to zoom: a full-resolution tile of the stack around the tapped point.
        page.locator("#preview").click(position={"x": 60, "y": 60})
        sync_api.expect(page.locator("#zoom")).to_be_visible()
        page.wait_for_function("() => document.getElementById('zoom-img').naturalWidth > 0")
        assert page.evaluate("document.getElementById('zoom-img').naturalWidth") == 160  # the whole 160 px frame
        # the tile is centred on the stack pixel under the tap (60 px into a ~372 px picture of 160 px)
        box = page.locator("#preview").bounding_box()
        src = page.evaluate("document.getElementById('zoom-img').src")
        x = int(src.split("x=")[1].split("&")[0])
        assert abs(x - 60 / box["width"] * 160) <= 1, (src, box)
    finally:
        page.close()


def test_pause_needs_the_password_then_pauses(rig, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#state")).to_have_text("running")
        page.click("button[data-action=pause]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("refused")
        assert rig.get_json("/api/status")["state"] == "running"  # nothing changed
        sync_api.expect(page.locator("#login")).to_be_visible()  # the page asks for the password
        page.fill("#password", "wrong")
        page.click("#login-submit")
        sync_api.expect(page.locator("#login-result")).to_contain_text("wrong password")
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        sync_api.expect(page.locator("#login-open")).to_have_text("log out")
        page.click("button[data-action=pause]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("pause: done")
        sync_api.expect(page.locator("#state")).to_have_text("paused")
        assert rig.get_json("/api/status")["state"] == "paused"
        page.click("button[data-action=resume]")
        sync_api.expect(page.locator("#state")).to_have_text("running")
        # reset asks first; "No" changes nothing
        page.click("button[data-action=reset]")
        sync_api.expect(page.locator("#confirm")).to_be_visible()
        page.click("#confirm button[value=no]")
        time.sleep(0.5)
        assert rig.stacked() == 4
    finally:
        page.close()


def test_desktop_screenshot_holds_the_preview(rig, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        page.goto(rig.url + "/")
        page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
        sync_api.expect(page.locator("#n-stacked")).to_have_text("4")
        box = page.locator("#preview").bounding_box()
        assert box["width"] > 500 and box["x"] < 720  # the left column of the two
        pixels = preview_pixels(page, "desktop", tmp_path)
        assert pixels.max() > 150 and np.median(pixels) < 120 and pixels.std() > 5
    finally:
        page.close()


def test_api_status_and_commands_equal_mqtt(rig):
    strip = lambda s: {k: v for k, v in s.items() if k not in VOLATILE}  # noqa: E731
    http = wait_until(lambda: (lambda h: h if rig.sub.json("status") and strip(rig.sub.json("status")[-1]) == strip(h)
                                          else None)(rig.get_json("/api/status")), 20, "MQTT status == HTTP status")
    assert http["stack"] == STACK and http["stacked_current"] == 4
    assert abs(http["disk_free_bytes"] - rig.sub.json("status")[-1]["disk_free_bytes"]) < 1e9
    for cmd in ({"id": "bad", "action": "reset", "stack": "nope"}, {"id": "rs", "action": "restack"},
                {"id": "p", "action": "pause"}, {"id": "r", "action": "resume"}):
        code, over_http = rig.post_cmd(cmd)
        n = len(rig.sub.json("cmd/result"))
        rig.sub.send("cmd", json.dumps(cmd))
        over_mqtt = rig.sub.wait(lambda n=n: rig.sub.json("cmd/result")[n:] and rig.sub.json("cmd/result")[-1],
                                 30, f"MQTT reply to {cmd['id']}")
        assert code == 200 and over_http == over_mqtt, (over_http, over_mqtt)
    assert over_http == {"id": "r", "ok": True, "action": "resume"}
    code, reply = rig.post_cmd({"id": "x", "action": "pause"}, password=None)
    assert code == 401 and rig.get_json("/api/status")["state"] == "running"


def test_page_works_with_the_broker_down(rig, browser):
    rig.broker.stop()
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#n-stacked")).to_have_text("4")
        rig.add(4)
        sync_api.expect(page.locator("#n-stacked")).to_have_text("5", timeout=30_000)
        sync_api.expect(page.locator("#c-fwhm")).to_have_attribute("data-n", "5")
        code, reply = rig.post_cmd({"id": "down", "action": "pause"})
        assert code == 200 and reply["ok"]
        sync_api.expect(page.locator("#state")).to_have_text("paused")
    finally:
        page.close()


def test_switch_between_stacks(rig, browser):
    """A frame of another filter starts a second stack; the page follows it, and picking the
    first one in the list shows that stack's preview and tiles."""
    assert rig.post_cmd({"id": "go", "action": "resume"})[1]["ok"]  # paused by the test before
    make_frame(rig.stage / "R_0.fits", 0, filter_name="R")
    shutil.copy(rig.stage / "R_0.fits", rig.capture / "R_0.fits")
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#stack-name")).to_have_text("SIM-FIELD_R_10s_bin1", timeout=30_000)
        sync_api.expect(page.locator("#stack-select option")).to_have_count(2)
        page.select_option("#stack-select", STACK)
        sync_api.expect(page.locator("#stack-name")).to_contain_text(f"{STACK} (viewing")
        page.wait_for_function("() => document.getElementById('preview').src.startsWith('blob:')")
        page.locator("#preview").click(position={"x": 100, "y": 100})
        page.wait_for_function("() => document.getElementById('zoom-img').naturalWidth > 0")
        assert f"/api/stack/{STACK}/tile" in page.evaluate("document.getElementById('zoom-img').src")
        page.click("#zoom-close")
        # a command from the page goes to the stack picked
        page.click("#login-open")
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        page.click("button[data-action=restack]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text(f"restack: done — stack: {STACK}")
        # reset, confirmed: the R stack is emptied and the reply says what went
        page.select_option("#stack-select", "SIM-FIELD_R_10s_bin1")
        page.click("button[data-action=reset]")
        page.click("#confirm button[value=yes]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text(
            'reset: done — stack: SIM-FIELD_R_10s_bin1, removed: {"frames":1,"spooled_frames":1')
        assert rig.get_json("/api/status")["stacks"] == {STACK: 5, "SIM-FIELD_R_10s_bin1": 0}
    finally:
        page.close()
