"""The page's pointing and focus section in a real browser (Debian's chromium, headless),
served by the real web server over a fake daemon: the plate solve's centre and error, the
centring, the focus curve drawn live from `focusing` events and then the `autofocus` result."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.config import WebConfig
from daemon.reference_solve import solve_event
from daemon.solve import Solution
from daemon.web.server import WebServer
from tests.test_web import FakeDaemon

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CURVE = [{"position": p, "hfr_px": round(1.5 * (1 + ((p - 36667) / 4000) ** 2) ** 0.5, 3), "n_stars": 40}
         for p in range(24667, 48668, 4000)]
FOCUS = {"event": "autofocus", "ok": True, "position": 36700, "hfr_px": 1.52, "hfr_px_start": 4.75,
         "curve": CURVE, "reason": None, "model": "hyperbola", "trigger": "command", "temperature_c": 3.0}


class PointingDaemon(FakeDaemon):
    def __init__(self):
        super().__init__()
        sol = Solution(ok=True, ra_deg=299.9334, dec_deg=22.7107, scale_arcsec_px=1.4815, rotation_deg=56.92,
                       parity="neg", n_stars=177, elapsed_s=2.3)
        self.extra = {"solve": solve_event("M27_L_300s_bin1", "/cap/Light_1069.fits", sol,
                                           target=(299.9334, 22.7107 + 12 / 3600)),
                      "focus": FOCUS, "pointing": None}

    def status(self) -> dict:
        return {**super().status(), **self.extra}


@pytest.fixture
def served():
    daemon = PointingDaemon()
    loop = asyncio.new_event_loop()
    server = WebServer(daemon, WebConfig(host="127.0.0.1", port=0, password=None))
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(20)
    yield daemon, loop, server.url
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def red_pixels(page, selector: str, tmp: Path, name: str) -> int:
    box = page.locator(selector).bounding_box()
    shot = page.screenshot(path=str(tmp / f"{name}.png"))
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    x0, y0 = int(box["x"]) + 3, int(box["y"]) + 3
    crop = img[y0:int(box["y"] + box["height"]) - 3, x0:int(box["x"] + box["width"]) - 3]
    return int(np.count_nonzero((crop[..., 0] > 150) & (crop[..., 1] < 90)))


def test_page_shows_the_solve_the_centring_and_the_focus_curve(served, tmp_path):
    daemon, loop, url = served
    expect = sync_api.expect
    emit = lambda kind, payload: loop.call_soon_threadsafe(daemon.emit, kind, payload)  # noqa: E731
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 1400})
            page.goto(url)
            expect(page.locator("#solve-centre")).to_have_text("19h59m44s +22°42′39″")
            expect(page.locator("#solve-error")).to_have_text("12″")
            expect(page.locator("#solve-scale")).to_have_text("1.48″/px · 56.9°")
            expect(page.locator("#solve-note")).to_contain_text("reference Light_1069.fits solved in 2.3 s")
            expect(page.locator("#focus-result")).to_have_text("1.52 px @ 36700")
            expect(page.locator("#focus-note")).to_contain_text("HFR 4.75 → 1.52 px")
            expect(page.locator("#c-focus")).to_have_attribute("data-n", str(len(CURVE)))
            drawn = red_pixels(page, "#c-focus", tmp_path, "curve")
            assert drawn > 7 * 20, drawn  # seven 6x6 points and the chosen position's line
            # The centring, live: the plan's events win over the reference's solve.
            emit("acquisition", {"event": "plan", "state": "centering", "error_arcsec": 366.0, "attempt": 1})
            expect(page.locator("#solve-error")).to_have_text("6.1′")
            emit("acquisition", {"event": "plan", "state": "centered", "error_arcsec": 4.0, "attempt": 2})
            expect(page.locator("#solve-error")).to_have_text("4″")
            expect(page.locator("#solve-note")).to_contain_text("centring: centered at 4″ (try 2)")
            # A new run: the curve restarts with the live samples, then the result.
            for i, point in enumerate(CURVE[:3], 1):
                emit("acquisition", {"event": "focusing", **point, "sample": i, "trigger": "FWHM 4.3 px"})
            expect(page.locator("#c-focus")).to_have_attribute("data-n", "3")
            expect(page.locator("#focus-result")).to_have_text("1.52 px @ 36700")  # the last result stands
            failed = {**FOCUS, "ok": False, "reason": "the minimum lies below the sweep 50000..74000",
                      "curve": CURVE[:3], "trigger": "FWHM 4.3 px"}
            emit("acquisition", failed)
            expect(page.locator("#focus-result")).to_have_text("failed")
            expect(page.locator("#focus-note")).to_contain_text("autofocus failed: the minimum lies below")
            # A reference that did not solve says why.
            emit("acquisition", solve_event("s", "/cap/x.fits", Solution(ok=False, reason="no solution within 30 s")))
            expect(page.locator("#solve-note")).to_contain_text("reference not solved: no solution within 30 s")
            expect(page.locator("#solve-centre")).to_have_text("–")
        finally:
            browser.close()
