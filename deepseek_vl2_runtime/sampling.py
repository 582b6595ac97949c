"""Choosing the next token from last-position float32 logits.

The stages and their order are those of the official path (transformers 4.38 `sample`):
repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw. Two deliberate
differences from the official serving code: the repetition penalty also applies at temperature 0
(greedy), and the draw uses a per-request `torch.Generator`, so a seed reproduces a request.
Every function is pure and stays on the device (no host synchronisation).
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
            return InputError(f"{name}={getattr(self, name)!r} is invalid: {rule}")

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


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Every token already in the sequence (`seen` [V] bool): positive logits / penalty, negative * penalty."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every logit >= the k-th largest (ties at the threshold survive, as upstream)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative probability is <= 1 - top_p; keep >= 1."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """The scores the draw sees: penalty, then (when sampling) temperature, top-k, top-p."""
    scores = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return scores
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


def sample(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Next token id (a 0-d device tensor). Greedy at temperature 0 (first index on ties).

    Sampling draws argmax(p / E) with E ~ Exp(1) i.i.d., an exact draw from the categorical p
    that needs no host round trip (unlike torch.multinomial on some backends).
    """
    scores = process_logits(logits, seen, params)
    if params.temperature == 0:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
