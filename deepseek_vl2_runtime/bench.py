"""Benchmark: load, preprocessing, time to first token, decode speed and its memory-bandwidth bound.

    python -m deepseek_vl2_runtime.bench (--weights DIR | --random small --tokenizer DIR)
        --device cpu|cuda
        [--dtype bfloat16|float16|float32] [--threads N] [--seed N] [--compile] [--json]
        [--image PATH ...] [--new-tokens N] [--repeats N]          # single stream (default)
        [--concurrency N,N,... [--concurrency-tokens MIN MAX] [--rounds R]]  # concurrent

`--random small` builds vl2-small's real shapes (reference spec §1.3) with seeded random weights
drawn on the device, so the GPU path can be measured without a download; it is refused, before
allocating, where the device cannot hold it. Its prompts are encoded by the production Pipeline
with the tokenizer of `--tokenizer DIR` (vl2-small's or any checkpoint's).
A table goes to stderr (stdout without --json);
with --json the last stdout line is one JSON object:
  per image ("WxH" generated, "file:WxH" for --image): preprocess_ms, prompt_tokens,
    time_to_first_token_ms, ttft_breakdown_ms {preprocess, vision, prefill, sample, total};
  decode_ms (load_image per file); load_s, compile_s; decode_image, new_tokens,
  decode_intervals, decode_ms_per_token (median), decode_ms_per_token_mean, decode_tokens_per_s,
  first_token_via_generate_ms; peak_memory_mb (+ _kind), peak_memory_mb_long_request and
  long_request_tokens (CUDA); weights_bytes_per_token, memory_bandwidth_gbps,
  bound_tokens_per_s, bound_fraction (CUDA; null on CPU, where labelled host_memcpy_* stand in);
  device, device_name, dtype, threads, compile, torch_version, config, seeds, repeats, sampling;
  official_cpu_reference (quoted from the golden README: tiny mla checkpoint, CPU, 1 thread).

Method: fixed seeds, one warm-up, medians over `--repeats` (at most 3 for images above 4 MP).
Timings are host `perf_counter` reads after `torch.cuda.synchronize()` on CUDA. Decode runs the
production loop (the engine at batch 1, product sampling defaults, end-of-sentence ignored) for
exactly N tokens on the first image; its figure is the median interval between yielded ids.
The bound is the bytes of weights one decode step must read (from the config, no KV cache)
over the device bandwidth measured in the same run by a large device-to-device copy.

`--concurrency 1,8,32` REPLACES the single-stream measurements above (each run measures one
thing; `--image`, `--new-tokens` and `--repeats` are refused with it): the JSON keeps the
fields up to compile_s and adds "concurrency". The engine is the production `Engine` with
max_batch = the largest level and end-of-sentence ignored (eos id -1, as for decode above).
Request i of the mix depends on (seed, i) alone, so level N is the first N requests of the
largest: a synthetic image of a drawn size (MIX_SIDE_PX a side), prompt i of MIX_PROMPTS, an
answer length drawn from --concurrency-tokens (default 64 128), product sampling seeded with
seed + i. After a warm-up (the largest mix at once, 8-token answers), the largest mix runs one
request at a time (each level's "sequential" figures are its first N requests of that run),
then each level's N requests are submitted at once (level 1, the lone stream, is always run).
One consumer thread reads all streams through the async front door (`Engine.submit(loop=)`)
and stamps `perf_counter` at each submit and each id. Per level ("results"): wall_s (first
submit to last id), new_tokens (exact: the sum of the answer lengths), tokens_per_s,
steady_state_{s,tokens,tokens_per_s} (the window from the last request's first id to the first
request's last id, when all N decode; null when there is none), ttft_ms, itl_ms (every
inter-token interval; itl_count of them), queue_ms (see QUEUE_NOTE: the engine does not stamp
admission), each {p50, p95} (numpy linear interpolation); "sequential" (the same figures one
at a time); speedup_vs_sequential (sequential wall / concurrent wall); steady_state_vs_lone and
itl_p95_vs_lone (vs level 1); itl_p95_vs_sequential; peak_memory_mb (CUDA max_memory_allocated
during the level; null on CPU); per_request. issue_10_targets judges level 8 when it is run.
`--rounds R` repeats the sequential run and every level R times: "results" are then the medians
over rounds of every figure (each round's ratios against that round's own lone stream and
sequential run; per_request from round 1), "round_ratios" each round's three ratios per level.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import io
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar, cast

import numpy as np
import torch
from PIL import Image

from .chat_template import Tokenizer
from .config import LanguageConfig, VL2Config, required
from .engine import Engine, EngineConfig, TokenStream
from .image_io import load_image
from .image_processing import TilingConfig
from .model import DeepseekVL2
from .pipeline import DTYPES, EncodedRequest, Pipeline, default_dtype
from .random_weights import (  # noqa: F401 (re-exported: the benchmark's --random small)
    SMALL_CONFIG,
    available_bytes,
    estimate_bytes,
    init_random_,
    random_model,
    small_config,
)
from .sampling import SamplingParams, sample

T = TypeVar("T")
SIZES = ((384, 384), (640, 480), (1024, 768), (4032, 3024))
JPEG_SIZE = (4032, 3024)
DECODE_SIZE = (640, 480)
BIG_IMAGE_PIXELS = 4_000_000
PROMPT = "Describe this image."

# Quoted from /work/shared/golden/README.md ("Official code, float32, CPU, 1 torch thread").
OFFICIAL_CPU_REFERENCE = {
    "source": "quoted from the golden README (official DeepSeek-VL2 code, float32, CPU, 1 "
    "thread, the same 2-core machine); NOT measured in this run",
    "decode_ms_per_token": [2.75, 2.96],
    "decode_model_forward_ms": 2.35,
    "prefill_ms_640x480": [172, 205],
    "prefill_note": "embeds + forward until token 1, processor excluded: compare with "
    "time_to_first_token_ms minus preprocess_ms",
    "preprocess_ms": {"640x480": 21, "4032x3024": 189},
    "decode_ms": {"4032x3024": [107, 123]},
    "peak_rss_mb": 600,
}
TINY_MLA = {"hidden_size": 64, "num_hidden_layers": 3, "vocab_size": 1024, "kv_lora_rank": 32}


# -- what a decode step must read -----------------------------------------------------------


def active_params_per_token(cfg: LanguageConfig) -> int:
    """Weights one decode step reads: embedding row, per layer norms + attention + (dense MLP |
    router + top-k routed + shared experts), final norm, lm_head."""
    h = cfg.hidden_size
    if cfg.use_mla:
        qd = cfg.num_attention_heads * cfg.head_dim
        rank = required("kv_lora_rank", cfg.kv_lora_rank)
        q = h * qd if cfg.q_lora_rank is None else cfg.q_lora_rank * (h + 1 + qd)
        attn = q + h * (rank + cfg.qk_rope_head_dim) + rank
        attn += rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        attn += cfg.num_attention_heads * cfg.v_head_dim * h
    else:
        kv = cfg.num_key_value_heads * cfg.head_dim
        attn = 2 * h * h + 2 * h * kv
    total = h + h + cfg.vocab_size * h  # embedding row, final norm, lm_head
    for layer in range(cfg.num_hidden_layers):
        total += 2 * h + attn
        if cfg.layer_is_moe(layer):
            total += required("n_routed_experts", cfg.n_routed_experts) * h  # router
            top_k = required("num_experts_per_tok", cfg.num_experts_per_tok)
            total += 3 * h * cfg.moe_intermediate_size * top_k
            total += 3 * h * cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)
        else:
            total += 3 * h * cfg.intermediate_size
    return total


def weights_bytes_per_token(cfg: LanguageConfig, dtype: torch.dtype) -> int:
    return active_params_per_token(cfg) * dtype.itemsize


# -- device helpers ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the model under test ---------------------------------------------------------------------


class Encoder(Protocol):
    def __call__(self, images: Sequence[Image.Image], prompt: str = PROMPT) -> EncodedRequest: ...


@dataclasses.dataclass
class Runtime:
    """What the benchmark drives: the model, the engine that decodes (end-of-sentence ignored:
    eos id -1; one slot, or one per request of the largest --concurrency level) and its
    request encoder."""

    model: DeepseekVL2
    engine: Engine
    encode: Encoder
    load_s: float
    compile_s: float | None

    @property
    def device(self) -> torch.device:
        return self.model.image_newline.device


def bench_engine(model: DeepseekVL2, compile: bool, max_batch: int) -> tuple[Engine, float | None]:
    """The production engine with end-of-sentence ignored (eos id -1), so every answer runs to
    its max_new_tokens; with compile, the seconds its warm-up (compilation, CUDA-graph capture)
    took."""
    sync(model.image_newline.device)
    start = time.perf_counter()
    engine = Engine(model, -1, EngineConfig(max_batch=max_batch, compile=compile))
    sync(model.image_newline.device)
    return engine, (time.perf_counter() - start) if compile else None


def runtime(
    pipe: Pipeline, load_s: float, compile: bool, max_batch: int
) -> tuple[Runtime, VL2Config]:
    """The benchmark's runtime around a production Pipeline: its request encoder (chat
    template, tokenizer, tiling) and, in place of its engine, which stops at end-of-sentence,
    the same Engine with end-of-sentence ignored."""
    pipe.close()
    engine, compile_s = bench_engine(pipe.model, compile, max_batch)

    def encode(images: Sequence[Image.Image], prompt: str = PROMPT) -> EncodedRequest:
        return pipe.encode("<image>\n" * len(images) + prompt, images)

    return Runtime(pipe.model, engine, encode, load_s, compile_s), pipe.config


def load_weights(
    path: str, device: torch.device, dtype: torch.dtype, compile: bool, max_batch: int = 1
) -> tuple[Runtime, VL2Config]:
    sync(device)
    start = time.perf_counter()
    pipe = Pipeline.load(path, device, dtype, compile=False, engine=EngineConfig(max_batch=1))
    sync(device)
    return runtime(pipe, time.perf_counter() - start, compile, max_batch)


def load_random(
    tokenizer_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool,
    seed: int,
    max_batch: int = 1,
) -> tuple[Runtime, VL2Config]:
    """vl2-small's shapes with seeded random weights, served by a Pipeline whose tokenizer
    comes from `tokenizer_dir` (vl2-small's own, or any checkpoint's: prompts are encoded by
    the production chat template either way; only the text tokens' ids differ)."""
    config = small_config()
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    sync(device)
    start = time.perf_counter()
    model = random_model(config, device, dtype, seed)
    sync(device)
    load_s = time.perf_counter() - start
    tiling = TilingConfig(config.candidate_resolutions, config.tokens_per_side)
    pipe = Pipeline(model, tokenizer, tiling, EngineConfig(max_batch=1))
    return runtime(pipe, load_s, compile, max_batch)


# -- inputs -------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Deterministic RGB image: colour gradients plus seeded noise (some texture for JPEG).
    Built in uint8 throughout, so a 12 MP image does not raise the process's peak memory."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 191, width).astype(np.uint8)[None, :]
    y = np.linspace(0, 191, height).astype(np.uint8)[:, None]
    image = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
    image[..., 0] += x
    image[..., 1] += y
    image[..., 2] += x // 2 + (191 - y) // 2
    return Image.fromarray(image, "RGB")


def size_key(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


# -- measurements -----------------------------------------------------------------------------


def intervals_ms(stamps: Sequence[float]) -> list[float]:
    """Milliseconds between successive `perf_counter` stamps."""
    return [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Milliseconds of `fn()`, device work included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def first_token_stages(
    rt: Runtime, image: Image.Image, params: SamplingParams, seed: int
) -> dict[str, float]:
    """Request start to the first sampled id on the host, stage by stage (ms)."""
    lm, device = rt.model.language, rt.device
    with torch.inference_mode():
        preprocess_ms, request = timed(lambda: rt.encode([image]), device)
        vision_ms, embeds = timed(lambda: rt.engine.embed(request), device)
        # The engine is idle between runs: its cache slot 0 is free for a direct prefill.
        prefill_ms, logits = timed(lambda: lm.prefill(embeds), device)  # [1, V]

        def first_id() -> int:
            seen = torch.zeros(1, lm.config.vocab_size, dtype=torch.bool, device=device)
            seen[0, request.input_ids] = True
            generator = torch.Generator(device).manual_seed(seed)
            return int(sample(logits, seen, [params], [generator])[0])

        sample_ms, _ = timed(first_id, device)
    stages = {
        "preprocess": preprocess_ms,
        "vision": vision_ms,
        "prefill": prefill_ms,
        "sample": sample_ms,
    }
    return {**stages, "total": sum(stages.values())}


def decode_run(
    rt: Runtime, image: Image.Image, n: int, params: SamplingParams, seed: int
) -> tuple[float, list[float]]:
    """One request through the engine, exactly n ids (end-of-sentence ignored).

    Returns (ms from request start to the first yielded id, the ms intervals between yields).
    The last interval is dropped (as with the pre-engine token loop, where the final yield
    followed no decode step), so the count stays n - 2."""
    sync(rt.device)
    start = time.perf_counter()
    request = rt.encode([image])
    stream = rt.engine.submit(request, dataclasses.replace(params, max_new_tokens=n, seed=seed))
    stamps = [time.perf_counter() for _ in stream]
    if len(stamps) != n:
        raise RuntimeError(f"the engine yielded {len(stamps)} ids, expected {n}")
    intervals = intervals_ms(stamps)[:-1]
    return (stamps[0] - start) * 1e3, intervals


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int = 7) -> float:
    """2 x bytes / time of a device-to-device copy (read + write), median of `repeats`."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 3)


# -- the benchmark ------------------------------------------------------------------------------

CONFIG_KEYS: tuple[str, ...] = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "use_mla",
)
CONFIG_KEYS += ("kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "n_shared_experts")
CONFIG_KEYS += ("vocab_size",)


def measure_file_decode(
    jpeg: bytes, paths: Sequence[str], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, Image.Image]]:
    """`load_image` ms for the 4032x3024 JPEG and each --image file; the files, decoded."""
    decode_ms: dict[str, float] = {}
    decoded: dict[str, Image.Image] = {}
    files = [(f"{JPEG_SIZE[0]}x{JPEG_SIZE[1]}", jpeg)]
    files += [(Path(p).name, Path(p).read_bytes()) for p in paths]
    for i, (name, data) in enumerate(files):
        image = load_image(data)  # warm-up
        if i:
            name = f"{name}:{size_key(image)}"
            decoded[name] = image
        times = [timed(functools.partial(load_image, data), device)[0] for _ in range(repeats)]
        decode_ms[name] = _median(times)
    return decode_ms, decoded


def measure_images(
    rt: Runtime, images: dict[str, Image.Image], params: SamplingParams, seed: int, repeats: int
) -> dict:
    """Per image: preprocessing + prompt building alone, and time to first token by stage."""
    out: dict[str, dict] = {"preprocess_ms": {}, "prompt_tokens": {}}
    out |= {"time_to_first_token_ms": {}, "ttft_breakdown_ms": {}}
    for key, image in images.items():
        n = min(repeats, 3) if image.width * image.height > BIG_IMAGE_PIXELS else repeats
        out["prompt_tokens"][key] = rt.encode([image]).num_tokens  # and warm-up
        times = [timed(functools.partial(rt.encode, [image]), rt.device)[0] for _ in range(n)]
        out["preprocess_ms"][key] = _median(times)
        first_token_stages(rt, image, params, seed)  # warm-up
        runs = [first_token_stages(rt, image, params, seed) for _ in range(n)]
        out["time_to_first_token_ms"][key] = _median([r["total"] for r in runs])
        out["ttft_breakdown_ms"][key] = {k: _median([r[k] for r in runs]) for k in runs[0]}
    return out


def measure_decode(
    rt: Runtime, image: Image.Image, n: int, params: SamplingParams, seed: int, repeats: int
) -> dict:
    decode_run(rt, image, min(n, 16), params, seed)  # warm-up
    first_yield, intervals = [], []
    for _ in range(repeats):
        first, steps = decode_run(rt, image, n, params, seed)
        first_yield.append(first)
        intervals += steps
    per_token = statistics.median(intervals)
    return {
        "new_tokens": n,
        "decode_intervals": len(intervals),
        "decode_ms_per_token": round(per_token, 4),
        "decode_ms_per_token_mean": round(statistics.fmean(intervals), 4),
        "decode_tokens_per_s": round(1e3 / per_token, 2),
        "first_token_via_generate_ms": _median(first_yield),
    }


def measure_long_request(
    rt: Runtime, image: Image.Image, params: SamplingParams, seed: int
) -> dict:
    """CUDA peak memory of a ~4096-token request (two tiled 4032x3024 images, 16 new tokens)."""
    request = rt.encode([image, image])
    room = rt.model.language.max_seq - request.num_tokens
    out: dict[str, float | None] = {"long_request_tokens": request.num_tokens}
    out["peak_memory_mb_long_request"] = None
    if room > 1:
        torch.cuda.reset_peak_memory_stats(rt.device)
        n = min(16, room)
        for _ in rt.engine.submit(
            request, dataclasses.replace(params, max_new_tokens=n, seed=seed)
        ):
            pass
        sync(rt.device)
        out["peak_memory_mb_long_request"] = round(peak_memory_mb(rt.device), 1)
    return out


def measure_bound(device: torch.device, bytes_per_token: int, tokens_per_s: float) -> dict:
    """Decode bound = copy bandwidth / weight bytes per step (on CPU a labelled host figure)."""
    if device.type == "cuda":
        gbps = copy_bandwidth_gbps(device, min(2**30, torch.cuda.mem_get_info(device)[0] // 4))
        bound = gbps * 1e9 / bytes_per_token
        return {
            "memory_bandwidth_gbps": round(gbps, 1),
            "bound_tokens_per_s": round(bound, 2),
            "bound_fraction": round(tokens_per_s / bound, 4),
        }
    gbps = copy_bandwidth_gbps(device, 256 * 2**20)
    bound = gbps * 1e9 / bytes_per_token
    return {
        "memory_bandwidth_gbps": None,
        "bound_tokens_per_s": None,
        "bound_fraction": None,
        "host_memcpy_gbps": round(gbps, 2),
        "host_memcpy_bound_tokens_per_s": round(bound, 1),
        "host_memcpy_bound_fraction": round(tokens_per_s / bound, 6),
        "host_memcpy_note": "CPU: bandwidth of a host tensor copy with the same thread count; "
        "a rough roofline, not a device bound",
    }


# -- concurrent requests ----------------------------------------------------------------------

MIX_PROMPTS = (
    PROMPT,
    "What colours and shapes do you see in this picture?",
    "Write a short story about this image, with a beginning, a middle and an end.",
    "List every object in the image and say where it is.",
    "Is there any text in this image? Read it out.",
    "Explain what this picture could be used for, in detail.",
)
MIX_SIDE_PX = (256, 1280)  # each synthetic image's width and height are drawn in this range
ANSWER_TOKENS = (64, 128)  # each answer's length is drawn in this range (default)
MIX_WARMUP_TOKENS = 8
QUEUE_NOTE = (
    "the engine does not stamp admission, so queue_ms is the time to first token minus the "
    "same request's time to first token alone (the sequential run): the wait the other "
    "requests caused (with max_batch >= N every request is admitted at the next step; it then "
    "waits for the prefill chunks of the requests ahead of it); noise can make it slightly "
    "negative"
)


@dataclasses.dataclass(frozen=True)
class MixRequest:
    image: str  # "WxH"
    request: EncodedRequest
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class Trace:
    """One request as its consumer saw it: `perf_counter` at submit and at each yielded id."""

    submitted: float
    stamps: list[float]

    @property
    def ttft_ms(self) -> float:
        return (self.stamps[0] - self.submitted) * 1e3


def request_mix(rt: Runtime, n: int, answer_tokens: tuple[int, int], seed: int) -> list[MixRequest]:
    """n requests; request i depends on (seed, i) alone, so a level's mix is the first N
    requests of a larger level's: a synthetic image of a drawn size, prompt i (cycling through
    MIX_PROMPTS), a drawn answer length, product sampling seeded with seed + i."""
    mix = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        w, h = (int(v) for v in rng.integers(MIX_SIDE_PX[0], MIX_SIDE_PX[1] + 1, size=2))
        length = int(rng.integers(answer_tokens[0], answer_tokens[1] + 1))
        image = synthetic_image(w, h, int(rng.integers(2**31)))
        request = rt.encode([image], MIX_PROMPTS[i % len(MIX_PROMPTS)])
        params = SamplingParams(max_new_tokens=length, seed=seed + i)
        mix.append(MixRequest(size_key(image), request, params))
    return mix


async def _stamps(stream: TokenStream) -> list[float]:
    return [time.perf_counter() async for _ in stream]


def serve(engine: Engine, mix: Sequence[MixRequest], concurrent: bool) -> list[Trace]:
    """The mix through the engine: all submitted at once (concurrent; the engine admits FIFO) or
    each after the previous one finished. One consumer thread reads every stream through the
    engine's async front door (`submit(loop=...)`, as the Cog predictor does)."""

    async def run_all() -> list[Trace]:
        loop = asyncio.get_running_loop()

        def submit(r: MixRequest) -> tuple[float, TokenStream]:
            return time.perf_counter(), engine.submit(r.request, r.params, loop=loop)

        if concurrent:
            streams = [submit(r) for r in mix]
            stamps = await asyncio.gather(*(_stamps(s) for _, s in streams))
            return [Trace(t, st) for (t, _), st in zip(streams, stamps, strict=True)]
        traces = []
        for r in mix:
            submitted, stream = submit(r)
            traces.append(Trace(submitted, await _stamps(stream)))
        return traces

    sync(engine.device)
    traces = asyncio.run(run_all())
    for r, trace in zip(mix, traces, strict=True):
        if len(trace.stamps) != r.params.max_new_tokens:
            raise RuntimeError(
                f"the engine yielded {len(trace.stamps)} ids, expected {r.params.max_new_tokens}"
            )
    return traces


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 and p95 (numpy's linear interpolation), rounded to 3 decimals."""
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3)}


def serving_figures(traces: Sequence[Trace]) -> dict:
    """Wall time (first submit to last id), aggregate rate, the steady state (the window from
    the last request's first id to the first request's last id, when all of them decode; null
    when there is no such window), time to first token and inter-token intervals."""
    wall = max(t.stamps[-1] for t in traces) - min(t.submitted for t in traces)
    tokens = sum(len(t.stamps) for t in traces)
    itl = [x for t in traces for x in intervals_ms(t.stamps)]
    begin, end = max(t.stamps[0] for t in traces), min(t.stamps[-1] for t in traces)
    steady = sum(begin < x <= end for t in traces for x in t.stamps) if end > begin else None
    return {
        "wall_s": round(wall, 6),
        "new_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "steady_state_s": round(end - begin, 6) if steady is not None else None,
        "steady_state_tokens": steady,
        "steady_state_tokens_per_s": None if steady is None else round(steady / (end - begin), 2),
        "ttft_ms": percentiles([t.ttft_ms for t in traces]),
        "itl_ms": percentiles(itl),
        "itl_count": len(itl),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def measure_level(
    rt: Runtime, mix: Sequence[MixRequest], alone: Sequence[Trace], lone: dict | None
) -> dict:
    """The N requests of `mix` submitted at once, against the same N run one at a time (`alone`,
    from the sequential run) and a lone stream (`lone`: level 1's figures; None for level 1)."""
    device = rt.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    traces = serve(rt.engine, mix, concurrent=True)
    figures = serving_figures(traces)
    sequential = serving_figures(alone)
    lone = lone or figures
    queue = [t.ttft_ms - a.ttft_ms for t, a in zip(traces, alone, strict=True)]
    return {
        "requests": len(mix),
        **figures,
        "queue_ms": percentiles(queue),
        "sequential": sequential,
        "speedup_vs_sequential": _ratio(sequential["wall_s"], figures["wall_s"]),
        "steady_state_vs_lone": _ratio(
            figures["steady_state_tokens_per_s"], lone["steady_state_tokens_per_s"]
        ),
        "itl_p95_vs_lone": _ratio(figures["itl_ms"]["p95"], lone["itl_ms"]["p95"]),
        "itl_p95_vs_sequential": _ratio(figures["itl_ms"]["p95"], sequential["itl_ms"]["p95"]),
        "peak_memory_mb": round(peak_memory_mb(device), 1) if device.type == "cuda" else None,
        "per_request": [
            {
                "image": r.image,
                "prompt_tokens": r.request.num_tokens,
                "new_tokens": len(t.stamps),
                "ttft_ms": round(t.ttft_ms, 3),
                "ttft_alone_ms": round(a.ttft_ms, 3),
                "queue_ms": round(q, 3),
            }
            for r, t, a, q in zip(mix, traces, alone, queue, strict=True)
        ],
    }


def issue_targets(level: dict) -> dict:
    """Issue 10's targets (CPU, tiny checkpoint) for one level: wall <= 0.5x the same requests
    one at a time, steady-state rate >= 4x a lone stream's, ITL p95 <= 3x a lone stream's."""

    def goal(value: float | None, target: float, at_least: bool) -> dict:
        met = None if value is None else (value >= target if at_least else value <= target)
        return {"value": value, "target": target, "met": met}

    return {
        "requests": level["requests"],
        "speedup_vs_sequential": goal(level["speedup_vs_sequential"], 2.0, True),
        "steady_state_vs_lone": goal(level["steady_state_vs_lone"], 4.0, True),
        "itl_p95_vs_lone": goal(level["itl_p95_vs_lone"], 3.0, False),
    }


def median_of(rounds: Sequence) -> object:
    """The per-round figures combined leaf by leaf: numbers -> their median (None when any
    round has none: a window that did not occur every time); lists (per_request) -> the first
    round's; everything else must agree."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in rounds]) for k in first}
    if isinstance(first, list):
        return first
    if any(r is None for r in rounds):
        return None
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    value = statistics.median(rounds)
    return value if isinstance(first, float) else round(value)


def measure_concurrency(
    rt: Runtime, levels: Sequence[int], answer_tokens: tuple[int, int], seed: int, rounds: int = 1
) -> dict:
    """Warm-up (the largest mix at once, short answers), then `rounds` times: the largest mix one
    request at a time (each level's sequential figures are its first N requests of that run),
    then each level. A level's figures are the medians over rounds of each round's figures
    (ratios included: each round's ratio is taken against that round's lone stream and
    sequential run, so a machine whose speed drifts between rounds moves both sides)."""
    if rt.engine.slots < max(levels):
        raise SystemExit(
            f"the KV cache holds {rt.engine.slots} sequences; --concurrency {max(levels)} "
            "needs one per request"
        )
    mix = request_mix(rt, max(levels), answer_tokens, seed)
    short = [
        dataclasses.replace(
            r,
            params=dataclasses.replace(
                r.params, max_new_tokens=min(MIX_WARMUP_TOKENS, r.params.max_new_tokens)
            ),
        )
        for r in mix
    ]
    serve(rt.engine, short, concurrent=True)
    by_round: list[list[dict]] = []
    for _ in range(rounds):
        alone = serve(rt.engine, mix, concurrent=False)
        results: list[dict] = []
        for n in levels:
            results.append(measure_level(rt, mix[:n], alone[:n], results[0] if results else None))
        by_round.append(results)
    results = [cast("dict", median_of(level)) for level in zip(*by_round, strict=True)]
    out = {
        "levels": list(levels),
        "answer_tokens": list(answer_tokens),
        "image_side_px": list(MIX_SIDE_PX),
        "prompts": len(MIX_PROMPTS),
        "engine_slots": rt.engine.slots,
        "prefill_chunk": rt.engine.prefill_chunk,
        "sampling": "product defaults, request i seeded with seed + i; end-of-sentence ignored",
        "consumer": "one thread, asyncio (Engine.submit(loop=...)); times are perf_counter at "
        "submit and when each id reaches its consumer",
        "queue_note": QUEUE_NOTE,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rounds": rounds,
        "results": results,
        "round_ratios": [
            {
                str(level["requests"]): {
                    k: level[k]
                    for k in ("speedup_vs_sequential", "steady_state_vs_lone", "itl_p95_vs_lone")
                }
                for level in results_of_round
            }
            for results_of_round in by_round
        ],
    }
    if 8 in levels:
        out["issue_10_targets"] = issue_targets(results[levels.index(8)])
    return out


MET = {True: "met", False: "NOT met", None: "not measured"}
# (header, width, path into a level's figures, format); "-" where a figure is null
CONCURRENCY_COLUMNS = (
    ("N", 3, ("requests",), "d"),
    ("tokens", 7, ("new_tokens",), "d"),
    ("wall s", 8, ("wall_s",), ".3f"),
    ("seq s", 8, ("sequential", "wall_s"), ".3f"),
    ("x seq", 7, ("speedup_vs_sequential",), ".2f"),
    ("tok/s", 8, ("tokens_per_s",), ".0f"),
    ("steady", 8, ("steady_state_tokens_per_s",), ".0f"),
    ("x lone", 7, ("steady_state_vs_lone",), ".2f"),
    ("TTFT p50", 10, ("ttft_ms", "p50"), ".1f"),
    ("p95", 8, ("ttft_ms", "p95"), ".1f"),
    ("ITL p50", 9, ("itl_ms", "p50"), ".2f"),
    ("p95", 8, ("itl_ms", "p95"), ".2f"),
    ("x lone", 7, ("itl_p95_vs_lone",), ".2f"),
    ("x seq", 7, ("itl_p95_vs_sequential",), ".2f"),
    ("queue p50", 10, ("queue_ms", "p50"), ".1f"),
    ("p95", 8, ("queue_ms", "p95"), ".1f"),
    ("peak MB", 9, ("peak_memory_mb",), ".0f"),
)


def format_concurrency(c: dict) -> list[str]:
    lo, hi = c["answer_tokens"]
    lines = [
        f"concurrency: N requests submitted at once (answers {lo}-{hi} tokens, end-of-sentence "
        f"ignored; images {c['image_side_px'][0]}-{c['image_side_px'][1]} px a side; "
        f"{c['engine_slots']} engine slots; load average {c['load_average_1m']}; "
        f"medians of {c['rounds']} round(s))",
        "x seq: the same N one at a time (seq s) / at once (wall s); steady: tokens/s while all "
        "N decode; x lone: vs level 1; ITL x seq: vs the same N one at a time; times in ms",
        "".join(f"{head:>{width}}" for head, width, _, _ in CONCURRENCY_COLUMNS),
    ]
    for level in c["results"]:
        row = []
        for _, width, path, fmt in CONCURRENCY_COLUMNS:
            value = level
            for key in path:
                value = value[key]
            row.append(f"{'-' if value is None else format(value, fmt):>{width}}")
        lines.append("".join(row))
    if c["rounds"] > 1:
        for i, ratios in enumerate(c["round_ratios"], 1):
            lines.append(
                f"round {i}: "
                + "; ".join(
                    f"N={n} x seq {r['speedup_vs_sequential']} steady x lone "
                    f"{r['steady_state_vs_lone']} ITL p95 x lone {r['itl_p95_vs_lone']}"
                    for n, r in ratios.items()
                    if n != "1"
                )
            )
    targets = c.get("issue_10_targets")
    if targets:
        goals = [(k, g) for k, g in targets.items() if k != "requests"]
        lines.append(
            f"issue 10 targets at {targets['requests']} requests: "
            + "; ".join(
                f"{k} {g['value']} (target {'<=' if k.startswith('itl') else '>='} "
                f"{g['target']}: {MET[g['met']]})"
                for k, g in goals
            )
        )
    return lines


def measure_single(rt: Runtime, config: VL2Config, args: argparse.Namespace) -> dict:
    """The single-stream benchmark: file decode, per-image TTFT, batch-1 decode, memory, bound."""
    device, dtype, seed, repeats = rt.device, rt.model.image_newline.dtype, args.seed, args.repeats
    lc = config.language_config
    params = SamplingParams(seed=seed)
    generated = [synthetic_image(w, h, seed + i) for i, (w, h) in enumerate(SIZES)]
    images = {size_key(image): image for image in generated}
    big = images[f"{JPEG_SIZE[0]}x{JPEG_SIZE[1]}"]
    jpeg = io.BytesIO()
    big.save(jpeg, "JPEG", quality=90)
    decode_ms, user_images = measure_file_decode(jpeg.getvalue(), args.image, repeats, device)
    images |= user_images
    decode_key = next(iter(user_images), f"{DECODE_SIZE[0]}x{DECODE_SIZE[1]}")
    per_image = measure_images(rt, images, params, seed, repeats)
    if per_image["prompt_tokens"][decode_key] + args.new_tokens > rt.model.language.max_seq:
        raise SystemExit(f"the prompt of {decode_key} + {args.new_tokens} tokens exceed the cache")
    decode = measure_decode(rt, images[decode_key], args.new_tokens, params, seed, repeats)
    peak = round(peak_memory_mb(device), 1)
    long_request = {"long_request_tokens": None, "peak_memory_mb_long_request": None}
    if device.type == "cuda":
        long_request = measure_long_request(rt, big, params, seed)
    bytes_per_token = weights_bytes_per_token(lc, dtype)
    result = {
        "repeats": repeats,
        "repeats_big_images": min(repeats, 3),
        "warmup_runs": 1,
        "decode_ms": decode_ms,
        **per_image,
        "decode_image": decode_key,
        **decode,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
        **long_request,
        "weights_bytes_per_token": bytes_per_token,
        **measure_bound(device, bytes_per_token, decode["decode_tokens_per_s"]),
    }
    tiny_mla = lc.use_mla and all(getattr(lc, k) == v for k, v in TINY_MLA.items())
    if args.weights and tiny_mla and device.type == "cpu" and torch.get_num_threads() == 1:
        result["official_cpu_reference"] = OFFICIAL_CPU_REFERENCE
    return result


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    seed, levels = args.seed, args.concurrency or []
    max_batch = max(levels, default=1)
    if args.weights:
        rt, config = load_weights(args.weights, device, dtype, args.compile, max_batch)
    else:
        rt, config = load_random(args.tokenizer, device, dtype, args.compile, seed, max_batch)
    try:
        if levels:
            answer_tokens = tuple(args.concurrency_tokens or ANSWER_TOKENS)
            measured = {
                "concurrency": measure_concurrency(rt, levels, answer_tokens, seed, args.rounds)
            }
            seeds = {"mix": seed, "sampling": seed}
        else:
            measured = measure_single(rt, config, args)
            seeds = {"images": [seed + i for i in range(len(SIZES))], "sampling": seed}
    finally:
        rt.engine.close()
    lc = config.language_config
    summary = {k: getattr(lc, k) for k in CONFIG_KEYS}
    summary |= {
        "vision_layers": config.vision_config.layers,
        "vision_width": config.vision_config.width,
        "total_params": sum(p.numel() for p in rt.model.parameters()),
        "active_params_per_token": active_params_per_token(lc),
    }
    return {
        "schema": "deepseek_vl2_runtime.bench/1",
        "source": f"weights:{args.weights}" if args.weights else f"random:{args.random}",
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": summary,
        "seeds": seeds if args.weights else seeds | {"model_init": seed},
        "sampling": dataclasses.asdict(SamplingParams(seed=seed)),
        "load_s": round(rt.load_s, 3),
        "compile_s": None if rt.compile_s is None else round(rt.compile_s, 3),
        **measured,
    }


def format_table(r: dict) -> str:
    lines = [
        f"DeepSeek-VL2 benchmark: {r['source']}  {r['device']} ({r['device_name']}) "
        f"{r['dtype']}  threads {r['threads']}  compile {r['compile']}  torch {r['torch_version']}",
        f"load {r['load_s']:.3f} s"
        + (f"   compile+warm-up {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""),
    ]
    if "concurrency" in r:
        return "\n".join(lines + format_concurrency(r["concurrency"]))
    lines += [
        f"{'image':<22}{'tokens':>7}{'preproc':>10}{'vision':>10}{'prefill':>10}{'sample':>9}"
        f"{'TTFT':>10}  (ms, median)",
    ]
    for key, ttft in r["time_to_first_token_ms"].items():
        b = r["ttft_breakdown_ms"][key]
        lines.append(
            f"{key:<22}{r['prompt_tokens'][key]:>7}{r['preprocess_ms'][key]:>10.2f}"
            f"{b['vision']:>10.2f}{b['prefill']:>10.2f}{b['sample']:>9.2f}{ttft:>10.2f}"
        )
    for key, ms in r["decode_ms"].items():
        lines.append(f"file decode (load_image) {key}: {ms:.2f} ms")
    lines += [
        f"decode {r['decode_image']}, {r['new_tokens']} tokens x {r['repeats']} runs: "
        f"{r['decode_ms_per_token']:.3f} ms/token median ({r['decode_ms_per_token_mean']:.3f} mean), "
        f"{r['decode_tokens_per_s']:.1f} tokens/s; first id via the engine "
        f"{r['first_token_via_generate_ms']:.2f} ms",
        f"weights read per token {r['weights_bytes_per_token'] / 1e6:.3f} MB; peak memory "
        f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})",
    ]
    if r["memory_bandwidth_gbps"] is not None:
        lines.append(
            f"bandwidth {r['memory_bandwidth_gbps']} GB/s -> bound {r['bound_tokens_per_s']} "
            f"tokens/s; achieved {100 * r['bound_fraction']:.1f} %"
        )
        if r["peak_memory_mb_long_request"] is not None:
            lines.append(
                f"peak memory, {r['long_request_tokens']}-token request: "
                f"{r['peak_memory_mb_long_request']:.0f} MB"
            )
    else:
        lines.append(
            f"[CPU, host memcpy, not a device bound] {r['host_memcpy_gbps']} GB/s -> "
            f"{r['host_memcpy_bound_tokens_per_s']} tokens/s; achieved "
            f"{100 * r['host_memcpy_bound_fraction']:.3f} %"
        )
    ref = r.get("official_cpu_reference")
    if ref:
        lines.append(
            f"official CPU reference (quoted from the golden README, not measured now): decode "
            f"{ref['decode_ms_per_token'][0]}-{ref['decode_ms_per_token'][1]} ms/token, prefill "
            f"{ref['prefill_ms_640x480'][0]}-{ref['prefill_ms_640x480'][1]} ms (640x480, "
            f"processor excluded), processor {ref['preprocess_ms']['640x480']} ms (640x480) / "
            f"{ref['preprocess_ms']['4032x3024']} ms (4032x3024), peak RSS ~{ref['peak_rss_mb']} MB"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepseek_vl2_runtime.bench")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="checkpoint directory (Hugging Face layout)")
    source.add_argument(
        "--random", choices=["small"], help="vl2-small shapes, seeded random weights"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="with --random: a directory holding tokenizer.json (vl2-small's, or any checkpoint's)",
    )
    parser.add_argument("--device", required=True, choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 cuda, fp32 cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--image",
        action="extend",
        nargs="+",
        default=[],
        help="image file(s) to add; the first is decoded (default: a generated 640x480 image)",
    )
    parser.add_argument("--new-tokens", type=int, help="decode length (default 256)")
    parser.add_argument("--repeats", type=int, help="timed runs (default 5; big images 3)")
    parser.add_argument(
        "--concurrency",
        type=levels,
        metavar="N,N,...",
        help="instead of the single-stream figures: N requests at once for each N (1 is added)",
    )
    parser.add_argument(
        "--concurrency-tokens",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help=f"answer lengths of the concurrency mix (default {ANSWER_TOKENS[0]} {ANSWER_TOKENS[1]})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="with --concurrency: times the sequential run and every level are measured "
        "(figures: medians over rounds; default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="images, random weights, sampling")
    parser.add_argument("--compile", action="store_true", help="compiled decode step")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    return parser


def levels(text: str) -> list[int]:
    """--concurrency: comma-separated request counts >= 1, sorted, with the lone stream (1)."""
    try:
        counts = {int(n) for n in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integers, e.g. 1,8,32"
        ) from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: request counts must be >= 1")
    return sorted(counts | {1})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if bool(args.random) != bool(args.tokenizer):
        raise SystemExit("--random needs --tokenizer DIR (and --tokenizer goes with --random)")
    if args.concurrency:
        if args.image or args.new_tokens is not None or args.repeats is not None:
            raise SystemExit(
                "--image, --new-tokens and --repeats set the single-stream benchmark; "
                "--concurrency takes --concurrency-tokens MIN MAX"
            )
        lo, hi = args.concurrency_tokens or ANSWER_TOKENS
        if not 2 <= lo <= hi:
            raise SystemExit("--concurrency-tokens needs 2 <= MIN <= MAX")
        args.rounds = 1 if args.rounds is None else args.rounds
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
    else:
        if args.concurrency_tokens or args.rounds is not None:
            raise SystemExit("--concurrency-tokens and --rounds go with --concurrency")
        args.new_tokens = 256 if args.new_tokens is None else args.new_tokens
        args.repeats = 5 if args.repeats is None else args.repeats
        if args.new_tokens < 3 or args.repeats < 1:
            raise SystemExit("--new-tokens must be >= 3 and --repeats >= 1")
    result = run(args)
    table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
