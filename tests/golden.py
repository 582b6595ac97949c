"""The recorded golden cases of the official implementation (../shared/golden, and the copied
case mla in tests/data/golden): their inputs, as the official pipeline saw them, and outputs."""

from __future__ import annotations

import json

from PIL import Image
from safetensors.torch import load_file

from deepseek_vl2_runtime.chat_template import IMAGE_TAG, Turn

from checkpoints import GOLDEN
from paths import SHARED_GOLDEN

CASES = {
    "mla": (GOLDEN / "cases" / "mla", GOLDEN / "inputs"),
    "realtok": (SHARED_GOLDEN / "cases" / "realtok", SHARED_GOLDEN / "inputs_realtok"),
}


def golden_inputs(case: str) -> list[str]:
    root, _ = CASES[case]
    index = root / "golden" / "index.json"
    if not index.exists():
        return []
    return [i["id"] for i in json.loads(index.read_text())["inputs"]]


class Golden:
    def __init__(self, case: str, input_id: str) -> None:
        root, self.images_dir = CASES[case]
        d = root / "golden" / input_id
        self.record = json.loads((d / "record.json").read_text())
        self.tensors = load_file(d / "tensors.safetensors")
        self.dir = d

    def request(self):
        """(turns, images) as the official pipeline saw them: untagged images are dropped."""
        turns, images = [], []
        for t in self.record["conversation_input"]:
            turns.append(Turn(t["user"], t.get("assistant")))
            names = t.get("images") or []
            if names and t["user"].count(IMAGE_TAG) == len(names):
                images += [Image.open(self.images_dir / n).convert("RGB") for n in names]
            else:
                assert t["user"].count(IMAGE_TAG) == 0, "partially tagged turns are not in the set"
        return turns, images
