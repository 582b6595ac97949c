"""Tokenizer and the DeepSeek chat template, as the official processor builds prompt ids.

A user turn is the string "<|User|>: " + text.strip() + "\\n\\n<|Assistant|>:"; the text pieces
between `<image>` tags are encoded separately (special tokens recognised inside them) and each
tag becomes the image's run of placeholder ids. A previous assistant answer is its stripped
text followed by EOS, with no role prefix (the user turn already ended with "<|Assistant|>:").
The prompt starts with BOS and ends with the ":" of the last "<|Assistant|>:".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError

IMAGE_TAG = "<image>"
PAD, USER, ASSISTANT = "<｜▁pad▁｜>", "<|User|>", "<|Assistant|>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
REQUIRED_SPECIAL = (PAD, IMAGE_TAG, *GROUNDING_TOKENS, USER, ASSISTANT)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """The checkpoint's `tokenizer.json` through the `tokenizers` library, with VL2's special ids."""

    def __init__(self, backend: HFTokenizer, bos: str, eos: str) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos, eos
        found = {t: backend.token_to_id(t) for t in (bos, eos, *REQUIRED_SPECIAL)}
        missing = [t for t in (bos, eos, *REQUIRED_SPECIAL) if found[t] is None]
        if missing:
            raise CheckpointError(f"tokenizer.json: special token(s) missing: {missing}")
        ids = {t: i for t, i in found.items() if i is not None}
        self.bos_id, self.eos_id = ids[bos], ids[eos]
        self.image_id = ids[IMAGE_TAG]
        self.special_ids = {t: ids[t] for t in REQUIRED_SPECIAL}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(
                f"{path / 'tokenizer.json'}: cannot load tokenizer ({e})"
            ) from None
        names: dict[str, str | None] = {}
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            f = path / fname
            if f.exists():
                try:
                    data = json.loads(f.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{f}: not valid JSON ({e})") from None
                for key in ("bos_token", "eos_token"):
                    names.setdefault(key, _token_content(data.get(key)))
        bos, eos = names.get("bos_token"), names.get("eos_token")
        if not bos or not eos:
            raise CheckpointError(f"{path}: tokenizer_config.json names no bos_token/eos_token")
        return cls(backend, bos, eos)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS; special tokens inside the text are recognised."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens kept (grounding tags are part of the answer)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One exchange: the user's text (may contain `<image>` tags) and, for history, the answer."""

    user: str
    assistant: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptInputs:
    input_ids: list[int]
    image_mask: list[bool]


def build_prompt(
    tokenizer: Tokenizer, turns: Sequence[Turn], image_token_counts: Sequence[int]
) -> PromptInputs:
    """Prompt ids for a conversation; `image_token_counts[i]` placeholders for the i-th tag."""
    ids, mask = [tokenizer.bos_id], [False]
    counts = iter(image_token_counts)

    def add_text(text: str) -> None:
        pieces = text.split(IMAGE_TAG)
        for i, piece in enumerate(pieces):
            if i:
                n = next(counts)
                ids.extend([tokenizer.image_id] * n)
                mask.extend([True] * n)
            piece_ids = tokenizer.encode(piece)
            ids.extend(piece_ids)
            mask.extend([False] * len(piece_ids))

    for turn in turns:
        add_text(f"{USER}: {turn.user.strip()}\n\n{ASSISTANT}:")
        if turn.assistant is not None:
            if IMAGE_TAG in turn.assistant:
                raise ValueError("an assistant turn cannot contain <image>")
            add_text(turn.assistant.strip())
            ids.append(tokenizer.eos_id)
            mask.append(False)
    return PromptInputs(input_ids=ids, image_mask=mask)
