"""The cached decode path (absorbed MLA / cached MHA, gathered MoE experts) equals a full forward."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from deepseek_vl2_runtime import Pipeline, SamplingParams
from deepseek_vl2_runtime.engine import EngineConfig

from checkpoints import MHA, MLA_MODEL, NOAUX_TC, write_checkpoint
from paths import golden_image


@pytest.fixture(scope="module", params=["mla", "mha+noaux_tc"])
def pipe(request, tmp_path_factory):
    if request.param == "mla":
        return Pipeline.load(MLA_MODEL, device="cpu")
    path = write_checkpoint(tmp_path_factory.mktemp("mha"), {**MHA, **NOAUX_TC})
    return Pipeline.load(path, device="cpu")


@torch.inference_mode()
@pytest.mark.parametrize("host_length", [True, False], ids=["filled-span", "masked-full-cache"])
def test_cached_decode_equals_full_forward(pipe, host_length) -> None:
    lm = pipe.model.language
    image = Image.open(golden_image("img_384x384.png")).convert("RGB")
    req = pipe.encode("<image>\nWhat is in this picture?", [image])
    embeds = pipe.embed(req)
    steps, tokens, cached = 10, [], [lm.prefill(embeds)[0]]
    pos = torch.tensor([embeds.shape[1]])
    for _ in range(steps):
        tokens.append(int(cached[-1].argmax()))
        length = int(pos) + 1 if host_length else None
        cached.append(lm.decode(torch.tensor([[tokens[-1]]]), pos, length)[0])
        pos += 1
    full_embeds = torch.cat([embeds, lm.model.embed_tokens(torch.tensor([tokens]))], dim=1)
    full = lm.lm_head(lm.hidden_states(full_embeds)[0]).float()
    t = embeds.shape[1]
    torch.testing.assert_close(torch.stack(cached), full[t - 1 : t + steps], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_moe_paths_agree(pipe) -> None:
    """Device decode's MoE paths (per-token weight gather; all experts over the batch) == the
    group-by-expert MoE, for one token and for a batch."""
    moe = pipe.model.language.model.layers[1].mlp
    x = torch.randn(
        7, pipe.config.language_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    ids, _ = moe.gate(x)
    grouped = moe._routed_grouped(x, ids)
    one_by_one = torch.cat([moe._routed_gathered(x[i : i + 1], ids[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(one_by_one, grouped, atol=1e-5, rtol=0)
    torch.testing.assert_close(moe._routed_gathered(x, ids), grouped, atol=1e-5, rtol=0)
    torch.testing.assert_close(moe._routed_dense(x, ids), grouped, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_equals_whole_prefill(pipe) -> None:
    """A prompt prefilled in chunks (later chunks attend to the cached prefix) gives the
    hidden states and cache of one whole prefill; into another slot, too."""
    lm = pipe.model.language
    pipe.close()  # the test drives the model directly; the engine must not step meanwhile
    try:
        lm.setup_cache(lm.max_seq, 2)
        image = Image.open(golden_image("img_640x480.png")).convert("RGB")
        embeds = pipe.embed(pipe.encode("<image>\nWhat is in this picture?", [image]))
        whole = lm.hidden_states(embeds, slot=0)
        cache0 = [layer.self_attn.cache.clone() for layer in lm.model.layers]
        chunks = [
            lm.hidden_states(embeds[:, i : i + 300], slot=1, start=i)
            for i in range(0, embeds.shape[1], 300)
        ]
        torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=1e-4, rtol=0)
        t = embeds.shape[1]
        for layer, before in zip(lm.model.layers, cache0, strict=True):
            cache = layer.self_attn.cache
            slot0, slot1 = (cache[:, 0], cache[:, 1]) if cache.ndim == 5 else (cache[0], cache[1])
            ref = before[:, 0] if cache.ndim == 5 else before[0]
            n = slot0.shape[-2] if cache.ndim == 5 else slot0.shape[0]
            assert n == lm.max_seq + 1
            if cache.ndim == 5:
                torch.testing.assert_close(slot1[..., :t, :], ref[..., :t, :], atol=1e-4, rtol=0)
            else:
                torch.testing.assert_close(slot1[:t], ref[:t], atol=1e-4, rtol=0)
    finally:
        lm.setup_cache(lm.max_seq, 1)


def test_bfloat16_on_cpu_stays_close_to_float32(mla_pipeline) -> None:
    """The GPU dtype on CPU: greedy text is produced and last logits stay within 0.25 of fp32
    (scripts/parity_report.py measured at most 0.157 over all golden inputs, for logits of
    std ~3: bf16 keeps 8 mantissa bits)."""
    bf16 = Pipeline.load(MLA_MODEL, device="cpu", dtype=torch.bfloat16)
    image = Image.open(golden_image("img_640x480.png")).convert("RGB")
    prompt = "<image>\nWhat is in this picture?"
    ref = mla_pipeline.prefill_logits(mla_pipeline.encode(prompt, [image]))
    got = bf16.prefill_logits(bf16.encode(prompt, [image]))
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.25
    text = "".join(
        bf16.stream(prompt, [image], SamplingParams(temperature=0, max_new_tokens=16, seed=0))
    )
    assert text


@pytest.mark.slow
def test_compiled_decode_step_matches_eager() -> None:
    """The torch.compile'd decode step (fixed shapes, batch padded to its bucket; CUDA graphs
    on GPU) gives the same tokens as eager decode, for one request and for two at once.
    Compiling the two buckets takes ~60 s on a 2-core CPU."""
    eager = Pipeline.load(MLA_MODEL, device="cpu", engine=EngineConfig(max_batch=2))
    compiled = Pipeline.load(
        MLA_MODEL, device="cpu", compile=True, engine=EngineConfig(max_batch=2)
    )
    image = Image.open(golden_image("img_640x480.png")).convert("RGB")
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=40, seed=7)
    greedy = SamplingParams(temperature=0, max_new_tokens=30, seed=0)

    def run(p: Pipeline) -> list[list[int]]:
        alone = p.generate_ids(p.encode("<image>\nDescribe.", [image]), params)
        pair = [
            p.generate(p.encode("<image>\nDescribe.", [image]), params),
            p.generate(p.encode("Say something.", []), greedy),
        ]
        return [alone] + [[t.id for t in s] for s in pair]

    runs = [run(p) for p in (eager, compiled)]
    assert runs[0] == runs[1]
    assert len(runs[0][0]) > 1
    assert runs[0][0] == runs[0][1]  # batched equals alone
    for p in (eager, compiled):
        p.close()
