"""Tests for deepseek_vl2_runtime.image_io.load_image.

Every fixture is built here with Pillow/numpy (into tmp_path or memory); no binary files are
committed. Each case asserts the exact outcome, and for refusals that the user-facing message
carries the actionable part (the limit, the supported formats, what to do).
"""

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from deepseek_vl2_runtime.errors import InputError
from deepseek_vl2_runtime.image_io import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_SIDE_AFTER_LOAD,
    load_image,
)

SUPPORTED_LIST = "supported formats: png, jpeg, webp, gif, bmp, tiff"
RED = (255, 0, 0)
WHITE = (255, 255, 255)


# --- helpers --------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def constant_grey_png(width: int, height: int) -> bytes:
    """A complete, valid 8-bit greyscale PNG of zeros, built without allocating the image."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_header(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def assert_refused(source: object, *fragments: str, **kwargs: int) -> str:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.fixture
def record_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every ImageFile.load() call (i.e. every real decode) by image size."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- the default limits, at their edges ------------------------------------------------------
# Written out here (not read from image_io's constants), so changing a limit fails a test.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def test_default_pixel_limit_is_8192_squared() -> None:
    """8192 x 8192 is decoded (and downscaled); one row more is refused from the header."""
    assert load_image(constant_grey_png(8192, 8192)).size == (4096, 4096)
    over = png_header(8192, 8193) + png_chunk(b"IDAT", zlib.compress(bytes(100)))
    assert_refused(over + png_chunk(b"IEND", b""), "67,117,056 pixels", "limit of 67,108,864")


def test_default_file_size_limit_is_50_mib(tmp_path: Path) -> None:
    path = tmp_path / "padded.png"
    with path.open("wb") as f:  # a valid PNG, zero-padded (sparse) to exactly 50 MiB
        f.write(encode(Image.new("RGB", (8, 8), RED), "PNG"))
        f.truncate(50 * 1024 * 1024)
    assert load_image(path).size == (8, 8)
    with path.open("r+b") as f:
        f.truncate(50 * 1024 * 1024 + 1)
    assert_refused(path, "52,428,801 bytes", "limit of 52,428,800 bytes")


def test_longer_side_is_at_most_4096() -> None:
    assert load_image(encode(Image.new("RGB", (4096, 16), RED), "PNG")).size == (4096, 16)
    assert load_image(encode(Image.new("RGB", (16, 4097), RED), "PNG")).size == (16, 4096)


# --- not an image / damaged -----------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, "empty.png", b""), "empty (0 bytes)", "upload")


def test_zero_bytes_input() -> None:
    assert_refused(b"", "empty (0 bytes)")


def test_text_file(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.jpg", b"hello, this is not an image\n" * 20)
    assert_refused(path, "not a recognised image", SUPPORTED_LIST, "convert")


def test_random_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused(write(tmp_path, "noise.png", data), "not a recognised image", SUPPORTED_LIST)


def _photo(width: int = 160, height: int = 120) -> Image.Image:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray(gradient.astype(np.uint8))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.2])
def test_truncated_png(tmp_path: Path, keep: float) -> None:
    data = encode(_photo(), "PNG")
    path = write(tmp_path, "cut.png", data[: int(len(data) * keep)])
    assert_refused(path, "PNG image is damaged or incomplete", "upload it again")


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_truncated_jpeg(tmp_path: Path, keep: float, progressive: bool) -> None:
    data = encode(_photo(), "JPEG", quality=90, progressive=progressive)
    path = write(tmp_path, "cut.jpg", data[: int(len(data) * keep)])
    assert_refused(path, "JPEG image is damaged or incomplete", "upload it again")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_other_formats(fmt: str) -> None:
    data = encode(_photo(), fmt)
    assert_refused(data[: len(data) // 2], "damaged or incomplete")


def test_truncation_detection_does_not_touch_pillow_global() -> None:
    data = encode(_photo(), "PNG")
    assert_refused(data[: len(data) // 2], "damaged")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("magic", "name"),
    [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff\xe0", "JPEG"), (b"GIF89a", "GIF")],
)
def test_damaged_header_names_the_format(magic: bytes, name: str) -> None:
    assert_refused(magic + b"\x00" * 40, f"looks like a {name} image", "damaged or incomplete")


def _psd_header() -> bytes:
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3) + bytes(64)


def _heic_header() -> bytes:
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64)


UNSUPPORTED = {
    "ico": (lambda: encode(Image.new("RGB", (32, 32), RED), "ICO"), "ICO"),
    "psd": (_psd_header, "PSD"),
    "pdf": (lambda: encode(Image.new("RGB", (32, 32), RED), "PDF"), "PDF"),
    "svg": (
        lambda: (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10" fill="red"/></svg>\n'
        ),
        "SVG",
    ),
    "heic": (_heic_header, "HEIC"),
    "tga": (lambda: encode(Image.new("RGB", (8, 8), RED), "TGA"), None),
    "html": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_format(tmp_path: Path, kind: str) -> None:
    make, name = UNSUPPORTED[kind]
    message = assert_refused(write(tmp_path, f"upload.{kind}", make()), SUPPORTED_LIST)
    if name is not None:
        assert f"{name}" in message, message
        assert "are not supported" in message, message
    else:  # TGA has no signature: Pillow would accept it, we never offer it the TGA plugin
        assert "not a recognised image" in message, message


# --- size limits ----------------------------------------------------------------------------


def test_decompression_bomb_from_crafted_header(record_loads: list[tuple[int, int]]) -> None:
    # 20000 x 20000 declared (400 Mpx > twice Pillow's default limit: Pillow itself raises
    # DecompressionBombError inside Image.open), with almost no data behind it.
    data = (
        png_header(20000, 20000)
        + png_chunk(b"IDAT", zlib.compress(bytes(20001)))
        + (png_chunk(b"IEND", b""))
    )
    assert len(data) < 200
    assert_refused(data, f"{MAX_IMAGE_PIXELS:,} pixels", "downscale")
    assert record_loads == []


def test_decompression_bomb_below_pillow_threshold(record_loads: list[tuple[int, int]]) -> None:
    # A genuine, complete single-colour PNG of 9000 x 9000 = 81 Mpx: between our limit and
    # Pillow's default warning threshold, so only our header check can stop it.
    data = constant_grey_png(9000, 9000)
    assert len(data) < 100_000  # ~1000:1
    message = assert_refused(data, f"{MAX_IMAGE_PIXELS:,} pixels", "9,000 x 9,000", "81,000,000")
    assert "downscale" in message
    assert record_loads == []  # refused from the header, before any decoding


def test_custom_max_pixels(record_loads: list[tuple[int, int]]) -> None:
    data = encode(Image.new("RGB", (20, 20), RED), "PNG")
    assert_refused(data, "more than the limit of 399 pixels", max_pixels=399)
    assert record_loads == []
    assert load_image(data, max_pixels=400).size == (20, 20)


def test_exactly_max_pixels_is_accepted() -> None:
    data = encode(Image.new("L", (100, 50), 7), "PNG")
    assert load_image(data, max_pixels=5000).size == (100, 50)


def test_pillow_decompression_bomb_error_becomes_input_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Someone else lowered Pillow's global limit: Pillow raises inside Image.open.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert_refused(data, "more than the limit of", "downscale")


def test_pillow_decompression_bomb_warning_as_error_becomes_input_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 px: warning, not error
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(data).size == (100, 100)  # a warning alone does not refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_refused(data, "more than the limit of")


def test_pillow_globals_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    load_image(encode(_photo(), "JPEG"))
    assert_refused(constant_grey_png(9000, 9000), "limit")
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_file_larger_than_max_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as f:  # sparse: instant, no disk used
        f.write(encode(Image.new("RGB", (8, 8)), "PNG"))
        f.truncate(MAX_IMAGE_BYTES + 1)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open must not be reached for an over-large file")

    monkeypatch.setattr(Image, "open", no_open)
    assert_refused(path, f"{MAX_IMAGE_BYTES + 1:,} bytes", f"limit of {MAX_IMAGE_BYTES:,} bytes")


def test_custom_max_bytes_path_and_bytes(tmp_path: Path) -> None:
    data = encode(_photo(), "PNG")
    path = write(tmp_path, "a.png", data)
    assert_refused(path, f"limit of {len(data) - 1:,} bytes", max_bytes=len(data) - 1)
    assert_refused(data, f"limit of {len(data) - 1:,} bytes", max_bytes=len(data) - 1)
    assert load_image(path, max_bytes=len(data)).size == (160, 120)


# --- not a regular file -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.png", "could not be found", "upload it again")


def test_directory(tmp_path: Path) -> None:
    assert_refused(tmp_path, "not a regular image file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_refused(fifo, "not a regular image file")  # returns at once: no writer needed


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_device_file() -> None:
    assert_refused("/dev/zero", "not a regular image file")


def test_wrong_source_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        load_image(b"x", max_pixels=0)


# --- downscaling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"), [((6000, 4000), (4096, 2731)), ((4000, 6000), (2731, 4096))]
)
def test_large_jpeg_downscaled(
    tmp_path: Path, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    path = write(tmp_path, "big.jpg", encode(Image.new("RGB", size, (30, 120, 200)), "JPEG"))
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == expected
    assert close(out.getpixel((expected[0] // 2, expected[1] // 2)), (30, 120, 200))


def test_large_jpeg_uses_dct_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    requests: list[tuple[str | None, tuple[int, int] | None]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        requests.append((mode, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    loads: list[tuple[int, int]] = []
    original_load = ImageFile.ImageFile.load

    def load_spy(self):  # type: ignore[no-untyped-def]
        loads.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_spy)

    out = load_image(encode(Image.new("RGB", (9000, 600), (10, 200, 30)), "JPEG"))
    assert requests == [("RGB", (4096, 273))]
    assert loads[0] == (4500, 300)  # decoded at 1/2 scale, still >= the target
    assert out.size == (4096, 273)
    assert close(out.getpixel((2000, 100)), (10, 200, 30))


def test_large_png_downscaled_keeps_aspect() -> None:
    out = load_image(encode(Image.new("RGB", (5000, 100), (0, 0, 255)), "PNG"))
    assert out.size == (4096, 82)
    assert out.getpixel((100, 40)) == (0, 0, 255)


def test_extreme_aspect_keeps_one_pixel() -> None:
    out = load_image(encode(Image.new("L", (20000, 1), 200), "PNG"))
    assert out.size == (4096, 1)
    assert out.getpixel((10, 0)) == (200, 200, 200)


# --- orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_rotates(tmp_path: Path, fmt: str) -> None:
    stored = Image.new("RGB", (64, 32), (0, 0, 0))
    stored.paste(RED, (0, 0, 16, 16))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    params: dict[str, object] = {"exif": exif}
    if fmt != "PNG":
        params["quality"] = 95
    path = write(tmp_path, f"rotated.{fmt.lower()}", encode(stored, fmt, **params))

    out = load_image(path)
    assert out.size == (32, 64)  # swapped
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert close(out.getpixel((24, 8)), RED, 40)
    assert close(out.getpixel((8, 8)), (0, 0, 0), 40)
    assert close(out.getpixel((24, 56)), (0, 0, 0), 40)


def test_damaged_exif_is_ignored() -> None:
    data = encode(
        Image.new("RGB", (16, 8), RED), "PNG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff"
    )
    out = load_image(data)
    assert out.size == (16, 8)
    assert out.getpixel((0, 0)) == RED


# --- frames and modes -------------------------------------------------------------------------


def _two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 0, 255))]


def test_animated_gif_first_frame() -> None:
    first, *rest = _two_frames()
    out = load_image(encode(first, "GIF", save_all=True, append_images=rest, duration=100))
    assert out.mode == "RGB"
    assert out.size == (16, 16)
    assert out.getpixel((5, 5)) == RED


def test_animated_webp_first_frame() -> None:
    first, *rest = _two_frames()
    data = encode(first, "WEBP", save_all=True, append_images=rest, lossless=True, duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == RED


def test_animated_png_first_frame() -> None:
    first, *rest = _two_frames()
    out = load_image(encode(first, "PNG", save_all=True, append_images=rest))
    assert out.getpixel((5, 5)) == RED


def test_gif_transparency_becomes_white() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    out = load_image(encode(img, "GIF", transparency=1))
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((3, 3)) == WHITE


def _palette_image() -> Image.Image:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putpixel((1, 0), 1)
    img.putpixel((0, 1), 2)
    return img


def test_palette_png() -> None:
    out = load_image(encode(_palette_image(), "PNG"))
    assert out.mode == "RGB"
    assert [out.getpixel(p) for p in [(0, 0), (1, 0), (0, 1)]] == [RED, (0, 255, 0), (0, 0, 255)]


def test_palette_png_with_transparency() -> None:
    # index 0 (red) fully transparent, index 1 (green) opaque, index 2 (blue) half transparent
    data = encode(_palette_image(), "PNG", transparency=bytes([0, 255, 128]))
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (0, 255, 0)
    assert close(out.getpixel((0, 1)), (127, 127, 255), 2)


def test_rgba_transparent_red_becomes_white_opaque_red_stays() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # hidden red under full transparency
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    out = load_image(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE  # not the hidden red that convert("RGB") reveals
    assert out.getpixel((1, 0)) == RED
    assert close(out.getpixel((2, 0)), (255, 127, 127), 2)


def test_rgba_transparency_survives_downscale() -> None:
    img = Image.new("RGBA", (8192, 8), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (4096, 0, 8192, 8))
    out = load_image(encode(img, "PNG"))
    assert out.size == (4096, 4)
    assert out.getpixel((100, 2)) == WHITE
    assert close(out.getpixel((4000, 2)), (0, 0, 255), 2)


def test_rgb_png_colour_key_becomes_white() -> None:
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), (0, 255, 0))
    out = load_image(encode(img, "PNG", transparency=RED))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (0, 255, 0)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 128), (65535, 255), (257 * 7, 7)])
def test_16bit_png_scaled_not_clipped(value: int, expected: int) -> None:
    data = encode(Image.fromarray(np.full((4, 4), value, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (expected,) * 3


def test_16bit_png_with_colour_key() -> None:
    values = np.full((2, 2), 32768, np.uint16)
    values[0, 0] = 1000
    out = load_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == (128, 128, 128)


def test_32bit_int_tiff_read_as_16bit() -> None:
    data = encode(Image.fromarray(np.full((4, 4), 32768, np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert load_image(data).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(("value", "expected"), [(0.5, 128), (1.0, 255)])
def test_float_tiff(value: float, expected: int) -> None:
    values = np.full((4, 4), value, np.float32)
    values[0, 0] = 0.0
    out = load_image(encode(Image.fromarray(values), "TIFF"))
    assert out.getpixel((1, 1)) == (expected,) * 3
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_grayscale_l() -> None:
    out = load_image(encode(Image.new("L", (4, 4), 77), "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_grayscale_la_transparency() -> None:
    img = Image.new("LA", (2, 1), (40, 255))
    img.putpixel((1, 0), (40, 0))
    out = load_image(encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (40, 40, 40)
    assert out.getpixel((1, 0)) == WHITE


def test_one_bit() -> None:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((1, 1), 1)
    for fmt in ("PNG", "BMP", "TIFF"):
        out = load_image(encode(img, fmt))
        assert out.mode == "RGB"
        assert out.getpixel((1, 1)) == WHITE
        assert out.getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB"
    assert close(out.getpixel((8, 8)), RED, 4)


def test_ycbcr_tiff() -> None:
    data = encode(Image.new("RGB", (8, 8), RED).convert("YCbCr"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    out = load_image(data)
    assert out.mode == "RGB"
    assert close(out.getpixel((4, 4)), RED, 4)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        (fmt, mode)
        for fmt in FORMATS
        for mode in ("RGB", "L", "RGBA")
        if not (mode == "RGBA" and fmt in ("JPEG", "BMP"))  # no alpha in those formats
    ],
)
def test_one_by_one(fmt: str, mode: str) -> None:
    colour = {"RGB": (10, 20, 30), "L": 90, "RGBA": (10, 20, 30, 255)}[mode]
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(encode(Image.new(mode, (1, 1), colour), fmt, **params))
    assert out.mode == "RGB"
    assert out.size == (1, 1)
    expected = (90, 90, 90) if mode == "L" else (10, 20, 30)
    assert close(out.getpixel((0, 0)), expected, 6 if fmt in ("JPEG", "GIF") else 0)


def test_mpo_is_accepted_as_jpeg() -> None:
    first, *rest = _two_frames()
    out = load_image(encode(first, "MPO", save_all=True, append_images=rest, quality=95))
    assert close(out.getpixel((5, 5)), RED, 4)


# --- resource hygiene -------------------------------------------------------------------------


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_result_is_loaded_and_detached(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", encode(Image.new("RGB", (64, 48), RED), "PNG"))
    before = _open_fd_count()
    out = load_image(path)
    assert _open_fd_count() == before  # file closed
    assert type(out) is Image.Image  # not a file-backed plugin object
    assert getattr(out, "fp", None) is None
    path.unlink()
    assert out.mode == "RGB"
    assert out.getpixel((63, 47)) == RED  # pixels owned by the image
    assert_refused(encode(_photo(), "PNG")[:500], "damaged")
    assert _open_fd_count() == before  # also closed on failure


def test_never_spawns_or_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import subprocess

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not spawn processes")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, forbidden)
    for name in ("system", "popen", "fork", "posix_spawn", "posix_spawnp", "execv", "execvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, forbidden)
    real_open, real_os_open = builtins.open, os.open

    def read_only_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        assert not set(mode) & set("wax+"), f"must not write files: {file} {mode}"
        return real_open(file, mode, *args, **kwargs)

    def read_only_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) == 0, f"must not write: {path}"
        return real_os_open(path, flags, *args, **kwargs)

    files = {
        fmt: write(tmp_path, f"x.{fmt.lower()}", encode(_photo(40, 30), fmt)) for fmt in FORMATS
    }
    listing = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(os, "open", read_only_os_open)
    for path in files.values():
        assert load_image(path).size == (40, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_bytes_like_inputs() -> None:
    data = encode(Image.new("RGB", (3, 2), RED), "PNG")
    for source in (data, bytearray(data), memoryview(data)):
        assert load_image(source).getpixel((2, 1)) == RED  # type: ignore[arg-type]


def test_path_as_str_and_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path, "a.bmp", encode(Image.new("RGB", (3, 2), RED), "BMP"))
    assert load_image(str(path)).getpixel((0, 0)) == RED
    assert load_image(path).getpixel((0, 0)) == RED


# --- fuzzing ----------------------------------------------------------------------------------


def _fuzz_seeds() -> list[bytes]:
    photo = _photo(48, 32)
    rgba = photo.convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    first, *rest = _two_frames()
    return [
        encode(photo, "PNG"),
        encode(rgba, "PNG"),
        encode(_palette_image(), "PNG", transparency=bytes([0, 255, 128])),
        encode(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG"),
        encode(photo, "JPEG", quality=80),
        encode(photo, "JPEG", progressive=True, exif=exif),
        encode(photo.convert("CMYK"), "JPEG"),
        encode(photo, "GIF"),
        encode(first, "GIF", save_all=True, append_images=rest),
        encode(photo, "WEBP"),
        encode(rgba, "WEBP", lossless=True),
        encode(photo, "BMP"),
        encode(photo, "TIFF"),
        encode(photo, "TIFF", compression="tiff_lzw"),
        encode(photo.convert("1"), "TIFF", compression="group4"),
    ]


FUZZ_SEEDS = _fuzz_seeds()
MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"RIFF\x00\x10\x00\x00WEBPVP8L",
]


def _corrupt(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutable = bytearray(data)
    for offset, value in edits:
        mutable[offset % len(mutable)] = value
    if cut is not None:
        del mutable[cut % len(mutable) + 1 :]
    return bytes(mutable)


FUZZ_INPUTS = st.one_of(
    st.binary(min_size=0, max_size=2048),
    st.builds(bytes.__add__, st.sampled_from(MAGICS), st.binary(max_size=2048)),
    st.builds(
        _corrupt,
        st.sampled_from(FUZZ_SEEDS),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6),
        st.one_of(st.none(), st.integers(0, 2**20)),
    ),
)


@pytest.mark.fuzz
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=FUZZ_INPUTS)
def test_fuzz_only_rgb_or_input_error(data: bytes) -> None:
    try:
        out = load_image(data)
    except InputError as exc:
        assert str(exc)  # a message for the user, never empty
        return
    assert type(out) is Image.Image
    assert out.mode == "RGB"
    assert 1 <= min(out.size)
    assert max(out.size) <= MAX_SIDE_AFTER_LOAD


def test_fuzz_seeds_are_valid() -> None:
    for seed in FUZZ_SEEDS:
        assert load_image(seed).mode == "RGB"
