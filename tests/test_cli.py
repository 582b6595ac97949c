"""`python -m deepseek_vl2_runtime generate`: its `main(argv)` in-process (stdout and stderr from
capsys), and the entry point itself once, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from deepseek_vl2_runtime import SamplingParams
from deepseek_vl2_runtime.__main__ import main
from deepseek_vl2_runtime.image_io import load_image

from checkpoints import MLA_MODEL
from paths import REPO_ROOT, golden_image

IMG = str(golden_image("img_640x480.png"))
IMG2 = str(golden_image("img_384x384.png"))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `generate --weights <tiny checkpoint> ARGS`; return (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    try:
        status = main(["generate", "--weights", str(MLA_MODEL), *args])
    except SystemExit as exc:  # argparse refusing an argument
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_json_output_matches_the_python_api(mla_pipeline, capsys) -> None:
    args = [
        "--image",
        IMG,
        "--prompt",
        "Find all the <|ref|>watermelon slices<|/ref|>",
        "--seed",
        "42",
    ]
    status, stdout, stderr = cli(capsys, *args, "--max-new-tokens", "24", "--json")
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    params = SamplingParams(max_new_tokens=24, seed=42)
    stream = mla_pipeline.stream(
        "Find all the <|ref|>watermelon slices<|/ref|>", [load_image(IMG)], params
    )
    assert out["text"] == "".join(stream)
    assert out["prompt_token_ids"] == stream.prompt_token_ids
    assert out["output_token_ids"] == stream.token_ids
    assert out["seed"] == 42
    assert out["finish_reason"] == stream.finish_reason
    assert out["prompt_token_ids"].count(mla_pipeline.tokenizer.image_id) == 1023


def test_repeated_images_and_text_only(capsys) -> None:
    args = ["--image", IMG, "--image", IMG2, "--prompt", "Compare.", "--max-new-tokens", "4"]
    two = json.loads(cli(capsys, *args, "--json")[1])
    assert len(two["prompt_token_ids"]) > 1023 + 421
    args = ["--prompt", "Hello, who are you?", "--temperature", "0", "--max-new-tokens", "4"]
    text = json.loads(cli(capsys, *args, "--json")[1])
    assert len(text["prompt_token_ids"]) == 14
    assert text["output_token_count"] == 4


def test_streams_plain_text_by_default(capsys) -> None:
    status, stdout, stderr = cli(
        capsys, "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "8"
    )
    assert status == 0, stderr
    assert stdout.strip()
    assert "new tokens" in stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prompt", "<image> <image>", "--image", IMG], "2 <image> tags but 1 image"),
        (["--prompt", "hi", "--top-p", "3"], "top_p"),
        (["--prompt", "hi", "--image", "/nonexistent.png"], "could not be found"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, args, words) -> None:
    status, _, stderr = cli(capsys, *args)
    assert status == 2, stderr
    assert words in stderr, stderr


def test_annotate_writes_the_image(tmp_path, capsys) -> None:
    out = tmp_path / "boxes.png"
    status, _, stderr = cli(
        capsys,
        "--image",
        IMG,
        "--prompt",
        "<|ref|>the square<|/ref|>",
        "--max-new-tokens",
        "8",
        "--annotate",
        str(out),
    )
    assert status == 0, stderr
    assert Image.open(out).size == (640, 480)


@pytest.mark.subprocess
def test_the_entry_point_streams_and_exits_cleanly() -> None:
    """`python -m deepseek_vl2_runtime` as a user runs it: the answer on stdout, the summary on
    stderr, exit status 0 (the process also shuts down cleanly after generating)."""
    command = [
        sys.executable,
        "-m",
        "deepseek_vl2_runtime",
        "generate",
        "--weights",
        str(MLA_MODEL),
    ]
    command += ["--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "8"]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "new tokens" in proc.stderr
