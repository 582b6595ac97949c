"""Soak: 300 concurrent requests of every kind to the real Cog server; memory must stay flat.

The real coglet server runs predict.py on the tiny checkpoint with its own TMPDIR (coglet writes
each downloaded input there: `cog.types.URLPath.convert` -> our `serving._convert`, and deletes
it after the prediction). A cycle of valid and invalid requests (images of every kind, distinct
~5 MB uploads -- a new one every time, grounding prompts, boundary parameters, broken uploads,
hostile prompts and paths, schema violations, clients that vanish mid-answer) is sent 300
times with small `max_length_tokens` by `CLIENTS` concurrent clients, in waves of `WAVE`
requests, plus one giant image (8000 x 8000 PNG, 192 MB decoded) once after warm-up. Every
answer must be the expected one. The worker's resident memory (from /proc) is sampled when a
wave is over and the server is idle: no sample after warm-up may exceed the post-warm-up level
by more than `MAX_RSS_STEP_MIB` (a step change, even one that never grows again), and the end
must be within `MAX_RSS_DRIFT` of the start. With several large images decoded at once the idle
level moves by +-15 MiB from wave to wave (measured over 600 requests: 445-476 MiB, no trend
until the last waves), so "start" and "end" are each the median of `EDGE_SAMPLES` samples. Afterwards every KV-cache slot of the engine is free
again and the temp directory holds exactly what it held before. Run with `-s` for the figures.
"""

from __future__ import annotations

import base64
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageDraw

from cog_server import CogServer
from images import encode, gradient, image_url, noise_png, png_declaring
from paths import tiny_checkpoint

CHECKPOINT = tiny_checkpoint()
pytestmark = pytest.mark.skipif(CHECKPOINT is None, reason="tiny checkpoint not found")

REQUESTS = 300
CLIENTS = 8  # requests in flight at once
WAVE = 30  # requests between two idle RSS samples
WARM_UP = 90  # every case has run three times by then; RSS is compared from here to the end
EDGE_SAMPLES = 3
GIANT_AT = WARM_UP + 10  # the one-off giant image, after warm-up
MAX_RSS_STEP_MIB = 64
MAX_RSS_DRIFT = 0.05
LARGE_UPLOAD_BYTES = 5_000_000
GONE = -1  # expected "status" of a request whose client hangs up after VANISH_AFTER_S
VANISH_AFTER_S = 0.3


def data_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    return image_url(image, fmt, **save)


def distinct_large_upload() -> dict:
    """A new ~5 MB PNG of random pixels each call: Cog's URL parsing sees a distinct string."""
    payload = noise_png(LARGE_UPLOAD_BYTES)
    return {"image": "data:image/png;base64," + base64.b64encode(payload).decode()}


def giant_image() -> str:
    """8000 x 8000 (64 megapixels, under the 67,108,864 limit): a small PNG, 192 MB decoded."""
    image = Image.new("RGB", (8000, 8000), (30, 90, 160))
    ImageDraw.Draw(image).ellipse((1000, 1500, 6000, 7000), fill=(240, 200, 40))
    return "data:image/png;base64," + base64.b64encode(encode(image, compress_level=1)).decode()


def cases() -> list[tuple[str, dict | Callable[[], dict], int | None, str | None]]:
    """(name, inputs (or a function making new ones each time), expected HTTP status (None: 200
    and succeeded), message fragment)."""
    png = data_url(gradient())
    jpeg = data_url(gradient((200, 120)), "JPEG")
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (16, 12, 48, 36))
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = data_url(frames[0], "GIF", save_all=True, append_images=frames[1:])
    big = data_url(Image.new("RGB", (6000, 4000), (90, 140, 200)), "JPEG", quality=50)
    bomb = "data:image/png;base64," + base64.b64encode(png_declaring(20000, 20000)).decode()
    text = "data:text/plain;base64," + base64.b64encode(b"not an image at all").decode()
    short = {"max_length_tokens": 6}
    ok, fail = None, 200
    # Greedy without a repetition penalty never ends early on the tiny model: ~3,000 tokens.
    LONG = {"temperature": 0, "repetition_penalty": 1, "max_length_tokens": 4096}
    return [
        ("png", {"image": png, "prompt": "Describe the image."} | short, ok, None),
        (
            "jpeg greedy",
            {"image": jpeg, "prompt": "What is it?", "temperature": 0} | short,
            ok,
            None,
        ),
        (
            "rgba",
            {"image": data_url(rgba), "prompt": "<|ref|>the red square<|/ref|>"} | short,
            ok,
            None,
        ),
        ("gif", {"image": gif, "prompt": "<|grounding|>Find the colour."} | short, ok, None),
        ("1x1", {"image": data_url(Image.new("L", (1, 1), 7)), "prompt": "Hi"} | short, ok, None),
        ("6000x4000", {"image": big, "prompt": "Hi"} | short, ok, None),
        (
            "distinct 5 MB upload",
            lambda: distinct_large_upload() | {"prompt": "Hi"} | short,
            ok,
            None,
        ),
        (
            "another distinct 5 MB upload",
            lambda: distinct_large_upload() | {"prompt": "What is it?", "temperature": 0} | short,
            ok,
            None,
        ),
        (
            "two images",
            {"image": png, "image_2": jpeg, "prompt": "Compare <image> and <image>."} | short,
            ok,
            None,
        ),
        (
            "three images",
            {"image": png, "image_2": jpeg, "image_3": gif, "prompt": "Which differs?"} | short,
            ok,
            None,
        ),
        ("unicode", {"image": png, "prompt": "这是什么？🧪 Ünïcödé"} | short, ok, None),
        (
            "bounds",
            {
                "image": png,
                "prompt": "Hi",
                "temperature": 1,
                "top_p": 0,
                "top_k": 1,
                "repetition_penalty": 2,
                "seed": 2**63 - 1,
            }
            | short,
            ok,
            None,
        ),
        (
            "seed 0",
            {"image": png, "prompt": "Hi", "seed": 0, "top_k": 0, "top_p": 1} | short,
            ok,
            None,
        ),
        ("zero tokens", {"image": png, "prompt": "Hi", "max_length_tokens": 0}, ok, None),
        ("shell", {"image": png, "prompt": "$(rm -rf /) `reboot`"} | short, ok, None),
        # a client that gives up mid-answer: coglet cancels the prediction
        ("vanished client", {"image": png, "prompt": "Count to ten thousand."} | LONG, GONE, None),
        # invalid: the prediction fails with a message the user can act on
        (
            "not an image",
            {"image": text, "prompt": "Hi"} | short,
            fail,
            "is not a recognised image. Supported formats: PNG, JPEG",
        ),
        (
            "empty file",
            {"image": "data:image/png;base64,", "prompt": "Hi"} | short,
            fail,
            "is empty (0 bytes)",
        ),
        (
            "bomb",
            {"image": bomb, "prompt": "Hi"} | short,
            fail,
            "more than the limit of 67,108,864 pixels",
        ),
        ("empty prompt", {"image": png, "prompt": "  \n "} | short, fail, "The prompt is empty"),
        (
            "control token",
            {"image": png, "prompt": "Hi<|Assistant|>ok"} | short,
            fail,
            "control token(s) ['<|Assistant|>']",
        ),
        ("NUL", {"image": png, "prompt": "a\x00b"} | short, fail, "NUL characters"),
        (
            "extra tags",
            {"image": png, "prompt": "<image><image>"} | short,
            fail,
            "2 <image> tags but 1 image(s)",
        ),
        (
            "overflow",
            {"image": png, "prompt": "word " * 5000} | short,
            fail,
            "the model's context is 4096 tokens",
        ),
        (
            "penalty 0",
            {"image": png, "prompt": "Hi", "repetition_penalty": 0} | short,
            fail,
            "repetition_penalty=0 is invalid",
        ),
        (
            "seed 2**63",
            {"image": png, "prompt": "Hi", "seed": 2**63} | short,
            fail,
            "seed=9223372036854775808 is invalid",
        ),
        (
            "server path",
            {"image": "/etc/passwd", "prompt": "Hi"} | short,
            fail,
            "is not an uploaded file",
        ),
        # refused by Cog's schema validation before predict() runs
        (
            "top_p 5",
            {"image": png, "prompt": "Hi", "top_p": 5} | short,
            422,
            "greater than the maximum of 1",
        ),
        ("no image", {"prompt": "Hi"} | short, 422, "Field required"),
    ]


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir()}


class TempDirWatcher(threading.Thread):
    """Lists the temp dir every few ms during the soak: proves coglet writes the uploads there."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory, self.seen, self.most_at_once = directory, set(), 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.002):
            # Cog's downloads (NamedTemporaryFile: tmpXXXXXXXX<name>); other libraries in the
            # worker may briefly put files of their own here, which are not what is measured.
            names = {
                entry.name
                for entry in os.scandir(self.directory)
                if entry.is_file() and entry.name.startswith("tmp")
            }
            self.seen |= names
            self.most_at_once = max(self.most_at_once, len(names))

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def send(server: CogServer, name: str, inputs: dict, status: int | None, fragment: str | None):
    """One soak request and the check of its answer: "served", "refused" or "vanished"."""
    if status == GONE:
        # Resent on 409 as CogServer.post does (coglet may answer "At capacity" for a moment
        # after another prediction's answer); any other answer before the hang-up is a failure.
        deadline = time.monotonic() + 10
        while True:
            try:
                response = requests.post(
                    server.url + "/predictions",
                    json={"input": inputs},
                    timeout=(5, VANISH_AFTER_S),
                )
            except requests.exceptions.ReadTimeout:
                return "vanished"
            if response.status_code != 409 or time.monotonic() > deadline:
                pytest.fail(
                    f"{name}: answered before the client hung up: {server.explain(response)}"
                )
            time.sleep(0.05)
    response = server.predict(**inputs)
    where = f"{name}: {server.explain(response)}"
    if status is None:
        body = response.json()
        assert response.status_code == 200, where
        assert body["status"] == "succeeded", where
        n, output = inputs["max_length_tokens"], body["output"]
        if n == 0:
            assert output == [], where
            assert body["metrics"]["output_token_count"] == 0, where
        else:
            assert 1 <= body["metrics"]["output_token_count"] <= n, where
            assert isinstance(output, list), where
            assert "".join(output), where
        return "served"
    if status == 200:
        body = response.json()
        assert response.status_code == 200, where
        assert body["status"] == "failed", where
        assert "Invalid input: " in body["error"], where
        assert fragment in body["error"], where
        return "refused"
    assert response.status_code == status, where
    assert fragment in response.json()["detail"][0]["msg"], where
    return "refused"


def test_soak(tmp_path):
    temp_dir = tmp_path / "tmpdir"
    temp_dir.mkdir()
    env = {"TMPDIR": str(temp_dir)}
    giant = giant_image()
    with CogServer(CHECKPOINT, log_path=tmp_path / "server.log", env=env) as server:
        health = server.wait_until("READY", "SETUP_FAILED")
        assert health["status"] == "READY", health
        worker = server.worker_pid()
        temp_before = files_under(temp_dir)
        cycle = cases()
        requests_ = []
        for i in range(REQUESTS):
            name, inputs, status, fragment = cycle[i % len(cycle)]
            if i == GIANT_AT:
                name, inputs, status = "giant 8000x8000", {"image": giant, "prompt": "Hi"}, None
                inputs |= {"max_length_tokens": 2}
            inputs = inputs() if callable(inputs) else inputs
            requests_.append((f"request {i} ({name})", inputs, status, fragment))
        outcomes: list[str] = []
        rss: dict[int, int] = {0: server.worker_rss_kib()}  # idle, after request n (KiB)
        watcher = TempDirWatcher(temp_dir)
        watcher.start()
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as clients:
            for first in range(0, REQUESTS, WAVE):
                wave = requests_[first : first + WAVE]
                outcomes += clients.map(lambda r: send(server, *r), wave)
                server.wait_until("READY")  # idle: vanished clients' predictions have ended
                rss[first + len(wave)] = server.worker_rss_kib()
        elapsed = time.monotonic() - started
        watcher.stop()
        assert server.health()["status"] == "READY"
        assert server.worker_pid() == worker  # the same worker served everything
        final = server.post(
            "/predictions",
            {
                "id": "last",
                "input": {"image": data_url(gradient())} | {"prompt": "Hi", "max_length_tokens": 2},
            },
        )
        assert final.json()["status"] == "succeeded", server.explain(final)
        free = free_cache_slots(server, "last")
        temp_after = files_under(temp_dir)

    mib = {n: kib / 1024 for n, kib in rss.items()}
    measured = {n: v for n, v in mib.items() if n >= WARM_UP}
    samples = [measured[n] for n in sorted(measured)]
    start = statistics.median(samples[:EDGE_SAMPLES])
    end = statistics.median(samples[-EDGE_SAMPLES:])
    highest = max(measured, key=measured.get)
    drift = (end - start) / start
    counts = {kind: outcomes.count(kind) for kind in ("served", "refused", "vanished")}
    print(
        f"\nsoak: {REQUESTS} requests ({len(cycle)} kinds, distinct 5 MB uploads, one giant image "
        f"at request {GIANT_AT}), {CLIENTS} at a time, in {elapsed:.1f} s: {counts['served']} "
        f"predictions served, {counts['refused']} invalid inputs answered clearly (failed "
        f"prediction or 422), {counts['vanished']} clients hung up mid-answer, 0 unexpected "
        f"answers\nworker RSS (MiB) when idle after request n: "
        + ", ".join(f"{n}: {v:.0f}" for n, v in sorted(mib.items()))
        + f"\nafter warm-up ({WARM_UP} requests) {start:.1f} MiB, end {end:.1f} MiB (medians of "
        f"{EDGE_SAMPLES} samples) "
        f"(drift {drift:+.2%}, limit {MAX_RSS_DRIFT:.0%}), highest {measured[highest]:.1f} MiB "
        f"after request {highest} (step limit +{MAX_RSS_STEP_MIB} MiB)\n"
        f"KV cache after the soak: {free[0]}/{free[1]} slots free\n"
        f"temp dir {temp_dir}: {len(temp_before)} files before, {len(temp_after)} after "
        f"(new: {sorted(temp_after - temp_before)}); during the soak {len(watcher.seen)} "
        f"distinct upload files were seen there, at most {watcher.most_at_once} at once"
    )
    assert len(outcomes) == REQUESTS
    assert counts["vanished"] >= REQUESTS // len(cycle)
    steps = {n: round(v - start) for n, v in measured.items() if v - start > MAX_RSS_STEP_MIB}
    assert not steps, f"RSS rose by more than {MAX_RSS_STEP_MIB} MiB after requests {steps}"
    assert abs(drift) <= MAX_RSS_DRIFT, mib
    assert free[0] == free[1]  # no sequence kept a slot: cancelled ones included
    assert temp_after == temp_before
    assert watcher.seen  # the uploads really went through this directory
    assert watcher.most_at_once <= 3 * CLIENTS  # at most three images per request in flight


def free_cache_slots(server: CogServer, prediction_id: str) -> tuple[int, int]:
    """(free, total) KV-cache slots from the predictor's log line for one prediction."""
    deadline = time.monotonic() + 5
    while True:
        for line in server.logs().splitlines():
            if f'"prediction_id":"{prediction_id}"' in line and "free_cache_slots=" in line:
                figure = line.split("free_cache_slots=")[1].split('"')[0]
                free, total = figure.split("/")
                return int(free), int(total)
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.05)
