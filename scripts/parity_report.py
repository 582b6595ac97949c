"""Print the measured max errors of our runtime against every golden input (float32, CPU).

    python scripts/parity_report.py [--shared ../shared/golden]

Columns: exact ids/masks/crops/pixel hashes, max |inputs_embeds| and |last logits| error,
greedy ids identical, bf16 last-logit error (same checkpoint loaded in bfloat16 on CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2_runtime import Pipeline, SamplingParams  # noqa: E402
from deepseek_vl2_runtime.chat_template import IMAGE_TAG, Turn  # noqa: E402


def report(case_dir: Path, images_dir: Path) -> None:
    fp32 = Pipeline.load(case_dir / "model", device="cpu", dtype=torch.float32)
    bf16 = Pipeline.load(case_dir / "model", device="cpu", dtype=torch.bfloat16)
    index = json.loads((case_dir / "golden" / "index.json").read_text())
    print(f"\n## case {case_dir.name}\n")
    print(
        "| input | T | exact ids/mask/crops/pixels | embeds max err | logits max err | greedy ids | bf16 logits max err |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = [0.0, 0.0, 0.0]
    for item in index["inputs"]:
        d = case_dir / "golden" / item["id"]
        record, t = (
            json.loads((d / "record.json").read_text()),
            load_file(d / "tensors.safetensors"),
        )
        turns, images = [], []
        for turn in record["conversation_input"]:
            turns.append(Turn(turn["user"], turn.get("assistant")))
            names = turn.get("images") or []
            if names and turn["user"].count(IMAGE_TAG) == len(names):
                images += [Image.open(images_dir / n).convert("RGB") for n in names]
        req = fp32.encode(turns, images)
        hashes = [
            hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in req.images.pixels
        ]
        exact = (
            req.input_ids.tolist() == t["input_ids"].tolist()
            and req.image_mask.tolist() == t["images_seq_mask"].tolist()
            and ([list(c) for c in req.images.crops] or [[0, 0]])
            == t["images_spatial_crop"].tolist()
            and hashes == [x["sha256_f32"] for x in record["processor"]["tiles"]][: len(hashes)]
        )
        e_emb = (fp32.embed(req)[0] - t["inputs_embeds"]).abs().max().item()
        e_log = (fp32.prefill_logits(req) - t["prefill_logits_last"]).abs().max().item()
        expected = t["greedy_new_ids"].tolist()
        params = SamplingParams(
            temperature=0, repetition_penalty=1.0, max_new_tokens=len(expected), seed=0
        )
        greedy = list(fp32.generate_ids(req, params)) == expected
        e_bf16 = (
            (bf16.prefill_logits(bf16.encode(turns, images)) - t["prefill_logits_last"])
            .abs()
            .max()
            .item()
        )
        worst = [max(a, b) for a, b in zip(worst, (e_emb, e_log, e_bf16), strict=True)]
        print(
            f"| {item['id']} | {req.num_tokens} | {exact} | {e_emb:.2e} | {e_log:.2e} | {greedy} | {e_bf16:.3f} |"
        )
    print(f"\nworst: embeds {worst[0]:.2e}, logits {worst[1]:.2e}, bf16 logits {worst[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "golden")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report(
        ROOT / "tests" / "data" / "golden" / "cases" / "mla",
        ROOT / "tests" / "data" / "golden" / "inputs",
    )
    realtok = args.shared / "cases" / "realtok"
    if realtok.exists():
        report(realtok, args.shared / "inputs_realtok")


if __name__ == "__main__":
    main()
