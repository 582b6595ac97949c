"""predict.Predictor in-process on the tiny checkpoint (CPU): the adapter, not the model."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from deepseek_vl2_runtime.errors import InputError
from deepseek_vl2_runtime.pipeline import Pipeline
from deepseek_vl2_runtime.sampling import SamplingParams

from cog_server import call_predict as predict
from cog_server import write_upload
from paths import tiny_checkpoint

CHECKPOINT = tiny_checkpoint()
pytestmark = pytest.mark.skipif(CHECKPOINT is None, reason="tiny checkpoint not found")


@pytest.fixture(scope="module")
def image_path():
    image = Image.new("RGB", (96, 64))
    image.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(64) for x in range(96)])
    path = write_upload(image)
    yield path
    path.unlink(missing_ok=True)


def test_setup_loads_the_pipeline(predictor):
    assert isinstance(predictor.pipe, Pipeline)
    assert predictor.pipe.max_context == 4096


def test_answer_matches_the_runtime(predictor, image_path):
    out = predict(
        predictor, image=image_path, prompt="Describe this.", seed=42, max_length_tokens=64
    )
    chunks = list(out)
    assert chunks
    assert all(isinstance(c, str) for c in chunks)
    params = SamplingParams(
        temperature=0.1, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=64, seed=42
    )
    image = Image.open(image_path).convert("RGB")
    expected = "".join(predictor.pipe.stream("Describe this.", [image], params))
    assert "".join(chunks) == expected


def test_same_seed_same_text_and_plain_str_paths_are_refused(predictor, image_path):
    inputs = {"prompt": "<|ref|>the cat<|/ref|>", "seed": 7, "max_length_tokens": 40}
    first = "".join(predict(predictor, image=image_path, **inputs))
    assert first == "".join(predict(predictor, image=image_path, **inputs))
    with pytest.raises(InputError, match="is not an uploaded file"):  # a str names, not uploads
        predict(predictor, image=str(image_path), **inputs)


def test_three_images_and_the_per_request_log_line(predictor, image_path, caplog):
    caplog.set_level(logging.INFO, logger="deepseek_vl2_runtime")
    out = predict(
        predictor,
        image=image_path,
        image_2=image_path,
        image_3=image_path,
        prompt="Compare <image> with the others.",
        max_length_tokens=8,
        temperature=0,
    )
    list(out)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepseek_vl2_runtime.cog"]
    assert len(lines) == 1
    assert "output_tokens=" in lines[0]
    assert "seed=" in lines[0]
    assert "finish=" in lines[0]
    prompt_tokens = int(lines[0].split("prompt_tokens=")[1].split()[0])
    one_image = predict(predictor, image=image_path, prompt="Compare", max_length_tokens=1)
    list(one_image)
    assert prompt_tokens > int(
        caplog.records[-1].getMessage().split("prompt_tokens=")[1].split()[0]
    )


def test_user_errors_raise_before_any_output(predictor, image_path, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"prompt": "<image> and <image>"}, "<image>"),
        ({"image": corrupt}, "image"),
        ({"prompt": "   "}, "prompt"),
    ]
    for inputs, word in cases:
        inputs = {"image": image_path, "prompt": "hi"} | inputs
        with pytest.raises(InputError, match=word):
            predict(predictor, **inputs)  # raised by the call itself, not on iteration


def test_closing_early_stops_generation(predictor, image_path, caplog):
    caplog.set_level(logging.INFO, logger="deepseek_vl2_runtime")
    out = predict(predictor, image=image_path, prompt="Tell a long story.", max_length_tokens=4000)
    first = next(out)
    assert isinstance(first, str)
    out.close()  # what the server does on cancel / disconnect
    line = [r.getMessage() for r in caplog.records if r.name == "deepseek_vl2_runtime.cog"][-1]
    tokens = int(line.split("output_tokens=")[1].split()[0])
    assert tokens < 4000
    assert "finish=cancelled" in line
