"""Stack products other tools can use: capture keywords, Siril's conventions, a celestial WCS
through the stack's geometry, BOTTOM-UP rows that match the preview, ASCII-safe names."""

from __future__ import annotations

import asyncio
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from daemon.io.fits import write_fits
from daemon.io.load import load_frame
from daemon.io.wcs import StackGeometry, frame_wcs, stack_wcs, wcs_header
from daemon.pipeline.geometry import SUPERPIXEL
from daemon.pipeline.live import LivePipeline
from daemon.products import inputs_from_header, preview_image, preview_jpeg, write_stack
from daemon.service import Service
from tests.conftest import shared_set
from tests.test_daemon_service import make_config, make_frame, wait_for


def _wcs(header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        return WCS(header).celestial


def _sky_distance_arcsec(a, b) -> float:
    (ra1, de1), (ra2, de2) = (np.radians(np.asarray(v, float)) for v in (a, b))
    hav = np.sin((de2 - de1) / 2) ** 2 + np.cos(de1) * np.cos(de2) * np.sin((ra2 - ra1) / 2) ** 2
    return float(np.degrees(2 * np.arcsin(np.sqrt(hav))) * 3600)  # haversine: exact at small angles


@pytest.fixture(scope="module")
def m27_stack(tmp_path_factory):
    out = tmp_path_factory.mktemp("m27") / "stack.fits"
    frames = sorted(shared_set("als_m27").glob("*.fits"))
    pipe = LivePipeline()
    for f in frames:
        assert pipe.process(load_frame(f)).accepted
    write_stack(out, pipe)
    return out, pipe, frames


@pytest.mark.realdata
def test_m27_stack_header_has_capture_keywords_siril_counts_and_the_sky(m27_stack):
    out, pipe, frames = m27_stack
    with fits.open(out) as hdul:
        h, data = hdul[0].header, hdul[0].data
    ref_header = fits.getheader(frames[0])
    for key in ("INSTRUME", "TELESCOP", "FILTER", "GAIN", "FOCALLEN", "XBINNING", "YBINNING"):
        assert h[key] == ref_header[key], key
    assert h["XPIXSZ"] == h["YPIXSZ"] == ref_header["PIXSIZE1"]  # full-resolution debayer: the sensor pitch
    assert "OBJECT" not in h  # 'Unknown' in every input: nothing to agree on
    assert h["STACKCNT"] == h["NCOMBINE"] == 6
    assert h["EXPTIME"] == 6.0 and h["LIVETIME"] == 36.0  # one sub; the total
    assert h["DATE-OBS"] == ref_header["DATE-OBS"] and h["DATE-END"] > h["DATE-OBS"]
    assert abs(h["RA"] - 299.92498) < 0.01 and abs(h["DEC"] - 22.72205) < 0.01
    assert h["OBJCTRA"].startswith("19 59 4") and h["OBJCTDEC"].startswith("+22 43")
    assert h["ROWORDER"] == "BOTTOM-UP"
    assert len(inputs_from_header(h)) == 6 and h["REFFRAME"] == frames[0].name
    # The celestial WCS: a stack pixel shows the sky the reference frame's own WCS gives for
    # the same array position (the stack lies on the reference frame, written bottom-up).
    w, ref = _wcs(h), _wcs(ref_header)
    height, width = data.shape[1:]
    centre = w.pixel_to_world_values((width - 1) / 2, (height - 1) / 2)
    assert _sky_distance_arcsec(centre, ref.pixel_to_world_values((width - 1) / 2, (height - 1) / 2)) < 0.1
    for col, row in ((100, 50), (1200, 900), (40, 700)):  # array (top-down) positions
        stack_sky = w.pixel_to_world_values(col, height - 1 - row)  # FITS: first stored row at the bottom
        assert _sky_distance_arcsec(stack_sky, ref.pixel_to_world_values(col, row)) < 0.1
    # control: the same pixel read top-down is elsewhere on the sky (the flip is in the WCS)
    assert _sky_distance_arcsec(w.pixel_to_world_values(100, 50), ref.pixel_to_world_values(100, 50)) > 60


@pytest.mark.realdata
def test_m27_fits_shown_first_row_at_bottom_matches_the_preview(m27_stack, tmp_path):
    out, pipe, _ = m27_stack
    jpeg = cv2.imdecode(np.frombuffer(preview_jpeg(pipe.stack_image(), max_edge=1304), np.uint8),
                        cv2.IMREAD_COLOR)[..., ::-1].astype(float)
    stored = np.moveaxis(fits.getdata(out), 0, 2)  # (H, W, 3) in stored row order
    # What DS9/Siril/imshow(origin="lower") display: stored row 0 at the bottom of the screen.
    on_screen = np.asarray(stored[::-1], np.float32)
    shown = preview_image(np.ascontiguousarray(on_screen), max_edge=1304).astype(float)
    assert np.array_equal(preview_image(np.ascontiguousarray(on_screen), max_edge=1304),
                          preview_image(pipe.stack_image(), max_edge=1304))
    def blocks(img):  # 8x8 means: JPEG's block noise averaged out, the scene kept
        h, w = (img.shape[0] // 8) * 8, (img.shape[1] // 8) * 8
        return img[:h, :w].reshape(h // 8, 8, w // 8, 8, -1).mean(axis=(1, 3)).ravel()

    same = np.corrcoef(blocks(shown), blocks(jpeg))[0, 1]
    upside_down = np.corrcoef(blocks(shown[::-1]), blocks(jpeg))[0, 1]  # what TOP-DOWN files showed
    assert same > 0.98 and upside_down < same - 0.2, (same, upside_down)


def _sip_wcs() -> WCS:
    h = fits.Header()
    h.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "CRVAL1": 83.8, "CRVAL2": -5.4,
              "CRPIX1": 700.5, "CRPIX2": 480.25, "CD1_1": -3.1e-4, "CD1_2": 1.2e-4, "CD2_1": 1.1e-4,
              "CD2_2": 3.0e-4, "A_ORDER": 2, "B_ORDER": 2, "A_2_0": 2e-6, "A_1_1": -1e-6, "A_0_2": 3e-7,
              "B_2_0": -4e-7, "B_1_1": 2e-6, "B_0_2": 1e-6})
    return _wcs(h)


@pytest.mark.parametrize("geometry", [StackGeometry(), SUPERPIXEL, StackGeometry(0.5, -0.25, -0.25)],
                         ids=["full", "superpixel", "drizzle x2"])
@pytest.mark.parametrize("bottom_up", [True, False])
def test_stack_wcs_maps_every_stack_pixel_to_the_reference_sky(geometry, bottom_up):
    ref = _sip_wcs()
    height = 960 // geometry.scale
    w = stack_wcs(ref, geometry, int(height), bottom_up=bottom_up)
    w = _wcs(wcs_header(w))  # through the header cards, as a reader gets it
    rng = np.random.default_rng(3)
    c, r = rng.uniform(0, 1400 / geometry.scale, 50), rng.uniform(0, height - 1, 50)
    x, y = geometry.scale * c + geometry.x0, geometry.scale * r + geometry.y0  # reference array position
    expected = ref.pixel_to_world_values(x, y)
    got = w.pixel_to_world_values(c, height - 1 - r if bottom_up else r)
    err = max(_sky_distance_arcsec((a, b), (p, q)) for a, b, p, q in zip(*got, *expected, strict=True))
    assert err < 1e-3, err
    assert w.sip is not None  # the distortion is carried, not dropped


def test_bottom_up_input_frame_wcs_follows_its_flipped_pixels(tmp_path):
    ref = _sip_wcs()
    data = np.zeros((60, 80), np.float32)
    data[10, 20] = 1000.0  # a star at array (x=20, y=10) of the top-down frame
    header = wcs_header(ref)
    header["ROWORDER"] = "BOTTOM-UP"
    fits.writeto(tmp_path / "bu.fits", data[::-1], header)  # stored bottom-up
    frame = load_frame(tmp_path / "bu.fits")
    assert frame.data[10, 20] == 1000.0
    w = _wcs(dict(frame.meta.wcs))
    stored = frame_wcs(header, 60, bottom_up=False)  # the file's WCS on its stored rows
    assert _sky_distance_arcsec(w.pixel_to_world_values(20, 10), stored.pixel_to_world_values(20, 49)) < 1e-6


def test_non_ascii_paths_are_escaped_in_headers_and_read_back(tmp_path):
    path = tmp_path / "M42 星.fits"
    write_stack(path, np.ones((8, 8), np.float32), [{"path": "/cap/Light é 01.fits", "exposure_s": 5.0},
                                                     {"path": "/cap/M42 星.fits", "exposure_s": 5.0}],
                reference="/cap/Light é 01.fits", masters={"dark": "/m/dark é.fits"})
    h = fits.getheader(path)
    assert h["REFFRAME"] == "Light \\xe9 01.fits" and h["DARKFRM"] == "/m/dark \\xe9.fits"
    assert [p["path"] for p in inputs_from_header(h)] == ["/cap/Light é 01.fits", "/cap/M42 星.fits"]
    write_fits(tmp_path / "x.fits", np.zeros((4, 4), np.float32), {"OBJECT": "M42 星", "COMMENT": "é"})
    assert fits.getheader(tmp_path / "x.fits")["OBJECT"] == "M42 \\u661f"


def test_non_ascii_file_names_stack_and_fits_preview_restack_are_written(tmp_path):
    cfg = make_config(tmp_path, None, "x")
    names = ["Light é 01.fits", "M42 星 02.fits", "Ñandú 03.fits", "plain 04.fits"]
    stage = tmp_path / "stage"
    stage.mkdir()

    async def session(expect: int, restack: bool):
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.snapshot.counts["stacked"] == expect and service.status()["queue"] == 0, timeout=90,
                       what=f"{expect} stacked")
        reply = None
        if restack:
            reply = await service.handle_command(b'{"action": "restack", "id": 1}')
        service.request_stop()
        assert await asyncio.wait_for(run, 60) == 0
        return service, reply

    for i, name in enumerate(names[:3]):
        shutil.copy(make_frame(stage / f"{i}.fits", i), cfg.capture.dir / name)
    service, reply = asyncio.run(session(3, True))
    assert reply["ok"], reply
    (stack_name,) = service.snapshot.stacks
    live, final = cfg.output_dir / f"{stack_name}.fits", Path(reply["path"])
    assert final.name == f"{stack_name}_final.fits" and final.exists()
    assert (cfg.output_dir / "preview.jpg").read_bytes()[:2] == b"\xff\xd8"
    for product in (live, final):
        got = sorted(Path(p["path"]).name for p in inputs_from_header(fits.getheader(product)))
        assert got == sorted(names[:3]), product
    # after a restart the same stack keeps being written, with the next frame in it
    before = live.stat().st_mtime_ns
    shutil.copy(make_frame(stage / "3.fits", 3), cfg.capture.dir / names[3])
    asyncio.run(session(4, True))
    assert live.stat().st_mtime_ns > before
    assert fits.getheader(live)["NCOMBINE"] == 4 and fits.getheader(final)["NCOMBINE"] == 4
