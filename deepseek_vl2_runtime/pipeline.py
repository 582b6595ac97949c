"""The runtime's front door: load a checkpoint once, then turn requests into tokens and text.

Device and dtype are decided here, once (bf16 on CUDA, float32 on CPU). A request is a prompt
(or a conversation) plus PIL images; `encode` builds exactly the official processor's inputs,
`stream` adds the product's request semantics on top: missing `<image>` tags are prepended (the
official web demo's rule), the context is enforced, and the answer streams as text.

Every way to the model goes through the pipeline's one `Engine` (engine.py), which serves any
number of concurrent requests; a lone request is a batch of one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .chat_template import ASSISTANT, IMAGE_TAG, PAD, USER, Tokenizer, Turn, build_prompt
from .detokenize import AnswerText
from .engine import Engine, EngineConfig, Token, TokenStream
from .errors import CheckpointError, InputError
from .image_io import SOURCE_SIZE
from .image_processing import ImageBatch, TilingConfig, num_image_tokens, preprocess
from .model import DeepseekVL2
from .sampling import SamplingParams
from .weights import load_model, verify_snapshot

log = logging.getLogger("deepseek_vl2_runtime")

MAX_PROMPT_CHARS = 131072  # far beyond any prompt that fits 4096 tokens
# Sampling divides float32 logits by the temperature and the repetition penalty. Tiny values
# (1e-300 is "valid") overflow to inf, softmax turns inf into NaN, and every draw becomes token
# 0. Below these floors nothing observable changes, so values under them are raised to them
# (a temperature under the floor means greedy decoding, which is what it approximates).
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 1e-5


# The dtypes the runtime runs in, by name (CLI and benchmark flags).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_compile(device: torch.device) -> bool:
    """Compiled decode (a CUDA graph per batch bucket) on CUDA; eager on CPU, where compiling
    costs ~40 s of setup for a ~2x faster step."""
    return device.type == "cuda"


def numerically_safe(params: SamplingParams) -> SamplingParams:
    """`params` with a temperature under MIN_TEMPERATURE made greedy (0) and a repetition
    penalty under MIN_REPETITION_PENALTY raised to it (see their comment)."""
    changes: dict[str, Any] = {}  # SamplingParams fields
    if 0 < params.temperature < MIN_TEMPERATURE:
        changes["temperature"] = 0.0
    if 0 < params.repetition_penalty < MIN_REPETITION_PENALTY:
        changes["repetition_penalty"] = MIN_REPETITION_PENALTY
    return dataclasses.replace(params, **changes) if changes else params


def place_images(prompt: str, n_images: int) -> str:
    """Prepend one "<image>\\n" per image that has no tag (official web demo rule)."""
    n_tags = prompt.count(IMAGE_TAG)
    if n_tags > n_images:
        raise InputError(
            f"The prompt has {n_tags} <image> tags but {n_images} image(s) were given; "
            "remove the extra tags or add images"
        )
    return (IMAGE_TAG + "\n") * (n_images - n_tags) + prompt


def _tiling_config(path: Path, model: DeepseekVL2) -> TilingConfig:
    cfg = model.config
    tiling = TilingConfig(cfg.candidate_resolutions, cfg.tokens_per_side)
    f = path / "processor_config.json"
    if not f.exists():
        return tiling
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
        mean, std = (
            tuple(raw.get("image_mean", tiling.image_mean)),
            tuple(raw.get("image_std", tiling.image_std)),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    resolutions = raw.get("candidate_resolutions")
    if resolutions is not None and [tuple(r) for r in resolutions] != list(
        cfg.candidate_resolutions
    ):
        raise CheckpointError(f"{f}: candidate_resolutions differ from config.json")
    if raw.get("normalize", True) is not True or len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{f}: unsupported normalisation (normalize/image_mean/image_std)")
    return dataclasses.replace(tiling, image_mean=mean, image_std=std)


@dataclasses.dataclass(frozen=True)
class EncodedRequest:
    """Everything the model needs for one prompt. input_ids/image_mask [T]."""

    input_ids: torch.Tensor
    image_mask: torch.Tensor
    images: ImageBatch

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())


class TextStream(Iterator[str]):
    """Text chunks of one answer, plus what a server wants to report about it.

    Iterate it (`for`), or `async for` it when `Pipeline.stream` was given an event loop. The
    chunks are the answer as it streams: every id before end-of-sentence (which is not shown)
    detokenized incrementally, special tokens such as grounding tags kept, the whole answer
    whitespace-stripped; concatenated, they equal decode(ids).strip().
    """

    def __init__(
        self,
        pipeline: Pipeline,
        tokens: TokenStream,
        prompt_ids: list[int],
        seed: int,
        started: float,
    ) -> None:
        self.prompt_token_ids = prompt_ids
        self.prompt_token_count = len(prompt_ids)
        self.output_token_count = 0  # generated ids, end-of-sentence included
        self.seed = seed
        # "eos" | "length" | "context" | "cancelled" | "error"; None while generating
        self.finish_reason: str | None = None
        self.time_to_first_token_s: float | None = None
        self.token_ids: list[int] = []  # answer ids, end-of-sentence excluded
        self._tokens = tokens
        self._started = started
        self._eos = pipeline.tokenizer.eos_id
        self._context = pipeline.max_context
        self._answer = AnswerText(pipeline.tokenizer, self._eos)

    def _push(self, token: Token) -> str:
        if self.time_to_first_token_s is None:
            self.time_to_first_token_s = time.perf_counter() - self._started
        self.output_token_count += 1
        if token.id != self._eos:
            self.token_ids.append(token.id)
        return self._answer.push(token.id)

    def _end(self) -> str:
        finished = self._tokens.finished
        self.finish_reason = finished.reason if finished is not None else "cancelled"
        if self.finish_reason == "context":
            log.warning(
                "generation stopped at the end of the model's context (%d tokens): prompt %d + answer %d",
                self._context,
                self.prompt_token_count,
                self.output_token_count,
            )
        return self._answer.finish()

    def __next__(self) -> str:
        if self.finish_reason is not None:
            raise StopIteration
        for token in self._tokens:
            if text := self._push(token):
                return text
        if text := self._end():
            return text
        raise StopIteration

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        async for token in self._tokens:
            if text := self._push(token):
                return text
        if text := self._end():
            return text
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop generating (cancellation); the engine frees the cache at its next step. Safe to
        call more than once."""
        self._tokens.cancel()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


class Pipeline:
    def __init__(
        self,
        model: DeepseekVL2,
        tokenizer: Tokenizer,
        tiling: TilingConfig,
        engine: EngineConfig | None = None,
    ) -> None:
        self.model, self.tokenizer, self.tiling = model, tokenizer, tiling
        self.device = model.image_newline.device
        self.dtype = model.image_newline.dtype
        self.config = model.config
        self.max_context = model.config.language_config.max_position_embeddings
        self.engine = Engine(model, tokenizer.eos_id, engine)
        # The engine's thread ends when the pipeline is dropped, or at interpreter exit.
        self.close = weakref.finalize(self, self.engine.close)
        self._forbidden = {
            t: i for t, i in tokenizer.special_ids.items() if t in (PAD, USER, ASSISTANT)
        }
        self._forbidden.update(
            {tokenizer.bos_token: tokenizer.bos_id, tokenizer.eos_token: tokenizer.eos_id}
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
        engine: EngineConfig | None = None,
    ) -> Pipeline:
        """Load once. `compile=True` compiles the decode step (a CUDA graph per batch bucket on
        GPU) and warms it up here, so that the first request is as fast as the tenth; None
        decides by the device (`default_compile`)."""
        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        if compile is None:
            compile = default_compile(device)
        engine = dataclasses.replace(engine or EngineConfig(), compile=compile)
        start = time.perf_counter()
        verify_snapshot(path)
        tokenizer = Tokenizer.from_dir(path)
        model = load_model(path, device, dtype)
        log.info("loaded %s on %s/%s in %.2f s", path, device, dtype, time.perf_counter() - start)
        start = time.perf_counter()
        pipe = cls(model, tokenizer, _tiling_config(path, model), engine)
        if compile:
            log.info(
                "compiled and warmed up the decode step in %.1f s", time.perf_counter() - start
            )
        return pipe

    # -- exact official semantics -------------------------------------------------------------

    def encode(
        self, conversation: str | Sequence[Turn], images: Sequence[Image.Image]
    ) -> EncodedRequest:
        """Processor inputs for a prompt (or turns) whose `<image>` tags match `images` exactly."""
        turns = [Turn(conversation)] if isinstance(conversation, str) else list(conversation)
        n_tags = sum(t.user.count(IMAGE_TAG) for t in turns)
        if n_tags != len(images):
            raise InputError(f"The prompt has {n_tags} <image> tags for {len(images)} image(s)")
        # Uploads downscaled on load are tiled for the size the user sent (image_io.SOURCE_SIZE).
        batch = preprocess(images, self.tiling, [im.info.get(SOURCE_SIZE) for im in images])
        counts = [num_image_tokens(c, self.tiling.tokens_per_side) for c in batch.crops]
        prompt = build_prompt(self.tokenizer, turns, counts)
        return EncodedRequest(
            input_ids=torch.tensor(prompt.input_ids, dtype=torch.long, device=self.device),
            image_mask=torch.tensor(prompt.image_mask, dtype=torch.bool, device=self.device),
            images=batch,
        )

    @torch.inference_mode()
    def embed(self, request: EncodedRequest) -> torch.Tensor:
        """inputs_embeds [1, T, H] (token embeddings with the image features in place)."""
        return self.engine.embed(request)

    def prefill_logits(self, request: EncodedRequest) -> torch.Tensor:
        """Float32 logits [V] of the last prompt position, as the engine computes them for the
        first answer token."""
        self._check_fits(request)
        params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=1, seed=0)
        (token,) = self.engine.submit(request, params, keep_logits=True)
        if token.logits is None:
            raise RuntimeError("the engine returned no logits for a keep_logits request")
        return token.logits

    def generate(
        self, request: EncodedRequest, params: SamplingParams, *, keep_logits: bool = False
    ) -> TokenStream:
        """The engine's token stream for an encoded request (end-of-sentence included when
        produced): validates the parameters and the context, draws a seed if none is given."""
        params.validate()
        self._check_fits(request)
        return self.engine.submit(
            request, numerically_safe(params.with_seed()), keep_logits=keep_logits
        )

    def generate_ids(self, request: EncodedRequest, params: SamplingParams) -> list[int]:
        """All answer ids of an encoded request (end-of-sentence included when produced)."""
        return [token.id for token in self.generate(request, params)]

    def _check_fits(self, request: EncodedRequest) -> None:
        if request.num_tokens >= self.max_context:
            raise InputError(
                f"The prompt is {request.num_tokens} tokens ({request.num_image_tokens} of them for images) "
                f"but the model's context is {self.max_context} tokens; shorten the prompt or send "
                "fewer/smaller images"
            )

    # -- product semantics --------------------------------------------------------------------

    def validate_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("The prompt is empty; ask a question or describe the task.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"The prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS} "
                f"(the model's context is {self.max_context} tokens)"
            )
        if "\x00" in prompt:
            raise InputError("The prompt contains NUL characters (\\x00); remove them")
        found = [t for t in self._forbidden if t in prompt]
        if found:
            raise InputError(
                f"The prompt contains the model's control token(s) {found}, which would forge a "
                "conversation turn; remove them (grounding tags like <|ref|> are fine)"
            )

    def stream(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> TextStream:
        """Validate and encode now (raising InputError), then stream the answer's text (`async
        for` it when `loop` is given: the running event loop that will read it)."""
        started = time.perf_counter()
        self.validate_prompt(prompt)
        params.validate()
        params = numerically_safe(params.with_seed())
        request = self.encode(place_images(prompt, len(images)), images)
        self._check_fits(request)
        room = self.max_context - request.num_tokens
        if room < params.max_new_tokens:
            log.warning(
                "prompt %d + max_new_tokens %d exceeds the context of %d tokens: at most %d new tokens",
                request.num_tokens,
                params.max_new_tokens,
                self.max_context,
                room,
            )
        tokens = self.engine.submit(request, params, loop=loop)
        if params.seed is None:  # with_seed() above always fills it in
            raise RuntimeError("no seed after SamplingParams.with_seed()")
        return TextStream(self, tokens, request.input_ids.tolist(), params.seed, started)
