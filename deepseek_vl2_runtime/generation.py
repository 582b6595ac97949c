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


class DecodeStep:
    """`lm.decode` as the token loop calls it.

    Eager, it reads only the filled part of the cache. Compiled (`torch.compile`, fixed shapes:
    the whole cache under a device-side mask), it is one fused program; on CUDA the
    "reduce-overhead" mode also captures it as a CUDA graph, so a step costs one launch.
    Compilation happens on the first call; `Pipeline.load(compile=True)` warms it up.
    """

    def __init__(self, lm: DeepseekV2ForCausalLM, compile: bool = False) -> None:
        self.lm = lm
        self.compiled = None
        if compile:
            cuda = lm.lm_head.weight.device.type == "cuda"
            mode = "reduce-overhead" if cuda else "default"
            self.compiled = torch.compile(lm.decode, fullgraph=True, dynamic=False, mode=mode)
            self._mark_step = torch.compiler.cudagraph_mark_step_begin if cuda else None

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        if self.compiled is None:
            return self.lm.decode(token, pos, length)
        if self._mark_step is not None:
            self._mark_step()
        return self.compiled(token, pos)


def generate_tokens(
    step: DecodeStep,
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
    lm = step.lm
    device = embeds.device
    seen = torch.zeros(lm.config.vocab_size, dtype=torch.bool, device=device)
    seen[prompt_ids] = True
    length = embeds.shape[1]  # filled cache entries, tracked on the host
    pos = torch.tensor([length], device=device)
    logits = lm.prefill(embeds)[0]
    for i in range(max_new_tokens):
        token = sample(logits, seen, params, generator)
        last = i == max_new_tokens - 1
        if not last:  # queue the next step before reading the token back
            seen[token] = True
            length += 1
            logits = step(token.view(1, 1), pos, length)[0]
            pos += 1
        token_id = int(token)
        yield token_id
        if token_id == eos_id:
            return
