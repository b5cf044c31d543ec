"""Incremental detokenisation that never emits half a UTF-8 character, and stop-string handling."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        # The Rust tokenizer directly: the Python wrapper's decode costs more than the model per token.
        self.tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.stop = stop
        # Text that could still become the start of a stop string is held back.
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_emitted = 0

    def add(self, token_id: int) -> bool:
        """Appends a token; returns True if a stop string now appears (text is cut before it)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        # Only the newly reachable tail can hold a new match; cut at the earliest one.
        matches = [at for s in self.stop if (at := self.text.find(s, max(0, self.num_emitted - len(s)))) != -1]
        if matches:
            self.text = self.text[:min(matches)]
            return True
        return False

    def delta(self, final: bool = False) -> str:
        """New text that is safe to send now (everything, when final)."""
        end = len(self.text) if final else max(self.num_emitted, len(self.text) - self.hold)
        out = self.text[self.num_emitted:end]
        self.num_emitted = end
        return out
