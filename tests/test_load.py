"""Frame loading: FITS data types, header dialects, Bayer/row order, broken files, raw (DNG), real sets."""

from __future__ import annotations

import gzip
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.io.fits import write_fits
from daemon.io.load import FrameError, FrameLoader, LoadOptions, load_frame
from daemon.pipeline.frame import FrameType

RNG = np.random.default_rng(7)


def _write(path: Path, data: np.ndarray, header: dict | None = None, **kw) -> Path:
    hdu = fits.PrimaryHDU(data, header=fits.Header(list((header or {}).items())), **kw)
    hdu.writeto(path)
    return path


# --- data types and HDUs ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
def test_fits_data_types_load_as_exact_float32(tmp_path, dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (info.min, info.max) if info else (-1000.0, 70000.0)
    data = RNG.uniform(max(lo, -2e6), min(hi, 2e6), (6, 9)).astype(dtype)
    data[0, 0], data[0, 1] = max(lo, -2e6), min(hi, 2e6)
    path = tmp_path / "f.fits"
    fits.PrimaryHDU(data).writeto(path)  # astropy writes uint16 as int16 + BZERO=32768
    if dtype is np.uint16:
        assert fits.getheader(path)["BZERO"] == 32768
    frame = load_frame(path)
    assert frame.data.dtype == np.float32
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))


def test_first_image_extension_when_primary_is_empty(tmp_path):
    data = RNG.integers(0, 60000, (5, 7)).astype(np.uint16)
    path = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=fits.Header([("EXPTIME", 3.5)]))]).writeto(path)
    frame = load_frame(path)
    np.testing.assert_array_equal(frame.data, data)
    assert frame.meta.exposure_s == 3.5


def test_bscale_applied(tmp_path):
    hdu = fits.PrimaryHDU(np.array([[12.0, 14.0], [16.0, 18.0]]))
    hdu.scale("int16", bscale=2.0, bzero=10.0)
    path = tmp_path / "s.fits"
    hdu.writeto(path)
    assert fits.getheader(path)["BSCALE"] == 2.0
    np.testing.assert_array_equal(load_frame(path).data, [[12, 14], [16, 18]])


# --- header dialects -----------------------------------------------------------------------------

DIALECTS = {
    "indi_kstars": ({"EXPTIME": 30.0, "FRAME": "Light", "CCD-TEMP": -9.8, "GAIN": 120.0, "OFFSET": 30.0,
                     "XBINNING": 2, "YBINNING": 2, "PIXSIZE1": 3.76, "FOCALLEN": 400.0, "FILTER": "Ha",
                     "OBJECT": "M 31", "OBJCTRA": "00 42 44.30", "OBJCTDEC": "41 16 09.0",
                     "DATE-OBS": "2024-10-01T21:00:00.123", "INSTRUME": "ZWO CCD ASI2600MM Pro"},
                    dict(exposure_s=30.0, frame_type=FrameType.LIGHT, sensor_temp_c=-9.8, gain=120.0, offset=30.0,
                         binning=(2, 2), pixel_size_um=7.52, focal_length_mm=400.0, filter="Ha", target="M 31",
                         ra_deg=10.684583, dec_deg=41.269167, camera="ZWO CCD ASI2600MM Pro")),
    "nina": ({"IMAGETYP": "DARK", "EXPOSURE": 120.0, "EXPTIME": 120.0, "SET-TEMP": -10.0, "CCD-TEMP": -10.1,
              "GAIN": 100, "OFFSET": 50, "XPIXSZ": 3.76, "RA": 83.8221, "DEC": -5.3911, "BAYERPAT": "RGGB",
              "XBAYROFF": 0, "YBAYROFF": 0, "ROWORDER": "TOP-DOWN", "DATE-OBS": "2024-01-02T03:04:05.678901"},
             dict(exposure_s=120.0, frame_type=FrameType.DARK, set_temp_c=-10.0, sensor_temp_c=-10.1, gain=100.0,
                  offset=50.0, pixel_size_um=3.76, ra_deg=83.8221, dec_deg=-5.3911, bayer="RGGB")),
    "sharpcap": ({"EXPOINUS": 4000000, "IMAGETYP": "Flat Frame", "TEMPERAT": 21.5, "GAIN": 200,
                  "BAYERPAT": "GRBG", "DATE-OBS": "2023-05-06T07:08:09.1234567"},
                 dict(exposure_s=4.0, frame_type=FrameType.FLAT, sensor_temp_c=21.5, bayer="GRBG")),
    "asiair": ({"EXPOSURE": 0.001, "IMAGETYP": "Bias", "CCD-TEMP": 0.0, "GAIN": 0, "BAYERPAT": "BGGR",
                "DATE-OBS": "2023-05-06T07:08:09", "OBJCTRA": "05 35 17", "OBJCTDEC": "-05 23 28"},
               dict(exposure_s=0.001, frame_type=FrameType.BIAS, sensor_temp_c=0.0, gain=0.0, bayer="BGGR",
                    ra_deg=83.820833, dec_deg=-5.391111)),
    "maxim_darkflat": ({"EXPTIME": 2.0, "IMAGETYP": "Dark Flat", "COLORTYP": "GBRG", "XBAYROFF": 1, "YBAYROFF": 0},
                       dict(exposure_s=2.0, frame_type=FrameType.DARKFLAT, bayer="BGGR")),
    "offset_frame": ({"IMAGETYP": "Offset Frame", "EXPTIME": 0.0}, dict(frame_type=FrameType.BIAS, exposure_s=0.0)),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_header_dialects(tmp_path, dialect):
    header, expect = DIALECTS[dialect]
    meta = load_frame(_write(tmp_path / "h.fits", np.zeros((4, 4), np.uint16), header)).meta
    for key, value in expect.items():
        got = getattr(meta, key)
        if isinstance(value, float):
            assert got == pytest.approx(value, abs=1e-5), key
        else:
            assert got == value, key
    assert meta.date_obs is None or meta.date_obs.tzinfo is not None


def test_missing_cards_are_listed(tmp_path):
    meta = load_frame(_write(tmp_path / "bare.fits", np.zeros((4, 4), np.uint16))).meta
    assert {"EXPTIME", "IMAGETYP", "DATE-OBS", "GAIN", "CCD-TEMP"} <= set(meta.missing)
    assert meta.frame_type is FrameType.LIGHT and meta.exposure_s is None


# --- Bayer patterns and row order ------------------------------------------------------------------

def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    h, w, _ = rgb.shape
    out = np.empty((h, w), dtype=rgb.dtype)
    for k, colour in enumerate(pattern):
        r, c = divmod(k, 2)
        out[r::2, c::2] = rgb[r::2, c::2, "RGB".index(colour)]
    return out


def _planes(data: np.ndarray, pattern: str) -> dict[str, np.ndarray]:
    """Colour value of every pixel position according to `pattern` (NaN where not sampled)."""
    h, w = data.shape
    planes = {c: np.full((h, w), np.nan, np.float32) for c in "RGB"}
    for k, colour in enumerate(pattern):
        r, c = divmod(k, 2)
        planes[colour][r::2, c::2] = data[r::2, c::2]
    return planes


#: Pattern written into a BOTTOM-UP file of even height: the first stored row is the image's last.
_BOTTOM_UP_EVEN = {"RGGB": "GBRG", "BGGR": "GRBG", "GRBG": "BGGR", "GBRG": "RGGB"}


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("height", [8, 7])
def test_bayer_patterns_and_row_orders_give_the_same_colour_planes(tmp_path, pattern, height):
    rgb = RNG.integers(0, 4000, (height, 10, 3)).astype(np.uint16)
    rgb[..., 0] += 10000  # make the channels distinguishable: R ~ 10k+, G ~ 20k+, B ~ 30k+
    rgb[..., 1] += 20000
    rgb[..., 2] += 30000
    cfa = _mosaic(rgb, pattern)
    top = load_frame(_write(tmp_path / "top.fits", cfa, {"BAYERPAT": pattern, "ROWORDER": "TOP-DOWN"}))
    stored_pattern = _BOTTOM_UP_EVEN[pattern] if height % 2 == 0 else pattern
    bottom = load_frame(_write(tmp_path / "bottom.fits", cfa[::-1],
                               {"BAYERPAT": stored_pattern, "ROWORDER": "BOTTOM-UP"}))
    # The same scene cropped by one column, the file saying so with XBAYROFF.
    shifted = load_frame(_write(tmp_path / "off.fits", cfa[:, 1:], {"BAYERPAT": pattern, "XBAYROFF": 1}))
    for frame, truth in ((top, rgb), (bottom, rgb), (shifted, rgb[:, 1:])):
        planes = _planes(frame.data, frame.meta.bayer)
        for i, colour in enumerate("RGB"):
            sampled = ~np.isnan(planes[colour])
            assert sampled.any()
            np.testing.assert_array_equal(planes[colour][sampled], truth[..., i][sampled])
    np.testing.assert_array_equal(top.data, bottom.data)
    assert top.meta.bayer == bottom.meta.bayer == pattern


# --- broken files --------------------------------------------------------------------------------

def _good_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "good.fits", RNG.integers(0, 60000, (100, 120)).astype(np.uint16), {"EXPTIME": 1.0})


def _assert_frame_error(path: Path, *words: str) -> FrameError:
    with pytest.raises(FrameError) as info:
        load_frame(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    for word in words:
        assert word in err.reason.lower(), err.reason
    return err


def test_truncated_data_is_refused(tmp_path):
    path = _good_file(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    err = _assert_frame_error(path, "truncated")
    assert "24000 bytes" in err.reason  # 100 x 120 x 2 bytes promised


def test_half_written_header_is_refused(tmp_path):
    path = _good_file(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    _assert_frame_error(path, "fits")


@pytest.mark.parametrize("content,name,words", [
    (b"", "empty.fits", ("empty",)),
    (b"hello, this is not an image\n" * 10, "text.fits", ("not a readable fits",)),
    (b"\xff\xd8\xff\xe0 jpeg", "photo.jpg", ("unsupported file type (.jpg)",)),
    (b"II*\x00 garbage that is not a raw", "broken.cr2", ("not a readable camera raw",)),
])
def test_non_images_are_refused(tmp_path, content, name, words):
    path = tmp_path / name
    path.write_bytes(content)
    _assert_frame_error(path, *words)


def test_table_only_and_cube_and_missing_are_refused(tmp_path):
    table = tmp_path / "table.fits"
    columns = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), columns]).writeto(table)
    _assert_frame_error(table, "no image")
    cube = _write(tmp_path / "cube.fits", np.zeros((3, 4, 5), np.float32))
    _assert_frame_error(cube, "3-plane")
    _assert_frame_error(tmp_path / "nope.fits", "no such file")


# --- writing -------------------------------------------------------------------------------------

def test_write_fits_roundtrip_atomic_and_rgb(tmp_path):
    data = RNG.normal(100, 5, (6, 8)).astype(np.float32)
    out = tmp_path / "w.fits"
    write_fits(out, data, {"EXPTIME": (12.5, "seconds"), "BAYERPAT": "GBRG", "OBJECT": "M 27", "NAXIS1": 99,
                           "DATE-OBS": datetime(2026, 11, 24, 21, 0, 1, 500000, tzinfo=UTC),
                           "FWHM": float("nan"), "SRCDIR": tmp_path, "NSTARS": np.int64(42)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.fits"]  # no temporary left behind
    frame = load_frame(out)
    np.testing.assert_array_equal(frame.data, data)
    assert (frame.meta.exposure_s, frame.meta.bayer, frame.meta.target) == (12.5, "GBRG", "M 27")
    assert frame.meta.date_obs == datetime(2026, 11, 24, 21, 0, 1, 500000, tzinfo=UTC)
    hdr = fits.getheader(out)
    assert "FWHM" not in hdr and hdr["SRCDIR"] == str(tmp_path) and hdr["NSTARS"] == 42
    assert fits.getheader(out)["BITPIX"] == -32
    rgb = RNG.normal(0, 1, (4, 5, 3)).astype(np.float32)
    write_fits(out, rgb, None)  # overwrite in place
    stored = fits.getdata(out)
    assert stored.shape == (3, 4, 5)
    np.testing.assert_array_equal(np.moveaxis(stored, 0, 2), rgb)


# --- camera raw ----------------------------------------------------------------------------------

def _write_dng(path: Path, mosaic: np.ndarray, pattern: str, black: int) -> Path:
    from pidng.core import RAW2DNG
    from pidng.defs import CFAPattern, DNGVersion, PhotometricInterpretation
    from pidng.dng import DNGTags, Tag

    h, w = mosaic.shape
    t = DNGTags()
    t.set(Tag.ImageWidth, w)
    t.set(Tag.ImageLength, h)
    t.set(Tag.TileWidth, w)
    t.set(Tag.TileLength, h)
    t.set(Tag.Orientation, 1)
    t.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    t.set(Tag.SamplesPerPixel, 1)
    t.set(Tag.BitsPerSample, 16)
    t.set(Tag.CFARepeatPatternDim, [2, 2])
    t.set(Tag.CFAPattern, getattr(CFAPattern, pattern))
    t.set(Tag.BlackLevel, black)
    t.set(Tag.WhiteLevel, 65535)
    t.set(Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]])
    t.set(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])
    t.set(Tag.ExposureTime, [[30, 1]])
    t.set(Tag.PhotographicSensitivity, [800])
    t.set(Tag.DateTimeOriginal, "2026:11:24 21:30:00")
    t.set(Tag.Make, "lightbucket")
    t.set(Tag.Model, "test sensor")
    t.set(Tag.DNGVersion, DNGVersion.V1_4)
    t.set(Tag.DNGBackwardVersion, DNGVersion.V1_2)
    conv = RAW2DNG()
    conv.options(t, path=str(path.parent), compress=False)
    conv.convert(mosaic, filename=path.stem)
    return path


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_dng_gives_black_subtracted_mosaic_and_pattern(tmp_path, pattern):
    black = 512
    mosaic = RNG.integers(black, 16000, (24, 32)).astype(np.uint16)
    path = _write_dng(tmp_path / f"raw_{pattern}.dng", mosaic, pattern, black)
    frame = load_frame(path)
    assert frame.meta.bayer == pattern
    assert frame.data.dtype == np.float32 and frame.data.shape == mosaic.shape
    np.testing.assert_array_equal(frame.data, mosaic.astype(np.float32) - black)
    assert frame.meta.camera == "lightbucket test sensor"
    assert (frame.meta.exposure_s, frame.meta.gain) == (30.0, 800.0)
    assert frame.meta.frame_type is FrameType.LIGHT
    assert load_frame(path, frame_type=FrameType.DARK).meta.frame_type is FrameType.DARK


# --- the real sets ---------------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_als_m27_colour_frames(als_m27):
    files = sorted(als_m27.glob("*.fits"))
    assert len(files) == 6
    for path in files:
        meta = load_frame(path).meta
        assert meta.bayer == "RGGB" and meta.frame_type is FrameType.LIGHT
        assert (meta.exposure_s, meta.gain, meta.binning) == (6.0, 180.0, (1, 1))
        assert meta.camera == "ZWO CCD ASI224MC" and meta.filter == "Luminance"
        assert meta.date_obs is not None and meta.date_obs.year == 2018
        assert meta.ra_deg == pytest.approx(299.925, abs=0.01) and meta.dec_deg == pytest.approx(22.72, abs=0.01)
        assert meta.plate_scale_arcsec == pytest.approx(1.517, abs=0.002)  # header SECPIX1 = 1.5169
        # What INDI did not record here: sensor temperature; OBJECT is INDI's 'Unknown'.
        assert set(meta.missing) == {"CCD-TEMP", "OBJECT"}
    data = load_frame(files[0]).data
    assert data.shape == (976, 1304) and 100 < float(np.median(data)) < 1000
    np.testing.assert_array_equal(data, fits.getdata(files[0]).astype(np.float32))  # astropy agrees


@pytest.mark.realdata
def test_real_jocular_mono_frames_with_quirky_headers(jocular_arp145):
    files = sorted(jocular_arp145.glob("*.fit"))
    assert len(files) == 17
    info = json.loads((jocular_arp145 / "info.json").read_text())
    for path in files:
        frame = load_frame(path)
        meta = frame.meta
        assert frame.data.shape == (580, 752) and meta.bayer is None
        # The file name has local time (CET, UTC+1); the DATE card is UTC.
        hh, mm, ss = map(int, re.search(r"_(\d\d)\.(\d\d)\.(\d\d)_\d+\.fit$", path.name).groups())
        assert meta.date_obs is not None
        assert (meta.date_obs.hour, meta.date_obs.minute, meta.date_obs.second) == (hh - 1, mm, ss)
        # StarlightLive wrote nothing but the date; Jocular keeps exposure and kit in info.json.
        assert meta.exposure_s == info["exposure"] == 15
        assert meta.camera == "SX Lodestar X2 mono"
        assert meta.target == "Arp 145" and meta.telescope == 'SW Quattro 8" CF f4'
        assert meta.ra_deg == pytest.approx(35.790, abs=0.001) and meta.dec_deg == pytest.approx(41.370, abs=0.001)
        assert set(meta.missing) == {"GAIN", "CCD-TEMP", "XPIXSZ", "FOCALLEN"}
    with pytest.warns(fits.verify.VerifyWarning):  # astropy itself complains about the SIMPLE card
        np.testing.assert_array_equal(frame.data, fits.getdata(files[-1]).astype(np.float32))


def test_tile_compressed_fits(tmp_path):
    data = RNG.integers(0, 60000, (30, 40)).astype(np.uint16)
    path = tmp_path / "c.fits.fz"
    header = fits.Header([("EXPTIME", 2.0), ("BAYERPAT", "RGGB")])
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header,
                                                       compression_type="RICE_1")]).writeto(path)
    frame = load_frame(path)
    np.testing.assert_array_equal(frame.data, data)
    assert frame.meta.exposure_s == 2.0 and frame.meta.bayer == "RGGB"


def test_frame_loader_reuses_the_previous_frames_array_only_once_it_is_free(tmp_path, monkeypatch):
    """A stream of 16-bit frames (the service, the bench): frame n+1 is decoded into frame n's
    array when the caller has let go of frame n, never while frame n is still held (its pixels
    are untouched); the pixels are always those of the file."""
    from daemon.io.load import FrameLoader

    rng = np.random.default_rng(4)
    paths = [_write(tmp_path / f"f{i}.fits", rng.integers(0, 65535, (40, 56)).astype(np.uint16)) for i in range(4)]
    load = FrameLoader()

    def address(frame) -> int:
        return frame.data.__array_interface__["data"][0]

    first = load(paths[0])
    kept = first.data.copy()
    second = load(paths[1])  # `first` still held: a new array
    assert address(second) != address(first)
    np.testing.assert_array_equal(first.data, kept)
    at = address(second)
    del second
    third = load(paths[2])  # `second` dropped: its array again
    assert address(third) == at
    np.testing.assert_array_equal(third.data, load_frame(paths[2]).data)
    view = third.data[::2]  # a view keeps the array alive too
    del third
    fourth = load(paths[3])
    assert address(fourth) != at and view.base is not None
    np.testing.assert_array_equal(fourth.data, load_frame(paths[3]).data)
    # The loader keeps the last array alive for reuse; one above REUSE_MAX_BYTES only with
    # keep_large (the default), else that memory goes back as soon as the caller drops the frame.
    import weakref

    import daemon.io.load as load_mod

    kept_alive = weakref.ref(fourth.data)
    del fourth
    assert kept_alive() is not None
    monkeypatch.setattr(load_mod, "REUSE_MAX_BYTES", kept.nbytes - 1)
    fifth = load(paths[0])
    np.testing.assert_array_equal(fifth.data, kept)
    at = address(fifth)
    del fifth
    sixth = load(paths[1])  # large, kept: its array again
    assert address(sixth) == at
    np.testing.assert_array_equal(sixth.data, load_frame(paths[1]).data)
    del sixth
    small_only = FrameLoader(keep_large=False)
    seventh = small_only(paths[0])
    np.testing.assert_array_equal(seventh.data, kept)
    freed = weakref.ref(seventh.data)
    del seventh
    assert freed() is None


def test_large_frames_are_kept_only_where_the_pipeline_holds_them_anyway(tmp_path):
    """Mono and fused full-resolution colour hold a frame's pixels through its processing: the
    loader may keep them for the next frame. Superpixel (and the unfused path) free a colour
    mosaic once debayered, which a kept array would outlive."""
    from daemon.pipeline.live_settings import LiveSettings

    assert LiveSettings().holds_frames and LiveSettings(debayer="drizzle").holds_frames
    assert not LiveSettings(debayer="superpixel").holds_frames
    assert not LiveSettings(fused=False).holds_frames
    # The service's loader follows its [stack] debayer.
    from daemon.config import config_from_dict
    from daemon.service import Service

    for debayer, keep in (("bilinear", True), ("superpixel", False)):
        (tmp_path / debayer).mkdir()
        cfg = config_from_dict({"capture": {"dir": str(tmp_path / debayer / "capture")},
                                "state": {"dir": str(tmp_path / debayer / "state")},
                                "stack": {"debayer": debayer}}, "test.toml")
        assert Service(cfg).session.loader.keep_large is keep


def test_an_array_reserved_for_the_first_frame_takes_it(tmp_path, monkeypatch):
    """`reserve` (a plan's first exposure, `Session.prepare`): the first frame of that shape is
    decoded into the array made ahead; a frame of another shape gets its own; None keeps none."""
    import daemon.io.load as load_module

    given = []
    original = load_module.load_frame

    def spy(path, frame_type=None, *, out=None, options=None):
        given.append(out)
        return original(path, frame_type, out=out, options=options)

    monkeypatch.setattr(load_module, "load_frame", spy)
    path = tmp_path / "a.fits"
    data = np.arange(60 * 80, dtype=np.uint16).reshape(60, 80)
    fits.writeto(path, data)
    load = load_module.FrameLoader(keep_large=False)
    load.reserve((60, 80))
    frame = load(path)
    assert given[-1] is not None and given[-1].shape == (60, 80) and np.shares_memory(frame.data, given[-1])
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    del frame
    load.reserve((61, 80))
    frame = load(path)
    assert given[-1].shape == (61, 80) and not np.shares_memory(frame.data, given[-1])
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    del frame
    load.reserve(None)
    load(path)
    assert given[-1] is None


# --- the header alone, while the file is being written --------------------------------------------

@pytest.mark.parametrize("roworder", [None, "TOP-DOWN", "BOTTOM-UP"])
def test_a_frames_header_tells_its_shape_and_metadata_before_its_data_is_written(tmp_path, roworder):
    """`FrameLoader.peek`: what the loader will say of a frame, from the header alone."""
    header = {"BAYERPAT": "GRBG", "EXPTIME": 30.0, "OBJECT": "M27", "FILTER": "L", "IMAGETYP": "Light Frame"}
    if roworder:
        header["ROWORDER"] = roworder
    path = _write(tmp_path / "f.fits", RNG.integers(0, 60000, (8, 12)).astype(np.uint16), header)
    loader = FrameLoader()
    frame = load_frame(path)
    shape, meta = loader.peek(path)
    assert shape == frame.data.shape == (8, 12)
    assert (meta.bayer, meta.exposure_s, meta.target, meta.filter, meta.frame_type) == (
        frame.meta.bayer, 30.0, "M27", "L", FrameType.LIGHT)
    assert meta.bayer == ("BGGR" if roworder == "BOTTOM-UP" else "GRBG")  # 8 rows flipped: B G first
    # Still being written: the header and a few rows only.
    raw = path.read_bytes()
    part = tmp_path / "part.fits"
    part.write_bytes(raw[:2880 + 40])
    with pytest.raises(FrameError, match="still being written"):
        load_frame(part)
    assert loader.peek(part)[0] == (8, 12)


def test_a_header_that_does_not_tell_yet_or_at_all_gives_nothing(tmp_path):
    path = _write(tmp_path / "f.fits", np.zeros((40, 50), np.uint16), {"EXPTIME": 1.0})
    raw = path.read_bytes()
    cases = {"half a header": raw[:1000], "no END card yet": raw[:2880 - 80], "not FITS": b"x" * 6000,
             "empty": b""}
    for name, content in cases.items():
        (tmp_path / f"{name}.fits").write_bytes(content)
        assert FrameLoader().peek(tmp_path / f"{name}.fits") is None, name
    # A cube, an image in an extension only, a gzip stream: the loader decides when it is complete.
    _write(tmp_path / "cube.fits", np.zeros((3, 4, 5), np.uint16))
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 5), np.uint16))]).writeto(tmp_path / "ext.fits")
    (tmp_path / "g.fits").write_bytes(gzip.compress(raw))
    for name in ("cube", "ext", "g"):
        assert FrameLoader().peek(tmp_path / f"{name}.fits") is None, name
    assert FrameLoader().peek(tmp_path / "missing.fits") is None
    # Larger than the decode limit: the loader would refuse it, nothing is made for it.
    assert FrameLoader(LoadOptions(max_frame_bytes=40 * 50 * 4)).peek(path)[0] == (40, 50)
    assert FrameLoader(LoadOptions(max_frame_bytes=40 * 50 * 4 - 1)).peek(path) is None


@pytest.mark.realdata
def test_real_als_m27_headers_peek_as_they_load(als_m27):
    for path in sorted(als_m27.glob("*.fits"))[:2]:
        frame = load_frame(path)
        shape, meta = FrameLoader().peek(path)
        assert shape == frame.data.shape and meta.bayer == frame.meta.bayer == "RGGB"
        assert (meta.exposure_s, meta.filter, meta.frame_type) == (6.0, "Luminance", FrameType.LIGHT)
