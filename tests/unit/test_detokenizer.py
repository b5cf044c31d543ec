"""Incremental detokenisation: exact text, no half characters, stop strings cut and never leaked."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.llm.detokenizer import IncrementalDetokenizer, TokenTexts

TEXTS = [
    "Hello, world! The answer is 42.",
    # Characters the tiny BPE never saw are split into single bytes across tokens.
    "Crab 🦀 owl 🦉 sparkles ✨ 漢字 龍 ok 👍🏽 family 👨‍👩‍👧 done",
    "Привет, как дела? 你好，世界！こんにちは 안녕하세요",
    "naïve café\n\tx = [1, 2]; E = mc^2 → ∑ ≈ ∞ ❤️",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (), every: int = 1):
    """Feeds ids one by one, taking a delta every `every` tokens; returns (deltas, stopped_at or None)."""
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    stopped_at = None
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        if stopped:
            stopped_at = i
            break
        if (i + 1) % every == 0:
            deltas.append(detok.delta())
    deltas.append(detok.delta(final=True))
    return deltas, stopped_at


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("every", [1, 3])
def test_deltas_reproduce_decode_exactly(tokenizer, text, every):
    ids = tokenizer.encode(text)
    deltas, stopped_at = stream(tokenizer, ids, every=every)
    assert stopped_at is None
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


def test_split_characters_really_are_split(tokenizer):
    # Guards the test above: some single tokens of TEXTS[1] are not valid UTF-8 on their own.
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokenizer.encode(TEXTS[1]))


def test_text_is_streamed_without_delay_when_there_are_no_stop_strings(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    for token in tokenizer.encode("Hello, world"):
        detok.add(token)
    assert detok.delta() == "Hello, world"
    assert detok.delta(final=True) == ""


def test_special_tokens_produce_no_text(tokenizer):
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|vision_start|>", "<|image_pad|>",
                                                              "<|im_end|>", "<|endoftext|>")]
    text_ids = tokenizer.encode("Hi 🦀 there")
    ids = special[:3] + text_ids[:3] + special[3:] + text_ids[3:] + special
    detok = IncrementalDetokenizer(tokenizer)
    out = []
    for token in ids:
        assert detok.add(token) is False
        piece = detok.delta()
        if token in special:
            assert piece == ""
        out.append(piece)
    out.append(detok.delta(final=True))
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True) == "Hi 🦀 there"


STOP_CASES = [
    # (text, stop strings, expected output)
    ("Hello, world! The answer is 42. Stop here please.", ("answer is 4",), "Hello, world! The "),
    ("Hello, world! The answer is 42. Stop here please.", ("Stop here",), "Hello, world! The answer is 42. "),
    ("Hello, world! The answer is 42. Stop here please.", ("please", "is 42"), "Hello, world! The answer "),
    ("Hello, world! The answer is 42.", ("Hello",), ""),
    ("Hello, world! The answer is 42.", ("orl",), "Hello, w"),
    ("Crab 🦀 owl 🦉 sparkles ✨ 漢字 龍 ok", ("✨ 漢",), "Crab 🦀 owl 🦉 sparkles "),
    ("Crab 🦀 owl 🦉 sparkles ✨ 漢字 龍 ok", ("🦉",), "Crab 🦀 owl "),
]


@pytest.mark.parametrize("text, stop, expected", STOP_CASES)
def test_stop_string_is_cut_and_never_partially_emitted(tokenizer, text, stop, expected):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop)
    emitted = ""
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        if stopped:
            break
        emitted += detok.delta()
        assert expected.startswith(emitted), f"after token {i}: {emitted!r} leaks past {expected!r}"
    else:
        pytest.fail("stop string never reported")
    emitted += detok.delta(final=True)
    assert emitted == expected
    # Stopped on the token that completed the stop string, not later.
    assert not any(s in tokenizer.decode(ids[:i], skip_special_tokens=True) for s in stop)


def test_stop_string_spanning_several_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("Hello, world! The answer is 42.")
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces[6:9] == [" answer", " is", " "]  # the stop string below spans these tokens
    detok = IncrementalDetokenizer(tokenizer, ("answer is 4",))
    for token in ids[:9]:
        assert detok.add(token) is False
    # "Hello, world! The answer is " is decoded; the last len(stop) - 1 characters could still start a match.
    emitted = detok.delta()
    assert emitted == "Hello, world! The "
    assert detok.add(ids[9]) is True
    assert emitted + detok.delta(final=True) == "Hello, world! The "


def test_text_that_only_resembles_a_stop_string_is_released(tokenizer):
    ids = tokenizer.encode("The answer is 42.")
    deltas, stopped_at = stream(tokenizer, ids, stop=("answer is 5",))
    assert stopped_at is None
    assert "".join(deltas) == "The answer is 42."


def test_one_token_completing_two_stop_strings_cuts_at_the_earliest(tokenizer):
    ids = tokenizer.encode("Hello, world! The answer is 42.")
    assert tokenizer.decode([ids[6]]) == " answer"  # completes both "wer" and "answ"
    deltas, stopped_at = stream(tokenizer, ids, stop=("wer", "answ"))
    assert stopped_at == 6
    assert "".join(deltas) == "Hello, world! The "


@pytest.mark.parametrize("text", TEXTS[1:3])
@pytest.mark.parametrize("every", [1, 3])
def test_stream_cut_inside_a_character_ends_with_what_decode_gives(tokenizer, text, every):
    # A stream may end (max_tokens, EOS) between the bytes of one character: the final delta carries the
    # held-back tail as tokenizer.decode renders it, U+FFFD included, and nothing broken comes earlier.
    ids = tokenizer.encode(text)
    num_cut_inside = 0
    for n in range(1, len(ids) + 1):
        deltas, stopped_at = stream(tokenizer, ids[:n], every=every)
        assert stopped_at is None
        expected = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert "".join(deltas) == expected, f"cut after {n} tokens"
        assert not any("\ufffd" in d for d in deltas[:-1]), f"cut after {n} tokens: {deltas!r}"
        num_cut_inside += expected.endswith("\ufffd")
    assert num_cut_inside > 0  # guards the test: some cuts really fall inside a character


def test_final_delta_flushes_a_character_cut_by_the_end(tokenizer):
    ids = tokenizer.encode("ok 🦀")
    assert tokenizer.decode(ids[:3]) == "ok \ufffd"  # " " shares a token with the emoji's first byte
    detok = IncrementalDetokenizer(tokenizer)
    assert [(detok.add(t), detok.delta()) for t in ids[:3]] == [(False, "ok"), (False, ""), (False, "")]
    assert detok.finish() is False
    assert detok.delta(final=True) == " \ufffd"
    assert detok.finish() is False and detok.delta(final=True) == ""


def test_stop_string_in_the_flushed_tail_is_cut_and_reported(tokenizer):
    # "k " is only decoded once the stream ends, because " " travels with the emoji's first byte.
    ids = tokenizer.encode("ok 🦀")[:2]
    detok = IncrementalDetokenizer(tokenizer, ("k ",))
    emitted = ""
    for token in ids:
        assert detok.add(token) is False
        emitted += detok.delta()
    assert detok.finish() is True
    assert emitted + detok.delta(final=True) == "o"


def test_finish_after_a_stop_string_adds_nothing(tokenizer):
    ids = tokenizer.encode("Crab 🦀 owl 🦉 sparkles")
    detok = IncrementalDetokenizer(tokenizer, ("owl",))
    for token in ids:
        if detok.add(token):
            break
    assert detok.finish() is False
    assert detok.delta(final=True) == "Crab 🦀 "


@pytest.mark.parametrize("stop", [(), ("owl",), ("k ", "?")])
def test_a_batch_of_streams_gives_each_the_text_and_stops_it_would_give_alone(tokenizer, stop):
    from services.llm.detokenizer import add_tokens

    ids = [tokenizer.encode(text) for text in TEXTS]
    alone = [stream(tokenizer, one, stop) for one in ids]
    detoks = [IncrementalDetokenizer(tokenizer, stop) for _ in ids]
    deltas, stopped_at = [[] for _ in ids], [None] * len(ids)
    for i in range(max(map(len, ids))):
        live = [n for n, one in enumerate(ids) if i < len(one) and stopped_at[n] is None]
        for n, stopped in zip(live, add_tokens([detoks[n] for n in live], [ids[n][i] for n in live])):
            if stopped:
                stopped_at[n] = i
            deltas[n].append(detoks[n].delta(final=stopped or i == len(ids[n]) - 1))
    assert [("".join(d), s) for d, s in zip(deltas, stopped_at)] == [("".join(d), s) for d, s in alone]


def test_token_texts_bytes_join_the_characters_their_texts_split(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("wörld 海 🙂<|im_end|>")
    pieces = [texts.get(i) for i in ids]
    assert any("\ufffd" in text for text, _ in pieces), "the sample splits a character over tokens"
    assert b"".join(token_bytes for _, token_bytes in pieces).decode() == "wörld 海 🙂<|im_end|>"
    assert pieces[-1] == ("<|im_end|>", b"<|im_end|>")  # special tokens are shown
    for (text, token_bytes), token_id in zip(pieces, ids):
        assert text == tokenizer.decode([token_id])
        assert "\ufffd" in text or token_bytes == text.encode()
