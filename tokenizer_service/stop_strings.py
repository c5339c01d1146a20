"""Stop strings matched over streamed text, across token (and delta) boundaries.

The matcher sees the text deltas of one request in order. It returns the part of each delta that is safe to
send to the client now, and holds back the longest suffix that is still the beginning of some stop string,
since the next delta may complete it.

Which match wins: the one that *ends* first in the text, as if the text arrived one character at a time; at
equal ends the longer stop string wins (the earlier start). So the result never depends on how the text was
cut into deltas. The stop string itself is dropped from the output unless `include_stop_str_in_output`; all
text after it is always dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StopMatch:
    """A matched stop string and where it started, counted in characters of the whole streamed text."""

    stop: str
    offset: int


class StopStringMatcher:
    """Holds back text that may become a stop string; reports the first stop string completed.

    Usage: `safe = matcher.feed(delta)` per delta; once `matcher.match` is set the request should be
    aborted and no more text fed. At a normal end, `matcher.flush()` returns the held-back text.
    """

    def __init__(self, stop: Iterable[str], *, include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        for s in self._stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._include = include_stop_str_in_output
        # Every proper prefix of every stop string: the suffixes that must be held back.
        self._prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._first_chars = {s[0] for s in self._stops}
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self._emitted_chars = 0  # characters of the stream before _held (emitted or not), for offsets
        self.match: StopMatch | None = None

    @property
    def held(self) -> str:
        """Text currently held back."""
        return self._held

    def feed(self, delta: str) -> str:
        """Add a text delta; return the text that is safe to emit now."""
        if self.match is not None:
            return ""  # the stream has stopped; anything after the stop string is dropped
        if not self._stops:
            return delta
        text = self._held + delta
        found = self._earliest_match(text)
        if found is not None:
            start, stop = found
            self.match = StopMatch(stop=stop, offset=self._emitted_chars + start)
            self._held = ""
            return text[: start + len(stop)] if self._include else text[:start]
        keep = self._held_suffix_len(text)
        safe = text[: len(text) - keep]
        self._held = text[len(text) - keep :]
        self._emitted_chars += len(safe)
        return safe

    def flush(self) -> str:
        """Return the held-back text at the end of a stream that did not stop on a string."""
        if self.match is not None:
            return ""
        held, self._held = self._held, ""
        self._emitted_chars += len(held)
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        # _held contains no whole stop string (it was checked before), so any match here is new.
        best: tuple[int, int, str] | None = None  # (end, -length, stop) orders by end, then longest
        for s in self._stops:
            i = text.find(s)
            if i < 0:
                continue
            candidate = (i + len(s), -len(s), s)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        lo = max(0, len(text) - self._max_hold)
        # Scan left to right so the first hit is the longest suffix; the first-char filter skips most slices.
        for i in range(lo, len(text)):
            if text[i] in self._first_chars and text[i:] in self._prefixes:
                return len(text) - i
        return 0
