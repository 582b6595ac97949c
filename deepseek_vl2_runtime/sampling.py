"""Choosing the next token from last-position float32 logits.

The stages and their order are those of the official path (transformers 4.38 `sample`):
repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw. Two deliberate
differences from the official serving code: the repetition penalty also applies at temperature 0
(greedy), and the draw uses a per-request `torch.Generator`, so a seed reproduces a request.
Every function is pure; the one host synchronisation is the count of each sampled row's
top-k survivors, which decides whether the row is drawn among its k candidates or over the whole
vocabulary (`draw`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import InputError

MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.9  # 1 = off
    top_k: int = 50  # 0 = off (50 is what the official path silently applies)
    repetition_penalty: float = 1.1  # 1 = off
    max_new_tokens: int = 2048
    seed: int | None = None  # None = a fresh random seed, reported back

    def validate(self) -> None:
        def bad(name: str, rule: str) -> InputError:
            return InputError.invalid(name, getattr(self, name), rule)

        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "use a value >= 0 (0 means greedy decoding)")
        if not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", "use a value between 0 and 1")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "use an integer >= 0 (0 disables top-k)")
        if not self.repetition_penalty > 0.0 or self.repetition_penalty > 100.0:
            raise bad(
                "repetition_penalty",
                "use a value > 0 (1 disables it; values above 1 discourage repeats)",
            )
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 0
        ):
            raise bad("max_new_tokens", "use an integer >= 0")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise bad("seed", f"use an integer between 0 and {MAX_SEED}, or leave it unset")

    def with_seed(self) -> SamplingParams:
        """Fill in a fresh random seed if none was given."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=int.from_bytes(os.urandom(8), "little") & MAX_SEED)


Value = float | torch.Tensor  # one value for every row, or a [B, 1] column (one per row)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: Value
) -> torch.Tensor:
    """Every token already in the sequence (`seen`, bool like logits): positive logits / penalty,
    negative * penalty."""
    if isinstance(penalty, float | int) and penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: Value) -> torch.Tensor:
    if isinstance(temperature, float | int) and temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(
    logits: torch.Tensor, k: int | torch.Tensor, k_max: int | None = None
) -> torch.Tensor:
    """Keep every logit >= the k-th largest (ties at the threshold survive, as upstream).
    k <= 0 or k >= V keeps everything; a [B, 1] k filters each row by its own k (`k_max`, the
    largest k that filters, known on the host, spares a device read)."""
    vocab = logits.shape[-1]
    if isinstance(k, int):
        if k <= 0 or k >= vocab:
            return logits
        threshold = torch.topk(logits, k).values[..., -1:]
        return logits.masked_fill(logits < threshold, float("-inf"))
    off = (k <= 0) | (k >= vocab)
    kmax = int(k.masked_fill(off, 1).max()) if k_max is None else max(k_max, 1)
    values = torch.topk(logits, kmax).values  # [B, kmax], descending
    threshold = values.gather(-1, (k.masked_fill(off, 1) - 1).clamp(max=kmax - 1))
    return logits.masked_fill((logits < threshold) & ~off, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: Value) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative probability is <= 1 - top_p; keep >= 1.
    A [B, 1] top_p is float64, so that 1 - top_p rounds exactly as for a Python float."""
    if isinstance(top_p, float | int) and top_p >= 1.0:
        return logits
    # Stable: equal logits keep their order (index order, or a candidate set's canonical order),
    # so the tokens dropped at a tie do not depend on the row's length.
    sorted_logits, order = torch.sort(logits, descending=False, stable=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    if isinstance(top_p, torch.Tensor):
        drop_sorted = (cumulative <= (1 - top_p).to(cumulative.dtype)) & (top_p < 1.0)
    else:
        drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """The scores the draw sees for one request: penalty, then (when sampling) temperature,
    top-k, top-p. logits/seen [V] or [B, V]."""
    scores = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return scores
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


def column(
    values: list[float] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One value per row as a [B, 1] device tensor (copied without waiting for the device)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)[:, None]


def exponential_noise(
    like: torch.Tensor, generators: list[torch.Generator], lengths: list[int] | None = None
) -> torch.Tensor:
    """E ~ Exp(1) i.i.d. shaped like `like` [B, V], row i from generators[i]: -log(1 - U) of
    uniform U in [0, 1) (inverse CDF; on CPU `uniform_` is ~4x faster than `exponential_`),
    floored at the smallest normal float so that p / E is never 0 / 0. With `lengths`, row i
    draws only its first lengths[i] entries (the rest are +inf: p / E = 0 there): what a row
    draws depends on the row alone, not on the width of the batch."""
    noise = torch.ones_like(like) if lengths is not None else torch.empty_like(like)
    for i, (row, generator) in enumerate(zip(noise, generators, strict=True)):
        (row if lengths is None else row[: lengths[i]]).uniform_(generator=generator)
    return noise.neg_().log1p_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)


def draw_among_top_k(
    scores: torch.Tensor, ks: list[int], top_p: torch.Tensor, generators: list[torch.Generator]
) -> tuple[torch.Tensor, list[bool]]:
    """The draw of `sample` for rows that filter by top-k (0 < k < V), computed on each row's k
    candidates instead of the whole vocabulary: the same survivors, top-p decision and
    probabilities, with V-wide sorts, softmaxes and noise replaced by k-wide ones (at
    vl2-small's 102,400 entries the full path costs ~7 ms a row on CPU).

    scores [B, V] (penalised, tempered); ks the rows' k; top_p [B, 1] float64. Returns ids [B]
    and, per row, whether it was drawn here: a row whose k-th logit is tied with a logit outside
    its top k keeps more than k tokens (ties survive top-k), so it is left to the full path and
    draws nothing from its generator here. Candidates are put in a canonical order (logit
    descending, id ascending), so whether a row is drawn here, its noise and its ties depend on
    the row alone, not on the batch."""
    kmax = max(ks)
    values, ids = scores.topk(kmax)  # [B, kmax], logit descending
    threshold = values.gather(
        1, column(ks, torch.long, scores.device) - 1
    )  # [B, 1]: the k-th logit
    survivors = (scores >= threshold).sum(-1).tolist()  # a host sync: rows choose their path
    here = [n == row_k for n, row_k in zip(survivors, ks, strict=True)]
    ids, order = ids.sort(dim=-1)  # canonical order: id ascending, then a stable sort by logit
    values, order = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    candidates = values.masked_fill(values < threshold, float("-inf"))
    probs = apply_top_p(candidates, top_p).softmax(dim=-1)
    lengths = [row_k if ok else 0 for row_k, ok in zip(ks, here, strict=True)]
    pick = (probs / exponential_noise(probs, generators, lengths)).argmax(dim=-1, keepdim=True)
    return ids.gather(1, pick)[:, 0], here


def draw(
    scores: torch.Tensor, ks: list[int], top_p: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """Sampled ids [B] for tempered scores [B, V]: each row among its top-k candidates where it
    can (`draw_among_top_k`), else over the whole vocabulary (top-k off, or ties at its k-th
    logit): top-k, top-p, softmax, then argmax(p / E)."""
    vocab, device = scores.shape[-1], scores.device
    ids = torch.empty(len(ks), dtype=torch.long, device=device)
    full = list(range(len(ks)))
    window = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if window:
        rows = torch.tensor(window, device=device)
        every = len(window) == len(ks)  # the usual case: no row copied
        got, here = draw_among_top_k(
            scores if every else scores[rows],
            [ks[i] for i in window],
            top_p if every else top_p[rows],
            [generators[i] for i in window],
        )
        ids[rows] = got
        done = {i for i, ok in zip(window, here, strict=True) if ok}
        full = [i for i in full if i not in done]
    if full:
        rows = torch.tensor(full, device=device)
        row_ks = [ks[i] for i in full]
        filtering = [v for v in row_ks if 0 < v < vocab]
        k = column(row_ks, torch.long, device)
        kept = apply_top_k(scores[rows], k, max(filtering, default=1))
        probs = apply_top_p(kept, top_p[rows]).softmax(dim=-1)
        ids[rows] = (probs / exponential_noise(probs, [generators[i] for i in full])).argmax(-1)
    return ids


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Next token ids [B] for logits/seen [B, V], row i with its own params[i] and generator[i].

    Greedy rows (temperature 0) take the argmax of the penalised logits (first index on ties).
    Sampled rows draw argmax(p / E) with E ~ Exp(1) i.i.d. from the row's own generator: an
    exact draw from the categorical p (`draw`: among the row's top-k candidates where it can).
    A row's result depends only on its own logits, params and generator, so a request samples
    the same tokens alone and inside any batch.
    """
    device = logits.device

    penalty = column([p.repetition_penalty for p in params], logits.dtype, device)
    scores = apply_repetition_penalty(logits, seen, penalty)
    drawn = [i for i, p in enumerate(params) if p.temperature != 0]
    if not drawn:
        return scores.argmax(dim=-1)
    rows = [params[i] for i in drawn]
    picked = scores[drawn] if len(drawn) < len(params) else scores
    picked = apply_temperature(picked, column([p.temperature for p in rows], logits.dtype, device))
    top_p = column([p.top_p for p in rows], torch.float64, device)
    ids = draw(picked, [p.top_k for p in rows], top_p, [generators[i] for i in drawn])
    if len(drawn) == len(params):
        return ids
    greedy = scores.argmax(dim=-1)
    return greedy.index_copy(0, torch.tensor(drawn, device=device), ids)
