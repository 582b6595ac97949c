"""Checkpoint directory -> model on a device, strictly.

The model is built on the meta device (no memory), then every tensor of the safetensors files
(a single `model.safetensors`, or shards listed in `model.safetensors.index.json`) is read
straight to the target device and dtype and assigned in place. Every tensor must be used and
every parameter filled, with the right shape; the only documented exception is the SigLIP
attention-pool head (`vision.attn_pool.*`), which the checkpoint stores but inference never runs.
Only safetensors are read: never pickle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .config import VL2Config
from .errors import CheckpointError
from .language import MoE
from .model import DeepseekVL2

log = logging.getLogger("deepseek_vl2_runtime")

IGNORED_PREFIXES = ("vision.attn_pool.",)
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint dir: the index's shards, or the single file."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / SINGLE_FILE).exists():
        files = [path / SINGLE_FILE]
    else:
        pickled = sorted(
            f.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in path.glob(ext)
        )
        hint = (
            f"; {pickled} are pickle files, which are never loaded (use safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(
            f"{path}: weight shard(s) listed in {INDEX_FILE} are missing: {missing}"
        )
    return files


def verify_snapshot(path: str | Path) -> None:
    """Cheap check that `path` looks like a complete checkpoint (files present, not empty)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"weights directory {path} does not exist")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing checkpoint file(s): {', '.join(missing)}")
    for f in safetensors_files(path):
        if f.stat().st_size < 8:
            raise CheckpointError(f"{f}: file is empty or truncated")


def _read_into(
    model: DeepseekVL2, files: list[Path], device: torch.device, dtype: torch.dtype
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    # safetensors can place tensors directly on a CUDA device; for CPU it reads from the mmap.
    open_device = "cpu"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        open_device = f"cuda:{index}"
    for f in files:
        try:
            handle = safe_open(f, framework="pt", device=open_device)
        except Exception as e:  # SafetensorError / OSError on a truncated or corrupt header
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                if key.startswith(IGNORED_PREFIXES):
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                if key in loaded:
                    raise CheckpointError(f"{f}: tensor {key} appears in more than one shard")
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(
                        f"{f}: tensor {key} has shape {list(shape)}, expected {list(expected[key])}"
                    )
                try:
                    tensor = handle.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read tensor {key} ({e})") from None
                loaded[key] = tensor.to(device=device, dtype=dtype)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {sorted(unexpected)}")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"tensor(s) missing from checkpoint: {missing}")
    model.load_state_dict(loaded, strict=True, assign=True)


def load_model(
    path: str | Path, device: torch.device, dtype: torch.dtype, max_seq: int | None = None
) -> DeepseekVL2:
    """Build, load and prepare the model for inference (stacked experts, KV cache, RoPE tables).
    Callers check the directory with `verify_snapshot` first (Pipeline.load does)."""
    path = Path(path)
    config = VL2Config.from_json(path / "config.json")
    with torch.device("meta"):
        model = DeepseekVL2(config)
    _read_into(model, safetensors_files(path), device, dtype)
    return prepare_for_inference(model, max_seq)


def prepare_for_inference(model: DeepseekVL2, max_seq: int | None = None) -> DeepseekVL2:
    """The steps after the weights are in place: inference mode, stacked experts (decode path),
    KV cache and RoPE tables for `max_seq` positions (default: the model's context)."""
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MoE):
            module.stack_experts()
    model.language.setup_cache(max_seq or model.config.language_config.max_position_embeddings)
    return model
