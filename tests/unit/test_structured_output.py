"""JSON mode's token masks (engine_service/structured_output.py): each equals a token-by-token walk of the
automaton, cached masks included, and a byte-level tokenizer's tokens map to their exact bytes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service import json_grammar as jg
from engine_service.json_schema import compile_schema
from engine_service.structured_output import JsonCursor, JsonMasks, mask_bytes, token_bytes


def _vocabulary(seed: int) -> list[bytes | None]:
    """Every single byte, JSON-shaped pieces, words with and without a leading space, partial UTF-8, whitespace
    runs, and holes (None: ids never allowed), shuffled."""
    rng = random.Random(seed)
    pieces = {bytes((b,)) for b in range(256)}
    punct = ['{', '}', '[', ']', '"', ':', ',', '\\', '-', '.', 'e', '0', '1', ' ', '\n', 'u', 'true', 'null']
    words = ["name", "value", "true", "fals", "null", "id", "a", "é", "世界", "x1"]
    while len(pieces) < 3000:
        kind = rng.randrange(5)
        if kind == 0:
            piece = "".join(rng.choice(punct) for _ in range(rng.randint(2, 5))).encode()
        elif kind == 1:
            piece = (rng.choice(["", " ", '"', '":', '":"', '","']) + rng.choice(words)).encode()
        elif kind == 2:
            piece = rng.choice(words).encode("utf-8")[: rng.randint(1, 4)]  # may cut a character
        elif kind == 3:
            piece = ("\n" + " " * rng.randint(0, 40)).encode()
        else:
            piece = str(rng.randint(0, 10**6)).encode()
        pieces.add(piece)
    vocab: list[bytes | None] = sorted(pieces)
    rng.shuffle(vocab)
    return vocab + [None] * 7


def _brute_force(vocab: list[bytes | None], state: jg.State) -> torch.Tensor:
    return torch.tensor([b is not None and jg.walk(state, b) is not None for b in vocab])


def _states(rng: random.Random, count: int) -> list[jg.State]:
    """States along random documents, and deep in nested ones (near MAX_DEPTH, where depth changes masks)."""
    out = []
    while len(out) < count:
        doc = json.dumps({"k": [{"a": "é\\\"x", "b": [1.5e3, -0, None, True]}], "z": {"": "世"}},
                         indent=rng.choice([None, 2])).encode()
        deep = b'{"a":' + b"[" * rng.randint(jg.MAX_DEPTH - 6, jg.MAX_DEPTH - 2) + b'{"b":"\xc3'
        data = rng.choice([doc, deep])
        out.append(jg.walk(jg.INITIAL, data[: rng.randrange(len(data))]))
    return out


def test_every_mask_equals_a_walk_of_each_token():
    vocab = _vocabulary(0)
    masks = JsonMasks(vocab)
    rng = random.Random(1)
    kinds = set()
    for state in _states(rng, 300):
        mask = masks.allowed(state)
        expected = _brute_force(vocab, state)
        assert torch.equal(mask.dense(len(vocab)), expected) and mask.count == int(expected.sum()), jg.describe(state)
        kinds.add(mask.allowed)
    assert masks.hits > 50 and masks.misses > 20  # cached masks were checked too
    assert kinds == {True, False}  # masks listing allowed ids (outside strings) and banned ids (inside them)


def test_the_sampler_keeps_only_allowed_tokens_in_the_rows_that_ask():
    from engine_service.sampler import Sampler, SamplingRow
    from engine_service.sampling_params import SamplingParams

    vocab = _vocabulary(5)
    masks = JsonMasks(vocab)
    in_string, in_literal = masks.allowed(jg.walk(jg.INITIAL, b'{"a')), masks.allowed(jg.walk(jg.INITIAL, b'{"a":tr'))
    assert not in_string.allowed and in_literal.allowed
    logits = torch.randn(4, len(vocab), dtype=torch.float64)
    before = logits.clone()
    greedy = SamplingParams(temperature=0.0)
    rows = [SamplingRow(greedy, None, allowed=in_string), SamplingRow(greedy, None),
            SamplingRow(greedy, None, allowed=in_literal), SamplingRow(greedy, None, allowed=in_string)]
    tokens = Sampler(torch.device("cpu"), 0).sample(logits, rows)[0].tolist()
    for row, mask in ((0, in_string), (2, in_literal), (3, in_string)):
        keep = mask.dense(len(vocab))
        assert torch.equal(logits[row][keep], before[row][keep]) and bool((logits[row][~keep] == -torch.inf).all())
        assert tokens[row] == int(before[row].masked_fill(~keep, -torch.inf).argmax())
    assert torch.equal(logits[1], before[1]) and tokens[1] == int(before[1].argmax())


def test_states_sharing_a_cache_key_allow_the_same_tokens():
    vocab = _vocabulary(2)
    masks = JsonMasks(vocab)
    prefixes = [b'{"a":[[{"b":[', b'{"c":{"d":{"e":[[{"b":[', b'{"x":[{"y":[[{"b":[']
    for tail in (b"1", b"1 ", b'"s', b"tr", b"[", b"{"):
        states = [jg.walk(jg.INITIAL, p + tail) for p in prefixes]
        for state in states:
            assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state)), jg.describe(state)


def test_the_cache_key_keeps_the_container_a_token_reaches_after_its_closers():
    # "]],1" closes two arrays, then its "," starts an array's value (1 may follow) or an object's key (it may not).
    vocab: list[bytes | None] = [bytes((b,)) for b in range(256)] + [b"]],1", b"]]"]
    masks = JsonMasks(vocab)
    for prefix in (b'{"a":[[[true', b'{"a":{"b":[[true', b'{"a":[[[[true', b'{"c":{"a":{"b":[[true'):
        state = jg.walk(jg.INITIAL, prefix)
        expected = _brute_force(vocab, state)
        assert torch.equal(masks.allowed(state).dense(len(vocab)), expected), prefix
        assert bool(expected[256]) == (prefix.count(b"[") > 2)


def test_a_token_that_closes_a_string_and_opens_another_is_judged_where_it_is():
    # '","":"' ends inside a string, as it began, but only a value's string in an object may take it.
    vocab: list[bytes | None] = [bytes((b,)) for b in range(256)] + [b'","":"', b'x"']
    masks = JsonMasks(vocab)
    for prefix, ok in ((b'{"a":"x', True), (b'{"ke', False), (b'{"a":["x', False), (b'{"a":{"b":"', True)):
        state = jg.walk(jg.INITIAL, prefix)
        mask = masks.allowed(state).dense(len(vocab))
        assert torch.equal(mask, _brute_force(vocab, state)) and bool(mask[256]) is ok, prefix


def test_a_cursor_writes_only_json_objects():
    vocab = _vocabulary(3)
    masks = JsonMasks(vocab)
    rng = random.Random(4)
    finished = 0
    for _ in range(40):
        cursor, out = JsonCursor(masks), b""
        for _ in range(300):
            allowed = masks.allowed(cursor.state).dense(len(vocab)).nonzero().flatten().tolist()
            assert allowed, jg.describe(cursor.state)
            token = rng.choice(allowed)
            assert cursor.advance(token)
            out += vocab[token]
            if cursor.done:
                break
        if cursor.done:
            finished += 1
            assert isinstance(json.loads(out), dict)
            assert not cursor.advance(vocab.index(b"{")) and cursor.done  # refused: the state stays
    assert finished >= 5
    assert not JsonCursor(masks).advance(len(vocab) - 1)  # an id with no bytes


def test_a_token_id_outside_the_vocabulary_is_refused_and_the_state_kept():
    """advance() is the engine's last check of a sampled token. A negative id read token_bytes[-1], the last token's
    bytes, and was taken as that token."""
    vocab: list[bytes | None] = [b"}", b'"a"', b":", b"1", b"{"]  # the last token, "{", may start the object
    cursor = JsonCursor(JsonMasks(vocab))
    assert jg.step(cursor.state, vocab[-1][0]) is not None
    before = cursor.state
    for token in (-1, -len(vocab), len(vocab)):
        assert cursor.advance(token) is False
        assert cursor.state == before
    assert cursor.advance(len(vocab) - 1)


def test_a_schemas_masks_go_with_its_last_holder_and_the_cache_keeps_working(monkeypatch):
    """release() by a root's last holder drops the masks filed under it: their bytes leave cache_bytes. Left in the
    cache, they outlived their root, and the cache's eviction of one of them later failed (a KeyError)."""
    import engine_service.structured_output as so

    vocab: list[bytes | None] = [b"{", b"}", b'"a"', b":", b"1", b"2", b",", b" ", b'"', b"x", b"[", b"]"]
    masks = JsonMasks(vocab)
    free = mask_bytes(masks.allowed(jg.INITIAL))  # JSON mode's object: filed under no root
    root = compile_schema(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    masks.hold(root)  # the schema cache
    masks.hold(root)  # a live request
    filed = sum(mask_bytes(masks.allowed(jg.walk(jg.initial(root), doc), root))
                for doc in (b"", b"{", b'{"a"', b'{"a":', b'{"a":1'))
    assert masks.cache_bytes == free + filed
    masks.release(root)
    assert masks.cache_bytes == free + filed  # the other holder keeps them
    masks.release(root)
    assert masks.cache_bytes == free
    monkeypatch.setattr(so, "MASK_CACHE_BYTES", 2 * free)
    other = compile_schema(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    masks.hold(other)
    for doc in (b"", b"{", b'{"a"', b'{"a":', b'{"a":"', b'{"a":"x'):
        masks.allowed(jg.walk(jg.initial(other), doc), other)
        assert masks.cache_bytes <= so.MASK_CACHE_BYTES


def _whole_characters(vocab: list[bytes | None]) -> list[tuple[int, str]]:
    """(id, text) of the tokens whose bytes are whole UTF-8 characters; a token holding part of a character is
    checked through a whole one by the callers."""
    out = []
    for i, data in enumerate(vocab):
        try:
            out.append((i, data.decode("utf-8")))
        except (AttributeError, UnicodeDecodeError):  # None: no bytes
            pass
    return out


def test_token_bytes_of_a_byte_level_tokenizer(demo_tokenizer):
    vocab = token_bytes(demo_tokenizer, len(demo_tokenizer) + 5)
    special = set(demo_tokenizer.added_tokens_decoder)
    assert special and all(vocab[i] is None for i in special)
    assert vocab[-5:] == [None] * 5  # ids past the tokenizer's (a padded vocabulary)
    checked = _whole_characters(vocab)
    for i, text in checked:
        assert demo_tokenizer.decode([i]) == text, i
    assert len(checked) > 1000
    ids = demo_tokenizer.encode("é世界 {\"k\": 1}", add_special_tokens=False)
    assert b"".join(vocab[i] for i in ids) == "é世界 {\"k\": 1}".encode()


def _tokens_bytes_match_decoding(tokenizer, vocab: list[bytes | None]) -> int:
    """Every token's bytes, decoded after a word, add exactly their text to the word's decoding (the tokenizer's own
    decode, without clean-up); a character made of byte tokens joins from its bytes. Returns how many were checked."""
    backend = tokenizer.backend_tokenizer
    anchor = tokenizer.convert_tokens_to_ids("▁the")
    head = backend.decode([anchor], skip_special_tokens=False)
    checked = _whole_characters(vocab)
    for i, text in checked:
        assert backend.decode([anchor, i], skip_special_tokens=False) == head + text, (i, text)
    text = 'Жёлтый {"k": "ß🦀"}'  # characters the corpus lacks: byte tokens
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    assert b"".join(vocab[i] for i in ids) == (" " + text).encode()  # the first word's "▁" is a space mid-text
    return len(checked)


def test_sentencepiece_tokens_have_their_decoded_bytes():
    from tests.integration.tiny import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    vocab = token_bytes(tokenizer, len(tokenizer) + 3)
    assert vocab[:3] == [None] * 3 and vocab[-3:] == [None] * 3  # <unk> <s> </s>, and a padded vocabulary
    assert [vocab[3 + b] for b in (0x0A, 0x7B, 0xE4)] == [b"\n", b"{", b"\xe4"]  # <0x0A> <0x7B> <0xE4>
    assert vocab[tokenizer.convert_tokens_to_ids("▁the")] == b" the"
    assert _tokens_bytes_match_decoding(tokenizer, vocab) > 300


def test_metaspace_decoder_tokens_have_their_decoded_bytes():
    from tokenizers import decoders

    from tests.integration.tiny import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    vocab = token_bytes(tokenizer, len(tokenizer))
    assert vocab[3 + 0x0A] == b"<0x0A>"  # without ByteFallback a byte token decodes as its name
    backend = tokenizer.backend_tokenizer
    anchor = tokenizer.convert_tokens_to_ids("▁the")
    for i, data in enumerate(vocab):
        if data is not None:
            assert backend.decode([anchor, i]) == backend.decode([anchor]) + data.decode(), i


def test_other_tokenizers_are_refused_by_name():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="tokens' bytes are known: byte-level BPE .* has a WordPiece decoder"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=backend), 2)
    # A Strip before Fuse would strip every token, not the text: not a layout whose bytes are known.
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0), decoders.Fuse()])
    with pytest.raises(ValueError, match="has a Strip step before Fuse"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=backend), 2)


def test_the_cache_keeps_to_its_byte_budget(monkeypatch):
    import engine_service.structured_output as so

    monkeypatch.setattr(so, "MASK_CACHE_BYTES", 4000)
    monkeypatch.setattr(so, "MASK_BLOCK_BYTES", 64)
    vocab = _vocabulary(11)
    masks = JsonMasks(vocab)
    for state in _states(random.Random(12), 120):
        assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state))
        # Each mask in whole 64-byte blocks, one at least: a mask of few ids takes a block of device memory.
        sizes = [max(1, -(-m.ids.numel() * 4 // 64)) * 64 for m in masks._cache.values()]
        assert masks.cache_bytes == sum(sizes) and (masks.cache_bytes <= 4000 or len(sizes) == 1)
    assert masks.misses > len(masks._cache)  # some were evicted and computed again
    assert so.mask_bytes(masks.allowed(_states(random.Random(12), 1)[0])) % 64 == 0


def test_deep_string_shortcut_over_many_tokens_under_one_prefix():
    # After '\u00' or a backslash the walk reaches plain string deeper in the trie, where the tokens under one prefix
    # are taken from their stay bitmaps (with numpy past SMALL_RANGE of them): escapes must pair up from there.
    from engine_service.structured_output import SMALL_RANGE

    rng = random.Random(13)
    tails = [b"", b"x", b'"', b"\\", b"\\\\", b'\\"', b"\\u", b"\xc3", b"\xc3\xa9", b"\n", b"ab\\n", b'a"b']
    vocab: list[bytes | None] = [bytes((b,)) for b in range(256)]
    for head in (b"n", b"00e", b"\\n", b"\\\\"):
        for _ in range(3 * SMALL_RANGE):
            vocab.append(head + b"".join(rng.choice(tails) for _ in range(rng.randint(1, 3))))
    vocab = list(dict.fromkeys(vocab))
    masks = JsonMasks(vocab)
    for prefix in (b'{"a":"\\', b'{"a":"\\u', b'{"a":"x', b'{"\\', b'{"a":"\\\\'):
        state = jg.walk(jg.INITIAL, prefix)
        assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state)), prefix


def test_number_states_take_digit_runs_at_once_and_equal_a_walk_of_each_token():
    """Among a number's digits, tokens whose rest is all digits are taken without a walk (a code-trained 128k
    vocabulary has thousands: value, number and array-start misses took 26-28 ms, now 2-4). The masks must still
    equal a walk of each token, for the integer part, fraction and exponent, of numbers and schema integers."""
    from engine_service.json_schema import compile_schema

    rng = random.Random(11)
    vocab = _vocabulary(5)
    digits = "0123456789"
    extra = {"".join(rng.choice(digits) for _ in range(rng.randint(1, 70))) for _ in range(400)}  # past 63 bytes
    extra |= {d + tail for d in ("1", "12", "7", "00", "3") for tail in (",", "}", "]", ".5", "e3", " ", "x", "\n1")}
    vocab = vocab + sorted(extra - {b.decode("latin-1") for b in vocab if b}, key=len)
    vocab = [v.encode() if isinstance(v, str) else v for v in vocab]
    masks = JsonMasks(vocab)
    number = compile_schema(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    prefixes = [(jg.INITIAL, b'{"a":1'), (jg.INITIAL, b'{"a":[-12'), (jg.INITIAL, b'{"a":3.1'),
                (jg.INITIAL, b'{"a":3e1'), (jg.INITIAL, b'{"a":3E+12'), (jg.INITIAL, b'{"a":0'),
                (jg.INITIAL, b'{"a":-'), (jg.INITIAL, b'{"a":'), (jg.initial(number), b'{"n":4'),
                (jg.initial(number), b'{"n":')]
    for start, data in prefixes:
        state = jg.walk(start, data)
        assert state is not None, data
        want = _brute_force(vocab, state)
        assert torch.equal(masks.allowed(state).dense(len(vocab)), want), data


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's bytes_to_unicode (openai/gpt-2, encoder.py), from its definition: the printable bytes "!" to "~",
    "¡" to "¬" and "®" to "ÿ" stand for themselves (the soft hyphen, 0xAD, is not among them); every other byte, in
    increasing order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def test_the_byte_level_map_is_gpt2s_inverted(demo_tokenizer):
    """A byte-level token's text maps back to its bytes through the exact inverse of bytes_to_unicode. With 0xAD
    counted as printable, the map lost "Ń" (U+0143, byte 0xAD): tokens holding that byte ("í" is C3 AD) had no bytes
    and were never allowed, and the demo tokenizer's own byte token among them."""
    from engine_service.structured_output import _byte_decoder

    to_text = _gpt2_bytes_to_unicode()
    assert sorted(to_text) == list(range(256)) and len(set(to_text.values())) == 256
    assert _byte_decoder() == {c: b for b, c in to_text.items()}
    vocab = token_bytes(demo_tokenizer, len(demo_tokenizer))
    special = set(demo_tokenizer.added_tokens_decoder)
    assert [i for i, data in enumerate(vocab) if data is None and i not in special] == []
    assert vocab[demo_tokenizer.convert_tokens_to_ids(to_text[0xAD])] == b"\xad"


def _walk_cursor(cursor: JsonCursor, rng: random.Random, steps: int) -> list[int]:
    """Draw `steps` allowed tokens (or until the document closes); the tokens taken."""
    taken = []
    for _ in range(steps):
        if cursor.done:
            break
        token = rng.choice(cursor.allowed().dense(cursor.masks.vocab_size).nonzero().flatten().tolist())
        assert cursor.advance(token)
        taken.append(token)
    return taken


def test_a_cursor_counts_the_time_of_its_misses_and_stops_at_its_budget():
    from engine_service.structured_output import MaskBudgetError

    vocab = _vocabulary(5)
    masks = JsonMasks(vocab)
    free = JsonCursor(masks)  # budget 0: no bound
    tokens = _walk_cursor(free, random.Random(6), 60)
    assert masks.misses > 5 and free.spent_s == pytest.approx(masks.compute_s, rel=1e-9, abs=0)
    # The same path again hits the cache at every state: nothing spent, so the smallest budget holds.
    again = JsonCursor(masks, budget_s=1e-12)
    for token in tokens:
        again.allowed()
        assert again.advance(token)
    assert again.spent_s == 0.0
    # A new shape misses: past the budget, allowed() names it, and keeps naming it.
    shaped = JsonCursor(masks, jg.FREE_OBJECT, budget_s=1e-12)
    shaped.state = jg.walk(jg.INITIAL, b'{"unseen": [[[{"deep": "')
    for _ in range(2):
        with pytest.raises(MaskBudgetError, match=r"took [\d.e+-]+ s .* past json_mask_budget_s=1e-12 "
                                                  r"\(the engine's --json-mask-budget-s\)"):
            shaped.allowed()
    assert shaped.spent_s > 1e-12


def test_the_bench_reports_what_one_documents_misses_cost(demo_model_dir, tmp_path, monkeypatch, capsys):
    """scripts/json_mode_bench's --short-values run gives the per-document figures docs/ENGINE.md quotes for
    json_mask_budget_s: the first document pays for its schema's masks, a later one finds them cached."""
    import re
    import sys

    from scripts import json_mode_bench

    schema = tmp_path / "schema.json"
    props = {f"key{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(12)}
    schema.write_text(json.dumps({"type": "object", "properties": props, "required": list(props)}))
    monkeypatch.setattr(sys, "argv", ["json_mode_bench", "--model", str(demo_model_dir), "--schema", str(schema),
                                      "--short-values", "--documents", "3", "--max-tokens", "4000", "--rows", "2"])
    json_mode_bench.main()
    out = capsys.readouterr().out
    closed = re.search(r"3 documents \((\d) closed\)", out)
    first, others = map(float, re.search(r"the first ([\d.]+) s, the others ([\d.]+) s at most", out).groups())
    assert closed and int(closed.group(1)) == 3, out
    assert first > others >= 0.0, out


def test_a_miss_that_computes_its_whitespace_runs_start_is_counted_once():
    """A state one byte into a whitespace run takes its mask from the run's start, fetched (and computed, when
    new) inside the outer fetch; the inner time was counted on its own and again inside the outer, so a request
    was charged more of its json_mask_budget_s than the engine spent (and the metric said as much)."""
    import time

    vocab = _vocabulary(7) + [b"{\n"]
    masks = JsonMasks(vocab)
    cursor = JsonCursor(masks, budget_s=1e9)
    cursor.allowed()
    assert cursor.advance(len(vocab) - 1)  # after "{", one byte into a run of whitespace
    spent, computed, misses = cursor.spent_s, masks.compute_s, masks.misses
    t0 = time.perf_counter()
    cursor.allowed()  # misses, and so does the run's start (never looked up)
    wall = time.perf_counter() - t0
    assert masks.misses == misses + 1
    assert 0 < cursor.spent_s - spent <= wall and masks.compute_s - computed == cursor.spent_s - spent
