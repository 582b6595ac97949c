"""Request semantics on top of the exact model: image placement, sampling, seeds, stopping,
context limits and streamed text."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl2_runtime import InputError, Pipeline, SamplingParams
from deepseek_vl2_runtime.chat_template import Tokenizer
from deepseek_vl2_runtime.detokenize import IncrementalDecoder, answer_chunks
from deepseek_vl2_runtime.pipeline import place_images
from deepseek_vl2_runtime.sampling import apply_repetition_penalty

from checkpoints import write_checkpoint
from paths import SHARED_GOLDEN, golden_image

REALTOK = SHARED_GOLDEN / "cases" / "realtok" / "model"
needs_realtok = pytest.mark.skipif(not REALTOK.exists(), reason=f"{REALTOK} absent")


@pytest.fixture(scope="module")
def image():
    return Image.open(golden_image("img_384x384.png")).convert("RGB")


@pytest.fixture(scope="module")
def realtok():
    return Tokenizer.from_dir(REALTOK)


def _text(pipe, prompt, images, **kw) -> str:
    return "".join(pipe.stream(prompt, images, SamplingParams(**kw)))


# -- image placement -----------------------------------------------------------------------


def test_missing_tags_are_prepended() -> None:
    assert place_images("Find the cat", 1) == "<image>\nFind the cat"
    assert place_images("Compare", 2) == "<image>\n<image>\nCompare"
    assert place_images("<image> and", 2) == "<image>\n<image> and"
    assert place_images("Describe <image> now", 1) == "Describe <image> now"
    assert place_images("text only", 0) == "text only"


def test_more_tags_than_images_is_a_clear_error(mla_pipeline, image) -> None:
    with pytest.raises(InputError, match="2 <image> tags but 1 image"):
        mla_pipeline.stream("<image><image> what?", [image], SamplingParams())


def test_untagged_image_is_seen_by_the_model(mla_pipeline, image) -> None:
    """The official Cog path dropped it; ours places it (421 image tokens for a 384 image)."""
    stream = mla_pipeline.stream(
        "What is in this picture?", [image], SamplingParams(max_new_tokens=1)
    )
    assert stream.prompt_token_ids.count(mla_pipeline.tokenizer.image_id) == 421
    list(stream)


def test_three_images_switch_tiling_off(mla_pipeline, image) -> None:
    wide = Image.new("RGB", (1000, 400), (10, 200, 30))
    two = mla_pipeline.encode("<image><image>", [wide, image])
    three = mla_pipeline.encode("<image><image><image>", [wide, image, image])
    assert two.images.crops == ((3, 2), (1, 1))  # 1152x768 keeps all 400k pixels
    assert three.images.crops == ((1, 1),) * 3


# -- sampling ------------------------------------------------------------------------------


def test_greedy_applies_the_repetition_penalty(mla_pipeline, image) -> None:
    req = mla_pipeline.encode("<image>\nWhat is this?", [image])
    logits = mla_pipeline.prefill_logits(req)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[req.input_ids] = True
    expected = int(apply_repetition_penalty(logits, seen, 3.0).argmax())
    params = SamplingParams(temperature=0, repetition_penalty=3.0, max_new_tokens=1)
    assert list(mla_pipeline.generate_ids(req, params)) == [expected]
    plain = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=40)
    penalised = SamplingParams(temperature=0, repetition_penalty=1.5, max_new_tokens=40)
    assert list(mla_pipeline.generate_ids(req, plain)) != list(
        mla_pipeline.generate_ids(req, penalised)
    )


def test_temperature_zero_ignores_the_seed(mla_pipeline, image) -> None:
    a = _text(mla_pipeline, "Describe.", [image], temperature=0, max_new_tokens=20, seed=1)
    b = _text(mla_pipeline, "Describe.", [image], temperature=0, max_new_tokens=20, seed=2)
    assert a == b
    assert a


def test_same_seed_same_text_different_seed_different_text(mla_pipeline, image) -> None:
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=30)
    a = _text(mla_pipeline, "Describe.", [image], seed=123, **kw)
    assert a == _text(mla_pipeline, "Describe.", [image], seed=123, **kw)
    assert a != _text(mla_pipeline, "Describe.", [image], seed=124, **kw)


def test_missing_seed_is_drawn_and_reported(mla_pipeline, image) -> None:
    kw = dict(temperature=1.0, max_new_tokens=20)
    stream = mla_pipeline.stream("Describe.", [image], SamplingParams(**kw))
    text = "".join(stream)
    assert isinstance(stream.seed, int)
    assert text == _text(mla_pipeline, "Describe.", [image], seed=stream.seed, **kw)


def test_generation_leaves_global_rng_alone(mla_pipeline, image) -> None:
    state = torch.get_rng_state()
    _text(mla_pipeline, "Describe.", [image], temperature=1.0, max_new_tokens=5, seed=9)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("max_new_tokens", -1),
        ("seed", -5),
        ("seed", 2**64),
    ],
)
def test_invalid_parameters_are_named(mla_pipeline, field, value) -> None:
    with pytest.raises(InputError, match=field):
        mla_pipeline.stream("hi", [], SamplingParams(**{field: value}))


# -- stopping and context ------------------------------------------------------------------


def test_zero_new_tokens_gives_an_empty_answer(mla_pipeline) -> None:
    stream = mla_pipeline.stream("hi", [], SamplingParams(max_new_tokens=0))
    assert list(stream) == []
    assert stream.finish_reason == "length"
    assert stream.output_token_count == 0


def test_max_new_tokens_counts_new_tokens(mla_pipeline) -> None:
    stream = mla_pipeline.stream(
        "Hello, who are you?", [], SamplingParams(temperature=0, max_new_tokens=7)
    )
    list(stream)
    assert stream.output_token_count == 7
    assert stream.finish_reason == "length"


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("ctx"), {"max_position_embeddings": 64})
    return Pipeline.load(path, device="cpu")


def test_generation_stops_at_the_context_end(short_context, caplog) -> None:
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=500)
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2_runtime"):
        stream = short_context.stream("Hello, who are you?", [], params)
        list(stream)
    assert stream.prompt_token_count + stream.output_token_count == 64
    assert stream.finish_reason == "context"
    assert "context" in caplog.text
    assert "64" in caplog.text


def test_prompt_that_does_not_fit_gives_both_numbers(short_context, image) -> None:
    n = short_context.encode("<image>\nDescribe.", [image]).num_tokens
    with pytest.raises(InputError) as e:
        short_context.stream("Describe.", [image], SamplingParams())
    assert f"{n} tokens (421 of them for images)" in str(e.value)
    assert "context is 64 tokens" in str(e.value)


# -- streamed text -------------------------------------------------------------------------


def test_stream_concatenation_is_the_stripped_decode(mla_pipeline, image) -> None:
    stream = mla_pipeline.stream(
        "Describe.", [image], SamplingParams(temperature=1.0, max_new_tokens=40, seed=3)
    )
    chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(chunks) == mla_pipeline.tokenizer.decode(stream.token_ids).strip()


def test_eos_stops_and_is_not_shown_nothing_else_removed(mla_pipeline) -> None:
    tok = mla_pipeline.tokenizer
    answer = " <|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> User: keep me \n"
    ids = [*tok.encode(answer), tok.eos_id, *tok.encode("never shown")]
    text = "".join(answer_chunks(tok, ids, tok.eos_id))
    assert text == answer.strip()


CJK_EMOJI = [
    "这张图片里有什么？请用中文回答。",
    "Is this 🍉 or 🦒? 👍🏽 👨‍👩‍👧 ❤️ 🇯🇵 😀😀",
    "图中有3个objects吗？Answer:yes/no🙂（谢谢）",
    "<|ref|>西瓜片<|/ref|><|det|>[[159, 327, 408, 615]]<|/det|>",
]


def _incremental(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


@needs_realtok
@pytest.mark.parametrize("text", CJK_EMOJI)
def test_real_tokenizer_streams_cjk_and_emoji_without_garbling(realtok, text) -> None:
    ids = realtok.encode(text)
    assert len(ids) > len(text) // 3  # multi-byte characters really are split across tokens
    chunks = _incremental(realtok, ids)
    assert "".join(chunks) == realtok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


@needs_realtok
@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_incremental_decode_equals_full_decode_on_any_text(realtok, text) -> None:
    ids = realtok.encode(text)
    assert "".join(_incremental(realtok, ids)) == realtok.decode(ids)


@needs_realtok
@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=102399), max_size=40))
def test_incremental_decode_equals_full_decode_on_any_ids(realtok, ids) -> None:
    """Arbitrary model output, incl. ids beyond the tokenizer (the 2,389 untokenised rows)."""
    assert "".join(_incremental(realtok, ids)) == realtok.decode(ids)
