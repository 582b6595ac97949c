"""The token loop: prefill once, then fixed-shape one-token decode steps.

Knows nothing about text. The only host synchronisation per step is reading the sampled id
(needed to stream it and to stop at end-of-sentence); the next decode step is queued on the
device before that read, so on a GPU the host never leaves the device idle.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .language import DeepseekV2ForCausalLM
from .sampling import SamplingParams, sample


def generate_tokens(
    lm: DeepseekV2ForCausalLM,
    embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    max_new_tokens: int,
    generator: torch.Generator,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids; the end-of-sentence id is yielded, then the loop stops.

    embeds [1, T, H] (prompt embeddings, images included); prompt_ids [T] (for the repetition
    penalty, which covers every id of the prompt and of the answer so far).
    """
    if max_new_tokens <= 0:
        return
    device = embeds.device
    seen = torch.zeros(lm.config.vocab_size, dtype=torch.bool, device=device)
    seen[prompt_ids] = True
    length = embeds.shape[1]  # filled cache entries, tracked on the host
    pos = torch.tensor([length], device=device)
    logits = lm.prefill(embeds)[0]
    for step in range(max_new_tokens):
        token = sample(logits, seen, params, generator)
        last = step == max_new_tokens - 1
        if not last:  # queue the next step before reading the token back
            seen[token] = True
            length += 1
            logits = lm.decode(token.view(1, 1), pos, length)[0]
            pos += 1
        token_id = int(token)
        yield token_id
        if token_id == eos_id:
            return
