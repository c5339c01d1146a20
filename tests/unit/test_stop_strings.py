"""Stop strings: held back while they may still match, found across delta boundaries, cut or kept."""

from __future__ import annotations

import random

import pytest

from tokenizer_service.stop_strings import StopMatch, StopStringMatcher


def _run(stops: list[str], deltas: list[str], include: bool = False) -> tuple[list[str], StopStringMatcher]:
    m = StopStringMatcher(stops, include_stop_str_in_output=include)
    out = []
    for d in deltas:
        out.append(m.feed(d))
        if m.match is not None:
            break
    else:
        out.append(m.flush())
    return out, m


def test_stop_string_spanning_deltas_is_held_back_then_cut() -> None:
    m = StopStringMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.held == "E"
    assert m.feed("N") == ""
    assert m.match is None
    assert m.feed("D and more") == ""
    assert m.match == StopMatch(stop="END", offset=6)
    assert m.feed("ignored") == ""
    assert m.flush() == ""


def test_include_stop_str_in_output_keeps_the_stop_string_only() -> None:
    out, m = _run(["END"], ["hello E", "N", "D and more"], include=True)
    assert "".join(out) == "hello END"
    assert m.match is not None and m.match.stop == "END"


def test_false_start_is_released_once_it_cannot_match() -> None:
    m = StopStringMatcher(["END"])
    assert m.feed("a E") == "a "
    assert m.feed("N") == ""
    assert m.feed("X") == "ENX"
    assert m.match is None
    assert m.feed("EN") == ""
    assert m.flush() == "EN"


def test_no_stop_strings_passes_text_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == "abc"
    assert m.flush() == ""


def test_first_completed_match_wins_and_longer_wins_a_tie() -> None:
    # "bc" completes (at 3) before "abcd" (at 4), whatever the chunking.
    assert "".join(_run(["abcd", "bc"], ["abcd"])[0]) == "a"
    out, m = _run(["cd", "bcd"], ["abcdef"])
    assert "".join(out) == "a" and m.match == StopMatch("bcd", 1)


def test_multibyte_and_emoji_stop_strings() -> None:
    out, m = _run(["🛑", "結束"], ["文字", "結", "束了"])
    assert "".join(out) == "文字" and m.match == StopMatch("結束", 2)


def _scan(stops: list[str], text: str, include: bool = False) -> tuple[str, StopMatch | None]:
    """The reference: scan one character at a time for the first stop string to complete (the longest at a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return (text[:end] if include else text[: end - len(s)]), StopMatch(s, end - len(s))
    return text, None


def _cut(text: str, rng: random.Random, most: int) -> list[str]:
    """text cut into deltas at up to `most` random places (empty deltas too)."""
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, most))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("include", [False, True])
def test_chunking_never_changes_the_result(include: bool) -> None:
    rng = random.Random(3)
    alphabet = "ab c🙂"
    for _ in range(2000):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected, expected_match = _scan(stops, text, include)
        deltas = _cut(text, rng, most=6)
        out, m = _run(stops, deltas, include=include)
        assert "".join(out) == expected, (stops, deltas)
        assert m.match == expected_match


def test_every_stop_string_over_two_letters_matches_like_a_character_scan() -> None:
    """Every stop string of up to 8 characters over "ab" (nested repeats such as "aabaaaa", where a partial match
    must fall back through several borders of itself), over random texts cut into random deltas."""
    rng = random.Random(11)
    for length in range(1, 9):
        for bits in range(2**length):
            stop = "".join("ab"[(bits >> i) & 1] for i in range(length))
            for _ in range(4):
                text = "".join(rng.choice("aab") for _ in range(rng.randint(length, 3 * length)))
                deltas = _cut(text, rng, most=3)
                out, m = _run([stop], deltas)
                assert ("".join(out), m.match) == _scan([stop], text), (stop, deltas)
    out, m = _run(["aabaaaa"], ["aabaaabaaaa"])  # the partial match "aabaaa" falls back to "aa", not to ""
    assert out == ["aaba"] and m.match == StopMatch("aabaaaa", 4)


def test_held_text_is_never_longer_than_a_stop_string() -> None:
    m = StopStringMatcher(["xxxxy"])
    for _ in range(100):
        m.feed("x")
        assert len(m.held) <= 4


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_held_text_is_the_longest_suffix_that_may_still_become_a_stop_string() -> None:
    rng = random.Random(5)
    alphabet = "aab🙂"
    for _ in range(1000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        m = StopStringMatcher(stops)
        text = ""
        for _ in range(rng.randint(1, 8)):
            delta = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
            m.feed(delta)
            if m.match is not None:
                break
            text += delta
            want = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert m.held == text[len(text) - want:], (stops, text, m.held)


def test_stop_strings_at_the_caps_cost_linear_memory() -> None:
    """64 stop strings of 1,024 characters (the caps), with a character outside the BMP: the set of every prefix
    the matcher kept cost 135 MiB and 150 ms per request, so that a dozen such requests took 1.6 GiB."""
    import tracemalloc

    from tokenizer_service.validation import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    stops = [f"{i:03d}" + "🙂" * (MAX_STOP_STRING_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    tracemalloc.start()
    try:
        m = StopStringMatcher(stops)
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert retained < 8 * 2**20, f"{retained / 2**20:.1f} MiB"
    assert m.feed("x" * 100 + "007" + "🙂" * 10) == "x" * 100 and m.held == "007" + "🙂" * 10


def _feed_until_stopped(stream, ids: list[int], split: int) -> str:
    """The text of ids fed to a TextStream `split` at a time, until a stop string matches."""
    out = ""
    for i in range(0, len(ids), split):
        out += stream.feed(ids[i : i + split])
        if stream.stopped:
            break
    return out


@pytest.mark.parametrize("split", [1, 3, 100], ids=["token by token", "three at a time", "all at once"])
def test_stop_strings_wait_for_min_tokens_as_stop_ids_do(demo_tokenizer, split) -> None:
    """A stop string ended a request before its min_tokens (after 1 token with min_tokens=30), while the engine
    bans stop ids and EOS until then; vLLM skips stop strings until min_tokens too."""
    from tokenizer_service.text_stream import TextStream

    words = "the sea is deep and the sea is wide"
    ids = demo_tokenizer.encode(words, add_special_tokens=False)
    first_sea = len(demo_tokenizer.encode("the sea", add_special_tokens=False))
    assert first_sea < len(ids) - 2, ids

    def run(min_tokens: int) -> tuple[str, str | None, int]:
        stream = TextStream(demo_tokenizer, ("sea",), True, False, min_tokens=min_tokens)
        return _feed_until_stopped(stream, ids, split), stream.stopped, stream.num_generated

    # usage counts the ids up to the one whose text completed the stop string, however many came in its update
    ends = [next(k for k in range(len(ids) + 1) if demo_tokenizer.decode(ids[:k]).count("sea") == c) for c in (1, 2)]
    text, stopped, n = run(0)
    assert stopped == "sea" and text == "the " and n == ends[0]
    text, stopped, n = run(first_sea)  # the first "sea" is exempt; the second one stops
    assert stopped == "sea" and text == "the sea is deep and the " and n == ends[1]
    text, stopped, n = run(len(ids))
    assert stopped is None and text == demo_tokenizer.decode(ids) and n == len(ids)


def test_a_finishing_eos_is_counted_unless_a_stop_string_ended_the_output_before_it(demo_tokenizer) -> None:
    """feed(hide_last=True): the last id is the EOS that finished the request; usage counts it, but not when a stop
    string in the same update already ended the output (the EOS came after it)."""
    from tokenizer_service.text_stream import TextStream

    ids = demo_tokenizer.encode("the sea is deep", add_special_tokens=False)
    eos = demo_tokenizer.eos_token_id
    end = next(k for k in range(len(ids) + 1) if "sea" in demo_tokenizer.decode(ids[:k]))
    for stop, text, counted in ((("sea",), "the ", end), (("shore",), demo_tokenizer.decode(ids), len(ids) + 1)):
        stream = TextStream(demo_tokenizer, stop, True, False)
        out = stream.feed([*ids, eos], hide_last=True)
        assert out + (stream.finish() if not stream.stopped else "") == text
        assert stream.num_generated == counted, stop


def test_a_stop_string_may_begin_inside_min_tokens_and_end_after(demo_tokenizer) -> None:
    """Only its end must come after the first min_tokens tokens (vLLM's rule): the text of those tokens went
    around the matcher, so a stop string straddling the boundary never matched and the request ran on."""
    from tokenizer_service.text_stream import TextStream

    ids = demo_tokenizer.encode("the sea is deep", add_special_tokens=False)
    pieces = [demo_tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(2, len(ids)) if pieces[k] != pieces[k - 1] and len(pieces[k - 1]) > len(pieces[k - 2]))
    stop = pieces[k][len(pieces[k - 2]):]  # the text of tokens k-1 and k together: it begins in token k-1
    for min_tokens, ends_after in ((k - 1, k), (k, None)):  # begins in an exempt token / lies wholly within them
        stream = TextStream(demo_tokenizer, (stop,), True, False, min_tokens=min_tokens)
        out = ""
        for token in ids:
            out += stream.feed([token])
            if stream.stopped:
                break
        if ends_after is None:
            assert stream.stopped is None and out + stream.finish() == pieces[-1]
        else:
            assert stream.stopped == stop and stream.num_generated == ends_after and out == pieces[k - 2]


@pytest.mark.parametrize("split", [1, 2, 100], ids=["token by token", "two at a time", "all at once"])
def test_min_tokens_text_held_in_an_incomplete_character_is_still_exempt(demo_tokenizer, split) -> None:
    """An update whose exempt ids end inside a character was held back whole by the detokenizer, so the text of
    those ids ("ok") reached the matcher with the ids after min_tokens and stopped the request, only when the
    engine's updates happened to coalesce (a helper's fuzz: 19 of 915 cases)."""
    from tokenizer_service.text_stream import TextStream

    ids = demo_tokenizer.encode("ok 🦖 ok", add_special_tokens=False)
    m = next(k for k in range(1, len(ids)) if demo_tokenizer.decode(ids[:k]).endswith("\ufffd"))
    stream = TextStream(demo_tokenizer, ("ok",), True, False, min_tokens=m)
    assert _feed_until_stopped(stream, ids, split) == "ok 🦖 " and stream.stopped == "ok"


@pytest.mark.parametrize(("text", "stop"), [("the sea is deep", "deep water"), ("the sea is deep\n", "\n\n")])
@pytest.mark.parametrize("split", [1, 100], ids=["token by token", "all at once"])
def test_a_possible_stop_string_prefix_at_a_normal_end_is_sent(demo_tokenizer, text, stop, split) -> None:
    """Text held back because it may begin a stop string ("deep" of "deep water", a last "\\n" of "\\n\\n") must
    come out of finish() when the request ends without the stop string (length, EOS): only the matcher's own flush
    was tested, not that TextStream.finish() returns it, and dropping it lost the end of the output."""
    from tokenizer_service.text_stream import TextStream

    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    want = demo_tokenizer.decode(ids)
    stream = TextStream(demo_tokenizer, (stop,), True, False)
    out = _feed_until_stopped(stream, ids, split)
    assert stream.stopped is None and out != want  # the case: something is still held back
    assert out + stream.finish() == want and stream.stopped is None


def test_the_final_flush_cannot_end_a_stop_string_inside_min_tokens(demo_tokenizer) -> None:
    """finish() feeds the detokenizer's flush (an unfinished character's U+FFFD) to the matcher: a stop string it
    completes ends in the last token's text, so it may stop the request only when that token is past min_tokens,
    as in feed(); finish() allowing it always, or at exactly min_tokens, was not caught."""
    from tokenizer_service.text_stream import TextStream

    ids = demo_tokenizer.encode("ok 🦖 ok", add_special_tokens=False)
    m = next(k for k in range(1, len(ids)) if demo_tokenizer.decode(ids[:k]).endswith("\ufffd"))
    ids = ids[:m]  # the request ends (max_tokens) inside the emoji, its flush a U+FFFD
    want = demo_tokenizer.decode(ids)
    for min_tokens, stopped in ((m, None), (m + 1, None), (m - 1, "\ufffd")):
        stream = TextStream(demo_tokenizer, ("\ufffd",), True, False, min_tokens=min_tokens)
        out = _feed_until_stopped(stream, ids, 1)
        assert stream.stopped is None  # the U+FFFD comes with the flush only
        out += stream.finish()
        assert stream.stopped == stopped, (min_tokens, stream.stopped)
        assert out == (want if stopped is None else want[: want.index("\ufffd")])
