"""JPEG 2000 and BMP, the formats archives keep scans in: what of a file's coding and boxes survives a restoration.

Inputs are written by Pillow, imagecodecs and by hand (boxes, headers); the
outputs are read back by OpenCV and Pillow and by a box walker written here,
not only by the module under test.
"""

from __future__ import annotations

import io
import struct

import cv2
import imagecodecs
import numpy as np
import pytest
from PIL import Image, ImageCms
from skimage import data

from jobs.errors import ImageDecodeError
from jobs.storage import IMAGE_SUFFIXES, is_image_key
from worker import jpeg2000
from jobs.layout import SUFFIX_FORMATS
from worker.imageio import FORMATS, as_format, content_type, decode_image, encode_image, format_from_name

RGB = np.ascontiguousarray(data.astronaut()[64:192, 128:288])  # 128x160
GREY = np.ascontiguousarray(data.camera()[100:228, 200:360])
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta><!-- archive: reel 12 -->'
XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
IPTC_UUID = bytes.fromhex("33c7a4d2b81d4723a0baf1a3e097ad38")
GEOJP2_UUID = bytes.fromhex("b14bf8bd083d4b43a5ae8cd7d5a6ce03")
IPTC = b"\x1c\x02\x78\x00\x0fReel 12, box 4"


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def _walk(encoded: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each box between ``start`` and ``end``; an independent reader of the container."""
    end = len(encoded) if end is None else end
    found, pos = [], start
    while pos < end:
        length, kind = struct.unpack_from(">I4s", encoded, pos)
        length = length or end - pos
        found.append((kind, encoded[pos + 8 : pos + length]))
        pos += length
    return found


def _header_boxes(encoded: bytes) -> dict[bytes, bytes]:
    body = dict(_walk(encoded))[b"jp2h"]
    return dict(_walk(body))


def _pil(array: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def _resolution_box(dpi: float) -> bytes:
    per_metre = round(dpi / 0.0254)  # stored as N/D × 10^E grid points per metre
    return _box(b"res ", _box(b"resc", struct.pack(">HHHHbb", per_metre, 1, per_metre, 1, 0, 0)))


def _archive_jp2(exif: bytes) -> bytes:
    """A lossless JP2 the way an archive's tools leave it: ICC profile, resolution, XMP, EXIF, IPTC, GeoJP2, XML."""
    plain = _pil(RGB, "JPEG2000")
    boxes = []
    for kind, body in _walk(plain):
        if kind == b"jp2h":
            inner = [_box(k, b"\x02\x00\x00" + ICC if k == b"colr" else v) for k, v in _walk(body)]
            boxes.append(_box(b"jp2h", b"".join(inner) + _resolution_box(400)))
        elif kind == b"jp2c":
            boxes += [
                _box(b"uuid", XMP_UUID + XMP),
                _box(b"uuid", b"JpgTiffExif->JP2" + exif),
                _box(b"uuid", IPTC_UUID + IPTC),
                _box(b"uuid", GEOJP2_UUID + b"GeoTIFF box stand-in"),
                _box(b"xml ", b"<mets:note>scanned 1931</mets:note>"),
                _box(kind, body),
            ]
        else:
            boxes.append(_box(kind, body))
    return b"".join(boxes)


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x013B] = "Studio Nadar"
    exif[0x0112] = orientation
    return b"Exif\x00\x00" + exif.tobytes()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---------------------------------------------------------------- JPEG 2000


def test_a_jp2s_coding_is_kept_tiles_levels_progression_layers_codeblocks() -> None:
    encoded = _pil(RGB, "JPEG2000", tile_size=(64, 64), num_resolutions=4, progression="RPCL",
                   quality_mode="rates", quality_layers=[40, 10, 0], codeblock_size=(32, 32))
    image = decode_image(encoded, "reel/scan.jp2")
    output = encode_image(image, image.pixels)
    layout = jpeg2000.read_header(output).layout
    assert (layout.tile, layout.levels, layout.progression, layout.layers, layout.codeblock, layout.reversible) == (
        (64, 64), 3, "RPCL", 3, (32, 32), True)
    seen = cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(seen, RGB)  # lossless stays lossless
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(output))), RGB)


def test_a_lossy_jp2_is_written_lossy_at_its_own_ratio() -> None:
    encoded = _pil(RGB, "JPEG2000", irreversible=True, quality_mode="rates", quality_layers=[12])
    image = decode_image(encoded, "access/copy.jp2")
    assert not image.metadata.jp2.reversible and image.metadata.jp2.ratio == pytest.approx(12, rel=0.1)
    output = encode_image(image, image.pixels)
    layout = jpeg2000.read_header(output).layout
    assert not layout.reversible
    assert len(output) == pytest.approx(len(encoded), rel=0.15)
    assert _psnr(decode_image(output, "o.jp2").pixels, image.pixels) > 35


def test_a_bare_codestream_stays_a_bare_codestream() -> None:
    encoded = _pil(GREY, "JPEG2000", no_jp2=True)
    image = decode_image(encoded, "raw.j2k")
    output = encode_image(image, image.pixels)
    assert output.startswith(b"\xff\x4f\xff\x51") and output.endswith(b"\xff\xd9")
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED), GREY)


@pytest.mark.parametrize("bits", [4, 12, 16])
def test_precision_is_kept_for_16_bit_colour_and_12_or_4_bit_scans(bits: int) -> None:
    top = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    samples = (RGB.astype(np.uint32) * top // 255).astype(dtype)
    samples[::7, ::5] = top - samples[::7, ::5] // 3  # values off any 8-bit grid
    encoded = imagecodecs.jpeg2k_encode(samples, codecformat="JP2", bitspersample=bits)
    image = decode_image(encoded, f"scan{bits}.jp2")
    assert image.dtype == dtype and image.metadata.jp2.bits == bits
    held = np.iinfo(dtype).max
    np.testing.assert_allclose(image.pixels, samples / top, atol=0.5 / held + 1e-7)  # held on its dtype's grid
    restored = np.clip(image.pixels * 0.9 + 0.05, 0, 1)
    output = encode_image(image, restored)
    assert jpeg2000.read_header(output).layout.bits == bits
    seen = imagecodecs.jpeg2k_decode(output) if bits < 8 else \
        cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]  # OpenCV widens 4 bits
    assert seen.dtype == dtype and int(seen.max()) <= top
    np.testing.assert_array_equal(seen, np.rint(restored * top).astype(dtype))


def test_alpha_is_declared_in_the_output() -> None:
    alpha = GREY[:, ::-1].copy()
    rgba16 = np.dstack([RGB, alpha]).astype(np.uint16) * 257
    for encoded, dtype in ((_pil(np.dstack([RGB, alpha]), "JPEG2000"), np.uint8),
                           (imagecodecs.jpeg2k_encode(rgba16, codecformat="JP2"), np.uint16)):
        image = decode_image(encoded, "a.jp2")
        assert image.channels == 4 and image.alpha.dtype == dtype
        output = encode_image(image, image.pixels)
        definition = _header_boxes(output)[b"cdef"]
        assert struct.unpack_from(">HHHH", definition, 0)[0] == 4
        assert struct.unpack_from(">HHH", definition, 2 + 6 * 3) == (3, 1, 0)  # channel 3: opacity of the whole
        np.testing.assert_array_equal(decode_image(output, "o.jp2").alpha, image.alpha)


def test_a_jp2s_boxes_survive_byte_for_byte_and_its_exif_orientation_is_left_alone() -> None:
    exif = _exif_with_orientation(6)  # JPEG 2000 viewers do not rotate: neither does deblur
    encoded = _archive_jp2(exif)
    image = decode_image(encoded, "reel/12.jp2")
    assert (image.width, image.height) == (RGB.shape[1], RGB.shape[0])
    np.testing.assert_array_equal(image.pixels, RGB / np.float32(255))
    assert image.metadata.icc == ICC and image.metadata.xmp == XMP and image.metadata.iptc == IPTC
    assert image.metadata.dpi == pytest.approx((400, 400), abs=0.01)

    output = encode_image(image, image.pixels)
    top = _walk(output)
    kinds = [kind for kind, _ in top]
    assert kinds[:3] == [b"jP  ", b"ftyp", b"jp2h"] and kinds[-1] == b"jp2c"
    header = _header_boxes(output)
    assert header[b"colr"] == b"\x02\x00\x00" + ICC
    assert _box(b"res ", header[b"res "]) == _resolution_box(400)
    uuids = {body[:16]: body[16:] for kind, body in top if kind == b"uuid"}
    assert uuids[XMP_UUID] == XMP and uuids[IPTC_UUID] == IPTC
    assert uuids[b"JpgTiffExif->JP2"] == exif  # orientation 6 and all
    assert uuids[GEOJP2_UUID] == b"GeoTIFF box stand-in"
    assert (b"xml ", b"<mets:note>scanned 1931</mets:note>") in top
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(output))), RGB)


def test_stripping_a_jp2_drops_descriptive_boxes_and_keeps_its_resolution() -> None:
    image = decode_image(_archive_jp2(_exif_with_orientation(1)), "reel/12.jp2")
    output = encode_image(image, image.pixels, strip_metadata=True)
    top = _walk(output)
    assert [kind for kind, _ in top] == [b"jP  ", b"ftyp", b"jp2h", b"jp2c"]
    header = _header_boxes(output)
    assert header[b"colr"][0] == 1  # an enumerated colour space, no profile
    assert b"res " in header
    assert decode_image(output, "s.jp2").metadata.dpi == pytest.approx((400, 400), abs=0.01)


def _patched_colour_space(space: int) -> bytes:
    encoded = bytearray(_pil(RGB, "JPEG2000"))
    at = encoded.find(b"colr") + 4
    assert encoded[at] == 1
    struct.pack_into(">I", encoded, at + 3, space)
    return bytes(encoded)


def _patched_siz(offset: int, fmt: str, *values: int) -> bytes:
    encoded = bytearray(_pil(GREY, "JPEG2000", no_jp2=True))
    struct.pack_into(fmt, encoded, 4 + offset, *values)  # offsets from the start of SIZ's length field
    return bytes(encoded)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _patched_colour_space(18), "JPEG 2000 in the sYCC colour space is not supported; convert it"),
        (lambda: _patched_colour_space(12), "CMYK colour space is not supported"),
        (lambda: imagecodecs.jpeg2k_encode(GREY.astype(np.int16) - 128, codecformat="J2K"), "signed samples"),
        (lambda: _patched_siz(39, ">BB", 2, 2), r"subsampled components \(2x2\)"),
        (lambda: _pil(GREY, "JPEG2000", no_jp2=True)[:-40], "truncated JPEG 2000: the codestream .* no end marker"),
        (lambda: _pil(RGB, "JPEG2000")[:3000], r"truncated JPEG 2000: box b'jp2c' needs"),
        (lambda: _patched_siz(4, ">II", 90_000, 90_000), r"90000x90000 = 8,100,000,000 pixels .* limit"),
    ],
)
def test_jp2s_deblur_cannot_restore_are_refused_naming_why(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageDecodeError, match=f"^box/7.jp2: not a readable image .*{message}"):
        decode_image(make(), "box/7.jp2")


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (20, 3), (31, 40)])
def test_a_small_picture_converted_to_jp2_gets_no_more_levels_than_its_sides_allow(shape: tuple[int, int]) -> None:
    """OpenJPEG refuses five wavelet levels on a side shorter than 32 pixels; that must not fail after the model."""
    small = GREY[: shape[0], : shape[1]]
    image = as_format(decode_image(_pil(small, "PNG"), "thumb.png"), "jp2")
    output = encode_image(image, image.pixels)
    assert jpeg2000.read_header(output).layout.levels == min(shape).bit_length() - 1
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(output))), small)


@pytest.mark.parametrize("source", ["JPEG", "TIFF", "PNG"])
def test_a_resolution_travels_into_a_converted_jp2(source: str) -> None:
    image = as_format(decode_image(_pil(RGB, source, dpi=(600, 300)), f"scan.{source.lower()}"), "jp2")
    output = encode_image(image, image.pixels)
    resolution = dict(_walk(_header_boxes(output)[b"res "]))[b"resc"]
    vn, vd, hn, hd, ve, he = struct.unpack(">HHHHbb", resolution)
    per_inch = (hn / hd * 10.0**he * 0.0254, vn / vd * 10.0**ve * 0.0254)
    assert per_inch == pytest.approx((600, 300), abs=0.02)
    assert b"res " in _header_boxes(encode_image(image, image.pixels, strip_metadata=True))  # like a JP2's own


# ---------------------------------------------------------------- BMP


def _bmp_v5(rgba: np.ndarray, top_down: bool) -> bytes:
    height, width = rgba.shape[:2]
    rows = rgba[..., [2, 1, 0, 3]] if top_down else rgba[::-1, :, [2, 1, 0, 3]]
    pixels = np.ascontiguousarray(rows).tobytes()
    info = struct.pack("<IiiHHIIiiII", 124, width, -height if top_down else height, 1, 32, 3, len(pixels), 0, 0, 0, 0)
    info += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + bytes(64)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def test_bmp_rows_either_way_up_and_alpha_are_read() -> None:
    alpha = GREY[:, ::-1].copy()
    rgba = np.dstack([RGB, alpha])
    for top_down in (True, False):
        image = decode_image(_bmp_v5(rgba, top_down), "x.bmp")
        np.testing.assert_array_equal(image.pixels, RGB / np.float32(255))
        np.testing.assert_array_equal(image.alpha, alpha)
    unused = decode_image(_bmp_v5(np.dstack([RGB, np.zeros_like(alpha)]), True), "x.bmp")
    assert unused.channels == 3 and unused.alpha is None  # an all-zero alpha byte is padding, as browsers read it


def test_bmp_keeps_its_resolution_and_layout() -> None:
    for array, mode in ((RGB, "RGB"), (GREY, "L")):
        image = decode_image(_pil(array, "BMP", dpi=(300, 300)), "scan.bmp")
        assert image.metadata.dpi == pytest.approx((300, 300), abs=0.01)
        output = encode_image(image, image.pixels)
        seen = Image.open(io.BytesIO(output))
        assert seen.mode == mode and seen.info["dpi"] == pytest.approx((300, 300), abs=0.01)
        np.testing.assert_array_equal(np.asarray(seen), array)


def test_os2_bitmaps_are_read() -> None:
    height, width = GREY.shape
    stride = (width * 3 + 3) // 4 * 4
    rows = np.zeros((height, stride), np.uint8)
    rows[:, : width * 3] = RGB[:height, :width][::-1, :, ::-1].reshape(height, -1)
    header = struct.pack("<IHHHH", 12, width, height, 1, 24)
    encoded = b"BM" + struct.pack("<IHHI", 26 + rows.size, 0, 0, 26) + header + rows.tobytes()
    np.testing.assert_array_equal(decode_image(encoded, "os2.bmp").pixels, RGB[:height, :width] / np.float32(255))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((30, "<I", 4), "holding a JPEG or PNG stream is not supported"),
        ((14, "<I", 20), "corrupt BMP: a header of 20 bytes"),
        ((28, "<H", 3), "of 3 bits"),
    ],
)
def test_bmps_deblur_cannot_read_are_refused_naming_why(patch: tuple[int, str, int], message: str) -> None:
    encoded = bytearray(_pil(RGB, "BMP"))
    struct.pack_into(patch[1], encoded, patch[0], patch[2])
    with pytest.raises(ImageDecodeError, match=f"^x.bmp: not a readable image .*{message}"):
        decode_image(bytes(encoded), "x.bmp")
    with pytest.raises(ImageDecodeError, match="truncated BMP: pixel data ends at byte"):
        decode_image(_pil(RGB, "BMP")[:-100], "x.bmp")


# ---------------------------------------------------------------- names


def test_archive_extensions_are_listed_where_inputs_are_chosen() -> None:
    assert set(IMAGE_SUFFIXES) == set(SUFFIX_FORMATS)  # what a prefix submits is what the worker reads
    assert set(SUFFIX_FORMATS.values()) == set(FORMATS)
    for name in ("a/scan.JP2", "b.j2k", "c.j2c", "d.jpc"):
        assert format_from_name(name) == "jp2" and is_image_key(name)
    assert format_from_name("e.BMP") == format_from_name("f.dib") == "bmp"
    assert content_type("jp2") == "image/jp2" and content_type("bmp") == "image/bmp"
