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

from array import array
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

    Each stop string has a KMP automaton (its prefix function): its state is the length of the longest prefix
    of that stop string that ends the text so far, updated once per character. Memory and set-up are linear in
    the stop strings' length, and the text held back is the longest such prefix. (A set of every prefix, as
    before, was quadratic: 64 stop strings of 1,024 characters cost 135 MiB and 150 ms per request.)
    """

    def __init__(self, stop: Iterable[str], *, include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        for s in self._stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._include = include_stop_str_in_output
        self._fail = [_prefix_function(s) for s in self._stops]
        self._state = [0] * len(self._stops)
        self._starters: dict[str, list[int]] = {}  # first character -> the stop strings it starts
        for j, s in enumerate(self._stops):
            self._starters.setdefault(s[0], []).append(j)
        self._held = ""
        self._emitted_chars = 0  # characters of the stream before _held (emitted or not), for offsets
        self.match: StopMatch | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings, de-duplicated."""
        return self._stops

    @property
    def held(self) -> str:
        """Text currently held back."""
        return self._held

    def feed(self, delta: str, can_stop: bool = True) -> str:
        """Add a text delta; return the text that is safe to emit now. can_stop=False: no stop string may end in
        this delta (min_tokens), though one may begin in it and end in a later one."""
        if self.match is not None:
            return ""  # the stream has stopped; anything after the stop string is dropped
        if not self._stops:
            return delta
        text = self._held + delta
        base = len(self._held)
        stops, fail, state, starters = self._stops, self._fail, self._state, self._starters
        active = {j for j, k in enumerate(state) if k}
        for i, c in enumerate(delta):
            done = -1  # the longest stop string completed by this character (the earliest start)
            for j in active.union(starters.get(c, ())):
                s, f, k = stops[j], fail[j], state[j]
                while k and s[k] != c:
                    k = f[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    if done < 0 or len(s) > len(stops[done]):
                        done = j
                    k = f[k - 1]
                state[j] = k
                if k:
                    active.add(j)
                else:
                    active.discard(j)
            if done >= 0 and can_stop:
                stop = stops[done]
                end = base + i + 1
                self.match = StopMatch(stop=stop, offset=self._emitted_chars + end - len(stop))
                self._held = ""
                return text[:end] if self._include else text[: end - len(stop)]
        keep = max(state)  # the longest proper prefix of a stop string that ends the text
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
        self._state = [0] * len(self._stops)
        return held


def _prefix_function(s: str) -> array:
    """KMP's prefix function: for each k, the length of the longest proper prefix of s[:k + 1] that is also its
    suffix (where a partial match falls back to when the next character does not continue it)."""
    f = array("l", bytes(array("l").itemsize * len(s)))
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f
