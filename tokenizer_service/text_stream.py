"""One request's token ids turned into text deltas: incremental detokenization, then stop strings."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from tokenizer_service.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tokenizer_service.stop_strings import StopStringMatcher


def decoder_of(tokenizer: Any) -> Any:
    """What incremental detokenization calls decode() on: a fast tokenizer's Rust `tokenizers.Tokenizer`
    when transformers' decode would return the same text (no clean-up of tokenization spaces), else the
    tokenizer itself. transformers' decode wrapper costs about twice the Rust decode of a few ids, and the
    detokenizer decodes twice per request per engine step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend
    return tokenizer


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> frozenset[int]


def special_ids_of(tokenizer: Any) -> frozenset[int]:
    """The ids decode(skip_special_tokens=True) leaves out: the added tokens marked special (read once per
    tokenizer: transformers builds added_tokens_decoder anew at each access)."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):  # TypeError: an object a weak reference cannot name, uncached
        pass
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = frozenset(i for i, token in decoder.items() if getattr(token, "special", False))
    try:
        _SPECIAL_IDS[tokenizer] = ids
    except TypeError:
        pass
    return ids


class TextStream:
    """feed() each step's token ids and get the text safe to send; finish() at the end for the rest.

    Once `stopped` is set (a stop string matched), the request should be aborted in the engine. A stop string may
    end only in the text of a token after the first min_tokens, as the engine bans stop ids and EOS for those; it
    may begin earlier (vLLM's rule). The last of those tokens may end inside a character: the detokenizer then holds
    back its whole text, and the complete characters in it ("the " of "the \xf0") stay exempt when they come out
    with the ids that complete the character.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], skip_special_tokens: bool,
                 include_stop_str_in_output: bool, min_tokens: int = 0, prompt_tail: Sequence[int] = ()) -> None:
        """prompt_tail: the prompt's last ids where the output continues its text (IncrementalDetokenizer)."""
        self._detok = IncrementalDetokenizer(decoder_of(tokenizer), skip_special_tokens=skip_special_tokens,
                                             special_ids=special_ids_of(tokenizer), prompt_tail=prompt_tail)
        self._stops = StopStringMatcher(stop, include_stop_str_in_output=include_stop_str_in_output)
        self._min_tokens = min_tokens
        self._exempt_chars = 0  # characters of the next text still of the first min_tokens tokens (held back)
        # The tokens of the output (usage's completion_tokens): every id fed, up to the one whose text completed a
        # stop string (the engine may have made more by then; as many as its updates happened to coalesce).
        self.num_generated = 0
        # Where a stop string matched in the last feed(): how many of its ids go out with the text, up to the one
        # whose text completed it (the rest are neither sent nor counted). None: no stop matched there.
        self.stop_ids: int | None = None

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, if any."""
        return self._stops.match.stop if self._stops.match is not None else None

    def feed(self, token_ids: list[int], hide_last: bool = False) -> str:
        """hide_last: the last id is the EOS or stop token id that finished the request, counted but adding no
        text (as in vLLM, unless include_stop_str_in_output)."""
        if hide_last and token_ids:
            text = self.feed(token_ids[:-1])
            if self.stop_ids is None:  # else a stop string ended before it: it is neither sent nor counted
                self.num_generated += 1
            return text
        self.stop_ids = None
        exempt = self._min_tokens - self.num_generated  # tokens still before min_tokens: no stop string ends them
        self.num_generated += len(token_ids)
        if exempt <= 0:
            text = self._feed_ids(token_ids, 0)
        else:
            # One id at a time: the detokenizer holds back a whole update that ends inside a character, which would
            # hand the exempt ids' text to a feed that can stop below (a stop then depended on how updates
            # coalesced).
            text = "".join(self._stops.feed(self._detok.step(token_ids[i : i + 1]), can_stop=False)
                           for i in range(min(exempt, len(token_ids))))
            if exempt <= len(token_ids):  # the last exempt id is in: what of its text is held back stays exempt
                self._exempt_chars = len(self._detok.held_text().rstrip(REPLACEMENT_CHAR))
            if exempt < len(token_ids):
                text += self._feed_ids(token_ids[exempt:], exempt)
        if self.stop_ids is not None:  # the ids after the stop's are not the output's
            self.num_generated -= len(token_ids) - self.stop_ids
        return text

    def _feed_ids(self, ids: list[int], offset: int) -> str:
        """The text of ids (token_ids[offset:] of the feed), through the stop matcher. With stop strings, several
        ids go one at a time, so that a stop sets stop_ids at the id whose text completed it: the ids after it
        went out with the text before (their text never does), and which ids a caller got depended on how the
        engine's updates coalesced."""
        if not self._stops.stops:
            return self._feed_stops(self._detok.step(ids))
        text = []
        for i in range(len(ids)):
            text.append(self._feed_stops(self._detok.step(ids[i : i + 1])))
            if self._stops.match is not None:
                self.stop_ids = offset + i + 1
                break
        return "".join(text)

    def _feed_stops(self, text: str, can_stop: bool = True) -> str:
        """The stop matcher's feed, its first _exempt_chars characters exempt."""
        if self._exempt_chars and text:
            head, text = text[: self._exempt_chars], text[self._exempt_chars :]
            self._exempt_chars -= len(head)
            return self._stops.feed(head, can_stop=False) + self._stops.feed(text, can_stop=can_stop)
        return self._stops.feed(text, can_stop=can_stop)

    def finish(self) -> str:
        """Text still held back (an incomplete character, a possible stop-string prefix) at the end."""
        text = self._feed_stops(self._detok.flush(), can_stop=self.num_generated > self._min_tokens)
        return text + self._stops.flush()
