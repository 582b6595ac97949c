"""Typed configuration parsed from a DeepSeek-VL2 checkpoint's `config.json`.

One frozen dataclass per section of the file, keeping the upstream key spellings. Values that
are absent take the defaults of the official config classes (`VisionEncoderConfig`,
`MlpProjectorConfig`, `DeepseekV2Config`). Anything we do not implement (an unknown key, or a
known key with a value we cannot serve) stops loading with a `CheckpointError` naming the key
and the value: a silently ignored setting would be a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Keys that the Hugging Face machinery writes into config files and that carry no model
# semantics for inference (bookkeeping, training-only switches).
_METADATA_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
        "model_type",
        "use_cache",
        "pretraining_tp",
        "initializer_range",
        "aux_loss_alpha",
        "seq_aux",
        "ep_size",
        "attention_dropout",
        "lm_head",
        "rm_head",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "use_grad_checkpointing",
        "weight_init",
        "num_classes",
        "deterministic",
        "num_recomputing_layers",
    }
)


def _build(cls: type, section: str, raw: dict[str, Any], **overrides: Any) -> Any:
    """Instantiate `cls` from `raw`, rejecting keys that neither the class nor metadata know."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields - _METADATA_KEYS)
    if unknown:
        shown = ", ".join(f"{k}={raw[k]!r}" for k in unknown)
        raise CheckpointError(f"config.json {section}: unsupported key(s) {shown}")
    kwargs = {k: v for k, v in raw.items() if k in fields}
    kwargs.update(overrides)
    return cls(**kwargs)


def required(key: str, value: int | None) -> int:
    """`value` of the language_config key `key`, which the module being built needs (e.g.
    kv_lora_rank for MLA, num_experts_per_tok for MoE): a checkpoint without it is refused."""
    if value is None:
        raise CheckpointError(f"config.json language_config: {key} is required by this model")
    return value


def _require(section: str, key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise CheckpointError(
            f"config.json {section}: unsupported value {key}={value!r} (supported: {list(allowed)})"
        )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT tower (`vision_config`); defaults of the official VisionEncoderConfig."""

    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    select_layer: int = -1

    def validate(self) -> None:
        s = "vision_config"
        _require(s, "ignore_head", self.ignore_head, (True,))
        _require(s, "class_token", self.class_token, (False,))
        _require(s, "global_pool", self.global_pool, ("map",))
        _require(s, "select_layer", self.select_layer, (-1, self.layers))
        if self.width % self.heads:
            raise CheckpointError(
                f"config.json {s}: width={self.width} not divisible by heads={self.heads}"
            )

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side: the conv drops the remainder (384 = 27*14 + 6)."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """`projector_config`; defaults of the official MlpProjectorConfig."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def validate(self) -> None:
        s = "projector_config"
        _require(s, "projector_type", self.projector_type, ("downsample_mlp_gelu",))
        _require(s, "depth", self.depth, (2,))
        _require(s, "mlp_ratio", self.mlp_ratio, (1,))
        _require(s, "token_pooling", self.token_pooling, (False,))


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """`language_config` (DeepseekV2); defaults of the official DeepseekV2Config."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_mla: bool = True

    def validate(self) -> None:
        s = "language_config"
        _require(s, "hidden_act", self.hidden_act, ("silu",))
        _require(s, "tie_word_embeddings", self.tie_word_embeddings, (False,))
        _require(s, "attention_bias", self.attention_bias, (False,))
        _require(s, "rope_scaling", self.rope_scaling, (None,))
        _require(s, "moe_layer_freq", self.moe_layer_freq, (1,))
        if self.is_moe:
            _require(
                s, "topk_method", self.topk_method, ("greedy", "group_limited_greedy", "noaux_tc")
            )
            _require(s, "scoring_func", self.scoring_func, ("softmax", "sigmoid"))
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                raise CheckpointError(
                    f"config.json {s}: topk_method='noaux_tc' needs scoring_func='sigmoid', "
                    f"got {self.scoring_func!r}"
                )
            groups = self.n_group or 1
            if required("n_routed_experts", self.n_routed_experts) % groups:
                raise CheckpointError(
                    f"config.json {s}: n_routed_experts={self.n_routed_experts} not divisible by "
                    f"n_group={self.n_group}"
                )
        if self.use_mla:
            if not self.kv_lora_rank:
                raise CheckpointError(
                    f"config.json {s}: use_mla=true needs kv_lora_rank, got {self.kv_lora_rank!r}"
                )
        elif self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config.json {s}: hidden_size not divisible by num_attention_heads"
            )
        if not self.use_mla and self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json {s}: num_attention_heads not divisible by num_key_value_heads"
            )

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts) and self.first_k_dense_replace < self.num_hidden_layers

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace

    @property
    def head_dim(self) -> int:
        """Per-head query/key width: nope + rope for MLA, hidden / heads for MHA."""
        if self.use_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim


@dataclasses.dataclass(frozen=True)
class VL2Config:
    """The whole `config.json` of a DeepseekVLV2ForCausalLM checkpoint."""

    vision_config: VisionConfig
    projector_config: ProjectorConfig
    language_config: LanguageConfig
    candidate_resolutions: tuple[tuple[int, int], ...]
    tile_tag: str = "2D"
    global_view_pos: str = "head"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VL2Config:
        if raw.get("model_type") != "deepseek_vl_v2":
            raise CheckpointError(
                f"config.json: unsupported value model_type={raw.get('model_type')!r} "
                "(supported: ['deepseek_vl_v2'])"
            )
        sections = {}
        for name, sub in (
            ("vision_config", VisionConfig),
            ("projector_config", ProjectorConfig),
            ("language_config", LanguageConfig),
        ):
            if not isinstance(raw.get(name), dict):
                raise CheckpointError(f"config.json: missing section {name!r}")
            sections[name] = _build(sub, name, raw[name])
        top = {k: v for k, v in raw.items() if k not in sections}
        resolutions = top.pop("candidate_resolutions", None)
        if not resolutions or not all(
            isinstance(r, list | tuple)
            and len(r) == 2
            and all(isinstance(v, int) and v > 0 for v in r)
            for r in resolutions
        ):
            raise CheckpointError(f"config.json: invalid candidate_resolutions={resolutions!r}")
        config = _build(
            cls,
            "top level",
            top,
            candidate_resolutions=tuple((int(w), int(h)) for w, h in resolutions),
            **sections,
        )
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> VL2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def validate(self) -> None:
        _require("top level", "tile_tag", self.tile_tag, ("2D",))
        _require("top level", "global_view_pos", self.global_view_pos, ("head",))
        self.vision_config.validate()
        self.projector_config.validate()
        self.language_config.validate()
        if self.projector_config.input_dim != self.vision_config.width:
            raise CheckpointError(
                f"config.json: projector_config.input_dim={self.projector_config.input_dim} != "
                f"vision_config.width={self.vision_config.width}"
            )
        if self.projector_config.n_embed != self.language_config.hidden_size:
            raise CheckpointError(
                f"config.json: projector_config.n_embed={self.projector_config.n_embed} != "
                f"language_config.hidden_size={self.language_config.hidden_size}"
            )
        size = self.image_size
        if any(w % size or h % size for w, h in self.candidate_resolutions):
            raise CheckpointError(
                f"config.json: candidate_resolutions must be multiples of the tile size {size}"
            )

    @property
    def image_size(self) -> int:
        """Tile side. The official processor takes it from candidate_resolutions[0][0]."""
        return self.candidate_resolutions[0][0]

    @property
    def tokens_per_side(self) -> int:
        """Projector grid side per tile: ceil(27 / 2) = 14 for the shipped models."""
        return math.ceil(self.vision_config.grid / self.projector_config.downsample_ratio)
