"""The stages of scripts/gpu_check.sh, one per process: `python scripts/gpu_stages.py STAGE
--result FILE [--dry-run] [--work DIR]` writes the stage's figures to FILE as JSON (exit 0: the
stage ran; its own `ok` says whether its check passed).

Device mode (the default) measures vl2-small's real shapes on CUDA in bf16; `--dry-run` runs
the same code on CPU in float32 with dry_config() (vl2-small's structure, narrow widths), to test
the plumbing in minutes. Needs torch, safetensors, tokenizers, pillow, numpy only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# The runtime is imported inside the stages, so that `env` imports it first, with the packages
# it must not need blocked.
DRY_LANGUAGE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}
# Packages the runtime must not need (cog's server stack, the hub client, test-only libraries).
NOT_NEEDED = ("cog", "coglet", "huggingface_hub", "hypothesis")
READ_SAMPLE_BYTES = 10 * 10**9
TEXT = "Describe, step by step, how a city grows from a village over many centuries."
log = logging.getLogger("gpu_stages")


def dry_config() -> dict:
    """vl2-small's structure (MLA; 1 dense + 1 MoE layer of 64 experts, top-6, 2 shared; vocab
    102400 for the benchmark's stand-in ids) at widths a CPU runs in seconds."""
    from deepseek_vl2_runtime.random_weights import config_dict

    vision, projector = {"width": 128, "heads": 2}, {"input_dim": 128, "n_embed": 256}
    return config_dict(2, 2, language=DRY_LANGUAGE, vision=vision, projector=projector)


def mode(dry: bool) -> tuple[torch.device, torch.dtype, dict]:
    from deepseek_vl2_runtime.random_weights import SMALL_CONFIG

    if dry:
        return torch.device("cpu"), torch.float32, dry_config()
    return torch.device("cuda"), torch.bfloat16, SMALL_CONFIG


def tokenizer_dir() -> Path:
    """The real DeepSeek tokenizer when the shared golden folder is beside the checkout (it does
    not travel to the device machine), else the repo's tiny one (any tokenizer loads)."""
    for base in (REPO / "tests" / "data" / "golden", REPO.parent / "shared" / "golden"):
        if (base / "cases" / "realtok" / "model" / "tokenizer.json").is_file():
            return base / "cases" / "realtok" / "model"
    return REPO / "tests" / "data" / "golden" / "cases" / "mla" / "model"


def drop_page_cache() -> dict:
    """Ask the kernel to drop the page cache (root only), so the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return {"dropped": True}
    except OSError as e:
        return {"dropped": False, "why": f"{type(e).__name__}: {e}"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- stages -----------------------------------------------------------------------------------


class _Blocker:
    """Import hook: the packages in NOT_NEEDED fail to import, as on a machine without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_NEEDED:
            raise ImportError(f"{name} blocked by gpu_check (the runtime must not need it)")
        return None


def stage_env(args: argparse.Namespace) -> dict:
    """Machine, versions, and every runtime module importing without NOT_NEEDED."""
    out: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "disk_free_gb": round(shutil.disk_usage(args.work).free / 1e9, 1),
    }
    for line in Path("/proc/meminfo").read_text().splitlines()[:3]:
        key, value = line.split(":", 1)
        out[f"meminfo_{key}"] = value.strip()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi_head"] = smi.stdout.splitlines()[:12]
    versions = {}
    for name in ("triton", "safetensors", "tokenizers", "PIL", "numpy", "pytest", "hypothesis"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = None
    out["versions"] = versions
    # Import every runtime module with the unneeded packages blocked (already-imported ones
    # are dropped from sys.modules first, so nothing slips through from this process).
    for name in list(sys.modules):
        if name.split(".")[0] in NOT_NEEDED:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker())
    failures = {}
    import deepseek_vl2_runtime as pkg

    modules = [f"deepseek_vl2_runtime.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            failures[name] = f"{type(e).__name__}: {e}"
    sys.meta_path.pop(0)
    out["runtime_modules"] = len(modules)
    out["runtime_import_failures"] = failures
    out["ok"] = not failures and (args.dry_run or torch.cuda.is_available())
    return out


def _bench(args: argparse.Namespace, device_argv: list[str], dry_argv: list[str]) -> dict:
    """`python -m deepseek_vl2_runtime.bench --random small ... --json` in this process
    (dry_config() on CPU in a dry run); its JSON object."""
    from deepseek_vl2_runtime import bench
    from deepseek_vl2_runtime.config import VL2Config

    source = ["--random", "small", "--tokenizer", str(tokenizer_dir())]
    if args.dry_run:
        bench.small_config = lambda: VL2Config.from_dict(dry_config())
        argv = [*source, "--device", "cpu", *dry_argv]
    else:
        argv = [*source, "--device", "cuda", *device_argv]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = bench.main([*argv, "--json"])
    result = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {"ok": rc == 0, "argv": argv, "bench": result}


def stage_bench(args: argparse.Namespace) -> dict:
    """Single stream: batch-1 decode, its bound, TTFT per image size, peak memory."""
    return _bench(
        args, ["--new-tokens", "128", "--repeats", "3"], ["--new-tokens", "8", "--repeats", "1"]
    )


def stage_concurrency(args: argparse.Namespace) -> dict:
    """1, 8 and 32 requests at once through the one engine (eager; answers of 64-96 tokens,
    images 256-1280 px) against the same requests one at a time: aggregate tokens/s, TTFT and
    ITL p95, peak memory per level."""
    device = ["--concurrency", "1,8,32", "--concurrency-tokens", "64", "96"]
    return _bench(args, device, ["--concurrency", "1,2,4", "--concurrency-tokens", "8", "12"])


def _read_gbps(files: list[Path], direct: bool) -> dict:
    """Bytes / seconds of reading `files` once: with dd iflag=direct (O_DIRECT: the disk, never
    the page cache), or buffered by Python in 64 MiB reads."""
    nbytes = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    if direct:
        for f in files:
            cmd = ["dd", f"if={f}", "of=/dev/null", "bs=64M", "iflag=direct"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                return {"error": done.stderr.strip()[-300:]}
    else:
        chunk = bytearray(64 * 2**20)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(chunk):
                    pass
    seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": round(seconds, 3), "gbps": round(nbytes / seconds / 1e9, 3)}


def stage_snapshot(args: argparse.Namespace) -> dict:
    """Write a full-size random snapshot (real format) to this machine's disk, then measure the
    disk's read speed on it: O_DIRECT (dd), and a buffered read after dropping the page cache."""
    from deepseek_vl2_runtime import random_weights

    device, _, config = mode(args.dry_run)
    dst = Path(args.work) / "snapshot"
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    random_weights.write_checkpoint(dst, config, tokenizer_dir(), seed=0, device=device)
    os.sync()
    write_s = time.perf_counter() - start
    files = list(random_weights.snapshot_files(dst))
    nbytes = sum(f.stat().st_size for f in files)
    out = {
        "path": str(dst),
        "tokenizer": str(tokenizer_dir()),
        "files": [f.name for f in files],
        "weights_bytes": nbytes,
        "write_s": round(write_s, 2),
        "write_gbps": round(nbytes / write_s / 1e9, 3),
        "drawn_on": device.type,
    }
    sample, size = [], 0  # the read speed on ~10 GB (two shards) is enough, and saves time
    for f in files:
        if size >= READ_SAMPLE_BYTES:
            break
        sample.append(f)
        size += f.stat().st_size
    out["read_sample_files"] = [f.name for f in sample]
    out["read_direct"] = _read_gbps(sample, direct=True)
    drop = drop_page_cache() if not args.dry_run or args.drop_caches else {"dropped": False}
    out["read_buffered"] = _read_gbps(sample, direct=False) | drop
    if not drop["dropped"]:
        out["read_buffered"]["note"] = "page cache not dropped: a warm (cached) read"
    disk = out["read_direct"].get("gbps")
    if disk is None and drop["dropped"]:
        disk = out["read_buffered"]["gbps"]
    out["disk_read_gbps"] = disk
    out["ok"] = disk is not None
    return out


def stage_setup(args: argparse.Namespace) -> dict:
    """Production setup on the snapshot (Pipeline.load, compiled decode, a one-slot engine)
    after dropping the page cache, with the compile cache given by the environment; then the
    compiled engine's batch-1 decode speed, and its logits against eager decode (teacher forced:
    the eager steps take the engine's ids)."""
    from deepseek_vl2_runtime import Pipeline
    from deepseek_vl2_runtime.engine import EngineConfig

    device, dtype, _ = mode(args.dry_run)
    snapshot = Path(args.work) / "snapshot"
    if not (snapshot / "config.json").is_file():
        raise SystemExit(f"{snapshot}: no snapshot (the snapshot stage did not run or failed)")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    out: dict = {"inductor_cache_dir": cache, "max_batch": 1}
    out["cache_files_before"] = sum(1 for _ in Path(cache).rglob("*")) if cache else None
    out["page_cache"] = drop_page_cache() if not args.dry_run or args.drop_caches else {}
    loaded: list[float] = []

    class Grab(logging.Handler):  # Pipeline.load logs "loaded %s on %s/%s in %.2f s"
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("loaded "):
                loaded.append(float(record.args[-1]))

    logging.getLogger("deepseek_vl2_runtime").addHandler(Grab())
    logging.getLogger("deepseek_vl2_runtime").setLevel(logging.INFO)
    sync(device)
    start = time.perf_counter()
    pipe = Pipeline.load(snapshot, device, dtype, compile=True, engine=EngineConfig(max_batch=1))
    sync(device)
    out["setup_s"] = round(time.perf_counter() - start, 2)
    out["load_s"] = round(loaded[0], 2) if loaded else None
    if loaded:
        out["compile_and_warm_up_s"] = round(out["setup_s"] - loaded[0], 2)
    out["cache_files_after"] = sum(1 for _ in Path(cache).rglob("*")) if cache else None
    try:
        out |= decode_checks(pipe, device, args.dry_run)
    finally:
        pipe.close()
    out["ok"] = out["compiled_vs_eager"]["ok"]
    return out


def decode_checks(pipe, device: torch.device, dry: bool) -> dict:
    """Batch-1 decode speed of the compiled engine (greedy, a text prompt), its bound, and its
    logits against eager decode."""
    from deepseek_vl2_runtime import SamplingParams, bench

    out: dict = {}
    request = pipe.encode(TEXT, [])
    n = 16 if dry else 128
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n, seed=0)
    for _ in range(2):  # warm-up, then timed
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in pipe.generate(request, params)]
    steps = bench.intervals_ms(stamps)
    per_token = statistics.median(steps)
    lc = pipe.config.language_config
    bytes_per_token = bench.weights_bytes_per_token(lc, pipe.dtype)
    out["decode"] = {
        "prompt_tokens": request.num_tokens,
        "new_tokens": len(stamps),
        "first_token_ms": round((stamps[0] - start) * 1e3, 2),
        "ms_per_token_median": round(per_token, 3),
        "ms_per_token_mean": round(statistics.fmean(steps), 3),
        "tokens_per_s": round(1e3 / per_token, 2),
        "weights_bytes_per_token": bytes_per_token,
    }
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        gbps = bench.copy_bandwidth_gbps(device, min(2**30, free // 4))
        bound = gbps * 1e9 / bytes_per_token
        out["decode"] |= {
            "memory_bandwidth_gbps": round(gbps, 1),
            "bound_tokens_per_s": round(bound, 2),
            "bound_fraction": round(1e3 / per_token / bound, 4),
        }
    out["compiled_vs_eager"] = compiled_vs_eager(pipe, request, 8 if dry else 32)
    return out


@torch.inference_mode()
def compiled_vs_eager(pipe, request, n: int) -> dict:
    """The engine's (compiled) logits of n greedy steps vs eager `lm.decode` fed the same ids."""
    from deepseek_vl2_runtime import SamplingParams

    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n, seed=0)
    tokens = list(pipe.generate(request, params, keep_logits=True))
    lm, t = pipe.model.language, request.num_tokens
    eager = [lm.prefill(pipe.embed(request))[0].cpu()]  # the engine is idle: slot 0 is free
    for i, token in enumerate(tokens[:-1]):
        tok = torch.tensor([[token.id]], device=pipe.device)
        pos = torch.tensor([t + i], device=pipe.device)
        eager.append(lm.decode(tok, pos, t + i + 1)[0].cpu())
    ref, got = torch.stack(eager), torch.stack([tok.logits for tok in tokens])
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    tol = 1e-4 if pipe.dtype == torch.float32 else 2e-2
    return {
        "steps": len(tokens),
        "max_abs_diff": round((got - ref).abs().max().item(), 6),
        "max_rel_err": round(rel, 6),
        "argmax_agreement": round(agree, 4),
        "tolerance_rel": tol,
        "ok": rel <= tol,
    }


STAGES = {"env": stage_env, "bench": stage_bench, "snapshot": stage_snapshot}
STAGES |= {"setup": stage_setup, "concurrency": stage_concurrency}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--result", required=True)
    parser.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--drop-caches", action="store_true", help="also in a dry run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = STAGES[args.stage](args)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
