"""Cog adapter for DeepSeek-VL2-small: setup() loads the runtime once, predict() streams the answer.

All model logic lives in deepseek_vl2_runtime; this file only maps Cog inputs to it. predict()
is an async generator and Cog runs up to MAX_CONCURRENCY of them at once: each one decodes its
images and encodes its prompt in a worker thread, then submits the request to the pipeline's
engine, which batches every running request into one decode step per token (continuous
batching; engine.py), and yields its own text as it is decoded. User mistakes surface as an
invalid-input failure with their message; cancellation (`asyncio.CancelledError`) and vanished
clients stop that request's generation through `stream.close()`, which frees its cache at the
engine's next step. Anything else that goes wrong inside a prediction (out of memory, a bug)
fails only that prediction, with a `PredictionError` saying so; what it held is released first.

What coglet 0.23.1 (the newest on PyPI) does with it, measured: it runs the slots concurrently
and cancels each one alone, but it collects an async generator's chunks and sends them when the
answer is complete (its worker wraps the generator in a helper that appends every item to a
list), so SSE and webhook clients receive every `output` event at the end. The alternatives are
worse: a sync predict() streams live but serves one request at a time, and a plain generator
returned from an async predict() streams live but is never interrupted on cancel (coglet's
cancel only reaches the coroutine, which has already returned), so a vanished client would hold
its slot until its token budget ran out. The CLI and the Python API stream token by token.

Why `BasePredictor.predict` and not cog 0.23's `BaseRunner.run`: the published model and this
product's interface are `predict()` with `predict:` in cog.yaml, which every Cog CLI builds
(BaseRunner needs >= 0.20); 0.23.1 serves both and only logs a DeprecationWarning for ours.

Image inputs are read only from files that Cog itself downloaded (http(s) and data URLs land in
its temp directory). Cog hands any other string over as-is, so without `upload_path` an input
like "/etc/passwd" or "weights/model.safetensors" would be opened on the server.
"""

import asyncio
import logging
import os
import sys
import time

from cog import (
    AsyncConcatenateIterator,
    BasePredictor,
    Input,
    Path,
    concurrent,
    current_scope,
    streaming,
)

from deepseek_vl2_runtime.engine import EngineConfig
from deepseek_vl2_runtime.errors import CheckpointError, InputError
from deepseek_vl2_runtime.hub import ADVICE, resolve_weights
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

# Requests in flight at once (cog.yaml `concurrency.max`; on a host without Docker coglet reads
# COG_MAX_CONCURRENCY, which `make serve` sets). The engine runs as many as its KV cache holds
# (32 full 4096-token contexts on an L40S) and queues the rest, so this is also its batch size.
MAX_CONCURRENCY = 32
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
        weights = resolve_weights()  # $DEEPSEEK_VL2_WEIGHTS > ./weights > HF download
        # Compiled decode on CUDA, eager on CPU (pipeline.default_compile), unless
        # DEEPSEEK_VL2_COMPILE=0/1 says otherwise.
        choice = os.environ.get("DEEPSEEK_VL2_COMPILE")
        compile_decode = None if choice is None else choice == "1"
        # The engine holds as many sequences as coglet runs predictions at once (the image's
        # COG_MAX_CONCURRENCY comes from cog.yaml; `make serve` sets it on a bare host).
        slots = int(os.environ.get("COG_MAX_CONCURRENCY") or MAX_CONCURRENCY)
        try:  # verifies the snapshot, then loads it strictly
            self.pipe = Pipeline.load(
                weights, compile=compile_decode, engine=EngineConfig(max_batch=slots)
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}\n{ADVICE}.") from exc
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
    @concurrent(max=MAX_CONCURRENCY)
    async def predict(
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
    ) -> AsyncConcatenateIterator[str]:
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
        loop = asyncio.get_running_loop()
        failure = None
        try:  # decoding and tiling run in a thread: the event loop keeps streaming the others
            start = time.perf_counter()
            encoding = asyncio.ensure_future(
                asyncio.to_thread(self._encode, paths, prompt, params, loop)
            )
            try:
                stream = await asyncio.shield(encoding)
            except asyncio.CancelledError:  # cancelled while encoding: stop the request it submits
                encoding.add_done_callback(_close_when_encoded)
                raise
        except InputError as exc:
            raise user_error(exc) from None
        except Exception as exc:  # out of memory while encoding, or a bug: not the user's fault
            failure = server_failure(exc)
        if failure is not None:
            raise failure
        current_scope().record_metric("input_token_count", stream.prompt_token_count)
        broken: Exception | None = None
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:  # e.g. CUDA out of memory mid-answer: fail this prediction only
            broken = exc
            stream.finish_reason = "error"  # for the log line below
        finally:  # also on cancellation / client disconnect: stop generating now
            stream.close()
            self._report(stream, start)
        if broken is not None:
            error, broken = server_failure(broken), None
            raise error

    def _encode(
        self,
        paths: list[str],
        prompt: str,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
    ) -> TextStream:
        images = [load_image(p) for p in paths]
        return self.pipe.stream(prompt, images, params, loop)

    def _report(self, stream: TextStream, start: float) -> None:
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
            "decode_tokens/s=%.1f free_cache_slots=%d/%d",
            stream.prompt_token_count,
            n,
            stream.seed,
            stream.finish_reason,
            "-" if ttft is None else f"{ttft:.3f}s",
            elapsed,
            tps,
            self.pipe.engine.free_slots,  # all of them once the server is idle: nothing leaks
            self.pipe.engine.slots,
        )


def _close_when_encoded(encoding: asyncio.Future) -> None:
    if not encoding.cancelled() and encoding.exception() is None:
        encoding.result().close()
