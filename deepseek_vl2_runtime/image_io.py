"""Turn an untrusted image upload into a PIL RGB image the model's preprocessing can use.

`load_image` is the only entry point. It accepts what Cog hands over (a file path) or raw
`bytes`, and either returns a fully decoded, file-detached ``mode == "RGB"`` image or raises
`InputError` with a message the end user can act on. Whatever the bytes are, it must not crash
the process, hang, allocate memory out of proportion to the limits below, write files, or spawn
processes.

How the work is bounded (all checks are per call; no Pillow global is read for our limits or
changed):

* **Bytes.** The file size is taken from ``fstat`` before anything is read, and files larger
  than ``max_bytes`` are refused. Non-regular files (directories, FIFOs, devices such as
  ``/dev/zero``) are refused too: they have no meaningful size and reading them can block or
  never end. The file is opened with ``O_NONBLOCK`` so that even a FIFO swapped in after a check
  cannot block the open.
* **Pixels (decompression bombs).** ``Image.open`` is lazy: it parses only the header. The
  declared width x height is checked against ``max_pixels`` *before* ``load()`` allocates and
  decodes, so a few-KB PNG declaring 20000 x 20000 is refused without allocating 400 MB.
  Pillow's own ``DecompressionBombError`` (raised inside ``Image.open`` above twice its global
  ``Image.MAX_IMAGE_PIXELS``) and ``DecompressionBombWarning`` (when a caller has turned
  warnings into errors) are translated into the same `InputError`.
* **Formats.** Only `SUPPORTED_FORMATS` are given to ``Image.open(formats=...)``. This keeps
  Pillow's more permissive or riskier plugins out of reach: e.g. the EPS plugin runs Ghostscript
  in a subprocess, and the TGA plugin accepts almost any byte string as a header.
* **Truncation.** ``load()`` forces the full decode, and Pillow raises on a truncated stream as
  long as the global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default, which we never
  change), so a partial upload is reported instead of silently returning grey/black rows.

What the returned image looks like:

* **Orientation.** The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the
  pixels the model sees -- and the coordinates of any grounding boxes it outputs -- match what
  the user sees in an image viewer. A damaged EXIF block is ignored rather than refused (viewers
  ignore it too).
* **Animation.** Animated GIF / WebP / APNG and multi-page TIFF: the first frame only.
* **Transparency.** Images with an alpha channel or a transparent colour key (RGBA, LA, PA,
  palette or RGB/L PNGs with tRNS, GIF transparency) are composited over a **white** background,
  which is what image viewers and browsers show on a light page. The official DeepSeek-VL2 code
  calls ``convert("RGB")``, which simply drops alpha and so reveals whatever colour happens to be
  stored under fully transparent pixels (often black, sometimes garbage) -- text on a
  transparent PNG can then become invisible black-on-black.
* **Bit depth.** 16-bit greyscale (Pillow modes ``I;16*`` and ``I``) is scaled to 8-bit
  (value / 257, rounded); Pillow's own ``convert("L")`` clips at 255, which turns every 16-bit
  image white. 32-bit float (``F``) images are mapped from [0, 1] if they lie in it, otherwise
  min-max normalised. Other modes (1, L, P, CMYK, YCbCr, LAB, HSV, ...) use Pillow's
  conversion to RGB. Embedded ICC profiles are not applied (the pixel values are used as sRGB).
* **Size.** Images whose longer side exceeds `MAX_SIDE_AFTER_LOAD` are downscaled (aspect ratio
  kept) so that it equals `MAX_SIDE_AFTER_LOAD`; JPEGs are first decoded at a reduced DCT scale
  (``draft``) so a large photo is never decoded at full size. A downscaled image records its
  full, upright size in ``info["source_size"]`` (`SOURCE_SIZE`), so that the model's tiling can
  be chosen as for the original (see `MAX_SIDE_AFTER_LOAD`).
"""

import contextlib
import io
import os
import stat
from typing import BinaryIO, Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deepseek_vl2_runtime.errors import InputError

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_SIDE_AFTER_LOAD",
    "SOURCE_SIZE",
    "SUPPORTED_FORMATS",
    "load_image",
]

SUPPORTED_FORMATS: Final[tuple[str, ...]] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format names accepted; everything else is refused with a message listing these.

These cover what users actually send a chat model (phone photos, screenshots, web images, scans
and documents). JPEG includes MPO (multi-picture JPEGs from some cameras), which Pillow's JPEG
plugin opens; PNG includes APNG. Deliberately absent: EPS/PS (Pillow shells out to Ghostscript),
PDF (no Pillow reader), ICO/PSD/TGA and the other rare formats (extra decoder surface for no
user value). HEIC/AVIF need plugins we do not ship.
"""

MAX_IMAGE_PIXELS: Final[int] = 8192 * 8192
"""Largest declared width x height accepted: 67,108,864 pixels (64 Mi-pixels, 8192 x 8192).

Large enough for any screenshot and for full-resolution 48/50-megapixel phone photos
(8000 x 6000, 8160 x 6120); the model never uses more than 3456 px per side anyway. It bounds
the decode buffer at 256 MiB for the widest mode we decode (4 bytes/pixel: RGBA, 32-bit int),
and the whole call at roughly three such buffers at its peak (decode, mode conversion,
downscale). It is below Pillow's default bomb threshold (``Image.MAX_IMAGE_PIXELS`` =
89,478,485), so with default settings Pillow does not warn before our own check refuses.
"""

MAX_IMAGE_BYTES: Final[int] = 50 * 1024 * 1024
"""Largest file accepted: 50 MiB (52,428,800 bytes).

A 64-megapixel JPEG at high quality is ~20-30 MB and screenshots are far smaller; uncompressed
BMP/TIFF at the pixel limit could be larger, but such files are better re-saved as PNG/JPEG
than uploaded to a chat model. Checked from the file's size before any byte is read.
"""

MAX_SIDE_AFTER_LOAD: Final[int] = 4096
"""Images are downscaled so that their longer side is at most this many pixels.

Why 4096: DeepSeek-VL2's largest tiling canvas is 9 x 384 = 3456 px on a side. Its tiling
choice (``select_best_resolution``) compares, per candidate canvas, the image's resolution
after fitting into that canvas; as long as the longer side stays >= 3456, every canvas needs a
downscale, and the fitted resolution then depends only on the aspect ratio, not on the
absolute size. So downscaling to 4096 (> 3456) caps the memory and time of everything
downstream (mode conversion, the model's own resize) and keeps the tiling choice -- except that
the comparison uses integer-truncated fits, so rounding the short side by under a pixel can flip
it (a 3:2 photo of 6000 x 4000 becomes 4096 x 2731, which would get a 3 x 3 canvas instead of
the original's 3 x 2). Hence `SOURCE_SIZE`: the pipeline corrects such flips.
"""

SOURCE_SIZE: Final[str] = "source_size"
"""``info`` key of a downscaled image: its (width, height) before downscaling, upright."""

_WHITE: Final[tuple[int, int, int]] = (255, 255, 255)
_RESAMPLE: Final = Image.Resampling.LANCZOS
# Resize first by an integer box reduction while the remaining factor is > 3, then LANCZOS:
# Pillow documents 3.0 as indistinguishable from a full-size LANCZOS, at a fraction of the cost.
_REDUCING_GAP: Final[float] = 3.0
_SIXTEEN_BIT_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HEADER_SNIFF_BYTES: Final[int] = 512

_SUPPORTED_LIST: Final[str] = ", ".join(SUPPORTED_FORMATS)
_TRY_AGAIN: Final[str] = (
    f"Supported formats: {_SUPPORTED_LIST}. "
    "Please convert the image to one of these formats and upload it again."
)


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """Decode an untrusted upload into a fully loaded, file-detached RGB image.

    Args:
        source: path to the uploaded file (what Cog passes), or the file's bytes
            (``bytearray``/``memoryview`` are accepted as well).
        max_pixels: refuse images whose header declares more than this many pixels.
        max_bytes: refuse inputs larger than this many bytes.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``, orientation applied, transparency composited
        over white, longer side at most `MAX_SIDE_AFTER_LOAD`. It is not backed by the file
        (which is closed on return), so the caller may delete the file.

    Raises:
        InputError: for anything wrong with the upload; the message says what and what to do.
        TypeError / ValueError: for a programming error (wrong ``source`` type, non-positive
            limit) -- these are the caller's bug, not the user's.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")

    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        _check_byte_size(size, max_bytes)
        with io.BytesIO(source) as fp:
            return _decode(fp, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike)):
        with _open_regular_file(source, max_bytes) as fp:
            return _decode(fp, max_pixels=max_pixels)
    raise TypeError(
        f"load_image() expects a path or bytes, got {type(source).__name__}",
    )


def _check_byte_size(size: int, max_bytes: int) -> None:
    """Refuse empty and over-large inputs, before any byte is read."""
    if size == 0:
        raise InputError(
            "The uploaded image file is empty (0 bytes). Please upload the image again; "
            f"supported formats: {_SUPPORTED_LIST}."
        )
    if size > max_bytes:
        raise InputError(
            f"The uploaded image file is {size:,} bytes, which is more than the limit of "
            f"{max_bytes:,} bytes ({max_bytes / 2**20:.0f} MiB). Please upload a smaller file, "
            "for example by re-saving it as JPEG or reducing its resolution."
        )


def _open_regular_file(path: str | os.PathLike[str], max_bytes: int) -> BinaryIO:
    """Open ``path`` for reading after checking it is a regular file of acceptable size.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    type and size checks use ``fstat`` on the opened descriptor, so they describe the very file
    that will be read (no check-then-open race).
    """
    flags = (
        os.O_RDONLY
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(
            "The uploaded image file could not be found on the server. Please upload it again."
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        raise InputError(
            "The uploaded image file could not be opened. Please upload it again."
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                "The upload is not a regular image file (it is a directory, pipe or device). "
                "Please upload an image file."
            )
        _check_byte_size(info.st_size, max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(fp: BinaryIO, *, max_pixels: int) -> Image.Image:
    """Identify, bound-check, decode and normalise the image in ``fp`` (positioned at 0).

    Pillow's plugins raise a wide and undocumented set of exception types on malformed input
    (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
    TypeError, ZeroDivisionError, ...). The contract of this module is that only `InputError`
    leaves it, so every Pillow call below runs under a broad ``except Exception`` that turns
    the failure into a user-facing message (the original is chained as ``__cause__`` for logs).
    """
    try:
        header = fp.read(_HEADER_SNIFF_BYTES)
        fp.seek(0)
    except OSError as exc:
        raise InputError(
            "The uploaded image file could not be read. Please upload it again."
        ) from exc
    try:
        img = Image.open(fp, formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(_unidentified_message(header)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(_too_many_pixels_message(None, max_pixels)) from exc
    except MemoryError as exc:
        raise InputError(_out_of_memory_message()) from exc
    except Exception as exc:
        raise InputError(_damaged_message(_sniff_supported(header))) from exc

    with img:
        fmt = img.format or _sniff_supported(header)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InputError(_damaged_message(fmt))
        if width * height > max_pixels:
            raise InputError(_too_many_pixels_message((width, height), max_pixels))
        try:
            return _load_and_normalise(img)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(_too_many_pixels_message((width, height), max_pixels)) from exc
        except MemoryError as exc:
            raise InputError(_out_of_memory_message()) from exc
        except Exception as exc:
            raise InputError(_damaged_message(fmt)) from exc


def _load_and_normalise(img: Image.Image) -> Image.Image:
    """Decode ``img`` (size already checked) and return a new, detached RGB image."""
    source = img.size  # before any draft
    if img.format in ("JPEG", "MPO"):
        # DCT-domain downscale by 1/2, 1/4 or 1/8 during decoding; Pillow picks the largest
        # factor that keeps the result >= the requested size, so quality is unaffected.
        draft_target = _target_size(img.size)
        if draft_target != img.size:
            img.draft("RGB", draft_target)
    img.load()  # full decode: raises on truncated data

    stored = img.size
    with contextlib.suppress(Exception):  # damaged EXIF: show the pixels as stored, as viewers do
        ImageOps.exif_transpose(img, in_place=True)
    if img.size != stored:  # rotated by 90 degrees
        source = source[::-1]

    # Resize while still 1-2 channels where possible (greyscale stays 1/3 the size), and
    # before flattening alpha (Pillow's resize premultiplies alpha for RGBA/LA, so
    # transparent pixels' hidden colours do not bleed into their neighbours).
    out = _to_8bit(img)
    target = _target_size(out.size)
    if out.size != target:
        out = out.resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if out.mode == "LA":
        out = out.convert("RGBA")
    if out.mode == "RGBA":
        out = _composite_over_white(out)
    elif out.mode != "RGB":
        out = out.convert("RGB")
    if out is img:
        # Still the file-backed plugin object (an RGB image needing no change): copy so the
        # result owns its pixels and holds no reference to the (soon closed) file.
        out = img.copy()
    if out.size != source:
        out.info[SOURCE_SIZE] = source
    return out


def _to_8bit(img: Image.Image) -> Image.Image:
    """Map any Pillow mode to one of "L", "LA", "RGB", "RGBA" (straight alpha).

    The result is one that Pillow resizes with a real filter: "1" and "P" are resized with
    NEAREST only, so they must be expanded first. Transparency of any kind -- an alpha channel,
    an RGBA palette, or a tRNS / GIF transparent colour key (``info["transparency"]``) --
    becomes an alpha channel.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_8bit(img)
    elif img.mode == "F":
        img = _float_to_8bit(img)
    elif img.mode == "La":  # premultiplied; Pillow converts it only to LA
        img = img.convert("LA")

    if img.mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in img.info:
        return img
    if img.mode in ("1", "L") and not img.has_transparency_data:
        return img.convert("L")
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        return img.convert("RGBA")
    return img.convert("RGB")


_ROWS_PER_CHUNK: Final[int] = 512


def _sixteen_bit_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (or 32-bit int, read as 16-bit) to L, or LA if it has a colour key.

    value / 257 rounded maps 0 -> 0, 32768 -> 128, 65535 -> 255 exactly. Mode "I" is
    what Pillow gives for 16-bit data in some formats (and for 32-bit TIFFs); values outside
    0..65535 are clipped. Converted in row chunks so the 32-bit temporaries stay small.
    """
    values = np.asarray(img)
    eight = np.empty(values.shape, np.uint8)
    for start in range(0, values.shape[0], _ROWS_PER_CHUNK):
        block = values[start : start + _ROWS_PER_CHUNK].astype(np.int64)
        np.clip(block, 0, 65535, out=block)
        block += 128
        block //= 257
        eight[start : start + _ROWS_PER_CHUNK] = block
    key = img.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack((eight, alpha)))  # -> "LA"
    return Image.fromarray(eight)  # -> "L"


def _float_to_8bit(img: Image.Image) -> Image.Image:
    """32-bit float greyscale to L: [0, 1] data scaled by 255, anything else min-max scaled."""
    values = np.array(img, dtype=np.float32)  # a private copy, modified in place below
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        values *= 255.0
    elif high > low:
        values -= low
        values *= 255.0 / (high - low)
    else:
        values[...] = 0.0
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    """Flatten straight-alpha RGBA onto white: out = a * colour + (1 - a) * white."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _target_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled (aspect kept, each side >= 1) so its longer side is <= MAX_SIDE_AFTER_LOAD."""
    width, height = size
    longer = max(width, height)
    if longer <= MAX_SIDE_AFTER_LOAD:
        return size
    scale = MAX_SIDE_AFTER_LOAD / longer
    if width >= height:
        return MAX_SIDE_AFTER_LOAD, max(1, round(height * scale))
    return max(1, round(width * scale)), MAX_SIDE_AFTER_LOAD


# --- user-facing messages -------------------------------------------------------------------

# Signatures of formats we support, to tell "damaged PNG" from "not an image at all".
_SUPPORTED_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Formats people plausibly upload that we refuse, so the message can name what they sent.
_UNSUPPORTED_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"%PDF", "PDF documents"),
    (b"8BPS", "Photoshop (PSD) files"),
    (b"%!PS", "PostScript/EPS files"),
    (b"\xc5\xd0\xd3\xc6", "EPS files"),
    (b"\xff\x0a", "JPEG XL images"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL images"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 images"),
    (b"\xffO\xffQ", "JPEG 2000 images"),
    (b"DDS ", "DDS textures"),
    (b"qoif", "QOI images"),
    (b"PK\x03\x04", "ZIP archives (and Office documents)"),
)
_HEIF_BRANDS: Final[frozenset[bytes]] = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
)
_AVIF_BRANDS: Final[frozenset[bytes]] = frozenset({b"avif", b"avis"})


def _sniff_supported(header: bytes) -> str | None:
    """The supported format whose signature ``header`` starts with, if any."""
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SUPPORTED_SIGNATURES:
        if header.startswith(signature):
            return name
    return None


def _sniff_unsupported(header: bytes) -> str | None:
    """A plural description of a recognised but unsupported file type, if any."""
    if header[4:8] == b"ftyp":
        brand = header[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF photos"
        if brand in _AVIF_BRANDS:
            return "AVIF images"
        return "Video files (MP4/MOV)"
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if header.startswith(signature):
            return name
    # ICO/CUR: 4-byte signature plus a non-zero image count (an uncompressed TGA header can
    # start with the same 4 bytes, but then has zeros there).
    if header[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and header[4:6] != b"\0\0":
        return "Windows icon (ICO/CUR) files"
    text = header.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):
        if b"<svg" in text:
            return "SVG (vector) images"
        if b"<html" in text or b"<!doctype html" in text:
            return "Web pages (HTML)"
    return None


def _unidentified_message(header: bytes) -> str:
    supported = _sniff_supported(header)
    if supported is not None:
        return (
            f"The file looks like a {supported} image, but its header is damaged or incomplete "
            "so it cannot be read. Please re-save the image or upload it again."
        )
    unsupported = _sniff_unsupported(header)
    if unsupported is not None:
        return f"{unsupported} are not supported. {_TRY_AGAIN}"
    return f"The uploaded file is not a recognised image. {_TRY_AGAIN}"


def _damaged_message(fmt: str | None) -> str:
    what = f"{fmt} image" if fmt else "image"
    return (
        f"The {what} is damaged or incomplete (for example, the upload was cut off), so it "
        "cannot be decoded. Please re-save the image or upload it again."
    )


def _too_many_pixels_message(size: tuple[int, int] | None, max_pixels: int) -> str:
    declared = (
        f"is {size[0]:,} x {size[1]:,} = {size[0] * size[1]:,} pixels, which is"
        if size is not None
        else "has"
    )
    return (
        f"The image {declared} more than the limit of {max_pixels:,} pixels. Please downscale "
        f"it (the model uses at most {MAX_SIDE_AFTER_LOAD} pixels on the longer side anyway) "
        "and upload it again."
    )


def _out_of_memory_message() -> str:
    return (
        "The server ran out of memory while decoding this image. Please upload a smaller "
        "image (fewer pixels) or try again later."
    )
