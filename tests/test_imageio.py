"""Image I/O round trips on real photographs, checked with independent readers.

Inputs are written by OpenCV, Pillow and tifffile; outputs are read back by
the same independent libraries, never only by the module under test.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin, PngImagePlugin
from skimage import data

from jobs.errors import ImageDecodeError, InputError
from worker.imageio import (DecodedImage, as_format, content_type, decode_image, encode_image, format_from_name,
                            quantise)

RGB = np.ascontiguousarray(data.astronaut()[90:138, 150:214])  # 48x64, face and suit
GREY = np.ascontiguousarray(data.camera()[100:148, 200:264])
ALPHA = np.ascontiguousarray(data.camera()[300:348, 100:164])  # a real, non-trivial alpha mask
RNG = np.random.default_rng(0)
# 16-bit samples that are not multiples of 257, so an 8-bit detour would show.
RGB16 = (RGB.astype(np.uint16) * 257 + RNG.integers(0, 200, RGB.shape)).astype(np.uint16)
GREY16 = (GREY.astype(np.uint16) * 257 + RNG.integers(0, 200, GREY.shape)).astype(np.uint16)
ALPHA16 = (ALPHA.astype(np.uint16) * 257 + 7).astype(np.uint16)

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:format="image/x-test"/>'
    b"</rdf:RDF></x:xmpmeta>"
)
ARTIST = "Ansel Adams"
TAKEN = "2019:12:31 23:59:59"
CHANGED = "2020:01:02 03:04:05"


def _exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x013B] = ARTIST
    exif[0x0132] = CHANGED
    if orientation is not None:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = TAKEN
    return exif


def _cv(ext: str, array: np.ndarray, params: list[int] | None = None) -> bytes:
    """OpenCV-encode an RGB(A)/grey array."""
    if array.ndim == 3 and array.shape[2] >= 3:
        array = np.concatenate([array[..., 2::-1], array[..., 3:]], axis=2)
    ok, buffer = cv2.imencode(ext, array, params or [])
    assert ok
    return buffer.tobytes()


def _pil(array: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def _tiff(array: np.ndarray, **options: object) -> bytes:
    out = io.BytesIO()
    channels = 1 if array.ndim == 2 else array.shape[2]
    tifffile.imwrite(
        out,
        array,
        photometric="rgb" if channels >= 3 else "minisblack",
        planarconfig="contig" if channels > 1 else None,
        extrasamples=["unassalpha"] if channels in (2, 4) else None,
        metadata=None,
        **options,
    )
    return out.getvalue()


def _tiff_planar(array: np.ndarray) -> bytes:
    """An RGB TIFF stored plane by plane (PlanarConfiguration 2)."""
    out = io.BytesIO()
    tifffile.imwrite(out, np.moveaxis(array, -1, 0), photometric="rgb", planarconfig="separate", metadata=None)
    return out.getvalue()


def _png_grey_alpha16(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """A 16-bit grey+alpha PNG, which neither OpenCV nor Pillow writes; unfiltered."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = grey.shape
    rows = np.dstack([grey, alpha]).astype(">u2").reshape(height, -1).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _bmp_v5(rgba: np.ndarray, top_down: bool = True, ppm: int = 0) -> bytes:
    """A 32-bit BMP with a V5 header declaring an alpha byte (Pillow and OpenCV write none), rows top first."""
    height, width = rgba.shape[:2]
    rows = rgba[..., [2, 1, 0, 3]] if top_down else rgba[::-1, :, [2, 1, 0, 3]]
    pixels = np.ascontiguousarray(rows).tobytes()
    info = struct.pack("<IiiHHIIiiII", 124, width, -height if top_down else height, 1, 32, 3, len(pixels), ppm, ppm,
                       0, 0)
    info += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + bytes(124 - 40 - 20)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def _rgba(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.dstack([colour, alpha.astype(colour.dtype)])


def _grey_alpha(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.dstack([grey, alpha.astype(grey.dtype)])


# name -> (encoded input, colour samples, alpha samples or None, lossless?)
Case = tuple[bytes, np.ndarray, "np.ndarray | None", bool]
CASES: dict[str, Callable[[], Case]] = {
    "png-grey8": lambda: (_cv(".png", GREY), GREY, None, True),
    "png-rgb8": lambda: (_cv(".png", RGB), RGB, None, True),
    "png-rgba8": lambda: (_cv(".png", _rgba(RGB, ALPHA)), RGB, ALPHA, True),
    "png-greyalpha8": lambda: (_pil(_grey_alpha(GREY, ALPHA), "PNG"), GREY, ALPHA, True),
    "png-grey16": lambda: (_cv(".png", GREY16), GREY16, None, True),
    "png-rgb16": lambda: (_cv(".png", RGB16), RGB16, None, True),
    "png-rgba16": lambda: (_cv(".png", _rgba(RGB16, ALPHA16)), RGB16, ALPHA16, True),
    "png-greyalpha16": lambda: (_png_grey_alpha16(GREY16, ALPHA16), GREY16, ALPHA16, True),
    "jpeg-grey": lambda: (_cv(".jpg", GREY, [cv2.IMWRITE_JPEG_QUALITY, 90]), GREY, None, False),
    "jpeg-rgb": lambda: (_cv(".jpg", RGB, [cv2.IMWRITE_JPEG_QUALITY, 90]), RGB, None, False),
    "tiff-grey8": lambda: (_tiff(GREY), GREY, None, True),
    "tiff-rgb8": lambda: (_tiff(RGB, compression="adobe_deflate"), RGB, None, True),
    "tiff-rgba8": lambda: (_tiff(_rgba(RGB, ALPHA)), RGB, ALPHA, True),
    "tiff-rgba8-lzw": lambda: (_tiff(_rgba(RGB, ALPHA), compression="lzw"), RGB, ALPHA, True),
    "tiff-rgb16-planar": lambda: (_tiff_planar(RGB16), RGB16, None, True),
    "tiff-greyalpha8": lambda: (_tiff(_grey_alpha(GREY, ALPHA)), GREY, ALPHA, True),
    "tiff-grey16": lambda: (_tiff(GREY16), GREY16, None, True),
    "tiff-rgb16": lambda: (_tiff(RGB16), RGB16, None, True),
    "tiff-rgba16": lambda: (_tiff(_rgba(RGB16, ALPHA16), compression="adobe_deflate"), RGB16, ALPHA16, True),
    "tiff-float32": lambda: (_tiff(RGB.astype(np.float32) / 255), RGB.astype(np.float32) / 255, None, True),
    "webp-rgb-lossy": lambda: (_pil(RGB, "WEBP", quality=90), RGB, None, False),
    "webp-rgba-lossless": lambda: (_pil(_rgba(RGB, ALPHA), "WEBP", lossless=True, exact=True), RGB, ALPHA, True),
    "webp-rgba-lossy": lambda: (_pil(_rgba(RGB, ALPHA), "WEBP", quality=90), RGB, ALPHA, False),
    "jp2-grey8": lambda: (_pil(GREY, "JPEG2000"), GREY, None, True),
    "jp2-rgb8-tiled": lambda: (_pil(RGB, "JPEG2000", tile_size=(32, 32), num_resolutions=3), RGB, None, True),
    "jp2-rgba8": lambda: (_pil(_rgba(RGB, ALPHA), "JPEG2000"), RGB, ALPHA, True),
    "jp2-rgb8-lossy": lambda: (_pil(RGB, "JPEG2000", irreversible=True, quality_mode="rates",
                                    quality_layers=[8]), RGB, None, False),
    "jp2-grey8-codestream": lambda: (_pil(GREY, "JPEG2000", no_jp2=True), GREY, None, True),
    "jp2-grey16": lambda: (imagecodecs.jpeg2k_encode(GREY16, codecformat="JP2"), GREY16, None, True),
    "jp2-rgb16": lambda: (imagecodecs.jpeg2k_encode(RGB16, codecformat="JP2"), RGB16, None, True),
    "bmp-grey8": lambda: (_pil(GREY, "BMP"), GREY, None, True),
    "bmp-rgb8": lambda: (_cv(".bmp", RGB), RGB, None, True),
    "bmp-rgba8": lambda: (_bmp_v5(_rgba(RGB, ALPHA)), RGB, ALPHA, True),
}


def _unit(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.float32:
        return samples
    return samples.astype(np.float32) / np.iinfo(samples.dtype).max


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _independent_read(encoded: bytes, fmt: str) -> np.ndarray:
    """Samples as another library sees them: H×W[×C], RGB(A) order, original dtype."""
    if fmt == "tiff":
        return tifffile.imread(io.BytesIO(encoded))
    if fmt in ("webp", "bmp"):  # OpenCV drops a BMP's alpha
        return np.asarray(Image.open(io.BytesIO(encoded)))
    array = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    if fmt == "png" and encoded[25] == 4:  # grey+alpha, which OpenCV expands to BGRA
        return array[..., [0, 3]]
    if array.ndim == 3:
        array = np.concatenate([array[..., 2::-1], array[..., 3:]], axis=2)
    return array


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_keeps_format_depth_channels_alpha(case: str) -> None:
    encoded, colour, alpha, lossless = CASES[case]()
    fmt = case.split("-")[0]
    image = decode_image(encoded, f"scan.{fmt}")

    expected_channels = (1 if colour.ndim == 2 else 3) + (alpha is not None)
    assert (image.format, image.width, image.height) == (fmt, colour.shape[1], colour.shape[0])
    assert image.dtype == colour.dtype
    assert image.channels == expected_channels
    assert image.pixels.dtype == np.float32 and image.pixels.shape[2] == (1 if colour.ndim == 2 else 3)
    assert image.pixels.flags.c_contiguous  # torch.from_numpy refuses negative strides
    reference = _unit(colour).reshape(image.pixels.shape)
    if lossless:
        np.testing.assert_array_equal(image.pixels, reference)  # also proves RGB order, not BGR
    else:
        assert _psnr(image.pixels, reference) > 30
    if alpha is None:
        assert image.alpha is None
    else:
        assert image.alpha is not None and image.alpha.dtype == alpha.dtype
        np.testing.assert_array_equal(image.alpha, alpha)

    output = encode_image(image, image.pixels)
    seen = _independent_read(output, fmt)
    assert seen.dtype == colour.dtype
    assert seen.shape[:2] == colour.shape[:2]
    assert (1 if seen.ndim == 2 else seen.shape[2]) == expected_channels
    if alpha is not None:
        np.testing.assert_array_equal(seen[..., -1], alpha)
    again = decode_image(output, f"out.{fmt}")
    assert (again.format, again.dtype, again.channels) == (fmt, image.dtype, image.channels)
    if lossless:
        np.testing.assert_array_equal(again.pixels, image.pixels)
        seen_colour = seen if seen.ndim == 2 else seen[..., : image.pixels.shape[2]]
        np.testing.assert_array_equal(seen_colour.reshape(colour.shape), colour)
    else:
        assert _psnr(again.pixels, image.pixels) > 30


def test_restored_pixels_are_what_gets_written() -> None:
    encoded, _, _, _ = CASES["png-rgb16"]()
    image = decode_image(encoded, "a.png")
    restored = np.clip(image.pixels[::-1] * 0.5 + 0.25, 0, 1)  # anything but the input
    seen = _independent_read(encode_image(image, restored), "png")
    np.testing.assert_array_equal(seen, np.rint(restored * 65535).astype(np.uint16))
    np.testing.assert_array_equal(seen, quantise(restored, np.dtype(np.uint16)))  # what metrics may measure
    with pytest.raises(ValueError, match="int32"):
        quantise(restored, np.dtype(np.int32))


def test_out_of_range_pixels_are_clipped_not_wrapped() -> None:
    image = decode_image(_cv(".png", GREY), "g.png")
    wild = np.full(image.pixels.shape, 1.7, np.float32)
    wild[:10] = -0.3
    seen = _independent_read(encode_image(image, wild), "png")
    assert seen[:10].max() == 0 and seen[10:].min() == 255


def test_encode_refuses_pixels_of_another_shape() -> None:
    image = decode_image(_cv(".png", RGB), "a.png")
    with pytest.raises(ValueError, match=r"shape \(48, 63, 3\)"):
        encode_image(image, image.pixels[:, :63])
    with pytest.raises(ValueError, match="quality 0"):
        encode_image(image, image.pixels, quality=0)


# ---------------------------------------------------------------- metadata


def _metadata_input(fmt: str) -> bytes:
    if fmt == "png16":
        if not hasattr(cv2, "imencodeWithMetadata"):
            pytest.skip("this OpenCV cannot write PNG metadata")
        kinds = [cv2.IMAGE_METADATA_EXIF, cv2.IMAGE_METADATA_ICCP, cv2.IMAGE_METADATA_XMP]
        blobs = [np.frombuffer(b, np.uint8) for b in (_exif().tobytes()[6:], ICC, XMP)]
        ok, buffer = cv2.imencodeWithMetadata(".png", RGB16[..., ::-1], kinds, blobs)
        assert ok
        return buffer.tobytes()
    if fmt in ("tiff8", "tiff16"):
        array = RGB if fmt == "tiff8" else RGB16
        tags = [(315, "s", 0, ARTIST, True), (306, "s", 0, CHANGED, True), (700, "B", len(XMP), XMP, True)]
        return _tiff(array, iccprofile=ICC, extratags=tags, software=False)
    options: dict[str, object] = {"exif": _exif(), "icc_profile": ICC, "xmp": XMP}
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP.decode())
        info.add_text("Title", "moon walk")
        options["pnginfo"] = info
    return _pil(RGB, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **options)


def _read_metadata(encoded: bytes) -> tuple[Image.Exif, bytes | None, bytes | None]:
    """EXIF, ICC and XMP as Pillow (and tifffile, for TIFF XMP) see them."""
    image = Image.open(io.BytesIO(encoded))
    xmp = image.info.get("xmp")
    if image.format == "TIFF":
        with tifffile.TiffFile(io.BytesIO(encoded)) as tif:
            xmp = tif.pages.first.tags.valueof(700)
    return image.getexif(), image.info.get("icc_profile"), xmp


@pytest.mark.parametrize("fmt", ["jpeg", "png", "png16", "webp", "tiff8", "tiff16"])
def test_exif_icc_xmp_survive(fmt: str) -> None:
    image = decode_image(_metadata_input(fmt), f"meta.{fmt}")
    assert image.metadata.icc == ICC
    output = encode_image(image, image.pixels)
    exif, icc, xmp = _read_metadata(output)
    assert exif.get(0x013B) == ARTIST
    assert exif.get(0x0132) == CHANGED
    if not fmt.startswith("tiff"):  # these inputs carry an EXIF sub-directory too
        assert exif.get_ifd(0x8769).get(0x9003) == TAKEN
    assert icc == ICC
    assert xmp is not None and b"image/x-test" in bytes(xmp)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "png16", "webp", "tiff8", "tiff16"])
def test_strip_metadata_drops_exif_icc_xmp(fmt: str) -> None:
    image = decode_image(_metadata_input(fmt), f"meta.{fmt}")
    kept = encode_image(image, image.pixels)
    stripped = encode_image(image, image.pixels, strip_metadata=True)
    exif, icc, xmp = _read_metadata(stripped)
    assert 0x013B not in exif and 0x0132 not in exif and not exif.get_ifd(0x8769)
    assert icc is None and not xmp
    assert len(stripped) < len(kept) - len(ICC) // 2
    if fmt == "png":
        assert "Title" not in Image.open(io.BytesIO(stripped)).info
    assert decode_image(stripped, "s").pixels.shape == image.pixels.shape


def test_png_text_and_resolution_survive() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "moon walk")
    encoded = _pil(RGB, "PNG", pnginfo=info, dpi=(300, 300))
    image = decode_image(encoded, "t.png")
    assert image.metadata.dpi == pytest.approx((300, 300), abs=0.1)
    written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
    assert written.info["Title"] == "moon walk"
    assert written.info["dpi"] == pytest.approx((300, 300), abs=0.1)


def test_tiff_exif_directories_are_written_and_read_back() -> None:
    image = decode_image(_metadata_input("tiff16"), "in.tif")
    exif = Image.Exif()
    exif.load(image.metadata.exif)
    exif.get_ifd(0x8769).update({0x9003: TAKEN, 0x829A: 0.004})
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 30.0, 1.5)})
    image.metadata.exif = exif.tobytes()
    output = encode_image(image, image.pixels)

    with tifffile.TiffFile(io.BytesIO(output)) as tif:
        tags = tif.pages.first.tags
        assert tags.valueof("ExifTag")["DateTimeOriginal"] == TAKEN
        assert tags.valueof("GPSTag")["GPSLatitudeRef"] == "N"
        assert tags.valueof("Artist") == ARTIST
        np.testing.assert_array_equal(tif.asarray(), RGB16)
    seen = Image.open(io.BytesIO(output)).getexif()
    assert seen.get_ifd(0x8769)[0x829A] == pytest.approx(0.004)
    again = decode_image(output, "out.tif")  # and our own reader finds them in a TIFF
    reread = Image.Exif()
    reread.load(again.metadata.exif)
    assert reread.get_ifd(0x8769)[0x9003] == TAKEN and reread.get_ifd(0x8825)[1] == "N"


@pytest.mark.parametrize("quality", [50, 75, 92])
def test_jpeg_quality_is_estimated_and_reused(quality: int) -> None:
    image = decode_image(_cv(".jpg", RGB, [cv2.IMWRITE_JPEG_QUALITY, quality]), "q.jpg")
    assert image.metadata.jpeg_quality is not None
    assert abs(image.metadata.jpeg_quality - quality) <= 1
    output = encode_image(image, image.pixels)
    written = Image.open(io.BytesIO(output))
    assert isinstance(written, JpegImagePlugin.JpegImageFile)
    assert written.quantization == Image.open(io.BytesIO(_cv(".jpg", RGB, [cv2.IMWRITE_JPEG_QUALITY, image.metadata.jpeg_quality]))).quantization  # type: ignore[attr-defined]
    assert decode_image(encode_image(image, image.pixels, quality=30), "q").metadata.jpeg_quality == 30


def test_jpeg_chroma_subsampling_and_dpi_are_kept() -> None:
    encoded = _pil(RGB, "JPEG", quality=90, subsampling=0, dpi=(240, 240))  # 4:4:4
    image = decode_image(encoded, "s.jpg")
    written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
    assert JpegImagePlugin.get_sampling(written) == 0
    assert written.info["dpi"] == pytest.approx((240, 240))


# ---------------------------------------------------------------- orientation


def _oriented_input(fmt: str, orientation: int) -> bytes:
    if fmt == "tiff":
        return _tiff(RGB, extratags=[(274, "H", 1, orientation, True)])
    return _pil(RGB, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], exif=_exif(orientation), quality=95)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "tiff"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_applied_and_reset(fmt: str, orientation: int) -> None:
    encoded = _oriented_input(fmt, orientation)
    image = decode_image(encoded, f"o.{fmt}")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded)))).astype(np.float32) / 255
    assert image.pixels.shape == upright.shape
    assert image.metadata.orientation == orientation
    if fmt in ("png", "tiff"):
        np.testing.assert_array_equal(image.pixels, upright)
    else:
        assert _psnr(image.pixels, upright) > 35

    output = encode_image(image, image.pixels)
    written = Image.open(io.BytesIO(output))
    assert written.getexif().get(0x0112, 1) == 1
    if fmt != "tiff":
        assert written.getexif().get(0x013B) == ARTIST  # the rest of the EXIF block is intact
    viewed = ImageOps.exif_transpose(written)  # what a viewer shows: no second rotation
    assert viewed.size == (image.width, image.height)
    again = decode_image(output, "out")
    assert again.metadata.orientation == 1 and again.pixels.shape == image.pixels.shape


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow(orientation: int) -> None:
    encoded = _pil(_rgba(RGB, ALPHA), "PNG", exif=_exif(orientation))
    image = decode_image(encoded, "o.png")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))))
    np.testing.assert_array_equal(np.rint(image.pixels * 255).astype(np.uint8), upright[..., :3])
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha, upright[..., 3])
    assert image.pixels.flags.c_contiguous and image.alpha.flags.c_contiguous


def test_tiff_opencv_fallback_is_oriented_once() -> None:
    # A palette TIFF is left to OpenCV, which would apply the orientation
    # itself; the decoder hides the tag from it and rotates exactly once.
    palette = Image.fromarray(RGB).quantize(64)
    out = io.BytesIO()
    palette.save(out, "TIFF", tiffinfo={274: 6})
    image = decode_image(out.getvalue(), "p.tif")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue()))).convert("RGB"))
    assert image.channels == 3 and image.metadata.orientation == 6
    np.testing.assert_array_equal(np.rint(image.pixels * 255).astype(np.uint8), upright)
    written = tifffile.TiffFile(io.BytesIO(encode_image(image, image.pixels)))
    assert written.pages.first.tags.valueof(274) == 1
    written.close()


def test_xmp_orientation_is_reset_with_exif() -> None:
    xmp = XMP.replace(b'dc:format="image/x-test"', b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"')
    encoded = _pil(RGB, "JPEG", exif=_exif(6), xmp=xmp)
    image = decode_image(encoded, "x.jpg")
    assert image.metadata.xmp is not None and b'tiff:Orientation="1"' in image.metadata.xmp
    assert b'tiff:Orientation="1"' in Image.open(io.BytesIO(encode_image(image, image.pixels))).info["xmp"]


# ---------------------------------------------------------------- bad input


def _valid(fmt: str) -> bytes:
    return {
        "png": _cv(".png", RGB),
        "jpeg": _cv(".jpg", RGB),
        "tiff": _tiff(RGB16),
        "webp": _pil(RGB, "WEBP", quality=80),
    }[fmt]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff", "webp"])
def test_truncated_files_are_refused_with_their_name(fmt: str) -> None:
    encoded = _valid(fmt)
    for cut in (len(encoded) // 2, len(encoded) - 3, 30):
        with pytest.raises(ImageDecodeError, match=rf"^archive/broken\.{fmt}: not a readable image \(.+\)$"):
            decode_image(encoded[:cut], f"archive/broken.{fmt}")


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        (b"", "empty file"),
        (b"GIF89a" + bytes(40), "found GIF"),
        (b"hello, this is not a photograph", "not PNG, JPEG, TIFF, WebP, JPEG 2000 or BMP"),
        (b"%PDF-1.7\n" + bytes(40), "found PDF"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "JPEG"),
    ],
)
def test_non_images_are_refused_naming_what_was_found(payload: bytes, found: str) -> None:
    with pytest.raises(ImageDecodeError, match=f"^in/x.png: not a readable image .*{found}"):
        decode_image(payload, "in/x.png")


def test_corrupt_image_data_is_refused() -> None:
    encoded = bytearray(_cv(".png", RGB))
    encoded[60:200] = bytes(140)  # inside IDAT
    with pytest.raises(ImageDecodeError, match="c.png: not a readable image"):
        decode_image(bytes(encoded), "c.png")


def test_decompression_bomb_refused_from_the_header() -> None:
    # A 100000x100000 PNG header followed by a tiny (wrong) image: the limit
    # must trip before any decoder would allocate 10^10 pixels.
    small = _cv(".png", GREY)
    bomb = bytearray(small)
    struct.pack_into(">II", bomb, 16, 100_000, 100_000)
    struct.pack_into(">I", bomb, 29, zlib.crc32(bytes(bomb[12:29])))
    with pytest.raises(ImageDecodeError, match=r"bomb.png: .*100000x100000 .*limit of 200,000,000"):
        decode_image(bytes(bomb), "bomb.png")
    with pytest.raises(ImageDecodeError, match=r"limit of 1,000"):
        decode_image(small, "small.png", max_pixels=1000)
    assert decode_image(small, "small.png", max_pixels=GREY.size).width == GREY.shape[1]


def test_format_helpers() -> None:
    assert format_from_name("a/b/Scan_001.TIF") == "tiff"
    assert format_from_name("x.jpeg") == format_from_name("y.JPG") == "jpeg"
    assert format_from_name("photo.webp") == "webp" and format_from_name("p.png") == "png"
    assert format_from_name("notes.txt") is None and format_from_name("dir.png/file") is None
    assert content_type("tiff") == "image/tiff" and content_type("jpeg") == "image/jpeg"
    with pytest.raises(ValueError, match="'gif'"):
        content_type("gif")


def test_decoded_image_properties() -> None:
    image: DecodedImage = decode_image(_tiff(_rgba(RGB16, ALPHA16)), "p.tif")
    assert (image.width, image.height, image.bit_depth, image.channels) == (64, 48, 16, 4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged TIFF tags
def test_damaged_files_raise_only_image_decode_errors() -> None:
    # Truncations and byte flips in headers and data of every case: the
    # decoder either reads an image or raises ImageDecodeError, nothing else.
    rng = np.random.default_rng(1)
    for name, make in sorted(CASES.items()):
        encoded = make()[0]
        for trial in range(40):
            damaged = bytearray(encoded[: rng.integers(1, len(encoded))] if trial % 2 else encoded)
            reach = len(damaged) if trial % 4 == 3 else min(len(damaged), 300)
            for _ in range(int(rng.integers(0, 5))):
                damaged[rng.integers(0, reach)] = rng.integers(0, 256)
            try:
                image = decode_image(bytes(damaged), name)
            except ImageDecodeError as exc:
                assert str(exc).startswith(f"{name}: not a readable image (")
            else:
                assert image.pixels.ndim == 3 and np.isfinite(image.pixels).all()


def test_tiff_keeps_lossless_compression_and_replaces_lossy() -> None:
    for compression, written in (("lzw", 5), ("packbits", 32773), ("adobe_deflate", 8), (None, 1), ("jpeg", 8)):
        image = decode_image(_tiff(RGB, compression=compression), "c.tif")
        with tifffile.TiffFile(io.BytesIO(encode_image(image, image.pixels))) as tif:
            assert int(tif.pages.first.compression) == written, compression


def test_animations_are_refused_with_a_way_to_split_them() -> None:
    """An output holds one picture: restoring only the first frame and writing it back would lose the rest."""
    frames = [Image.fromarray(RGB), Image.fromarray(np.ascontiguousarray(RGB[::-1]))]
    for fmt, ext in (("WEBP", "webp"), ("PNG", "png")):
        out = io.BytesIO()
        frames[0].save(out, fmt, save_all=True, append_images=frames[1:], lossless=True)
        with pytest.raises(ImageDecodeError, match=rf"anim\.{ext}: an animated {fmt} with 2 frames; .* Split it into "
                                                   r"one file per frame"):
            decode_image(out.getvalue(), f"anim.{ext}")


def test_every_page_of_a_multi_page_tiff_is_read_and_written_back_in_its_own_layout() -> None:
    """A scanner's multi-page TIFF: pages of different sizes, depths and layouts, and a preview that is no page."""
    grey8 = np.ascontiguousarray(RGB16[:30, :20, 0] >> 8).astype(np.uint8)
    rgba8 = _rgba(RGB[:25, :35], ALPHA[:25, :35])
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:
        tif.write(RGB16, photometric="rgb", metadata=None, resolution=(300, 300), resolutionunit="INCH")
        tif.write(RGB16[::4, ::4], photometric="rgb", subfiletype=1, metadata=None)  # a preview: not a page
        tif.write(grey8, photometric="minisblack", compression="lzw", metadata=None)
        tif.write(rgba8, photometric="rgb", extrasamples=["unassalpha"], metadata=None)
    image = decode_image(out.getvalue(), "scan.tif")
    np.testing.assert_array_equal(image.pixels, _unit(RGB16))
    assert [p.pixels.shape for p in image.pages] == [(30, 20, 1), (25, 35, 3)]
    assert image.pages[0].dtype == np.uint8 and image.pages[0].metadata.tiff_compression == 5

    darker = [p.pixels * 0.5 for p in image.pages]
    with pytest.raises(ValueError, match="0 restored pages for an image with"):
        encode_image(image, image.pixels)
    written = encode_image(image, image.pixels, pages=darker)
    with tifffile.TiffFile(io.BytesIO(written)) as tif:
        assert len(tif.pages) == 1 + len(image.pages)
        assert int(tif.pages[1].compression) == 5 and tif.pages[0].tags.valueof(282) is not None
    back = decode_image(written, "back.tif")
    for page, restored, original in zip(back.pages, darker, image.pages, strict=True):
        np.testing.assert_allclose(page.pixels, restored, atol=1 / 255)
        if original.alpha is not None:
            np.testing.assert_array_equal(page.alpha, original.alpha)  # alpha passes through, page by page
    with pytest.raises(ImageDecodeError, match=r"pixels in \d pages is more than the limit"):
        decode_image(out.getvalue(), "scan.tif", max_pixels=RGB16.shape[0] * RGB16.shape[1] + 10)


def test_a_multi_page_tiff_with_a_page_only_opencv_reads_is_refused() -> None:
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:
        tif.write(RGB, photometric="rgb", metadata=None)
        tif.write(RGB[..., 0], photometric="palette", colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)),
                  metadata=None)
    with pytest.raises(ImageDecodeError, match=r"p\.tif: a multi-page TIFF with 2 pages, a later one in a layout "
                                               r"read only as a first page .* Split it into one file per page"):
        decode_image(out.getvalue(), "p.tif")


def test_single_picture_animations_and_tiffs_with_a_preview_are_read() -> None:
    """One animation frame is one picture; a reduced-resolution preview page (NewSubfileType 1) is no picture of its
    own, as scanners write them."""
    out = io.BytesIO()
    Image.fromarray(RGB).save(out, "WEBP", save_all=True, lossless=True,
                              append_images=[Image.fromarray(np.ascontiguousarray(RGB[::-1]))])
    two = out.getvalue()
    second = two.index(b"ANMF", two.index(b"ANMF") + 4)  # cut the second frame's chunk (the file's last)
    one = b"RIFF" + struct.pack("<I", second - 8) + two[8:second]
    np.testing.assert_array_equal(np.rint(decode_image(one, "one.webp").pixels * 255), RGB)
    previewed = io.BytesIO()
    with tifffile.TiffWriter(previewed) as tif:
        tif.write(RGB16, photometric="rgb", metadata=None)
        tif.write(RGB16[::4, ::4], photometric="rgb", subfiletype=1, metadata=None)
    np.testing.assert_array_equal(decode_image(previewed.getvalue(), "scan.tif").pixels, _unit(RGB16))


def test_cmyk_jpeg_becomes_rgb_without_its_cmyk_profile() -> None:
    cmyk_profile = ICC[:16] + b"CMYK" + ICC[20:]  # the header is what says which colour space
    out = io.BytesIO()
    Image.fromarray(RGB).convert("CMYK").save(out, "JPEG", quality=95, icc_profile=cmyk_profile)
    image = decode_image(out.getvalue(), "print.jpg")
    assert image.channels == 3 and image.metadata.icc is None
    assert _psnr(image.pixels, _unit(RGB)) > 30
    assert "icc_profile" not in Image.open(io.BytesIO(encode_image(image, image.pixels))).info
    grey = decode_image(_pil(GREY, "JPEG", icc_profile=ICC), "grey-with-rgb-profile.jpg")
    assert grey.metadata.icc is None


def test_buffers_other_than_bytes_are_accepted() -> None:
    encoded = _cv(".png", RGB)
    for buffer in (bytearray(encoded), memoryview(encoded)):
        assert decode_image(buffer, "b.png").width == RGB.shape[1]  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", [".png", ".tif"])
def test_every_16_bit_value_survives(fmt: str) -> None:
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    encoded = _cv(".png", every) if fmt == ".png" else _tiff(every)
    image = decode_image(encoded, f"all{fmt}")
    restored = _independent_read(encode_image(image, image.pixels), "png" if fmt == ".png" else "tiff")
    np.testing.assert_array_equal(restored, every)


def test_nan_and_infinite_pixels_are_written_as_black_and_white() -> None:
    image = decode_image(_cv(".png", GREY), "g.png")
    pixels = image.pixels.copy()
    pixels[0, :3, 0] = [np.nan, np.inf, -np.inf]
    seen = _independent_read(encode_image(image, pixels), "png")
    assert seen[0, :3].tolist() == [0, 255, 0]


CAPTION = b"Moon walk, Apollo 11"
IIM = b"\x1c\x02\x78" + struct.pack(">H", len(CAPTION)) + CAPTION + b"\x1c\x02\x19\x00\x04moon"
PHOTOSHOP = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(IIM)) + IIM + b"\x00" * (len(IIM) % 2)


@pytest.mark.parametrize("fmt", ["jpeg", "tiff"])
def test_iptc_captions_survive_and_strip(fmt: str) -> None:
    from PIL import IptcImagePlugin

    if fmt == "jpeg":
        plain = _pil(RGB, "JPEG", quality=90)
        app13 = b"Photoshop 3.0\x00" + PHOTOSHOP
        encoded = plain[:2] + b"\xff\xed" + struct.pack(">H", len(app13) + 2) + app13 + plain[2:]
    else:
        encoded = _tiff(RGB16, extratags=[(33723, 7, len(IIM), IIM, True), (34377, 7, len(PHOTOSHOP), PHOTOSHOP, True)])
    image = decode_image(encoded, f"iptc.{fmt}")
    info = IptcImagePlugin.getiptcinfo(Image.open(io.BytesIO(encode_image(image, image.pixels))))
    assert info is not None and info[(2, 120)] == CAPTION and info[(2, 25)] == b"moon"
    stripped = Image.open(io.BytesIO(encode_image(image, image.pixels, strip_metadata=True)))
    assert IptcImagePlugin.getiptcinfo(stripped) is None


def test_png_imagemagick_raw_exif_profile_is_read_and_replaced() -> None:
    block = _exif(6).tobytes()
    text = f"\nexif\n{len(block):8d}\n" + "\n".join(block.hex()[i : i + 72] for i in range(0, len(block) * 2, 72))
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", text, zip=True)
    encoded = _pil(RGB, "PNG", pnginfo=info)
    image = decode_image(encoded, "im.png")
    assert image.metadata.orientation == 6 and image.pixels.shape == (RGB.shape[1], RGB.shape[0], 3)
    written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
    assert written.getexif().get(0x0112) == 1 and written.getexif().get(0x013B) == ARTIST
    assert "Raw profile type exif" not in written.info  # its orientation 6 would rotate again


def test_icc_profile_spanning_several_jpeg_segments() -> None:
    padded = ICC + bytes(150_000)  # > two 64 KB APP2 segments
    big = struct.pack(">I", len(padded)) + padded[4:]
    image = decode_image(_pil(RGB, "JPEG", icc_profile=big), "big-icc.jpg")
    assert image.metadata.icc == big
    assert Image.open(io.BytesIO(encode_image(image, image.pixels))).info["icc_profile"] == big


# ---------------------------------------------------------------- damage and layouts that used to pass silently


def _pages(*arrays: np.ndarray, preview_first: bool = False) -> bytes:
    """A multi-page RGB/grey TIFF; with ``preview_first``, a reduced-resolution preview (NewSubfileType 1) leads."""
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:
        if preview_first:
            tif.write(arrays[0][::4, ::4], photometric="rgb", subfiletype=1, metadata=None)
        for array in arrays:
            tif.write(array, photometric="rgb" if array.ndim == 3 else "minisblack", metadata=None)
    return out.getvalue()


def test_a_tiff_that_opens_with_a_preview_keeps_its_full_size_pages() -> None:
    """Scanners write a small preview first: the pages after it are the pictures, and none of them may be lost."""
    second = np.ascontiguousarray(RGB[::-1])
    image = decode_image(_pages(RGB, second, preview_first=True), "scan.tif")
    assert (image.width, image.height) == (RGB.shape[1], RGB.shape[0])
    np.testing.assert_array_equal(image.pixels, _unit(RGB))
    assert len(image.pages) == 1
    np.testing.assert_array_equal(image.pages[0].pixels, _unit(second))

    written = encode_image(image, image.pixels, pages=[p.pixels for p in image.pages])
    with tifffile.TiffFile(io.BytesIO(written)) as tif:
        assert [page.shape for page in tif.pages] == [RGB.shape, RGB.shape]  # the preview is no page of its own
        np.testing.assert_array_equal(tif.pages[0].asarray(), RGB)
        np.testing.assert_array_equal(tif.pages[1].asarray(), second)


@pytest.mark.parametrize("grey", [GREY, GREY16], ids=["8-bit", "16-bit"])
def test_a_miniswhite_tiff_is_read_as_viewers_show_it_and_written_back_miniswhite(grey: np.ndarray) -> None:
    """Photometric 0 stores ink, not light: 0 is white. Read raw, the restoration would come back a negative."""
    top = np.iinfo(grey.dtype).max
    out = io.BytesIO()
    tifffile.imwrite(out, grey, photometric="miniswhite", compression="lzw", metadata=None)
    image = decode_image(out.getvalue(), "negative.tif")
    np.testing.assert_array_equal(image.pixels[..., 0], (top - grey).astype(np.float32) / top)  # white is 1

    lighter = np.clip(image.pixels + 0.1, 0, 1)
    with tifffile.TiffFile(io.BytesIO(encode_image(image, lighter))) as tif:
        page = tif.pages.first
        assert page.photometric == tifffile.PHOTOMETRIC.MINISWHITE and page.dtype == grey.dtype
        np.testing.assert_array_equal(page.asarray(), top - quantise(lighter, np.dtype(grey.dtype))[..., 0])
    unchanged = encode_image(image, image.pixels)
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(unchanged)), grey)  # a round trip stores what it read


def test_damaged_compressed_tiff_data_is_refused_not_restored_with_black_rows() -> None:
    encoded = bytearray(_tiff(RGB, compression="lzw"))
    with tifffile.TiffFile(io.BytesIO(bytes(encoded))) as tif:
        offset, count = tif.pages.first.dataoffsets[0], tif.pages.first.databytecounts[0]
    encoded[offset + count // 2 : offset + count // 2 + 40] = b"\xff" * 40
    with pytest.raises(ImageDecodeError, match=r"^scan\.tif: not a readable image \(corrupt TIFF data: .*LZW"):
        decode_image(bytes(encoded), "scan.tif")


def test_a_cut_tiff_is_refused_as_truncated_naming_where_it_ends() -> None:
    encoded = _pages(RGB, GREY, RGB[::-1].copy())
    with tifffile.TiffFile(io.BytesIO(encoded)) as tif:
        last = tif.pages[2].dataoffsets[0]
        third_directory = tif.pages[2].offset
    with pytest.raises(ImageDecodeError, match=rf"^cut\.tif: not a readable image \(truncated TIFF: page 3's data ends "
                                               rf"at byte {len(encoded)}, beyond the file's {last + 10} bytes\)$"):
        decode_image(encoded[: last + 10], "cut.tif")  # pages 1 and 2 are whole: they are not passed off as all
    with pytest.raises(ImageDecodeError, match=r"truncated TIFF: directory 3 \(at byte \d+\) ends at byte"):
        decode_image(encoded[: third_directory + 4], "cut.tif")
    with pytest.raises(ImageDecodeError, match=r"truncated TIFF: directory 1 \(at byte 8\) is beyond the file's 8 "):
        decode_image(encoded[:8], "cut.tif")  # tifffile alone says "0"


def test_a_cmyk_tiff_gains_no_alpha_channel() -> None:
    cmyk = np.asarray(Image.fromarray(RGB).convert("CMYK"))
    out = io.BytesIO()
    tifffile.imwrite(out, cmyk, photometric="separated", metadata=None)
    image = decode_image(out.getvalue(), "print.tif")
    assert image.channels == 3 and image.alpha is None
    assert _psnr(image.pixels, _unit(np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")))) > 40
    written = tifffile.imread(io.BytesIO(encode_image(image, image.pixels)))
    assert written.shape == RGB.shape


def test_a_compressed_png_chunk_that_inflates_without_bound_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """A 400 KB iCCP (or XMP zTXt) chunk of zeros inflates to 400 MB: it must not be inflated, nor carried."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = zlib.compress(bytes(400 * 2**20), 9)
    plain = _cv(".png", RGB)
    encoded = (plain[:33] + chunk(b"iCCP", b"icc\x00\x00" + bomb)
               + chunk(b"zTXt", b"XML:com.adobe.xmp\x00\x00" + bomb) + plain[33:])
    with caplog.at_level(logging.WARNING, logger="worker.imageio"):
        image = decode_image(encoded, "bomb.png")
    assert image.metadata.icc is None and image.metadata.xmp is None
    assert "iCCP chunk that inflates to more than 8 MB" in caplog.text and "zTXt chunk that inflates" in caplog.text
    np.testing.assert_array_equal(image.pixels, _unit(RGB))
    written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
    assert "icc_profile" not in written.info and "xmp" not in written.info


def test_a_jpeg_with_missing_scan_data_is_refused_not_restored_with_grey_rows() -> None:
    encoded = _pil(RGB, "JPEG", quality=90)
    scan = encoded.index(b"\xff\xda")
    damaged = encoded[: (scan + len(encoded)) // 2] + b"\xff\xd9"  # the second half of the scan gone, EOI kept
    with pytest.raises(ImageDecodeError, match=r"^half\.jpg: not a readable image \(corrupt JPEG data \(libjpeg: "
                                               r"Corrupt JPEG data: premature end of data segment\)"):
        decode_image(damaged, "half.jpg")
    assert decode_image(encoded, "whole.jpg").width == RGB.shape[1]


def test_converting_to_a_format_too_small_for_the_image_fails_before_the_model_runs() -> None:
    wide = decode_image(_tiff(np.zeros((2, 16384), np.uint8)), "panorama.tif")
    with pytest.raises(InputError, match=r"16384x2 pixels and WEBP holds at most 16383 pixels a side"):
        as_format(wide, "webp")
    assert as_format(wide, "jpeg").format == "jpeg"
    wider = decode_image(_tiff(np.zeros((1, 65501), np.uint8)), "strip.tif")
    with pytest.raises(InputError, match=r"65501x1 pixels and JPEG holds at most 65500"):
        as_format(wider, "jpeg")


@pytest.mark.parametrize("orientation", [1, 6])
def test_png_output_carries_the_resolution_turned_with_the_pixels(orientation: int) -> None:
    for encoded in (_pil(RGB, "JPEG", dpi=(300, 150), exif=_exif(orientation)),
                    _pil(RGB, "PNG", dpi=(300, 150), exif=_exif(orientation))):
        image = as_format(decode_image(encoded, "in"), "png")
        written = Image.open(io.BytesIO(encode_image(image, image.pixels)))
        expected = (300, 150) if orientation == 1 else (150, 300)
        assert written.info["dpi"] == pytest.approx(expected, abs=0.02)  # pHYs counts whole dots a metre


def test_every_page_of_a_tiff_keeps_its_own_resolution_and_name() -> None:
    """Pages after the first were written at 1 dpi with no name: a scanner's 600-dpi detail page came back as
    a 1-dpi page, and the names an archive gives its pages were gone."""
    import tifffile

    rng = np.random.default_rng(2)
    pages = [(rng.integers(0, 255, (20, 30, 3)).astype(np.uint8), 300, "recto"),
             (rng.integers(0, 65535, (40, 10)).astype(np.uint16), 600, "verso detail"),
             (rng.integers(0, 255, (12, 14, 3)).astype(np.uint8), 150, None)]
    scan = io.BytesIO()
    with tifffile.TiffWriter(scan) as tif:
        for samples, dpi, name in pages:
            tif.write(samples, photometric="rgb" if samples.ndim == 3 else "minisblack", resolution=(dpi, dpi),
                      resolutionunit="INCH", metadata=None,
                      extratags=[(285, "s", 0, name, True)] if name else [])
    decoded = decode_image(scan.getvalue(), "scan.tif")
    written = encode_image(decoded, decoded.pixels, pages=[page.pixels for page in decoded.pages])
    with tifffile.TiffFile(io.BytesIO(written)) as tif:
        found = [(p.shape, p.tags.valueof(282), p.tags.valueof(285)) for p in tif.pages]
    assert [(shape, name) for shape, _, name in found] == [(s.shape, n) for s, _, n in pages]
    assert [round(x[0] / x[1]) for _, x, _ in found] == [dpi for _, dpi, _ in pages]
