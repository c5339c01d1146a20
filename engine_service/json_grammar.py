"""JSON as a byte-level pushdown automaton: what may come next in a JSON object being written.

Pure Python, no torch: structured_output.py turns a state into the set of tokens allowed next. The language is
strict JSON (RFC 8259) with a JSON object at the top, as OpenAI's JSON mode promises, and three bounds that keep
a sampled document finite in the ways models are known to loop under such masks:
- at most MAX_WS_RUN whitespace bytes in a row (a model that may not stop otherwise writes newlines forever);
- containers nested at most MAX_DEPTH deep;
- no whitespace after the top-level object: its closing brace ends the document.
Strings must be valid UTF-8 without control characters, and \\u escapes may not name a surrogate (D800-DFFF),
which JSON parsers disagree on; a character outside the BMP is written as its UTF-8 bytes.

A state is an immutable tuple (mode, aux, stack): the stack a str of "o" (object) and "a" (array), innermost
last; aux is the mode's own detail (whitespace run, string sub-state, number sub-state, literal remainder).
"""

from __future__ import annotations

MAX_WS_RUN = 32
MAX_DEPTH = 64

# Modes. START: before the top-level object. OBJ_FIRST: after "{" (a key or "}"). KEY: after "," in an object.
# COLON: after a key. VALUE: a value is required (after ":" or "," in an array). ARR_FIRST: after "[" (a value or
# "]"). AFTER: after a value ("," or the container's closer). STR / KEY_STR: inside a value / key string.
# NUM: inside a number. LIT: inside true, false or null. DONE: the top-level object has closed.
START, OBJ_FIRST, KEY, COLON, VALUE, ARR_FIRST, AFTER, STR, KEY_STR, NUM, LIT, DONE = range(12)
MODE_NAMES = ("START", "OBJ_FIRST", "KEY", "COLON", "VALUE", "ARR_FIRST", "AFTER", "STR", "KEY_STR", "NUM", "LIT",
              "DONE")

State = tuple[int, object, str]

# String sub-states: plain text, after a backslash, \u hex digits still owed (H4: four; H3D: three after a
# leading d, so the next is 0-7), UTF-8 continuation bytes still owed (with the first one's narrower range after
# E0, ED, F0 and F4, which rule out overlong forms, surrogates and code points past U+10FFFF).
S_PLAIN, S_ESC, S_H4, S_H3, S_H3D, S_H2, S_H1, S_U1, S_U2, S_U3, S_U2_E0, S_U2_ED, S_U3_F0, S_U3_F4 = range(14)
_END = -1  # the string's closing quote

_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONT = range(0x80, 0xC0)


def _string_table() -> list[list[int | None]]:
    """table[sub][byte] -> the next string sub-state, _END for the closing quote, None for a byte not allowed."""
    table: list[list[int | None]] = [[None] * 256 for _ in range(14)]
    plain = table[S_PLAIN]
    for b in range(0x20, 0x80):
        plain[b] = S_PLAIN
    plain[ord('"')] = _END
    plain[ord("\\")] = S_ESC
    for b in range(0xC2, 0xE0):
        plain[b] = S_U1
    for b in range(0xE1, 0xF0):
        plain[b] = S_U2
    plain[0xE0], plain[0xED] = S_U2_E0, S_U2_ED
    for b in range(0xF1, 0xF4):
        plain[b] = S_U3
    plain[0xF0], plain[0xF4] = S_U3_F0, S_U3_F4
    for b in b'"\\/bfnrt':
        table[S_ESC][b] = S_PLAIN
    table[S_ESC][ord("u")] = S_H4
    for b in _HEX:
        table[S_H4][b] = S_H3D if b in b"dD" else S_H3
        table[S_H3][b] = S_H2
        table[S_H2][b] = S_H1
        table[S_H1][b] = S_PLAIN
    for b in b"01234567":
        table[S_H3D][b] = S_H2
    for b in _CONT:
        table[S_U1][b] = S_PLAIN
        table[S_U2][b] = S_U1
        table[S_U3][b] = S_U2
    for b in range(0xA0, 0xC0):
        table[S_U2_E0][b] = S_U1
    for b in range(0x80, 0xA0):
        table[S_U2_ED][b] = S_U1
    for b in range(0x90, 0xC0):
        table[S_U3_F0][b] = S_U2
    for b in range(0x80, 0x90):
        table[S_U3_F4][b] = S_U2
    return table


# Number sub-states: after "-", after a leading 0, in the integer digits, after ".", in the fraction, after "e",
# after the exponent's sign, in the exponent. _NUM_ENDS: those a number may end in.
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUM_ENDS = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))


def _number_table() -> list[list[int | None]]:
    table: list[list[int | None]] = [[None] * 256 for _ in range(8)]
    digits, nonzero = b"0123456789", b"123456789"
    table[N_MINUS][ord("0")] = N_ZERO
    for b in nonzero:
        table[N_MINUS][b] = N_INT
    for b in digits:
        table[N_INT][b] = N_INT
    for sub in (N_ZERO, N_INT):
        table[sub][ord(".")] = N_DOT
    for b in digits:
        table[N_DOT][b] = N_FRAC
        table[N_FRAC][b] = N_FRAC
        table[N_E][b] = N_EXP
        table[N_ESIGN][b] = N_EXP
        table[N_EXP][b] = N_EXP
    for sub in (N_ZERO, N_INT, N_FRAC):
        table[sub][ord("e")] = table[sub][ord("E")] = N_E
    table[N_E][ord("+")] = table[N_E][ord("-")] = N_ESIGN
    return table


_STRING = _string_table()
_NUMBER = _number_table()
_WS = frozenset(b" \t\n\r")
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_WS_MODES = frozenset((START, OBJ_FIRST, KEY, COLON, VALUE, ARR_FIRST, AFTER))

INITIAL: State = (START, 0, "")


def _close(stack: str) -> State:
    """The state after a container closes."""
    stack = stack[:-1]
    return (AFTER, 0, stack) if stack else (DONE, 0, "")


def _value(b: int, stack: str) -> State | None:
    """The state after byte b opens a value (None when b opens none)."""
    if b == 0x22:
        return (STR, S_PLAIN, stack)
    if b == 0x7B:
        return (OBJ_FIRST, 0, stack + "o") if len(stack) < MAX_DEPTH else None
    if b == 0x5B:
        return (ARR_FIRST, 0, stack + "a") if len(stack) < MAX_DEPTH else None
    if b == 0x2D:
        return (NUM, N_MINUS, stack)
    if b == 0x30:
        return (NUM, N_ZERO, stack)
    if 0x31 <= b <= 0x39:
        return (NUM, N_INT, stack)
    rest = _LITERALS.get(b)
    return None if rest is None else (LIT, rest, stack)


def step(state: State, b: int) -> State | None:
    """The state after byte b (0-255), or None when b may not come next."""
    mode, aux, stack = state
    if mode == STR or mode == KEY_STR:
        sub = _STRING[aux][b]  # type: ignore[index]
        if sub is None:
            return None
        if sub == _END:
            return (COLON, 0, stack) if mode == KEY_STR else (AFTER, 0, stack)
        return (mode, sub, stack)
    if mode in _WS_MODES and b in _WS:
        return (mode, aux + 1, stack) if aux < MAX_WS_RUN else None  # type: ignore[operator]
    if mode == NUM:
        sub = _NUMBER[aux][b]  # type: ignore[index]
        if sub is not None:
            return (NUM, sub, stack)
        if aux not in _NUM_ENDS:
            return None
        return step((AFTER, 0, stack), b)  # the number ended: b is what follows it
    if mode == LIT:
        rest: bytes = aux  # type: ignore[assignment]
        if b != rest[0]:
            return None
        return (LIT, rest[1:], stack) if len(rest) > 1 else (AFTER, 0, stack)
    if mode == START:
        return (OBJ_FIRST, 0, "o") if b == 0x7B else None
    if mode == OBJ_FIRST or mode == KEY:
        if b == 0x22:
            return (KEY_STR, S_PLAIN, stack)
        return _close(stack) if b == 0x7D and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, 0, stack) if b == 0x3A else None
    if mode == VALUE or mode == ARR_FIRST:
        if b == 0x5D and mode == ARR_FIRST:
            return _close(stack)
        return _value(b, stack)
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (KEY, 0, stack) if top == "o" else (VALUE, 0, stack)
        if (b == 0x7D and top == "o") or (b == 0x5D and top == "a"):
            return _close(stack)
        return None
    return None  # DONE: nothing may follow


def walk(state: State | None, data: bytes) -> State | None:
    """The state after `data`, or None when some byte of it may not come where it does."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_done(state: State) -> bool:
    return state[0] == DONE


def describe(state: State) -> str:
    """A state for a log line or an error message."""
    mode, aux, stack = state
    return f"{MODE_NAMES[mode]} (aux {aux!r}, {len(stack)} open: {stack[-8:]!r})"
