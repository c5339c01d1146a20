"""The incremental detokenizer fuzzed across tokenizer kinds, each built here (no downloads): byte-level BPE (GPT-2,
Qwen), SentencePiece-style BPE with byte-fallback <0x..> tokens under three decoders (Llama's Strip, Gemma's none,
Metaspace), Unigram with byte fallback (space clean-up on and off), and WordPiece (BERT, clean-up on and off); each
with special added tokens and plain ones (normalized or not).

Token ids come from random multilingual text (CJK, emoji with ZWJ and modifiers, combining marks: characters split
across byte tokens), with special tokens inserted, and as arbitrary ids; they are fed in random steps. The checks:
the deltas joined equal decode() of all the ids (for decoders that clean up spaces, up to the spaces, as documented);
whenever nothing is held back, the text so far is decode() of the ids so far (so no delta shows a U+FFFD that the
full decode lacks, and nothing emitted is ever taken back); stop strings cut the full text where the first one
ends; an output continuing a prompt adds to the prompt's text exactly what the whole decode adds."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenizer_service.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tokenizer_service.text_stream import TextStream, decoder_of, special_ids_of

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The lighthouse keeper woke before the gulls, and climbed the spiral stairs.",
    "Question: What is the capital of France? Answer: The capital of France is Paris.",
    'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n',
    "中文 今天天气很好 日本語 こんにちは 안녕하세요 café naïve Ελληνικά",
    "I don't know, isn't it? Say 'hi' (twice) -- ok; yes! no... [x] {y}",
] * 3
FRAGMENTS = [
    "the", " the", " sea", "Hello", " world", ",", ".", "\n", "  ", "\t", "42", " 3.14", " don't", " '", "'", "?",
    "(x)", "中文", "今天天气很好。", "日本語", "こんにちは", "안녕하세요", "😀", "👍🏿", "👨\u200d👩\u200d👧", "🇫🇷", "café",
    "e\u0301", "naïve", "Ελληνικά", "Русский", "हिन्दी", "𝔘𝔫𝔦", "∑ℵ", "<think>", "</think>", " tool", "★",
] + SPECIAL
# Decoders that clean up spaces: their stream keeps (or, next to a quote, drops) spaces the full decode does not.
CLEANS_UP = {"unigram-cleanup", "wordpiece-cleanup"}
BYTE_FALLBACK = {"sentencepiece-strip", "sentencepiece-nostrip", "sentencepiece-metaspace", "unigram", "unigram-cleanup"}


def _add_tokens(tok: Tokenizer) -> None:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=True),
                    AddedToken(" tool", special=False, normalized=False),
                    AddedToken("★", special=False, normalized=True)])


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _add_tokens(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def _byte_tokens(first_id: int) -> dict[str, int]:
    return {f"<0x{b:02X}>": first_id + b for b in range(256)}


def _sentencepiece(decoder: str) -> PreTrainedTokenizerFast:
    """BPE over "▁"-marked words (BPE training is deterministic), characters it lacks as byte tokens."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                            show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **_byte_tokens(3)}
    for piece in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = {
        "strip": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)]),  # Llama 2, Mistral
        "nostrip": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),  # Gemma
        "metaspace": decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]),
    }[decoder]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    _add_tokens(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _pieces() -> list[str]:
    """Hand-picked word pieces (Unigram and WordPiece training are not deterministic)."""
    return ["the", "sea", "hello", "world", "don", "know", "tool", "café", "na", "ve", "ï", "中", "文", "日", "本", "語",
            "Ε", "λ", "η", "ν", "ι", "κ", "ά", *"abcdefghijklmnopqrstuvwxyzHTW0123456789.,'?!()-:;\"[]{}"]


def _unigram(clean_up: bool) -> PreTrainedTokenizerFast:
    pieces = _pieces()
    vocab = [("<unk>", 0.0), ("</s>", 0.0), *((t, 0.0) for t in _byte_tokens(0)), ("▁", -2.0)]
    vocab += [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)] + [("▁" + p, -1.5) for p in pieces if len(p) > 1]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "</s>")])
    _add_tokens(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=clean_up)


def _wordpiece(clean_up: bool) -> PreTrainedTokenizerFast:
    pieces = _pieces()
    vocab = ["[UNK]", "[CLS]", "[SEP]", *pieces, *("##" + p for p in pieces if p.isalnum())]
    tok = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=clean_up)
    _add_tokens(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=clean_up)


BUILDERS = {
    "byte-level": _byte_level,
    "sentencepiece-strip": lambda: _sentencepiece("strip"),
    "sentencepiece-nostrip": lambda: _sentencepiece("nostrip"),
    "sentencepiece-metaspace": lambda: _sentencepiece("metaspace"),
    "unigram": lambda: _unigram(False),
    "unigram-cleanup": lambda: _unigram(True),
    "wordpiece": lambda: _wordpiece(False),
    "wordpiece-cleanup": lambda: _wordpiece(True),
}
_BUILT: dict[str, PreTrainedTokenizerFast] = {}


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    if kind not in _BUILT:
        _BUILT[kind] = BUILDERS[kind]()
    return _BUILT[kind]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))


def _ids(tokenizer, rng: random.Random, trial: int, skip: bool) -> list[int]:
    """Encoded text; every other time with special tokens inserted: anywhere when they are skipped (inside a
    multi-token character included), else between whole characters (inside one, a kept special token makes its
    bytes invalid)."""
    ids = tokenizer.encode(_text(rng), add_special_tokens=False)
    if trial % 2:
        specials = sorted(special_ids_of(tokenizer))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(ids))
            if skip or not tokenizer.decode(ids[:at]).endswith(REPLACEMENT_CHAR):
                ids.insert(at, rng.choice(specials))
    return ids


def _detokenizer(tokenizer, skip: bool, **kwargs) -> IncrementalDetokenizer:
    """As the service builds it (tokenizer_service.text_stream.TextStream)."""
    return IncrementalDetokenizer(decoder_of(tokenizer), skip_special_tokens=skip,
                                  special_ids=special_ids_of(tokenizer), **kwargs)


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    """Engine updates of random sizes: one id, a few (speculative decoding), many (a slow reader's, joined)."""
    out, i, most = [], 0, rng.choice([1, 3, 6, 40])
    while i < len(ids):
        k = rng.randint(1, most)
        out.append(ids[i : i + k])
        i += k
    return out


def _no_spaces(text: str) -> str:
    return "".join(text.split())


def _matches_but_for_replacements(got: str, want: str) -> bool:
    """got is want except where want has U+FFFDs: the documented divergence under byte fallback when the ids hold
    invalid bytes (a decode of the whole text turns a character already streamed into U+FFFDs). Every other piece of
    want must be in got, in order: no character lost, repeated or shown as U+FFFD."""
    parts = re.findall(f"{REPLACEMENT_CHAR}+|[^{REPLACEMENT_CHAR}]+", want)
    pattern = "".join(".*?" if p[0] == REPLACEMENT_CHAR else re.escape(p) for p in parts)
    return re.fullmatch(pattern, got, re.DOTALL) is not None


@pytest.mark.parametrize("hold_limit", [4, 16])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_text_streams_as_the_full_decode(kind: str, hold_limit: int) -> None:
    """hold_limit 4 and 5 garbled valid byte-fallback text: a run of byte tokens (👨 ZWJ 👩) held no whole-character
    boundary among the split points searched, so a cut inside a character was taken ('👨\ufffd\ufffd...')."""
    tokenizer = _tokenizer(kind)
    rng = random.Random(f"{kind}-{hold_limit}")
    for trial in range(40):
        skip = rng.random() < 0.5
        ids = _ids(tokenizer, rng, trial, skip)
        detok = _detokenizer(tokenizer, skip, hold_limit=hold_limit, context_tokens=rng.choice([1, 4]))
        streamed, fed = "", []
        for chunk in _chunks(ids, rng):
            streamed += detok.step(chunk)
            fed += chunk
            if not detok.held_text() and kind not in CLEANS_UP:
                # Nothing held back: what was streamed is the decode of what was fed, so far.
                assert streamed == tokenizer.decode(fed, skip_special_tokens=skip), (kind, fed, skip)
        streamed += detok.flush()
        want = tokenizer.decode(ids, skip_special_tokens=skip)
        if kind in CLEANS_UP:
            assert _no_spaces(streamed) == _no_spaces(want), (kind, ids, skip, streamed, want)
        else:
            assert streamed == want, (kind, ids, skip, hold_limit)


def test_a_byte_fallback_zwj_sequence_under_a_low_hold_limit_is_not_garbled() -> None:
    tokenizer = _tokenizer("sentencepiece-strip")
    ids = tokenizer.encode("👨\u200d👩\u200d👧 ok", add_special_tokens=False)
    assert REPLACEMENT_CHAR in tokenizer.decode(ids[:6])  # the family comes as byte tokens
    for hold_limit in (4, 5):
        detok = _detokenizer(tokenizer, True, hold_limit=hold_limit)
        deltas = [detok.step(ids[i : i + 5]) for i in range(0, len(ids), 5)] + [detok.flush()]
        assert "".join(deltas) == tokenizer.decode(ids) == "👨\u200d👩\u200d👧 ok", (hold_limit, deltas)


@pytest.mark.parametrize("hold_limit", [4, 16])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_arbitrary_ids_stream_as_the_full_decode(kind: str, hold_limit: int) -> None:
    """Any ids a model may produce: lone continuation bytes, truncated characters, specials anywhere. Only byte
    fallback (a run of byte tokens with an invalid byte decodes as U+FFFDs whole) and space clean-up may differ, as
    documented."""
    tokenizer = _tokenizer(kind)
    rng = random.Random(f"{kind}-{hold_limit}")
    for _ in range(40):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 40))]
        skip = rng.random() < 0.5
        detok = _detokenizer(tokenizer, skip, hold_limit=hold_limit)
        streamed = "".join(detok.step(chunk) for chunk in _chunks(ids, rng)) + detok.flush()
        want = tokenizer.decode(ids, skip_special_tokens=skip)
        if kind in CLEANS_UP:
            streamed, want = _no_spaces(streamed), _no_spaces(want)
        if kind in BYTE_FALLBACK:
            assert _matches_but_for_replacements(streamed, want), (kind, ids, skip, streamed, want)
        else:
            assert streamed == want, (kind, ids, skip, streamed, want)


@pytest.mark.parametrize("step", [3, 4])
def test_text_after_a_run_of_byte_tokens_that_became_valid_is_kept(step: int) -> None:
    """Invalid bytes, then valid characters as byte tokens, then plain text, under byte fallback. No head of the run
    ends in a whole character (the invalid byte garbles them all), so a forced split cut inside a character, and
    the context's text (U+FFFDs, one per byte) later decoded as fewer, valid characters: the delta was cut at the
    context's length in characters, which dropped the text after the run ('ab' streamed as 'b', or not at all)."""
    tokenizer = _tokenizer("sentencepiece-strip")

    def byte_ids(data: bytes) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]

    ids = (byte_ids(b"\xa8" + "안녕하세요".encode() + b"\xf0" + "😀中😀日本語".encode())
           + tokenizer.encode("ab", add_special_tokens=False)[-2:])
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["a", "b"]
    for lead in ([], tokenizer.encode(" ", add_special_tokens=False)):
        detok = _detokenizer(tokenizer, True)
        full = lead + ids
        streamed = "".join(detok.step(full[i : i + step]) for i in range(0, len(full), step)) + detok.flush()
        want = tokenizer.decode(full)
        assert want.endswith(REPLACEMENT_CHAR + "ab")
        assert _matches_but_for_replacements(streamed, want), (step, lead, streamed, want)


def _first_stop(text: str, stops: list[str], floor: int) -> tuple[int, str] | None:
    """Where the stop string that ends first ends (the longer at a tie), among those ending past `floor`."""
    for end in range(floor + 1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            return end, max(hits, key=len)
    return None


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_stop_strings_cut_the_full_text_at_the_first_one(kind: str) -> None:
    """The stream ends before the first stop string to end (or after it, include_stop_str_in_output); with
    min_tokens, one may end only past the characters the first min_tokens tokens complete."""
    tokenizer = _tokenizer(kind)
    rng = random.Random(kind)
    for trial in range(60):
        skip = rng.random() < 0.5
        ids = _ids(tokenizer, rng, trial, skip)
        chunks = _chunks(ids, rng)
        if kind in CLEANS_UP:  # stop strings match the streamed text, which keeps spaces (documented); with stop
            plain = _detokenizer(tokenizer, skip)  # strings, the stream reads its ids one at a time
            full = "".join(plain.step([i]) for i in ids) + plain.flush()
        else:
            full = tokenizer.decode(ids, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:  # a piece of the text: across tokens, inside runs of byte tokens
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(FRAGMENTS))
        include = rng.random() < 0.5
        min_tokens = 0 if kind in CLEANS_UP else rng.choice([0, 0, 1, 3, 7])
        # The characters the first min_tokens tokens complete (decode() of fewer ids ends in whole characters).
        floor = max(len(os.path.commonprefix([tokenizer.decode(ids[:j], skip_special_tokens=skip)
                                              .rstrip(REPLACEMENT_CHAR), full]))
                    for j in range(min(min_tokens, len(ids)) + 1))
        stream = TextStream(tokenizer, tuple(stops), skip, include, min_tokens)
        streamed = ""
        for chunk in chunks:
            streamed += stream.feed(chunk)
            if stream.stopped is not None:
                break
        streamed += stream.finish()
        hit = _first_stop(full, stops, floor)
        want = full if hit is None else full[: hit[0]] if include else full[: hit[0] - len(hit[1])]
        assert (streamed, stream.stopped) == (want, hit and hit[1]), (kind, ids, skip, stops, include, min_tokens)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_output_continuing_a_prompt_adds_what_the_whole_decode_adds(kind: str) -> None:
    """prompt_tail, as the service takes it from the prompt: the reply's text is decode(prompt + reply) less
    decode(prompt), wherever the prompt ends on a whole character (its first delta included: a SentencePiece
    reply's first '▁word' keeps its space), a prompt ending in a run of special tokens too (the prompt's last 8 ids
    were all of them, and with them skipped no context was left: "thelighthouse")."""
    from tokenizer_service.validation import _prompt_tail

    tokenizer = _tokenizer(kind)
    specials = sorted(special_ids_of(tokenizer))
    rng = random.Random(kind)
    checked = 0
    for trial in range(60):
        skip = rng.random() < 0.5
        ids = _ids(tokenizer, rng, trial, skip)
        if len(ids) < 2:
            continue
        cut = rng.randint(1, len(ids) - 1)
        prompt, reply = ids[:cut], ids[cut:]
        if trial % 3 == 0:  # a reply prefix ending in special tokens, more of them than the tail holds
            prompt += [rng.choice(specials) for _ in range(rng.randint(8, 12))]
            ids = prompt + reply
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
        if prompt_text.endswith(REPLACEMENT_CHAR):
            continue  # a prompt ending inside a character: not one a chat renders
        detok = _detokenizer(tokenizer, skip, prompt_tail=_prompt_tail(prompt, tokenizer, skip))
        deltas = [detok.step(chunk) for chunk in _chunks(reply, rng)] + [detok.flush()]
        got, want = prompt_text + "".join(deltas), tokenizer.decode(ids, skip_special_tokens=skip)
        if kind in CLEANS_UP:
            got, want = _no_spaces(got), _no_spaces(want)
        assert got == want, (kind, prompt, reply, skip, deltas)
        checked += 1
    assert checked > 30
