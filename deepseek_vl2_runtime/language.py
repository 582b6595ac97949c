"""DeepseekV2 decoder (the `language.*` half of the checkpoint).

Mirrors `deepseek_vl2/models/modeling_deepseek.py` (official) for the math and the checkpoint
key names, but is organised for serving many sequences at once: each attention module owns one slice of a
preallocated KV cache shared by all sequences, one cache *slot* (a row of max_seq + 1 positions)
per sequence; `prefill` runs a chunk of one sequence's prompt into its slot, and `decode` runs
one token for each of the first K slots in one batched, fixed-shape step (no host
synchronisation, so it can be captured in a CUDA graph). Row i of a decode batch *is* slot i, so
the cache is read in place, never gathered.

MLA caches the compressed latent `c` (kv_lora_rank) and the shared rope key side by side in one
buffer of width kv_lora_rank + qk_rope_head_dim; decode uses the absorbed form (queries are
mapped into latent space, values read straight from the latent), prefill the decompressed form
(one fused SDPA call over full keys/values).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig, required


@dataclasses.dataclass(frozen=True)
class Prefill:
    """Attention context of a prompt chunk: positions start..start+T-1 of cache slot `slot`.
    cos/sin [1, T, rope]. `bias` [T, start+T] is 0 where position start+i sees key j
    (j <= start+i), else -inf, built once per chunk for every layer; None for a first chunk
    (start 0), which is square and causal (SDPA's is_causal flag)."""

    cos: torch.Tensor
    sin: torch.Tensor
    slot: int
    start: int
    bias: torch.Tensor | None

    def sdpa_mask(self) -> dict[str, Any]:
        """The causal structure as SDPA arguments."""
        return {"is_causal": True} if self.bias is None else {"attn_mask": self.bias}


@dataclasses.dataclass(frozen=True)
class Decode:
    """Attention context of a decode batch: row i is cache slot i, its new token at position
    pos[i]; it attends to the first `length` cache entries plus `bias` [K, length] (0 where
    entry j is visible to row i, j <= pos[i], else -inf; built once per step for every layer;
    None when K == 1 and length == pos + 1). cos/sin [K, 1, rope]."""

    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor
    length: int
    bias: torch.Tensor | None


Context = Prefill | Decode


class RMSNorm(nn.Module):
    """Normalises in float32, multiplies by the weight in the activation dtype (as upstream)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(
    dim: int, theta: float, max_pos: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, dim] with duplicated halves, computed in fp32 then cast (as upstream)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX) rotation. x [B, T, heads, d]; cos/sin [B or 1, T, d]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[.., d] pairs (x0,x1),(x2,x3).. -> evens then odds: MLA's RoPE is interleaved (GPT-J) RoPE
    written as a half-split rotation on this permutation (official apply_rotary_pos_emb)."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class MLAttention(nn.Module):
    """Multi-head latent attention (vl2-small / vl2 base). Keys follow the checkpoint."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.rank = nh, required("kv_lora_rank", cfg.kv_lora_rank)
        self.nope, self.rope, self.v_dim = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.scale = cfg.head_dim**-0.5
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * cfg.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, h, bias=False)
        # [slots, max_seq + 1, rank + rope]: latent ‖ rotated rope key. A buffer (not saved) so
        # that compiled decode may update it in place inside a captured CUDA graph.
        self.register_buffer("cache", None, persistent=False)

    def setup_cache(
        self, slots: int, max_seq: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.cache = torch.zeros(slots, max_seq, self.rank + self.rope, device=device, dtype=dtype)

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q_nope [B, T, nH, nope], rotated q_pe [B, T, nH, rope] and the cache
        entry [B, T, rank + rope] (normed latent ‖ rotated shared rope key)."""
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe)[:, :, None, :], cos, sin)[:, :, 0]
        return q_nope, q_pe, torch.cat([latent, k_pe], dim=-1)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.prefill(x, ctx) if isinstance(ctx, Prefill) else self.decode(x, ctx)

    def prefill(self, x: torch.Tensor, ctx: Prefill) -> torch.Tensor:
        """x [1, T, H]: a prompt chunk at positions start..start+T-1 of slot `ctx.slot`, causal
        over everything cached before it and itself (decompressed form, one fused SDPA call)."""
        _, t, _ = x.shape
        q_nope, q_pe, kv = self._project(x, ctx.cos, ctx.sin)
        end = ctx.start + t
        self.cache[ctx.slot, ctx.start : end] = kv[0]
        if ctx.start:  # later chunk: keys/values of the whole prefix, read back from the cache
            kv = self.cache[ctx.slot : ctx.slot + 1, :end]
        s = kv.shape[1]
        latent, k_pe = kv.split([self.rank, self.rope], dim=-1)
        k_nope, v = (
            self.kv_b_proj(latent).view(1, s, self.n_heads, -1).split([self.nope, self.v_dim], -1)
        )
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [1, nH, T, d]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        # Fused SDPA kernels (flash on CPU and GPU) need one head width for q, k and v: pad v
        # with zeros to the q/k width (its extra output columns are zero) and cut them off.
        v = F.pad(v, (0, q.shape[-1] - self.v_dim))
        out = F.scaled_dot_product_attention(
            q,
            k.transpose(1, 2),
            v.transpose(1, 2),
            scale=self.scale,
            **ctx.sdpa_mask(),
        )[..., : self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(1, t, -1))

    def decode(self, x: torch.Tensor, ctx: Decode) -> torch.Tensor:
        """x [K, 1, H]: one token for each of the first K slots (absorbed form: the query is
        mapped into latent space, so each head is one query of an attention over the slot's
        latent cache, read in place)."""
        k = x.shape[0]
        q_nope, q_pe, kv = self._project(x, ctx.cos, ctx.sin)
        self.cache[torch.arange(k, device=x.device), ctx.pos] = kv[:, 0]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, 0], w[:, : self.nope])  # absorb W_UK
        q = torch.cat([q_lat, q_pe[:, 0]], dim=-1)[:, None]  # [K, 1, nH, rank + rope]
        # One fused SDPA call per row with the heads as its queries and the slot's cache as both
        # keys and values (one key/value head): the cache is read once, not once for the scores
        # and again for the values. The value side carries the rope columns along; they are cut.
        cache = self.cache[:k, None, : ctx.length]  # [K, 1, S, rank + rope]
        bias = None if ctx.bias is None else ctx.bias[:, None, None, :]
        out = F.scaled_dot_product_attention(q, cache, cache, attn_mask=bias, scale=self.scale)
        out = out[:, 0, :, : self.rank]  # [K, nH, rank]
        out = torch.einsum("bhr,hvr->bhv", out, w[:, self.nope :])  # absorb W_UV
        return self.o_proj(out.reshape(k, 1, -1))


def visibility_bias(last: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [R, span] for R queries over keys 0..span-1: 0 where key j is
    visible to query r (j <= last[r]), -inf after. Built once per step or chunk; every layer
    adds it."""
    hidden = torch.arange(span, device=last.device)[None, :] > last[:, None]
    bias = torch.zeros(hidden.shape, dtype=dtype, device=last.device)
    return bias.masked_fill(hidden, float("-inf"))


class MHAttention(nn.Module):
    """Plain multi-head attention (vl2-tiny, `use_mla: false`): Llama attention, half-split RoPE."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.register_buffer("cache", None, persistent=False)  # [2, slots, n_kv, max_seq+1, d]

    def setup_cache(
        self, slots: int, max_seq: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.cache = torch.zeros(
            2, slots, self.n_kv, max_seq, self.head_dim, device=device, dtype=dtype
        )

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, -1), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv, -1), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, -1).transpose(1, 2)
        return q, k, v  # [B, heads, T, d]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        b, _, t, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv != self.n_heads, **kw)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.prefill(x, ctx) if isinstance(ctx, Prefill) else self.decode(x, ctx)

    def prefill(self, x: torch.Tensor, ctx: Prefill) -> torch.Tensor:
        q, k, v = self._project(x, ctx.cos, ctx.sin)
        end = ctx.start + x.shape[1]
        self.cache[0, ctx.slot, :, ctx.start : end] = k[0]
        self.cache[1, ctx.slot, :, ctx.start : end] = v[0]
        if ctx.start:
            k = self.cache[0, ctx.slot : ctx.slot + 1, :, :end]
            v = self.cache[1, ctx.slot : ctx.slot + 1, :, :end]
        return self._attend(q, k, v, **ctx.sdpa_mask())

    def decode(self, x: torch.Tensor, ctx: Decode) -> torch.Tensor:
        q, k, v = self._project(x, ctx.cos, ctx.sin)
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        self.cache[0][rows, :, ctx.pos] = k[:, :, 0]  # [K, n_kv, d]
        self.cache[1][rows, :, ctx.pos] = v[:, :, 0]
        keys, values = self.cache[0, :n, :, : ctx.length], self.cache[1, :n, :, : ctx.length]
        bias = None if ctx.bias is None else ctx.bias[:, None, None, :]
        return self._attend(q, keys, values, attn_mask=bias)


class MLP(nn.Module):
    """SiLU-gated MLP: dense layers, each routed expert and the shared experts."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router, in float32 as upstream. Returns expert ids and weights, [N, top_k] each."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        n_experts = required("n_routed_experts", cfg.n_routed_experts)
        self.weight = nn.Parameter(torch.empty(n_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(n_experts))
        self.top_k, self.method, self.scoring = (
            required("num_experts_per_tok", cfg.num_experts_per_tok),
            cfg.topk_method,
            cfg.scoring_func,
        )
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def _keep_top_groups(self, choice: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero (not -inf, as upstream) every expert outside the topk_group best groups."""
        n, n_experts = choice.shape
        top = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores).scatter_(1, top, 1.0)
        keep = keep[:, :, None].expand(n, self.n_group, n_experts // self.n_group).reshape(n, -1)
        return choice.masked_fill(keep == 0, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        n = scores.shape[0]
        if self.method == "greedy":
            choice = scores
        elif self.method == "group_limited_greedy":
            grouped = scores.view(n, self.n_group, -1)
            choice = self._keep_top_groups(scores, grouped.max(dim=-1).values)
        else:  # noaux_tc: bias steers the choice, weights stay the unbiased scores
            choice = scores + self.e_score_correction_bias.float()
            grouped = choice.view(n, self.n_group, -1)
            choice = self._keep_top_groups(choice, grouped.topk(2, dim=-1).values.sum(-1))
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    """Routed experts + shared experts, with three ways to run the routed part (same math):

    - grouped: tokens sorted by expert, each hit expert runs once over its tokens (one host
      sync for the counts): prefill everywhere, and every step of eager CPU decode;
    - gathered: each token indexes its k experts in the stacked weights (no host sync): a
      device decode step whose N tokens pick fewer than E expert slots in total;
    - dense: every expert runs over all N tokens and each token keeps its k outputs (no host
      sync, every expert's weights read once): a device decode batch large enough that it
      would touch most experts anyway, up to DENSE_MAX_TOKENS (beyond which the wasted
      (E - k) / E of the FLOPs would cost more than the weight reads they save).
    `stack_experts()` builds the stacked weights after loading and turns each expert's
    parameters into views of them (no second copy).
    """

    DENSE_MAX_TOKENS = 256

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate = MoEGate(cfg)
        n_experts = required("n_routed_experts", cfg.n_routed_experts)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(n_experts)
        )
        if cfg.n_shared_experts:
            self.shared_experts = MLP(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
            )
        self.w13: torch.Tensor | None = None  # [E, 2*Mi, H]: gate_proj ‖ up_proj
        self.w2: torch.Tensor | None = None  # [E, H, Mi]

    @torch.no_grad()
    def stack_experts(self) -> None:
        experts = cast("Sequence[MLP]", self.experts)  # an nn.ModuleList types its items Module
        mi = experts[0].gate_proj.weight.shape[0]
        self.w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
        self.w2 = torch.stack([e.down_proj.weight for e in experts])
        for i, e in enumerate(experts):
            e.gate_proj.weight = nn.Parameter(self.w13[i, :mi], requires_grad=False)
            e.up_proj.weight = nn.Parameter(self.w13[i, mi:], requires_grad=False)
            e.down_proj.weight = nn.Parameter(self.w2[i], requires_grad=False)

    def _routed_grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, k, H]: each expert processes all of its tokens at once."""
        n, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = x.new_empty(n * k, x.shape[-1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                slots = order[start : start + c]
                out[slots] = self.experts[e](x[slots // k])
                start += c
        return out.view(n, k, -1)

    def _routed_gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, k, H], indexing the stacked weights on the device.

        Written as gather + einsum so that torch.compile fuses the gather into the GEMV
        reduction: the selected experts' weights are read once, never copied (measured on CPU
        inductor at vl2-small shapes: 9 ms, the memcpy speed, vs 187 ms eager)."""
        if self.w13 is None or self.w2 is None:
            raise RuntimeError("MoE: stack_experts() has not run, so there are no stacked weights")
        gate, up = torch.einsum("nh,nkph->nkp", x, self.w13[ids]).chunk(2, dim=-1)
        return torch.einsum("nkp,nkhp->nkh", F.silu(gate) * up, self.w2[ids])

    def _routed_dense(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, k, H]: all experts over all tokens (two batched matmuls), then each
        token's k outputs picked."""
        if self.w13 is None or self.w2 is None:
            raise RuntimeError("MoE: stack_experts() has not run, so there are no stacked weights")
        gate, up = torch.einsum("nh,eph->enp", x, self.w13).chunk(2, dim=-1)
        out = torch.einsum("enp,ehp->neh", F.silu(gate) * up, self.w2)  # [N, E, H]
        return out.gather(1, ids[:, :, None].expand(-1, -1, out.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        n, k = ids.shape
        # A decode step on the device (CUDA, or any compiled step) must not read `ids` on the
        # host; eager CPU has no device to wait for, and grouping by expert is its fastest path
        # while the tokens pick fewer expert slots than there are experts. From there on every
        # device runs them dense: the same weights are read, without a loop over experts.
        on_device = flat.is_cuda or torch.compiler.is_compiling()
        if self.w13 is None or n > self.DENSE_MAX_TOKENS:
            routed = self._routed_grouped(flat, ids)
        elif n * k >= len(self.experts):
            routed = self._routed_dense(flat, ids)
        elif on_device:
            routed = self._routed_gathered(flat, ids)
        else:
            routed = self._routed_grouped(flat, ids)
        y = (routed.float() * weights[:, :, None]).sum(dim=1).to(x.dtype).view(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.use_mla else MHAttention(cfg)
        self.mlp = (
            MoE(cfg) if cfg.layer_is_moe(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV2Model(nn.Module):
    """`language.model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2ForCausalLM(nn.Module):
    """`language.*`. Call `setup_cache` once after loading; then `prefill` / `decode`.

    The cache has `slots` rows of max_seq + 1 positions: positions 0..max_seq-1 hold a
    sequence, the spare last one takes the writes of decode rows that carry no sequence this
    step (their slot is free or still prefilling), so a fixed-shape batch never disturbs them.
    """

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq = 0
        self.slots = 0
        self.register_buffer("cos", None, persistent=False)  # [max_seq + 1, rope_dim]
        self.register_buffer("sin", None, persistent=False)

    @property
    def spare_position(self) -> int:
        return self.max_seq

    def setup_cache(self, max_seq: int, slots: int = 1) -> None:
        """Allocate the KV cache (`slots` sequences of up to `max_seq` tokens) and the RoPE
        tables on the model's device and dtype."""
        p = self.lm_head.weight
        self.max_seq, self.slots = max_seq, slots
        self.cos, self.sin = rope_tables(
            self.config.rope_dim, self.config.rope_theta, max_seq + 1, p.device, p.dtype
        )
        for layer in self._layers():
            layer.self_attn.setup_cache(slots, max_seq + 1, p.device, p.dtype)

    def cache_bytes_per_slot(self) -> int:
        return sum(layer.self_attn.cache.nbytes for layer in self._layers()) // self.slots

    def _layers(self) -> Iterable[DecoderLayer]:
        return cast("Iterable[DecoderLayer]", self.model.layers)  # nn.ModuleList types them Module

    def _run(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        for layer in self.model.layers:
            h = layer(h, ctx)
        return self.model.norm(h)

    def hidden_states(self, embeds: torch.Tensor, slot: int = 0, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states [1, T, H] of a prompt chunk at positions start..start+T-1
        of cache slot `slot`, attending to the slot's earlier positions; fills the cache."""
        t = embeds.shape[1]
        if start + t > self.max_seq:
            raise ValueError(f"prompt of {start + t} tokens exceeds the cache of {self.max_seq}")
        span = slice(start, start + t)
        bias = None
        if start:  # a later chunk sees the whole prefix and itself causally (bottom-right)
            positions = torch.arange(start, start + t, device=embeds.device)
            bias = visibility_bias(positions, start + t, embeds.dtype)
        ctx = Prefill(self.cos[None, span], self.sin[None, span], slot, start, bias)
        return self._run(embeds, ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] of final-norm hidden states [..., H]."""
        return self.lm_head(hidden).float()

    def prefill(self, embeds: torch.Tensor, slot: int = 0, start: int = 0) -> torch.Tensor:
        """Float32 logits of the chunk's last position only [1, V]."""
        return self.logits(self.hidden_states(embeds, slot, start)[:, -1])

    def decode(
        self, token: torch.Tensor, pos: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """token [K, 1] ids for slots 0..K-1 at positions `pos` [K] (a device tensor) ->
        float32 logits [K, V].

        `length` = the largest pos + 1 when the caller knows it on the host (eager decode then
        reads only that much of the cache); None attends over the whole cache under the mask
        (fixed shapes, for compilation / CUDA graphs)."""
        n = token.shape[0]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        span = self.max_seq + 1 if length is None else length
        bias = None
        if n > 1 or length is None:
            bias = visibility_bias(pos, span, cos.dtype)
        h = self._run(self.model.embed_tokens(token), Decode(cos, sin, pos, span, bias))
        return self.logits(h[:, -1])
