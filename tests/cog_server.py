"""Start and stop the real Cog HTTP server (coglet 0.23.1) for tests, without Docker.

    with CogServer(weights=tiny_checkpoint(), log_path=tmp / "server.log") as server:
        server.wait_until("READY")
        requests.post(server.url + "/predictions", json={"input": {...}})

The server is `python -m cog.server.http --host 127.0.0.1` run from the repo root (it reads
`.cog/openapi_schema.json` relative to its working directory) with `PORT=0`; the port it bound is
read from its log line "Starting coglet server on 127.0.0.1:PORT". Its worker subprocess is
spawned as `python` from PATH, so this interpreter's bin directory goes first on PATH (otherwise
health stays STARTING forever). The server runs in its own session and the whole process group
is terminated on exit. All output goes to a log file, quoted in failure messages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from paths import REPO_ROOT

PORT_LINE = re.compile(r"Starting coglet server on 127\.0\.0\.1:(\d+)")

# COG_MAX_CONCURRENCY for every test server (None: unset, coglet's default of 1 slot). Keep it
# equal to what `make serve` sets. coglet frees a slot a moment *after* the HTTP answer leaves
# (the answer follows the worker's Done message, the slot waits for its Idle message on another
# channel), so a client that sends its next request at once can find all N slots busy: with a
# sync predictor (1 slot) a strictly sequential client sometimes gets 409, and with N slots a
# client keeping N in flight does. N must exceed what a client is promised to keep in flight.
MAX_CONCURRENCY: int | None = 32


class CogServerError(RuntimeError):
    pass


class CogServer:
    def __init__(
        self,
        weights: str | os.PathLike[str] | None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] = REPO_ROOT,
        max_concurrency: int | None = None,
    ) -> None:
        self.weights = weights
        self.cwd = Path(cwd)
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="cog-server-", suffix=".log")[1])
        self.extra_env = env or {}
        self.max_concurrency = MAX_CONCURRENCY if max_concurrency is None else max_concurrency
        self.proc: subprocess.Popen | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> CogServer:
        env = dict(os.environ)
        env.update(
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            PORT="0",
            COG_PREDICT_TYPE_STUB="predict.py:Predictor",
            HF_HUB_OFFLINE="1",  # tests never download
            PYTHONUNBUFFERED="1",
            # One intra-op thread: on a small shared CI box torch's spinning thread pool makes the
            # tiny model ~20x slower under load (conftest.py does the same for pytest itself).
            OMP_NUM_THREADS="1",
        )
        env.pop("DEEPSEEK_VL2_WEIGHTS", None)
        env.pop("COG_MAX_CONCURRENCY", None)
        if self.max_concurrency is not None:
            env["COG_MAX_CONCURRENCY"] = str(self.max_concurrency)
        if self.weights is not None:
            env["DEEPSEEK_VL2_WEIGHTS"] = str(self.weights)
        env.update(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: the worker dies with the server
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = PORT_LINE.search(self.logs())
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise CogServerError(f"cog server did not start{self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observation ----------------------------------------------------------------------------

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.logs().splitlines()[-lines:])
        return f"\n--- server log ({self.log_path}) ---\n{tail}"

    def worker_pid(self) -> int:
        """The server's Python worker: its child process (`python -c "import coglet; ..."`)."""
        assert self.proc is not None
        children = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += (task / "children").read_text().split()
        cmdlines = {int(c): Path(f"/proc/{c}/cmdline").read_bytes() for c in children}
        (pid,) = [pid for pid, cmd in cmdlines.items() if b"coglet" in cmd]
        return pid

    def worker_rss_kib(self) -> int:
        """Resident memory of the worker (VmRSS, KiB)."""
        return rss_kib(self.worker_pid())

    def health(self) -> dict:
        return requests.get(self.url + "/health-check", timeout=5).json()

    def wait_until(self, *statuses: str, timeout: float = 120.0) -> dict:
        """Poll /health-check until its status is one of `statuses`; return the health body."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise CogServerError(f"cog server exited early{self._log_tail()}")
            try:
                health = self.health()
            except requests.RequestException:
                health = {}
            if health.get("status") in statuses:
                return health
            time.sleep(0.1)
        raise CogServerError(
            f"health never reached {statuses}; last {health.get('status')}{self._log_tail()}"
        )

    def explain(self, response: requests.Response) -> str:
        """Failure message: the HTTP exchange plus the server log tail."""
        return f"HTTP {response.status_code}: {response.text[:2000]}{self._log_tail()}"

    # -- requests -------------------------------------------------------------------------------

    def post(self, path: str, body: dict, headers: dict | None = None, **kwargs):
        """POST, retrying briefly on 409: coglet answers a sync prediction a moment before it
        frees the slot, so a request sent right after one may get "At capacity"."""
        deadline = time.monotonic() + 10
        timeout = kwargs.pop("timeout", 120)
        while True:
            response = requests.post(
                self.url + path, json=body, headers=headers, timeout=timeout, **kwargs
            )
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            response.close()
            time.sleep(0.05)

    def predict(self, **inputs) -> requests.Response:
        """Sync POST /predictions with these inputs."""
        return self.post("/predictions", {"input": inputs})

    def predict_sse(self, **inputs) -> Iterator[tuple[float, str, dict]]:
        """POST with `Accept: text/event-stream`; yield (arrival time, event, data) per event."""
        return self.sse({"input": inputs})

    def sse(self, body: dict) -> Iterator[tuple[float, str, dict]]:
        """predict_sse with the whole request body (an "id", say)."""
        headers = {"Accept": "text/event-stream"}
        with self.post("/predictions", body, headers, stream=True) as response:
            if response.status_code != 200:
                raise CogServerError(self.explain(response))
            event, data = None, []
            for raw in response.iter_lines():  # bytes: the server sends UTF-8 without a charset
                line = raw.decode("utf-8")
                if line.startswith("event:"):
                    event = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data.append(line.partition(":")[2].strip())
                elif line == "" and event is not None:
                    yield time.monotonic(), event, json.loads("\n".join(data) or "null")
                    event, data = None, []


def rss_kib(pid: int) -> int:
    """VmRSS of process `pid` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise CogServerError(f"no VmRSS for process {pid}")


def call_predict(predictor, **inputs):
    """predict() called in-process the way the server calls it: every input given, defaults
    resolved from the Input(...) declarations. The async generator is driven on an event loop
    of its own up to its first chunk (so an invalid request raises here, before any output, as
    the server reports it) and is then iterated like a plain iterator; close() cancels it."""
    import inspect

    from cog import FieldInfo

    args = {
        name: p.default.default if isinstance(p.default, FieldInfo) else p.default
        for name, p in inspect.signature(predictor.predict).parameters.items()
    }
    return _Driven(predictor.predict(**(args | inputs)))


class _Driven:
    _END = object()

    def __init__(self, agen) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._agen = agen
        self._next = self._step()

    def _step(self):
        try:
            return self._loop.run_until_complete(self._agen.__anext__())
        except StopAsyncIteration:
            self.close()
            return self._END
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._next is self._END:
            raise StopIteration
        chunk, self._next = self._next, None
        self._next = self._step()
        return chunk

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._agen.aclose())
            self._loop.close()


def write_upload(image) -> Path:
    """Save `image` as a PNG the way the server stores a downloaded input (directly in the temp
    directory, registered by `serving.register_upload`): the only files predict() reads. The
    returned object is what predict() accepts (a plain path string to the same file is
    refused, as it would be from a request). The caller deletes the file."""
    from deepseek_vl2_runtime.serving import register_upload

    fd, name = tempfile.mkstemp(suffix="file.png")
    os.close(fd)
    image.save(name, "PNG")
    return register_upload(name)


# The predictor's inputs in schema order: the published model's six first, then ours.
INPUT_ORDER = [
    "image",
    "prompt",
    "temperature",
    "top_p",
    "repetition_penalty",
    "max_length_tokens",
    "top_k",
    "seed",
    "image_2",
    "image_3",
]
