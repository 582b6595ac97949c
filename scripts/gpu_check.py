"""The GPU check: every device measurement of issue 11 in one time-boxed command.

    bash scripts/gpu_check.sh [--dry-run] [--only a,b] [--skip a,b] [--budget-s S] [--keep]

Stages, each its own process with its own timeout (a failure or timeout is recorded and the
next stage runs); after every stage $OUT/gpu_check.json is rewritten, and all output goes to
$OUT/gpu_check.log:

  env         machine, versions; every runtime module imports with cog/coglet/huggingface_hub/
              hypothesis blocked
  gpu_tests   pytest tests/test_gpu.py tests/test_real_width.py (its CUDA cases; real widths)
  bench       python -m deepseek_vl2_runtime.bench --random small --device cuda: batch-1 decode
              (eager) with the measured bandwidth bound, TTFT 384x384 .. 4032x3024, peak memory
              of a near-4096-token request
  snapshot    a full-size random vl2-small snapshot (real format, ~32 GB bf16) written to this
              machine's disk; the disk's read speed on it (O_DIRECT dd; buffered after dropping
              the page cache)
  setup_cold  Pipeline.load(snapshot, compile=True) after dropping the page cache, with an
              empty inductor/Triton cache: load and compile times; the compiled engine's batch-1
              decode and bound fraction; compiled logits vs eager decode (teacher forced)
  setup_warm  the same in a fresh process with the cache the cold run filled
  concurrency python -m deepseek_vl2_runtime.bench --random small --device cuda --concurrency
              1,8,32 (eager, answers 64-96 tokens): per level aggregate and steady-state
              tokens/s, TTFT and ITL p95, peak memory, speedup over the same requests one at a
              time. Last, and only started with CONCURRENCY_MIN_S of the budget left (a cut-off
              run reports nothing): `--only concurrency` runs it alone

`--dry-run` (or GPU_CHECK_DRY_RUN=1) runs every stage on CPU in float32 with narrow widths at
vl2-small's structure (scripts/gpu_stages.py dry_config), in a few minutes. Standard library
only here: the stages import torch, so a CUDA failure ends a stage, not the check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES_PY = REPO / "scripts" / "gpu_stages.py"
# (name, seconds at most on the device, seconds at most in a dry run)
STAGES = [
    ("env", 60, 60),
    ("gpu_tests", 120, 150),
    ("bench", 120, 120),
    ("snapshot", 100, 60),
    ("setup_cold", 150, 120),
    ("setup_warm", 90, 120),
    ("concurrency", 180, 120),
]
# The concurrency stage writes its figures only at the end: not started with less than this
# left of the budget (load ~20 s, warm-up, 32 requests one at a time, then 1 + 8 + 32 at once).
CONCURRENCY_MIN_S = 120
BUDGET_S = 465  # the 8 minutes, less the time to write the JSON and clean up


class Check:
    MIN_STAGE_S = 10  # a stage is not started with less of the budget left

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "a", buffering=1)
        self.start = time.monotonic()
        self.report: dict = {
            "schema": "gpu_check/1",
            "mode": "dry_run" if args.dry_run else "device",
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "budget_s": args.budget_s,
            "work_dir": str(self.work),
            "stages": {},
        }

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.start:7.1f}s] {text}"
        print(line, file=sys.stderr, flush=True)
        self.log.write(line + "\n")

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.report["summary"] = summarise(self.report["stages"])
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def run(
        self, name: str, cmd: list[str], cap: float, env: dict | None = None, min_s: float = 0
    ) -> dict:
        """Run one stage's command under min(cap, what is left of the budget); skipped when
        that is under MIN_STAGE_S or the stage's own min_s."""
        timeout = min(cap, self.remaining())
        if timeout < max(self.MIN_STAGE_S, min(min_s, cap)):
            return {"ok": False, "skipped": f"budget spent ({self.remaining():.0f} s left)"}
        self.say(f"stage {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)")
        self.log.write(f"\n===== {name} =====\n")
        begin = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        seconds = round(time.monotonic() - begin, 1)
        self.say(f"stage {name}: rc {rc}{' (timed out)' if timed_out else ''} in {seconds} s")
        return {"rc": rc, "timed_out": timed_out, "seconds": seconds, "timeout_s": round(timeout)}

    def stage(self, name: str, cap: float) -> None:
        if name == "gpu_tests":
            entry = self.gpu_tests(cap)
        else:
            stage, env = name, {}
            if name.startswith("setup"):
                stage = "setup"
                cache = self.work / "compile_cache"
                env = {
                    "TORCHINDUCTOR_CACHE_DIR": str(cache),
                    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
                    "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
                    "TRITON_CACHE_DIR": str(cache / "triton"),
                }
                if name == "setup_cold":
                    shutil.rmtree(cache, ignore_errors=True)
            result_file = self.work / f"{name}.json"
            result_file.unlink(missing_ok=True)
            cmd = [sys.executable, str(STAGES_PY), stage, "--result", str(result_file)]
            cmd += ["--work", str(self.work)] + (["--dry-run"] if self.args.dry_run else [])
            min_s = CONCURRENCY_MIN_S if name == "concurrency" and not self.args.dry_run else 0
            entry = self.run(name, cmd, cap, env, min_s)
            if result_file.is_file():
                entry["result"] = json.loads(result_file.read_text())
            entry["ok"] = entry.get("rc") == 0 and entry.get("result", {}).get("ok", False)
        if not entry.get("ok") and "skipped" not in entry:
            entry["log_tail"] = self.log_tail()
        self.report["stages"][name] = entry
        self.write()

    def gpu_tests(self, cap: float) -> dict:
        junit = self.work / "gpu_tests.xml"
        junit.unlink(missing_ok=True)
        # On the device the real-width module's CPU cases are CI's job: only its CUDA cases.
        select = "not cpu-bfloat16" if self.args.dry_run else "not cpu-"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
        cmd += ["tests/test_gpu.py", "tests/test_real_width.py", "-k", select]
        entry = self.run("gpu_tests", [*cmd, f"--junitxml={junit}"], cap)
        if junit.is_file():
            entry["result"] = junit_counts(junit)
        entry["ok"] = entry.get("rc") == 0
        return entry

    def log_tail(self, lines: int = 25) -> list[str]:
        self.log.flush()
        return (self.out / "gpu_check.log").read_text(errors="replace").splitlines()[-lines:]


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = float(suite.get("time", 0))
    out["not_passed"] = {}
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                name = f"{case.get('classname')}::{case.get('name')}"
                out["not_passed"][name] = (node.get("message") or "")[:300]
    return out


def _get(stages: dict, *path: str):
    node = stages
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _goal(value, target, met) -> dict:
    """met: None where the value or the target was not measured."""
    return {"value": value, "target": target, "met": None if None in (value, target) else met}


def summarise(stages: dict) -> dict:
    """The issue's figures and goals, from whatever stages have run."""
    b = _get(stages, "bench", "result", "bench") or {}
    conc = _get(stages, "concurrency", "result", "bench", "concurrency", "results") or []
    snap = _get(stages, "snapshot", "result") or {}
    cold = _get(stages, "setup_cold", "result") or {}
    warm = _get(stages, "setup_warm", "result") or {}
    out: dict = {"stages_ok": {k: v.get("ok") for k, v in stages.items()}}
    gbps = b.get("memory_bandwidth_gbps") or _get(cold, "decode", "memory_bandwidth_gbps")
    # Weights as the device holds them: the benchmark's parameters in its dtype.
    itemsize = {"bfloat16": 2, "float32": 4}.get(b.get("dtype"), 2)
    weights = (b.get("config") or {}).get("total_params")
    weights_bytes = itemsize * weights if weights else snap.get("weights_bytes")
    out |= {
        "device_name": b.get("device_name"),
        "memory_bandwidth_gbps": gbps,
        "bound_tokens_per_s": b.get("bound_tokens_per_s")
        or _get(cold, "decode", "bound_tokens_per_s"),
        "decode_tokens_per_s_eager": b.get("decode_tokens_per_s"),
        "bound_fraction_eager": b.get("bound_fraction"),
        "decode_tokens_per_s_compiled": _get(cold, "decode", "tokens_per_s"),
        "bound_fraction_compiled": _get(cold, "decode", "bound_fraction"),
        "ttft_ms": b.get("time_to_first_token_ms"),
        "peak_memory_mb_long_request": b.get("peak_memory_mb_long_request"),
        "long_request_tokens": b.get("long_request_tokens"),
        "weights_bytes": weights_bytes,
        "disk_read_gbps": snap.get("disk_read_gbps"),
        "setup_s_cold": cold.get("setup_s"),
        "load_s_cold": cold.get("load_s"),
        "compile_s_cold": cold.get("compile_and_warm_up_s"),
        "setup_s_warm": warm.get("setup_s"),
        "load_s_warm": warm.get("load_s"),
        "compile_s_warm": warm.get("compile_and_warm_up_s"),
        "compiled_equals_eager": _get(cold, "compiled_vs_eager", "ok"),
        "concurrency": {
            str(level["requests"]): {
                "tokens_per_s": level["tokens_per_s"],
                "steady_state_tokens_per_s": level["steady_state_tokens_per_s"],
                "ttft_p95_ms": level["ttft_ms"]["p95"],
                "itl_p95_ms": level["itl_ms"]["p95"],
                "peak_memory_mb": level["peak_memory_mb"],
                "speedup_vs_sequential": level["speedup_vs_sequential"],
            }
            for level in conc
        },
    }
    hbm_read_s = weights_bytes / (gbps * 1e9) if weights_bytes and gbps else None
    disk_read_s = (
        snap["weights_bytes"] / (snap["disk_read_gbps"] * 1e9)
        if snap.get("disk_read_gbps") and snap.get("weights_bytes")
        else None
    )
    fraction = out["bound_fraction_compiled"] or out["bound_fraction_eager"]
    ttft = (out["ttft_ms"] or {}).get("1024x768")
    peak = out["peak_memory_mb_long_request"]
    goals = {
        "decode_at_least_60pct_of_bound": _goal(fraction, 0.6, (fraction or 0) >= 0.6),
        "ttft_1024x768_at_most_3x_weight_read": _goal(
            ttft,
            None if hbm_read_s is None else round(3e3 * hbm_read_s, 2),
            hbm_read_s is not None and (ttft or 0) <= 3e3 * hbm_read_s,
        ),
        "peak_memory_at_most_weights_plus_3gb": _goal(
            peak,
            None if not weights_bytes else round((weights_bytes + 3e9) / 2**20),
            bool(weights_bytes) and (peak or 0) * 2**20 <= weights_bytes + 3e9,
        ),
        "warm_setup_at_most_1_5x_disk_read": _goal(
            out["setup_s_warm"],
            None if disk_read_s is None else round(1.5 * disk_read_s, 2),
            disk_read_s is not None and (out["setup_s_warm"] or 0) <= 1.5 * disk_read_s,
        ),
    }
    out["goals"] = goals
    out["note"] = (
        "goals as issue 11 states them; the bound uses the bandwidth measured in the same run "
        "(device-to-device copy). In a dry run (CPU) these are plumbing checks, not figures."
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"),
        help="CPU, float32, narrow widths (also GPU_CHECK_DRY_RUN=1)",
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "gpu_check_out")
    )
    parser.add_argument(
        "--work", help="scratch dir for the snapshot and caches (default: a temp dir)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S))
    )
    parser.add_argument("--only", help="comma-separated stages to run")
    parser.add_argument("--skip", help="comma-separated stages to leave out")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (snapshot, caches)")
    args = parser.parse_args(argv)
    names = [name for name, _, _ in STAGES]
    chosen = set(args.only.split(",")) if args.only else set(names)
    chosen -= set(args.skip.split(",")) if args.skip else set()
    unknown = chosen - set(names)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {names}")
    check = Check(args)
    check.say(f"mode {check.report['mode']}, budget {args.budget_s:.0f} s, out {check.out}")
    try:
        for name, device_cap, dry_cap in STAGES:
            if name in chosen:
                check.stage(name, dry_cap if args.dry_run else device_cap)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(check.work, ignore_errors=True)
        check.write()
    stages = check.report["stages"]
    failed = [name for name, entry in stages.items() if not entry.get("ok")]
    check.say(f"done in {check.report['elapsed_s']} s; failed: {failed or 'none'}")
    check.say(f"wrote {check.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
