"""The engine serves many requests at once, and each gets exactly what it would get alone.

Batched equals alone on every golden input of both tiny checkpoints (float32, CPU): greedy ids
identical (a token may differ only where the lone run's top1-top2 logit margin is below
MARGIN, and the failure names it), logits within LOGIT_ATOL step by step, seeded sampled
requests identical. Plus the serving rules: admission never over-commits the cache, a
cancelled request frees it, a failure stays inside its request, a dead loop fails everyone.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from deepseek_vl2_runtime import Pipeline, SamplingParams
from deepseek_vl2_runtime.engine import EngineConfig, EngineError, Token

from checkpoints import MLA_MODEL
from golden import CASES, Golden, golden_inputs

MARGIN, LOGIT_ATOL = 1e-3, 1e-4
GREEDY = dict(temperature=0, repetition_penalty=1.0, seed=0)
# The GPU's chunk: image prompts (400-2,000 tokens) are prefilled in 1-4 chunks, so the chunked
# path runs inside every mix (the CPU's default chunk, 2,048, would take most in one).
CHUNK = 512
CASE_IDS = [c for c in CASES if golden_inputs(c)]


@pytest.fixture(scope="module", params=CASE_IDS)
def case(request):
    pipe = Pipeline.load(
        CASES[request.param][0] / "model",
        device="cpu",
        engine=EngineConfig(max_batch=16, prefill_chunk=CHUNK),
    )
    requests = [
        pipe.encode(*Golden(request.param, i).request()) for i in golden_inputs(request.param)
    ]
    yield request.param, pipe, requests
    pipe.close()


def run_alone(pipe: Pipeline, request, params: SamplingParams) -> list[Token]:
    return list(pipe.generate(request, params, keep_logits=True))


def first_difference(alone: list[Token], batched: list[Token]) -> int | None:
    ids = [t.id for t in alone], [t.id for t in batched]
    if ids[0] == ids[1]:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b), min(map(len, ids))
    )


def assert_same_as_alone(name: str, alone: list[Token], batched: list[Token]) -> None:
    """Identical ids, logits within LOGIT_ATOL; a divergence is allowed only at a near-tie."""
    diverged = first_difference(alone, batched)
    upto = len(alone) if diverged is None else diverged
    for step in range(upto):
        torch.testing.assert_close(
            batched[step].logits,
            alone[step].logits,
            atol=LOGIT_ATOL,
            rtol=0,
            msg=f"{name}: logits of step {step}",
        )
    if diverged is not None:
        top2 = alone[diverged].logits.topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < MARGIN, (
            f"{name}: token {diverged} differs batched vs alone with a top1-top2 margin of "
            f"{margin:.2e} (>= {MARGIN})"
        )
        print(f"{name}: token {diverged} differs at a near-tie (margin {margin:.2e})")


def test_every_golden_input_batched_equals_alone(case) -> None:
    """All golden inputs of the case at once (13 or 15 of up to 16 slots), with different
    answer lengths, the second half joining while the first half already decodes."""
    name, pipe, requests = case
    lengths = [8 + 3 * i for i in range(len(requests))]
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in lengths]
    alone = [run_alone(pipe, r, p) for r, p in zip(requests, params, strict=True)]
    half = len(requests) // 2
    streams = [
        pipe.generate(r, p, keep_logits=True)
        for r, p in zip(requests[:half], params[:half], strict=True)
    ]
    got = [[next(streams[0])]]  # the first request decodes before the others join
    streams += [
        pipe.generate(r, p, keep_logits=True)
        for r, p in zip(requests[half:], params[half:], strict=True)
    ]
    got[0] += list(streams[0])
    got += [list(s) for s in streams[1:]]
    for i, input_id in enumerate(golden_inputs(name)):
        assert_same_as_alone(f"{name}/{input_id}", alone[i], got[i])
    assert pipe.engine.free_slots == pipe.engine.slots


@pytest.mark.parametrize("concurrent", [2, 5, 16])
def test_mixes_of_sizes_with_staggered_joins(case, concurrent) -> None:
    """Mixes of 2, 5 and 16 requests (repeating inputs), each joining one token after the
    previous one started, equal their lone runs."""
    name, pipe, requests = case
    picks = [requests[(3 * i + concurrent) % len(requests)] for i in range(concurrent)]
    params = [SamplingParams(max_new_tokens=6 + (i % 4) * 5, **GREEDY) for i in range(concurrent)]
    alone = [run_alone(pipe, r, p) for r, p in zip(picks, params, strict=True)]
    streams, got = [], []
    for r, p in zip(picks, params, strict=True):
        streams.append(pipe.generate(r, p, keep_logits=True))
        got.append([next(streams[-1])])
    for tokens, stream in zip(got, streams, strict=True):
        tokens += list(stream)
    for i in range(concurrent):
        assert_same_as_alone(f"{name} mix {concurrent} #{i}", alone[i], got[i])


def test_seeded_sampled_requests_equal_alone(case) -> None:
    """Sampled requests (each its own seed, temperature, top-p, top-k, penalty) beside greedy
    ones: the same tokens alone and batched."""
    _, pipe, requests = case
    params = [
        SamplingParams(
            temperature=0.4 + 0.1 * i,
            top_p=min(1.0, 0.8 + 0.02 * i),
            top_k=(0, 5, 50)[i % 3],
            repetition_penalty=1.0 + 0.05 * i,
            max_new_tokens=20,
            seed=100 + i,
        )
        if i % 2 == 0
        else SamplingParams(max_new_tokens=12, **GREEDY)
        for i in range(len(requests))
    ]
    alone = [[t.id for t in pipe.generate(r, p)] for r, p in zip(requests, params, strict=True)]
    streams = [pipe.generate(r, p) for r, p in zip(requests, params, strict=True)]
    assert [[t.id for t in s] for s in streams] == alone


# -- serving rules -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """The mla checkpoint with a cache of 2 slots."""
    pipe = Pipeline.load(
        MLA_MODEL, device="cpu", engine=EngineConfig(max_batch=2, prefill_chunk=CHUNK)
    )
    yield pipe
    pipe.close()


def text_request(pipe: Pipeline, text: str = "Tell me a story."):
    return pipe.encode(text, [])


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_admission_waits_for_a_free_slot(small) -> None:
    """Five requests on two slots: never more than two hold cache, all finish as alone."""
    params = [SamplingParams(max_new_tokens=5 + 4 * i, **GREEDY) for i in range(5)]
    reqs = [text_request(small, f"Story number {i}.") for i in range(5)]
    alone = [small.generate_ids(r, p) for r, p in zip(reqs, params, strict=True)]
    streams = [small.generate(r, p) for r, p in zip(reqs, params, strict=True)]
    seen_free = []
    results = []
    for s in streams:
        ids = []
        for token in s:
            ids.append(token.id)
            seen_free.append(small.engine.free_slots)
        results.append(ids)
    assert results == alone
    assert min(seen_free) >= 0
    assert small.engine.free_slots == 2


def test_cancel_frees_the_cache_and_spares_the_others(small) -> None:
    long = SamplingParams(max_new_tokens=4000, **GREEDY)
    other = SamplingParams(max_new_tokens=20, **GREEDY)
    expected = small.generate_ids(text_request(small, "Another one."), other)
    victim = small.generate(text_request(small), long)
    bystander = small.generate(text_request(small, "Another one."), other)
    next(victim), next(victim)
    victim.cancel()
    assert [t.id for t in bystander] == expected
    list(victim)  # what it emitted before the engine saw the cancel
    assert victim.finished is not None
    assert victim.finished.reason == "cancelled"
    wait_for(lambda: small.engine.free_slots == 2)


def test_cancel_while_queued(small) -> None:
    long = SamplingParams(max_new_tokens=200, **GREEDY)
    running = [small.generate(text_request(small), long) for _ in range(2)]
    queued = small.generate(text_request(small), long)
    queued.cancel()
    for s in running:
        s.cancel()
    assert list(queued) == []  # never admitted: both slots were taken
    assert queued.finished.reason == "cancelled"
    for s in running:
        list(s)
    wait_for(lambda: small.engine.free_slots == 2)


def test_a_failing_request_fails_alone(small, monkeypatch) -> None:
    """An error while encoding one request's images fails that request with the error; the
    request beside it and the next one are served."""
    engine = small.engine
    bad = text_request(small, "This one breaks.")
    real = engine.embed

    def embed(request):
        if request is bad:
            raise RuntimeError("broken image tensor")
        return real(request)

    monkeypatch.setattr(engine, "embed", embed)
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    good = text_request(small, "This one works.")
    expected = small.generate_ids(good, params)
    streams = [small.generate(bad, params), small.generate(good, params)]
    with pytest.raises(RuntimeError, match="broken image tensor"):
        list(streams[0])
    assert streams[0].finished.reason == "error"
    assert [t.id for t in streams[1]] == expected
    assert small.generate_ids(good, params) == expected
    assert engine.healthy
    assert engine.free_slots == 2


def test_a_failing_decode_step_fails_its_rows_and_the_engine_goes_on(small, monkeypatch) -> None:
    engine = small.engine
    params = SamplingParams(max_new_tokens=10, **GREEDY)

    def out_of_memory(*args):
        raise MemoryError("no room")

    with monkeypatch.context() as patch:
        patch.setattr(engine.lm, "decode", out_of_memory)
        with pytest.raises(MemoryError):
            list(small.generate(text_request(small), params))
    assert len(small.generate_ids(text_request(small), params)) == 10
    assert engine.healthy
    assert engine.free_slots == 2


def test_a_dead_loop_fails_every_request_and_reports_unhealthy(monkeypatch) -> None:
    pipe = Pipeline.load(MLA_MODEL, device="cpu", engine=EngineConfig(max_batch=1))
    engine = pipe.engine
    params = SamplingParams(max_new_tokens=50, **GREEDY)
    first = pipe.generate(text_request(pipe), params)
    next(first)
    monkeypatch.setattr(engine, "_reap", lambda: (_ for _ in ()).throw(RuntimeError("bug")))
    queued = pipe.generate(text_request(pipe), params)
    with pytest.raises(EngineError, match="internal error"):
        list(first)
    with pytest.raises(EngineError, match="internal error"):
        list(queued)
    wait_for(lambda: not engine.healthy)
    with pytest.raises(EngineError, match="restart the server"):
        pipe.generate(text_request(pipe), params)


def test_a_long_prefill_runs_beside_the_decoding_streams(small) -> None:
    """While a 4-chunk image prompt is prefilled (on the prefill thread), a running stream
    keeps decoding: it gets many tokens in that time, not one per chunk."""
    from PIL import Image

    running = small.generate(text_request(small), SamplingParams(max_new_tokens=2000, **GREEDY))
    arrivals: list[float] = []
    reader = threading.Thread(target=lambda: arrivals.extend(time.monotonic() for _ in running))
    reader.start()
    wait_for(lambda: len(arrivals) > 0)
    image = Image.new("RGB", (1280, 1280), (40, 120, 200))
    long = small.encode("<image>\nDescribe this image in detail.", [image])
    chunks = -(-long.num_tokens // small.engine.prefill_chunk)
    assert chunks >= 4
    submitted = time.monotonic()
    assert len(small.generate_ids(long, SamplingParams(max_new_tokens=1, **GREEDY))) == 1
    first_token = time.monotonic()
    running.cancel()
    reader.join()
    during = sum(submitted < t < first_token for t in arrivals)
    assert during > 2 * chunks, (during, chunks)


def test_a_stream_whose_event_loop_closed_is_cancelled(small) -> None:
    """A consumer that went away with its event loop: the engine treats it as a cancel and
    frees the slot."""
    loop = asyncio.new_event_loop()
    params = SamplingParams(max_new_tokens=2000, **GREEDY)
    stream = small.engine.submit(text_request(small), params, loop=loop)
    loop.close()
    wait_for(lambda: stream.cancelled)
    wait_for(lambda: small.engine.free_slots == 2)


class Bug(BaseException):
    """Not an Exception: escapes the per-request handling, as a bug in the thread would."""


def test_a_dead_prefill_thread_fails_every_request_and_reports_unhealthy(monkeypatch) -> None:
    pipe = Pipeline.load(MLA_MODEL, device="cpu", engine=EngineConfig(max_batch=2))
    engine = pipe.engine
    params = SamplingParams(max_new_tokens=200, **GREEDY)
    running = pipe.generate(text_request(pipe), params)
    next(running)

    def broken(seq):
        raise Bug("prefill bug")

    monkeypatch.setattr(engine, "_prefill", broken)
    doomed = pipe.generate(text_request(pipe, "Another story."), params)
    with pytest.raises(EngineError, match="internal error"):
        list(doomed)
    with pytest.raises(EngineError, match="internal error"):
        list(running)
    wait_for(lambda: not engine.healthy)
    with pytest.raises(EngineError, match="restart the server"):
        pipe.generate(text_request(pipe), params)
    pipe.close()


def test_cache_is_sized_from_the_budget() -> None:
    one = Pipeline.load(MLA_MODEL, device="cpu", engine=EngineConfig(max_batch=1))
    per_slot = one.model.language.cache_bytes_per_slot()
    one.close()
    three = Pipeline.load(
        MLA_MODEL, device="cpu", engine=EngineConfig(cache_bytes=3 * per_slot + 1)
    )
    assert three.engine.slots == 3
    assert three.engine.free_slots == 3
    three.close()
    with pytest.raises(EngineError, match="not enough memory"):
        Pipeline.load(MLA_MODEL, device="cpu", engine=EngineConfig(cache_bytes=per_slot - 1))
