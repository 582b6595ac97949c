"""The engine: the only caller of the model's forward, serving many sequences at once.

Two threads own the model and the KV cache. Requests (already validated and encoded:
`EncodedRequest` + `SamplingParams`) join a FIFO queue. Each step of the scheduling loop

1. takes over the sequences whose prefill has finished, samples their first token and adds them
   to the decoding batch;
2. drops cancelled sequences and returns their cache slots;
3. admits queued requests while cache slots are free (a request that gets none waits) and hands
   them to the prefill thread;
4. runs one batched decode step for every decoding sequence (row i of the batch is cache slot i;
   on CUDA with `compile`, a CUDA graph per batch-size bucket);
5. samples each row with its request's own parameters and `torch.Generator`, emits the ids, and
   stops each sequence on its own terms (end of sentence, its token budget, the context end).

The prefill thread encodes each admitted request's images and fills its cache slot, in
`prefill_chunk`-token chunks (bounding activation memory; a cancel is seen between chunks), in
admission order, while the loop keeps decoding: a 2,000-token image prompt never stalls the
running streams. On CUDA both threads issue work to the same stream, so the device interleaves
them kernel by kernel and a chunk is the longest a decode step can wait behind prefill: 512
tokens. On CPU the two threads run on different cores and a chunk delays nobody, so it is 2,048
tokens: every later chunk attends over the cached prefix under an explicit mask, which SDPA
computes in full, so smaller chunks cost more (a 2,028-token prompt on the tiny checkpoint:
~105 ms in 512-token chunks, ~70 ms in one). The two threads never write the same cache
entries: a slot being prefilled is an idle row of the decode batch, which writes only that
slot's spare position.

The engine knows nothing about text. Chunk boundaries are fixed multiples of `prefill_chunk`
from each prompt's start and sampling is per row, so a request computes the same numbers
(up to the float reduction order of a batched matmul) alone or inside any batch.

A failure inside one sequence (its image encoding, its prefill) fails that sequence alone, with
the original exception as the stream's error; a failing decode step fails the sequences in it;
an error in either thread itself fails every waiting and running request, and `healthy` turns
False. Nothing blocks forever: every stream ends with a
`Finished` item.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import torch

from .language import DeepseekV2ForCausalLM
from .sampling import SamplingParams, sample

if TYPE_CHECKING:
    from .model import DeepseekVL2
    from .pipeline import EncodedRequest

log = logging.getLogger("deepseek_vl2_runtime")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Device memory kept free beside the KV cache for activations: vision over 3 images x 10 tiles,
# a prefill chunk, the decode step's logits (vl2-small needs well under this).
ACTIVATION_RESERVE_BYTES = 3 * 2**30
# Prompt tokens per prefill chunk by device type (see the module docstring); others: "cpu".
PREFILL_CHUNK = {"cuda": 512, "cpu": 2048}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_batch: sequences that run at once (the cache slots, at most); prefill_chunk: prompt
    tokens per prefill chunk (default: PREFILL_CHUNK of the device type); cache_bytes: KV cache
    budget (default: free device memory less ACTIVATION_RESERVE_BYTES on CUDA; max_batch full
    contexts on CPU); compile: the decode step through torch.compile (a CUDA graph per batch
    bucket on CUDA)."""

    max_batch: int = 32
    prefill_chunk: int | None = None
    cache_bytes: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1 or (self.prefill_chunk is not None and self.prefill_chunk < 1):
            raise ValueError(f"invalid engine configuration {self}")


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated id; `logits` (float32 [V], on the CPU) only for requests that keep them."""

    id: int
    logits: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last item of every stream. reason: eos | length | context | cancelled | error."""

    reason: str
    error: BaseException | None = None


class EngineError(RuntimeError):
    """The engine could not finish a request for a reason that is not the request's fault."""


class TokenStream:
    """What the engine emits for one request, read by one consumer: `Token`s, then `Finished`.

    Iterate it (blocking; CLI, tests, benchmark) or `async for` it when it was created with an
    event loop (the Cog predictor): the engine thread then hands items over with
    `loop.call_soon_threadsafe`. Iteration yields the tokens and ends at `Finished`, raising its
    error if there is one. `cancel()` asks the engine to stop and free the cache at its next
    step; safe from any thread, any number of times.
    """

    def __init__(
        self, wake: threading.Condition, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._loop = loop
        self._items: queue.SimpleQueue[Token | Finished] | asyncio.Queue[Token | Finished]
        self._items = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.cancelled = False
        self.finished: Finished | None = None
        self._wake = wake  # the engine's condition: a cancel wakes an idle loop

    def cancel(self) -> None:
        self.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def _emit(self, item: Token | Finished) -> bool:
        """Engine side. False when the consumer's event loop is gone (treated as a cancel)."""
        return not TokenStream._emit_all([(self, item)])

    @staticmethod
    def _emit_all(items: list[tuple[TokenStream, Token | Finished]]) -> set[TokenStream]:
        """Engine side: one item to each stream, with one wake-up per event loop (not one per
        item). Returns the streams whose event loop is gone (marked cancelled)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, Token | Finished]]] = {}
        for stream, item in items:
            if stream._loop is None:
                stream._items.put(item)
            else:
                by_loop.setdefault(stream._loop, []).append((stream, item))
        gone: set[TokenStream] = set()
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(s._items, item) for s, item in pairs])
            except RuntimeError:  # event loop closed: nobody is listening any more
                for stream, _ in pairs:
                    stream.cancelled = True
                    gone.add(stream)
        return gone

    def _end(self, item: Token | Finished) -> Token:
        if isinstance(item, Token):
            return item
        self.finished = item
        if item.error is not None:
            raise item.error
        raise StopIteration

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        if self.finished is not None:
            raise StopIteration
        if isinstance(self._items, asyncio.Queue):
            raise TypeError("a TokenStream created with an event loop is read with `async for`")
        return self._end(self._items.get())

    def __aiter__(self) -> AsyncIterator[Token]:
        return self

    async def __anext__(self) -> Token:
        if self.finished is not None:
            raise StopAsyncIteration
        if not isinstance(self._items, asyncio.Queue):
            raise TypeError("a TokenStream created without an event loop is read with `for`")
        try:
            return self._end(await self._items.get())
        except StopIteration:
            raise StopAsyncIteration from None


def _put_all(pairs: list[tuple[queue.SimpleQueue | asyncio.Queue, Token | Finished]]) -> None:
    """Event-loop side of `TokenStream._emit_all`."""
    for items, item in pairs:
        items.put_nowait(item)


@dataclasses.dataclass(eq=False)
class _Sequence:
    """A request inside the engine: queued -> prefilling -> decoding -> finished."""

    request: EncodedRequest
    params: SamplingParams
    budget: int  # new tokens at most
    limit: str  # finish reason when the budget runs out: "length" or "context"
    stream: TokenStream
    generator: torch.Generator
    keep_logits: bool
    slot: int = -1
    last: int = -1  # the id to feed to the next decode step
    generated: int = 0


class DecodeStep:
    """`lm.decode` as the engine calls it: token ids [K, 1] for slots 0..K-1 at positions [K].

    Eager, it reads only the filled part of the cache (`length`). Compiled (`torch.compile`,
    fixed shapes: the batch padded to a bucket, the whole cache under the position mask), it is
    one fused program per bucket; on CUDA "reduce-overhead" also captures each as a CUDA graph.
    """

    def __init__(self, lm: DeepseekV2ForCausalLM, compile: bool) -> None:
        self.lm = lm
        self.compiled = None
        self.cuda = lm.lm_head.weight.device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if self.cuda else "default"
            self.compiled = torch.compile(lm.decode, fullgraph=True, dynamic=False, mode=mode)

    def rows(self, k: int) -> int:
        """The batch size a step for slots 0..k-1 runs at (its bucket when compiled)."""
        if self.compiled is None:
            return k
        return next((b for b in BUCKETS if b >= k), k)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Float32 logits [len(tokens), V]."""
        device = self.lm.lm_head.weight.device
        token = torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True)[:, None]
        pos = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        if self.compiled is None:
            length = max(p for p in positions if p != self.lm.spare_position) + 1
            return self.lm.decode(token, pos, length)
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(token, pos)


class Engine:
    def __init__(self, model: DeepseekVL2, eos_id: int, config: EngineConfig | None = None) -> None:
        self.model, self.eos_id = model, eos_id
        self.config = config or EngineConfig()
        self.lm: DeepseekV2ForCausalLM = model.language
        self.device = model.image_newline.device
        self.prefill_chunk = self.config.prefill_chunk or PREFILL_CHUNK.get(
            self.device.type, PREFILL_CHUNK["cpu"]
        )
        self.max_context = model.config.language_config.max_position_embeddings
        self.slots = self._size_cache()
        self.step = DecodeStep(self.lm, self.config.compile)
        vocab = model.config.language_config.vocab_size
        self._seen = torch.zeros(self.slots, vocab, dtype=torch.bool, device=self.device)
        self._free = list(range(self.slots))  # kept sorted: the lowest slot is taken first
        # Each sequence is in exactly one place: waiting (loop) -> to_prefill -> prefilling (the
        # prefill thread's) -> prefilled (handed back) -> active (loop, decoding).
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._to_prefill: collections.deque[_Sequence] = collections.deque()
        self._prefilling: _Sequence | None = None  # the one the prefill thread is working on
        self._prefilled: list[tuple[_Sequence, torch.Tensor | BaseException | None]] = []
        self._active: list[_Sequence] = []  # admission order
        self._cv = threading.Condition()  # guards the queues above; both threads wait on it
        self._closing = False
        self._prefill_stop = False
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deepseek-vl2-engine", daemon=True)
        self._prefiller = threading.Thread(
            target=self._prefill_run, name="deepseek-vl2-prefill", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise EngineError(f"the engine failed to start: {self.error}") from self.error

    # -- cache -----------------------------------------------------------------------------

    def _size_cache(self) -> int:
        """Cache slots for the budget (never more than max_batch), allocated now."""
        self.lm.setup_cache(self.max_context, 1)
        per_slot = self.lm.cache_bytes_per_slot()
        budget = self.config.cache_bytes
        if budget is None and self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0] + self.lm.slots * per_slot
            budget = free - ACTIVATION_RESERVE_BYTES
        slots = (
            self.config.max_batch
            if budget is None
            else min(self.config.max_batch, budget // per_slot)
        )
        if slots < 1:
            raise EngineError(
                f"not enough memory for the KV cache of one {self.max_context}-token sequence "
                f"({per_slot / 2**20:.0f} MiB; budget {max(budget or 0, 0) / 2**20:.0f} MiB)"
            )
        self.lm.setup_cache(self.max_context, int(slots))
        log.info(
            "KV cache: %d sequences of %d tokens, %.1f MiB",
            slots,
            self.max_context,
            slots * per_slot / 2**20,
        )
        return int(slots)

    @property
    def free_slots(self) -> int:
        """Cache slots not held by a sequence (all of them when the engine is idle)."""
        with self._cv:
            return len(self._free)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and self._prefiller.is_alive()

    # -- front door ------------------------------------------------------------------------

    def embed(self, request: EncodedRequest) -> torch.Tensor:
        """inputs_embeds [1, T, H] of a request (token embeddings with the image features)."""
        pixels = request.images.pixels.to(self.device)
        return self.model.embed(
            request.input_ids, request.image_mask, pixels, list(request.images.crops)
        )

    def submit(
        self,
        request: EncodedRequest,
        params: SamplingParams,
        *,
        keep_logits: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> TokenStream:
        """Queue a request whose params were validated and carry a seed; returns its stream.
        The answer stops at params.max_new_tokens or at the context end, whichever is first."""
        room = self.max_context - request.num_tokens
        if room <= 0:
            raise ValueError(f"a prompt of {request.num_tokens} tokens leaves no room")
        budget = min(params.max_new_tokens, room)
        if params.seed is None:
            raise ValueError("submit() needs params that carry a seed (SamplingParams.with_seed())")
        seq = _Sequence(
            request=request,
            params=params,
            budget=budget,
            limit="context" if budget < params.max_new_tokens else "length",
            stream=TokenStream(self._cv, loop),
            generator=torch.Generator(self.device).manual_seed(params.seed),
            keep_logits=keep_logits,
        )
        if budget == 0:
            seq.stream._emit(Finished(seq.limit))
            return seq.stream
        with self._cv:
            if not self.healthy or self._closing:
                raise EngineError(self._dead_message())
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq.stream

    def close(self) -> None:
        """Stop the loop (pending requests are failed) and wait for it."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                if self.step.compiled is not None:
                    self._warm_up()
                self._prefiller.start()
                self._ready.set()
                while self._next():
                    self._take_prefilled()
                    self._reap()
                    self._admit()
                    self._decode()
        except BaseException as exc:
            self.error = exc
            log.error("the engine stopped: %s", exc, exc_info=exc)
        finally:
            self._ready.set()
            with self._cv:
                self._prefill_stop = True
                self._cv.notify_all()
            if self._prefiller.is_alive():
                self._prefiller.join()
            self._fail_all()

    def _next(self) -> bool:
        """Wait until there is work; False when the engine is closing or the prefill thread
        died."""
        with self._cv:
            while not (
                self._closing
                or self.error is not None
                or self._active
                or self._prefilled
                or (self._waiting and self._free)
                or any(s.stream.cancelled for s in self._waiting)
            ):
                self._cv.wait()
            return not self._closing and self.error is None

    def _warm_up(self) -> None:
        """Compile (capture) the decode step of every batch bucket up to the slot count. Only
        the spare cache position is written."""
        spare = self.lm.spare_position
        for rows in sorted({self.step.rows(k) for k in range(1, self.slots + 1)}):
            for _ in range(3):
                self.step([0] * rows, [spare] * rows)

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq in self._active:
            self._active.remove(seq)
        with self._cv:
            if seq.slot >= 0:
                self._free.append(seq.slot)
                self._free.sort()
                seq.slot = -1
        seq.stream._emit(Finished(reason, error))

    def _reap(self) -> None:
        with self._cv:
            dropped = [s for s in self._waiting if s.stream.cancelled]
            for seq in dropped:
                self._waiting.remove(seq)
        for seq in dropped + [s for s in self._active if s.stream.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._waiting or not self._free:
                    return
                seq = self._waiting.popleft()
                if seq.stream.cancelled:
                    seq.stream._emit(Finished("cancelled"))
                    continue
                seq.slot = self._free.pop(0)
            self._seen[seq.slot].zero_()
            self._seen[seq.slot, seq.request.input_ids] = True
            with self._cv:
                self._to_prefill.append(seq)
                self._cv.notify_all()

    def _take_prefilled(self) -> None:
        """Sequences back from the prefill thread: sample the first token, start decoding."""
        with self._cv:
            done, self._prefilled = self._prefilled, []
        for seq, result in done:
            if isinstance(result, BaseException):
                self._finish(seq, "error", result)
            elif result is None or seq.stream.cancelled:
                self._finish(seq, "cancelled")
            else:
                self._active.append(seq)
                try:
                    self._sample([seq], result)
                except Exception as exc:
                    log.error("request failed sampling its first token: %s", exc, exc_info=exc)
                    self._finish(seq, "error", exc)

    # -- the prefill thread ----------------------------------------------------------------

    def _prefill_run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not (self._prefill_stop or self._to_prefill):
                            self._cv.wait()
                        if self._prefill_stop:
                            return
                        seq = self._prefilling = self._to_prefill.popleft()
                    result = self._prefill(seq)
                    with self._cv:
                        self._prefilled.append((seq, result))
                        self._prefilling = None
                        self._cv.notify_all()
        except BaseException as exc:
            self.error = exc
            log.error("the engine's prefill thread stopped: %s", exc, exc_info=exc)
            with self._cv:
                self._cv.notify_all()

    def _prefill(self, seq: _Sequence) -> torch.Tensor | BaseException | None:
        """Encode the request's images and fill its cache slot. Returns the last position's
        float32 logits [1, V]; None when it was cancelled; the exception when it failed."""
        if seq.stream.cancelled:
            return None
        try:
            embeds = self.embed(seq.request)[0]
            chunk, n = self.prefill_chunk, seq.request.num_tokens
            for start in range(0, n, chunk):  # fixed boundaries: the same numbers in any batch
                if seq.stream.cancelled:
                    return None
                hidden = self.lm.hidden_states(embeds[start : start + chunk][None], seq.slot, start)
            return self.lm.logits(hidden[:, -1])
        except Exception as exc:
            log.error("request failed in prefill: %s", exc, exc_info=exc)
            return exc

    def _decode(self) -> None:
        rows = list(self._active)  # all prefilled, each with its first token sampled
        if not rows:
            return
        n = self.step.rows(max(s.slot for s in rows) + 1)
        tokens, positions = [0] * n, [self.lm.spare_position] * n
        for s in rows:
            tokens[s.slot] = s.last
            positions[s.slot] = s.request.num_tokens + s.generated - 1
        try:
            logits = self.step(tokens, positions)
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            self._sample(rows, logits.index_select(0, slots))
        except Exception as exc:
            log.error("decode step failed for %d request(s): %s", len(rows), exc, exc_info=exc)
            for s in rows:
                self._finish(s, "error", exc)

    def _sample(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one id per row (logits [len(rows), V]), emit it, apply the stop rules."""
        slots = torch.tensor([s.slot for s in rows], device=self.device)
        seen = self._seen.index_select(0, slots)
        ids = sample(logits, seen, [s.params for s in rows], [s.generator for s in rows])
        self._seen[slots, ids] = True
        kept = {i: logits[i].cpu() for i, s in enumerate(rows) if s.keep_logits}
        tokens: list[tuple[TokenStream, Token | Finished]] = []
        for i, (seq, token) in enumerate(zip(rows, ids.tolist(), strict=True)):
            seq.generated += 1
            seq.last = token
            tokens.append((seq.stream, Token(token, kept.get(i))))
        gone = TokenStream._emit_all(tokens)  # before any Finished: a stream's order holds
        for seq in rows:
            if seq.stream in gone:
                self._finish(seq, "cancelled")
            elif seq.last == self.eos_id:
                self._finish(seq, "eos")
            elif seq.generated == seq.budget:
                self._finish(seq, seq.limit)

    def _dead_message(self) -> str:
        if self._closing:
            return "the engine is shutting down"
        return f"the engine stopped after an internal error ({self.error}); restart the server"

    def _fail_all(self) -> None:
        error = EngineError(self._dead_message())
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            waiting += list(self._to_prefill) + [seq for seq, _ in self._prefilled]
            if self._prefilling is not None:  # the prefill thread died holding it
                waiting.append(self._prefilling)
            self._to_prefill, self._prefilled, self._prefilling = collections.deque(), [], None
        for seq in waiting + list(self._active):
            self._finish(seq, "error", error)
