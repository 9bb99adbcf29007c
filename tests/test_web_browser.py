"""The page through the real thing: `lightbucket run` as a subprocess with [web] and a real
mosquitto, driven by Debian's chromium (headless, Playwright against the system browser;
nothing is downloaded). One daemon and one browser for the module; the tests run in order.
The last test drives the page against a fake daemon (a plan running, the broker refusing us:
what the simulator-free rig cannot show).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from daemon.config import WebConfig
from daemon.io.load import load_frame
from daemon.pipeline.resolution import stack_memory_note
from daemon.pipeline.stack import StackSettings
from daemon.web.server import WebServer
from drivers.indiserver import free_port
from tests.conftest import require_tools
from tests.mqtt_broker import MOSQUITTO, Broker, Subscriber
from tests.test_daemon_service import make_frame
from tests.test_web import FakeDaemon

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

pytestmark = pytest.mark.slow
# Commands that work on the pipeline thread (set_reference, restack) can take seconds on a
# loaded 2-core machine: a generous wait for what the page shows (a timeout, not a timing assert).
sync_api.expect.set_options(timeout=20_000)
ROOT = Path(__file__).resolve().parents[1]
LIGHTBUCKET = ROOT / ".venv" / "bin" / "lightbucket"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "clear-skies"
RIG = "web"
STACK = "SIM-FIELD_L_10s_bin1"
VOLATILE = ("time", "disk_free_bytes", "state_bytes")
#: The preview is smaller than the 160 px frames, so a tile at full resolution is told from it.
PREVIEW_EDGE = 100
#: A cold numba cache compiles for minutes before the daemon serves the page (daemon.warmup).
START_TIMEOUT_S = 400


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
preview_max_edge = {PREVIEW_EDGE}
[web]
host = "127.0.0.1"
port = {self.port}
password = "{PASSWORD}"
""")
        self.log = tmp / "daemon.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(LIGHTBUCKET), "run", "--config", str(config)], env=env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.sub = None
        try:
            wait_until(lambda: self._up(), START_TIMEOUT_S, "the page to be served")
            self.sub = Subscriber(self.broker.port, RIG)
        except BaseException:
            self.close()  # no daemon or broker left behind
            raise

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

    def image(self, path: str) -> np.ndarray:
        """A JPEG the daemon serves, as grey levels (float)."""
        return np.asarray(Image.open(io.BytesIO(self.get(path))).convert("L"), float)

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    assert self.proc.wait(30) == 0, self.log.read_text()[-2000:]
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    raise AssertionError("the daemon did not stop on SIGTERM within 30 s") from None
        finally:
            self.broker.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    require_tools(MOSQUITTO, CHROMIUM)
    r = Rig(tmp_path_factory.mktemp("web"))
    try:
        for i in range(3):
            r.add(i)
        wait_until(lambda: r.stacked() == 3 and r.get_json("/api/preview.json"), 60, "three frames stacked")
    except BaseException:
        r.close()  # a set-up that fails leaves no daemon and no broker behind
        raise
    yield r
    r.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def preview_pixels(page, name: str, tmp: Path) -> np.ndarray:
    """The screenshot's pixels where the preview picture is drawn (not the DOM's word for it):
    the image element's box, less the bars of `object-fit: contain`, less 2 px of edge."""
    box = page.locator("#preview").bounding_box()
    nw, nh = page.evaluate("(() => { const i = document.getElementById('preview'); "
                           "return [i.naturalWidth, i.naturalHeight]; })()")
    k = min(box["width"] / nw, box["height"] / nh)
    w, h = nw * k, nh * k
    assert w > 100 and h > 100, (box, nw, nh)
    x0, y0 = box["x"] + (box["width"] - w) / 2, box["y"] + (box["height"] - h) / 2
    shot = page.screenshot(path=str(tmp / f"{name}.png"))
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(float)
    return img[int(round(y0)) + 2:int(y0 + h) - 2, int(round(x0)) + 2:int(x0 + w) - 2]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def assert_shows_preview(pixels: np.ndarray, preview: np.ndarray) -> None:
    """The screenshot's preview box holds the daemon's preview (scaled to the box), in red only
    (night vision: no green or blue light); a mirrored preview is the control."""
    h, w = pixels.shape[:2]
    scaled = np.asarray(Image.fromarray(preview.astype(np.uint8)).resize((w + 4, h + 4), Image.BILINEAR), float)
    scaled = scaled[2:-2, 2:-2]
    red = pixels[..., 0]
    assert red.max() > 150 and red.std() > 10, (red.max(), red.std())
    assert pixels[..., 1:].max() <= 12, pixels[..., 1:].max()  # red only
    match, mirrored = corr(red, scaled), corr(red, scaled[:, ::-1])
    assert match > 0.9 and mirrored < 0.5, (match, mirrored)


def test_phone_page_shows_preview_name_count_and_updates_live(rig, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#stack-name")).to_have_text(STACK)
        sync_api.expect(page.locator("#n-stacked")).to_have_text("3")
        sync_api.expect(page.locator("#link")).to_have_text("live")
        sync_api.expect(page.locator("#mqtt")).to_have_text("connected")
        sync_api.expect(page.locator("#resolution-note-cell")).to_be_hidden()  # full resolution
        page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        assert page.locator("#preview").bounding_box()["y"] < 200  # at the top, not below the fold
        assert_shows_preview(preview_pixels(page, "phone", tmp_path), rig.image("/api/preview.jpg"))
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
        assert page.evaluate("document.getElementById('sub').src").split("?")[0].endswith("/api/last_sub.jpg")

        # A cloudy frame: rejected, marked on the charts, its reason in the log and under the chart.
        make_frame(rig.stage / "cloud.fits", 9, transmission=0.05)
        shutil.copy(rig.stage / "cloud.fits", rig.capture / "cloud.fits")
        sync_api.expect(page.locator("#n-rejected")).to_have_text("1", timeout=30_000)
        sync_api.expect(chart).to_have_attribute("data-rejected", "1")
        sync_api.expect(page.locator("#frames li").first).to_contain_text("rejected: clouds")
        x = page.evaluate("(() => { const p = document.getElementById('c-fwhm')._pick; "
                          "return p.X(p.frames.findIndex((f) => !f.accepted)); })()")
        chart.click(position={"x": x, "y": 60})
        pick = page.locator("#c-fwhm + .pick")
        sync_api.expect(pick).to_contain_text("cloud.fits")
        sync_api.expect(pick).to_contain_text("rejected: clouds")
        chart.click(position={"x": page.evaluate("document.getElementById('c-fwhm')._pick.X(0)"), "y": 60})
        sync_api.expect(pick).to_contain_text("L_0.fits")  # the control: another point, another frame

        # Tap to zoom: a full-resolution tile of the stack around the tapped point. The preview
        # is 100 px wide; the tile shows the stack's own 160 px.
        assert page.evaluate("document.getElementById('preview').naturalWidth") == PREVIEW_EDGE
        page.locator("#preview").click(position={"x": 60, "y": 60})
        sync_api.expect(page.locator("#zoom")).to_be_visible()
        page.wait_for_function("() => document.getElementById('zoom-img').naturalWidth > 0")
        assert page.evaluate("document.getElementById('zoom-img').naturalWidth") == 160  # the whole 160 px frame
        sync_api.expect(page.locator("#zoom-where")).to_contain_text("160×160 px")
        # the tile is centred on the stack pixel under the tap (60 px into a ~372 px picture of 160 px)
        box = page.locator("#preview").bounding_box()
        src = page.evaluate("document.getElementById('zoom-img').src")
        x = int(src.split("x=")[1].split("&")[0])
        assert abs(x - 60 / box["width"] * 160) <= 1, (src, box)
        page.click("#zoom-close")
    finally:
        page.close()


def test_tile_holds_the_stacks_own_pixels(rig):
    """A tile is the stack at full resolution at the place asked for: it matches that crop of
    the stack FITS the daemon wrote (read as the daemon reads it: FITS rows are bottom-up), and
    not a crop 6 px away (the control). Rank correlation: the tile is stretched, not linear."""
    stack = np.nan_to_num(np.asarray(load_frame(rig.tmp / "state" / "output" / f"{STACK}.fits").data, float))
    tile = rig.image(f"/api/stack/{STACK}/tile?x=70&y=90&size=48")
    assert tile.shape == (48, 48)

    def rank_corr(a, b):
        return corr(np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel())))

    here, away = rank_corr(tile, stack[66:114, 46:94]), rank_corr(tile, stack[72:120, 46:94])
    assert here > 0.9 and away < 0.5, (here, away)


def test_pause_needs_the_password_then_pauses(rig, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#state")).to_have_text("running")
        page.click("button[data-action=pause]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("refused")
        assert rig.get_json("/api/status")["state"] == "running"  # nothing changed
        sync_api.expect(page.locator("#login")).to_be_visible()  # the page asks for the password
        sync_api.expect(page.locator("#login-result")).to_contain_text("pause needs the password")
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
        # stop asks too; a stopped daemon resumes only with Start, and the page says so
        page.click("button[data-action=stop]")
        page.click("#confirm button[value=yes]")
        sync_api.expect(page.locator("#state")).to_have_text("stopped")
        sync_api.expect(page.locator("#toast")).to_contain_text("stop: done")  # seen wherever scrolled
        page.click("button[data-action=resume]")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("resume: refused: resume: stacking is stopped")
        page.click("button[data-action=start]")
        sync_api.expect(page.locator("#state")).to_have_text("running")
        assert rig.get_json("/api/status")["state"] == "running"
        # darks matching the lights: the stack's exposure goes with the plan; this rig has no [indi]
        sync_api.expect(page.locator("#darks-label")).to_have_text("Darks matching the lights (10 s)")
        page.fill("#dark-count", "15")
        page.click("#darks")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("plan: refused: plan: no [indi] section")
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
        assert_shows_preview(preview_pixels(page, "desktop", tmp_path), rig.image("/api/preview.jpg"))
        page.click("#night")  # true colour: the control for "red only"
        page.wait_for_timeout(200)
        assert preview_pixels(page, "desktop-colour", tmp_path)[..., 1].max() > 100
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
    # set_reference only takes a file under the capture folder, also through a symlink (to a
    # folder: a symlinked file in the capture folder would be answered as a frame of its own)
    (rig.capture / "elsewhere").symlink_to(rig.stage, target_is_directory=True)
    before = rig.get_json("/api/status")["stacks"]
    for path in ("elsewhere/L_5.fits", str(rig.stage / "L_5.fits"), "../stage/L_5.fits"):
        code, reply = rig.post_cmd({"id": "ref", "action": "set_reference", "path": path})
        assert code == 200 and not reply["ok"] and "is not under the capture folder" in reply["error"], reply
    assert rig.get_json("/api/status")["stacks"] == before


def test_page_works_with_the_broker_down(rig, browser):
    rig.broker.stop()
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        sync_api.expect(page.locator("#n-stacked")).to_have_text("4")
        sync_api.expect(page.locator("#mqtt")).to_contain_text("unreachable", timeout=30_000)
        sync_api.expect(page.locator("#c-fwhm")).to_have_attribute("data-n", "5")  # 4 stacked, the cloud
        rig.add(4)
        sync_api.expect(page.locator("#n-stacked")).to_have_text("5", timeout=30_000)
        sync_api.expect(page.locator("#c-fwhm")).to_have_attribute("data-n", "6")
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


def test_set_reference_from_the_frame_log(rig, browser):
    """The log's "reference" button: asks, then the stack is emptied and stacked again against
    that frame; the reply says how many frames were requeued and what was removed."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(rig.url + "/")
        page.click("#login-open")
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        sync_api.expect(page.locator("#login-open")).to_have_text("log out")
        row = page.locator("#frames li", has_text="L_2.fits").first
        row.locator("button").click()
        sync_api.expect(page.locator("#confirm-text")).to_contain_text("Make L_2.fits the reference?")
        page.click("#confirm button[value=yes]")
        # 5 L frames and the cloudy one go round again
        sync_api.expect(page.locator("#cmd-result")).to_contain_text(
            f'set_reference: done — stack: {STACK}, requeued: 6, removed: {{"frames":5,"spooled_frames":5')
        wait_until(lambda: (lambda st: st["stacks"][STACK] == 5 and st["queue"] == 0)(rig.get_json("/api/status")),
                   60, "the L stack stacked again")
        out = rig.tmp / "state" / "output" / f"{STACK}.fits"  # it named L_0.fits, the first frame
        wait_until(lambda: fits.getheader(out).get("REFFRAME") == "L_2.fits", 30, "the FITS naming the new reference")
    finally:
        page.close()


class ServedFake:
    """The web server over a fake daemon, on a loop in a thread (for what the rig cannot show)."""

    def __init__(self, daemon: FakeDaemon, password: str | None = PASSWORD):
        self.loop = asyncio.new_event_loop()
        self.server = WebServer(daemon, WebConfig(host="127.0.0.1", port=0, password=password))
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.url = self.server.url

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class PlanDaemon(FakeDaemon):
    """A plan running, the camera cooled, the broker refusing the rig's password."""

    plan = {"state": "running", "frame_type": "light", "frame": 12, "count": 60, "eta_s": 14400.2,
            "temperature_c": -9.96, "pier_side": "east"}
    night = {"night_over": False, "halted": False, "entries": [
        {"target": "M 31", "frame_type": "light", "frames": 12, "count": 60, "state": "running"},
        {"target": "M 1", "frame_type": "light", "frames": 0, "count": 20, "state": "pending"}]}

    def status(self) -> dict:
        return {**super().status(), "exposure_s": 300.0, "disk_free_bytes": 51_234_567_168, "mqtt":
                "refused: not authorised", "plan": self.plan, "plan_queue": self.night,
                "resolution_note": NOTE}


#: A `resolution_note` as the daemon words it (`daemon.pipeline.resolution.stack_memory_note`).
NOTE = stack_memory_note((4176, 6248), StackSettings(), 1_900_000_000)


def test_plan_progress_camera_disk_and_broker_state_shown(browser, tmp_path):
    d = PlanDaemon()
    served = ServedFake(d)
    page = browser.new_page(viewport={"width": 360, "height": 740})
    try:
        page.goto(served.url)
        sync_api.expect(page.locator("#plan")).to_have_text("light 12/60 running")
        sync_api.expect(page.locator("#eta")).to_have_text("4 h 00 m")
        sync_api.expect(page.locator("#temp")).to_have_text("-10.0 °C")
        sync_api.expect(page.locator("#disk")).to_have_text("51.2 GB")
        sync_api.expect(page.locator("#mqtt")).to_have_text("refused: not authorised")
        sync_api.expect(page.locator("#mqtt")).to_have_class("mid bad")
        sync_api.expect(page.locator("#plan-note")).to_have_text("pier east")
        sync_api.expect(page.locator("#plans")).to_have_text("M 31 12/60 running · M 1 0/20 pending")
        sync_api.expect(page.locator("#resolution-note")).to_have_text(NOTE)  # superpixel, and why
        assert "superpixel" in NOTE and page.evaluate("document.documentElement.scrollWidth") <= 360
        d.plan = {"state": "waiting", "frame_type": "light", "frame": 0, "count": 60,
                  "start": "2026-12-07T01:30:00+00:00", "reason": "M 1 rises above 20 deg"}
        page.reload()
        sync_api.expect(page.locator("#plan-note")).to_contain_text("waiting until ")
        sync_api.expect(page.locator("#plan-note")).to_contain_text(": M 1 rises above 20 deg")
        d.plan = {"state": "park failed", "error": "slew timeout", "tracking": False}
        page.reload()
        sync_api.expect(page.locator("#plan-note")).to_have_text("park failed: slew timeout — tracking stopped")
        d.plan = {"state": "running", "frame_type": "light", "frame": 12, "count": 60, "eta_s": 14400.2,
                  "temperature_c": -9.96}
        # no picture yet (the fake's JPEG is not one): a sentence, not a broken-image icon
        sync_api.expect(page.locator("#preview-none")).to_be_visible()
        sync_api.expect(page.locator("#preview")).to_be_hidden()
        sync_api.expect(page.locator("#sub")).to_be_hidden()
        page.screenshot(path=str(tmp_path / "plan.png"), full_page=True)
        # darks matching the lights: the current stack's 300 s, the count typed
        page.click("#login-open")
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        sync_api.expect(page.locator("#login-open")).to_have_text("log out")
        page.fill("#dark-count", "12")
        page.click("#darks")
        sync_api.expect(page.locator("#cmd-result")).to_contain_text("plan: done")
        sent = {k: v for k, v in d.commands[-1].items() if k != "id"}
        assert sent == {"action": "plan", "frame_type": "dark", "count": 12, "exposure_s": 300.0}
    finally:
        page.close()
        served.close()


def test_without_a_password_the_page_says_view_only(browser):
    d = FakeDaemon()
    served = ServedFake(d, password=None)
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(served.url)
        sync_api.expect(page.locator("#viewonly")).to_be_visible()
        sync_api.expect(page.locator("#viewonly")).to_contain_text("View only")
        sync_api.expect(page.locator("#login-open")).to_be_hidden()
        sync_api.expect(page.locator("button[data-action=pause]")).to_be_disabled()
        sync_api.expect(page.locator("#n-stacked")).to_have_text("3")  # reading still works
        assert d.commands == []
    finally:
        page.close()
        served.close()
