"""The draw itself: sampled ids follow the processed distribution, filtered tokens are never
drawn, and each row's noise comes from its own generator alone."""

from __future__ import annotations

import pytest
import torch

from deepseek_vl2_runtime.sampling import (
    SamplingParams,
    exponential_noise,
    process_logits,
    sample,
)

DRAWS = 6000


def test_draws_follow_the_processed_distribution() -> None:
    """Frequencies over 6,000 seeded draws match softmax(logits / T) over the top-k survivors
    within 4.5 standard deviations; tokens outside top-k are never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5]])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    params = SamplingParams(temperature=0.7, top_p=1.0, top_k=5, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(DRAWS):
        counts[int(sample(logits, seen, [params], [generator])[0])] += 1
    kept = logits[0] >= torch.topk(logits[0], 5).values[-1]
    p = torch.where(kept, logits[0] / 0.7, float("-inf")).softmax(-1)
    assert counts[~kept].sum() == 0
    sigma = (DRAWS * p * (1 - p)).sqrt()
    assert ((counts - DRAWS * p).abs() <= 4.5 * sigma + 1e-9).all(), (counts, DRAWS * p)


def test_exponential_noise_is_unit_exponential_per_row_generator() -> None:
    """Mean and variance ~1, strictly positive; a row depends on its generator only (the same
    seed gives the same row at any position of the batch)."""
    like = torch.empty(3, 50_000)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    noise = exponential_noise(like, gens)
    assert (noise > 0).all()
    assert abs(float(noise.mean()) - 1.0) < 0.02
    assert abs(float(noise.var()) - 1.0) < 0.05
    again = exponential_noise(
        torch.empty(2, 50_000), [torch.Generator().manual_seed(s) for s in (9, 7)]
    )
    assert torch.equal(again[0], noise[2])
    assert torch.equal(again[1], noise[0])


# Row 0: distinct logits; row 1: its 3rd and 4th largest logits tie (top-k 3 keeps 4 tokens).
LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5],
        [2.0, 1.0, 1.0, 0.0, -1.0, 3.0, -2.0, 1.0],
    ]
)


@pytest.mark.parametrize(
    ("row", "top_k", "top_p"),
    [
        (0, 5, 1.0),  # among the top-k candidates
        (0, 5, 0.8),  # ... with top-p over them
        (0, 0, 0.8),  # top-k off: over the whole vocabulary
        (1, 3, 1.0),  # a tie at the k-th logit: the whole vocabulary, all tied tokens kept
        (1, 3, 0.95),
    ],
)
def test_every_path_draws_the_processed_distribution(row, top_k, top_p) -> None:
    """Each way of drawing follows softmax(process_logits(...)), the official stages applied to
    the whole vocabulary, within 4.5 standard deviations; filtered tokens are never drawn."""
    logits = LOGITS[row : row + 1]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    params = SamplingParams(temperature=0.8, top_p=top_p, top_k=top_k, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed(99)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(DRAWS):
        counts[int(sample(logits, seen, [params], [generator])[0])] += 1
    p = process_logits(logits[0], seen[0], params).softmax(-1)
    assert counts[p == 0].sum() == 0
    sigma = (DRAWS * p * (1 - p)).sqrt()
    assert ((counts - DRAWS * p).abs() <= 4.5 * sigma + 1e-9).all(), (counts, DRAWS * p)
    if row == 1:
        assert (p > 0).sum() >= 4  # the tie survived top-k


def test_a_row_draws_the_same_alone_and_beside_any_rows() -> None:
    """A row's ids depend on its logits, params and generator only: alone, or in a batch whose
    other rows use a larger k, no top-k (whole vocabulary), a tie at their k-th logit, or greedy
    decoding, it draws the same sequence of ids."""
    target = SamplingParams(temperature=1.0, top_p=0.9, top_k=4, repetition_penalty=1.0)
    others = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=7, repetition_penalty=1.0),
        SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0),
        SamplingParams(temperature=0.5, top_p=0.95, top_k=3, repetition_penalty=1.0),  # tie row
        SamplingParams(temperature=0.0, repetition_penalty=1.0),
    ]

    def ids(batch: list[SamplingParams]) -> list[int]:
        logits = torch.cat([LOGITS[:1], LOGITS[:1], LOGITS[:1], LOGITS[1:], LOGITS[:1]])
        logits = logits[: len(batch)]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        gens = [torch.Generator().manual_seed(5 + i) for i in range(len(batch))]
        return [int(sample(logits, seen, batch, gens)[0]) for _ in range(200)]

    alone = ids([target])
    assert len(set(alone)) > 1  # it does sample
    for n in range(2, len(others) + 2):
        assert ids([target, *others[: n - 1]]) == alone
