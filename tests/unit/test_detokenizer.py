"""Incremental detokenization equals a full decode, never splits a character, and stays cheap per step."""

from __future__ import annotations

import random

import pytest

from tokenizer_service.detokenizer import _TRIM_SLACK, REPLACEMENT_CHAR, IncrementalDetokenizer

FRAGMENTS = [
    "Hello",
    " world",
    ",",
    " the",
    " lighthouse",
    " keeper",
    ".",
    "\n",
    "  ",
    "\t",
    "42",
    " 3.14",
    "😀",
    "🎉",
    "👍🏿",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇫🇷",
    "❤️",
    "🦖",
    "🪐",  # emoji, incl. ZWJ, flags, modifiers
    "中文",
    "今天天气很好",
    "。",
    "日本語",
    "こんにちは",
    "カタカナ",
    "안녕하세요",
    "龘",
    "𠀀",  # CJK, ext. B
    "café",
    "naïve",
    "Ελληνικά",
    "Русский",
    "العربية",
    "हिन्दी",
    "𝔘𝔫𝔦",
    "∑",
    "ℵ",
]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 25)))


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 5)  # engines may return several tokens in one step (e.g. speculative decoding)
        deltas.append(detok.step(ids[i : i + k]))
        i += k
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("seed", range(4))
def test_random_text_round_trips_exactly(demo_tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        text = _random_text(rng)
        ids = demo_tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(demo_tokenizer)
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == demo_tokenizer.decode(ids) == text
        assert detok.num_tokens == len(ids)
        # Valid text never shows a half character, in any delta.
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_characters_split_across_tokens_are_held_back(demo_tokenizer) -> None:
    # An emoji the corpus never saw is encoded as several byte tokens.
    ids = demo_tokenizer.encode("🦕", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert [detok.step([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.step(ids[-1:]) == "🦕"
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept_like_decode(demo_tokenizer, skip: bool) -> None:
    rng = random.Random(7)
    specials = [
        demo_tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    ]
    for _ in range(150):
        ids = demo_tokenizer.encode(_random_text(rng), add_special_tokens=False)
        for _ in range(rng.randint(1, 4)):  # anywhere, even inside a multi-byte character
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        got = "".join(_stream(IncrementalDetokenizer(demo_tokenizer, skip_special_tokens=skip), ids, rng))
        assert got == demo_tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in got or "<|endoftext|>" in got or "<|im_start|>" in got) is not skip


@pytest.mark.parametrize("hold_limit", [4, 16])
def test_arbitrary_ids_including_invalid_bytes_match_decode(demo_tokenizer, hold_limit: int) -> None:
    # A random model emits any ids: lone continuation bytes, truncated characters, specials.
    vocab = demo_tokenizer.backend_tokenizer.get_vocab()
    byte_ids = sorted(i for t, i in vocab.items() if len(t) == 1)
    rng = random.Random(hold_limit)
    for trial in range(300):
        pool = byte_ids if trial % 2 else range(len(demo_tokenizer))
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            detok = IncrementalDetokenizer(demo_tokenizer, skip_special_tokens=skip, hold_limit=hold_limit)
            assert "".join(_stream(detok, ids, rng)) == demo_tokenizer.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_at_the_end_is_flushed_as_decode_does(demo_tokenizer) -> None:
    ids = demo_tokenizer.encode("ok 🦕", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(demo_tokenizer)
    text = detok.step(ids)
    tail = detok.flush()
    assert text + tail == demo_tokenizer.decode(ids)
    assert tail.endswith(REPLACEMENT_CHAR)
    assert detok.finished
    with pytest.raises(RuntimeError):
        detok.step([1])


class _CountingTokenizer:
    """Wraps a tokenizer to record how many ids each decode call sees."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_ids = 0
        self.total_ids = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.max_ids = max(self.max_ids, len(token_ids))
        self.total_ids += len(token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_the_sequence(demo_tokenizer) -> None:
    counting = _CountingTokenizer(demo_tokenizer)
    text = "The lighthouse keeper 🌊 watched the sea 中文。" * 40
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, context_tokens=4)
    out = "".join(detok.step([t]) for t in ids) + detok.flush()
    assert out == text
    assert len(ids) > 300
    assert counting.max_ids <= 4 + _TRIM_SLACK + 4  # context (and its slack) plus a held-back character's tokens


def test_a_model_looping_on_an_invalid_byte_still_streams(demo_tokenizer) -> None:
    # A single-byte token that decodes alone to U+FFFD is a continuation byte (0x80..0xBF) or invalid byte.
    byte_ids = [i for t, i in demo_tokenizer.backend_tokenizer.get_vocab().items() if len(t) == 1]
    lone_continuation = next(i for i in sorted(byte_ids) if demo_tokenizer.decode([i]) == REPLACEMENT_CHAR)
    counting = _CountingTokenizer(demo_tokenizer)
    detok = IncrementalDetokenizer(counting, hold_limit=8)
    deltas = [detok.step([lone_continuation]) for _ in range(200)]
    assert sum(1 for d in deltas if d) > 10  # text keeps flowing instead of waiting for the end
    # The window: a context from an emission boundary at least 4 tokens back (forced splits emit up to
    # hold_limit + 1 tokens at a time, so that boundary can lie one such chunk further) plus the unread tokens.
    assert counting.max_ids <= 4 + 2 * (8 + 1)
    assert "".join(deltas) + detok.flush() == demo_tokenizer.decode([lone_continuation] * 200)


@pytest.mark.parametrize("n", [600, 2400])
def test_one_long_update_ending_inside_a_character_costs_linear_decoding(demo_tokenizer, n: int) -> None:
    """A slow reader's updates come joined (up to thousands of ids). One that ended inside a character went to a
    forced split over the whole window, which decodes every head of it: 4,000 lone continuation bytes took 1-6 s
    of the tokenizer service's event loop. The ids decoded must grow linearly with the update, and the text must
    be what one id at a time gives."""
    byte_ids = [i for t, i in demo_tokenizer.backend_tokenizer.get_vocab().items() if len(t) == 1]
    lone_continuation = next(i for i in sorted(byte_ids) if demo_tokenizer.decode([i]) == REPLACEMENT_CHAR)
    ids = [lone_continuation] * n  # each decodes to U+FFFD: the window always ends "inside a character"
    counting = _CountingTokenizer(demo_tokenizer)
    detok = IncrementalDetokenizer(counting)
    out = detok.step(ids)
    assert len(out) >= n - 20  # all but a short tail is emitted at once
    assert counting.total_ids <= 200 * n, counting.total_ids  # quadratic: ~n**2 / 2 ids (1.8e5 / 2.9e6 here)
    one_by_one = IncrementalDetokenizer(demo_tokenizer)
    assert out + detok.flush() == "".join(one_by_one.step([t]) for t in ids) + one_by_one.flush()


def test_invalid_settings_are_refused(demo_tokenizer) -> None:
    with pytest.raises(ValueError, match="context_tokens"):
        IncrementalDetokenizer(demo_tokenizer, context_tokens=0)
    with pytest.raises(ValueError, match="hold_limit"):
        IncrementalDetokenizer(demo_tokenizer, hold_limit=3)


def _byte_fallback_tokenizer():
    """A SentencePiece-style (Llama 2) tokenizer whose vocabulary has ASCII letters and the 256 byte tokens
    <0x00>..<0xFF> only, so every CJK character decodes from three byte tokens through ByteFallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for char in "▁abcdefghijklmnopqrstuvwxyz.":
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer


@pytest.mark.parametrize("context_tokens", [1, 4, 7])
def test_byte_fallback_text_streams_exactly(context_tokens: int) -> None:
    """The context used to start at "the last 4 tokens", often inside a character's byte tokens, which
    ByteFallback decodes as U+FFFDs: valid Korean and Japanese text streamed as '안녕������요'."""
    tokenizer = _byte_fallback_tokenizer()
    text = "대한민국의 수도는 서울입니다. 東京は日本の首都です。 ok 😀 done"
    ids = tokenizer.encode(text).ids
    want = tokenizer.decode(ids)
    assert REPLACEMENT_CHAR not in want and len(ids) > 3 * len(text.split()[0])  # byte tokens, valid text
    rng = random.Random(context_tokens)
    detok = IncrementalDetokenizer(tokenizer, context_tokens=context_tokens)
    assert "".join(_stream(detok, ids, rng)) == want


@pytest.mark.parametrize("before", ["\n", "\n  \n", "a\t"])
def test_an_invalid_byte_after_whitespace_byte_tokens_repeats_nothing(before: str) -> None:
    """Llama 2 and Mistral 7B write a newline or tab as a byte token (<0x0A>). An invalid byte joining its run turns
    the newline already streamed into U+FFFD; the rewrite was read as a space clean-up (the context's non-space
    characters matched), and the whitespace streamed since the last word was sent again: 'hello\n  \n' + '\n  '
    ..., and a stop string "\n\n" fired on text the decode does not hold. Now the newline stands for one of the
    decode's U+FFFDs (the documented exception), and nothing else differs."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("hello" + before).ids + [tokenizer.token_to_id("<0x80>")] + tokenizer.encode("x").ids[1:]
    want = tokenizer.decode(ids)
    assert want.count(REPLACEMENT_CHAR) == 2 and tokenizer.id_to_token(ids[-2]) == "<0x80>"
    for context_tokens in (1, 4):
        detok = IncrementalDetokenizer(tokenizer, context_tokens=context_tokens)
        got = "".join(detok.step([t]) for t in ids) + detok.flush()  # one id a step, as with stop strings
        assert got == want.replace(REPLACEMENT_CHAR, before[-1], 1), (context_tokens, got, want)


def test_space_clean_up_never_loses_or_repeats_a_character() -> None:
    """A decoder that cleans up spaces rewrites emitted text (`don '` + `t` -> `don't`); the delta was cut by
    length and dropped new characters ("say'hi" streamed as "say 'i"). Only the removed space may remain."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["[UNK]", "i", "do", "##n", "'", "t", "k", "##now", "it", "s", "sa", "##y", "hi", ",", "ok", "."]
    backend = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert tokenizer.decode([10, 11, 4, 12]) == "say'hi"  # the clean-up this test is about
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(1, len(pieces)) for _ in range(rng.randrange(1, 12))]
        want = tokenizer.decode(ids)
        got = "".join(_stream(IncrementalDetokenizer(tokenizer), ids, rng))
        assert got.split() == want.split() or "".join(got.split()) == "".join(want.split()), (ids, got, want)


def test_byte_fallback_text_fed_in_one_long_step_streams_exactly() -> None:
    """A slow reader gets many tokens in one update. Past hold_limit unread tokens a split is forced, and one cut
    inside a character's byte tokens passed the check (both sides decode to U+FFFDs): 'ok 대한민국東京' streamed as
    'ok ��������'."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("ok 대한민국東京 done").ids
    want = tokenizer.decode(ids)
    for k in range(1, len(ids)):
        detok = IncrementalDetokenizer(tokenizer)
        got = detok.step(ids[:k]) + "".join(detok.step([t]) for t in ids[k:]) + detok.flush()
        assert got == want, (k, got)


@pytest.mark.parametrize("run", [1, 4, 10, 23])
def test_a_run_of_skipped_special_tokens_keeps_the_next_words_space(run: int) -> None:
    """After ten or more skipped special tokens, the context window held only them and decoded to "": the next
    "▁word" was the first text of the window, and the SentencePiece decoder's Strip took its space ('adstiset' for
    'ad st iset'). Skipped special tokens now never enter the window, as decode() drops them anyway."""
    from tests.integration.tiny import sentencepiece_tokenizer
    from tokenizer_service.text_stream import TextStream

    tokenizer = sentencepiece_tokenizer()
    words = tokenizer.encode("the sea is very calm today and the sky", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    cut = next(i for i, t in enumerate(words) if i > 3 and tokenizer.convert_ids_to_tokens(t).startswith("▁"))
    ids = words[:cut] + [eos] * run + words[cut:]  # the run is followed by a "▁word"
    for skip in (True, False):
        stream = TextStream(tokenizer, (), skip_special_tokens=skip, include_stop_str_in_output=False)
        text = "".join(stream.feed([t]) for t in ids) + stream.finish()
        assert text == tokenizer.decode(ids, skip_special_tokens=skip), (skip, text)
        assert stream.num_generated == len(ids)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "byte-fallback"])
def test_output_continuing_the_prompt_is_what_it_adds_to_the_prompts_text(demo_tokenizer, kind: str) -> None:
    """A continued reply (chat.continue_final_message) is read after the prompt's last ids: its text is what it
    adds to the prompt's, so a SentencePiece reply's first word keeps its space ("▁answer" alone decodes as
    "answer", which glued it to the prefix: "theanswer"), and no character is lost or repeated at the seam, wherever
    the prompt ends, inside a multi-token character included."""
    from tests.integration.tiny import sentencepiece_tokenizer

    tokenizer = {"byte-level": demo_tokenizer, "sentencepiece": sentencepiece_tokenizer(),
                 "byte-fallback": _byte_fallback_tokenizer()}[kind]

    def encode(text: str) -> list[int]:
        if kind == "byte-fallback":  # a bare tokenizers.Tokenizer
            return tokenizer.encode(text).ids
        return tokenizer.encode(text, add_special_tokens=False)

    rng = random.Random(kind)
    for _ in range(60):
        ids = encode(_random_text(rng) + " the sea " + _random_text(rng))
        cut = rng.randint(1, len(ids) - 1)
        prompt, reply = ids[:cut], ids[cut:]
        if tokenizer.decode(prompt).endswith(REPLACEMENT_CHAR):
            continue  # a prompt ending inside a character: not one a chat renders (its text is whole)
        detok = IncrementalDetokenizer(tokenizer, prompt_tail=prompt[-8:])
        streamed = "".join(_stream(detok, reply, rng))
        assert tokenizer.decode(prompt) + streamed == tokenizer.decode(ids), (prompt, reply)
    if kind == "sentencepiece":
        ids = tokenizer.encode("Sure, the answer is the sea", add_special_tokens=False)
        prompt = tokenizer.encode("Sure, the", add_special_tokens=False)
        assert ids[: len(prompt)] == prompt
        detok = IncrementalDetokenizer(tokenizer, prompt_tail=prompt)
        assert "".join(_stream(detok, ids[len(prompt):], rng)) == " answer is the sea"
        plain = IncrementalDetokenizer(tokenizer)
        assert "".join(_stream(plain, ids[len(prompt):], rng)) == "answer is the sea"  # what it streamed before
        from tokenizer_service.text_stream import TextStream  # the service's stream hands the tail on

        stream = TextStream(tokenizer, (), True, False, 0, prompt_tail=prompt)
        assert stream.feed(ids[len(prompt):]) + stream.finish() == " answer is the sea"


def test_added_tokens_not_marked_special_are_streamed_like_decode(demo_model_dir) -> None:
    """skip_special_tokens drops only the added tokens marked special. A model's non-special added tokens (Qwen3's
    <think> and </think>, tool-call tags) are text that decode() keeps; the demo tokenizer's added tokens are all
    special, so counting every added token as special went unnoticed and would drop them from the stream."""
    from transformers import AutoTokenizer

    from tokenizer_service.text_stream import TextStream

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)  # a copy of its own: added tokens change it
    tokenizer.add_tokens(["<think>", "</think>"])  # special=False, as in Qwen3's tokenizer_config.json
    ids = tokenizer.encode("<think>hmm</think> the sea<|im_end|>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<think>") in ids and tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    for skip in (True, False):
        want = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "<think>" in want and "</think>" in want and ("<|im_end|>" in want) is not skip
        stream = TextStream(tokenizer, (), skip_special_tokens=skip, include_stop_str_in_output=False)
        assert "".join(stream.feed([t]) for t in ids) + stream.finish() == want, skip
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        assert "".join(_stream(detok, ids, random.Random(5))) == want, skip


@pytest.mark.parametrize("hold_limit", [4, 8, 16])
def test_invalid_bytes_are_held_until_more_than_hold_limit_are_unread(demo_tokenizer, hold_limit: int) -> None:
    """hold_limit is how many unread tokens may wait for a character to complete: a forced split comes only once
    more than that many are unread. Splitting at exactly hold_limit was not caught (for valid text the stream is
    the same; under a byte-fallback decoder an early split can emit characters where decode() gives U+FFFD)."""
    byte_ids = [i for t, i in demo_tokenizer.backend_tokenizer.get_vocab().items() if len(t) == 1]
    lone_continuation = next(i for i in sorted(byte_ids) if demo_tokenizer.decode([i]) == REPLACEMENT_CHAR)
    detok = IncrementalDetokenizer(demo_tokenizer, hold_limit=hold_limit)
    deltas = [detok.step([lone_continuation]) for _ in range(hold_limit + 4)]
    assert deltas[:hold_limit] == [""] * hold_limit and deltas[hold_limit], deltas
    assert "".join(deltas) + detok.flush() == demo_tokenizer.decode([lone_continuation] * (hold_limit + 4))
