"""The runtime's front door: load a checkpoint once, then turn requests into tokens and text.

Device and dtype are decided here, once (bf16 on CUDA, float32 on CPU). A request is a prompt
(or a conversation) plus PIL images; `encode` builds exactly the official processor's inputs,
`stream` adds the product's request semantics on top: missing `<image>` tags are prepended (the
official web demo's rule), the context is enforced, and the answer streams as text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from .chat_template import ASSISTANT, IMAGE_TAG, PAD, USER, Tokenizer, Turn, build_prompt
from .detokenize import answer_chunks
from .errors import CheckpointError, InputError
from .generation import DecodeStep, generate_tokens
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def numerically_safe(params: SamplingParams) -> SamplingParams:
    """`params` with a temperature under MIN_TEMPERATURE made greedy (0) and a repetition
    penalty under MIN_REPETITION_PENALTY raised to it (see their comment)."""
    changes: dict[str, float] = {}
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
    """Text chunks of one answer, plus what a server wants to report about it."""

    def __init__(
        self,
        pipeline: Pipeline,
        request: EncodedRequest,
        params: SamplingParams,
        max_new: int,
        started: float,
    ) -> None:
        self.prompt_token_ids: list[int] = request.input_ids.tolist()
        self.prompt_token_count = request.num_tokens
        self.output_token_count = 0  # generated ids, end-of-sentence included
        self.seed = params.seed
        self.finish_reason: str | None = None  # "eos" | "length" | "context" | "cancelled"
        self.time_to_first_token_s: float | None = None
        self.token_ids: list[int] = []  # answer ids, end-of-sentence excluded
        self._started = started
        self._limit_reason = "context" if max_new < params.max_new_tokens else "length"
        self._eos = pipeline.tokenizer.eos_id
        self._context = pipeline.max_context
        tokens = self._count(pipeline.generate_ids(request, params, max_new))
        self._chunks = answer_chunks(pipeline.tokenizer, tokens, self._eos)

    def _count(self, tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            if self.time_to_first_token_s is None:
                self.time_to_first_token_s = time.perf_counter() - self._started
            self.output_token_count += 1
            if token == self._eos:
                self.finish_reason = "eos"
            else:
                self.token_ids.append(token)
            yield token

    def __next__(self) -> str:
        try:
            return next(self._chunks)
        except StopIteration:
            if self.finish_reason is None:
                self.finish_reason = self._limit_reason
                if self._limit_reason == "context":
                    log.warning(
                        "generation stopped at the end of the model's context (%d tokens): prompt %d + answer %d",
                        self._context,
                        self.prompt_token_count,
                        self.output_token_count,
                    )
            raise

    def close(self) -> None:
        """Stop generating (cancellation); safe to call more than once."""
        self._chunks.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


class Pipeline:
    def __init__(
        self, model: DeepseekVL2, tokenizer: Tokenizer, tiling: TilingConfig, compile: bool = False
    ) -> None:
        self.model, self.tokenizer, self.tiling = model, tokenizer, tiling
        self.decode_step = DecodeStep(model.language, compile)
        self.device = model.image_newline.device
        self.dtype = model.image_newline.dtype
        self.config = model.config
        self.max_context = model.config.language_config.max_position_embeddings
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
        compile: bool = False,
    ) -> Pipeline:
        """Load once. `compile=True` compiles the decode step (CUDA graphs on GPU) and warms it
        up here, so that the first request is as fast as the tenth."""
        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        start = time.perf_counter()
        verify_snapshot(path)
        tokenizer = Tokenizer.from_dir(path)
        model = load_model(path, device, dtype)
        log.info("loaded %s on %s/%s in %.2f s", path, device, dtype, time.perf_counter() - start)
        pipe = cls(model, tokenizer, _tiling_config(path, model), compile)
        if compile:
            start = time.perf_counter()
            pipe.warm_up()
            log.info(
                "compiled and warmed up the decode step in %.1f s", time.perf_counter() - start
            )
        return pipe

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the decode step a few times (compiles / captures it). Touches only cache slot 0,
        which every prefill overwrites."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(1, dtype=torch.long, device=self.device)
        for _ in range(3):
            self.decode_step(token, pos, 1)

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
        pixels = request.images.pixels.to(self.device)
        return self.model.embed(
            request.input_ids, request.image_mask, pixels, list(request.images.crops)
        )

    @torch.inference_mode()
    def prefill_logits(self, request: EncodedRequest) -> torch.Tensor:
        """Float32 logits [V] of the last prompt position (one full forward)."""
        self._check_fits(request)
        return self.model.language.prefill(self.embed(request))[0]

    def generate_ids(
        self, request: EncodedRequest, params: SamplingParams, max_new_tokens: int | None = None
    ) -> Iterator[int]:
        """Token ids of the answer (end-of-sentence included when produced)."""
        params.validate()
        params = numerically_safe(params.with_seed())
        self._check_fits(request)
        budget = params.max_new_tokens if max_new_tokens is None else max_new_tokens
        budget = min(budget, self.max_context - request.num_tokens)
        generator = torch.Generator(self.device).manual_seed(params.seed)
        with torch.inference_mode():
            embeds = self.embed(request)
            yield from generate_tokens(
                self.decode_step,
                embeds,
                request.input_ids,
                params,
                self.tokenizer.eos_id,
                budget,
                generator,
            )

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
        self, prompt: str, images: Sequence[Image.Image], params: SamplingParams
    ) -> TextStream:
        """Validate and encode now (raising InputError), then stream the answer's text."""
        started = time.perf_counter()
        self.validate_prompt(prompt)
        params.validate()
        params = params.with_seed()
        request = self.encode(place_images(prompt, len(images)), images)
        self._check_fits(request)
        max_new = min(params.max_new_tokens, self.max_context - request.num_tokens)
        if max_new < params.max_new_tokens:
            log.warning(
                "prompt %d + max_new_tokens %d exceeds the context of %d tokens: at most %d new tokens",
                request.num_tokens,
                params.max_new_tokens,
                self.max_context,
                max_new,
            )
        return TextStream(self, request, params, max_new, started)
