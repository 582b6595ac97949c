"""`python -m deepseek_vl2_runtime generate`, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from deepseek_vl2_runtime import SamplingParams
from deepseek_vl2_runtime.image_io import load_image

from checkpoints import MLA_MODEL
from paths import REPO_ROOT, golden_image

IMG = str(golden_image("img_640x480.png"))
IMG2 = str(golden_image("img_384x384.png"))


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "deepseek_vl2_runtime",
        "generate",
        "--weights",
        str(MLA_MODEL),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_json_output_matches_the_python_api(mla_pipeline) -> None:
    args = [
        "--image",
        IMG,
        "--prompt",
        "Find all the <|ref|>watermelon slices<|/ref|>",
        "--seed",
        "42",
    ]
    proc = run(*args, "--max-new-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    params = SamplingParams(max_new_tokens=24, seed=42)
    stream = mla_pipeline.stream(
        "Find all the <|ref|>watermelon slices<|/ref|>", [load_image(IMG)], params
    )
    assert out["text"] == "".join(stream)
    assert out["prompt_token_ids"] == stream.prompt_token_ids
    assert out["output_token_ids"] == stream.token_ids
    assert out["seed"] == 42 and out["finish_reason"] == stream.finish_reason
    assert out["prompt_token_ids"].count(mla_pipeline.tokenizer.image_id) == 1023


def test_repeated_images_and_text_only() -> None:
    two = json.loads(
        run(
            "--image",
            IMG,
            "--image",
            IMG2,
            "--prompt",
            "Compare.",
            "--max-new-tokens",
            "4",
            "--json",
        ).stdout
    )
    assert len(two["prompt_token_ids"]) > 1023 + 421
    text = json.loads(
        run(
            "--prompt",
            "Hello, who are you?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--json",
        ).stdout
    )
    assert len(text["prompt_token_ids"]) == 14 and text["output_token_count"] == 4


def test_streams_plain_text_by_default() -> None:
    proc = run("--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "8")
    assert proc.returncode == 0 and proc.stdout.strip()
    assert "new tokens" in proc.stderr


@pytest.mark.parametrize(
    "args,words",
    [
        (["--prompt", "<image> <image>", "--image", IMG], "2 <image> tags but 1 image"),
        (["--prompt", "hi", "--top-p", "3"], "top_p"),
        (["--prompt", "hi", "--image", "/nonexistent.png"], "could not be found"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, words) -> None:
    proc = run(*args)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_annotate_writes_the_image(tmp_path) -> None:
    out = tmp_path / "boxes.png"
    proc = run(
        "--image",
        IMG,
        "--prompt",
        "<|ref|>the square<|/ref|>",
        "--max-new-tokens",
        "8",
        "--annotate",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (640, 480)
