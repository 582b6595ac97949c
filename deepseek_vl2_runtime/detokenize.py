"""Token ids -> text chunks while generating.

Byte-level BPE tokens can end in the middle of a UTF-8 character (CJK, emoji), so text is only
released once the decoded window no longer ends in an incomplete character (U+FFFD). The window
restarts at each released boundary, which keeps the work per token small and guarantees that the
chunks concatenate to exactly `tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .chat_template import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: a clean character boundary
        self.read = 0  # ids up to here have been released

    def push(self, token_id: int) -> str:
        """Add one id; return the newly complete text (possibly "")."""
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character shows as U+FFFD, like a full decode)."""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


class StripEnds:
    """Streams `full.strip()`: drops leading whitespace, holds trailing whitespace back until
    more text follows it (and drops it at the end)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, chunk: str) -> str:
        if not self.started:
            chunk = chunk.lstrip()
            if not chunk:
                return ""
            self.started = True
        text = self.held + chunk
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


class AnswerText:
    """The user-facing answer as it streams, one id at a time: text of every id before
    end-of-sentence (which is not shown), special tokens such as grounding tags kept, the whole
    answer whitespace-stripped. Nothing else is removed. Concatenated, the pieces returned by
    push() and finish() equal decode(ids).strip()."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.decoder, self.strip, self.eos_id = IncrementalDecoder(tokenizer), StripEnds(), eos_id
        self.ended = False

    def push(self, token_id: int) -> str:
        if token_id == self.eos_id:
            self.ended = True
        if self.ended:
            return ""
        return self.strip.feed(self.decoder.push(token_id))

    def finish(self) -> str:
        return self.strip.feed(self.decoder.flush())


def answer_chunks(tokenizer: Tokenizer, tokens: Iterable[int], eos_id: int) -> Iterator[str]:
    """AnswerText over a whole sequence of ids: the non-empty chunks."""
    answer = AnswerText(tokenizer, eos_id)
    for token in tokens:
        if answer.ended:
            break
        text = answer.push(token)
        if text:
            yield text
    text = answer.finish()
    if text:
        yield text
