"""JPEG 2000 for archives: read a file's header and boxes, write the restored pixels back in the same layout.

Archives keep masters and access copies as JPEG 2000: JP2 files, or bare J2K
codestreams. A restored file has to be the same kind of file, or an image
server (IIIF) or a preservation check will treat it differently from the
input. :func:`read_header` reads, before any pixel is decoded, the size, the
sample precision, and how the codestream was coded:
- the wavelet (reversible 5/3, i.e. lossless, or irreversible 9/7);
- decomposition levels, quality layers, progression order;
- tiles and code-block size;
- the compression ratio.

It also reads the boxes around the codestream: the ICC profile (``colr``), the
XMP, EXIF and IPTC ``uuid`` boxes, the resolution (``res ``), XML and other
``uuid`` boxes such as GeoJP2. :func:`encode` codes the restored samples the
same way and puts those boxes back, byte for byte, in the output.

The pixels are decoded and coded by OpenJPEG: through imagecodecs, which keeps
every precision (16-bit colour included), and through Pillow where it can
(8-bit, and 16-bit grey without alpha), because only Pillow's encoder writes
tiles, progression orders and quality layers.

Known limits:
- signed samples, subsampled components (YCbCr 4:2:0 codestreams) and
  colour spaces other than sRGB, grey or an ICC profile are refused;
- a palette image comes back as truecolour;
- precincts are not carried over;
- a layered file's intermediate layers are given a geometric ladder of
  ratios, since a header does not record them; its last layer keeps the
  input's ratio, or stays lossless;
- 16-bit colour, alpha with 16 bits and precisions other than 8 or 16 bits
  are written untiled, in one layer, in OpenJPEG's default progression, and a
  lossy one without its compression ratio (OpenJPEG's encoder here takes a
  target quality, not a rate), so larger than it came; a warning says so.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass, field, replace

import numpy as np

SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
"""The first twelve bytes of every JP2 file."""

CODESTREAM_START = b"\xff\x4f\xff\x51"
"""SOC and SIZ markers: how a bare J2K codestream begins."""

_XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
_EXIF_UUID = b"JpgTiffExif->JP2"
_IPTC_UUID = bytes.fromhex("33c7a4d2b81d4723a0baf1a3e097ad38")
_EXIF_PREFIX = b"Exif\x00\x00"
_PROGRESSIONS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")
_SRGB, _GREY = 16, 17
_COLOUR_SPACES = {12: "CMYK", 14: "CIELab", 18: "sYCC", 20: "e-sRGB", 21: "ROMM-RGB", 22: "YPbPr", 24: "e-sYCC"}
_FIRST_LAYER_RATIO = 200.0  # the coarsest quality layer of a rebuilt ladder
_LOSSLESS_PENULTIMATE_RATIO = 2.5  # the layer before a lossless one
_MAX_CODEC_THREADS = 4  # OpenJPEG's threads: a 12-MP 16-bit master decodes 1.5x faster on two than on one

log = logging.getLogger(__name__)


class Jp2Error(ValueError):
    """What is wrong with a JPEG 2000 file, or what of it is not supported, in words."""


@dataclass
class Jp2Layout:
    """How the input's codestream was coded and what surrounded it, to write the output alike.

    ``ratio`` is raw sample bytes over codestream bytes. ``header_boxes``
    (the resolution box) survive stripping; ``boxes`` (XML, GeoJP2 and other
    ``uuid`` boxes, in file order) are descriptive and do not.
    """

    container: bool = True  # a JP2 file; False: a bare codestream
    bits: int = 8
    reversible: bool = True
    levels: int = 5
    layers: int = 1
    progression: str = "LRCP"
    tile: tuple[int, int] | None = None  # (width, height) of a tile, when the picture is split in several
    codeblock: tuple[int, int] = (64, 64)
    ratio: float = 1.0
    alpha_type: int = 1  # cdef: 1 opacity, 2 premultiplied opacity
    colour_head: bytes = b"\x02\x00\x00"  # the input's ICC colr box METH, PREC, APPROX
    exif_prefixed: bool = False  # whether the EXIF uuid box began with "Exif\0\0"
    header_boxes: list[bytes] = field(default_factory=list)
    boxes: list[bytes] = field(default_factory=list)


@dataclass
class Jp2Header:
    """What a JPEG 2000 file says before its pixels are decoded."""

    width: int
    height: int
    components: int
    layout: Jp2Layout
    icc: bytes | None = None
    xmp: bytes | None = None
    exif: bytes | None = None  # with the "Exif\0\0" prefix
    iptc: bytes | None = None
    dpi: tuple[float, float] | None = None


def is_jpeg2000(data: bytes) -> bool:
    """Whether ``data`` starts like a JP2 file or a bare J2K codestream."""
    return data.startswith((SIGNATURE, CODESTREAM_START))


def read_header(data: bytes) -> Jp2Header:
    """Read a JP2 file's or J2K codestream's header and metadata boxes.

    Raises:
        Jp2Error: truncated or malformed data, or a layout deblur does not
            restore (signed or subsampled samples, an unsupported colour space).
    """
    if data.startswith(CODESTREAM_START):
        header = _read_codestream(data, container=False)
        _check_complete(data)
        return header
    if not data.startswith(SIGNATURE):
        raise Jp2Error("not a JPEG 2000 file")
    boxes = _boxes(data, 0, len(data))
    codestream = next((data[start:end] for kind, start, end in boxes if kind == b"jp2c"), None)
    if codestream is None:
        raise Jp2Error("JP2 file without a codestream (no jp2c box)")
    header = _read_codestream(codestream, container=True)
    _check_complete(codestream)
    for kind, start, end in boxes:
        body = data[start:end]
        if kind == b"jp2h":
            _read_image_header(data, start, end, header)
        elif kind == b"uuid" and len(body) >= 16:
            _read_uuid(body, header)
        elif kind in (b"xml ", b"jp2i"):
            header.layout.boxes.append(_box(kind, data[start:end]))
    return header


def decode(data: bytes, bits: int) -> np.ndarray:
    """The samples H×W×C (uint8 or uint16) of a file of ``bits``-bit samples, scaled to their dtype's full range.

    A 12-bit file's samples come back as uint16 spanning 0–65535, so the
    caller can treat every precision alike; :func:`encode` scales them back.
    """
    import imagecodecs

    try:
        samples = imagecodecs.jpeg2k_decode(data, numthreads=_codec_threads())
    except Exception as exc:  # OpenJPEG's messages name the damage
        raise Jp2Error(f"corrupt JPEG 2000 data: {exc}") from None
    if samples.ndim == 2:
        samples = samples[..., None]
    return widen(samples, bits)


def widen(samples: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit samples (0 … 2^bits − 1) held in uint8/uint16, spread over their dtype's whole range.

    Exactly undone by :func:`encode`: the scale factor is at least 1, so the
    rounding never maps two values to one.
    """
    if bits in (8, 16) or samples.dtype not in (np.uint8, np.uint16):
        return samples
    top = np.iinfo(samples.dtype).max
    return np.rint(samples.astype(np.float64) * (top / (2**bits - 1))).astype(samples.dtype)


def encode(
    array: np.ndarray,
    layout: Jp2Layout,
    icc: bytes | None = None,
    xmp: bytes | None = None,
    exif: bytes | None = None,
    iptc: bytes | None = None,
) -> bytes:
    """Code ``array`` (H×W or H×W×C, uint8 or uint16 at full range; C = 2 or 4 means the last channel is alpha)
    as ``layout`` describes, with the metadata boxes put back. A bare codestream carries no boxes."""
    array = np.ascontiguousarray(array)
    channels = 1 if array.ndim == 2 else array.shape[2]
    levels = _max_levels(array.shape[1], array.shape[0], layout.tile)
    if layout.levels > levels:  # OpenJPEG refuses more levels than a side can be halved (a small image)
        layout = replace(layout, levels=levels)
    if layout.bits not in (8, 16):
        top = np.iinfo(array.dtype).max
        array = np.rint(array.astype(np.float64) * ((2**layout.bits - 1) / top)).astype(array.dtype)
    if layout.bits == 8 or (channels == 1 and layout.bits == 16):  # what Pillow's encoder can write
        encoded = _encode_pillow(array, layout, channels)
    else:
        encoded = _encode_imagecodecs(array, layout, channels)
    if not layout.container:
        return encoded
    return _with_boxes(encoded, layout, channels, icc, xmp, exif, iptc)


def resolution_box(dpi: tuple[float, float]) -> bytes | None:
    """A ``res `` box holding a capture resolution (``resc``) of ``dpi`` (horizontal, vertical), or None if 0.

    The box stores grid points per metre as N/D × 10^E in 16-bit fields; an
    inch is 0.0254 m = 127/5000 m, so N = dpi × 5000/10^E over D = 127 keeps
    the dpi exact to 1/50 up to 1310 dpi, to 1/5 above.
    """
    fields = []
    for value in (dpi[1], dpi[0]):  # vertical first
        exponent = 2
        while round(value * 5000 / 10**exponent) > 0xFFFF and exponent < 127:
            exponent += 1
        numerator = round(value * 5000 / 10**exponent)
        if numerator <= 0:
            return None
        fields.append((numerator, exponent))
    (vn, ve), (hn, he) = fields
    return _box(b"res ", _box(b"resc", struct.pack(">HHHHbb", vn, 127, hn, 127, ve, he)))


def _max_levels(width: int, height: int, tile: tuple[int, int] | None) -> int:
    """The most decomposition levels a picture (or its tiles) can have: each halves the shorter side, down to 1."""
    side = min(width, height, *(tile or ()))
    return max(side, 1).bit_length() - 1


# ---------------------------------------------------------------- reading


def _boxes(data: bytes, pos: int, end: int) -> list[tuple[bytes, int, int]]:
    """The boxes between ``pos`` and ``end``: (type, payload start, payload end)."""
    found = []
    while pos < end:
        if pos + 8 > end:
            raise Jp2Error(f"truncated JPEG 2000: a box header at byte {pos} runs past the end")
        length, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if length == 1:
            if pos + 16 > end:
                raise Jp2Error(f"truncated JPEG 2000: box {kind!r} runs past the end")
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            head = 16
        elif length == 0:
            length = end - pos
        if length < head:
            raise Jp2Error(f"malformed JPEG 2000: box {kind!r} at byte {pos} claims {length} bytes")
        if pos + length > end:
            raise Jp2Error(f"truncated JPEG 2000: box {kind!r} needs {length} bytes, {end - pos} are left")
        found.append((kind, pos + head, pos + length))
        pos += length
    return found


def _box(kind: bytes, body: bytes) -> bytes:
    """A whole box: its length (extended past 4 GiB), its type, its payload."""
    if 8 + len(body) > 0xFFFFFFFF:
        return struct.pack(">I", 1) + kind + struct.pack(">Q", 16 + len(body)) + body
    return struct.pack(">I", 8 + len(body)) + kind + body


def _read_codestream(codestream: bytes, container: bool) -> Jp2Header:
    """Size, precision and coding style from a codestream's main header (SIZ and COD)."""
    if not codestream.startswith(CODESTREAM_START):
        raise Jp2Error("malformed JPEG 2000: the codestream does not start with SOC and SIZ")
    (lsiz,) = struct.unpack_from(">H", codestream, 4)
    _, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz = struct.unpack_from(">HIIIIIIIIH", codestream, 6)
    width, height = xsiz - xo, ysiz - yo
    if width <= 0 or height <= 0 or csiz == 0 or lsiz != 38 + 3 * csiz:
        raise Jp2Error(f"malformed JPEG 2000: SIZ gives {width}x{height} with {csiz} components")
    precisions = set()
    for index in range(csiz):
        ssiz, xr, yr = struct.unpack_from(">BBB", codestream, 42 + 3 * index)
        if ssiz & 0x80:
            raise Jp2Error("JPEG 2000 with signed samples is not supported; convert it to unsigned")
        if (xr, yr) != (1, 1):
            raise Jp2Error(f"JPEG 2000 with subsampled components ({xr}x{yr}) is not supported; "
                           "convert it to full-resolution RGB or grey")
        precisions.add((ssiz & 0x7F) + 1)
    if len(precisions) != 1 or max(precisions) > 16:
        raise Jp2Error(f"JPEG 2000 with {'/'.join(map(str, sorted(precisions)))}-bit components is not supported "
                       "(every component must have the same precision, up to 16 bits)")
    layout = Jp2Layout(container=container, bits=precisions.pop())
    if xt < xsiz - xto or yt < ysiz - yto:
        layout.tile = (xt, yt)
    _read_coding_style(codestream, 4 + lsiz, layout)
    sample_bytes = 1 if layout.bits <= 8 else 2
    layout.ratio = width * height * csiz * sample_bytes / len(codestream)
    return Jp2Header(width=width, height=height, components=csiz, layout=layout)


def _read_coding_style(codestream: bytes, pos: int, layout: Jp2Layout) -> None:
    """Find COD in the main header (before the first tile, SOT) and read the coding style from it."""
    while pos + 4 <= len(codestream):
        marker, length = struct.unpack_from(">HH", codestream, pos)
        if marker == 0xFF90:  # SOT: the main header is over
            break
        if marker == 0xFF52:
            progression, layers, _mct, levels, xcb, ycb, _style, transform = struct.unpack_from(
                ">BHBBBBBB", codestream, pos + 5
            )
            layout.progression = _PROGRESSIONS[progression] if progression < len(_PROGRESSIONS) else "LRCP"
            layout.layers = max(layers, 1)
            layout.levels = levels
            layout.codeblock = (2 ** (xcb + 2), 2 ** (ycb + 2))
            layout.reversible = transform == 1
            return
        pos += 2 + length
    raise Jp2Error("malformed JPEG 2000: no coding style (COD) in the main header")


def _check_complete(codestream: bytes) -> None:
    """A codestream ends with EOC; OpenJPEG would decode a cut one in part, silently."""
    if not codestream.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise Jp2Error(f"truncated JPEG 2000: the codestream ({len(codestream)} bytes) has no end marker")


def _read_image_header(data: bytes, start: int, end: int, header: Jp2Header) -> None:
    """The jp2h superbox: colour (ICC or an enumerated space), alpha type and resolution."""
    colour_seen = False
    for kind, body_start, body_end in _boxes(data, start, end):
        body = data[body_start:body_end]
        if kind == b"colr" and not colour_seen and len(body) >= 3:
            colour_seen = True
            method = body[0]
            if method == 1 and len(body) >= 7:
                (space,) = struct.unpack_from(">I", body, 3)
                if space not in (_SRGB, _GREY):
                    name = _COLOUR_SPACES.get(space, f"number {space}")
                    raise Jp2Error(f"JPEG 2000 in the {name} colour space is not supported; convert it to sRGB or grey")
            elif method in (2, 3) and len(body) > 3:
                header.icc = bytes(body[3:])
                header.layout.colour_head = bytes(body[:3])
        elif kind == b"cdef":
            (count,) = struct.unpack_from(">H", body, 0)
            for index in range(count):
                _channel, kind_of, _assoc = struct.unpack_from(">HHH", body, 2 + 6 * index)
                if kind_of in (1, 2):
                    header.layout.alpha_type = kind_of
        elif kind == b"res ":
            header.layout.header_boxes.append(_box(kind, data[body_start:body_end]))
            header.dpi = _resolution(data, body_start, body_end)


def _resolution(data: bytes, start: int, end: int) -> tuple[float, float] | None:
    """Dots per inch from a resolution superbox: capture resolution first, else display resolution."""
    found: dict[bytes, tuple[float, float]] = {}
    for kind, body_start, body_end in _boxes(data, start, end):
        if kind in (b"resc", b"resd") and body_end - body_start >= 10:
            vn, vd, hn, hd, ve, he = struct.unpack_from(">HHHHbb", data, body_start)
            if vd and hd:
                per_metre = (hn / hd * 10.0**he, vn / vd * 10.0**ve)
                found[kind] = (per_metre[0] * 0.0254, per_metre[1] * 0.0254)
    return found.get(b"resc") or found.get(b"resd")


def _read_uuid(body: bytes, header: Jp2Header) -> None:
    """XMP, EXIF and IPTC go to their fields; other uuid boxes (GeoJP2, …) travel as they are."""
    uuid, payload = bytes(body[:16]), bytes(body[16:])
    if uuid == _XMP_UUID and header.xmp is None:
        header.xmp = payload
    elif uuid == _EXIF_UUID and header.exif is None:
        header.layout.exif_prefixed = payload.startswith(_EXIF_PREFIX)
        header.exif = payload if header.layout.exif_prefixed else _EXIF_PREFIX + payload
    elif uuid == _IPTC_UUID and header.iptc is None:
        header.iptc = payload
    else:
        header.layout.boxes.append(_box(b"uuid", body))


# ---------------------------------------------------------------- writing


def _layer_ratios(layout: Jp2Layout) -> list[float]:
    """Compression ratios per quality layer: the last is the input's (0 = lossless), the others a geometric ladder."""
    last = 0.0 if layout.reversible else max(layout.ratio, 1.0)
    if layout.layers == 1:
        return [last]
    ladder_end = _LOSSLESS_PENULTIMATE_RATIO if layout.reversible else last
    steps = layout.layers - 1 if layout.reversible else layout.layers
    first = max(_FIRST_LAYER_RATIO, ladder_end)
    ladder = [first * (ladder_end / first) ** (i / max(steps - 1, 1)) for i in range(steps)]
    return [*ladder, last] if layout.reversible else ladder


def _encode_pillow(array: np.ndarray, layout: Jp2Layout, channels: int) -> bytes:
    from PIL import Image

    if array.dtype == np.uint16:
        picture = Image.frombytes("I;16", (array.shape[1], array.shape[0]), array.astype("<u2").tobytes())
    else:
        picture = Image.fromarray(array)
    out = io.BytesIO()
    ratios = _layer_ratios(layout)
    picture.save(
        out,
        "JPEG2000",
        no_jp2=not layout.container,
        irreversible=not layout.reversible,
        num_resolutions=layout.levels + 1,
        progression=layout.progression,
        codeblock_size=layout.codeblock,
        tile_size=layout.tile,
        quality_mode="rates",
        quality_layers=ratios,
        mct=1 if channels >= 3 else 0,
    )
    return out.getvalue()


def _encode_imagecodecs(array: np.ndarray, layout: Jp2Layout, channels: int) -> bytes:
    import imagecodecs

    # imagecodecs' level is a target PSNR, not a rate: a lossy input is written at the best the 9/7 wavelet keeps.
    if not layout.reversible and layout.ratio > 1.5:
        log.warning("a lossy %d-bit JPEG 2000 (%.1f:1) is written without its compression ratio, which only Pillow's "
                    "encoder can set and it cannot write this precision or layout: the file grows", layout.bits,
                    layout.ratio)
    return bytes(imagecodecs.jpeg2k_encode(
        array,
        codecformat="JP2" if layout.container else "J2K",
        bitspersample=layout.bits,
        reversible=layout.reversible,
        resolutions=layout.levels + 1,
        mct=channels >= 3,
        numthreads=_codec_threads(),
    ))


def _codec_threads() -> int:
    """Threads for OpenJPEG: the cores this process may use, a few at most (decoding is a short part of a job)."""
    return max(1, min(_MAX_CODEC_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def _with_boxes(
    encoded: bytes,
    layout: Jp2Layout,
    channels: int,
    icc: bytes | None,
    xmp: bytes | None,
    exif: bytes | None,
    iptc: bytes | None,
) -> bytes:
    """The encoder's JP2 with the input's colour profile, alpha type, resolution and metadata boxes put in."""
    out = []
    codestream = b""
    for kind, start, end in _boxes(encoded, 0, len(encoded)):
        if kind == b"jp2h":
            out.append(_box(b"jp2h", _image_header(encoded, start, end, layout, channels, icc)))
        elif kind == b"jp2c":
            codestream = _box(kind, encoded[start:end])
        else:
            out.append(_box(kind, encoded[start:end]))
    if exif:
        out.append(_box(b"uuid", _EXIF_UUID + (exif if layout.exif_prefixed else exif[len(_EXIF_PREFIX) :])))
    if xmp:
        out.append(_box(b"uuid", _XMP_UUID + xmp))
    if iptc:
        out.append(_box(b"uuid", _IPTC_UUID + iptc))
    out.extend(layout.boxes)
    out.append(codestream)
    return b"".join(out)


def _image_header(
    encoded: bytes, start: int, end: int, layout: Jp2Layout, channels: int, icc: bytes | None
) -> bytes:
    """The output's jp2h: the encoder's ihdr, the ICC profile if any, an alpha definition, the resolution."""
    parts = []
    for kind, body_start, body_end in _boxes(encoded, start, end):
        if kind == b"colr" and icc:
            parts.append(_box(b"colr", layout.colour_head + icc))
        elif kind != b"cdef":
            parts.append(_box(kind, encoded[body_start:body_end]))
    if channels in (2, 4):
        definitions = [(index, 0, index + 1) for index in range(channels - 1)] + [(channels - 1, layout.alpha_type, 0)]
        parts.append(_box(b"cdef", struct.pack(">H", channels)
                          + b"".join(struct.pack(">HHH", *entry) for entry in definitions)))
    parts.extend(layout.header_boxes)
    return b"".join(parts)
