"""scripts/gpu_check.sh without a GPU: its cheapest stage end to end (the JSON it writes), a
stage that fails or overruns is recorded without stopping the rest, and the goal arithmetic."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

from paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_env_stage_writes_the_report(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/gpu_check.py", "--dry-run", "--only", "env", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "gpu_check/1"
    assert report["mode"] == "dry_run"
    env = report["stages"]["env"]
    assert env["ok"]
    assert not env["timed_out"]
    assert env["seconds"] < env["timeout_s"]
    assert env["result"]["runtime_import_failures"] == {}  # no cog / huggingface_hub needed
    assert env["result"]["runtime_modules"] >= 15
    assert set(report["stages"]) == {"env"}
    assert all(g["met"] is None for g in report["summary"]["goals"].values())
    assert "===== env =====" in (out / "gpu_check.log").read_text()


def test_a_failing_or_overrunning_stage_is_recorded(tmp_path):
    args = argparse.Namespace(
        dry_run=True, out=str(tmp_path / "o"), work=str(tmp_path / "w"), budget_s=60.0
    )
    check = gpu_check.Check(args)
    check.MIN_STAGE_S = 1
    failed = check.run("boom", [sys.executable, "-c", "raise SystemExit(3)"], cap=30)
    assert failed["rc"] == 3
    assert not failed["timed_out"]
    slow = check.run("slow", ["sleep", "60"], cap=1.5)
    assert slow["timed_out"]
    assert slow["seconds"] < 10
    args.budget_s = 0
    assert "budget spent" in check.run("late", [sys.executable, "-c", "pass"], cap=30)["skipped"]


def test_goals_from_device_figures():
    gb = 10**9
    stages = {
        "bench": {
            "result": {
                "bench": {
                    "dtype": "bfloat16",
                    "config": {"total_params": 16 * gb},
                    "memory_bandwidth_gbps": 4000.0,
                    "bound_fraction": 0.3,
                    "time_to_first_token_ms": {"1024x768": 20.0},
                    "peak_memory_mb_long_request": 33 * gb / 2**20,
                }
            }
        },
        "snapshot": {"result": {"weights_bytes": 32 * gb, "disk_read_gbps": 2.0}},
        "setup_cold": {"result": {"decode": {"bound_fraction": 0.7}}},
        "setup_warm": {"result": {"setup_s": 30.0}},
    }
    goals = gpu_check.summarise(stages)["goals"]
    assert goals["decode_at_least_60pct_of_bound"] == {"value": 0.7, "target": 0.6, "met": True}
    ttft = goals["ttft_1024x768_at_most_3x_weight_read"]  # 32 GB / 4 TB/s = 8 ms, x3
    assert ttft["target"] == 24.0
    assert ttft["met"]
    assert goals["peak_memory_at_most_weights_plus_3gb"]["met"]  # 33 GB <= 32 + 3
    warm = goals["warm_setup_at_most_1_5x_disk_read"]  # 32 GB / 2 GB/s = 16 s, x1.5
    assert warm["target"] == 24.0
    assert warm["met"] is False


def test_concurrency_figures_and_minimum_budget(tmp_path):
    """The concurrency stage's levels in the summary; the stage is not started when less than
    its minimum is left (a cut-off run would report nothing)."""
    level = {
        "tokens_per_s": 900.0,
        "steady_state_tokens_per_s": 1200.0,
        "ttft_ms": {"p50": 80.0, "p95": 120.0},
        "itl_ms": {"p50": 20.0, "p95": 30.0},
        "peak_memory_mb": 40000.0,
        "speedup_vs_sequential": 9.5,
    }
    results = [level | {"requests": 1}, level | {"requests": 8}]
    stages = {"concurrency": {"result": {"bench": {"concurrency": {"results": results}}}}}
    figures = gpu_check.summarise(stages)["concurrency"]
    assert set(figures) == {"1", "8"}
    assert figures["8"] == {
        "tokens_per_s": 900.0,
        "steady_state_tokens_per_s": 1200.0,
        "ttft_p95_ms": 120.0,
        "itl_p95_ms": 30.0,
        "peak_memory_mb": 40000.0,
        "speedup_vs_sequential": 9.5,
    }
    assert gpu_check.summarise({})["concurrency"] == {}
    args = argparse.Namespace(
        dry_run=False, out=str(tmp_path / "o"), work=str(tmp_path / "w"), budget_s=60.0
    )
    check = gpu_check.Check(args)
    cmd = [sys.executable, "-c", "pass"]
    late = check.run("concurrency", cmd, cap=180, min_s=gpu_check.CONCURRENCY_MIN_S)
    assert "budget spent" in late["skipped"]
    assert check.run("other", cmd, cap=180)["rc"] == 0  # 60 s left is enough without a minimum
