"""The real Cog HTTP server (coglet 0.23.1) running predict.py on the tiny checkpoint (CPU).

One server per module (started once); the setup-failure test starts its own. No part of cog
is mocked: requests go over HTTP to `python -m cog.server.http`, which runs predict.Predictor in
its worker subprocess.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from cog_server import INPUT_ORDER, CogServer
from paths import REPO_ROOT, TESTS_DATA, golden_image, tiny_checkpoint

CHECKPOINT = tiny_checkpoint()
pytestmark = pytest.mark.skipif(CHECKPOINT is None, reason="tiny checkpoint not found")
GOLDEN_CASES = TESTS_DATA / "golden" / "cases" / "mla" / "golden"

# The seed prompts of the Replicate model page, each with the image it is asked about.
SEED_PROMPTS = [
    ("Find all the <|ref|>watermelon slices<|/ref|>", "img_640x480.png"),
    ("<|ref|>The giraffe at the back.<|/ref|>", "img_384x384.png"),
    ("<|grounding|>I want to throw out the trash now, what should I do?", "img_384x384.png"),
    ("Describe each stage of this <image> in detail", "img_300x1200.png"),
]
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with CogServer(CHECKPOINT, log_path=log) as server:
        health = server.wait_until("READY", "SETUP_FAILED")
        assert health["status"] == "READY", health
        yield server


@pytest.fixture(scope="module")
def image_url():
    return data_url(golden_image("img_640x480.png"))


def joined(server, response) -> str:
    body = response.json()
    assert response.status_code == 200, server.explain(response)
    assert body["status"] == "succeeded", server.explain(response)
    assert isinstance(body["output"], list)
    return "".join(body["output"])


def test_health_and_root(server):
    health = server.health()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"
    assert health["version"]["python_sdk"] == "0.23.1"
    root = requests.get(server.url + "/", timeout=5).json()
    assert root["predictions_url"] == "/predictions"


def test_openapi_is_the_committed_schema(server):
    served = requests.get(server.url + "/openapi.json", timeout=5).json()
    committed = json.loads((REPO_ROOT / ".cog" / "openapi_schema.json").read_text())
    assert served == committed
    props = served["components"]["schemas"]["Input"]["properties"]
    assert sorted(props, key=lambda n: props[n]["x-order"])[:6] == INPUT_ORDER[:6]
    assert (
        props["max_length_tokens"] | {"default": 2048, "minimum": 0, "maximum": 4096}
        == (props["max_length_tokens"])
    )
    assert all(p.get("description") for p in props.values())


def _cli_argv(prompt: str, image, seed: int, max_new: int) -> list[str]:
    argv = ["generate", "--weights", CHECKPOINT, "--image", image, "--prompt", prompt]
    argv += ["--seed", seed, "--json", "--max-new-tokens", max_new]
    argv += ["--temperature", SAMPLING["temperature"], "--top-p", SAMPLING["top_p"]]
    argv += ["--top-k", SAMPLING["top_k"], "--repetition-penalty", SAMPLING["repetition_penalty"]]
    return [str(a) for a in argv]


def test_seed_prompts_match_the_cli(server, capsys):
    """Same seed and parameters: the HTTP answer equals the CLI's (`python -m
    deepseek_vl2_runtime generate ... --json`). The first prompt runs the real command in a
    subprocess; the others call the CLI's main() in-process (saves ~3 s of imports each)."""
    from deepseek_vl2_runtime.__main__ import main

    max_new = 48
    cases = [(p, golden_image(name)) for p, name in SEED_PROMPTS]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see CogServer.start
    command = [sys.executable, "-m", "deepseek_vl2_runtime", *_cli_argv(*cases[0], 42, max_new)]
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    for i, (prompt, image) in enumerate(cases):
        inputs = {"image": data_url(image), "prompt": prompt, "seed": 42}
        text = joined(server, server.predict(**inputs, **SAMPLING, max_length_tokens=max_new))
        if i == 0:
            out = first.communicate(timeout=120)[0].decode()
            assert first.returncode == 0
        else:
            assert main(_cli_argv(prompt, image, 42, max_new)) == 0
            out = capsys.readouterr().out
        assert text == json.loads(out.strip().splitlines()[-1])["text"], prompt
        again = server.predict(**inputs, **SAMPLING, max_length_tokens=max_new)
        assert joined(server, again) == text


# Golden records whose prompt tags every image (the official Cog predictor silently dropped
# untagged images, so the cog_* records without a tag are not this product's behaviour).
GOLDEN_TAGGED = [
    "cog_describe_stage",
    "img_prefix_640x480",
    "img_gray_500x300",
    "img_tiny_20x10",
    "two_images",
    "three_images",
]


@pytest.mark.parametrize("case", GOLDEN_TAGGED)
def test_greedy_answer_equals_the_official_cog_predictor(server, case):
    """Golden: the official DeepSeek-VL2 code behind lucataco's Cog predictor, greedy, 24 tokens
    (the official greedy path applies no repetition penalty, hence repetition_penalty=1)."""
    record = json.loads((GOLDEN_CASES / case / "record.json").read_text())
    (turn,) = record["conversation_input"]
    images = [data_url(golden_image(name)) for name in turn["images"]]
    response = server.predict(
        **dict(zip(["image", "image_2", "image_3"], images, strict=False)),
        prompt=turn["user"],
        temperature=0,
        repetition_penalty=1,
        max_length_tokens=record["greedy"]["max_new_tokens"],
    )
    assert joined(server, response) == record["greedy"]["response"]


def test_sse_streams_output_events_before_completed(server, image_url):
    events = list(
        server.predict_sse(
            image=image_url, prompt="Tell me a story.", seed=1, max_length_tokens=200
        )
    )
    names = [name for _, name, _ in events]
    assert names[0] == "start"
    assert names[-1] == "completed"
    outputs = [(t, data) for t, name, data in events if name == "output"]
    assert len(outputs) >= 5, names
    assert [data["index"] for _, data in outputs] == list(range(len(outputs)))
    completed_at, _, completed = events[-1]
    assert completed["status"] == "succeeded"
    assert "".join(d["chunk"] for _, d in outputs) == "".join(completed["output"])
    assert outputs[0][0] < completed_at  # chunks arrive before the end, not all at once
    metrics = {data["name"] for _, name, data in events if name == "metric"}
    assert {"input_token_count", "output_token_count", "time_to_first_token"} <= metrics


def test_metrics_and_the_request_log_line(server, image_url):
    response = server.predict(image=image_url, prompt="Hi", seed=42, max_length_tokens=16)
    body = response.json()
    assert body["status"] == "succeeded", server.explain(response)
    metrics = body["metrics"]
    assert metrics["input_token_count"] > 16  # the prompt includes the image tokens
    assert 1 <= metrics["output_token_count"] <= 16
    assert 0 < metrics["time_to_first_token"] <= metrics["predict_time"]
    (line,) = [line for line in body["logs"].splitlines() if "prompt_tokens=" in line]
    assert f"prompt_tokens={metrics['input_token_count']} " in line
    assert "seed=42 " in line
    assert "finish=" in line
    assert "decode_tokens/s=" in line


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({"top_p": 5}, "top_p", "greater than the maximum"),
        ({"temperature": -0.5}, "temperature", "less than the minimum"),
        ({"max_length_tokens": 5000}, "max_length_tokens", "greater than the maximum"),
        ({"max_length_tokens": "many"}, "max_length_tokens", "is not of type"),
        ({"top_k": -1}, "top_k", "less than the minimum"),
        ({"repetition_penalty": 2.5}, "repetition_penalty", "greater than the maximum"),
        ({"seed": -1}, "seed", "less than the minimum"),
        ({"seed": None}, "seed", "null is not of type"),  # omit optional fields, don't send null
        ({"prompt": None}, "prompt", "null is not of type"),
        ({"image": None}, "image", "null is not of type"),
    ],
)
def test_out_of_range_inputs_get_422(server, image_url, inputs, field, message):
    body = {"image": image_url, "prompt": "Hi"} | inputs
    response = server.post("/predictions", {"input": body})
    assert response.status_code == 422, server.explain(response)
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "input", field]
    assert message in detail["msg"]


def test_missing_required_input_gets_422(server):
    response = server.post("/predictions", {"input": {"prompt": "Hi"}})
    assert response.status_code == 422, server.explain(response)
    assert response.json()["detail"][0]["loc"] == ["body", "input", "image"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": "<image> vs <image>"}, "The prompt has 2 <image> tags but 1 image(s)"),
        ({"image": "data:image/png;base64,iVBORw0KGgoAAAA="}, "image"),
        ({"repetition_penalty": 0}, "repetition_penalty=0 is invalid"),
        ({"prompt": " "}, "The prompt is empty"),
    ],
)
def test_user_error_fails_the_prediction_then_the_next_succeeds(server, image_url, inputs, message):
    body = {"image": image_url, "prompt": "Hi", "max_length_tokens": 4} | inputs
    response = server.predict(**body)
    failed = response.json()
    assert response.status_code == 200, server.explain(response)
    assert failed["status"] == "failed", server.explain(response)
    assert message in failed["error"]
    assert "Invalid input: " in failed["error"]  # our label for the user's mistakes
    assert "output" not in failed or not failed["output"]
    joined(server, server.predict(image=image_url, prompt="Hi", max_length_tokens=4))


class WebhookReceiver:
    """A loopback HTTP server collecting the webhook bodies coglet POSTs."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        events = self.events

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                events.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if predicate(body):
                return body

    def close(self):
        self.httpd.shutdown()


def test_cancel_an_async_prediction(server, image_url):
    """PUT with `Prefer: respond-async`, wait for streamed output, cancel: generation stops."""
    hooks = WebhookReceiver()
    try:
        body = {
            "id": "cancel-me",
            "input": {"image": image_url, "prompt": "Count to ten thousand.", "seed": 3}
            | {"max_length_tokens": 4096},
            "webhook": hooks.url,
            "webhook_events_filter": ["start", "output", "completed"],
        }
        response = requests.put(
            server.url + "/predictions/cancel-me",
            json=body,
            headers={"Prefer": "respond-async"},
            timeout=10,
        )
        assert response.status_code == 202, server.explain(response)
        hooks.wait_for(lambda b: b.get("output"))  # tokens are streaming
        cancel = requests.post(server.url + "/predictions/cancel-me/cancel", timeout=10)
        cancelled_at = time.monotonic()
        assert cancel.status_code == 200, server.explain(cancel)
        final = hooks.wait_for(lambda b: b["status"] not in ("starting", "processing"))
        assert final["status"] == "canceled", final
        assert time.monotonic() - cancelled_at < 5
        assert len("".join(final.get("output") or [])) > 0
    finally:
        hooks.close()
    line = [ln for ln in server.logs().splitlines() if "finish=cancelled" in ln]
    assert line, server.explain(cancel)
    tokens = int(json.loads(line[-1])["fields"]["message"].split("output_tokens=")[1].split()[0])
    assert tokens < 4096
    joined(server, server.predict(image=image_url, prompt="Hi", max_length_tokens=4))


def test_cancel_while_streaming_and_unknown_ids(server, image_url):
    assert requests.post(server.url + "/predictions/nope/cancel", timeout=5).status_code == 404
    body = {
        "id": "sse-cancel",
        # seed 3: this prompt runs to the length limit (checked by the async test above)
        "input": {"image": image_url, "prompt": "Count to ten thousand.", "seed": 3}
        | {"max_length_tokens": 4096},
    }
    headers = {"Accept": "text/event-stream"}
    with ThreadPoolExecutor(1) as pool:
        with server.post("/predictions", body, headers, stream=True) as response:
            assert response.status_code == 200, server.explain(response)
            lines = response.iter_lines()
            for line in lines:
                if line.startswith(b"event: output"):
                    break
            cancel = pool.submit(
                requests.post, server.url + "/predictions/sse-cancel/cancel", timeout=10
            )
            rest = b"\n".join(lines)
    assert cancel.result().status_code == 200
    completed = rest.split(b"event: completed\ndata: ")[1].split(b"\n")[0]
    assert json.loads(completed)["status"] == "canceled"


def test_missing_weights_fail_setup_with_advice(tmp_path):
    """The one server boot of the setup-failure family: SETUP_FAILED, setup's message with the
    fix in the health check, 503 for predictions. The other ways setup fails (no weights
    offline, broken checkpoints) are tested in-process in test_checkpoint.py."""
    (tmp_path / "empty").mkdir()
    with CogServer(tmp_path / "empty", log_path=tmp_path / "server.log") as server:
        health = server.wait_until("SETUP_FAILED", "READY", timeout=60)
        assert health["status"] == "SETUP_FAILED", health
        logs = health["setup"]["logs"]
        for text in [
            "missing checkpoint file(s): config.json",
            "DEEPSEEK_VL2_WEIGHTS",
            "./weights",
        ]:
            assert text in logs, logs
        response = requests.post(
            server.url + "/predictions", json={"input": {"prompt": "x"}}, timeout=10
        )
        assert response.status_code == 503
