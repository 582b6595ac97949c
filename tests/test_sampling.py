"""The draw itself: sampled ids follow the processed distribution, filtered tokens are never
drawn, and each row's noise comes from its own generator alone."""

from __future__ import annotations

import torch

from deepseek_vl2_runtime.sampling import SamplingParams, exponential_noise, sample

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
