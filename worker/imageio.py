"""Decode and encode photographs without losing what archives care about.

The worker restores pixels and nothing else: everything around them goes back
out as it came in. :func:`decode_image` reads PNG, JPEG, TIFF, WebP, JPEG 2000
and BMP (8- and 16-bit, float TIFF; grey, grey+alpha, RGB, RGBA), applies the EXIF
orientation, sets the alpha channel aside untouched (a grey PNG's tRNS key
becomes one, as OpenCV makes an RGB PNG's; premultiplied TIFF colour is divided
by it, and multiplied back on writing) and hands the model float32 pixels in
[0, 1]. :func:`encode_image` writes the restored pixels back
in the same format, bit depth and channel layout, re-attaches the alpha
channel byte for byte and carries the metadata over: EXIF (with orientation
reset to 1, since the pixels are now upright), the ICC profile and XMP, plus
the resolution, PNG text and colour chunks, and JPEG quality and chroma
subsampling. JPEG 2000 keeps its wavelet, levels, layers, progression, tiles
and ratio, and its boxes (:mod:`worker.jpeg2000`); it has no orientation of its
own, so its pixels are taken as stored and its EXIF block is left untouched.

Pixels are decoded by OpenCV, except JPEG 2000 (OpenJPEG through imagecodecs,
every precision kept) and TIFF, which tifffile reads: OpenCV
premultiplies 8-bit RGBA TIFF, drops the alpha of grey+alpha TIFF and applies
TIFF orientation by itself. OpenCV stays the fallback for palette, CMYK and
other TIFF layouts (and compressions tifffile has no codec for), with the
orientation tag hidden from it; damaged data in a layout tifffile reads is an
error, not a fallback. MINISWHITE grey is read inverted and written back as
MINISWHITE. A JPEG whose scan data libjpeg finds cut or damaged (it only
warns, and decodes the rest as grey) is refused too.

The containers are read by small parsers in this module rather than by
Pillow: they read sizes from the header before any pixel is decoded (the
decompression-bomb guard), they do not depend on Pillow's process-wide
``MAX_IMAGE_PIXELS``, and they let the EXIF block pass through byte for byte
(maker notes and thumbnails included) with only its orientation value
patched. Pillow is used to encode WebP and to (re)build TIFF EXIF
directories; tifffile writes TIFF, which OpenCV cannot tag, keeping the
input's lossless compression (lossy TIFF compressions become Deflate).

Every full-size page of a multi-page TIFF is read (reduced-resolution
previews and masks are not pictures of their own, even when one comes first)
and written back in order, each in its own layout; the first page carries the
file's metadata. A TIFF cut short (a directory or a page's data past its end)
is refused rather than read in part. An
animated PNG or WebP, and a multi-page TIFF with a page in a layout only
OpenCV reads (palette, CMYK), are refused with an error that says how to split
them: cutting frames away unannounced would lose them.

Known limits: palette PNGs come back as truecolour; CMYK JPEGs are
converted to RGB (their CMYK ICC profile is dropped); float TIFF samples
outside [0, 1] reach the models scaled into it (see :func:`_float_range`) and
are scaled back on writing; the EXIF thumbnail of a JPEG/PNG/WebP keeps showing the
input; in TIFF, the ExifIFD and GPS directories are rewritten, so maker notes
that point outside themselves may break (as with most TIFF writers); BMP
keeps its resolution but not a V5 header's ICC profile, and a palette BMP comes
back as truecolour (a grey-palette one as grey).
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from jobs.errors import ImageDecodeError, InputError
from jobs.layout import OUTPUT_FORMATS, format_of_name
from jobs.settings import Settings
from jobs.storage import READ_FORMATS
from worker import jpeg2000

log = logging.getLogger(__name__)

FORMATS = tuple(OUTPUT_FORMATS)  # every format read is written back, and can be converted to

DEFAULT_MAX_PIXELS: int = Settings.image_max_pixels
"""Limit used when :func:`decode_image` is given no ``max_pixels``."""

DEFAULT_QUALITY = 95
"""JPEG quality when the input's cannot be estimated, and lossy WebP quality."""

_CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "tiff": "image/tiff",
    "webp": "image/webp",
    "jp2": "image/jp2",
    "bmp": "image/bmp",
}

_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXTENSION_JPEG_PREFIX = b"http://ns.adobe.com/xmp/extension/\x00"
_ICC_JPEG_PREFIX = b"ICC_PROFILE\x00"
_PHOTOSHOP_JPEG_PREFIX = b"Photoshop 3.0\x00"
_PNG_RAW_EXIF_KEYWORD = b"Raw profile type exif"
_XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
_ORIENTATION_TAG = 0x0112
_EXIF_IFD_TAG = 0x8769
_GPS_IFD_TAG = 0x8825
_INTEROP_IFD_TAG = 0xA005

# PNG ancillary chunks carried over as they are. Colour and resolution hints
# survive strip_metadata; text and time do not.
_PNG_RENDERING_CHUNKS = frozenset({b"pHYs", b"gAMA", b"cHRM", b"sRGB", b"cICP", b"mDCV", b"cLLI"})
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"tIME"})
_PNG_OWN_CHUNKS = frozenset({b"eXIf", b"iCCP"}) | _PNG_RENDERING_CHUNKS | _PNG_TEXT_CHUNKS

# Descriptive TIFF IFD0 tags (all ASCII) that travel with the EXIF block.
_TIFF_TEXT_TAGS = (269, 270, 271, 272, 285, 305, 306, 315, 316, 33432)
_TIFF_ICC_TAG = 34675
_TIFF_XMP_TAG = 700
_TIFF_IPTC_TAG = 33723
_TIFF_PHOTOSHOP_TAG = 34377
# Input TIFF compression -> what the output is written with. Lossy ones (JPEG,
# WebP, …) become Deflate: a restored archive master should not lose twice.
_TIFF_WRITE_COMPRESSION: dict[int, str | None] = {
    1: None,
    5: "lzw",
    8: "adobe_deflate",
    32946: "adobe_deflate",
    32773: "packbits",
    34925: "lzma",
    50000: "zstd",
}

# JPEG Annex K luminance table: the base libjpeg scales by the quality factor.
_STD_LUMINANCE_SUM = sum((
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
))  # fmt: skip
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SUBSAMPLING = {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0", (1, 2): "4:4:0", (4, 1): "4:1:1"}
_CV_SAMPLING = {
    "4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    "4:4:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
    "4:1:1": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
}
_MAX_SEGMENT = 65533  # largest JPEG marker segment payload
# What libjpeg says, as a warning only, when a scan's data is missing or damaged: it fills the rest with grey.
# ("extraneous bytes before marker", common in camera files, is harmless and not listed.)
_LIBJPEG_DAMAGE = re.compile(rb"Corrupt JPEG data: (premature end of data segment|bad Huffman code)"
                             rb"|Premature end of JPEG file")
_STDERR_LOCK = threading.Lock()
_PNG_INFLATE_LIMIT = 8 * 2**20
"""Most bytes a compressed PNG iCCP, zTXt or iTXt chunk may inflate to: far above any real profile or XMP packet,
far below what a few hundred kilobytes of zlib data can claim (a decompression bomb)."""


@dataclass
class ImageMetadata:
    """What travels with the pixels from input to output.

    ``exif`` is a TIFF-structured EXIF block with its ``b"Exif\\0\\0"`` prefix
    and orientation already reset to 1; ``orientation`` is the value the input
    had (and that :func:`decode_image` applied). ``iptc`` and ``photoshop``
    carry archive captions, keywords and credits where the format has them.
    The remaining fields are encoder hints read from the input so the output
    looks like it.
    """

    exif: bytes | None = None
    icc: bytes | None = None
    xmp: bytes | None = None
    iptc: bytes | None = None  # IPTC-IIM records (TIFF tag 33723)
    photoshop: bytes | None = None  # Photoshop image resources, IPTC inside (JPEG APP13, TIFF tag 34377)
    orientation: int = 1
    dpi: tuple[float, float] | None = None
    jpeg_quality: int | None = None
    jpeg_subsampling: str | None = None
    jpeg_progressive: bool = False
    webp_lossless: bool | None = None
    tiff_compression: int = 1  # TIFF Compression tag of the input
    tiff_alpha_kind: int = 2  # TIFF ExtraSamples: 1 associated (premultiplied), 2 unassociated
    tiff_miniswhite: bool = False  # TIFF grey stored with 0 as white: read inverted, written back so
    tiff_page_name: str | None = None  # TIFF PageName of the page (multi-page scans name their pages)
    tiff_resolution_unit: int = 2  # TIFF ResolutionUnit the input stated its resolution in: 2 inch, 3 cm, 1 none
    pixel_aspect: tuple[float, float] | None = None  # TIFF X/Y resolution under ResolutionUnit NONE: shape, no size
    float_range: tuple[float, float] | None = None
    """Float samples reaching outside [0, 1] (linear or HDR scans): the (low, high) that the model's 0 and 1
    stand for, so that they are mapped back on writing rather than clipped. None for samples within [0, 1]."""
    png_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)
    jpeg_comments: list[bytes] = field(default_factory=list)  # JPEG COM segments (accession numbers, captions)
    xmp_extension: list[bytes] = field(default_factory=list)
    """A JPEG's extended XMP segments after their prefix (GUID, length, offset, part), which the main packet's
    xmpNote:HasExtendedXMP names: carried byte for byte, so that GUID (their MD5) still matches."""
    jp2: jpeg2000.Jp2Layout | None = None  # a JPEG 2000 input's coding and its other boxes

    def stripped(self) -> ImageMetadata:
        """A copy without EXIF, ICC, XMP, IPTC and textual chunks; encoder hints stay."""
        return replace(
            self,
            exif=None,
            icc=None,
            xmp=None,
            iptc=None,
            photoshop=None,
            jpeg_comments=[],
            xmp_extension=[],
            png_chunks=[(kind, body) for kind, body in self.png_chunks if kind in _PNG_RENDERING_CHUNKS],
            jp2=replace(self.jp2, boxes=[]) if self.jp2 else None,
        )


@dataclass
class DecodedImage:
    """An image ready for a model, and everything needed to write it back.

    ``pixels`` is float32 H×W×C in [0, 1] (C = 1 grey or 3 RGB), upright;
    ``alpha`` is the H×W alpha channel in the original dtype (rotated with the
    pixels, values untouched) or None; ``dtype`` is the original sample type
    and ``channels`` the original channel count including alpha (1–4). For a
    multi-page TIFF this is the first page and ``pages`` holds the others,
    each with its own size, depth and layout (their metadata is the first
    page's business: they carry none).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    format: str
    dtype: np.dtype
    channels: int
    metadata: ImageMetadata
    pages: list[DecodedImage] = field(default_factory=list)  # a multi-page TIFF's further full-size pages

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def bit_depth(self) -> int:
        return int(np.dtype(self.dtype).itemsize * 8)


class _Unreadable(Exception):
    """Internal: what was wrong with the bytes, before the file name is known."""


class _SeveralPictures(Exception):
    """Internal: an animation (or a TIFF page in a layout only OpenCV reads), refused rather than cut down."""

    def __init__(self, probe: _Probe) -> None:
        if probe.format == "tiff":
            unit, what = "page", (f"a multi-page TIFF with {probe.pictures} pages, a later one in a layout read only "
                                  "as a first page (palette, CMYK, bilevel); restoring the others alone would lose it")
        else:
            unit, what = "frame", (f"an animated {probe.format.upper()} with {probe.pictures} frames; a restored file "
                                   "holds one picture, so all but the first would be lost")
        super().__init__(f"{what}. Split it into one file per {unit} (e.g. ImageMagick: magick IN "
                         f"{unit}-%d.{probe.format}) and submit those")


@dataclass
class _Probe:
    """What the container header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    metadata: ImageMetadata
    grey_alpha: bool = False  # PNG colour type 4 / TIFF with two samples
    png_grey_key: int | None = None  # a grey PNG's tRNS colour key, at the depth OpenCV decodes it to
    orientation: int | None = None  # stated by the container itself (TIFF tag 274)
    pictures: int = 1  # full-size TIFF pages, or frames of an animated PNG or WebP
    pages: tuple[tuple[int, int, int], ...] = ()  # a TIFF's full-size pages after the first: (index, width, height)
    bmp_truecolour: bool = False  # a BMP of 16, 24 or 32 bits a pixel, decoded as colour whatever OpenCV guesses
    bmp_alpha: int | None = None  # a 32-bit BMP's alpha: which byte of each pixel holds it
    keeps_orientation_tags: bool = False  # the format has no orientation: EXIF/XMP ones stay as they are
    tiff_page: int = 0  # the TIFF directory holding the picture (a preview may come first)
    tiff_alpha: bool = False  # the TIFF declares an alpha sample (ExtraSamples 1 or 2)


# ---------------------------------------------------------------- public API


def format_from_name(name: str) -> str | None:
    """The image format a file name's extension announces ("png", …), or None."""
    return format_of_name(name)


def content_type(fmt: str) -> str:
    """MIME type to upload an encoded image of format ``fmt`` with."""
    try:
        return _CONTENT_TYPES[fmt]
    except KeyError:
        raise ValueError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}") from None


def decode_image(data: bytes, name: str = "", max_pixels: int | None = None) -> DecodedImage:
    """Decode an encoded PNG, JPEG, TIFF, WebP, JPEG 2000 or BMP file into a :class:`DecodedImage`.

    The format is taken from the bytes, not from ``name`` (which is only used
    in error messages). Width × height is checked against ``max_pixels``
    (default :data:`DEFAULT_MAX_PIXELS`) from the header, before decoding.

    Raises:
        ImageDecodeError: empty, truncated, corrupt or unsupported data, or
            too many pixels; the message names the file and what was found.
    """
    label = name or "image"
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    data = bytes(data)  # no copy for bytes; makes bytearray/memoryview input safe to slice
    try:
        probe = _probe(data)
        if probe.pictures > 1 and probe.format != "tiff":
            raise _SeveralPictures(probe)
        pixels = probe.width * probe.height + sum(w * h for _, w, h in probe.pages)
        if pixels > limit:
            pages = f" in {len(probe.pages) + 1} pages" if probe.pages else ""
            raise _Unreadable(
                f"{probe.width}x{probe.height}{' and more' if probe.pages else ''} = {pixels:,} pixels{pages} is "
                f"more than the limit of {limit:,}; raise DEBLUR_IMAGE_MAX_PIXELS to accept it"
            )
        samples, bgr = _decode_samples(data, probe)
        image = _assemble(samples, bgr, probe)
        image.pages = _tiff_pages(data, probe)
        return image
    except _SeveralPictures as exc:
        raise ImageDecodeError(f"{label}: {exc}") from None
    except _Unreadable as exc:
        raise ImageDecodeError(f"{label}: not a readable image ({exc})") from None
    except (struct.error, IndexError) as exc:  # a header field pointing past the data
        raise ImageDecodeError(f"{label}: not a readable image (malformed header: {exc})") from None


def encode_image(
    image: DecodedImage,
    pixels: np.ndarray,
    strip_metadata: bool = False,
    quality: int | None = None,
    pages: Sequence[np.ndarray] = (),
) -> bytes:
    """Encode restored ``pixels`` like ``image`` was: same format, depth, channels.

    ``pixels`` is float32 H×W×C in [0, 1] with the shape of ``image.pixels``
    (H×W is accepted for grey); values outside [0, 1] are clipped, then a float
    TIFF whose samples reached outside [0, 1] is scaled back to its own range
    (``metadata.float_range``). The alpha
    channel of ``image`` is re-attached unchanged. Metadata is carried over
    unless ``strip_metadata``. ``quality`` (1–100) overrides the JPEG quality
    estimated from the input (default 95) and the lossy WebP quality. A
    multi-page TIFF needs ``pages``, the restored pixels of ``image.pages``,
    which follow the first page in the same order, each like its input page.
    """
    if len(pages) != len(image.pages):
        raise ValueError(f"{len(pages)} restored pages for an image with {len(image.pages)} further pages")
    if quality is not None and not 1 <= quality <= 100:
        raise ValueError(f"quality {quality} is outside 1..100")
    samples = _samples_for(image, pixels)
    metadata = image.metadata.stripped() if strip_metadata else image.metadata
    encoded = _ENCODERS[image.format](samples, image.alpha, metadata, quality)
    for page, page_pixels in zip(image.pages, pages, strict=True):
        page_metadata = page.metadata.stripped() if strip_metadata else page.metadata
        encoded = _append_tiff_page(encoded, _samples_for(page, page_pixels), page.alpha, page_metadata)
    return encoded


# Sample types each format can store, in order of preference when converting to it.
_FORMAT_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    "png": (np.dtype(np.uint8), np.dtype(np.uint16)),
    "jpeg": (np.dtype(np.uint8),),
    "tiff": (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)),
    "webp": (np.dtype(np.uint8),),
    "jp2": (np.dtype(np.uint8), np.dtype(np.uint16)),
    "bmp": (np.dtype(np.uint8),),
}


# Longest side each format can hold, where that is less than any scan: libjpeg's JPEG_MAX_DIMENSION, WebP's 14 bits.
_FORMAT_MAX_SIDE: dict[str, int] = {"jpeg": 65500, "webp": 16383}


def as_format(image: DecodedImage, fmt: str) -> DecodedImage:
    """``image`` to be written as ``fmt`` instead of its own format, e.g. a JPEG whose restoration an archive
    keeps lossless as PNG or TIFF. The pixels the models see are unchanged; only how they are stored changes.

    The sample type is kept where ``fmt`` stores it, else the nearest it does (16-bit becomes 8-bit for JPEG,
    WebP and BMP; float becomes 16-bit for PNG and JPEG 2000); an alpha channel follows it. EXIF, ICC, XMP,
    IPTC and the resolution travel to every format that holds them; the input format's coding hints do not
    (a TIFF is written with Deflate, a JPEG 2000 losslessly, a JPEG at 95 or the quality asked for).

    Raises:
        InputError: the image cannot be written as ``fmt`` (alpha to JPEG, a multi-page TIFF to a
            single-picture format, a side longer than the format holds); the message says which formats can.
            It is raised here, when the output format is decided, before any model has run.
    """
    if fmt not in _ENCODERS:
        raise ValueError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == image.format:
        return image
    if image.pages and fmt != "tiff":
        raise InputError(f"a multi-page TIFF ({len(image.pages) + 1} pages) cannot be written as "
                         f"{fmt.upper()}, which holds one picture; write it as TIFF (or the input's format)")
    if image.alpha is not None and fmt == "jpeg":
        raise InputError("the image has an alpha channel, which JPEG cannot hold; write it as PNG, TIFF, "
                         "WebP or JPEG 2000")
    longest = _FORMAT_MAX_SIDE.get(fmt)
    if longest is not None and max(image.width, image.height) > longest:
        raise InputError(f"the image is {image.width}x{image.height} pixels and {fmt.upper()} holds at most "
                         f"{longest} pixels a side; write it as PNG, TIFF or JPEG 2000")
    allowed = _FORMAT_DTYPES[fmt]
    dtype = np.dtype(image.dtype)
    if dtype not in allowed:
        dtype = allowed[-1] if dtype.itemsize > allowed[-1].itemsize else allowed[0]
    meta = image.metadata
    converted = ImageMetadata(exif=meta.exif, icc=meta.icc, xmp=meta.xmp, iptc=meta.iptc, photoshop=meta.photoshop,
                              orientation=meta.orientation, dpi=meta.dpi, tiff_compression=8,
                              float_range=meta.float_range)  # the pixels' own scale, whatever stores them
    alpha = image.alpha
    if alpha is not None and alpha.dtype != dtype:
        alpha = quantise(_to_unit(alpha), dtype)
    return replace(image, format=fmt, dtype=dtype, alpha=alpha, metadata=converted)


def _samples_for(image: DecodedImage, pixels: np.ndarray) -> np.ndarray:
    """Restored float ``pixels`` checked against ``image``'s shape and quantised to its sample type."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != image.pixels.shape:
        raise ValueError(f"pixels have shape {arr.shape}; the decoded image has {image.pixels.shape}")
    bits = image.metadata.jp2.bits if image.metadata.jp2 else None
    if bits is not None and bits not in (8, 16):  # a 12-bit JPEG 2000: rounded once, to its own levels,
        # then spread over the full 16-bit range that jpeg2000.encode narrows again
        levels = np.rint(_clip_unit(np.multiply(arr, np.float32(2**bits - 1), dtype=np.float32), 2**bits - 1))
        return jpeg2000.widen(levels.astype(image.dtype), bits)
    dtype = np.dtype(image.dtype)
    float_range = image.metadata.float_range
    premultiplied = image.alpha is not None and image.metadata.tiff_alpha_kind == 1
    if float_range is None and not premultiplied:
        return quantise(arr, dtype)
    values = quantise(arr, np.dtype(np.float32))
    if float_range is not None:  # back to the float samples' own range
        low, high = float_range
        values = (values.astype(np.float64) * (high - low) + low).astype(np.float32)
    if not premultiplied:
        # a float scan written as integers (--output-format png): its own values, clipped to what those hold;
        # left scaled into [0, 1], a scan whose highlights reached 4 came out four times too dark
        return values if dtype == np.float32 else quantise(values, dtype)
    assert image.alpha is not None
    values *= _to_unit(image.alpha)[..., None]  # stored multiplied by alpha again, as the file declares
    if dtype == np.float32:
        return values
    return np.minimum(quantise(values, dtype), image.alpha[..., None])  # rounding never lifts colour over alpha


# ---------------------------------------------------------------- probing


def _probe(data: bytes) -> _Probe:
    if not data:
        raise _Unreadable("empty file")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _probe_png(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _probe_jpeg(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _probe_tiff(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _probe_webp(data)
    if jpeg2000.is_jpeg2000(data):
        return _probe_jp2(data)
    if data[:2] == b"BM" and len(data) >= 26:
        return _probe_bmp(data)
    raise _Unreadable(_describe_unknown(data))


def _describe_unknown(data: bytes) -> str:
    known = {
        b"GIF8": "GIF",
        b"%PDF": "PDF",
        b"PK\x03\x04": "a ZIP archive",
        b"\x1f\x8b": "gzip data",
        b"<": "text/markup",
        b"{": "JSON text",
    }
    for magic, what in known.items():
        if data.startswith(magic):
            return f"found {what}; supported: {READ_FORMATS}"
    if data[4:8] == b"ftyp":
        return f"found an ISO media file ({data[8:12].decode('latin-1')!r}); supported: {READ_FORMATS}"
    return f"{len(data)} bytes starting with {data[:8].hex(' ')}, not {READ_FORMATS.replace(', BMP', ' or BMP')}"


def _probe_png(data: bytes) -> _Probe:
    metadata = ImageMetadata()
    size: tuple[int, int] | None = None
    colour_type = depth = 0
    grey_key: int | None = None
    seen_idat = seen_iend = False
    frames = 1
    raw_exif: bytes | None = None
    view = memoryview(data)
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise _Unreadable(f"truncated PNG: chunk {kind!r} at byte {pos} runs past the end")
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            if length != 13:
                raise _Unreadable("corrupt PNG header")
            width, height, depth, colour_type = struct.unpack_from(">IIBB", body)
            size = (width, height)
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            seen_iend = True
            break
        elif kind == b"tRNS" and colour_type == 0 and length >= 2 and depth:
            grey_key = _png_grey_key(body, depth)
        elif kind == b"acTL" and length >= 4:  # APNG: the frame count
            (frames,) = struct.unpack_from(">I", body)
        elif kind == b"eXIf":
            metadata.exif = _with_exif_prefix(bytes(body))
        elif kind == b"iCCP":
            metadata.icc = _png_icc(bytes(body))
        elif kind in (b"iTXt", b"tEXt", b"zTXt") and _png_keyword(body) == _XMP_PNG_KEYWORD:
            metadata.xmp = _png_text(kind, bytes(body))
        elif kind in (b"iTXt", b"tEXt", b"zTXt") and _png_keyword(body) == _PNG_RAW_EXIF_KEYWORD:
            # ImageMagick's copy of the EXIF block: read it if there is no eXIf,
            # never carry it (its orientation would rotate the output again).
            raw_exif = _png_raw_profile(_png_text(kind, bytes(body)))
        elif kind in _PNG_OWN_CHUNKS:
            metadata.png_chunks.append((kind, bytes(body)))
            if kind == b"pHYs" and length == 9:
                ppu_x, ppu_y, unit = struct.unpack_from(">IIB", body)
                if unit == 1:
                    metadata.dpi = (ppu_x * 0.0254, ppu_y * 0.0254)
        pos = end
    if metadata.exif is None and raw_exif:
        metadata.exif = _with_exif_prefix(raw_exif)
    if size is None:
        raise _Unreadable("PNG without a header chunk")
    if not seen_idat or not seen_iend:
        raise _Unreadable("truncated PNG: " + ("no image data" if not seen_idat else "no end chunk"))
    return _Probe("png", size[0], size[1], metadata, grey_alpha=colour_type == 4, pictures=max(frames, 1),
                  png_grey_key=grey_key)


def _png_grey_key(body: memoryview, depth: int) -> int:
    """A grey PNG's tRNS key (the one grey level that is transparent) on the scale OpenCV decodes the samples to.

    OpenCV drops a grey PNG's tRNS (it keeps an RGB or palette one, as an alpha channel), and widens 1, 2 and
    4-bit grey to 8 bits by repeating the bits, which multiplies the key alike.
    """
    (key,) = struct.unpack_from(">H", body)
    top = (1 << depth) - 1
    key &= top
    return key * (255 // top) if depth < 8 else key


def _png_icc(body: bytes) -> bytes | None:
    nul = body.find(b"\x00")
    if nul < 0 or nul + 2 > len(body):
        return None
    return _png_inflate(b"iCCP", body[nul + 2 :])


def _png_inflate(kind: bytes, compressed: bytes) -> bytes | None:
    """A compressed chunk's text or profile, or None (logged) when it is corrupt or inflates past the limit."""
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(compressed, _PNG_INFLATE_LIMIT)
    except zlib.error:
        inflated = None
    if inflated is None or not (inflater.eof or inflater.unconsumed_tail):  # damaged, or cut short
        log.warning("ignoring a corrupt compressed PNG %s chunk", kind.decode())
        return None
    if inflater.unconsumed_tail:
        log.warning("ignoring a PNG %s chunk that inflates to more than %d MB (%d bytes compressed): not a real "
                    "profile or text, a decompression bomb", kind.decode(), _PNG_INFLATE_LIMIT // 2**20,
                    len(compressed))
        return None
    return inflated


def _png_keyword(body: memoryview) -> bytes:
    return bytes(body[:80]).split(b"\x00", 1)[0]


def _png_raw_profile(text: bytes | None) -> bytes | None:
    """Bytes of an ImageMagick "Raw profile type …" text: name, length, then hex lines."""
    lines = (text or b"").strip().split(b"\n", 2)
    try:
        return bytes.fromhex(b"".join(lines[2].split()).decode("ascii")) if len(lines) == 3 else None
    except ValueError:
        return None


def _png_text(kind: bytes, body: bytes) -> bytes | None:
    """The text of a tEXt, zTXt or iTXt chunk (XMP is meant for iTXt; OpenCV writes tEXt)."""
    nul = body.find(b"\x00")
    if kind == b"tEXt":
        return body[nul + 1 :]
    if kind == b"zTXt":
        compressed, text = True, body[nul + 2 :]
    else:  # iTXt: keyword \0 flag method language \0 translated-keyword \0 text
        parts = body[nul + 3 :].split(b"\x00", 2)
        if len(parts) < 3:
            return None
        compressed, text = body[nul + 1] == 1, parts[2]
    return _png_inflate(kind, text) if compressed else text


def _probe_jpeg(data: bytes) -> _Probe:
    metadata = ImageMetadata()
    icc_parts: dict[int, bytes] = {}
    tables: dict[int, list[int]] = {}
    size: tuple[int, int] | None = None
    view = memoryview(data)
    pos = 2
    while True:
        if pos + 4 > len(data):
            raise _Unreadable("truncated JPEG: ends inside its headers")
        if data[pos] != 0xFF:
            raise _Unreadable(f"corrupt JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            raise _Unreadable("corrupt JPEG: ends before any image data")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if pos + 2 + length > len(data):
            raise _Unreadable("truncated JPEG: ends inside its headers")
        if marker == 0xDA:
            break
        body = view[pos + 4 : pos + 2 + length]
        if marker in _JPEG_SOF:
            _precision, height, width, ncomp = struct.unpack_from(">BHHB", body)
            size = (width, height)
            metadata.jpeg_progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            if ncomp == 3 and len(body) >= 9:
                sampling = (body[7] >> 4, body[7] & 15)
                metadata.jpeg_subsampling = _JPEG_SUBSAMPLING.get(sampling)
        elif marker == 0xDB:
            tables.update(_jpeg_dqt(bytes(body)))
        elif marker == 0xE0 and bytes(body[:5]) == b"JFIF\x00" and len(body) >= 12:
            units, x_density, y_density = struct.unpack_from(">BHH", body, 7)
            if units in (1, 2) and x_density and y_density:
                scale = 1.0 if units == 1 else 2.54
                metadata.dpi = (x_density * scale, y_density * scale)
        elif marker == 0xE1 and bytes(body[:6]) == _EXIF_PREFIX and metadata.exif is None:
            metadata.exif = bytes(body)
        elif marker == 0xE1 and bytes(body[: len(_XMP_JPEG_PREFIX)]) == _XMP_JPEG_PREFIX:
            metadata.xmp = bytes(body[len(_XMP_JPEG_PREFIX) :])
        elif marker == 0xE1 and bytes(body[: len(_XMP_EXTENSION_JPEG_PREFIX)]) == _XMP_EXTENSION_JPEG_PREFIX:
            metadata.xmp_extension.append(bytes(body[len(_XMP_EXTENSION_JPEG_PREFIX) :]))
        elif marker == 0xFE:
            metadata.jpeg_comments.append(bytes(body))
        elif marker == 0xE2 and bytes(body[:12]) == _ICC_JPEG_PREFIX and len(body) > 14:
            icc_parts[body[12]] = bytes(body[14:])
        elif marker == 0xED and bytes(body[: len(_PHOTOSHOP_JPEG_PREFIX)]) == _PHOTOSHOP_JPEG_PREFIX:
            part = bytes(body[len(_PHOTOSHOP_JPEG_PREFIX) :])
            metadata.photoshop = (metadata.photoshop or b"") + part  # long blocks span segments
        pos += 2 + length
    if size is None:
        raise _Unreadable("corrupt JPEG: no frame header before the image data")
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise _Unreadable("truncated JPEG: no end-of-image marker")
    if icc_parts:
        metadata.icc = b"".join(icc_parts[k] for k in sorted(icc_parts))
    if tables:  # table 0 quantises luminance in every common encoder
        metadata.jpeg_quality = _estimate_jpeg_quality(tables.get(0) or next(iter(tables.values())))
    return _Probe("jpeg", size[0], size[1], metadata)


def _jpeg_dqt(body: bytes) -> dict[int, list[int]]:
    """Quantisation tables of one DQT segment, by table id."""
    tables = {}
    i = 0
    while i < len(body):
        wide = body[i] >> 4
        step = 2 if wide else 1
        raw = body[i + 1 : i + 1 + 64 * step]
        if len(raw) < 64 * step:
            break
        tables[body[i] & 15] = list(struct.unpack(">64H", raw)) if wide else list(raw)
        i += 1 + 64 * step
    return tables


def _estimate_jpeg_quality(luminance: list[int]) -> int:
    """Invert libjpeg's quality scaling of the standard luminance table.

    Exact for files written by libjpeg-based encoders (most software); for
    cameras with their own tables it gives the libjpeg quality of similar
    coarseness, which is what the re-encode needs.
    """
    scale = 100.0 * sum(luminance) / _STD_LUMINANCE_SUM
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


def _probe_webp(data: bytes) -> _Probe:
    metadata = ImageMetadata()
    (riff_size,) = struct.unpack_from("<I", data, 4)
    end = 8 + riff_size
    if end > len(data):
        raise _Unreadable(f"truncated WebP: {len(data)} of {end} bytes")
    size: tuple[int, int] | None = None
    canvas: tuple[int, int] | None = None
    frames = 0  # ANMF chunks: an animation's frames
    view = memoryview(data)
    pos = 12
    while pos + 8 <= end:
        kind = bytes(view[pos : pos + 4])
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if pos + 8 + length > end:
            raise _Unreadable(f"truncated WebP: chunk {kind!r} runs past the end")
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"VP8X" and length >= 10:
            canvas = (1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little"))
        elif kind == b"VP8L" and length >= 5 and size is None:
            bits = int.from_bytes(body[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            metadata.webp_lossless = True
        elif kind == b"VP8 " and length >= 10 and size is None:
            if bytes(body[3:6]) != b"\x9d\x01\x2a":
                raise _Unreadable("corrupt WebP: bad VP8 frame header")
            width, height = struct.unpack_from("<HH", body, 6)
            size = (width & 0x3FFF, height & 0x3FFF)
            metadata.webp_lossless = False
        elif kind == b"ANMF":
            frames += 1
        elif kind == b"ICCP":
            metadata.icc = bytes(body)
        elif kind == b"EXIF":
            metadata.exif = _with_exif_prefix(bytes(body))
        elif kind == b"XMP ":
            metadata.xmp = bytes(body)
        pos += 8 + length + (length & 1)
    found = canvas or size
    if found is None:
        raise _Unreadable("WebP without image data")
    return _Probe("webp", found[0], found[1], metadata, pictures=max(frames, 1))


def _probe_jp2(data: bytes) -> _Probe:
    try:
        header = jpeg2000.read_header(data)
    except jpeg2000.Jp2Error as exc:
        raise _Unreadable(str(exc)) from None
    metadata = ImageMetadata(
        exif=header.exif, icc=header.icc, xmp=header.xmp, iptc=header.iptc, dpi=header.dpi, jp2=header.layout
    )
    return _Probe("jp2", header.width, header.height, metadata, grey_alpha=header.components == 2, orientation=1,
                  keeps_orientation_tags=True)


def _probe_bmp(data: bytes) -> _Probe:
    """A Windows bitmap's size, resolution and alpha from its headers (core, info, V2-V5)."""
    offset, header_size = struct.unpack_from("<II", data, 10)
    compression, ppm = 0, (0, 0)
    if header_size == 12:  # OS/2 core header
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
    elif header_size >= 40 and len(data) >= 54:
        width, height, _planes, bits, compression, _size, ppm_x, ppm_y = struct.unpack_from("<iiHHIIii", data, 18)
        ppm = (ppm_x, ppm_y)
    else:
        raise _Unreadable(f"corrupt BMP: a header of {header_size} bytes")
    if compression in (4, 5):
        raise _Unreadable("a BMP holding a JPEG or PNG stream is not supported; save it as PNG or a plain BMP")
    if width <= 0 or height == 0 or bits not in (1, 2, 4, 8, 16, 24, 32):
        raise _Unreadable(f"corrupt BMP: {width}x{height} pixels of {bits} bits")
    if compression in (0, 3, 6):  # uncompressed rows, padded to four bytes
        end = offset + ((width * bits + 31) // 32) * 4 * abs(height)
        if end > len(data):
            raise _Unreadable(f"truncated BMP: pixel data ends at byte {end}, file has {len(data)}")
    alpha = None
    if bits == 32 and compression in (3, 6) and (header_size >= 56 or compression == 6) and len(data) >= 70:
        (mask,) = struct.unpack_from("<I", data, 66)
        alpha = {0xFF: 0, 0xFF00: 1, 0xFF0000: 2, 0xFF000000: 3}.get(mask)
    dpi = (ppm[0] * 0.0254, ppm[1] * 0.0254) if min(ppm) > 0 else None
    return _Probe("bmp", width, abs(height), ImageMetadata(dpi=dpi), bmp_truecolour=bits > 8, bmp_alpha=alpha)


def _probe_tiff(data: bytes) -> _Probe:
    """The first full-size page's size, layout and metadata, and the other full-size pages.

    A reduced-resolution preview written before the pages (NewSubfileType 1) is
    not the picture: the first full-size page is, and its own tags describe it
    (ICC, XMP and IPTC fall back to the first directory's). The EXIF and the
    descriptive tags come from the first directory, where writers put them.
    """
    import tifffile

    _check_tiff_directories(data)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            pictures = _tiff_pictures(tif, len(data))
            first = tif.pages.first
            main = tif.pages[pictures[0]] if pictures else first
            shape = main.shape
            tags = main.tags
            width, height = int(main.imagewidth), int(main.imagelength)
            samples = int(main.samplesperpixel)
            alpha_kind = _tiff_alpha_kind(tags)
            orientation = tags.valueof(274)
            metadata = _tiff_page_metadata(data, main, _tiff_exif(data), fallback=first)
            end = max((o + n for o, n in zip(main.dataoffsets, main.databytecounts, strict=False)), default=0)
            pages = tuple((i, int(tif.pages[i].imagewidth), int(tif.pages[i].imagelength)) for i in pictures[1:])
    except _Unreadable:
        raise
    except Exception as exc:  # tifffile raises many kinds on corrupt files
        raise _Unreadable(f"corrupt TIFF: {exc}") from None
    if end > len(data):
        raise _Unreadable(f"truncated TIFF: image data ends at byte {end}, file has {len(data)}")
    if not shape:
        raise _Unreadable("TIFF without image data")
    return _Probe(
        "tiff",
        width,
        height,
        metadata,
        grey_alpha=samples == 2,
        orientation=int(orientation) if orientation in range(1, 9) else None,
        pictures=max(len(pictures), 1),
        pages=pages,
        tiff_page=pictures[0] if pictures else 0,
        tiff_alpha=alpha_kind is not None,
    )


def _tiff_alpha_kind(tags: Any) -> int | None:
    """A TIFF page's ExtraSamples value when it declares an alpha sample: 1 associated, 2 unassociated."""
    extras = tags.valueof(338)
    kind = extras[0] if isinstance(extras, tuple) else extras
    return int(kind) if kind in (1, 2) else None


def _tiff_page_metadata(data: bytes, page: Any, exif: bytes | None, fallback: Any = None) -> ImageMetadata:
    """What travels with one full-size page of an open TIFF: ``exif`` (its descriptive tags), its own ICC profile,
    XMP, IPTC, resolution and name, and the hints to write it in its own layout.

    Each page keeps its own (a scan's recto and verso need not share profile, caption or resolution). ICC, XMP and
    IPTC missing from the page are taken from ``fallback``, the first directory, when that is a preview before it.
    """
    tags = page.tags
    directories = (tags,) if fallback is None else (tags, fallback.tags)

    def own(code: int) -> Any:
        return next((found for found in (d.get(code) for d in directories) if found is not None), None)

    icc, xmp = (own(code) for code in (_TIFF_ICC_TAG, _TIFF_XMP_TAG))
    return ImageMetadata(
        exif=exif,
        icc=bytes(icc.value) if icc is not None and icc.value else None,
        xmp=bytes(xmp.value) if xmp is not None and xmp.value else None,
        iptc=_tiff_raw_tag(data, own(_TIFF_IPTC_TAG)),
        photoshop=_tiff_raw_tag(data, own(_TIFF_PHOTOSHOP_TAG)),
        tiff_compression=int(page.compression),
        tiff_alpha_kind=_tiff_alpha_kind(tags) or 2,
        tiff_miniswhite=_tiff_miniswhite(page),
        tiff_page_name=_tiff_text(tags.valueof(285)),
        **_tiff_resolution(tags),
    )


def _check_tiff_directories(data: bytes) -> None:
    """Follow the chain of directories and refuse a file cut inside it.

    tifffile stops quietly at a directory that lies past the end of the data
    (and fails on the first one with an IndexError): the pages after the cut
    would be lost, or the error would say nothing.
    """
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    (offset,) = struct.unpack_from(order + offset_format, data, 8 if big else 4)
    head, link = struct.calcsize(count_format), struct.calcsize(offset_format)
    seen: set[int] = set()
    while offset and offset not in seen:  # a loop back is tifffile's to handle
        seen.add(offset)
        where = f"directory {len(seen)} (at byte {offset})"
        if offset + head > len(data):
            raise _Unreadable(f"truncated TIFF: {where} is beyond the file's {len(data)} bytes")
        (count,) = struct.unpack_from(order + count_format, data, offset)
        end = offset + head + count * entry_size + link
        if end > len(data):
            raise _Unreadable(f"truncated TIFF: {where} ends at byte {end}, beyond the file's {len(data)} bytes")
        (offset,) = struct.unpack_from(order + offset_format, data, end - link)


def _tiff_pictures(tif: Any, size: int) -> list[int]:
    """Indices of the full-size pages of a TIFF, in file order.

    Reduced-resolution previews and transparency masks (NewSubfileType bits 0
    and 2) are no pictures of their own, and neither is a directory without
    image data. A page whose data runs past the end of the ``size`` bytes
    means the file was cut: it is refused, not shortened.
    """
    indices = []
    for index, page in enumerate(tif.pages):
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
        if ends and max(ends) > size:
            raise _Unreadable(f"truncated TIFF: page {index + 1}'s data ends at byte {max(ends)}, beyond the "
                              f"file's {size} bytes")
        if int(getattr(page, "subfiletype", 0)) & 0b101 or not getattr(page, "shape", ()):
            continue
        indices.append(index)
    return indices


def _tiff_miniswhite(page: Any) -> bool:
    """Whether an open tifffile page is integer grey stored with 0 as white (Photometric 0), which is read inverted."""
    return int(page.photometric) == 0 and page.dtype in (np.uint8, np.uint16)


def _tiff_pages(data: bytes, probe: _Probe) -> list[DecodedImage]:
    """The full-size pages after the first (``probe.pages``), decoded like a first page but with no metadata.

    The file is parsed once for all of them. Only the layouts tifffile reads (grey or RGB, 8/16-bit or float,
    with or without alpha) are taken; a page in another (palette, CMYK) refuses the file as an animation is
    refused, rather than losing that page.
    """
    import tifffile

    if not probe.pages:
        return []
    pages = []
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for index, _, _ in probe.pages:
            page = tif.pages[index]
            try:
                samples = _page_samples(page)
            except _Unreadable as exc:
                raise _Unreadable(f"TIFF page {index + 1}: {exc}") from None
            except Exception as exc:  # tifffile raises many kinds on damaged data
                raise _Unreadable(f"corrupt TIFF page {index + 1}: {exc}") from None
            if samples is None:
                raise _SeveralPictures(probe)
            orientation = page.tags.valueof(274)
            page_probe = _Probe(
                "tiff", samples.shape[1], samples.shape[0],
                _tiff_page_metadata(data, page, _tiff_text_exif(page.tags)),
                grey_alpha=samples.shape[2] == 2, orientation=int(orientation) if orientation in range(1, 9) else None,
            )
            pages.append(_assemble(samples, False, page_probe))
    return pages


def _tiff_raw_tag(data: bytes, tag: Any) -> bytes | None:
    """A tag's value bytes as stored (IPTC is often typed LONG, so no decoding)."""
    if tag is None or not tag.valuebytecount:
        return None
    return data[tag.valueoffset : tag.valueoffset + tag.valuebytecount]


def _tiff_resolution(tags: Any) -> dict[str, Any]:
    """A TIFF page's resolution as :class:`ImageMetadata` fields: ``dpi``, the unit it was stated in, and
    ``pixel_aspect`` for ResolutionUnit NONE, whose X/Y resolution gives the pixels' shape and no size.

    An absent unit is an inch (the TIFF default). NONE stays unitless: read as dots per inch it would invent a size
    (tifffile writes 1/1 NONE into every file it is not given a resolution for: 1 dpi).
    """

    def value(r: Any) -> float:
        return r[0] / r[1] if isinstance(r, tuple) else float(r)

    x, y, unit = tags.valueof(282), tags.valueof(283), tags.valueof(296)
    try:
        unit = 2 if unit is None else int(unit)
        if x is None or y is None or unit not in (1, 2, 3):
            return {}
        resolution = (value(x), value(y))
    except (ZeroDivisionError, TypeError, ValueError):
        return {}
    if unit == 1:
        return {"tiff_resolution_unit": 1, "pixel_aspect": resolution}
    scale = 2.54 if unit == 3 else 1.0
    return {"dpi": (resolution[0] * scale, resolution[1] * scale), "tiff_resolution_unit": unit}


def _tiff_text_exif(tags: Any) -> bytes | None:
    """A later page's own descriptive tags (ImageDescription, Artist, …) as an EXIF block, the form in which the
    first page's travel (:func:`_tiff_exif`) and are written back."""
    from PIL import Image

    block = Image.Exif()
    for tag in _TIFF_TEXT_TAGS:
        text = _tiff_text(tags.valueof(tag))
        if text is not None:
            block[tag] = text
    return block.tobytes() if len(block) else None


def _tiff_exif(data: bytes) -> bytes | None:
    """The descriptive tags and EXIF/GPS directories of a TIFF, as an EXIF block.

    A classic TIFF file is itself a TIFF-structured EXIF block, so Pillow's
    EXIF reader walks its first directory; image-structure tags (strips,
    sizes) are left behind.
    """
    from PIL import Image

    if data[2:4] in (b"+\x00", b"\x00+"):
        return None  # BigTIFF: Pillow's EXIF reader only knows classic TIFF
    try:
        source = Image.Exif()
        source.load(data)
        out = Image.Exif()
        for tag in _TIFF_TEXT_TAGS:
            if tag in source:
                out[tag] = source[tag]
        if _ORIENTATION_TAG in source:
            out[_ORIENTATION_TAG] = int(source[_ORIENTATION_TAG])
        subifds = _exif_subifds(source)
        for sub, entries in subifds.items():
            out.get_ifd(sub).update(entries)
        return out.tobytes() if len(out) or subifds else None
    except Exception as exc:  # a damaged EXIF directory must not lose the picture
        log.warning("ignoring unreadable TIFF EXIF tags: %s", exc)
        return None


def _exif_subifds(exif: Any) -> dict[int, dict[int, Any]]:
    """The non-empty EXIF and GPS directories of a loaded ``PIL.Image.Exif``."""
    found = {}
    for sub in (_EXIF_IFD_TAG, _GPS_IFD_TAG):
        entries = dict(exif.get_ifd(sub))
        if sub == _EXIF_IFD_TAG and _INTEROP_IFD_TAG in entries:
            interop = dict(exif.get_ifd(_INTEROP_IFD_TAG))
            if interop:
                entries[_INTEROP_IFD_TAG] = interop
            else:
                del entries[_INTEROP_IFD_TAG]
        if entries:
            found[sub] = entries
    return found


# ---------------------------------------------------------------- EXIF patching


def _with_exif_prefix(block: bytes) -> bytes:
    return block if block.startswith(_EXIF_PREFIX) else _EXIF_PREFIX + block


def _ifd_slots(tiff: bytes, base: int = 0, ifd: int | None = None) -> tuple[str, dict[int, tuple[int, int]]] | None:
    """The byte order of a TIFF structure at ``base`` and, for the directory at ``ifd`` (relative to ``base``;
    IFD0 by default), each tag's type and the byte offset of its value field. None if it is not one.

    Works on EXIF blocks (base 6, after the prefix) and on TIFF files, classic or BigTIFF; entries cut off by the
    end of the data are left out. Values are patched in place through these offsets, every other byte untouched.
    """
    order = {b"II": "<", b"MM": ">"}.get(tiff[base : base + 2])
    if order is None or len(tiff) < base + 16:
        return None
    big = struct.unpack_from(order + "H", tiff, base + 2)[0] == 43
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    if ifd is None:
        (ifd,) = struct.unpack_from(order + offset_format, tiff, base + (8 if big else 4))
    start = base + ifd
    head = struct.calcsize(count_format)
    if start + head > len(tiff):
        return None
    (count,) = struct.unpack_from(order + count_format, tiff, start)
    slots: dict[int, tuple[int, int]] = {}
    for i in range(count):
        entry = start + head + entry_size * i
        if entry + entry_size > len(tiff):
            break
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        slots.setdefault(tag, (kind, entry + (12 if big else 8)))
    return order, slots


def _orientation_slot(tiff: bytes, base: int = 0) -> tuple[int, str] | None:
    """Byte offset of IFD0's Orientation value (a SHORT) in a TIFF structure at ``base``, and its byte order."""
    found = _ifd_slots(tiff, base)
    if found is None:
        return None
    order, slots = found
    kind, offset = slots.get(_ORIENTATION_TAG, (0, 0))
    return (offset, order) if kind == 3 else None


def _exif_dimensions_turned(exif: bytes) -> bytes:
    """An EXIF block with its PixelXDimension and PixelYDimension exchanged, every other byte untouched.

    Applying orientation 5-8 turns the picture a quarter: left as they were, the two would describe the stored
    sideways image, not the upright one written. A value that does not fit the other's type stays put.
    """
    base = len(_EXIF_PREFIX)
    ifd0 = _ifd_slots(exif, base)
    if ifd0 is None or ifd0[1].get(_EXIF_IFD_TAG, (0, 0))[0] not in (4, 13):  # LONG or IFD: the ExifIFD's offset
        return exif
    order, slots = ifd0
    (exif_ifd,) = struct.unpack_from(order + "I", exif, slots[_EXIF_IFD_TAG][1])
    found = _ifd_slots(exif, base, exif_ifd)
    formats = {3: "H", 4: "I"}  # SHORT or LONG, as the standard allows
    sides = [found[1].get(tag) for tag in (0xA002, 0xA003)] if found else []
    if len(sides) != 2 or any(side is None or side[0] not in formats for side in sides):
        return exif
    values = [struct.unpack_from(order + formats[kind], exif, slot)[0] for kind, slot in sides]
    if max(values) > 0xFFFF and any(kind == 3 for kind, _ in sides):
        return exif
    turned = bytearray(exif)
    for (kind, slot), value in zip(sides, values[::-1], strict=True):
        struct.pack_into(order + formats[kind], turned, slot, value)
    return bytes(turned)


def _exif_orientation_slot(exif: bytes) -> tuple[int, str] | None:
    return _orientation_slot(exif, len(_EXIF_PREFIX))


def _upright(tiff: bytes, slot: tuple[int, str] | None) -> bytes:
    """``tiff`` with the Orientation value at ``slot`` set to 1, every other byte untouched."""
    if slot is None:
        return tiff
    patched = bytearray(tiff)
    struct.pack_into(slot[1] + "H", patched, slot[0], 1)
    return bytes(patched)


def _exif_orientation(exif: bytes | None) -> int:
    slot = _exif_orientation_slot(exif) if exif else None
    if slot is None or exif is None:
        return 1
    (value,) = struct.unpack_from(slot[1] + "H", exif, slot[0])
    return value if 1 <= value <= 8 else 1


_XMP_ORIENTATION = re.compile(rb"(tiff:Orientation\s*=\s*[\"']|<tiff:Orientation>\s*)([1-8])")


def _xmp_orientation(xmp: bytes | None) -> int:
    match = _XMP_ORIENTATION.search(xmp) if xmp else None
    return int(match.group(2)) if match else 1


def _xmp_upright(xmp: bytes) -> bytes:
    return _XMP_ORIENTATION.sub(rb"\g<1>1", xmp)


# ---------------------------------------------------------------- pixels in


def _decode_samples(data: bytes, probe: _Probe) -> tuple[np.ndarray, bool]:
    """Decoded samples H×W×C in their own dtype, and whether colour is BGR."""
    if probe.format == "jp2":
        assert probe.metadata.jp2 is not None
        try:
            return jpeg2000.decode(data, probe.metadata.jp2.bits), False
        except jpeg2000.Jp2Error as exc:
            raise _Unreadable(str(exc)) from None
    if probe.format == "tiff":
        samples = _tiff_samples(data, probe.tiff_page)
        if samples is not None:
            return samples, False
        if probe.tiff_page:  # OpenCV reads the first directory, here a preview
            raise _Unreadable(f"the first full-size page ({probe.tiff_page + 1}) follows a preview and is in a layout "
                              "read only as a first page (palette, CMYK, bilevel); save it without the preview")
        if probe.orientation not in (None, 1):
            # OpenCV applies TIFF orientation itself (depending on its version):
            # hide it so that every path is oriented once, in _assemble.
            data = _upright(data, _orientation_slot(data))
    buffer = np.frombuffer(data, np.uint8)
    # OpenCV reads an OS/2 bitmap's colour as grey, and a 32-bit one's fourth byte as alpha or not by its own rules
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION if probe.bmp_truecolour else cv2.IMREAD_UNCHANGED
    try:
        if probe.format == "jpeg":
            samples, said = _with_stderr(lambda: cv2.imdecode(buffer, flags))
            damage = _LIBJPEG_DAMAGE.search(said)
            if damage:
                raise _Unreadable(f"corrupt JPEG data (libjpeg: {damage.group().decode()}); the picture would be "
                                  "grey or smeared from there on")
        else:
            samples = cv2.imdecode(buffer, flags)
    except cv2.error as exc:
        raise _Unreadable(f"{probe.format.upper()} decoder failed: {exc.err}") from None
    if samples is None:
        raise _Unreadable(f"corrupt {probe.format.upper()} data")
    if probe.format == "jpeg" and samples.ndim == 3 and samples.shape[2] == 4:  # CMYK: OpenCV converts
        samples = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if samples.ndim == 2:
        samples = samples[..., None]
    if probe.png_grey_key is not None and samples.shape[2] == 1:
        # like RGB and palette tRNS: transparency as an alpha channel, which the restoration cannot shift the way
        # it shifts grey levels off (or onto) a colour key
        opaque = np.iinfo(samples.dtype).max
        samples = np.dstack([samples, np.where(samples[..., 0] == probe.png_grey_key, 0, opaque).astype(samples.dtype)])
    if probe.format == "tiff" and samples.shape[2] == 4 and not probe.tiff_alpha:
        samples = samples[..., :3]  # OpenCV hands CMYK over as BGRA with an opaque A: no alpha in the file
    if probe.bmp_alpha is not None:
        alpha = _bmp_alpha(data, probe.bmp_alpha, samples.shape[:2])
        if alpha.any():  # all zero: the writer left the byte unused (browsers show such files opaque)
            samples = np.dstack([samples, alpha])
    return samples, True


def _with_stderr(decode: Callable[[], Any]) -> tuple[Any, bytes]:
    """``decode()``'s result and what was written to the process's stderr meanwhile (then written there too).

    libjpeg inside OpenCV only prints a warning when a scan's data is cut or
    damaged, and decodes the rest as grey: what it prints is the only sign.
    Output of other threads in that moment is passed on after, not lost.
    """
    with _STDERR_LOCK:
        try:
            sink = tempfile.TemporaryFile()
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no stderr to watch, or nowhere to put it
            return decode(), b""
        with sink:
            try:
                os.dup2(sink.fileno(), 2)
                result = decode()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            said = sink.read()
    if said:
        os.write(2, said)
    return result, said


def _bmp_alpha(data: bytes, byte: int, shape: tuple[int, ...]) -> np.ndarray:
    """The alpha bytes of an uncompressed 32-bit BMP (OpenCV drops them), top row first."""
    offset = struct.unpack_from("<I", data, 10)[0]
    (height,) = struct.unpack_from("<i", data, 22)
    rows, cols = shape
    pixels = np.frombuffer(data, np.uint8, count=rows * cols * 4, offset=offset).reshape(rows, cols, 4)
    alpha = pixels[..., byte]
    return np.ascontiguousarray(alpha[::-1] if height > 0 else alpha)  # positive height: bottom row first


def _tiff_samples(data: bytes, index: int) -> np.ndarray | None:
    """The samples of page ``index`` of a grey or RGB(A) TIFF read by tifffile, else None.

    OpenCV reads 8-bit RGBA TIFF through libtiff's RGBA interface, which
    premultiplies the colour by alpha, and it drops the alpha of grey+alpha
    TIFFs; tifffile returns the stored samples. Palette, CMYK, bilevel and
    other photometrics, and compressions tifffile has no codec for, are left
    to OpenCV, which converts them to RGB. Damaged data in a layout tifffile
    reads is an error: OpenCV would fill the damaged strips with black.
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return _page_samples(tif.pages[index])
    except _Unreadable:
        raise
    except Exception as exc:  # tifffile raises many kinds on damaged data
        raise _Unreadable(f"corrupt TIFF data: {exc}") from None


def _page_samples(page: Any) -> np.ndarray | None:
    """An open tifffile page's samples H×W×C when it is grey or RGB(A) in a sample type we keep, else None.

    MINISWHITE grey comes back inverted (0 is black), like every other grey.
    Raises what tifffile raises on damaged data.
    """
    import tifffile

    photometric = int(page.photometric)
    if photometric not in (1, 2) and not (photometric == 6 and int(page.compression) == 7) \
            and not _tiff_miniswhite(page):
        return None
    if page.dtype.kind in "fiu" and page.dtype not in (np.uint8, np.uint16, np.float32):
        # OpenCV cannot read these either, and called a half-float scan 'corrupt TIFF data'
        raise _Unreadable(f"{page.dtype} samples ({page.dtype.itemsize * 8}-bit "
                          f"{'float' if page.dtype.kind == 'f' else 'integer'}) are not supported: only 8/16-bit "
                          "integer and 32-bit float; convert the file to one of those")
    if page.dtype not in (np.uint8, np.uint16, np.float32) or page.axes not in ("YX", "YXS", "SYX"):
        return None
    if int(page.compression) not in tifffile.TIFF.DECOMPRESSORS or int(page.predictor) not in tifffile.TIFF.PREDICTORS:
        return None  # no codec here: OpenCV's libtiff may have one
    samples = page.asarray()
    if page.axes == "SYX":
        samples = np.moveaxis(samples, 0, -1)
    samples = samples if samples.ndim == 3 else samples[..., None]
    if photometric == 0:
        samples = samples.copy()
        samples[..., 0] = np.iinfo(samples.dtype).max - samples[..., 0]
    return samples


def _assemble(samples: np.ndarray, bgr: bool, probe: _Probe) -> DecodedImage:
    dtype = samples.dtype
    if dtype not in (np.uint8, np.uint16, np.float32):
        raise _Unreadable(f"{dtype} samples are not supported (only 8/16-bit integer and 32-bit float)")
    if samples.shape[0] != probe.height or samples.shape[1] != probe.width:
        raise _Unreadable(
            f"decoded {samples.shape[1]}x{samples.shape[0]} pixels, header says {probe.width}x{probe.height}"
        )
    count = samples.shape[2]
    alpha: np.ndarray | None = None
    if probe.grey_alpha and count == 4:  # OpenCV expands grey+alpha PNG to BGRA
        colour, alpha, channels = samples[..., :1], samples[..., 3], 2
    elif count == 2:
        colour, alpha, channels = samples[..., :1], samples[..., 1], 2
    elif count in (1, 3):
        colour, channels = samples, count
    elif count == 4:
        colour, alpha, channels = samples[..., :3], samples[..., 3], 4
    else:
        raise _Unreadable(f"{count} channels are not supported (only grey, grey+alpha, RGB, RGBA)")
    if bgr and colour.shape[2] == 3:
        colour = colour[..., ::-1]
    metadata = probe.metadata
    if metadata.icc is not None and not _icc_fits(metadata.icc, grey=colour.shape[2] == 1):
        # A CMYK/Lab profile of a converted file, or a mislabelled one: writing
        # it with RGB or grey pixels would tell viewers to misread every colour.
        log.info("dropping an ICC profile for %r data from %s pixels", metadata.icc[16:20], colour.shape[2])
        metadata.icc = None
    if probe.orientation is not None:
        orientation = probe.orientation
    elif metadata.exif and _exif_orientation_slot(metadata.exif):
        orientation = _exif_orientation(metadata.exif)
    else:  # some editors record the orientation only in XMP
        orientation = _xmp_orientation(metadata.xmp)
    colour = _orient(colour, orientation)
    alpha = None if alpha is None else np.ascontiguousarray(_orient(alpha, orientation))
    metadata.orientation = orientation
    if metadata.exif is not None and not probe.keeps_orientation_tags:
        metadata.exif = _upright(metadata.exif, _exif_orientation_slot(metadata.exif))
        if orientation in (5, 6, 7, 8):
            metadata.exif = _exif_dimensions_turned(metadata.exif)
    if metadata.xmp is not None and not probe.keeps_orientation_tags:
        metadata.xmp = _xmp_upright(metadata.xmp)
    if orientation in (5, 6, 7, 8):
        metadata.dpi = metadata.dpi and (metadata.dpi[1], metadata.dpi[0])
        metadata.pixel_aspect = metadata.pixel_aspect and (metadata.pixel_aspect[1], metadata.pixel_aspect[0])
    if alpha is not None and metadata.tiff_alpha_kind == 1:
        colour = _unpremultiplied(colour, alpha)
    metadata.float_range = _float_range(colour)
    return DecodedImage(
        pixels=_to_unit(colour, metadata.float_range),
        alpha=alpha,
        format=probe.format,
        dtype=dtype,
        channels=channels,
        metadata=metadata,
    )


def _icc_fits(icc: bytes, grey: bool) -> bool:
    """Whether the profile's data colour space (header bytes 16–20) is that of the pixels."""
    return icc[16:20] == (b"GRAY" if grey else b"RGB ")


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to an array whose first axes are H, W."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return np.rot90(array, 2).swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


def _unpremultiplied(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour stored multiplied by its alpha (TIFF ExtraSamples 1, associated alpha) divided by it, as float32.

    The models must see the picture, not the picture faded towards black where it is transparent: they would
    sharpen the alpha's edges into the colour, and the written colour would exceed its alpha. Integer samples come
    back in [0, 1] (colour above its alpha, which a valid file has not, is clipped), float samples on their own
    scale; fully transparent pixels have no colour and get 0.
    """
    weight = alpha.astype(np.float32)[..., None]
    straight = np.divide(colour.astype(np.float32), weight, out=np.zeros(colour.shape, np.float32), where=weight > 0)
    if colour.dtype != np.float32:
        np.fmin(straight, np.float32(1.0), out=straight)
    return straight


def _float_range(samples: np.ndarray) -> tuple[float, float] | None:
    """The (low, high) that float samples reaching outside [0, 1] are scaled from, or None.

    The models work in [0, 1], but a linear or HDR float TIFF holds highlights above 1 and, after a conversion to
    narrower primaries, out-of-gamut colours below 0: clipping them would lose them even at strength 0. The range
    is [0, 1] widened to the finite samples' own extremes, so black stays at 0 unless a sample is negative, and a
    linear restoration commutes with the mapping. NaN and infinities do not widen it (they are clipped as before).
    """
    if samples.dtype != np.float32:
        return None
    finite = samples[np.isfinite(samples)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = max(1.0, float(finite.max())) if finite.size else 1.0
    return None if (low, high) == (0.0, 1.0) else (low, high)


def _to_unit(samples: np.ndarray, float_range: tuple[float, float] | None = None) -> np.ndarray:
    """Samples as float32 in [0, 1]: integers over their type's maximum, floats from ``float_range`` (or clipped)."""
    if samples.dtype == np.float32:
        if float_range is None:
            return _clip_unit(samples.copy(order="C"), 1.0)
        low, high = float_range
        unit = ((samples.astype(np.float64) - low) / (high - low)).astype(np.float32, order="C")
        return _clip_unit(unit, 1.0)
    unit = samples.astype(np.float32, order="C")  # rotated/BGR views become plain C arrays
    unit /= np.float32(np.iinfo(samples.dtype).max)
    return unit


def _clip_unit(values: np.ndarray, top: float) -> np.ndarray:
    """Clip float32 ``values`` to [0, top] in place; NaN becomes 0 (fmax/fmin skip NaN)."""
    np.fmax(values, np.float32(0.0), out=values)
    np.fmin(values, np.float32(top), out=values)
    return values


def quantise(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float [0, 1] pixels as :func:`encode_image` stores them in ``dtype`` samples.

    uint8/uint16: clipped to [0, 1], scaled to the full range and rounded to
    nearest; float32: clipped to [0, 1]. NaN becomes 0. Use it to measure
    exactly the values that land in the output file.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return _clip_unit(np.array(pixels, dtype=np.float32), 1.0)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot quantise to {dtype}; images are stored as uint8, uint16 or float32")
    top = np.iinfo(dtype).max
    scaled = _clip_unit(np.multiply(pixels, np.float32(top), dtype=np.float32), top)
    np.rint(scaled, out=scaled)
    return scaled.astype(dtype)


def _stack(samples: np.ndarray, alpha: np.ndarray | None, bgr: bool) -> np.ndarray:
    """Samples H×W×C (RGB or grey) + alpha → the array an encoder takes."""
    colour = samples[..., ::-1] if bgr and samples.shape[2] == 3 else samples
    if alpha is not None:
        colour = np.dstack([colour, alpha.astype(samples.dtype, copy=False)])
    return np.ascontiguousarray(colour[..., 0] if colour.shape[2] == 1 else colour)


# ---------------------------------------------------------------- pixels out


def _cv_encode(ext: str, array: np.ndarray, params: list[int]) -> bytes:
    ok, buffer = cv2.imencode(ext, array, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} {array.dtype} array as {ext}")
    return buffer.tobytes()


def _encode_png(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, _quality: int | None) -> bytes:
    array = _stack(samples, alpha, bgr=True)
    if array.ndim == 3 and array.shape[2] == 2:
        encoded = _png_grey_alpha(array)
    else:
        # OpenCV's default settings beat level 6 here in both time (10x) and size.
        encoded = _cv_encode(".png", array, [])
    chunks: list[tuple[bytes, bytes]] = []
    if meta.icc:
        chunks.append((b"iCCP", b"ICC profile\x00\x00" + zlib.compress(meta.icc)))
    if meta.exif:
        chunks.append((b"eXIf", meta.exif[len(_EXIF_PREFIX) :]))
    if meta.xmp:
        chunks.append((b"iTXt", _XMP_PNG_KEYWORD + b"\x00\x00\x00\x00\x00" + meta.xmp))
    if meta.dpi:  # from the resolution, which is the input's pHYs turned with the pixels, or another format's
        per_metre = [round(d / 0.0254) for d in meta.dpi]
        if 0 < min(per_metre) and max(per_metre) <= 0x7FFFFFFF:
            chunks.append((b"pHYs", struct.pack(">IIB", *per_metre, 1)))
    chunks.extend((kind, body) for kind, body in meta.png_chunks if not (kind == b"pHYs" and meta.dpi))
    return _png_with_chunks(encoded, chunks)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_chunks(encoded: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Insert ``chunks`` after IHDR, dropping any the encoder wrote of the same kinds."""
    (ihdr_length,) = struct.unpack_from(">I", encoded, 8)
    head_end = 8 + 12 + ihdr_length
    out = [encoded[:head_end], *(_png_chunk(kind, body) for kind, body in chunks)]
    pos = head_end
    while pos < len(encoded):
        length, kind = struct.unpack_from(">I4s", encoded, pos)
        end = pos + 12 + length
        if kind not in _PNG_OWN_CHUNKS:
            out.append(encoded[pos:end])
        pos = end
    return b"".join(out)


def _png_grey_alpha(array: np.ndarray) -> bytes:
    """A PNG of colour type 4 (OpenCV writes only 1, 3 or 4 channels)."""
    height, width = array.shape[:2]
    depth = array.dtype.itemsize * 8
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    step = 2 * array.dtype.itemsize
    filtered = rows.copy()
    filtered[:, step:] -= rows[:, :-step]  # PNG "Sub" filter, modulo 256
    lines = np.hstack([np.ones((height, 1), np.uint8), filtered])
    header = struct.pack(">IIBBBBB", width, height, depth, 4, 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(lines.tobytes(), 6)),
        _png_chunk(b"IEND", b""),
    ))  # fmt: skip


def _encode_jpeg(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, quality: int | None) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality or meta.jpeg_quality or DEFAULT_QUALITY]
    if meta.jpeg_subsampling in _CV_SAMPLING and samples.shape[2] == 3:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, _CV_SAMPLING[meta.jpeg_subsampling]]
    if meta.jpeg_progressive:
        params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    encoded = _cv_encode(".jpg", _stack(samples, None, bgr=True), params)
    return _jpeg_with_segments(encoded, meta)


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def _jpeg_with_segments(encoded: bytes, meta: ImageMetadata) -> bytes:
    """Put EXIF, XMP (extended XMP too), Photoshop/IPTC, ICC and comment segments (and the dpi) after the
    encoder's JFIF header.

    APP11 (JUMBF: a C2PA provenance manifest) is not among them: its signature binds the input's bytes, so on the
    restoration it would claim a provenance the new file does not have.
    """
    pos = 2
    head = [encoded[:2]]
    if encoded[2:4] == b"\xff\xe0":  # JFIF APP0
        (length,) = struct.unpack_from(">H", encoded, 4)
        app0 = bytearray(encoded[2 : 4 + length])
        if meta.dpi and app0[4:9] == b"JFIF\x00":
            dpi = (min(65535, max(1, round(meta.dpi[0]))), min(65535, max(1, round(meta.dpi[1]))))
            struct.pack_into(">BHH", app0, 11, 1, *dpi)
        head.append(bytes(app0))
        pos = 4 + length
    segments = []
    if meta.exif:
        if len(meta.exif) <= _MAX_SEGMENT:
            segments.append(_jpeg_segment(0xE1, meta.exif))
        else:
            log.warning("dropping a %d-byte EXIF block: JPEG segments hold at most %d", len(meta.exif), _MAX_SEGMENT)
    if meta.xmp:
        if len(_XMP_JPEG_PREFIX) + len(meta.xmp) <= _MAX_SEGMENT:
            segments.append(_jpeg_segment(0xE1, _XMP_JPEG_PREFIX + meta.xmp))
            segments += (_jpeg_segment(0xE1, _XMP_EXTENSION_JPEG_PREFIX + part) for part in meta.xmp_extension)
        else:
            log.warning("dropping a %d-byte XMP packet: extended XMP is not written", len(meta.xmp))
    if meta.photoshop:
        room = _MAX_SEGMENT - len(_PHOTOSHOP_JPEG_PREFIX)
        for i in range(0, len(meta.photoshop), room):
            segments.append(_jpeg_segment(0xED, _PHOTOSHOP_JPEG_PREFIX + meta.photoshop[i : i + room]))
    if meta.icc:
        room = _MAX_SEGMENT - len(_ICC_JPEG_PREFIX) - 2
        parts = [meta.icc[i : i + room] for i in range(0, len(meta.icc), room)]
        if len(parts) > 255:  # the sequence number is one byte
            log.warning("dropping a %d-byte ICC profile: too large for JPEG", len(meta.icc))
            parts = []
        for i, part in enumerate(parts):
            segments.append(_jpeg_segment(0xE2, _ICC_JPEG_PREFIX + bytes([i + 1, len(parts)]) + part))
    segments += (_jpeg_segment(0xFE, comment) for comment in meta.jpeg_comments)
    return b"".join([*head, *segments, encoded[pos:]])


def _encode_webp(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, quality: int | None) -> bytes:
    from PIL import Image

    array = _grey_as_colour(_stack(samples, alpha, bgr=False))  # WebP has no grey mode
    out = io.BytesIO()
    lossless = bool(meta.webp_lossless)
    options: dict[str, Any] = {
        "lossless": lossless,
        "quality": 80 if lossless else (quality or DEFAULT_QUALITY),
        "method": 4,
        "exact": True,
    }
    if meta.exif:
        options["exif"] = meta.exif
    if meta.icc:
        options["icc_profile"] = meta.icc
    if meta.xmp:
        options["xmp"] = meta.xmp
    Image.fromarray(array).save(out, "WEBP", **options)
    return out.getvalue()


def _grey_as_colour(array: np.ndarray) -> np.ndarray:
    """Grey (H×W) or grey+alpha (H×W×2) samples repeated into RGB or RGBA; colour passes through."""
    if array.ndim == 2:
        return np.dstack([array] * 3)
    if array.shape[2] == 2:
        return np.dstack([array[..., :1]] * 3 + [array[..., 1:]])
    return array


def _encode_tiff(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, _quality: int | None) -> bytes:
    import tifffile

    array, options, subifds = _tiff_page_options(samples, alpha, meta)
    for sub in subifds:
        # tifffile refuses to write pointer tags: write the tag just below,
        # which sorts to the same place, and turn it into the pointer after.
        options["extratags"].append((sub - 1, "I", 1, 0, True))
    out = io.BytesIO()
    tifffile.imwrite(out, array, **options, byteorder="<")
    return _tiff_append_subifds(out.getvalue(), subifds)


def _tiff_page_options(
    samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata
) -> tuple[np.ndarray, dict[str, Any], dict[int, dict[int, Any]]]:
    """One page as tifffile writes it: the stored array, the write options (layout, resolution, ICC, XMP, IPTC,
    descriptive tags), and the EXIF/GPS directories still to be appended (only a first page's EXIF has them).

    Every page goes through here, so a later page keeps its own profile and captions as the first keeps its.
    """
    array = _tiff_stored(samples, alpha, meta)
    tags = _tiff_tags_from_exif(meta.exif)
    extratags: list[tuple[int, Any, int, Any, bool]] = [  # the page's own name is written from tiff_page_name
        (tag, "s", 0, value, True) for tag, value in tags.text.items() if tag not in (270, 285, 305, 306)
    ]
    if tags.orientation is not None:
        extratags.append((_ORIENTATION_TAG, "H", 1, 1, True))
    if meta.xmp:
        extratags.append((_TIFF_XMP_TAG, "B", len(meta.xmp), meta.xmp, True))
    for code, blob in ((_TIFF_IPTC_TAG, meta.iptc), (_TIFF_PHOTOSHOP_TAG, meta.photoshop)):
        if blob:
            extratags.append((code, 7, len(blob), blob, True))  # UNDEFINED: bytes as they were
    extratags += _page_name_tag(meta)
    options = {
        **_tiff_layout(array, samples.shape[2] == 1, alpha is not None, meta),
        **_tiff_resolution_options(meta),
        "iccprofile": meta.icc or None,
        "description": tags.text.get(270),
        "software": tags.text.get(305, False),
        "datetime": tags.text.get(306),
        "metadata": None,
        "extratags": extratags,
    }
    return array, options, tags.subifds


def _tiff_resolution_options(meta: ImageMetadata) -> dict[str, Any]:
    """tifffile's resolution options: dots per inch, or per centimetre for a TIFF that counted in them, or the
    unitless X/Y resolution of a TIFF whose ResolutionUnit was NONE (which stays NONE: no size is invented)."""
    if meta.dpi and meta.tiff_resolution_unit == 3:
        return {"resolution": (meta.dpi[0] / 2.54, meta.dpi[1] / 2.54), "resolutionunit": "CENTIMETER"}
    if meta.dpi:
        return {"resolution": meta.dpi, "resolutionunit": "INCH"}
    return {"resolution": meta.pixel_aspect, "resolutionunit": "NONE"}


def _tiff_layout(array: np.ndarray, grey: bool, has_alpha: bool, meta: ImageMetadata) -> dict[str, Any]:
    """tifffile's write options for samples laid out as decoded: photometric, planes, alpha, compression."""
    compression = _TIFF_WRITE_COMPRESSION.get(meta.tiff_compression, "adobe_deflate")
    return {
        "photometric": ("miniswhite" if meta.tiff_miniswhite else "minisblack") if grey else "rgb",
        "planarconfig": "contig" if array.ndim == 3 else None,
        "extrasamples": [meta.tiff_alpha_kind] if has_alpha else None,
        "compression": compression,
        "predictor": compression in ("lzw", "adobe_deflate", "zstd", "lzma"),
    }


def _tiff_stored(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata) -> np.ndarray:
    """Samples as a TIFF stores them: alpha stacked on, and grey inverted back for a MINISWHITE page."""
    if meta.tiff_miniswhite and samples.shape[2] == 1 and samples.dtype in (np.uint8, np.uint16):
        samples = np.iinfo(samples.dtype).max - samples
    return _stack(samples, alpha, bgr=False)


def _append_tiff_page(encoded: bytes, samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata) -> bytes:
    """``encoded`` (a TIFF) with one more page holding ``samples`` (and ``alpha``), in that page's own layout."""
    import tifffile

    array, options, _ = _tiff_page_options(samples, alpha, meta)  # a later page's EXIF holds text tags only
    buffer = io.BytesIO(encoded)
    with tifffile.TiffWriter(buffer, append=True, byteorder="<") as tif:
        tif.write(array, **options)
    return buffer.getvalue()


def _page_name_tag(meta: ImageMetadata) -> list[tuple[Any, ...]]:
    """tifffile's extra tag for the page's PageName, if it had one."""
    return [(285, "s", 0, meta.tiff_page_name, True)] if meta.tiff_page_name else []


def _tiff_text(value: Any) -> str | None:
    """A TIFF ASCII tag's value as text, or None (absent, empty, or not ASCII text)."""
    return value if isinstance(value, str) and value and value.isascii() else None


@dataclass
class _TiffTags:
    text: dict[int, str] = field(default_factory=dict)
    orientation: int | None = None
    subifds: dict[int, dict[int, Any]] = field(default_factory=dict)


def _tiff_tags_from_exif(exif: bytes | None) -> _TiffTags:
    """Split an EXIF block into TIFF IFD0 text tags and EXIF/GPS sub-directories."""
    from PIL import Image

    tags = _TiffTags()
    if not exif:
        return tags
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        for tag in _TIFF_TEXT_TAGS:
            value = parsed.get(tag)
            if isinstance(value, str) and value and value.isascii():
                tags.text[tag] = value
        if _ORIENTATION_TAG in parsed:
            tags.orientation = 1
        tags.subifds = _exif_subifds(parsed)
    except Exception as exc:
        log.warning("writing TIFF without unreadable EXIF tags: %s", exc)
    return tags


def _tiff_append_subifds(encoded: bytes, subifds: dict[int, dict[int, Any]]) -> bytes:
    """Append EXIF/GPS directories to a little-endian classic TIFF and point IFD0 at them.

    IFD0 holds a placeholder LONG tagged one below each pointer tag; it gets
    the pointer's tag number and the directory's offset.
    """
    if not subifds:
        return encoded
    from PIL import TiffImagePlugin

    out = bytearray(encoded)
    if out[:4] != b"II*\x00":
        log.warning("not writing EXIF directories into a BigTIFF")
        return encoded
    (ifd0,) = struct.unpack_from("<I", out, 4)
    (count,) = struct.unpack_from("<H", out, ifd0)
    slots = {}
    for i in range(count):
        entry = ifd0 + 2 + 12 * i
        (tag,) = struct.unpack_from("<H", out, entry)
        if tag + 1 in subifds:
            slots[tag + 1] = entry
    for sub, entries in subifds.items():
        if sub not in slots:
            log.warning("TIFF writer left no slot for EXIF directory %#x; not written", sub)
            continue
        if len(out) % 2:
            out += b"\x00"
        directory = TiffImagePlugin.ImageFileDirectory_v2(ifh=b"II*\x00\x08\x00\x00\x00")
        for tag, value in entries.items():
            directory[tag] = value
        offset = len(out)
        out += directory.tobytes(offset)
        struct.pack_into("<H", out, slots[sub], sub)
        struct.pack_into("<I", out, slots[sub] + 8, offset)
    return bytes(out)


def _encode_jp2(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, _quality: int | None) -> bytes:
    array = _stack(samples, alpha, bgr=False)
    layout = meta.jp2
    if layout is None:  # converted from another format: coded losslessly, with the resolution it had
        resolution = jpeg2000.resolution_box(meta.dpi) if meta.dpi else None
        layout = jpeg2000.Jp2Layout(bits=8 * array.dtype.itemsize, header_boxes=[resolution] if resolution else [])
    return jpeg2000.encode(array, layout, icc=meta.icc, xmp=meta.xmp, exif=meta.exif, iptc=meta.iptc)


def _encode_bmp(samples: np.ndarray, alpha: np.ndarray | None, meta: ImageMetadata, _quality: int | None) -> bytes:
    """An uncompressed BMP: 8-bit grey with a grey palette, 24-bit colour, or 32-bit with a declared alpha byte."""
    array = _stack(samples, alpha, bgr=True)
    if array.ndim == 3 and array.shape[2] == 2:  # grey+alpha, converted from another format: BMP has no such layout
        array = _grey_as_colour(array)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    stride = (width * channels + 3) // 4 * 4
    rows = np.zeros((height, stride), np.uint8)
    rows[:, : width * channels] = array[::-1].reshape(height, width * channels)  # bottom row first
    ppm = tuple(round(d / 0.0254) for d in meta.dpi) if meta.dpi else (0, 0)
    if channels == 4:  # V4 header: bit fields with an alpha mask, sRGB
        info = struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, rows.size, *ppm, 0, 0)
        info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
        palette = b""
    else:
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8 * channels, 0, rows.size, *ppm, 0, 0)
        palette = np.repeat(np.arange(256, dtype=np.uint8), 4).reshape(256, 4) if channels == 1 else None
        palette = b"" if palette is None else (palette * np.array([1, 1, 1, 0], np.uint8)).tobytes()
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + rows.size, 0, 0, offset)
    return head + info + palette + rows.tobytes()


_Encoder = Callable[[np.ndarray, np.ndarray | None, ImageMetadata, int | None], bytes]
_ENCODERS: dict[str, _Encoder] = {
    "png": _encode_png,
    "jpeg": _encode_jpeg,
    "tiff": _encode_tiff,
    "webp": _encode_webp,
    "jp2": _encode_jp2,
    "bmp": _encode_bmp,
}
