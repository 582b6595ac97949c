"""Parse and draw DeepSeek-VL2 grounding answers.

For grounding prompts the model wraps each object it talks about in special tokens::

    <|ref|>watermelon slices<|/ref|><|det|>[[159, 327, 408, 615], [10, 20, 30, 40]]<|/det|>

and with a ``<|grounding|>`` prompt the same markup appears inside free text::

    Well, take it out to the <|ref|>garbage<|/ref|><|det|>[[12, 300, 200, 999]]<|/det|> bin.

Each box is ``[x1, y1, x2, y2]``: top-left and bottom-right corners as integers 0..999,
normalised to the *original* image size (pixel x = v / 999 * W, pixel y = v / 999 * H).

The upstream parser runs ``eval()`` on the text between the det tags, so a malformed (or
hostile) answer either crashes it or executes code. Here the answer is model output, i.e.
untrusted text: it is scanned with regular expressions only, every malformed piece is dropped
or repaired, and `parse_grounding` never raises. The rules, in one place:

* A det is paired with the ref directly before it; only whitespace (or stray closing tags) may
  sit between them. A det with no such ref is kept with the label ``""`` (the boxes are still
  real model output, e.g. when the user's prompt already named the object).
* A ref with no det, or whose det holds no valid box, is skipped: every returned object has at
  least one box, so callers never have to handle an empty object.
* Closing tags are optional: an open ref or det ends at the next tag of either kind or at the
  end of the text (a generation cut off by ``max_new_tokens`` still yields its complete boxes).
* A box is the content of an innermost ``[...]``: exactly four comma-separated integers
  (optional sign, ASCII digits, surrounding whitespace). Anything else in it (floats, words,
  three or five numbers, nested brackets) drops that box only; the other boxes are kept.
* Values are clamped into 0..999 (negative -> 0, too large -> 999; arbitrarily long digit
  strings are clamped without converting them, so Python's int-size limits never trigger),
  then corners are ordered so that x1 <= x2 and y1 <= y2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COORD_MAX = 999  # the model's coordinate grid is 0..999 along each axis

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
GROUNDING = "<|grounding|>"

# The capture group makes re.split return the tags too: even indices are text, odd are tags.
_TAG = re.compile(r"(<\|/?(?:ref|det)\|>)")
# Innermost brackets only, so "[[1, 2, 3, 4]]" and "[[[1, 2, 3, 4]]]" give the same box.
_INNER_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_INT = re.compile(r"\s*([+-]?)([0-9]+)\s*")  # [0-9], not \d: int() would accept other digits

# Distinct, saturated colours that read on both light and dark photos; labels cycle through.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # red
    (0, 200, 0),  # green
    (0, 80, 255),  # blue
    (255, 140, 0),  # orange
    (200, 0, 200),  # magenta
    (0, 190, 190),  # cyan
    (150, 90, 0),  # brown
    (120, 0, 255),  # violet
)


@dataclass(frozen=True)
class Box:
    """One box on the model's 0..999 grid: (x1, y1) top-left, (x2, y2) bottom-right.

    The invariants (integers in 0..999, x1 <= x2, y1 <= y2) are checked on construction, so
    code holding a `Box` (the drawer, callers) never re-validates.
    """

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2)
        if not all(type(v) is int and 0 <= v <= COORD_MAX for v in values):
            raise ValueError(f"box coordinates must be ints in 0..{COORD_MAX}, got {values}")
        if self.x1 > self.x2 or self.y1 > self.y2:
            raise ValueError(f"box corners out of order (need x1 <= x2, y1 <= y2): {values}")

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel corners in a width x height image; see `to_pixels`."""
        return to_pixels(self, width, height)


@dataclass(frozen=True)
class GroundedObject:
    """A label and the boxes the model gave for it (always at least one box)."""

    label: str
    boxes: tuple[Box, ...]


def to_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Map a 0..999 box to inclusive pixel corners (x1, y1, x2, y2) of a width x height image.

    Uses floor(v * W / 999) like the upstream drawer's ``int(v / 999 * W)``, but in exact
    integer arithmetic (the float version is occasionally one pixel lower). v = 999 maps to W,
    one past the last pixel, so results are clamped into [0, W-1] x [0, H-1]: every corner is
    a valid pixel index and ``ImageDraw.rectangle`` (inclusive corners) draws it on-image.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    def scale(v: int, size: int) -> int:
        return min(v * size // COORD_MAX, size - 1)

    return (
        scale(box.x1, width),
        scale(box.y1, height),
        scale(box.x2, width),
        scale(box.y2, height),
    )


def _coord(item: str) -> int | None:
    """One coordinate, clamped into 0..999, or None if `item` is not a plain integer."""
    m = _INT.fullmatch(item)
    if m is None:
        return None
    sign, digits = m.groups()
    digits = digits.lstrip("0") or "0"
    if sign == "-" and digits != "0":
        return 0
    # More than 3 significant digits is >= 1000: clamp without int(), which refuses huge strings.
    return COORD_MAX if len(digits) > 3 else min(int(digits), COORD_MAX)


def _parse_boxes(body: str) -> tuple[Box, ...]:
    """The valid boxes in the text of one det, in order; invalid ones are dropped."""
    boxes = []
    for group in _INNER_BRACKETS.findall(body):
        values = [_coord(item) for item in group.split(",")]
        coords = [v for v in values if v is not None]
        if len(values) != 4 or len(coords) != 4:
            continue
        x1, y1, x2, y2 = coords
        boxes.append(Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return tuple(boxes)


def _pieces(text: str) -> Iterator[tuple[bool, str]]:
    """Split `text` into (is_tag, piece) pairs, tags being the four ref/det tags."""
    for i, piece in enumerate(_TAG.split(text)):
        yield i % 2 == 1, piece


def parse_grounding(text: str) -> list[GroundedObject]:
    """All grounded objects in a model answer, in order of appearance. Never raises.

    See the module docstring for how malformed markup is handled.
    """
    if not isinstance(text, str):
        return []
    objects: list[GroundedObject] = []
    label: str | None = None  # label of the last ref, while a det may still attach to it
    inside: str | None = None  # the tag whose content we are reading: REF_OPEN or DET_OPEN
    body = ""

    def close() -> None:
        # End the open ref/det (explicitly or implicitly: closing tags are optional).
        nonlocal label, inside, body
        if inside == REF_OPEN:
            label = body.strip()
        elif inside == DET_OPEN:
            boxes = _parse_boxes(body)
            if boxes:
                objects.append(GroundedObject(label or "", boxes))
            label = None
        inside, body = None, ""

    for is_tag, piece in _pieces(text):
        if not is_tag:
            if inside is not None:
                body = piece
            elif piece.strip():
                label = None  # real text between a ref and a det: they are not a pair
            continue
        close()
        if piece == REF_OPEN:
            inside, label = REF_OPEN, None
        elif piece == DET_OPEN:
            inside = DET_OPEN
    close()
    return objects


def strip_grounding(text: str) -> str:
    """The answer as plain text: labels kept, tags, box lists and ``<|grounding|>`` removed.

    "the <|ref|>garbage<|/ref|><|det|>[[...]]<|/det|> bin" becomes "the garbage bin". Follows
    the same rules as `parse_grounding` (a det's content ends at the next tag), never raises.
    """
    if not isinstance(text, str):
        return ""
    out = []
    in_det = False
    for is_tag, piece in _pieces(text):
        if is_tag:
            in_det = piece == DET_OPEN
        elif not in_det:
            out.append(piece)
    return "".join(out).replace(GROUNDING, "")


def _load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at `size`; the fixed-size bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background` (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_grounding(
    image: Image.Image,
    objects: Iterable[GroundedObject],
    *,
    line_width: int | None = None,
    font_size: int | None = None,
    max_label_chars: int = 60,
) -> Image.Image:
    """A new RGB copy of `image` with every box outlined and labelled; `image` is not changed.

    `image` must be the image the model saw, at its original size and orientation, because the
    boxes are normalised to it. Each distinct label gets the next `PALETTE` colour (cycling), so
    all boxes of one object share a colour. Boxes are drawn first and labels on top of them,
    so a label is never hidden by a neighbouring box. A label sits on a filled background just
    above its box, or just inside the box's top edge when there is no room above.
    """
    out = image.convert("RGB")
    if out is image:  # convert() copies today; never draw on the caller's image regardless
        out = image.copy()
    width, height = out.size
    lw = line_width if line_width is not None else max(2, min(width, height) // 200)
    font = _load_font(font_size if font_size is not None else max(12, min(width, height) // 32))
    draw = ImageDraw.Draw(out)

    colours: dict[str, tuple[int, int, int]] = {}
    labelled: list[tuple[str, tuple[int, int, int, int], tuple[int, int, int]]] = []
    for obj in objects:
        colour = colours.setdefault(obj.label, PALETTE[len(colours) % len(PALETTE)])
        for box in obj.boxes:
            corners = to_pixels(box, width, height)
            draw.rectangle(corners, outline=colour, width=lw)
            labelled.append((obj.label, corners, colour))

    for label, (x1, y1, _, _), colour in labelled:
        text = " ".join(label.split())  # one line: newlines/tabs in a label would break layout
        if len(text) > max_label_chars:
            text = text[: max_label_chars - 3] + "..."
        if not text:
            continue
        if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font is Latin-1 only
            text = text.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, lw)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = max(0, min(x1, width - box_w))
        ty = y1 - box_h if y1 - box_h >= 0 else min(y1 + lw, max(0, height - box_h))
        draw.rectangle((tx, ty, tx + box_w - 1, ty + box_h - 1), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_colour(colour), font=font)
    return out
