"""Input formats: XISF, TIFF and gzip FITS of a real frame read as its FITS; one suffix list;
bounded decode; bad header values are warnings."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.cli import main
from daemon.config import DEFAULT_PATTERNS, ConfigError, config_from_dict
from daemon.io.formats import ALL_SUFFIXES, RAW_SUFFIXES
from daemon.io.load import FrameError, FrameTooLarge, LoadOptions, load_frame
from daemon.watcher import backlog, is_candidate

xisf = pytest.importorskip("xisf")
tifffile = pytest.importorskip("tifffile")

_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE", "COMMENT", "HISTORY", ""}


def _keywords(header: fits.Header) -> dict:
    """A FITS header as XISF FITSKeyword elements (strings quoted as XISF stores them)."""
    out = {}
    for card in header.cards:
        if card.keyword in _STRUCTURAL:
            continue
        value = card.value
        text = f"'{value}'" if isinstance(value, str) else ("T" if value is True else "F" if value is False
                                                            else str(value))
        out[card.keyword] = [{"value": text, "comment": card.comment}]
    return out


def write_formats(src: Path, out: Path) -> dict[str, Path]:
    """The frame `src` (16-bit FITS) as XISF (zstd + byte shuffle), 16-bit TIFF with a sidecar
    carrying its keywords, .fits.gz, and a gzip stream named .fits."""
    out.mkdir(parents=True, exist_ok=True)
    header = fits.getheader(src)
    raw = fits.getdata(src).astype(np.uint16)
    paths = {"xisf": out / "frame.xisf", "tiff": out / "frame.tif", "fits.gz": out / "frame.fits.gz",
             "gzip named .fits": out / "frame_gz.fits"}
    xisf.XISF.write(str(paths["xisf"]), raw[:, :, None], image_metadata={"FITSKeywords": _keywords(header)},
                    codec="zstd", shuffle=True)
    tifffile.imwrite(paths["tiff"], raw)
    sidecar = {c.keyword: c.value for c in header.cards if c.keyword not in _STRUCTURAL}
    (out / "frame.tif.json").write_text(json.dumps(sidecar))
    with open(src, "rb") as fin, gzip.open(paths["fits.gz"], "wb") as fout:
        shutil.copyfileobj(fin, fout)
    shutil.copy(paths["fits.gz"], paths["gzip named .fits"])
    return paths


@pytest.mark.realdata
def test_xisf_tiff_gzip_register_with_the_fits_transform(als_m27, tmp_path, capsys):
    frames = sorted(als_m27.glob("*.fits"))
    reference, src = frames[0], frames[3]
    paths = write_formats(src, tmp_path)
    fits_frame = load_frame(src)
    for kind, path in paths.items():
        frame = load_frame(path)
        np.testing.assert_array_equal(frame.data, fits_frame.data, err_msg=kind)
        assert frame.meta.bayer == fits_frame.meta.bayer == "RGGB", kind
        assert frame.meta.exposure_s == fits_frame.meta.exposure_s, kind
        assert frame.meta.ra_deg == pytest.approx(fits_frame.meta.ra_deg), kind
        assert frame.meta.wcs is not None, kind
    assert main(["register", "--reference", str(reference), "--json", str(src), *map(str, paths.values())]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_path = {Path(r["path"]).name: r for r in rows if "matrix" in r}
    truth = np.array(by_path[src.name]["matrix"])
    assert abs(truth[0, 2]) + abs(truth[1, 2]) > 1.0  # a real shift, not the identity
    for kind, path in paths.items():
        np.testing.assert_array_equal(np.array(by_path[path.name]["matrix"]), truth, err_msg=kind)


def test_tiff_cfa_pattern_from_config_and_colour_tiff_refused(tmp_path):
    data = np.random.default_rng(1).integers(0, 65535, (40, 60)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "m.tiff", data)
    assert load_frame(tmp_path / "m.tiff").meta.bayer is None
    assert load_frame(tmp_path / "m.tiff", options=LoadOptions(tiff_bayer="GBRG")).meta.bayer == "GBRG"
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((40, 60, 3), np.uint16), photometric="rgb")
    with pytest.raises(FrameError, match="colour TIFF"):
        load_frame(tmp_path / "rgb.tif")
    with pytest.raises(ConfigError, match="tiff_bayer"):
        config_from_dict({"capture": {"dir": "/x", "tiff_bayer": "RGBG"}, "state": {"dir": "/y"}})


#: LibRaw's file types as digiKam lists them for its LibRaw engine (core/libs/rawengine/
#: drawfiles.cpp), less `.hdr` and `.cin` (mostly Radiance HDR and Cineon images, not raws).
LIBRAW_SUFFIXES = {f".{s}" for s in (
    "bay bmq cr2 crw cs1 dc2 dcr dng erf fff k25 kdc mdc mos mrw nef orf pef pxn raf raw rdc sr2 srf x3f arw "
    "3fr cine ia kc2 mef nrw qtk rw2 sti rwl srw cr3 ori iiq ari cap").split()}


def test_one_suffix_list_for_watcher_and_loader(tmp_path):
    assert DEFAULT_PATTERNS == tuple(f"*{s}" for s in ALL_SUFFIXES)
    for name in ("a.rw2", "b.KDC", "c.xisf", "d.tiff", "e.fits.gz", "f.fts", "g.srw"):
        assert is_candidate(name, DEFAULT_PATTERNS), name
    assert LIBRAW_SUFFIXES <= set(RAW_SUFFIXES), sorted(LIBRAW_SUFFIXES - set(RAW_SUFFIXES))
    assert len(ALL_SUFFIXES) == len(set(ALL_SUFFIXES))
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image we read")
    with pytest.raises(FrameError, match=r"unsupported file type \(\.jpg\)"):
        load_frame(tmp_path / "x.jpg")
    (tmp_path / "y.cs1").write_bytes(b"not a raw at all" * 64)  # a LibRaw name: LibRaw's answer
    with pytest.raises(FrameError, match="not a readable camera raw file"):
        load_frame(tmp_path / "y.cs1")


#: Suffix lists are spelt once, in daemon/io/formats.py: a tuple or set of two or more
#: quoted image suffixes anywhere else in the code or the example configs is a second list.
_SUFFIX_LIST = re.compile(r"""["'](?:\*)?\.(?:fits?|fts|xisf|tiff?|cr2|cr3|nef|arw|dng|rw2)["']\s*,\s*"""
                          r"""["'](?:\*)?\.[a-z0-9.]+["']""", re.IGNORECASE)


def test_no_second_suffix_list_in_the_repository():
    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("daemon", "drivers", "bench", "scripts", "config", "systemd", "docs")
             for p in (root / d).rglob("*") if p.is_file() and p.suffix in (".py", ".toml", ".sh", ".md", ".js",
                                                                            ".html", ".service")]
    files.append(root / "README.md")
    hits = [f"{p.relative_to(root)}: {m.group(0)}" for p in files if p.name != "formats.py"
            for m in _SUFFIX_LIST.finditer(p.read_text(errors="replace"))]
    assert not hits, hits
    # control: the pattern finds the one list where it is
    assert _SUFFIX_LIST.search((root / "daemon" / "io" / "formats.py").read_text())


def test_default_patterns_hand_on_every_file_narrowed_ones_log_the_rest(tmp_path, caplog):
    names = ["a.fits", "b.xisf", "c.jpg", "d.ser", "no_suffix", "e.tif", "e.tif.json", "info.json",
             "f.fits.CameraSettings.txt", ".hidden.fits", "g.fits.part", "h.fits.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    answered = {"a.fits", "b.xisf", "c.jpg", "d.ser", "no_suffix", "e.tif"}
    for patterns in (None, DEFAULT_PATTERNS):
        assert {p.name for p in backlog(tmp_path, patterns, False)} == answered
        assert not caplog.records
    with caplog.at_level(logging.INFO, logger="daemon.watcher"):
        assert [p.name for p in backlog(tmp_path, ("*.fits",), False)] == ["a.fits"]
    logged = sorted(r.getMessage() for r in caplog.records)
    assert len(logged) == len(answered) - 1 and all("outside capture.patterns (*.fits)" in m for m in logged)
    assert any("c.jpg: not read" in m for m in logged)


def _compressed(path: Path, shape=(4000, 4000)) -> Path:
    """A real tile-compressed (RICE) FITS of zeros: a few KB on disk, `shape` when decoded."""
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros(shape, np.int16), compression_type="RICE_1")]
                 ).writeto(path)
    return path


def test_compressed_frame_over_the_limit_is_refused_before_decoding(tmp_path):
    path = _compressed(tmp_path / "bomb.fits.fz")
    assert path.stat().st_size < 1 << 20
    limit = 32 << 20  # the frame decodes to 4000 x 4000 x 4 B = 61 MiB
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match=r"bomb\.fits\.fz.*4000x4000 pixels would decode to 61 MiB"):
            load_frame(path, options=LoadOptions(max_frame_bytes=limit))
        refused_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        frame = load_frame(path, options=LoadOptions(max_frame_bytes=128 << 20))  # control: decodes
        decoded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frame.data.shape == (4000, 4000)
    assert decoded_peak > 60 << 20
    assert refused_peak < 4 << 20


def test_gzip_bomb_refused_from_its_header(tmp_path):
    header = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 20000), ("NAXIS2", 20000)])
    path = tmp_path / "bomb.fits.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(header.tostring().encode())
        zeros = bytes(1 << 20)
        for _ in range(40):
            gz.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match="20000x20000"):
            load_frame(path, options=LoadOptions(max_frame_bytes=256 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(("cards", "warning", "field", "value"), [
    ({"EXPTIME": "abc"}, "EXPTIME='abc' is not a number", "exposure_s", None),
    ({"EXPTIME": -5.0}, "EXPTIME=-5.0 is outside", "exposure_s", None),
    ({"EXPTIME": 1e9}, "EXPTIME=1000000000.0 is outside", "exposure_s", None),
    ({"EXPTIME": 30.0, "XBINNING": "two"}, "XBINNING='two' is not a binning", "binning", (1, 1)),
    ({"EXPTIME": 30.0, "XBINNING": 0, "YBINNING": 0}, "XBINNING=0 is not a binning", "binning", (1, 1)),
])
def test_bad_header_values_warn_naming_key_and_file(tmp_path, caplog, cards, warning, field, value):
    path = tmp_path / "bad.fits"
    hdu = fits.PrimaryHDU(np.zeros((8, 8), np.uint16))
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)
    with caplog.at_level(logging.WARNING, logger="lightbucket.io"):
        frame = load_frame(path)
    assert getattr(frame.meta, field) == value
    # where a frame without the value goes: the same metadata as a file without the card
    assert any(warning in w and str(path) in w for w in frame.meta.warnings), frame.meta.warnings
    assert any(warning in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.uint16),
                    header=fits.Header([(k, v) for k, v in cards.items() if k == "EXPTIME" and v == 30.0])
                    ).writeto(plain)
    assert getattr(load_frame(plain).meta, field) == value


def _xisf_by_hand(path: Path, data: np.ndarray, image_children: str, block_size: int | None = None) -> Path:
    """A monolithic XISF 1.0 file written from the specification (not by the xisf package):
    signature, header length, XML header, the data block attached at byte 4096 (its
    declared size `block_size`, default the data's)."""
    block = data.astype("<u2").tobytes()
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="http://www.pixinsight.com/xisf">'
           f'<Image geometry="{data.shape[1]}:{data.shape[0]}:1" sampleFormat="UInt16" colorSpace="Gray" '
           f'location="attachment:4096:{block_size or len(block)}">{image_children}</Image></xisf>').encode()
    head = b"XISF0100" + len(xml).to_bytes(4, "little") + bytes(4) + xml
    assert len(head) < 4096
    path.write_bytes(head + bytes(4096 - len(head)) + block)
    return path


def test_xisf_cfa_element_and_keywords_by_the_specification(tmp_path):
    data = np.random.default_rng(5).integers(0, 65535, (6, 10)).astype(np.uint16)
    children = ('<FITSKeyword name="EXPTIME" value="120." comment=""/><FITSKeyword name="IMAGETYP" '
                "value=\"'Dark Frame'\" comment=\"\"/><FITSKeyword name=\"GAIN\" value=\"100\" comment=\"\"/>"
                '<ColorFilterArray pattern="GRBG" width="2" height="2"/>')
    frame = load_frame(_xisf_by_hand(tmp_path / "d.xisf", data, children))
    np.testing.assert_array_equal(frame.data, data)
    assert frame.meta.bayer == "GRBG" and frame.meta.exposure_s == 120.0 and frame.meta.gain == 100.0
    assert frame.meta.frame_type.value == "dark"
    with pytest.raises(FrameTooLarge, match="d.xisf"):
        load_frame(tmp_path / "d.xisf", options=LoadOptions(max_frame_bytes=100))
    truncated = tmp_path / "t.xisf"
    truncated.write_bytes((tmp_path / "d.xisf").read_bytes()[:-10])
    with pytest.raises(FrameError, match="truncated or still being written"):
        load_frame(truncated)


def test_xisf_unicode_keyword_values_are_kept_and_a_huge_block_refused(tmp_path):
    data = np.arange(60, dtype=np.uint16).reshape(6, 10)
    children = ('<FITSKeyword name="OBJECT" value="\'M42 星\'" comment=""/>'
                '<FITSKeyword name="EXPTIME" value="30." comment=""/>')
    frame = load_frame(_xisf_by_hand(tmp_path / "u.xisf", data, children))
    assert frame.meta.target == "M42 星" and frame.meta.exposure_s == 30.0
    np.testing.assert_array_equal(frame.data, data)
    # a data block far larger than the geometry's image is not read
    _xisf_by_hand(tmp_path / "big.xisf", data, children, block_size=99999999)
    with pytest.raises(FrameError, match="data block of 99999999 bytes for an image of 120"):
        load_frame(tmp_path / "big.xisf")


def test_xisf_floats_are_scaled_to_adu_only_when_normalised(tmp_path):
    adu = np.arange(12, dtype=np.float32).reshape(3, 4) * 1000.0  # ADU, written with bounds="0:1" anyway
    xisf.XISF.write(str(tmp_path / "adu.xisf"), adu[:, :, None])
    assert b'bounds="0:1"' in (tmp_path / "adu.xisf").read_bytes()[:2000]
    np.testing.assert_array_equal(load_frame(tmp_path / "adu.xisf").data, adu)
    xisf.XISF.write(str(tmp_path / "norm.xisf"), (adu / 11000.0)[:, :, None])  # control: normalised [0, 1]
    np.testing.assert_allclose(load_frame(tmp_path / "norm.xisf").data, adu / 11000.0 * 65535.0, rtol=1e-6)
