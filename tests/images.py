"""Test images, generated with Pillow (no fixtures on disk), and data URLs of them.

Shared by the server-level tests (test_reliability.py, test_soak.py)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

from PIL import Image


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def png_url(image: Image.Image) -> str:
    return data_url(encode(image))


def image_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    """`image` saved as `fmt`, as a data URL with the matching MIME type."""
    return data_url(encode(image, fmt, **save), f"image/{fmt.lower()}")


def gradient(size: tuple[int, int] = (96, 64)) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size)
    image.putdata([(x * 255 // w, y * 255 // h, (x + y) % 256) for y in range(h) for x in range(w)])
    return image


def noise_png(nbytes: int) -> bytes:
    """A PNG of random pixels (incompressible) of about `nbytes` bytes: distinct every call."""
    side = max(1, int((nbytes / 3) ** 0.5))
    return encode(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)), "PNG")


def red_square_on(background: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (64, 48), background)
    image.paste((255, 0, 0, 255)[: len(mode)], (16, 12, 48, 36))
    return image


def half(payload: bytes) -> bytes:
    """The first half of a file: an upload that was cut off."""
    return payload[: len(payload) // 2]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit greyscale PNG header declaring width x height; `rows` zero rows of real data
    (compressed ~1000:1, so a real 9000 x 9000 bomb is ~80 KB), or a few bytes if None."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(rows or 1)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
