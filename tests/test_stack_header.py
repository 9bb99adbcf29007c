"""Stack products other tools can use: capture keywords, Siril's conventions, a celestial WCS
through the stack's geometry, BOTTOM-UP rows that match the preview, ASCII-safe names."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from daemon.io.fits import write_fits
from daemon.io.load import load_frame
from daemon.io.wcs import StackGeometry, frame_wcs, stack_wcs, wcs_header
from daemon.pipeline.geometry import SUPERPIXEL
from daemon.pipeline.live import LivePipeline
from daemon.products import capture_header, inputs_from_header, preview_image, preview_jpeg, stack_header, write_stack
from daemon.service import Service
from tests.conftest import require_tools, shared_set
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
        await wait_for(lambda: service.snapshot.counts["stacked"] == expect and service.status()["queue"] == 0,
                       timeout=90,
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
    before = {p: p.stat().st_mtime_ns for p in (live, final, cfg.output_dir / "preview.jpg")}
    shutil.copy(make_frame(stage / "3.fits", 3), cfg.capture.dir / names[3])
    asyncio.run(session(4, True))
    assert all(p.stat().st_mtime_ns > t for p, t in before.items()), "FITS, re-stack and preview written again"
    assert fits.getheader(live)["NCOMBINE"] == 4 and fits.getheader(final)["NCOMBINE"] == 4


def _solve(path: Path, out: Path) -> WCS:
    """astrometry.net's own answer for the image as stored in the file (its own star detection,
    no hint from our header): the ground truth of what each stored pixel shows."""
    subprocess.run(["solve-field", str(path), "--dir", str(out), "--overwrite", "--no-plots", "--downsample", "2",
                    "--scale-units", "arcsecperpix", "--scale-low", "1.2", "--scale-high", "1.8", "--cpulimit", "60",
                    "--tweak-order", "1", "--new-fits", "none", "--no-remove-lines", "--uniformize", "0"],
                   check=True, capture_output=True, timeout=180)
    return _wcs(fits.getheader(out / (path.stem + ".wcs")))


@pytest.mark.realdata
def test_m27_stack_wcs_and_row_order_agree_with_astrometry_net(m27_stack, tmp_path):
    require_tools("solve-field")
    out, pipe, frames = m27_stack
    with fits.open(out) as hdul:
        stored, h = hdul[0].data, hdul[0].header
    luminance = tmp_path / "stack_l.fits"  # the stack's stored rows, no header: solve-field knows no ROWORDER
    fits.writeto(luminance, stored.mean(axis=0).astype(np.float32))
    solved_stack = _solve(luminance, tmp_path)
    solved_ref = _solve(frames[0], tmp_path)  # INDI's frames: stored top-down = the array
    height, width = stored.shape[1:]
    grid = [(x, y) for x in np.linspace(0, width - 1, 5) for y in np.linspace(0, height - 1, 5)]

    def worst(w, truth):
        return max(_sky_distance_arcsec(w.pixel_to_world_values(x, y), truth.pixel_to_world_values(x, y))
                   for x, y in grid)

    # The reference's true sky carried through the stack's geometry and its BOTTOM-UP rows is
    # the stack's true sky, to the solver's accuracy; read top-down it is not (the control).
    assert worst(stack_wcs(solved_ref, pipe.geometry, height, bottom_up=True), solved_stack) < 3.0
    assert worst(stack_wcs(solved_ref, pipe.geometry, height, bottom_up=False), solved_stack) > 60.0
    # The header's WCS (INDI's pointing and rotation, not a solve) is off the sky by exactly
    # what INDI's WCS is off on the reference frame at the same array position.
    indi = _wcs(fits.getheader(frames[0]))
    for x, y in grid:
        header_err = _sky_distance_arcsec(_wcs(h).pixel_to_world_values(x, y),
                                          solved_stack.pixel_to_world_values(x, y))
        indi_err = _sky_distance_arcsec(indi.pixel_to_world_values(x, height - 1 - y),
                                        solved_ref.pixel_to_world_values(x, height - 1 - y))
        assert abs(header_err - indi_err) < 3.0, (x, y, header_err, indi_err)
    assert np.sign(np.linalg.det(_wcs(h).pixel_scale_matrix)) == np.sign(np.linalg.det(solved_stack.pixel_scale_matrix))


@pytest.mark.realdata
def test_m27_stack_as_siril_shows_it_is_the_preview(m27_stack, tmp_path):
    """Siril (1.0.6 ignores ROWORDER) exports the image as it displays it: the same rows as the
    pipeline's top-down array, which the preview shows. Optional: Siril is not installed by bootstrap."""
    if shutil.which("siril-cli") is None:
        pytest.skip("siril-cli not installed (optional check: apt install siril)")
    out, pipe, _ = m27_stack
    shutil.copy(out, tmp_path / "stack.fits")
    (tmp_path / "export.ssf").write_text("requires 1.0.0\nload stack.fits\nsavetif32 shown\n")
    subprocess.run(["siril-cli", "-d", str(tmp_path), "-s", str(tmp_path / "export.ssf")], check=True,
                   capture_output=True, timeout=120)
    shown = tifffile.imread(tmp_path / "shown.tif").astype(np.float64)
    array = pipe.stack_image().astype(np.float64)  # what preview_jpeg stretches
    ok = np.isfinite(shown) & np.isfinite(array)

    def corr(a):
        return np.corrcoef(a[ok], shown[ok])[0, 1]

    assert corr(array) > 0.999  # Siril normalises to [0, 1]: the same image up to scale
    assert corr(array[::-1]) < 0.5  # control: upside down is another image


def test_capture_header_writes_what_all_inputs_agree_on():
    base = {"camera": "ZWO ASI2600MC", "telescope": "RedCat 51", "target": "M42", "filter": "L", "gain": 100.0,
            "offset": 50.0, "binning": [1, 1], "pixel_size_um": 3.76, "focal_length_mm": 250.0, "sensor_temp_c": -10.2,
            "set_temp_c": -10.0, "site_lat_deg": 52.1, "site_lon_deg": 5.2, "ra_deg": 83.82, "dec_deg": -5.39}
    frames = [dict(base), {**base, "sensor_temp_c": -9.8, "ra_deg": 83.83}, {**base, "sensor_temp_c": -10.0}]
    h = capture_header(frames, SUPERPIXEL)
    for key, value in (("INSTRUME", "ZWO ASI2600MC"), ("TELESCOP", "RedCat 51"), ("OBJECT", "M42"), ("FILTER", "L"),
                       ("GAIN", 100.0), ("OFFSET", 50.0), ("XBINNING", 1), ("YBINNING", 1), ("FOCALLEN", 250.0),
                       ("SET-TEMP", -10.0), ("SITELAT", 52.1), ("SITELONG", 5.2)):
        assert h[key] == value, key
    assert h["CCD-TEMP"] == pytest.approx(-10.0)  # the mean
    assert h["XPIXSZ"] == pytest.approx(2 * 3.76)  # a superpixel stack pixel
    assert h["RA"] == pytest.approx(83.8233, abs=1e-3) and h["DEC"] == pytest.approx(-5.39)
    assert h["OBJCTRA"].startswith("05 35 17") and h["OBJCTDEC"].startswith("-05 23")
    assert "BAYERPAT" not in h  # the stack is debayered: a viewer must not debayer it again
    # what the inputs disagree on (or one lacks) is not written; a pointing spread over 0.5 deg neither
    mixed = [dict(base), {**base, "filter": "R", "gain": None, "ra_deg": 84.9}]
    h = capture_header(mixed)
    assert "FILTER" not in h and "GAIN" not in h and "RA" not in h and "OBJCTRA" not in h
    assert h["INSTRUME"] == "ZWO ASI2600MC" and h["XPIXSZ"] == pytest.approx(3.76)


def test_stack_header_counts_and_exposures_as_siril_writes_them():
    t0 = "2026-11-24T21:00:00"
    prov = [{"path": f"/c/L_{i}.fits", "exposure_s": 30.0, "weight": 1.0,
             "date_obs": f"2026-11-24T21:0{i}:00"} for i in range(3)]
    h = stack_header(prov)
    assert h["STACKCNT"] == h["NCOMBINE"] == 3 and h["EXPTIME"] == 30.0 and h["LIVETIME"] == 90.0
    assert h["DATE-OBS"] == t0 + ".000" and h["DATE-END"] == "2026-11-24T21:02:30.000"


def test_unknown_exposures_are_not_written_as_zero_seconds():
    prov = [{"path": f"/c/L_{i}.fits", "exposure_s": None, "weight": 1.0} for i in range(2)]
    h = stack_header(prov)  # frames whose EXPTIME was absent or bad ('abc'): the header does not say 0 s
    assert "EXPTIME" not in h and "LIVETIME" not in h and h["STACKCNT"] == 2
    assert [p["exposure_s"] for p in inputs_from_header(h)] == [None, None]
    h = stack_header([*prov, {"path": "/c/L_9.fits", "exposure_s": 30.0}])
    assert h["EXPTIME"] == 30.0 and h["LIVETIME"] == 30.0 and "2 of unknown exposure" in h.comments["LIVETIME"]
