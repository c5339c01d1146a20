"""Incremental detokenization of one request's generated token ids.

Byte-level BPE tokenizers split a multi-byte UTF-8 character (emoji, CJK) across tokens, and decoding an
incomplete character gives U+FFFD. So text is emitted only once the decoded window no longer ends in
U+FFFD, and the concatenation of all deltas (plus the final flush) equals `tokenizer.decode(all_ids)`.

Cost per step is independent of the sequence length: only a short window is decoded each step,

    window = [context tokens | unread tokens]
              ^ already emitted, kept only so that tokenizers which strip a leading space at the start of
                a decode (SentencePiece) or clean up spaces see the same neighbours as a full decode.

The delta is `decode(window)[len(decode(context)):]`. Tokens that have been emitted and have fallen out of
the context are dropped, so memory is bounded too. The context always starts where an earlier emission ended,
on a complete character: byte-fallback decoders (SentencePiece's `<0xE4>` tokens) turn a whole run of byte
tokens into U+FFFDs when it starts inside a character, so a context cut at "the last 4 tokens" garbled valid
CJK text.

Decoders that clean up spaces (WordPiece's, or transformers' `clean_up_tokenization_spaces`) rewrite text that
was already emitted: `don '` + `t` decodes as `don't`. Emitted text cannot be taken back, so then the context's
non-space characters are matched in the new decode and what follows them is emitted: no other character is lost
or repeated, but the stream keeps the space the full decode removed (`don 't`), and may lack one it keeps: the
` ' ` -> `'` rule takes a quote's spaces when the window ends in the next word's "▁", where the full text's later
` ,` (applied first) took the second one (`.` + `▁'▁` + `,` streams as `.',` for `. ',`).

Splitting the decode at a token boundary is exact when the text before the boundary ends in a complete
character: a UTF-8 decoder restarts cleanly after a complete character. That is what "no trailing U+FFFD"
guarantees, except when the model really produced invalid bytes or a literal U+FFFD (where a byte-fallback
decode of the whole text differs anyway: it turns a character already streamed into U+FFFDs once an invalid
byte joins its run of byte tokens). A model that loops on
such bytes would make the unread window grow forever, so past `hold_limit` unread tokens an explicit split
is searched for and verified against the decode of the whole window before anything is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from os.path import commonprefix
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes, so an incomplete one spans at most 3 tokens of at least one byte.
_MAX_PARTIAL_TOKENS = 3
# The context may grow this many tokens past context_tokens before it is cut back: cutting it costs a decode of
# the new context, so it is done once per this many emissions rather than at each one.
_TRIM_SLACK = 8


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer (transformers and `tokenizers.Tokenizer` both fit)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's token ids, fed a step at a time, into text deltas.

    Usage: `delta = detok.step(new_ids)` each engine step, then `tail = detok.flush()` once at the end.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        skip_special_tokens: bool = True,
        context_tokens: int = 4,
        hold_limit: int = 16,
        special_ids: frozenset[int] = frozenset(),
        prompt_tail: Sequence[int] = (),
    ) -> None:
        """prompt_tail: the prompt's last ids, when the output continues its text (a continued assistant message):
        the first context, so that the first token's text is what it adds to them (a SentencePiece decoder strips
        the leading space of a decode's first word: "▁answer" alone is "answer", after "▁the" it adds " answer").
        Empty: the output starts the text."""
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be at least 1, got {context_tokens}")
        if hold_limit <= _MAX_PARTIAL_TOKENS:
            raise ValueError(f"hold_limit must exceed {_MAX_PARTIAL_TOKENS}, got {hold_limit}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Dropped before they reach the window when skipped: decode() drops them anyway, and a context made only of
        # them decodes to "", so a SentencePiece decoder's Strip took the next token's leading space.
        self._dropped = special_ids if skip_special_tokens else frozenset()
        self._context_tokens = context_tokens
        self._hold_limit = hold_limit
        self._window: list[int] = []  # context tokens followed by unread tokens
        self._read = 0  # index in _window of the first token whose text has not been emitted
        self._context_text = ""  # decode(_window[:_read]), cached
        self._bounds = [0]  # indices in _window where an emission ended (a complete character), ascending
        self._num_tokens = 0
        self._finished = False
        tail = [t for t in prompt_tail if t not in self._dropped]
        # At most context_tokens of it, from a token whose text starts a whole character (one taken from the
        # middle of a multi-token character would decode as U+FFFDs, which a byte-fallback decoder may spread).
        for start in range(max(0, len(tail) - context_tokens), len(tail)):
            text = self._decode(tail[start:])
            if not text.startswith(REPLACEMENT_CHAR):
                self._window = tail[start:]
                self._read = len(self._window)
                self._context_text = text
                self._bounds = [0, self._read]
                break

    @property
    def num_tokens(self) -> int:
        """How many token ids have been fed in total."""
        return self._num_tokens

    @property
    def finished(self) -> bool:
        """True once flush() has been called."""
        return self._finished

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def step(self, token_ids: Sequence[int]) -> str:
        """Feed one step's new token ids (or several steps' at once); return the text that became final (possibly
        "")."""
        if self._finished:
            raise RuntimeError("step() called after flush()")
        if not token_ids:
            return ""
        self._num_tokens += len(token_ids)
        if self._dropped and not self._dropped.isdisjoint(token_ids):
            token_ids = [t for t in token_ids if t not in self._dropped]
            if not token_ids:
                return ""
        if len(token_ids) > self._hold_limit:
            # Many steps' ids at once (a slow reader's updates, joined). Where they do not end in whole characters,
            # they go in hold_limit at a time: a forced split over a window of thousands decodes every head of it
            # (4,000 invalid bytes took 1-6 s on the event loop); fed so, each stays within ~2 x hold_limit.
            text = self._decode(self._window + list(token_ids))
            if text.endswith(REPLACEMENT_CHAR):
                n = self._hold_limit
                return "".join(self._feed(token_ids[i : i + n]) for i in range(0, len(token_ids), n))
            self._window.extend(token_ids)
            return self._emit_through(len(self._window), text)
        return self._feed(token_ids)

    def _feed(self, token_ids: Sequence[int]) -> str:
        """step() for at most hold_limit ids, special ids dropped already."""
        self._window.extend(token_ids)
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._emit_through(len(self._window), text)
        if len(self._window) - self._read > self._hold_limit:
            return self._forced_split(text)
        return ""  # an incomplete character: wait for the tokens that complete it

    def held_text(self) -> str:
        """The text held back now, as decode() gives it: the unread tokens' text, which ends in U+FFFD (an incomplete
        character) or is ""."""
        if self._read == len(self._window):
            return ""
        return _text_after(self._context_text, self._decode(self._window))

    def flush(self) -> str:
        """Return all text still held back (an incomplete character becomes U+FFFD); call once at the end."""
        if self._finished:
            return ""
        self._finished = True
        if self._read == len(self._window):
            return ""
        return self._emit_through(len(self._window), self._decode(self._window))

    def _emit_through(self, end: int, window_text: str) -> str:
        """Emit the text of window tokens up to `end`, given `window_text` = decode(window[:end])."""
        delta = _text_after(self._context_text, window_text)
        bounds = self._bounds
        if end <= self._context_tokens + _TRIM_SLACK:
            # The window is still short: keep it whole, so the new context is window[:end], whose text is
            # window_text already (no second decode). It is trimmed once it grows past the slack.
            bounds.append(end)
            self._read = end
            self._context_text = window_text
            return delta
        # The new context: from the last emission boundary at least context_tokens back (or the window's start,
        # itself one); older tokens are no longer needed at all.
        limit = end - self._context_tokens
        start = 0
        for b in reversed(bounds):
            if b <= limit:
                start = b
                break
        self._bounds = [b - start for b in bounds if b >= start] + [end - start]
        self._window = self._window[start:]
        self._read = end - start
        self._context_text = self._decode(self._window[: self._read]) if start else window_text
        return delta

    def _forced_split(self, window_text: str) -> str:
        """Emit the unread tokens except a short tail, at the last boundary where the head ends in a whole
        character, preferring one proven not to change the text (head + tail == the window's text). A
        byte-fallback decoder turns a whole run of byte tokens into U+FFFDs while it ends inside a character, so
        there the window's text proves nothing and the whole-character head is taken as it is; a cut inside a
        character also "keeps" that text (U+FFFDs on both sides), and must not win. Only where no head ends in a
        whole character (the model produced invalid bytes) is the last cut that keeps the text taken, short of the
        last _MAX_PARTIAL_TOKENS tokens (they may begin a character).

        Whole-character heads are searched up to the last token, as the incomplete character that ends the window
        may begin there: with hold_limit 4 or 5, the unread byte tokens of valid text (👨 ZWJ 👩) may hold no
        earlier boundary."""
        last_candidate = len(self._window) - _MAX_PARTIAL_TOKENS
        whole: tuple[int, str] | None = None  # the last split whose head ends in a whole character
        for split in range(len(self._window) - 1, self._read, -1):
            head = self._decode(self._window[:split])
            if head.endswith(REPLACEMENT_CHAR):
                continue
            if head + self._decode(self._window[split:]) == window_text:
                return self._emit_through(split, head)
            whole = whole or (split, head)
        if whole is not None and window_text.count(REPLACEMENT_CHAR) > whole[1].count(REPLACEMENT_CHAR) + 3:
            return self._emit_through(*whole)  # more U+FFFDs than one incomplete character makes: byte fallback
        for split in range(last_candidate, self._read, -1):
            head = self._decode(self._window[:split])
            if head + self._decode(self._window[split:]) == window_text:
                return self._emit_through(split, head)
        return ""


def _text_after(context: str, text: str) -> str:
    """What text adds to context. When a decoder's space clean-up rewrote the context (`don '` -> `don't`),
    skip the context's non-space characters in text instead; any other rewrite is a byte-fallback one, and so is
    one where the texts part at a U+FFFD (a run of byte tokens turned invalid: the context's `\n`, a <0x0A>,
    became U+FFFD, and the clean-up reading, matching `hello` alone, sent the newline again)."""
    if text.startswith(context):
        return text[len(context) :]
    start = len(commonprefix([context, text]))
    if REPLACEMENT_CHAR in (text[start : start + 1], context[start : start + 1]):
        return _text_after_bytes(context, text, start)
    wanted = [c for c in context if not c.isspace()]
    matched = 0
    for pos, char in enumerate(text):
        if matched == len(wanted):
            return text[pos:]
        if char.isspace():
            continue
        if char != wanted[matched]:
            break
        matched += 1
    else:
        if matched == len(wanted):
            return ""
    return _text_after_bytes(context, text, start)


def _text_after_bytes(context: str, text: str, start: int) -> str:
    """What text adds to context where a byte-fallback decoder rewrote the context's last run of byte tokens. A run
    that is not valid UTF-8 decodes as one U+FFFD per byte, so a later decode may turn the context's '👨' into 4
    U+FFFDs, or its 4 U+FFFDs (a context ending inside a character, after invalid bytes) into '👨'. Past their
    common start (`start` characters, which _text_after has measured), as many bytes as the context's rewritten end holds are skipped in text, a U+FFFD counting as
    one; a character only partly in the context is kept. Skipping as many characters instead would also skip the
    text after a run that decodes shorter."""
    budget = sum(_byte_count(c) for c in context[start:])
    pos = start
    while pos < len(text) and _byte_count(text[pos]) <= budget:
        budget -= _byte_count(text[pos])
        pos += 1
    return text[pos:]


def _byte_count(char: str) -> int:
    """How many byte tokens a character of a byte-fallback decode stands for (a U+FFFD: one invalid byte)."""
    return 1 if char == REPLACEMENT_CHAR else len(char.encode())
