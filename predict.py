"""Cog adapter for DeepSeek-VL2-small: setup() loads the runtime once, predict() streams the answer.

All model logic lives in deepseek_vl2_runtime; this file only maps Cog inputs to it. predict()
decodes its images, encodes its prompt, submits the request to the pipeline's engine (engine.py,
which batches every request it holds into one decode step per token) and streams the text. User
mistakes surface as an invalid-input failure with their message; cancellation arrives as
`CancelationException` and stops generation through `stream.close()`, which frees the cache at
the engine's next step. Anything else that goes wrong inside a prediction (out of memory, a bug)
fails only that prediction, with a `PredictionError` saying so; what it held is released first.

Why one request at a time through Cog (measured with toy predictors on coglet 0.23.1): more than
one slot needs an async predict(), and coglet then either collects an async generator's whole
output before sending any of it (no streaming), or, for a plain generator returned by an async
predict(), streams it but never interrupts it on cancel (generation runs to its budget). A
streaming, cancellable answer is kept instead; the engine serves concurrent requests from the
Python API and the benchmark.

Why `BasePredictor.predict` and not cog 0.23's `BaseRunner.run`: the published model and this
product's interface are `predict()` with `predict:` in cog.yaml, which every Cog CLI builds
(BaseRunner needs >= 0.20); 0.23.1 serves both and only logs a DeprecationWarning for ours.
"""

import logging
import os
import sys
import time
from collections.abc import Iterator

import torch
from cog import BasePredictor, ConcatenateIterator, Input, Path, current_scope, streaming

from deepseek_vl2_runtime.errors import InputError
from deepseek_vl2_runtime.hub import resolve_verified_weights
from deepseek_vl2_runtime.image_io import load_image
from deepseek_vl2_runtime.pipeline import Pipeline, TextStream
from deepseek_vl2_runtime.sampling import SamplingParams
from deepseek_vl2_runtime.serving import (
    install_cog_input_hooks,
    return_freed_memory_to_the_os,
    server_failure,
    upload_path,
    user_error,
    whole_number,
)

log = logging.getLogger("deepseek_vl2_runtime.cog")

# Our names for the runtime's parameters, where the published inputs differ.
INPUT_NAMES = {"max_new_tokens": "max_length_tokens"}

IMAGES = "image/*"
EXTRA_IMAGE = (
    "Optional additional image. The prompt's <image> tags are matched to the images in order "
    "(image, image_2, image_3); tags missing from the prompt are prepended."
)


class Predictor(BasePredictor):
    def setup(self) -> None:
        runtime_log = logging.getLogger("deepseek_vl2_runtime")
        if not runtime_log.handlers:  # the Cog worker configures no logging; show ours
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            runtime_log.addHandler(handler)
            runtime_log.setLevel(logging.INFO)
        return_freed_memory_to_the_os()
        install_cog_input_hooks()  # bounded URL-parse cache; safe URL downloads; upload registry
        start = time.perf_counter()
        weights = resolve_verified_weights()  # $DEEPSEEK_VL2_WEIGHTS > ./weights > HF download
        # Compiled decode (CUDA graphs) on GPU by default; DEEPSEEK_VL2_COMPILE=0/1 overrides.
        # On CPU compilation costs ~40 s at setup, so it is off unless asked for.
        compile_default = "1" if torch.cuda.is_available() else "0"
        compile_decode = os.environ.get("DEEPSEEK_VL2_COMPILE", compile_default) == "1"
        self.pipe = Pipeline.load(weights, compile=compile_decode)
        log.info(
            "ready: %s on %s/%s in %.1f s",
            weights,
            self.pipe.device,
            self.pipe.dtype,
            time.perf_counter() - start,
        )

    def healthcheck(self) -> bool:
        """coglet asks this while serving: False (UNHEALTHY) once the engine's loop has died."""
        return self.pipe.engine.healthy

    @streaming
    def predict(
        self,
        image: Path = Input(
            description="Image to ask about (PNG, JPEG, WebP, GIF, BMP or TIFF).", accept=IMAGES
        ),
        prompt: str = Input(
            description="Question or instruction about the image(s). Grounding: "
            "'<|ref|>the red car<|/ref|>' locates an object; '<|grounding|>' asks for boxes "
            "in the answer, which keeps '<|ref|>..<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>' "
            "tags with coordinates on a 0-999 grid."
        ),
        temperature: float = Input(
            default=0.1, ge=0, le=1, description="Sampling temperature; 0 = greedy decoding."
        ),
        top_p: float = Input(
            default=0.9,
            ge=0,
            le=1,
            description="Nucleus sampling: keep the smallest set of "
            "tokens whose probability adds up to top_p (1 = off).",
        ),
        repetition_penalty: float = Input(
            default=1.1,
            ge=0,
            le=2,
            description="Penalty for repeating tokens (1 = none, "
            "higher = less repetition). Must be greater than 0.",
        ),
        max_length_tokens: int = Input(
            default=2048,
            ge=0,
            le=4096,
            description="Maximum number of new tokens to generate "
            "(the prompt plus the answer must fit in the 4096-token context).",
        ),
        top_k: int = Input(
            default=50,
            ge=0,
            le=1000,
            description="Sample only from the k most likely tokens (0 = off).",
        ),
        seed: int | None = Input(
            default=None,
            ge=0,
            description="Random seed for sampling; random if not set; the seed "
            "used is logged. Same seed + inputs = same answer.",
        ),
        image_2: Path | None = Input(default=None, description=EXTRA_IMAGE, accept=IMAGES),
        image_3: Path | None = Input(default=None, description=EXTRA_IMAGE, accept=IMAGES),
    ) -> ConcatenateIterator[str]:
        # Everything that can be the user's fault (parameters, images, <image> tags, context) is
        # checked before the first token, so a bad request fails with the InputError message.
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,  # validate() rejects <= 0 (schema allows 0)
            max_new_tokens=whole_number(max_length_tokens),
            top_k=whole_number(top_k),
            seed=whole_number(seed),
        )
        try:
            params.validate()
        except InputError as exc:  # named as the user's input
            raise user_error(exc.renamed(INPUT_NAMES)) from None
        uploads = {"image": image, "image_2": image_2, "image_3": image_3}
        paths = [upload_path(p, name) for name, p in uploads.items() if p is not None]
        failure = None
        try:
            start = time.perf_counter()
            stream = self._encode(paths, prompt, params)
        except InputError as exc:
            raise user_error(exc) from None
        except Exception as exc:  # out of memory while encoding, or a bug: not the user's fault
            failure = server_failure(exc)
        if failure is not None:
            raise failure
        current_scope().record_metric("input_token_count", stream.prompt_token_count)
        return self._generate(stream, start)

    def _generate(self, stream: TextStream, start: float) -> Iterator[str]:
        failure = None
        try:
            yield from stream
        except Exception as exc:  # e.g. CUDA out of memory mid-answer: fail this prediction only
            failure = exc
            stream.finish_reason = "error"  # for the log line below
        finally:  # also on CancelationException / client disconnect: stop generating now
            stream.close()
            self._report(stream, start)
        if failure is not None:
            error, failure = server_failure(failure), None
            raise error

    def _encode(self, paths: list[str], prompt: str, params: SamplingParams) -> TextStream:
        images = [load_image(p) for p in paths]
        return self.pipe.stream(prompt, images, params)

    @staticmethod
    def _report(stream: TextStream, start: float) -> None:
        elapsed = time.perf_counter() - start
        ttft = stream.time_to_first_token_s
        scope = current_scope()
        scope.record_metric("output_token_count", stream.output_token_count)
        if ttft is not None:
            scope.record_metric("time_to_first_token", ttft)
        n, decode_s = stream.output_token_count, elapsed - (ttft or 0.0)
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0  # this stream's decode speed
        log.info(
            "prompt_tokens=%d output_tokens=%d seed=%d finish=%s ttft=%s total=%.2fs "
            "decode_tokens/s=%.1f",
            stream.prompt_token_count,
            n,
            stream.seed,
            stream.finish_reason,
            "-" if ttft is None else f"{ttft:.3f}s",
            elapsed,
            tps,
        )
