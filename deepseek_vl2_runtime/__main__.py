"""Command line: `python -m deepseek_vl2_runtime generate --weights DIR [--image PATH ...] --prompt TEXT`.

Streams the answer to stdout as it is generated; `--json` prints one JSON object on one line
instead (prompt/output token ids, text, parsed grounding boxes, counts, seed); `--annotate OUT.png`
draws the grounding boxes on the last image (the one the official demo draws on), and says so on
stderr when the answer has none.

Every argument is checked before the model loads (sampling parameters, --annotate without
--image, the weights directory, each image file: it must exist and decode); a mistake exits
with status 2 and one `error: ...` line naming the option or file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .engine import EngineConfig
from .errors import CheckpointError, InputError
from .grounding import draw_grounding, parse_grounding
from .image_io import load_image
from .pipeline import DTYPES, Pipeline
from .sampling import SamplingParams


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepseek_vl2_runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one prompt about zero or more images")
    gen.add_argument("--weights", required=True, help="checkpoint directory (Hugging Face layout)")
    gen.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    gen.add_argument("--prompt", required=True, help="question; <image> tags place the images")
    d = SamplingParams()
    gen.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=d.top_p)
    gen.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    gen.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    gen.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    gen.add_argument("--seed", type=int, default=None, help="random if omitted (reported)")
    gen.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    gen.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON line instead of streaming")
    gen.add_argument("--annotate", metavar="OUT.png", help="draw grounding boxes on the last image")
    return parser


# SamplingParams field -> the option that sets it (its messages name the field).
OPTIONS = {
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty",
    "max_new_tokens": "--max-new-tokens",
    "seed": "--seed",
}


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    try:
        params.validate()
    except InputError as exc:
        field = str(exc).partition("=")[0]
        raise InputError(f"{OPTIONS.get(field, field)}: {exc}") from None
    return params


def _load_images(paths: list[str]) -> list:
    """Decode every --image (named in any error), with the limits the server applies."""
    images = []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"--image {path}: the file could not be found")
        if os.path.isdir(path):
            raise InputError(f"--image {path}: is a directory, not an image file")
        try:
            images.append(load_image(path))
        except InputError as exc:
            raise InputError(f"--image {path}: {exc}") from None
    return images


def _check_arguments(args: argparse.Namespace) -> tuple[SamplingParams, list]:
    """Everything that can be wrong with the command line, checked before the model loads."""
    params = _sampling_params(args)
    if args.annotate and not args.image:
        raise InputError("--annotate needs an --image to draw on")
    if not os.path.isdir(args.weights):
        raise CheckpointError(
            f"--weights {args.weights}: not a directory. Point it at a Hugging Face snapshot "
            "(`make weights` downloads one into ./weights), or try the tiny random test "
            "checkpoint: --weights tests/data/golden/cases/mla/model"
        )
    return params, _load_images(args.image)


def _annotate(path: str, image, objects) -> None:
    draw_grounding(image, objects).save(path)
    if not any(o.boxes for o in objects):
        print(
            f"note: the answer has no grounding boxes, so {path} is the image without any; ask "
            "with <|grounding|> or <|ref|>an object<|/ref|> to get boxes",
            file=sys.stderr,
        )


def generate(args: argparse.Namespace) -> int:
    params, images = _check_arguments(args)
    # One request: one KV-cache slot (the server's engine holds one per concurrent request).
    pipe = Pipeline.load(
        args.weights, args.device, DTYPES.get(args.dtype), engine=EngineConfig(max_batch=1)
    )
    start = time.perf_counter()
    stream = pipe.stream(args.prompt, images, params)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if not args.json:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    text = "".join(chunks)
    objects = parse_grounding(text)
    if args.json:
        size = images[-1].size if images else None
        result = {
            "text": text,
            "prompt_token_ids": stream.prompt_token_ids,
            "output_token_ids": stream.token_ids,
            "prompt_token_count": stream.prompt_token_count,
            "output_token_count": stream.output_token_count,
            "finish_reason": stream.finish_reason,
            "seed": stream.seed,
            "time_to_first_token_s": stream.time_to_first_token_s,
            "total_s": elapsed,
            "grounding": [
                {
                    "label": o.label,
                    "boxes": [[b.x1, b.y1, b.x2, b.y2] for b in o.boxes],
                    "boxes_px": [list(b.to_pixels(*size)) for b in o.boxes] if size else None,
                }
                for o in objects
            ],
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.annotate:
        _annotate(args.annotate, images[-1], objects)
    print(
        f"[{stream.prompt_token_count} prompt tokens, {stream.output_token_count} new tokens, "
        f"finish={stream.finish_reason}, seed={stream.seed}, {elapsed:.2f} s]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return generate(args)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
