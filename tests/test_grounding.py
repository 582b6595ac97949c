"""Tests for deepseek_vl2_runtime.grounding: tolerant parsing of model output, and drawing."""

import builtins
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl2_runtime.grounding import (
    COORD_MAX,
    PALETTE,
    Box,
    GroundedObject,
    draw_grounding,
    parse_grounding,
    strip_grounding,
    to_pixels,
)

GREY = (128, 128, 128)


def fmt(objects: list[GroundedObject]) -> str:
    """Format objects the way the model does."""
    return "".join(
        f"<|ref|>{o.label}<|/ref|><|det|>"
        + "["
        + ", ".join(f"[{b.x1}, {b.y1}, {b.x2}, {b.y2}]" for b in o.boxes)
        + "]<|/det|>"
        for o in objects
    )


# --- well-formed answers -----------------------------------------------------------------


def test_single_box():
    text = "<|ref|>watermelon slices<|/ref|><|det|>[[159, 327, 408, 615]]<|/det|>"
    assert parse_grounding(text) == [
        GroundedObject("watermelon slices", (Box(159, 327, 408, 615),))
    ]


def test_multi_box():
    text = "<|ref|>watermelon slices<|/ref|><|det|>[[159, 327, 408, 615], [10, 20, 30, 40]]<|/det|>"
    [obj] = parse_grounding(text)
    assert obj.label == "watermelon slices"
    assert obj.boxes == (Box(159, 327, 408, 615), Box(10, 20, 30, 40))


def test_multi_object():
    text = (
        "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n"
        "<|ref|>dog<|/ref|> <|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|/det|>"
    )
    assert parse_grounding(text) == [
        GroundedObject("cat", (Box(0, 0, 999, 999),)),
        GroundedObject("dog", (Box(1, 2, 3, 4), Box(5, 6, 7, 8))),
    ]


def test_grounding_free_text():
    text = (
        "Well, take it out to the <|ref|>garbage<|/ref|><|det|>[[12, 300, 200, 999]]<|/det|> bin."
    )
    assert parse_grounding(text) == [GroundedObject("garbage", (Box(12, 300, 200, 999),))]
    assert strip_grounding(text) == "Well, take it out to the garbage bin."


def test_free_text_several_objects_and_whitespace():
    text = (
        "A <|ref|>man<|/ref|>\n  <|det|>[[1,2,3,4]]<|/det|> holds a "
        "<|ref|> red cup <|/ref|><|det|>[[ 10 , 20 , 30 , 40 ]]<|/det|>."
    )
    assert parse_grounding(text) == [
        GroundedObject("man", (Box(1, 2, 3, 4),)),
        GroundedObject("red cup", (Box(10, 20, 30, 40),)),
    ]


def test_no_markup():
    assert parse_grounding("") == []
    assert parse_grounding("Just a caption, [1, 2, 3, 4] is not a det.") == []
    assert strip_grounding("plain") == "plain"


def test_strip_grounding_removes_grounding_token_and_unclosed_det():
    assert strip_grounding("<|grounding|>a <|ref|>b<|/ref|><|det|>[[1, 2") == "a b"


# --- malformed answers: each documented rule ------------------------------------------------


def test_det_without_ref_gets_empty_label():
    assert parse_grounding("<|det|>[[1, 2, 3, 4]]<|/det|>") == [
        GroundedObject("", (Box(1, 2, 3, 4),))
    ]


def test_text_between_ref_and_det_breaks_pairing():
    text = "<|ref|>cat<|/ref|> and then <|det|>[[1, 2, 3, 4]]<|/det|>"
    assert parse_grounding(text) == [GroundedObject("", (Box(1, 2, 3, 4),))]


def test_second_det_after_one_ref_is_unlabelled():
    text = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|det|>[[5, 6, 7, 8]]<|/det|>"
    assert parse_grounding(text) == [
        GroundedObject("cat", (Box(1, 2, 3, 4),)),
        GroundedObject("", (Box(5, 6, 7, 8),)),
    ]


def test_ref_without_det_is_skipped():
    assert parse_grounding("the <|ref|>cat<|/ref|> sat") == []
    assert parse_grounding("<|ref|>cat<|/ref|><|ref|>dog<|/ref|><|det|>[[1,2,3,4]]<|/det|>") == [
        GroundedObject("dog", (Box(1, 2, 3, 4),))
    ]


def test_det_with_no_valid_box_is_skipped():
    assert parse_grounding("<|ref|>cat<|/ref|><|det|>[[a, b, c, d]]<|/det|>") == []
    assert parse_grounding("<|ref|>cat<|/ref|><|det|><|/det|>") == []


@pytest.mark.parametrize(
    "text",
    [
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]",  # det never closed (cut-off generation)
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]], [5, 6",  # cut off inside the next box
        "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>",  # ref never closed: ends at the det
        "<|ref|>cat<|/det|><|det|>[[1, 2, 3, 4]]<|/det|>",  # wrong closing tag
        "<|ref|>cat<|/ref|><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>",  # stray closing tag between
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|/det|><|/ref|>",  # stray closers after
        "<|ref|>cat<|/ref|><|det|>[[[1, 2, 3, 4]]]<|/det|>",  # extra nesting
        "<|ref|>cat<|/ref|><|det|>[1, 2, 3, 4]<|/det|>",  # no outer list
        "<|ref|>cat<|/ref|><|det|>junk [[1, 2, 3, 4]] more junk]]<|/det|>",
    ],
)
def test_tolerated_markup(text):
    assert parse_grounding(text) == [GroundedObject("cat", (Box(1, 2, 3, 4),))]


@pytest.mark.parametrize(
    "bad_box",
    [
        "[1, 2, 3]",  # too few numbers
        "[1, 2, 3, 4, 5]",  # too many
        "[1, 2, 3, 4,]",  # trailing comma: a fifth, empty item
        "[1, 2, x, 4]",  # junk
        "[1.5, 2, 3, 4]",  # not an integer
        "[1, 2, [3], 4]",  # nested bracket inside a box
        "[1 2 3 4]",  # no commas
        "[]",
        "[1, 2, 3, ٤]",  # non-ASCII digit
    ],
)
def test_bad_box_dropped_others_kept(bad_box):
    text = f"<|ref|>cat<|/ref|><|det|>[[10, 20, 30, 40], {bad_box}, [50, 60, 70, 80]]<|/det|>"
    [obj] = parse_grounding(text)
    assert obj.boxes[0] == Box(10, 20, 30, 40)
    assert obj.boxes[-1] == Box(50, 60, 70, 80)
    # "[1, 2, [3], 4]" leaves "[3]" as an innermost group: also invalid, so still two boxes.
    assert len(obj.boxes) == 2


def test_values_clamped_and_corners_ordered():
    text = (
        "<|det|>[[-5, 1000, 99999999999999999999, -99999999999999999999], "
        "[800, 900, 100, 200], [+7, 0007, -0, 999]]<|/det|>"
    )
    [obj] = parse_grounding(text)
    assert obj.boxes == (Box(0, 0, 999, 999), Box(100, 200, 800, 900), Box(0, 7, 7, 999))


def test_gigantic_number_does_not_hit_int_digit_limit():
    # int() refuses strings over ~4300 digits (ValueError); the parser must not call it on them.
    huge = "9" * 100_000
    assert parse_grounding(f"<|det|>[[{huge}, 0, -{huge}, 0{huge}]]<|/det|>") == [
        GroundedObject("", (Box(0, 0, 999, 999),))
    ]


def test_does_not_use_eval(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval must not be used on model output")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    text = "<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], __import__('os').system('true')]<|/det|>"
    assert parse_grounding(text) == [GroundedObject("x", (Box(1, 2, 3, 4),))]


def test_non_str_input_gives_empty():
    assert parse_grounding(None) == []  # type: ignore[arg-type]
    assert strip_grounding(b"<|det|>") == ""  # type: ignore[arg-type]


# --- Box and to_pixels --------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [(-1, 0, 1, 1), (0, 0, 1000, 1), (5, 0, 4, 1), (0, 5, 1, 4), (0.5, 0, 1, 1), (True, 0, 1, 1)],
)
def test_box_rejects_invalid(values):
    with pytest.raises(ValueError, match=r"^box (coordinates must be ints|corners out of order)"):
        Box(*values)


def test_to_pixels():
    assert to_pixels(Box(0, 0, 999, 999), 640, 480) == (0, 0, 639, 479)
    assert Box(159, 327, 408, 615).to_pixels(640, 480) == (
        159 * 640 // 999,
        327 * 480 // 999,
        408 * 640 // 999,
        615 * 480 // 999,
    )
    assert to_pixels(Box(500, 500, 500, 500), 1, 1) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="image size must be positive"):
        to_pixels(Box(0, 0, 1, 1), 0, 10)


@given(
    st.integers(0, COORD_MAX),
    st.integers(0, COORD_MAX),
    st.integers(1, 10_000),
    st.integers(1, 10_000),
)
def test_to_pixels_matches_upstream_and_stays_on_image(v1, v2, w, h):
    lo, hi = sorted((v1, v2))
    x1, y1, x2, y2 = to_pixels(Box(lo, lo, hi, hi), w, h)
    assert 0 <= x1 <= x2 <= w - 1
    assert 0 <= y1 <= y2 <= h - 1
    # Upstream is int(v / 999 * W); ours is the exact floor, at most one pixel away (float error).
    assert 0 <= x1 - min(int(lo / 999 * w), w - 1) <= 1


# --- property tests ----------------------------------------------------------------------

_TOKENS = st.sampled_from(
    ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "[", "]", "[[", "]]", ",",
     ", ", " ", "\n", "-", "+", ".", "x", "<|", "|>", "cat", "0", "7", "999", "1000",
     "99999999999999999999", "\u0661"]  # ARABIC-INDIC DIGIT ONE, a Unicode digit
)  # fmt: skip
_GRAMMAR_TEXT = st.lists(
    st.one_of(_TOKENS, st.integers(-(10**25), 10**25).map(str), st.text(max_size=3)), max_size=60
).map("".join)


def _check_invariants(objects):
    assert isinstance(objects, list)
    for obj in objects:
        assert isinstance(obj, GroundedObject)
        assert isinstance(obj.label, str)
        assert obj.boxes
        for b in obj.boxes:
            assert all(0 <= v <= COORD_MAX for v in (b.x1, b.y1, b.x2, b.y2))
            assert b.x1 <= b.x2
            assert b.y1 <= b.y2


@given(st.text())
def test_never_raises_on_arbitrary_text(text):
    _check_invariants(parse_grounding(text))
    assert isinstance(strip_grounding(text), str)


@settings(max_examples=300)
@given(_GRAMMAR_TEXT)
def test_never_raises_on_tag_soup(text):
    _check_invariants(parse_grounding(text))
    assert "<|det|>" not in strip_grounding(text)


_LABELS = (
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
    .map(str.strip)
    .filter(lambda s: "<|" not in s)  # a label cannot contain a tag
)
_COORDS = st.integers(0, COORD_MAX)
_BOXES = st.tuples(_COORDS, _COORDS, _COORDS, _COORDS).map(
    lambda v: Box(min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3]))
)
_OBJECTS = st.lists(
    st.builds(GroundedObject, _LABELS, st.lists(_BOXES, min_size=1, max_size=5).map(tuple)),
    max_size=5,
)


@given(_OBJECTS)
def test_round_trip(objects):
    assert parse_grounding(fmt(objects)) == objects


@given(_OBJECTS, st.lists(st.text(alphabet="abc ,.!?\n", max_size=10), min_size=6, max_size=6))
def test_round_trip_inside_free_text(objects, filler):
    # Free text around each object (never between a ref and its det) must not change the result.
    text = filler[0] + "".join(fmt([o]) + filler[(i % 5) + 1] for i, o in enumerate(objects))
    assert parse_grounding("<|grounding|>" + text) == objects


# --- drawing ------------------------------------------------------------------------------


def test_draw_outline_on_known_pixels(tmp_path):
    image = Image.new("RGB", (640, 480), GREY)
    box = Box(100, 200, 600, 800)
    x1, y1, x2, y2 = box.to_pixels(640, 480)
    assert (x1, y1, x2, y2) == (64, 96, 384, 384)
    out = draw_grounding(image, [GroundedObject("thing", (box,))])

    assert out is not image
    assert out.mode == "RGB"
    assert out.size == image.size
    assert image.getpixel((x1, y2)) == GREY  # the input is untouched
    red = PALETTE[0]
    # Outline: corners and the middle of every edge (the label only covers the area above y1).
    for p in [(x1, y2), (x2, y2), (x2, y1), ((x1 + x2) // 2, y2), (x1, (y1 + y2) // 2), (x2, (y1 + y2) // 2), ((x1 + x2) // 2, y1)]:  # fmt: skip
        assert out.getpixel(p) == red, p
    lw = max(2, min(640, 480) // 200)
    assert out.getpixel((x1 + lw - 1, (y1 + y2) // 2)) == red  # the line is drawn inward
    # Well inside and well outside the box: unchanged.
    for p in [((x1 + x2) // 2, (y1 + y2) // 2), (x1 + 10, y2 - 10), (x2 + 10, y2 + 10), (5, 470)]:
        assert out.getpixel(p) == GREY, p
    # The label background sits right above the box, in the box colour.
    assert out.getpixel((x1, y1 - 2)) == red

    path = tmp_path / "grounding.png"
    out.save(path)
    with Image.open(path) as reopened:
        assert reopened.size == (640, 480)
        assert reopened.convert("RGB").getpixel((x1, y2)) == red


def test_draw_colours_per_label_and_label_inside_at_top_edge():
    image = Image.new("L", (300, 200), 128)  # not RGB: the result is RGB anyway
    objects = [
        GroundedObject("a", (Box(0, 0, 400, 400), Box(600, 600, 900, 900))),
        GroundedObject("b", (Box(500, 100, 700, 300),)),
        GroundedObject("a", (Box(100, 500, 200, 700),)),
    ]
    out = draw_grounding(image, objects)
    assert out.mode == "RGB"
    assert out.getpixel(to_pixels(objects[0].boxes[1], 300, 200)[2:]) == PALETTE[0]
    assert out.getpixel(to_pixels(objects[1].boxes[0], 300, 200)[2:]) == PALETTE[1]
    assert out.getpixel(to_pixels(objects[2].boxes[0], 300, 200)[2:]) == PALETTE[0]  # same label
    # The first box touches the top edge: its label is drawn inside, just below the top line.
    # The outline is rows 0-1 (width 2); rows 2-3 are the label's top padding, in the box colour.
    assert out.getpixel((3, 2)) == out.getpixel((3, 3)) == PALETTE[0]
    assert out.getpixel((30, 40)) == (128, 128, 128)


def test_draw_palette_cycles_and_odd_labels_do_not_crash():
    labels = [f"l{i}" for i in range(len(PALETTE) + 1)] + ["", "猫\n多行\tlabel", "x" * 500]
    objects = [
        GroundedObject(lab, (Box(10 * i, 10 * i, 10 * i + 50, 10 * i + 50),))
        for i, lab in enumerate(labels)
    ]
    out = draw_grounding(Image.new("RGB", (1, 1)), objects)  # also: a 1x1 image
    assert out.size == (1, 1)
    out = draw_grounding(Image.new("RGB", (400, 400), GREY), objects, line_width=1, font_size=30)
    last = to_pixels(objects[len(PALETTE)].boxes[0], 400, 400)
    assert out.getpixel((last[2], last[3])) == PALETTE[0]  # colour 9 wraps round to colour 1


def test_draw_nothing_is_a_plain_copy():
    image = Image.new("RGB", (50, 40), GREY)
    out = draw_grounding(image, [])
    assert out is not image
    assert out.tobytes() == image.tobytes()


def test_write_example_for_humans():
    """Writes grounding_example.png into the temp directory (/tmp): a 640x480 grid with two
    labelled objects."""
    from PIL import ImageDraw

    image = Image.new("RGB", (640, 480), (200, 200, 200))
    grid = ImageDraw.Draw(image)
    for v in range(0, 1000, 100):  # grid lines every 100 model units, to check placement by eye
        x, y = v * 640 // 999, v * 480 // 999
        grid.line((x, 0, x, 479), fill=(160, 160, 160))
        grid.line((0, y, 639, y), fill=(160, 160, 160))
    text = (
        "<|ref|>watermelon slices<|/ref|><|det|>[[100, 200, 400, 600], [500, 0, 900, 300]]<|/det|>"
        " and <|ref|>garbage<|/ref|><|det|>[[600, 700, 999, 999]]<|/det|>"
    )
    out = draw_grounding(image, parse_grounding(text))
    out.save(Path(tempfile.gettempdir()) / "grounding_example.png")
    assert out.getpixel(to_pixels(Box(100, 200, 400, 600), 640, 480)[2:]) == PALETTE[0]
