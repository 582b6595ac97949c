"""Property: whatever a request holds, the runtime answers with text or an `InputError`.

In-process (no server), on the tiny checkpoint: random image bytes (garbage, corrupted and
valid images of every mode), random prompts (unicode without surrogates, the model's control
tokens, <image> tags, NUL, shell syntax, over-long text) and random parameter values (in and
out of range, NaN, inf, floats for integers) are driven through `load_image` and
`Pipeline.stream`, the path predict.py takes. Any other exception is a bug: on the server it
would surface as an internal error instead of a message the user can act on.
test_image_io.py fuzzes `load_image` alone more deeply.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl2_runtime.errors import InputError
from deepseek_vl2_runtime.image_io import load_image
from deepseek_vl2_runtime.sampling import MAX_SEED, SamplingParams

from paths import tiny_checkpoint

pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.skipif(tiny_checkpoint() is None, reason="tiny checkpoint not found"),
]

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL = [
    "<image>",
    "<image>\n",
    "<|User|>",
    "<|Assistant|>",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>[[1, 2, 3, 4]]<|/det|>",
    "<|grounding|>",
    "<|",
    "|>",
    "\x00",
    "\n\n",
    " ",
    "$(rm -rf /)",
    "`id`",
    "{{7*7}}",
    "\u202e",  # right-to-left override
    "\ufeff",
    "🧪👩‍👩‍👧",
    "漢字",
]
PROMPTS = st.one_of(
    st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL)), max_size=10).map("".join),
    st.integers(0, 2000).map(lambda n: "word " * n),  # up to ~6,000 tokens: past the context
)


def _image_bytes(mode: str, width: int, height: int, fmt: str, frames: int) -> bytes:
    base = Image.new("L", (width, height))
    base.putdata([(x * 7 + y * 13) % 256 for y in range(height) for x in range(width)])
    try:
        image = base.convert(mode)
    except ValueError:  # no conversion from L (e.g. I;16)
        image = Image.new(mode, (width, height))
    buf = io.BytesIO()
    extra = {"save_all": True, "append_images": [image] * (frames - 1)} if frames > 1 else {}
    try:
        image.save(buf, fmt, **extra)
    except (OSError, ValueError, KeyError):
        image.convert("RGB").save(buf, fmt)
    return buf.getvalue()


VALID_IMAGES = st.builds(
    _image_bytes,
    st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "F"]),
    st.integers(1, 80),
    st.integers(1, 80),
    st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]),
    st.integers(1, 3),
)


def _damage(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutable = bytearray(data)
    for offset, value in edits:
        mutable[offset % len(mutable)] = value
    if cut is not None:
        del mutable[cut % len(mutable) :]
    return bytes(mutable)


IMAGE_BYTES = st.one_of(
    VALID_IMAGES,
    VALID_IMAGES,  # twice as likely: most examples should reach the model
    st.binary(max_size=1024),
    st.builds(
        _damage,
        VALID_IMAGES,
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
        st.one_of(st.none(), st.integers(0, 4096)),
    ),
)

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-300, 5e-324]), ANY_FLOAT),
    top_p=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-300]), ANY_FLOAT),
    top_k=st.one_of(st.integers(0, 1000), st.integers(-3, 10**6), st.floats(0, 5)),
    repetition_penalty=st.one_of(
        st.floats(0, 2), st.sampled_from([0.0, 1e-300, 5e-324, 2.0]), ANY_FLOAT
    ),
    max_new_tokens=st.one_of(st.integers(0, 3), st.integers(-2, -1), st.sampled_from([1.0])),
    seed=st.one_of(st.none(), st.integers(0, MAX_SEED), st.integers(-(2**64), 2**65)),
)


VALID_PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-300])),
    top_p=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])),
    top_k=st.integers(0, 1000),
    repetition_penalty=st.one_of(
        st.floats(0, 2, exclude_min=True), st.sampled_from([1e-300, 5e-324, 2.0])
    ),
    max_new_tokens=st.integers(0, 3),
    seed=st.one_of(st.none(), st.integers(0, MAX_SEED)),
)


def answer_or_refuse(pipeline, images: list[bytes], prompt: str, params: SamplingParams) -> None:
    """The property: text, or an InputError with a message; nothing else."""
    try:
        loaded = [load_image(data) for data in images]
        stream = pipeline.stream(prompt, loaded, params)
        text = "".join(stream)
    except InputError as exc:
        assert str(exc).strip()  # a message for the user
        event(f"refused: {str(exc)[:30]}")
        return
    event("answered")
    assert text == pipeline.tokenizer.decode(stream.token_ids).strip()
    assert stream.output_token_count <= params.max_new_tokens
    assert stream.finish_reason in ("eos", "length", "context")
    if 0 < params.temperature < 1e-5:  # overflows float32: must act as greedy, not draw NaNs
        greedy = pipeline.stream(prompt, loaded, dataclasses.replace(params, temperature=0))
        "".join(greedy)
        assert stream.token_ids == greedy.token_ids


@SETTINGS
@given(
    images=st.lists(VALID_IMAGES, max_size=3),
    prompt=st.tuples(st.sampled_from(["Describe ", "Find ", ""]), PROMPTS).map("".join),
    params=VALID_PARAMS,
)
def test_well_formed_requests_reach_the_model(mla_pipeline, images, prompt, params):
    """Valid images of every mode and format, in-range parameters, prompts with anything."""
    answer_or_refuse(mla_pipeline, images, prompt, params)


@SETTINGS
@given(images=st.lists(IMAGE_BYTES, max_size=3), prompt=PROMPTS, params=PARAMS)
def test_hostile_requests_are_refused_with_a_message(mla_pipeline, images, prompt, params):
    """Garbage and damaged files, out-of-range and non-finite parameters."""
    answer_or_refuse(mla_pipeline, images, prompt, params)


@SETTINGS
@given(prompt=PROMPTS)
def test_any_prompt_alone(mla_pipeline, prompt):
    """Prompt handling only (validation, image-tag placement, template, tokenizer)."""
    try:
        stream = mla_pipeline.stream(prompt, [], SamplingParams(max_new_tokens=1, seed=0))
    except InputError as exc:
        assert str(exc).strip()
        return
    text = "".join(stream)
    assert stream.finish_reason in ("eos", "length", "context")
    assert stream.output_token_count == 1
    assert text == mla_pipeline.tokenizer.decode(stream.token_ids).strip()
    assert stream.prompt_token_count < mla_pipeline.max_context


UPLOAD_VALUES = st.one_of(
    st.text(),
    st.sampled_from(["/", "/etc/passwd", ".", "..", "~", "/dev/zero", "file:///etc/passwd"]),
    st.builds(os.path.join, st.just(tempfile.gettempdir()), st.text(max_size=20)),
    st.binary(max_size=20),
    st.integers(),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(value=UPLOAD_VALUES)
def test_upload_guard_never_lets_a_path_out_of_the_temp_dir(value):
    from deepseek_vl2_runtime.serving import upload_path

    try:
        path = upload_path(value)
    except InputError as exc:
        assert "is not an uploaded file" in str(exc)
        return
    temp_dir = os.path.realpath(tempfile.gettempdir())
    assert os.path.commonpath([path, temp_dir]) == temp_dir
    assert os.path.isfile(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096.0, 4096),
        (1.0, 1),
        (0.0, 0),
        (-0.0, 0),
        (-3.0, -3),
        (2.0**53, 2**53),
        (-(2.0**53), -(2**53)),
    ],
)
def test_integral_floats_become_ints(value, expected):
    """What Cog hands over for a JSON integer written as 4096.0 (or -0)."""
    from deepseek_vl2_runtime.serving import whole_number

    result = whole_number(value)
    assert type(result) is int
    assert result == expected


@pytest.mark.parametrize(
    "value",
    [
        0.5,
        -1.5,
        4096.000001,
        1e-300,
        2.0**53 + 2,
        1e300,
        float("inf"),
        -float("inf"),
        float("nan"),
        None,
        0,
        7,
        -(2**70),
        True,
        "3",
    ],
)
def test_anything_else_is_returned_unchanged(value):
    """Fractions, floats past 2**53, non-finite values and non-floats are left for
    SamplingParams.validate to accept or refuse."""
    from deepseek_vl2_runtime.serving import whole_number

    assert whole_number(value) is value


@settings(max_examples=300, deadline=None)
@given(n=st.integers(-(2**53), 2**53))
def test_every_exactly_representable_integer_round_trips(n):
    from deepseek_vl2_runtime.serving import whole_number

    result = whole_number(float(n))
    assert type(result) is int
    assert result == n


@settings(max_examples=300, deadline=None)
@given(whole=st.integers(-(2**40), 2**40), fraction=st.floats(0.001, 0.999))
def test_non_integral_floats_are_returned_unchanged(whole, fraction):
    from deepseek_vl2_runtime.serving import whole_number

    value = whole + fraction  # |whole| <= 2**40: the fraction survives the addition
    assert whole_number(value) is value
