"""Random-weight construction: vl2-small's shapes without a download.

Two ways to get a model with vl2-small's real shapes (reference spec §1.2-1.4) and seeded random
values, so the GPU path, the loader and the real widths can be exercised anywhere:

- `random_model(config, device, dtype, seed)`: built on the meta device, allocated and filled
  on `device` (no host copy); refused, before allocating, where it cannot fit. The benchmark's
  `--random small`.
- `write_checkpoint(dst, config, tokenizer_dir)`: a snapshot in the real on-disk format
  (config.json with the real vl2-small keys, bf16 safetensors shards + index as the hub ships
  them, the SigLIP attention-pool head the loader ignores, the tokenizer files copied from a
  given directory), for the production loader. Any depth: reduced on CPU (tests), full size
  (~32 GB) on a GPU machine's disk, drawn on the GPU there.

    python -m deepseek_vl2_runtime.random_weights --dest DIR --tokenizer DIR
        [--layers N] [--vision-layers N] [--device cpu|cuda] [--seed N] [--shard-gb G]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import VL2Config, required
from .model import DeepseekVL2
from .weights import INDEX_FILE, SINGLE_FILE, prepare_for_inference

# vl2-small's config.json (reference spec §1.2-1.3): the key set of the golden `mla` case, which
# mirrors the real file, with vl2-small's values (vision image_size and heads are absent there:
# the defaults 384 and 16 apply). The 23 candidate resolutions are all (384m, 384n) with
# m*n <= 9, in the config's order (ties depend on it).
_TILES = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6)]
_TILES += [(6, 1), (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1)]
_TILES += [(3, 3)]
# fmt: off
SMALL_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekVLV2ForCausalLM"],
    "candidate_resolutions": [[384 * m, 384 * n] for m, n in _TILES],
    "global_view_pos": "head",
    "language_config": {
        "architectures": ["DeepseekV2ForCausalLM"], "bos_token_id": 100000,
        "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048,
        "intermediate_size": 10944, "kv_lora_rank": 512, "lm_head": True,
        "max_position_embeddings": 4096, "moe_intermediate_size": 1408, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rm_head": False,
        "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "use_mla": True,
        "v_head_dim": 128, "vocab_size": 102400,
    },
    "model_type": "deepseek_vl_v2",
    "projector_config": {
        "depth": 2, "downsample_ratio": 2, "input_dim": 1152, "mlp_ratio": 1,
        "model_type": "mlp_projector", "n_embed": 2048, "projector_type": "downsample_mlp_gelu",
    },
    "tile_tag": "2D",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.2",
    "vision_config": {
        "layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384",
        "model_type": "vision", "patch_size": 14, "width": 1152,
    },
}
# fmt: on
# Tokenizer and processor files of a checkpoint, copied from `tokenizer_dir` when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
)
SHARD_BYTES = 5 * 10**9  # the hub's default max_shard_size: vl2-small ships in 4 shards of bf16


def config_dict(
    language_layers: int | None = None,
    vision_layers: int | None = None,
    *,
    language: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    projector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SMALL_CONFIG (a copy) at another depth, with optional per-section overrides."""
    raw = copy.deepcopy(SMALL_CONFIG)
    if language_layers is not None:
        raw["language_config"]["num_hidden_layers"] = language_layers
    if vision_layers is not None:
        raw["vision_config"]["layers"] = vision_layers
    raw["language_config"].update(language or {})
    raw["vision_config"].update(vision or {})
    raw["projector_config"].update(projector or {})
    return raw


def small_config() -> VL2Config:
    return VL2Config.from_dict(SMALL_CONFIG)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- fit checks ---------------------------------------------------------------------------------


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(model: DeepseekVL2, dtype: torch.dtype) -> int:
    """Weights + KV cache + RoPE tables + the largest transient of `stack_experts` + 2 GiB for
    activations (a 4096-token prefill)."""
    lc = model.config.language_config
    weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    per_pos = (
        required("kv_lora_rank", lc.kv_lora_rank) + lc.qk_rope_head_dim
        if lc.use_mla
        else 2 * lc.hidden_size
    )
    cache = lc.num_hidden_layers * lc.max_position_embeddings * (per_pos + 2 * lc.rope_dim)
    stacked = 3 * (lc.n_routed_experts or 0) * lc.hidden_size * lc.moe_intermediate_size
    return weights + (cache + stacked) * dtype.itemsize + 2 * 2**30


# -- values -------------------------------------------------------------------------------------


def init_moments(name: str, shape: Sequence[int]) -> tuple[float, float]:
    """(mean, std) of a tensor's random values, by checkpoint key: 1/sqrt(fan_in) weights,
    1 +- 0.1 norm weights, 0.02 biases, unit embeddings and the two learned vectors (and the
    attention-pool latent), 0.5 position embeddings."""
    if name.endswith("bias"):
        return 0.0, 0.02
    if len(shape) == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm
        return 1.0, 0.1
    if name == "vision.pos_embed":
        return 0.0, 0.5
    if len(shape) == 1 or name.endswith("embed_tokens.weight") or name.endswith("latent"):
        return 0.0, 1.0
    return 0.0, math.prod(shape[1:]) ** -0.5


@torch.no_grad()
def init_random_(model: DeepseekVL2, generator: torch.Generator) -> None:
    """Seeded normal values drawn on the device, with the moments of `init_moments`."""
    for name, p in model.named_parameters():
        mean, std = init_moments(name, p.shape)
        p.normal_(mean, std, generator=generator)


def random_model(
    config: VL2Config, device: torch.device, dtype: torch.dtype, seed: int
) -> DeepseekVL2:
    """Random weights of `config`'s shapes, built on the meta device, then allocated and filled
    on `device` (no host copy). Exits with a message first if it cannot fit."""
    with torch.device("meta"):
        model = DeepseekVL2(config)
    need, have = estimate_bytes(model, dtype), available_bytes(device)
    if need > have:
        n_params = sum(p.numel() for p in model.parameters())
        raise SystemExit(
            f"--random small needs about {need / 2**30:.1f} GiB on {device} "
            f"({n_params / 1e9:.1f} B parameters in {_dtype_name(dtype)}, KV cache, activations) "
            f"but only {have / 2**30:.1f} GiB is available; use a GPU (--device cuda) with more "
            "memory, or --weights with a smaller checkpoint"
        )
    model = model.to(dtype).to_empty(device=device)  # dtype first: no float32 allocation
    init_random_(model, torch.Generator(device).manual_seed(seed))
    return prepare_for_inference(model)


# -- the on-disk snapshot -----------------------------------------------------------------------


def checkpoint_shapes(config: VL2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the real checkpoint and its shape: the model's state dict plus the
    SigLIP attention-pool head (`vision.attn_pool.*`, stored but never run; spec §1.4)."""
    with torch.device("meta"):
        model = DeepseekVL2(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    w, m = config.vision_config.width, config.vision_config.mlp_hidden
    pool = {
        "latent": (1, 1, w),
        "q.weight": (w, w),
        "q.bias": (w,),
        "kv.weight": (2 * w, w),
        "kv.bias": (2 * w,),
        "proj.weight": (w, w),
        "proj.bias": (w,),
        "norm.weight": (w,),
        "norm.bias": (w,),
        "mlp.fc1.weight": (m, w),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (w, m),
        "mlp.fc2.bias": (w,),
    }
    shapes.update({f"vision.attn_pool.{k}": v for k, v in pool.items()})
    return shapes


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut into consecutive shards of at most shard_bytes (one key at least)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _draw(
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    scratch: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """A host tensor with `init_moments` mean/std: drawn uniform in float32 into (the front of)
    `scratch` on its device, which is reused so that no tensor costs a fresh float32 allocation
    (page faults dominate on CPU otherwise), then cast and moved. Uniform: two to four times
    faster than a normal draw on CPU, and the moments are what matter here."""
    mean, std = init_moments(key, shape)
    half_width = std * math.sqrt(3.0)
    x = scratch[: math.prod(shape)].view(shape)
    x.uniform_(mean - half_width, mean + half_width, generator=gen)
    return x.to(dtype).cpu()


def write_checkpoint(
    dst: str | Path,
    config: dict[str, Any],
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write a random checkpoint of `config` (a config.json dict) to `dst` in the real format.

    Values are drawn on `device` (a GPU draws a full-size snapshot in seconds) one tensor at a
    time, and each shard is saved before the next is drawn, so host memory holds one shard.
    More than one shard gets `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`;
    one shard is a single `model.safetensors`. Refused, before writing, where the disk lacks room.
    """
    dst, tokenizer_dir, device = Path(dst), Path(tokenizer_dir), torch.device(device)
    parsed = VL2Config.from_dict(config)  # the config must be one the runtime accepts
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to copy")
    shapes = checkpoint_shapes(parsed)
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    dst.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst).free
    if total + 2**28 > free:
        raise OSError(
            f"{dst}: a random checkpoint of {total / 2**30:.1f} GiB does not fit in the "
            f"{free / 2**30:.1f} GiB free there"
        )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, dst / name)
    shards = _shards(shapes, dtype.itemsize, shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    gen = torch.Generator(device).manual_seed(seed)
    scratch = torch.empty(max(math.prod(s) for s in shapes.values()), device=device)
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        tensors = {k: _draw(k, shapes[k], dtype, scratch, gen) for k in keys}
        save_file(tensors, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return dst


def snapshot_files(path: str | Path) -> Iterator[Path]:
    """The safetensors files of a written snapshot (for read-speed measurements)."""
    yield from sorted(Path(path).glob("*.safetensors"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_vl2_runtime.random_weights")
    parser.add_argument("--dest", required=True, help="directory to write the snapshot into")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json etc.")
    parser.add_argument("--layers", type=int, help="language layers (default 27)")
    parser.add_argument("--vision-layers", type=int, help="SigLIP layers (default 27)")
    parser.add_argument("--device", default="cpu", help="where values are drawn (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9)
    args = parser.parse_args(argv)
    raw = config_dict(args.layers, args.vision_layers)
    dst = write_checkpoint(
        args.dest,
        raw,
        args.tokenizer,
        seed=args.seed,
        device=args.device,
        shard_bytes=int(args.shard_gb * 1e9),
    )
    size = sum(f.stat().st_size for f in snapshot_files(dst))
    print(f"wrote {dst}: {size / 1e9:.2f} GB of safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
