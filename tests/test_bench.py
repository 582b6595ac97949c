"""The benchmark CLI and the random weights it runs on: a smoke run on the tiny checkpoint (keys and
consistency, no timing thresholds) and one of the --random path, both in-process; the decode-bytes
model of vl2-small computed independently from the module tree; the refusal of `--random small`
where it cannot fit; and random snapshots in the real on-disk format through the strict loader."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deepseek_vl2_runtime import Pipeline, SamplingParams, bench
from deepseek_vl2_runtime.bench import SIZES, weights_bytes_per_token
from deepseek_vl2_runtime.chat_template import Tokenizer
from deepseek_vl2_runtime.config import VL2Config
from deepseek_vl2_runtime.image_processing import num_image_tokens, select_best_resolution
from deepseek_vl2_runtime.language import MoE
from deepseek_vl2_runtime.model import DeepseekVL2
from deepseek_vl2_runtime.random_weights import (
    available_bytes,
    checkpoint_shapes,
    estimate_bytes,
    random_model,
    small_config,
    write_checkpoint,
)

from paths import golden_image, tiny_checkpoint

SIZE_KEYS = [f"{w}x{h}" for w, h in SIZES]


def run_bench(capsys, *args: str) -> tuple[dict, str]:
    """bench.main in-process with --json: (the JSON object, the table on stderr)."""
    assert bench.main([*args, "--json"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def active_params(model: DeepseekVL2) -> int:
    """Parameters one decode step reads, counted on the module tree: the embedding row, every
    non-expert language parameter, and top_k of the routed experts of each MoE layer."""
    lm = model.language
    cfg = lm.config
    total = cfg.hidden_size  # one embedding row
    for name, p in lm.named_parameters():
        if "embed_tokens" in name or ".experts." in name:
            continue
        total += p.numel()
    for layer in lm.model.layers:
        if isinstance(layer.mlp, MoE):
            one_expert = sum(p.numel() for p in layer.mlp.experts[0].parameters())
            total += cfg.num_experts_per_tok * one_expert
    return total


@pytest.fixture(scope="module")
def small_on_meta() -> DeepseekVL2:
    with torch.device("meta"):
        return DeepseekVL2(small_config())


def test_small_config_matches_the_spec(small_on_meta):
    lc = small_on_meta.config.language_config
    assert (lc.hidden_size, lc.num_hidden_layers, lc.vocab_size) == (2048, 27, 102400)
    assert (lc.kv_lora_rank, lc.q_lora_rank, lc.n_routed_experts) == (512, None, 64)
    assert len(small_on_meta.config.candidate_resolutions) == 23
    assert small_on_meta.config.candidate_resolutions[-1] == (1152, 1152)
    total = sum(p.numel() for p in small_on_meta.parameters())
    assert 15.5e9 < total < 16.5e9  # "16B MoE" (vision tower and projector included)


def test_weights_bytes_per_token_of_vl2_small(small_on_meta):
    lc = small_on_meta.config.language_config
    params = active_params(small_on_meta)
    assert weights_bytes_per_token(lc, torch.bfloat16) == 2 * params
    assert weights_bytes_per_token(lc, torch.float32) == 4 * params
    assert 2.40e9 < params < 2.50e9  # spec: ~2.45 B active parameters per token
    assert abs(2 * params / 4.9e9 - 1) < 0.01  # ~4.9 GB read per decode step in bf16


def test_random_small_refused_where_it_cannot_fit(small_on_meta, capsys):
    cpu = torch.device("cpu")
    if available_bytes(cpu) >= estimate_bytes(small_on_meta, torch.float32):
        pytest.skip("this host could hold vl2-small in float32")
    with pytest.raises(SystemExit) as refused:  # before anything is allocated
        bench.main([*random_small(), "--device", "cpu", "--dtype", "float32", "--json"])
    message = str(refused.value.code)
    assert capsys.readouterr().out == ""
    assert message.startswith("--random small needs about")
    assert "GiB" in message
    assert "float32" in message


def test_smoke_run_on_the_tiny_checkpoint(capsys):
    model_dir, image = tiny_checkpoint(), golden_image("img_300x1200.png")
    if model_dir is None or image is None:
        pytest.skip("tiny checkpoint or golden images not available")
    args = ["--weights", str(model_dir), "--device", "cpu", "--threads", "1"]
    r, table = run_bench(
        capsys, *args, "--new-tokens", "8", "--repeats", "1", "--image", str(image)
    )
    assert "ms/token" in table  # the human table

    user_key = "img_300x1200.png:300x1200"
    keys = [*SIZE_KEYS, user_key]
    for field in ("preprocess_ms", "time_to_first_token_ms", "ttft_breakdown_ms", "prompt_tokens"):
        assert list(r[field]) == keys, field
    for key in keys:
        stages = r["ttft_breakdown_ms"][key]
        assert all(v > 0 for v in stages.values())
        assert r["time_to_first_token_ms"][key] == stages["total"]  # one repeat: same run
        assert stages["total"] == pytest.approx(
            sum(stages[s] for s in ("preprocess", "vision", "prefill", "sample")), abs=0.01
        )
        assert r["preprocess_ms"][key] > 0
    assert r["prompt_tokens"]["384x384"] < r["prompt_tokens"]["4032x3024"] < 4096
    assert set(r["decode_ms"]) == {"4032x3024", user_key}

    assert r["decode_image"] == user_key
    assert r["new_tokens"] == 8
    assert r["decode_intervals"] == 6  # 8 ids, 7 intervals, the last dropped
    assert r["decode_ms_per_token"] > 0
    assert r["decode_ms_per_token_mean"] > 0
    assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_token"], rel=1e-3)
    assert r["first_token_via_generate_ms"] > 0
    assert r["load_s"] > 0
    assert r["compile_s"] is None
    assert r["peak_memory_mb"] > 0

    assert (r["device"], r["dtype"], r["threads"], r["compile"]) == ("cpu", "float32", 1, False)
    assert r["torch_version"] == torch.__version__
    assert r["seeds"]["sampling"] == 0
    assert r["repeats"] == 1
    # Tiny config: embedding row 64 + norms + 3 x attention + dense MLP + 2 x (router + top-2
    # of 8 experts + shared) + final norm + lm_head 1024 x 64, float32.
    assert r["config"]["active_params_per_token"] < r["config"]["total_params"]
    assert r["weights_bytes_per_token"] == 4 * r["config"]["active_params_per_token"]
    assert r["memory_bandwidth_gbps"] is None
    assert r["bound_tokens_per_s"] is None
    assert r["bound_fraction"] is None
    assert r["peak_memory_mb_long_request"] is None
    assert r["host_memcpy_gbps"] > 0
    assert r["host_memcpy_bound_tokens_per_s"] > 0
    assert "NOT measured" in r["official_cpu_reference"]["source"]  # tiny mla, CPU, 1 thread


def test_weights_bytes_of_the_tiny_checkpoint():
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    config = VL2Config.from_json(Path(model_dir) / "config.json")
    with torch.device("meta"):
        model = DeepseekVL2(config)
    assert weights_bytes_per_token(config.language_config, torch.float32) == 4 * active_params(
        model
    )


def random_small() -> list[str]:
    """`--random small` with the tiny checkpoint's tokenizer (any tokenizer serves)."""
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    return ["--random", "small", "--tokenizer", str(model_dir)]


def tiny_with_real_vocab() -> VL2Config:
    """The tiny checkpoint's shapes with vl2-small's vocabulary."""
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    config = VL2Config.from_json(Path(model_dir) / "config.json")
    language = dataclasses.replace(config.language_config, vocab_size=102400)
    return dataclasses.replace(config, language_config=language)


def test_random_model_is_seeded_and_prepared():
    config, cpu = tiny_with_real_vocab(), torch.device("cpu")
    a, b = (random_model(config, cpu, torch.bfloat16, seed=3) for _ in range(2))
    c = random_model(config, cpu, torch.bfloat16, seed=4)
    for (name, x), y, z in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert x.dtype == torch.bfloat16, name
        assert x.device == cpu, name
        assert torch.equal(x, y), name
        assert not torch.equal(x, z), name
    norm = a.language.model.norm.weight.float()
    assert abs(norm.mean().item() - 1) < 0.05
    assert 0.05 < norm.std().item() < 0.15
    assert a.language.max_seq == 4096
    assert not a.training
    assert all(m.w13 is not None for m in a.modules() if isinstance(m, MoE))


def test_random_run_in_process(monkeypatch, capsys):
    """The --random path end to end (vl2-small swapped for tiny shapes): random weights on the
    device, prompts encoded by the production Pipeline with the given tokenizer, the same
    measurements."""
    monkeypatch.setattr(bench, "small_config", tiny_with_real_vocab)
    args = [*random_small(), "--device", "cpu", "--threads", "1"]
    r, _ = run_bench(capsys, *args, "--new-tokens", "4", "--repeats", "1")
    assert r["source"] == "random:small"
    assert r["seeds"]["model_init"] == 0
    assert r["config"]["vocab_size"] == 102400
    assert r["load_s"] > 0
    assert list(r["time_to_first_token_ms"]) == SIZE_KEYS
    w, h = select_best_resolution((640, 480), small_config().candidate_resolutions)
    image_tokens = num_image_tokens((w // 384, h // 384), 14)
    # BOS, "<|User|>: ", the image's placeholders, "\nDescribe this image.\n\n<|Assistant|>:"
    # in the given (tiny checkpoint's) tokenizer
    tokenizer = Tokenizer.from_dir(tiny_checkpoint())
    text = tokenizer.encode("<|User|>: ") + tokenizer.encode(
        "\nDescribe this image.\n\n<|Assistant|>:"
    )
    assert r["prompt_tokens"]["640x480"] == 1 + len(text) + image_tokens
    assert r["decode_intervals"] == 2
    assert r["decode_tokens_per_s"] > 0
    assert "official_cpu_reference" not in r


def test_random_snapshot_in_the_real_format_loads_strictly(tmp_path):
    """write_checkpoint: the hub's layout (shards + index, config.json, tokenizer files, the
    attention-pool head the loader ignores), readable by the strict production loader."""
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    dst = write_checkpoint(tmp_path / "snap", raw, model_dir, seed=5, shard_bytes=2**20)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = VL2Config.from_json(dst / "config.json")
    shapes = checkpoint_shapes(config)
    assert set(index["weight_map"]) == set(shapes)
    assert any(k.startswith("vision.attn_pool.") for k in shapes)
    with safe_open(dst / shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
        key = next(iter(f.keys()))
        assert f.get_tensor(key).dtype == torch.bfloat16
        assert tuple(f.get_slice(key).get_shape()) == shapes[key]
    pipe = Pipeline.load(dst, device="cpu", dtype=torch.float32)
    try:
        norm = pipe.model.language.model.norm.weight
        assert abs(norm.mean().item() - 1) < 0.05
        assert 0.03 < norm.std().item() < 0.15
        params = SamplingParams(temperature=0, max_new_tokens=3, seed=0)
        assert len(pipe.generate_ids(pipe.encode("Hello", []), params)) == 3
    finally:
        pipe.close()


def test_concurrency_run_on_the_tiny_checkpoint(monkeypatch, capsys):
    """--concurrency through the one engine: exact token counts, the lone stream (level 1)
    added, percentiles ordered and recomputable, every ratio from the measured times. Small
    images (256-400 px) keep the prefills short; no timing thresholds."""
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    monkeypatch.setattr(bench, "MIX_SIDE_PX", (256, 400))
    args = ["--weights", str(model_dir), "--device", "cpu", "--threads", "1"]
    r, table = run_bench(capsys, *args, "--concurrency", "2", "--concurrency-tokens", "3", "5")
    assert "x seq" in table
    assert "issue 10 targets" not in table  # no level 8 run
    assert not {"decode_ms_per_token", "time_to_first_token_ms"} & set(r)  # replaced
    assert r["seeds"] == {"mix": 0, "sampling": 0}
    assert r["load_s"] > 0
    c = r["concurrency"]
    assert (c["levels"], c["answer_tokens"], c["engine_slots"]) == ([1, 2], [3, 5], 2)
    assert c["image_side_px"] == [256, 400]
    assert "issue_10_targets" not in c
    lone, pair = c["results"]

    def ordered(p: dict) -> bool:
        return p["p50"] <= p["p95"]

    for n, level in zip((1, 2), c["results"], strict=True):
        reqs = level["per_request"]
        assert level["requests"] == len(reqs) == n
        assert all(3 <= q["new_tokens"] <= 5 for q in reqs)
        assert level["new_tokens"] == sum(q["new_tokens"] for q in reqs)
        assert level["sequential"]["new_tokens"] == level["new_tokens"]
        assert level["itl_count"] == level["new_tokens"] - n
        for seq_or_conc in (level, level["sequential"]):
            assert ordered(seq_or_conc["ttft_ms"])
            assert ordered(seq_or_conc["itl_ms"])
            assert seq_or_conc["tokens_per_s"] == pytest.approx(
                seq_or_conc["new_tokens"] / seq_or_conc["wall_s"], rel=1e-3
            )
        assert ordered(level["queue_ms"])
        for q in reqs:
            assert q["queue_ms"] == pytest.approx(q["ttft_ms"] - q["ttft_alone_ms"], abs=2e-3)
            assert 0 < q["ttft_ms"] < 1e3 * level["wall_s"]
        for key in ("ttft_ms", "queue_ms"):
            p50, p95 = np.percentile([q[key] for q in reqs], [50, 95])
            assert level[key] == {
                "p50": pytest.approx(p50, abs=2e-3),
                "p95": pytest.approx(p95, abs=2e-3),
            }
        assert level["speedup_vs_sequential"] == pytest.approx(
            level["sequential"]["wall_s"] / level["wall_s"], abs=1e-3
        )
        assert level["itl_p95_vs_lone"] == pytest.approx(
            level["itl_ms"]["p95"] / lone["itl_ms"]["p95"], abs=1e-3
        )
        assert level["itl_p95_vs_sequential"] == pytest.approx(
            level["itl_ms"]["p95"] / level["sequential"]["itl_ms"]["p95"], abs=1e-3
        )
        assert level["peak_memory_mb"] is None  # CPU
    # Level 1 is its own lone stream; its steady state is its whole decode.
    assert (lone["steady_state_vs_lone"], lone["itl_p95_vs_lone"]) == (1.0, 1.0)
    assert lone["steady_state_tokens"] == lone["new_tokens"] - 1
    assert lone["steady_state_tokens_per_s"] == pytest.approx(
        lone["steady_state_tokens"] / lone["steady_state_s"], rel=1e-3
    )
    # A level's mix is the first N requests of the next: same image, prompt, answer length,
    # and the same sequential run alone.
    first = {k: v for k, v in lone["per_request"][0].items() if k in ("image", "prompt_tokens")}
    assert first == {k: pair["per_request"][0][k] for k in first}
    assert lone["per_request"][0]["new_tokens"] == pair["per_request"][0]["new_tokens"]
    assert lone["per_request"][0]["ttft_alone_ms"] == pair["per_request"][0]["ttft_alone_ms"]
    assert lone["per_request"][0]["image"] != pair["per_request"][1]["image"]


def test_rounds_report_the_median_of_each_round(monkeypatch, capsys):
    """--rounds 3: every level measured three times (each with its own sequential run); the
    reported ratios are the middle value of the three rounds' ratios, each listed."""
    model_dir = tiny_checkpoint()
    if model_dir is None:
        pytest.skip("tiny checkpoint not available")
    monkeypatch.setattr(bench, "MIX_SIDE_PX", (256, 300))
    args = ["--weights", str(model_dir), "--device", "cpu", "--threads", "1", "--concurrency"]
    r, table = run_bench(capsys, *args, "2", "--concurrency-tokens", "3", "4", "--rounds", "3")
    c = r["concurrency"]
    assert c["rounds"] == 3
    assert [list(round_) for round_ in c["round_ratios"]] == [["1", "2"]] * 3
    pair = c["results"][1]
    for key in ("speedup_vs_sequential", "steady_state_vs_lone", "itl_p95_vs_lone"):
        values = [round_["2"][key] for round_ in c["round_ratios"]]
        if None in values:
            assert pair[key] is None
        else:
            assert pair[key] == sorted(values)[1]
    assert "medians of 3 round(s)" in table
    assert [line.split(":")[0] for line in table.splitlines() if line.startswith("round")] == [
        "round 1",
        "round 2",
        "round 3",
    ]


def test_median_of_rounds():
    rounds = [
        {"n": 2, "wall_s": 3.0, "window": None, "per_request": ["a"], "name": "x"},
        {"n": 2, "wall_s": 1.0, "window": 5.0, "per_request": ["b"], "name": "x"},
        {"n": 4, "wall_s": 2.0, "window": 6.0, "per_request": ["c"], "name": "x"},
    ]
    assert bench.median_of(rounds) == {
        "n": 2,
        "wall_s": 2.0,
        "window": None,  # not there in every round
        "per_request": ["a"],
        "name": "x",
    }
    assert bench.median_of([{"p": {"p50": 1.0}}, {"p": {"p50": 4.0}}]) == {"p": {"p50": 2.5}}


def test_serving_figures_arithmetic():
    """The steady-state window runs from the last first id to the first last id."""
    traces = [bench.Trace(0.0, [1.0, 2.0, 3.0, 4.0]), bench.Trace(0.5, [2.5, 3.0, 3.5, 5.0])]
    f = bench.serving_figures(traces)
    assert (f["wall_s"], f["new_tokens"], f["tokens_per_s"]) == (5.0, 8, 1.6)
    assert (f["steady_state_s"], f["steady_state_tokens"]) == (1.5, 4)  # 3, 4 and 3.0, 3.5
    assert f["steady_state_tokens_per_s"] == pytest.approx(4 / 1.5, abs=0.01)
    assert f["ttft_ms"] == {"p50": 1500.0, "p95": 1950.0}
    assert f["itl_count"] == 6
    assert f["itl_ms"]["p50"] == 1000.0  # 1000 x 3, 500, 500, 1500
    # One request finishes before the other's first id: no window with both decoding.
    f = bench.serving_figures([bench.Trace(0.0, [1.0, 2.0]), bench.Trace(0.0, [3.0, 4.0])])
    assert f["steady_state_tokens"] is None
    assert f["steady_state_tokens_per_s"] is None


def test_issue_targets():
    level = {"requests": 8, "speedup_vs_sequential": 2.5, "steady_state_vs_lone": None}
    goals = bench.issue_targets(level | {"itl_p95_vs_lone": 3.5})
    assert goals["speedup_vs_sequential"] == {"value": 2.5, "target": 2.0, "met": True}
    assert goals["steady_state_vs_lone"]["met"] is None  # not measured
    assert goals["itl_p95_vs_lone"] == {"value": 3.5, "target": 3.0, "met": False}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "2", "--new-tokens", "8"], "single-stream"),
        (["--concurrency", "2", "--image", "x.png"], "single-stream"),
        (["--concurrency-tokens", "4", "8"], "go with --concurrency"),
        (["--rounds", "3"], "go with --concurrency"),
        (["--concurrency", "2", "--rounds", "0"], "--rounds must be >= 1"),
        (["--concurrency", "2", "--concurrency-tokens", "9", "4"], "MIN <= MAX"),
    ],
)
def test_concurrency_arguments_refused_before_loading(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--weights", "/nonexistent", "--device", "cpu", *argv])


def test_concurrency_levels():
    assert bench.levels("32,8,8") == [1, 8, 32]
    for bad in ("0,4", "a,b", "4,"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.levels(bad)
