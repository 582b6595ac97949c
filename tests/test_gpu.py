"""CUDA-only checks (skipped without a GPU): the GPU dtype and the GPU decode machinery.

Run on a GPU host with `make test` (or `pytest tests/test_gpu.py`); `scripts/gpu_check.sh` runs
them on a bare device machine, with tests/test_real_width.py (vl2-small's widths on CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from deepseek_vl2_runtime import Pipeline, SamplingParams
from deepseek_vl2_runtime.engine import EngineConfig
from deepseek_vl2_runtime.sampling import sample

from checkpoints import MLA_MODEL
from paths import golden_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPT = "<image>\nWhat is in this picture?"
SMALL_ENGINE = EngineConfig(max_batch=2)  # compiled: batch buckets 1 and 2 only


@pytest.fixture(scope="module")
def image():
    return Image.open(golden_image("img_640x480.png")).convert("RGB")


def test_bf16_on_cuda_stays_close_to_float32(mla_pipeline, image) -> None:
    gpu = Pipeline.load(MLA_MODEL, compile=False)  # defaults: cuda, bfloat16
    assert gpu.device.type == "cuda"
    assert gpu.dtype == torch.bfloat16
    ref = mla_pipeline.prefill_logits(mla_pipeline.encode(PROMPT, [image]))
    got = gpu.prefill_logits(gpu.encode(PROMPT, [image])).cpu()
    assert (got - ref).abs().max().item() < 0.25
    assert "".join(gpu.stream(PROMPT, [image], SamplingParams(temperature=0, max_new_tokens=16)))


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise on any CUDA call inside that would make the host wait for the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@torch.inference_mode()
def test_decode_steps_do_not_synchronise(image) -> None:
    """A decode step and the sampling after it never make the host wait for the device (eager
    and compiled): the engine's one read per step is the sampled ids, after both."""
    for compile in (False, True):
        gpu = Pipeline.load(MLA_MODEL, compile=compile, engine=SMALL_ENGINE)
        try:
            embeds = gpu.embed(gpu.encode(PROMPT, [image]))
            logits = gpu.model.language.prefill(embeds)  # [1, V]; the engine is idle
            seen = torch.zeros_like(logits, dtype=torch.bool)
            params = [SamplingParams(temperature=1.0, seed=0)]
            generators = [torch.Generator("cuda").manual_seed(0)]
            pos = embeds.shape[1]
            for _ in range(8):
                with no_host_sync():
                    ids = sample(logits, seen, params, generators)
                    seen[0, ids] = True
                token = int(ids[0])  # the engine's one read per step
                with no_host_sync():
                    logits = gpu.engine.step([token], [pos])
                pos += 1
        finally:
            gpu.close()


def test_cuda_graph_decode_equals_eager(image) -> None:
    """float32 on CUDA so that greedy ids must agree exactly."""
    eager = Pipeline.load(MLA_MODEL, device="cuda", dtype=torch.float32, engine=SMALL_ENGINE)
    graphed = Pipeline.load(
        MLA_MODEL, device="cuda", dtype=torch.float32, compile=True, engine=SMALL_ENGINE
    )
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=32, seed=0)
    runs = [list(p.generate_ids(p.encode(PROMPT, [image]), params)) for p in (eager, graphed)]
    assert runs[0] == runs[1]


def test_peak_memory_of_a_long_request_is_small(image) -> None:
    """Two tiled images + text near the 4096 context: activations stay far below the weights
    (on vl2-small the bound is weights + 3 GB; the tiny model makes this a smoke check)."""
    gpu = Pipeline.load(MLA_MODEL, compile=False)  # eager: no CUDA-graph pools in the figure
    torch.cuda.reset_peak_memory_stats()
    big = Image.new("RGB", (1024, 768), (120, 30, 200))  # 3x2 tiles: 1415 tokens each
    stream = gpu.stream("Compare. " * 200, [big, big], SamplingParams(max_new_tokens=64, seed=0))
    list(stream)
    assert 3500 < stream.prompt_token_count < 4096 - 64
    assert torch.cuda.max_memory_allocated() < 3 * 2**30
