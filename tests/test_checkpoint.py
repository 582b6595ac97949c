"""Loading: sharded checkpoints, the MHA + noaux_tc variant, and every way a checkpoint can be broken."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deepseek_vl2_runtime import CheckpointError, Pipeline, SamplingParams, VL2Config
from deepseek_vl2_runtime.language import MoEGate

from checkpoints import MHA, MLA_MODEL, NOAUX_TC, save_sharded, write_checkpoint

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12, seed=0)


def _greedy(pipe: Pipeline, prompt: str = "Hello, who are you?") -> list[int]:
    return list(pipe.generate_ids(pipe.encode(prompt, []), GREEDY))


def test_sharded_checkpoint_equals_single_file(tmp_path, mla_pipeline) -> None:
    sharded = Pipeline.load(write_checkpoint(tmp_path / "sharded", shards=3), device="cpu")
    assert len(list((tmp_path / "sharded").glob("model-*-of-00003.safetensors"))) == 3
    assert _greedy(sharded) == _greedy(mla_pipeline)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(MHA, id="mha"),
        pytest.param(NOAUX_TC, id="noaux_tc"),
        pytest.param({**MHA, **NOAUX_TC}, id="mha+noaux_tc"),
        pytest.param(
            {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
            id="group_limited",
        ),
    ],
)
def test_variants_load_and_generate(tmp_path, variant) -> None:
    pipe = Pipeline.load(write_checkpoint(tmp_path / "ckpt", variant, shards=2), device="cpu")
    cfg = pipe.config.language_config
    assert cfg.use_mla == variant.get("use_mla", True)
    assert cfg.topk_method == variant.get("topk_method", "greedy")
    ids = _greedy(pipe)
    assert len(ids) == 12
    assert all(0 <= i < cfg.vocab_size for i in ids)


def _noaux_reference(logits, bias, n_group, topk_group, top_k, scale):
    """Spec §6.6 / README written out per token with Python loops."""
    ids_out, w_out = [], []
    for row in logits:
        s = row.sigmoid()
        choice = s + bias
        per = len(s) // n_group
        gscore = [sorted(choice[g * per : (g + 1) * per].tolist())[-2:] for g in range(n_group)]
        gscore = [sum(v) for v in gscore]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        masked = torch.tensor(
            [choice[e].item() if e // per in keep else 0.0 for e in range(len(s))]
        )
        ids = sorted(range(len(s)), key=lambda e: -masked[e].item())[:top_k]
        w = s[ids]
        w = w / (w.sum() + 1e-20) * scale
        ids_out.append(ids)
        w_out.append(w)
    return ids_out, w_out


def test_noaux_tc_router_matches_spec() -> None:
    cfg = VL2Config.from_dict(
        {
            **json.loads((MLA_MODEL / "config.json").read_text()),
            "language_config": {
                **json.loads((MLA_MODEL / "config.json").read_text())["language_config"],
                **NOAUX_TC,
            },
        }
    ).language_config
    gate = MoEGate(cfg)
    gen = torch.Generator().manual_seed(0)
    gate.weight.data = torch.randn(gate.weight.shape, generator=gen)
    gate.e_score_correction_bias.data = 0.05 * torch.rand(cfg.n_routed_experts, generator=gen)
    x = torch.randn(16, cfg.hidden_size, generator=gen)
    ids, w = gate(x)
    ref_ids, ref_w = _noaux_reference(
        x @ gate.weight.T, gate.e_score_correction_bias, 4, 2, cfg.num_experts_per_tok, 2.0
    )
    for row in range(16):
        order = ids[row].argsort()
        assert ids[row][order].tolist() == sorted(ref_ids[row])
        ref = dict(zip(ref_ids[row], ref_w[row].tolist(), strict=True))
        got = dict(zip(ids[row].tolist(), w[row].tolist(), strict=True))
        for e in ref:
            assert got[e] == pytest.approx(ref[e], abs=1e-6)


# -- broken checkpoints ---------------------------------------------------------------------


def _copy(tmp_path, mutate_tensors=None, mutate_config=None, shards=1):
    dst = write_checkpoint(tmp_path / "bad", shards=shards)
    if mutate_config:
        cfg = json.loads((dst / "config.json").read_text())
        mutate_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if mutate_tensors:
        tensors = load_file(MLA_MODEL / "model.safetensors")
        mutate_tensors(tensors)
        for f in dst.glob("model*.safetensors*"):
            f.unlink()
        save_sharded(tensors, dst, shards)
    return dst


def _expect(path, *words) -> None:
    with pytest.raises(CheckpointError) as e:
        Pipeline.load(path, device="cpu")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_tensor_is_named(tmp_path) -> None:
    key = "language.model.layers.1.mlp.experts.3.up_proj.weight"
    _expect(_copy(tmp_path, lambda t: t.pop(key)), "missing", key)


def test_unexpected_tensor_is_named(tmp_path) -> None:
    _expect(_copy(tmp_path, lambda t: t.update(extra=torch.zeros(2))), "unexpected", "extra")


def test_wrong_shape_is_named(tmp_path) -> None:
    key = "language.model.layers.0.self_attn.kv_b_proj.weight"
    _expect(_copy(tmp_path, lambda t: t.update({key: t[key][:-1]})), key, "shape")


def test_attn_pool_head_is_the_only_ignored_key(tmp_path) -> None:
    tensors = load_file(MLA_MODEL / "model.safetensors")
    assert any(k.startswith("vision.attn_pool.") for k in tensors)
    Pipeline.load(
        _copy(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("vision.attn_pool.")])
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("language_config", "topk_method", "magic"),
        ("language_config", "scoring_func", "tanh"),
        ("language_config", "hidden_act", "gelu"),
        ("language_config", "rope_scaling", {"type": "yarn", "factor": 4}),
        ("language_config", "brand_new_key", 1),
        ("projector_config", "projector_type", "linear"),
        ("vision_config", "class_token", True),
        (None, "tile_tag", "1D"),
        (None, "model_type", "llava"),
    ],
)
def test_unsupported_config_value_is_named(tmp_path, section, key, value) -> None:
    def mutate(cfg):
        (cfg[section] if section else cfg)[key] = value

    _expect(
        _copy(tmp_path, mutate_config=mutate),
        key,
        repr(value) if not isinstance(value, dict) else key,
    )


def test_truncated_safetensors(tmp_path) -> None:
    dst = write_checkpoint(tmp_path / "trunc")
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect(dst, "model.safetensors")


def test_missing_shard_is_named(tmp_path) -> None:
    dst = write_checkpoint(tmp_path / "shards", shards=2)
    (dst / "model-00002-of-00002.safetensors").unlink()
    _expect(dst, "model-00002-of-00002.safetensors", "missing")


def test_missing_directory_and_files(tmp_path) -> None:
    _expect(tmp_path / "nope", "does not exist")
    dst = write_checkpoint(tmp_path / "notok")
    (dst / "tokenizer.json").unlink()
    _expect(dst, "tokenizer.json")


def test_garbage_config_json(tmp_path) -> None:
    dst = write_checkpoint(tmp_path / "garbage")
    (dst / "config.json").write_text("{not json")
    _expect(dst, "config.json", "JSON")


def test_loader_builds_on_meta_and_leaves_nothing_there(mla_pipeline) -> None:
    tensors = list(mla_pipeline.model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)
    moe = mla_pipeline.model.language.model.layers[1].mlp
    assert (
        moe.experts[2].up_proj.weight.data_ptr() == moe.w13[2, moe.w13.shape[1] // 2 :].data_ptr()
    )


# -- the Cog predictor's setup() on a missing or broken checkpoint --------------------------
# In-process: the message setup() fails with is what the server's health check shows (setup
# logs). tests/test_cog_server.py proves that end to end once, with a real server.


def _setup_fails(monkeypatch, weights) -> str:
    """Predictor().setup() with DEEPSEEK_VL2_WEIGHTS=weights (unset if None); its message."""
    from predict import Predictor

    if weights is None:
        monkeypatch.delenv("DEEPSEEK_VL2_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(weights))
    with pytest.raises(CheckpointError) as info:
        Predictor().setup()
    return str(info.value)


ADVICE = ["DEEPSEEK_VL2_WEIGHTS", "./weights", "make weights"]


def test_setup_verifies_the_snapshot_once(monkeypatch):
    """setup() checks the snapshot's files once (Pipeline.load), then loads it."""
    import sys

    import deepseek_vl2_runtime.weights
    from predict import Predictor

    checked = []
    real = deepseek_vl2_runtime.weights.verify_snapshot

    def counted(path):
        checked.append(path)
        real(path)

    for name, module in list(sys.modules.items()):  # every module's own reference to it
        if name.startswith("deepseek_vl2_runtime") or name == "predict":
            if getattr(module, "verify_snapshot", None) is real:
                monkeypatch.setattr(module, "verify_snapshot", counted)
    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(MLA_MODEL))
    predictor = Predictor()
    predictor.setup()
    predictor.pipe.close()
    assert [str(p) for p in checked] == [str(MLA_MODEL)]


def test_setup_with_an_empty_weights_dir_names_the_files_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    message = _setup_fails(monkeypatch, tmp_path / "empty")
    for text in ["missing checkpoint file(s): config.json", *ADVICE]:
        assert text in message, message


def test_setup_offline_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    """No $DEEPSEEK_VL2_WEIGHTS, no ./weights (the working directory is empty), no network."""
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _setup_fails(monkeypatch, None)
    for text in ["Could not download the weights", "HF_TOKEN", *ADVICE]:
        assert text in message, message


def _broken(root, kind: str):
    """A copy of the tiny checkpoint broken one way, and what setup()'s message must say."""
    dst = write_checkpoint(root / "broken")
    weights, config = dst / "model.safetensors", dst / "config.json"
    if kind == "unsupported topk_method":
        cfg = json.loads(config.read_text())
        cfg["language_config"]["topk_method"] = "sinkhorn"
        config.write_text(json.dumps(cfg))
        return dst, [
            "config.json language_config: unsupported value topk_method='sinkhorn'",
            "supported: ['greedy', 'group_limited_greedy', 'noaux_tc']",
        ]
    if kind == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return dst, [f"{weights}: cannot read safetensors file"]
    if kind == "pickle weights only":
        weights.rename(dst / "pytorch_model.bin")
        return dst, [f"{dst}: no model.safetensors or model.safetensors.index.json"]
    if kind == "config.json not JSON":
        config.write_text('{"language_config": ')
        return dst, [f"{config}: not valid JSON"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "unsupported topk_method",
        "truncated safetensors",
        "pickle weights only",
        "config.json not JSON",
    ],
)
def test_setup_with_broken_weights_names_the_reason(tmp_path, monkeypatch, kind):
    weights, expected = _broken(tmp_path, kind)
    message = _setup_fails(monkeypatch, weights)
    for text in expected:
        assert text in message, message
