"""XISF frames (PixInsight's format, NINA's default): mono or CFA, with their FITS keywords.

A small reader of the XISF 1.0 monolithic file: the signature 'XISF0100', the XML header's
first <Image> (geometry 'width:height:channels', sampleFormat, location 'attachment:pos:size'
or 'inline:base64', optional compression 'codec[+sh]:size[:itemsize]' with zlib, lz4, lz4hc or
zstd and byte shuffling), its <FITSKeyword> elements (read as a FITS header: exposure, gain,
pointing, WCS...) and its <ColorFilterArray pattern=...> (else the BAYERPAT keyword).
Why our own: the size is checked from the geometry before the data block is read (bounded
decode), one frame costs one read of its block, and only the codecs used by capture programs
are needed (lz4 and zstandard are imported only for files that use them).

Orientation: XISF stores the top row first, so arrays are handed out as stored; a ROWORDER
keyword copied from FITS is ignored. Multi-channel (RGB) images are not frames.
"""

from __future__ import annotations

import base64
import os
import struct
import xml.etree.ElementTree as ET
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
from astropy.io import fits

from daemon.io.errors import FrameError
from daemon.io.fits import header_values, meta_with_sidecar
from daemon.io.header import parse_bayer
from daemon.io.limits import check_frame_size
from daemon.io.wcs import frame_wcs, wcs_cards
from daemon.pipeline.frame import BAYER_PATTERNS, Frame

SIGNATURE = b"XISF0100"
_NS = "{http://www.pixinsight.com/xisf}"
_SAMPLE_FORMATS = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "UInt64": "u8", "Float32": "f4",
                   "Float64": "f8"}
#: Largest XML header taken (bytes): real ones are a few KB, with many properties tens of KB.
_MAX_HEADER = 16 << 20


def read_xisf_frame(path: str | os.PathLike, *, max_bytes: int | None = None) -> Frame:
    """The first image of an XISF file as float32 (2-D, top-down) with its metadata.

    Parameters
    ----------
    path : the .xisf file.
    max_bytes : int or None, the decode limit (see daemon.io.limits); checked from the
        geometry before the data block is read.

    Raises
    ------
    FrameError (FrameTooLarge) naming the file and what is wrong.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            image, keywords, cfa = _header(path, fh)
            width, height, channels = _geometry(path, image)
            if channels != 1:
                raise FrameError(path, f"{channels}-channel XISF image: only mono or CFA frames are frames")
            check_frame_size(path, width, height, 1, max_bytes)
            dtype = _dtype(path, image)
            raw = _data_block(path, fh, image, width * height * dtype.itemsize, dtype.itemsize)
    except OSError as exc:
        raise FrameError(path, f"cannot read file: {exc.strerror or exc}") from None
    data = np.frombuffer(raw, dtype=dtype).reshape(height, width).astype(np.float32)
    if dtype.kind == "f":
        lo, hi = _bounds(image)
        # Normalised [0, 1] floats (PixInsight's default) as 16-bit ADU; the data must say so
        # too: writers put bounds="0:1" on floats in ADU as well (the `xisf` package does).
        if hi <= 1.0 and lo >= 0.0 and data.size and float(np.nanmax(data)) <= 1.0:
            data *= np.float32(65535.0)
    header = fits.Header()
    text: dict[str, Any] = {}  # values FITS cannot hold (XML is Unicode: OBJECT = 'M42 星')
    for key, value in keywords:
        if key in ("COMMENT", "HISTORY", "") or key in header or key in text:
            continue
        try:
            header[key] = value
        except (ValueError, TypeError):
            if isinstance(value, str) and len(key) <= 8:
                text[key] = value
    meta = meta_with_sidecar({**header_values(header), **text}, path)
    bayer = cfa or meta.bayer
    wcs = frame_wcs(header, height, bottom_up=False)
    meta = replace(meta, bayer=bayer if bayer in BAYER_PATTERNS else None,
                   wcs=wcs_cards(wcs) if wcs is not None else None)
    return Frame(np.ascontiguousarray(data), meta)


def _header(path: str, fh) -> tuple[ET.Element, list[tuple[str, Any]], str | None]:
    lead = fh.read(16)
    if len(lead) < 16 or lead[:8] != SIGNATURE:
        raise FrameError(path, "not an XISF file (no 'XISF0100' signature)")
    (length,) = struct.unpack("<I", lead[8:12])
    if not 0 < length <= _MAX_HEADER:
        raise FrameError(path, f"XISF header length {length} is not plausible")
    text = fh.read(length)
    if len(text) < length:
        raise FrameError(path, "truncated XISF header (still being written?)")
    try:
        root = ET.fromstring(text.rstrip(b"\0"))
    except ET.ParseError as exc:
        raise FrameError(path, f"XISF header is not valid XML ({exc})") from None
    image = root.find(f"{_NS}Image")
    if image is None:
        image = root.find("Image")
    if image is None:
        raise FrameError(path, "XISF file holds no <Image>")
    keywords = [(k.get("name", "").strip().upper(), _keyword_value(k.get("value", "")))
                for k in list(image.iter(f"{_NS}FITSKeyword")) + list(image.iter("FITSKeyword"))]
    cfa = None
    for el in list(image.iter(f"{_NS}ColorFilterArray")) + list(image.iter("ColorFilterArray")):
        if el.get("width", "2") == "2" and el.get("height", "2") == "2":
            cfa = parse_bayer(el.get("pattern", ""))
    return image, keywords, cfa


def _keyword_value(text: str) -> Any:
    """A FITS keyword value as XISF stores it: "'Light'" (quoted string), '300.', 'T'."""
    text = text.strip()
    if text.startswith("'"):
        return text.strip("'").replace("''", "'").strip()
    if text in ("T", "F"):
        return text == "T"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _geometry(path: str, image: ET.Element) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in image.get("geometry", "").split(":")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or min(parts) <= 0:
        raise FrameError(path, f"XISF image geometry {image.get('geometry')!r}: not a 2-D image")
    return parts[0], parts[1], parts[2]


def _dtype(path: str, image: ET.Element) -> np.dtype:
    fmt = image.get("sampleFormat", "")
    if fmt not in _SAMPLE_FORMATS:
        raise FrameError(path, f"XISF sample format {fmt!r} is not supported (integer or real samples only)")
    order = ">" if image.get("byteOrder", "little") == "big" else "<"
    return np.dtype(order + _SAMPLE_FORMATS[fmt])


def _bounds(image: ET.Element) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in image.get("bounds", "0:1").split(":"))
    except ValueError:
        lo, hi = 0.0, 1.0
    return lo, hi


def _data_block(path: str, fh, image: ET.Element, nbytes: int, itemsize: int) -> bytes:
    location = image.get("location", "").split(":")
    if location[0] == "attachment" and len(location) == 3:
        try:
            pos, size = int(location[1]), int(location[2])
        except ValueError:
            raise FrameError(path, f"XISF location {image.get('location')!r} is malformed") from None
        if not 0 <= size <= _max_block(nbytes, bool(image.get("compression"))):
            raise FrameError(path, f"XISF data block of {size} bytes for an image of {nbytes}: not plausible")
        fh.seek(pos)
        block = fh.read(size)
        if len(block) < size:
            raise FrameError(path, f"truncated or still being written: the XISF data block needs {size} "
                                   f"bytes at {pos}, the file holds {len(block)}")
    elif location[0] == "inline" and len(location) == 2 and image.text:
        block = base64.b64decode(image.text.strip()) if location[1] == "base64" else bytes.fromhex(image.text.strip())
    else:
        raise FrameError(path, f"XISF data location {image.get('location')!r} is not supported")
    compression = image.get("compression")
    if compression:
        block = _decompress(path, block, compression, nbytes, itemsize)
    if len(block) != nbytes:
        raise FrameError(path, f"XISF data block holds {len(block)} bytes, the geometry needs {nbytes}")
    return block


def _max_block(nbytes: int, compressed: bool) -> int:
    """The largest data block read for an image of `nbytes` (a compressed block of noise may
    be a little larger than the pixels it holds)."""
    return nbytes + (nbytes // 8 + (1 << 16) if compressed else 0)


def _decompress(path: str, block: bytes, spec: str, nbytes: int, itemsize: int) -> bytes:
    parts = spec.split(":")
    codec, _, shuffle = parts[0].partition("+")
    try:
        size = int(parts[1])
    except (IndexError, ValueError):
        raise FrameError(path, f"XISF compression {spec!r} is malformed") from None
    if size != nbytes:
        raise FrameError(path, f"XISF compression declares {size} bytes, the geometry needs {nbytes}")
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(block, nbytes + 1)
        elif codec in ("lz4", "lz4hc"):
            import lz4.block  # only for files that use it

            out = lz4.block.decompress(block, uncompressed_size=nbytes)
        elif codec == "zstd":
            import zstandard  # only for files that use it

            out = zstandard.ZstdDecompressor().decompress(block, max_output_size=nbytes)
        else:
            raise FrameError(path, f"XISF compression codec {codec!r} is not supported")
    except ImportError as exc:
        raise FrameError(path, f"XISF compression {codec!r} needs the {exc.name} package") from None
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - any codec fault is this file's fault
        raise FrameError(path, f"XISF data block cannot be decompressed ({codec}: {exc})") from None
    if shuffle == "sh" and itemsize > 1:
        out = np.frombuffer(out, np.uint8).reshape(itemsize, -1).T.tobytes()
    return out
