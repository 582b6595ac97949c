"""Tiny checkpoints in the real on-disk format, written for tests.

They start from the golden `mla` checkpoint (the official key list and shapes) and change it
the way the other published variants differ, following the key table of the reference spec
(§1.4), not our model code: MHA attention (vl2-tiny: q/k/v/o_proj) and the `noaux_tc` router
with `e_score_correction_bias` (vl2 base), optionally split into shards with an index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paths import TESTS_DATA

GOLDEN = TESTS_DATA / "golden"
MLA_MODEL = GOLDEN / "cases" / "mla" / "model"
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
)

MHA = {
    "use_mla": False,
    "kv_lora_rank": None,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "v_head_dim": 0,
}
NOAUX_TC = {
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.0,
}
MLA_ATTN = ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")


def _rand(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_checkpoint(dst: Path, language: dict | None = None, shards: int = 1) -> Path:
    """Write config.json, tokenizer files and safetensors (sharded with an index if shards > 1)."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((MLA_MODEL / "config.json").read_text())
    config["language_config"].update(language or {})
    lang = config["language_config"]
    tensors = load_file(MLA_MODEL / "model.safetensors")
    gen = torch.Generator().manual_seed(1234)
    h, nh = lang["hidden_size"], lang["num_attention_heads"]
    for layer in range(lang["num_hidden_layers"]):
        prefix = f"language.model.layers.{layer}."
        if not lang.get("use_mla", True):
            for name in MLA_ATTN:
                tensors.pop(f"{prefix}self_attn.{name}.weight")
            d, nkv = h // nh, lang["num_key_value_heads"]
            for name, rows in (("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
                tensors[f"{prefix}self_attn.{name}.weight"] = _rand(gen, (rows, h), h**-0.5)
            tensors[f"{prefix}self_attn.o_proj.weight"] = _rand(gen, (h, nh * d), (nh * d) ** -0.5)
        if lang.get("topk_method") == "noaux_tc" and layer >= lang["first_k_dense_replace"]:
            bias = 0.05 * torch.rand(lang["n_routed_experts"], generator=gen)
            tensors[f"{prefix}mlp.gate.e_score_correction_bias"] = bias.to(torch.bfloat16)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        shutil.copy(MLA_MODEL / name, dst / name)
    save_sharded(tensors, dst, shards)
    return dst


def save_sharded(tensors: dict[str, torch.Tensor], dst: Path, shards: int) -> None:
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
