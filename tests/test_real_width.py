"""vl2-small at its real widths, reduced depth: shape bugs surface here, on CPU, not on a GPU.

A random snapshot in the real on-disk format (random_weights.write_checkpoint: bf16 safetensors
shards + index, the real config.json key set, the real DeepSeek tokenizer when the shared golden
folder has it) with vl2-small's widths and 2 + 2 layers: hidden 2048, MLA (kv_lora 512, rope 64,
nope 128, v 128, 16 heads, no q_lora), layer 0 dense (intermediate 10944), layer 1 MoE (64
experts of 1408, top-6, 2 shared), vocab 102400, SigLIP width 1152 / 2 blocks / 16 heads /
patch 14 / 384 px, projector 4608 -> 2048. It is loaded through the strict production loader
(`Pipeline.load`) in float32 and bf16 (and on CUDA too where there is one: that is where the
gathered / dense MoE decode paths run); cached decode must agree with a full forward.

~1.2 B parameters (2.3 GB on disk, 4.5 GB in float32), so the module is `slow`: one snapshot
and one pipeline per (device, dtype), module-scoped, the previous one freed first.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from PIL import Image

from deepseek_vl2_runtime import Pipeline, SamplingParams
from deepseek_vl2_runtime.engine import EngineConfig
from deepseek_vl2_runtime.language import MoE
from deepseek_vl2_runtime.random_weights import config_dict, write_checkpoint

from paths import SHARED_GOLDEN, TESTS_DATA, tiny_checkpoint

pytestmark = pytest.mark.slow

LAYERS, VISION_LAYERS = 2, 2
PROMPT = "<image>\nDescribe this image."
TEXT = "The quick brown fox jumps over the lazy dog, twice."


# -- the model-level API: every call into it is here, so that adapting to a new one is local ----


def load(path, device: str, dtype: torch.dtype) -> Pipeline:
    return Pipeline.load(path, device=device, dtype=dtype, engine=EngineConfig(max_batch=2))


def embeds_of(pipe: Pipeline, prompt: str, images: list[Image.Image]) -> torch.Tensor:
    """inputs_embeds [1, T, H] of an encoded prompt (images through vision + projector)."""
    return pipe.embed(pipe.encode(prompt, images))


def full_forward(pipe: Pipeline, embeds: torch.Tensor, last: int) -> torch.Tensor:
    """Float32 logits [last, V] of the final `last` positions, no cache read (one prefill)."""
    lm = pipe.model.language
    return lm.logits(lm.hidden_states(embeds)[0, -last:])


def cached(pipe: Pipeline, prompt: torch.Tensor, ids: list[int], masked: bool) -> torch.Tensor:
    """Float32 logits [1 + len(ids), V]: the prefill's last position, then one decode step per
    id (positions T, T+1, ...), reading the cache: eager (`length`, the filled part only), or
    `masked` (the whole cache under the position mask, the compiled step's shapes)."""
    lm = pipe.model.language
    out = [lm.prefill(prompt)[0]]
    t = prompt.shape[1]
    for i, token in enumerate(ids):
        tok = torch.tensor([[token]], device=pipe.device)
        pos = torch.tensor([t + i], device=pipe.device)
        out.append(lm.decode(tok, pos, None if masked else t + i + 1)[0])
    return torch.stack(out)


def routed(moe: MoE, x: torch.Tensor, way: str) -> torch.Tensor:
    """The routed part of an MoE layer, [N, k, H], one of its three ways."""
    ids, _ = moe.gate(x)
    return {"grouped": moe._routed_grouped, "gathered": moe._routed_gathered}.get(
        way, moe._routed_dense
    )(x, ids)


# -- fixtures ---------------------------------------------------------------------------------


def tokenizer_dir():
    """The real DeepSeek tokenizer (golden case `realtok`) when present, else the tiny one."""
    for base in (TESTS_DATA / "golden", SHARED_GOLDEN):
        candidate = base / "cases" / "realtok" / "model"
        if (candidate / "tokenizer.json").is_file():
            return candidate
    found = tiny_checkpoint()
    if found is None:
        pytest.skip("no tokenizer files (golden folder absent)")
    return found


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    """This module is compute-bound at 2048 wide: use every core (conftest sets 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, all_cores):
    return write_checkpoint(
        tmp_path_factory.mktemp("real_width"),
        config_dict(LAYERS, VISION_LAYERS),
        tokenizer_dir(),
        seed=0,
        shard_bytes=2 * 10**9,  # 2 shards + index, like the hub's layout
    )


CASES = [
    pytest.param(("cpu", torch.float32), id="cpu-float32"),
    pytest.param(("cpu", torch.bfloat16), id="cpu-bfloat16"),
]
if torch.cuda.is_available():
    CASES += [
        pytest.param(("cuda", torch.bfloat16), id="cuda-bfloat16", marks=pytest.mark.gpu),
        pytest.param(("cuda", torch.float32), id="cuda-float32", marks=pytest.mark.gpu),
    ]


@pytest.fixture(scope="module", params=CASES)
def pipe(request, snapshot):
    gc.collect()  # the previous case's model is gone before this one is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    device, dtype = request.param
    p = load(snapshot, device, dtype)
    yield p
    p.close()
    del p


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (384, 384), (30, 120, 200))  # 1 global + 1 local tile


# -- tests ------------------------------------------------------------------------------------


def test_snapshot_has_the_hub_layout(snapshot):
    names = sorted(p.name for p in snapshot.iterdir())
    assert "model.safetensors.index.json" in names
    assert "tokenizer.json" in names
    assert [n for n in names if n.endswith(".safetensors")] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


@torch.inference_mode()
def test_real_shapes_after_the_strict_load(pipe):
    m = pipe.model
    lm = m.language
    attn, moe = lm.model.layers[0].self_attn, lm.model.layers[1].mlp
    assert isinstance(moe, MoE)
    assert not isinstance(lm.model.layers[0].mlp, MoE)
    assert lm.model.layers[0].mlp.gate_proj.weight.shape == (10944, 2048)
    assert attn.q_proj.weight.shape == (16 * 192, 2048)
    assert attn.kv_a_proj_with_mqa.weight.shape == (512 + 64, 2048)
    assert attn.kv_b_proj.weight.shape == (16 * 256, 512)
    assert attn.o_proj.weight.shape == (2048, 16 * 128)
    assert attn.cache.shape[1:] == (4096 + 1, 512 + 64)
    assert moe.w13.shape == (64, 2 * 1408, 2048)
    assert moe.w2.shape == (64, 2048, 1408)
    assert moe.shared_experts.gate_proj.weight.shape == (2 * 1408, 2048)
    assert moe.gate.weight.shape == (64, 2048)
    assert moe.gate.top_k == 6
    assert lm.lm_head.weight.shape == lm.model.embed_tokens.weight.shape == (102400, 2048)
    assert m.vision.blocks[1].attn.qkv.weight.shape == (3 * 1152, 1152)
    assert m.vision.blocks[1].mlp.fc1.weight.shape == (4304, 1152)
    assert m.vision.pos_embed.shape == (1, 729, 1152)
    assert m.projector.layers[0].weight.shape == (2048, 4608)
    assert {p.dtype for p in m.parameters()} == {pipe.dtype}


@torch.inference_mode()
def test_cached_decode_agrees_with_a_full_forward(pipe):
    """Prefill + 3 decode steps (eager and masked) vs one forward over the whole sequence."""
    ids = pipe.tokenizer.encode(TEXT)
    assert len(ids) > 8
    prompt, answer = ids[:-3], ids[-3:]
    embeds = pipe.model.language.model.embed_tokens(torch.tensor([ids], device=pipe.device))
    ref = full_forward(pipe, embeds, 4)  # positions T-1 .. T+2
    for masked in (False, True):
        got = cached(pipe, embeds[:, : len(prompt)], answer, masked)
        if pipe.dtype == torch.float32:  # measured ~6e-6 (logits up to ~4.5)
            assert (got - ref).abs().max().item() <= 1e-4, masked
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
        else:  # bf16 operands: measured 0.7 % on CPU
            assert ((got - ref).norm() / ref.norm()).item() < 2e-2, masked


@torch.inference_mode()
def test_moe_decode_ways_agree(pipe):
    """The gathered (1 token: 6 of 64 experts) and dense (16 tokens) ways, which CUDA and the
    compiled step take, equal the grouped way CPU prefill takes, at 64 x 2816 x 2048."""
    moe = pipe.model.language.model.layers[1].mlp
    gen = torch.Generator(pipe.device).manual_seed(0)
    for n, way in ((1, "gathered"), (16, "dense")):
        x = torch.randn(n, 2048, generator=gen, device=pipe.device).to(pipe.dtype)
        ref, got = routed(moe, x, "grouped").float(), routed(moe, x, way).float()
        tol = 1e-4 if pipe.dtype == torch.float32 else 2e-2
        assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), way


@torch.inference_mode()
def test_image_request_end_to_end(pipe, image):
    """vision (2 tiles x 729 patches at 1152) -> projector -> 2048-wide rows in the image
    slots -> prefill -> decode, through the engine."""
    request = pipe.encode(PROMPT, [image])
    assert request.num_image_tokens == 14 * 15 + 1 + 14 * 15  # global, separator, 1 local
    embeds = embeds_of(pipe, PROMPT, [image])
    assert embeds.shape == (1, request.num_tokens, 2048)
    assert embeds.dtype == pipe.dtype
    assert torch.isfinite(embeds).all()
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=2, seed=0)
    ids = pipe.generate_ids(request, params)
    assert 1 <= len(ids) <= 2
    assert all(0 <= i < 102400 for i in ids)
