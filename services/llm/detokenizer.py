"""Incremental detokenisation that never emits half a UTF-8 character mid-stream, and stop-string handling."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas whose concatenation is tokenizer.decode(ids)."""

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
        self.is_stopped = False

    def add(self, token_id: int) -> bool:
        """Appends a token; returns True if a stop string now appears (text is cut before it)."""
        return add_tokens([self], [token_id])[0]

    def _take(self, prefix: str, full: str) -> bool:
        # A trailing U+FFFD may be a character whose remaining bytes are still to come.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._read(full[len(prefix):])
        return self._cut_at_stop()

    def finish(self) -> bool:
        """The stream ends: takes in the held-back tail, U+FFFD and all, as tokenizer.decode would;
        returns True if a stop string now appears (text is cut before it). Safe to call twice."""
        if self.is_stopped or self.read_offset == len(self.ids):
            return False
        prefix, full = self._decode_unread()
        self._read(full[len(prefix):])
        return self._cut_at_stop()

    def delta(self, final: bool = False) -> str:
        """New text that is safe to send now (everything, when final)."""
        if final:
            self.finish()
        end = len(self.text) if final else max(self.num_emitted, len(self.text) - self.hold)
        out = self.text[self.num_emitted:end]
        self.num_emitted = end
        return out

    def _decode_unread(self) -> tuple[str, str]:
        """The text of the ids already read in the window, and of the whole window with the unread ones."""
        prefix, full = (self.tokenizer.decode(window, skip_special_tokens=True) for window in self._windows())
        return prefix, full

    def _windows(self) -> list[list[int]]:
        window = self.ids[self.prefix_offset:]
        return [window[:self.read_offset - self.prefix_offset], window]

    def _read(self, new_text: str) -> None:
        self.text += new_text
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)

    def _cut_at_stop(self) -> bool:
        # Only the newly reachable tail can hold a new match; cut at the earliest one.
        matches = [at for s in self.stop if (at := self.text.find(s, max(0, self.num_emitted - len(s)))) != -1]
        if matches:
            self.text = self.text[:min(matches)]
            self.is_stopped = True
        return bool(matches)


def add_tokens(detokenizers: list[IncrementalDetokenizer], token_ids: list[int]) -> list[bool]:
    """Appends one token to each detokenizer (all of one tokenizer), decoding every window in one call;
    returns, for each, whether a stop string now appears."""
    windows = []
    for detokenizer, token_id in zip(detokenizers, token_ids):
        detokenizer.ids.append(token_id)
        windows += detokenizer._windows()
    if not windows:
        return []
    # One decode per window in a loop: tokenizers' decode_batch wakes a thread pool, which costs more than
    # it saves at these sizes (27 µs against 2 µs for one stream; about even at 32).
    decode = detokenizers[0].tokenizer.decode
    texts = [decode(window, skip_special_tokens=True) for window in windows]
    return [d._take(prefix, full) for d, prefix, full in zip(detokenizers, texts[0::2], texts[1::2])]


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), mapped back to the byte: printable
    Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenTexts:
    """Each token's text alone and its exact bytes, for log-probabilities; cached, as the same tokens recur."""

    def __init__(self, tokenizer):
        self.tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        # Byte-level vocabularies (Qwen's, InternLM's) spell each byte by one character: the exact bytes of a token
        # that holds part of a UTF-8 character. Others fall back to the UTF-8 of its text.
        is_byte_level = type(getattr(self.tokenizer, "decoder", None)).__name__ == "ByteLevel"
        self.byte_table = _byte_level_table() if is_byte_level else None
        self.cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        """The token's text (special tokens shown; U+FFFD for part of a character) and its bytes."""
        if (known := self.cache.get(token_id)) is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            known = self.cache[token_id] = (text, self._bytes(token_id, text))
        return known

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = self.tokenizer.id_to_token(token_id) if self.byte_table is not None else None
        if piece is None or any(c not in self.byte_table for c in piece):  # e.g. an added token spelled plainly
            return text.encode()
        return bytes(self.byte_table[c] for c in piece)
