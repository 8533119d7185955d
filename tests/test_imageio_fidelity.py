"""What an archive notices when a restored file comes back: samples, transparency and metadata that the
round trip through :mod:`worker.imageio` must not change, checked on real files read back by tifffile and Pillow.

Each test writes its input with an independent library, decodes it, encodes the (unchanged, or restored)
pixels and reads the output with that library again.
"""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from tests.test_imageio import GREY, GREY16, ICC, RGB, _independent_read, _pil, _unit
from worker.imageio import as_format, decode_image, encode_image


def _tiff_bytes(array: np.ndarray, **options: object) -> bytes:
    """A TIFF written by tifffile with ``options`` as they are (no layout defaults added)."""
    out = io.BytesIO()
    tifffile.imwrite(out, array, metadata=None, **options)
    return out.getvalue()


def _round_trip(encoded: bytes, name: str) -> bytes:
    """``encoded`` decoded and written back with its pixels unchanged (a restoration at strength 0)."""
    image = decode_image(encoded, name)
    return encode_image(image, image.pixels, pages=[page.pixels for page in image.pages])


# ---------------------------------------------------------------- 1. float TIFF range


@pytest.mark.parametrize("low, high", [(0.0, 4.0), (-0.25, 1.0), (-0.5, 3.0)])
def test_float_tiff_samples_outside_zero_one_come_back_at_strength_zero(low: float, high: float) -> None:
    """A linear/HDR float scan's highlights above 1 (and out-of-gamut values below 0) were clipped away, even when
    the model changed nothing."""
    hdr = (_unit(RGB) * (high - low) + low).astype(np.float32)
    image = decode_image(_tiff_bytes(hdr, photometric="rgb"), "hdr.tif")
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0  # what the models get

    written = tifffile.imread(io.BytesIO(encode_image(image, image.pixels)))
    assert written.dtype == np.float32
    np.testing.assert_allclose(written, hdr, rtol=0, atol=(high - low) * 2.0**-22)

    # a restoration (here halving towards the darkest sample) lands in the scan's own range, not in [0, 1]
    darkest = min(0.0, float(hdr.min()))
    assert image.metadata.float_range == pytest.approx((darkest, max(1.0, float(hdr.max()))))
    darker = tifffile.imread(io.BytesIO(encode_image(image, image.pixels * 0.5)))
    np.testing.assert_allclose(darker, (hdr - darkest) * 0.5 + darkest, rtol=0, atol=(high - low) * 2.0**-22)


def test_a_float_tiff_written_as_png_keeps_its_own_values_clipped_to_what_png_holds() -> None:
    """Converted with --output-format, a float scan whose highlights reach 4 was written as its [0, 1]-scaled
    samples: four times too dark. Its own values are written, those above 1 clipped as a PNG must."""
    hdr = (_unit(RGB) * 4.0).astype(np.float32)
    image = decode_image(_tiff_bytes(hdr, photometric="rgb"), "hdr.tif")
    png = cv2.imdecode(np.frombuffer(encode_image(as_format(image, "png"), image.pixels), np.uint8),
                       cv2.IMREAD_UNCHANGED)[..., ::-1]
    expected = np.rint(np.clip(hdr, 0.0, 1.0) * 65535).astype(np.uint16)
    assert png.dtype == np.uint16 and int(np.abs(png.astype(np.int64) - expected).max()) <= 1


def test_float_tiff_within_zero_one_is_written_as_before() -> None:
    unit = _unit(RGB)
    image = decode_image(_tiff_bytes(unit, photometric="rgb"), "unit.tif")
    assert image.metadata.float_range is None
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(encode_image(image, image.pixels))), unit)


# ---------------------------------------------------------------- 2. grey PNG transparency


@pytest.mark.parametrize("grey", [GREY, GREY16, GREY > 128], ids=["8-bit", "16-bit", "1-bit"])
def test_a_grey_pngs_transparent_level_comes_back_as_alpha(grey: np.ndarray) -> None:
    """A grey PNG's tRNS colour key (one grey level drawn transparent) was lost; it becomes an alpha channel, as an
    RGB or palette PNG's tRNS does, since a restoration moves grey levels off and onto the key."""
    key = int(grey[0, 0])
    encoded = _pil(grey, "PNG", transparency=key)
    assert encoded[25] == 0 and b"tRNS" in encoded  # grey, colour-keyed
    image = decode_image(encoded, "key.png")
    assert image.alpha is not None and image.channels == 2
    stored = grey.astype(image.dtype) * (255 if grey.dtype == bool else 1)

    written = encode_image(image, image.pixels)
    seen = _independent_read(written, "png")  # grey and alpha
    opaque = np.iinfo(image.dtype).max
    np.testing.assert_array_equal(seen[..., 1], np.where(stored == stored[0, 0], 0, opaque))
    np.testing.assert_array_equal(seen[..., 0], stored)


# ---------------------------------------------------------------- 3. premultiplied alpha


def _premultiplied_tiff(dtype: type) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An RGBA TIFF with associated alpha (ExtraSamples 1): its bytes, straight colour in [0, 1], and alpha."""
    height, width = RGB.shape[:2]
    alpha = np.tile(np.linspace(0.2, 1.0, width), (height, 1))
    alpha[:, 20:26] = 0.05  # nearly transparent: premultiplied colour is tiny there
    alpha[:, 30:33] = 0.0
    straight = _unit(RGB).astype(np.float64)
    stored = np.dstack([straight * alpha[..., None], alpha])
    if dtype is not np.float32:
        stored = np.rint(stored * np.iinfo(dtype).max)
    return _tiff_bytes(stored.astype(dtype), photometric="rgb", extrasamples=[1]), straight, alpha


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_premultiplied_alpha_is_divided_out_for_the_model_and_multiplied_back(dtype: type) -> None:
    """An associated-alpha TIFF came back with its restored colour written as if straight: colour above alpha, and
    the models saw the picture faded towards black where it is transparent."""
    encoded, straight, alpha = _premultiplied_tiff(dtype)
    image = decode_image(encoded, "assoc.tif")
    visible = alpha >= 0.2
    step = 1 / (0.2 * 255) if dtype is np.uint8 else 1e-4  # one stored level, divided by the least visible alpha
    np.testing.assert_allclose(image.pixels[visible], straight[visible], rtol=0, atol=step)
    assert not image.pixels[alpha == 0].any()

    stored = tifffile.imread(io.BytesIO(encoded))
    with tifffile.TiffFile(io.BytesIO(encode_image(image, image.pixels))) as tif:
        unchanged = tif.pages[0].asarray()
        assert tif.pages[0].tags.valueof(338) == (1,)  # still declared associated
    np.testing.assert_allclose(unchanged.astype(np.float64), stored, rtol=0, atol=1e-6)  # strength 0: as it came

    brighter = tifffile.imread(io.BytesIO(encode_image(image, np.clip(image.pixels * 1.6, 0, 1))))
    assert (brighter[..., :3] <= brighter[..., 3:]).all()  # colour never exceeds its alpha
    np.testing.assert_array_equal(brighter[..., 3], stored[..., 3])  # alpha untouched


# ---------------------------------------------------------------- 4. TIFF resolution unit


def _resolution(encoded: bytes) -> tuple[float, float, int]:
    """XResolution, YResolution and ResolutionUnit of a TIFF's first page, as tifffile reads them."""
    with tifffile.TiffFile(io.BytesIO(encoded)) as tif:
        tags = tif.pages[0].tags
        (xn, xd), (yn, yd) = tags.valueof(282), tags.valueof(283)
        return xn / xd, yn / yd, int(tags.valueof(296))


@pytest.mark.parametrize("resolution, unit", [((72, 144), "NONE"), ((118.11, 118.11), "CENTIMETER"),
                                              ((300, 300), "INCH")])
def test_a_tiffs_resolution_unit_is_kept(resolution: tuple[float, float], unit: str) -> None:
    """ResolutionUnit NONE (an aspect ratio, no size) came back as INCH, inventing a size: 72 dpi, or 1 dpi for the
    1/1 that tifffile writes into every file it is given no resolution for. A centimetre file came back in inches."""
    encoded = _tiff_bytes(RGB, photometric="rgb", resolution=resolution, resolutionunit=unit)
    image = decode_image(encoded, "res.tif")
    assert (image.metadata.dpi is None) == (unit == "NONE")  # no size to carry into a PNG or JPEG
    x, y, written_unit = _resolution(encode_image(image, image.pixels))
    assert written_unit == int(tifffile.RESUNIT[unit])
    assert (x, y) == pytest.approx(resolution, rel=1e-4)


def test_a_tiff_without_resolution_gains_no_dpi() -> None:
    image = decode_image(_tiff_bytes(GREY, photometric="minisblack"), "plain.tif")  # tifffile writes 1/1 NONE
    assert image.metadata.dpi is None
    assert _resolution(encode_image(image, image.pixels))[2] == int(tifffile.RESUNIT.NONE)
    converted = Image.open(io.BytesIO(encode_image(as_format(image, "png"), image.pixels)))
    assert "dpi" not in converted.info


def test_a_unitless_resolution_turns_with_the_pixels() -> None:
    encoded = _tiff_bytes(RGB, photometric="rgb", resolution=(72, 144), resolutionunit="NONE",
                          extratags=[(274, "H", 1, 6, True)])  # stored on its side
    image = decode_image(encoded, "turned.tif")
    assert image.pixels.shape[:2] == RGB.shape[1::-1]
    assert _resolution(encode_image(image, image.pixels)) == pytest.approx((144, 72, 1))


# ---------------------------------------------------------------- 6. a multi-page TIFF's later pages


def _grey_icc(description: str) -> bytes:
    """A minimal valid grey ICC v2 profile (description, white point, gamma 2.2), as archive scanners embed."""

    def tag_data(kind: bytes, body: bytes) -> bytes:
        data = kind + bytes(4) + body
        return data + bytes(-len(data) % 4)

    text = description.encode() + b"\x00"
    tags = [(b"desc", tag_data(b"desc", struct.pack(">I", len(text)) + text + bytes(78))),
            (b"wtpt", tag_data(b"XYZ ", struct.pack(">iii", 63190, 65536, 54061))),
            (b"kTRC", tag_data(b"curv", struct.pack(">IH", 1, round(2.2 * 256))))]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x40, 0, 0]) + b"mntrGRAYXYZ " + bytes(12) + b"acsp"
              + bytes(28) + struct.pack(">iii", 63190, 65536, 54061) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


def test_later_pages_keep_their_own_profile_and_captions() -> None:
    """The verso of a scanned print lost its own ICC profile, description and artist: only the first page had
    any metadata written."""
    verso_icc = _grey_icc("verso scanner grey")
    ImageCms.ImageCmsProfile(io.BytesIO(verso_icc))  # a profile colour management can use
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:
        tif.write(RGB, photometric="rgb", iccprofile=ICC, description="Front of print", metadata=None)
        tif.write(GREY, photometric="minisblack", iccprofile=verso_icc, description="Back: inscription 'Harbour 1931'",
                  metadata=None, extratags=[(315, "s", 0, "J. Smith", True), (285, "s", 0, "verso", True)])
        tif.write(GREY16, photometric="minisblack", metadata=None)  # a page with none of its own
    image = decode_image(out.getvalue(), "print.tif")

    written = encode_image(image, image.pixels, pages=[page.pixels for page in image.pages])
    with tifffile.TiffFile(io.BytesIO(written)) as tif:
        first, verso, bare = (page.tags for page in tif.pages)
        assert (first.valueof(34675), first.valueof(270)) == (ICC, "Front of print")
        assert verso.valueof(34675) == verso_icc
        assert (verso.valueof(270), verso.valueof(315), verso.valueof(285)) == (
            "Back: inscription 'Harbour 1931'", "J. Smith", "verso")
        assert [bare.valueof(code) for code in (34675, 270, 315)] == [None, None, None]

    stripped = encode_image(image, image.pixels, strip_metadata=True, pages=[page.pixels for page in image.pages])
    with tifffile.TiffFile(io.BytesIO(stripped)) as tif:
        assert [tif.pages[1].tags.valueof(code) for code in (34675, 270, 315)] == [None, None, None]


# ---------------------------------------------------------------- 5. JPEG comments, extended XMP, C2PA


def _jpeg_segments(encoded: bytes) -> list[tuple[int, bytes]]:
    """(marker, body) of every segment before a JPEG's scan data."""
    segments, pos = [], 2
    while encoded[pos + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", encoded, pos + 2)
        segments.append((encoded[pos + 1], encoded[pos + 4 : pos + 2 + length]))
        pos += 2 + length
    return segments


def _with_segments(encoded: bytes, *segments: tuple[int, bytes]) -> bytes:
    """``encoded`` (a JPEG) with ``segments`` inserted after its first."""
    (length,) = struct.unpack_from(">H", encoded, 4)
    extra = b"".join(struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body for marker, body in segments)
    return encoded[: 4 + length] + extra + encoded[4 + length :]


EXTENDED_XMP = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>" + b"<!-- a long history -->" * 40 + b"</x:xmpmeta>"
GUID = b"0123456789ABCDEF0123456789ABCDEF"  # the extension's MD5 in the main packet's xmpNote:HasExtendedXMP
MAIN_XMP = (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
            b"<rdf:Description xmlns:xmpNote='http://ns.adobe.com/xmp/note/' xmpNote:HasExtendedXMP='" + GUID
            + b"'/></rdf:RDF></x:xmpmeta>")
EXTENSION = GUID + struct.pack(">II", len(EXTENDED_XMP), 0) + EXTENDED_XMP


def test_jpeg_comments_and_extended_xmp_survive_and_c2pa_does_not() -> None:
    """COM segments (an accession number) and extended XMP were dropped while the main packet still announced
    the extension. A C2PA manifest (APP11) is dropped on purpose: it signs the input's bytes, not the output's."""
    encoded = _with_segments(_pil(RGB, "JPEG", quality=90, xmp=MAIN_XMP),
                             (0xE1, b"http://ns.adobe.com/xmp/extension/\x00" + EXTENSION),
                             (0xEB, b"JP\x00\x01\x00\x00\x00\x01" + b"\x00\x00\x00\x20jumbc2pa" + bytes(24)),
                             (0xFE, b"Accession 1987.12.3"), (0xFE, b"Scanned by the archive"))
    image = decode_image(encoded, "comment.jpg")
    written = _jpeg_segments(encode_image(image, image.pixels))
    assert [body for marker, body in written if marker == 0xFE] == [b"Accession 1987.12.3", b"Scanned by the archive"]
    app1 = [body for marker, body in written if marker == 0xE1]
    assert b"http://ns.adobe.com/xmp/extension/\x00" + EXTENSION in app1
    assert any(GUID in body for body in app1 if body.startswith(b"http://ns.adobe.com/xap/1.0/\x00"))
    assert not [marker for marker, _ in written if marker == 0xEB]
    assert Image.open(io.BytesIO(encode_image(image, image.pixels))).info["comment"] == b"Scanned by the archive"

    stripped = _jpeg_segments(encode_image(image, image.pixels, strip_metadata=True))
    assert not [marker for marker, body in stripped if marker == 0xFE or b"xmp/extension" in body]


# ---------------------------------------------------------------- 7. EXIF pixel dimensions


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_pixel_dimensions_follow_the_picture_turned_upright(fmt: str) -> None:
    """Orientation 6 is applied and reset to 1, but PixelXDimension/PixelYDimension still gave the sideways size."""
    height, width = RGB.shape[:2]
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769).update({0xA002: width, 0xA003: height})
    image = decode_image(_pil(RGB, fmt, exif=exif), f"sideways.{fmt.lower()}")
    assert (image.width, image.height) == (height, width)

    written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
    dimensions = written.getexif().get_ifd(0x8769)
    assert written.getexif().get(0x0112, 1) == 1
    assert (dimensions[0xA002], dimensions[0xA003]) == written.size == (height, width)


@pytest.mark.parametrize("pages", [1, 2])
def test_a_half_float_tiff_is_refused_naming_its_sample_type_not_called_corrupt(pages: int) -> None:
    """A 16-bit float scan failed as 'corrupt TIFF data' (OpenCV's guess), with OpenCV's noise on stderr."""
    from worker.imageio import ImageDecodeError

    half = _unit(RGB).astype(np.float16)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for _ in range(pages):
            tif.write(half, photometric="rgb")
    with pytest.raises(ImageDecodeError, match=r"float16 samples \(16-bit float\) are not supported: only 8/16-bit "
                                               "integer and 32-bit float"):
        decode_image(buffer.getvalue(), "half.tif")
