"""The token loop: prefill once, then fixed-shape one-token decode steps.

Knows nothing about text. The only host synchronisation per step is reading the sampled id
(needed to stream it and to stop at end-of-sentence); on a GPU the next decode step is queued
before that read completes, so the host never leaves the device idle.
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
    # On CUDA the sampled id is copied to pinned host memory *before* the next step is queued,
    # so reading it waits for the sampling kernels only and the device runs ahead meanwhile.
    # On CPU everything is synchronous: read the id first, then run the next step.
    overlap = device.type == "cuda"
    host = torch.empty(1, dtype=torch.long, pin_memory=True) if overlap else None
    logits = lm.prefill(embeds)[0]

    def advance(token: torch.Tensor) -> None:
        nonlocal length, logits
        seen[token] = True
        length += 1
        logits = step(token.view(1, 1), pos, length)[0]
        pos.add_(1)

    for i in range(max_new_tokens):
        token = sample(logits, seen, params, generator)
        more = i < max_new_tokens - 1
        if overlap:
            host.copy_(token.view(1), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            if more:
                advance(token)  # queued behind the copy; wasted only if this id is EOS
            copied.synchronize()
            token_id = int(host[0])
        else:
            token_id = int(token)
        yield token_id
        if token_id == eos_id:
            return
        if more and not overlap:
            advance(token)
