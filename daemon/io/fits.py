"""FITS frames: open the image HDU, read it whole or in row bands, write float32 atomically.

Reading takes the data unit straight from the file (at the offset astropy reports) instead
of going through `hdu.data`: astropy pads a truncated data unit with zeros and would scale
the whole array on first access. This lets us (1) check the file holds every byte the
header promises, and (2) read a band of rows of a 26 MP frame without touching the rest,
which is what master building needs to stay within memory. Plain reads, not a memory map:
mapped pages of 50 inputs would stay resident and count against the service's memory.

Orientation: arrays handed out are *top-down* (row 0 = first row the camera read out).
A file marked ROWORDER='BOTTOM-UP' is flipped and its Bayer pattern and WCS adjusted; files
without ROWORDER are taken as stored, which is what INDI, NINA, SharpCap and ASIAIR mean.
Stacks are written BOTTOM-UP (`write_fits(..., bottom_up=True)`, the FITS standard's order):
viewers that ignore ROWORDER (DS9, Siril, ASTAP, imshow(origin="lower")) then show them as the
preview does.

A gzip stream (`.fits.gz`, or a gzip file named `.fits`) is decompressed into memory, its
declared size checked first against the decode limit (daemon.io.limits) from the header at the
stream's start; a tile-compressed image (fpack) is checked from its header before decoding.
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numba
import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from daemon.io.errors import FrameError
from daemon.io.formats import FITS_SUFFIXES
from daemon.io.header import flip_rows_pattern, meta_from_header
from daemon.io.limits import check_frame_size, default_max_frame_bytes
from daemon.io.sidecar import jocular_fields
from daemon.io.wcs import frame_wcs, wcs_cards
from daemon.names import ascii_safe
from daemon.pipeline.frame import Frame, FrameMeta

__all__ = ["FITS_SUFFIXES", "FitsImage", "open_fits_image", "read_fits_frame", "write_fits", "header_values"]
_GZIP_MAGIC = b"\x1f\x8b"
_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
#: Cards astropy writes itself from the data; never copied from a caller's header.
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO",
               "BSCALE", "PCOUNT", "GCOUNT", "XTENSION", "END", "BLANK", "CHECKSUM", "DATASUM"}


@dataclass
class FitsImage:
    """An opened FITS image: header, metadata and top-down row access in float32 ADU."""

    path: str
    header: fits.Header
    meta: FrameMeta
    shape: tuple[int, int]
    bottom_up: bool
    _raw: np.ndarray | None  # decoded float32 (compressed HDUs) or None: read from the file
    _bscale: float
    _bzero: float
    _dtype: str = ">f4"
    _offset: int = 0  # byte offset of the data unit in the file

    def _stored_rows(self, start: int, stop: int) -> np.ndarray:
        """Stored rows [start, stop) read with a plain file read: no memory map, so a band
        costs only its own bytes and nothing stays resident after it."""
        if self._raw is not None:
            return self._raw[start:stop]
        w = self.shape[1]
        itemsize = np.dtype(self._dtype).itemsize
        with open(self.path, "rb") as fh:
            fh.seek(self._offset + start * w * itemsize)
            block = np.fromfile(fh, dtype=self._dtype, count=(stop - start) * w)
        if block.size != (stop - start) * w:
            raise FrameError(self.path, "file shrank while being read (being rewritten?)")
        return block.reshape(stop - start, w)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the top-down image as a new float32 array (ADU)."""
        h = self.shape[0]
        start, stop = max(0, start), min(h, stop)
        if self._is_be16:  # the common case (every 16-bit camera): one fused pass
            out = np.empty((stop - start, self.shape[1]), np.float32)
            self._decode16_into(start, stop, out)
            return out
        block = self._top_down_rows(start, stop)
        wide = np.float64 if block.dtype.itemsize >= 4 and block.dtype.kind in "iu" else np.float32
        out = np.array(block, dtype=wide)  # our own copy (never the memory map): scaled in place,
        if self._bscale != 1.0:            # no temporaries (a 26 Mpx frame: 104 MB each)
            out *= self._bscale
        if self._bzero != 0.0:
            out += self._bzero
        return np.ascontiguousarray(out, dtype=np.float32)

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole top-down image as float32 ADU. A 16-bit file is decoded band by band
        (~8 MB of raw words at a time) into the output: the raw image never exists whole
        beside it (52 MB less at the peak for a 26 Mpx frame). `out`: an array to decode a
        16-bit file into (used when it is a writeable C-contiguous float32 array of the
        image's shape; see `daemon.io.load.FrameLoader`)."""
        h, w = self.shape
        if not self._is_be16:
            return self.rows(0, h)
        if not (out is not None and out.shape == (h, w) and out.dtype == np.float32
                and out.flags.c_contiguous and out.flags.writeable):
            out = np.empty((h, w), np.float32)
        band = max(1, (8 << 20) // (2 * w))
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            self._decode16_into(r0, r1, out[r0:r1])
        return out

    @property
    def _is_be16(self) -> bool:
        """Stored as big-endian 16-bit integers in the file (not a decoded compressed HDU)."""
        return self._raw is None and np.dtype(self._dtype) == _BE_INT16

    def _top_down_rows(self, start: int, stop: int) -> np.ndarray:
        """Stored rows for top-down rows [start, stop), in top-down order (a view)."""
        h = self.shape[0]
        return self._stored_rows(h - stop, h - start)[::-1] if self.bottom_up else self._stored_rows(start, stop)

    def _decode16_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Top-down rows [start, stop) of a 16-bit file, as float32 ADU, into `out`."""
        block = self._top_down_rows(start, stop)
        _be16_to_float32(block.view(np.uint16), out, self._bscale, self._bzero)


_BE_INT16 = np.dtype(">i2")


@numba.njit(parallel=True, cache=True, nogil=True)
def _be16_to_float32(raw: np.ndarray, out: np.ndarray, bscale: float, bzero: float) -> None:
    """Big-endian int16 FITS pixels (as raw uint16 words) -> float32 ADU, `raw * bscale +
    bzero`, in one parallel pass where numpy's byte swap, conversion and BZERO add are three
    single-threaded ones. Exact for 16-bit data: every int16 + 32768 is a float32 integer."""
    zero = np.float32(bzero)
    exact = bscale == 1.0
    for i in numba.prange(raw.shape[0]):
        for j in range(raw.shape[1]):
            u = np.int32(raw[i, j])
            v = ((u & 0xFF) << 8) | (u >> 8)
            if v >= 32768:
                v -= 65536
            if exact:
                out[i, j] = np.float32(v) + zero
            else:
                out[i, j] = np.float32(np.float64(v) * bscale + bzero)


def _image_hdu_index(hdul: fits.HDUList) -> int | None:
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.header.get("NAXIS", 0) >= 2:
            return i
    return None


def open_fits_image(path: str | os.PathLike, *, max_bytes: int | None = None) -> FitsImage:
    """Open the primary or first image HDU of a FITS file for reading; FrameError if unusable.

    Parameters
    ----------
    path : the file (plain, tile-compressed, or a gzip stream whatever its name).
    max_bytes : int or None
        Decode limit in bytes of float32 pixels (None: `default_max_frame_bytes()`): a larger
        declared image raises FrameTooLarge before anything is decoded.
    """
    path = str(path)
    limit = default_max_frame_bytes() if max_bytes is None else int(max_bytes)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise FrameError(path, f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise FrameError(path, "empty file (0 bytes)")
    buf = _gunzip(path, limit) if magic == _GZIP_MAGIC else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            hdul = fits.open(io.BytesIO(buf) if buf is not None else path, memmap=False, lazy_load_hdus=False,
                             do_not_scale_image_data=True, ignore_missing_simple=True, output_verify="ignore")
        except Exception as exc:  # noqa: BLE001 - astropy raises OSError, ValueError, TypeError, IndexError...
            raise FrameError(path, f"not a readable FITS file ({exc})") from None
        try:
            index = _image_hdu_index(hdul)
            if index is None:
                raise FrameError(path, "no image in the file (no HDU with a 2-D data array)")
            hdu = hdul[index]
            header = hdu.header.copy()
            if isinstance(hdu, fits.CompImageHDU):  # tile-compressed: astropy decodes it whole
                header = fits.Header(hdu.header)
                naxes = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
                if len(naxes) >= 2:  # checked from the header, before the decode allocates
                    check_frame_size(path, naxes[0], naxes[1], int(np.prod(naxes[2:])) if naxes[2:] else 1, limit)
                try:
                    raw = np.asarray(hdu.data)
                except Exception as exc:  # noqa: BLE001 - any decoder fault is this file's fault
                    raise FrameError(path, f"compressed image cannot be decoded ({exc})") from None
                # Opened with do_not_scale_image_data: the stored integers, scaled in rows().
                bscale, bzero = float(header.get("BSCALE", 1.0)), float(header.get("BZERO", 0.0))
                dtype, offset = ">f4", 0
                shape = raw.shape
            else:
                shape, dtype, offset, bscale, bzero = _locate_data(path, hdul, index, header,
                                                                   len(buf) if buf is not None else size)
                check_frame_size(path, shape[-1], shape[-2], shape[0] if len(shape) == 3 else 1, limit)
                raw = None
                if buf is not None:  # a view of the decompressed stream, scaled in rows()
                    raw = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        finally:
            hdul.close()
    if len(shape) == 3:
        if shape[0] != 1:
            raise FrameError(path, f"{shape[0]}-plane image cube: only 2-D mono or CFA frames are frames")
        shape = shape[1:]
        raw = raw[0] if raw is not None else None
    if len(shape) != 2 or 0 in shape:
        raise FrameError(path, f"image has shape {shape}: not a 2-D frame")
    meta, bottom_up = _header_meta(header, path, int(shape[0]))
    wcs = frame_wcs(header, int(shape[0]), bottom_up)
    if wcs is not None:
        meta = _replace(meta, wcs=wcs_cards(wcs))
    return FitsImage(path, header, meta, (int(shape[0]), int(shape[1])), bottom_up, raw, bscale, bzero,
                     dtype, offset)


def _gunzip(path: str, limit: int) -> bytes:
    """A gzip stream's content, bounded: the primary header at its start is read first and
    its declared image checked against `limit`; the stream is then decompressed in pieces and
    refused once it exceeds what an image within the limit can take (8 bytes a pixel at
    most, float64, plus headers), so a decompression bomb never gets further."""
    try:
        with gzip.open(path, "rb") as gz:
            head = b""
            while len(head) < 2880 * 36:
                block = gz.read(2880)
                if len(block) < 2880:
                    raise FrameError(path, "gzip stream ends inside the FITS header (truncated?)")
                head += block
                if _has_end_card(block):
                    break
            try:
                header = fits.Header.fromstring(head)
            except Exception as exc:  # noqa: BLE001 - a malformed header is this file's fault
                raise FrameError(path, f"gzip stream holds no readable FITS header ({exc})") from None
            naxes = [int(header.get(f"NAXIS{i}", 0) or 0) for i in range(1, int(header.get("NAXIS", 0) or 0) + 1)]
            if len(naxes) >= 2:
                check_frame_size(path, naxes[0], naxes[1], int(np.prod(naxes[2:])) if naxes[2:] else 1, limit)
            cap = 2 * limit + 10 * 2880 * 36
            pieces = [head]
            total = len(head)
            while block := gz.read(8 << 20):
                total += len(block)
                if total > cap:
                    raise FrameError(path, f"gzip stream decompresses to more than {cap / 2**20:.0f} MiB, "
                                           f"over the decode limit (capture.max_frame_bytes); not decoded")
                pieces.append(block)
    except FrameError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise FrameError(path, f"corrupt or truncated gzip stream ({exc})") from None
    return b"".join(pieces)


def _has_end_card(block: bytes) -> bool:
    return any(block[i:i + 8] == b"END     " for i in range(0, len(block), 80))


def _header_meta(header: fits.Header, path: str, rows: int) -> tuple[FrameMeta, bool]:
    """A frame's metadata from its header (gaps filled from a sidecar), its CFA pattern as
    seen top-down, and whether the file stores its rows bottom-up (ROWORDER)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        meta = meta_from_header(header_values(header), path)
    meta = _fill_from_sidecar(meta)
    bottom_up = str(header.get("ROWORDER", "")).strip().upper() == "BOTTOM-UP"
    if bottom_up and meta.bayer:
        meta = _replace(meta, bayer=flip_rows_pattern(meta.bayer, rows))
    return meta, bottom_up


#: Most header blocks `peek_fits` reads (2880 bytes each: 36 cards): more than capture
#: programs write.
_PEEK_BLOCKS = 100


def peek_fits(path: str | os.PathLike, *, max_bytes: int | None = None) -> tuple[tuple[int, int], FrameMeta] | None:
    """The (rows, columns) and metadata of a FITS frame from its primary header alone, as
    `open_fits_image` reports them (WCS aside), while the file may still be being written:
    its header comes first. What for: the stack a new frame will start can be made while the
    rest of the file arrives (`Session.prepare`).

    Parameters
    ----------
    path : the file.
    max_bytes : int or None, the decode limit (None: `default_max_frame_bytes()`).

    Returns None where the header does not tell yet or at all: not complete, no plain 2-D
    primary image (gzip, tile-compressed, an image in an extension, a cube), or a size the
    loader would refuse. Never raises for what the file holds."""
    path = str(path)
    blocks: list[bytes] = []
    try:
        with open(path, "rb") as fh:  # block by block up to END: not the data's first bytes
            while not blocks or not _has_end_card(blocks[-1]):
                block = fh.read(2880)
                if len(block) < 2880 or len(blocks) == _PEEK_BLOCKS or not (blocks or block.startswith(b"SIMPLE")):
                    return None
                blocks.append(block)
    except OSError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            header = fits.Header.fromstring(b"".join(blocks).decode("ascii", "replace"))
            naxes = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
        except Exception:  # noqa: BLE001 - astropy raises ValueError, VerifyError...: not a header to use
            return None
    if len(naxes) < 2 or any(n != 1 for n in naxes[2:]) or min(naxes[:2]) <= 0:
        return None
    try:
        check_frame_size(path, naxes[0], naxes[1], 1, max_bytes)
    except FrameError:
        return None
    meta, _ = _header_meta(header, path, naxes[1])
    return (naxes[1], naxes[0]), meta


def header_values(header: fits.Header) -> dict[str, Any]:
    """Card values by keyword, tolerating malformed cards (e.g. StarlightLive's DATE card,
    which astropy refuses to parse): their value is taken from the raw card text."""
    values: dict[str, Any] = {}
    for card in header.cards:
        key = card.keyword
        if not key or key in ("COMMENT", "HISTORY") or key in values:
            continue
        try:
            values[key] = card.value
        except Exception:  # noqa: BLE001 - astropy's VerifyError, ValueError...: read the raw text
            text = card.image[8:].lstrip("= ").split("/", 1)[0].strip()
            values[key] = text.strip("'").strip()
    return values


#: FrameMeta field -> the canonical header card reported missing for it.
_FIELD_CARDS = {"exposure_s": "EXPTIME", "camera": "INSTRUME", "target": "OBJECT", "frame_type": "IMAGETYP",
                "ra_deg": "RA/DEC", "dec_deg": "RA/DEC"}


def meta_with_sidecar(values: Mapping[str, Any], path: str) -> FrameMeta:
    """FrameMeta from FITS-style header values (any format's keywords), gaps filled from a
    capture program's sidecar file (daemon.io.sidecar)."""
    return _fill_from_sidecar(meta_from_header(values, path))


def _fill_from_sidecar(meta: FrameMeta) -> FrameMeta:
    """Fields the header lacked, from a capture program's sidecar file (see daemon.io.sidecar)."""
    if not meta.missing or meta.path is None:
        return meta
    wanted = {f for f, card in _FIELD_CARDS.items() if card in meta.missing} | {"telescope"}
    fields = {k: v for k, v in jocular_fields(meta.path).items()
              if k in wanted and (k != "telescope" or meta.telescope is None)}
    if not fields:
        return meta
    filled = {_FIELD_CARDS.get(k) for k in fields}
    return _replace(meta, **fields, missing=tuple(m for m in meta.missing if m not in filled))


def _replace(meta: FrameMeta, **changes: Any) -> FrameMeta:
    return replace(meta, **changes)


def _locate_data(path: str, hdul: fits.HDUList, index: int, header: fits.Header, size: int):
    bitpix = int(header["BITPIX"])
    if bitpix not in _BITPIX_DTYPES:
        raise FrameError(path, f"unsupported BITPIX {bitpix}")
    naxes = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header["NAXIS"]) + 1)]
    if any(n <= 0 for n in naxes):
        raise FrameError(path, f"image has an empty axis (NAXISn = {naxes})")
    extra = naxes[2:]
    if any(n != 1 for n in extra[1:]):
        raise FrameError(path, f"{len(naxes)}-D data {naxes}: not a 2-D frame")
    shape = tuple(reversed(naxes[:3]))  # numpy order: (planes,) rows, columns
    nbytes = abs(bitpix) // 8 * int(np.prod(naxes))
    offset = hdul.fileinfo(index)["datLoc"]
    if offset + nbytes > size:
        have = max(0, size - offset)
        raise FrameError(
            path, f"truncated or still being written: header promises {nbytes} bytes of "
                  f"{'x'.join(map(str, naxes))} pixels, the file holds {have}")
    return shape, _BITPIX_DTYPES[bitpix], offset, float(header.get("BSCALE", 1.0)), float(header.get("BZERO", 0.0))


def read_fits_frame(path: str | os.PathLike, out: np.ndarray | None = None, *,
                    max_bytes: int | None = None) -> Frame:
    """A FITS frame read whole (`open_fits_image`, then `FitsImage.read(out)`)."""
    image = open_fits_image(path, max_bytes=max_bytes)
    return Frame(image.read(out), image.meta)


def _header_from(header: Mapping[str, Any] | fits.Header | None) -> fits.Header:
    out = fits.Header()
    if header is None:
        return out
    cards = header.cards if isinstance(header, fits.Header) else (
        (k, *(v if isinstance(v, tuple) else (v,))) for k, v in header.items())
    for card in cards:
        key, value = card[0], card[1]
        comment = card[2] if len(card) > 2 else None
        if key.upper() in _STRUCTURAL:
            continue
        if key.upper() in ("COMMENT", "HISTORY", ""):
            text = ascii_safe(str(value))
            out.add_history(text) if key.upper() == "HISTORY" else out.add_comment(text)
            continue
        value = _card_value(value)
        if value is None:
            continue
        out[key] = (value, ascii_safe(str(comment))) if comment else value
    return out


def _card_value(value: Any) -> Any:
    """A value FITS can hold: numpy scalars unwrapped, times as ISO text, NaN/inf dropped."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").split("+")[0]
    if isinstance(value, str):
        return ascii_safe(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return ascii_safe(str(value))


def write_fits(path: str | os.PathLike, data: np.ndarray,
               header: Mapping[str, Any] | fits.Header | None = None, *, atomic: bool = True,
               bottom_up: bool = False) -> None:
    """Write `data` (a top-down array) as a float32 FITS image.

    `data` is 2-D, or (H, W, 3) RGB which is stored as the FITS cube (3, H, W).
    `bottom_up`: store the rows in the FITS standard's order (array row 0 last, first stored
    row at the bottom), ROWORDER='BOTTOM-UP' (stacks); else as they are, ROWORDER='TOP-DOWN'
    (masters, calibrated mosaics: their Bayer pattern is the one at array[0, 0]). Text values
    are written ASCII-safe (`daemon.names.ascii_safe`).
    `header` is a dict {key: value or (value, comment)} or an astropy Header; structural
    cards are ignored. With `atomic`, the file appears complete or not at all: written to a
    hidden temporary name beside it, fsync'ed, then renamed over `path`.
    """
    path = Path(path)
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = np.moveaxis(arr, 2, 0)
    elif arr.ndim != 2:
        raise ValueError(f"write_fits {path}: data must be 2-D or (H, W, 3), got shape {arr.shape}")
    if bottom_up:
        arr = arr[..., ::-1, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        hdr = _header_from(header)
        hdr["ROWORDER"] = ("BOTTOM-UP" if bottom_up else "TOP-DOWN", "first stored row is the "
                           + ("bottom (FITS standard)" if bottom_up else "top"))
        hdu = fits.PrimaryHDU(np.ascontiguousarray(arr), header=hdr)
        if not atomic:
            hdu.writeto(path, overwrite=True, output_verify="silentfix")
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                hdu.writeto(fh, output_verify="silentfix")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
