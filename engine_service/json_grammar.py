"""JSON as a byte-level pushdown automaton: what may come next in a JSON object being written, optionally shaped
by a schema (json_schema.py compiles one into the Nodes below).

Pure Python, no torch: structured_output.py turns a state into the set of tokens allowed next. The language is
strict JSON (RFC 8259) with a JSON object at the top, as OpenAI's JSON mode promises, and three bounds that keep
a sampled document finite in the ways models are known to loop under such masks:
- at most MAX_WS_RUN whitespace bytes in a row (a model that may not stop otherwise writes newlines forever);
- containers nested at most MAX_DEPTH deep (a schema's value starts only where its required containers fit below
  the bound, and an optional key or array item is offered only where its value fits: a recursive schema would
  otherwise lead a document into a place at the bound where no byte may come);
- no whitespace after the top-level object: its closing brace ends the document.
Strings must be valid UTF-8 without control characters, and \\u escapes may not name a surrogate (D800-DFFF),
which JSON parsers disagree on; a character outside the BMP is written as its UTF-8 bytes.

A state is an immutable tuple (mode, aux, stack): the stack a tuple of open containers, innermost last ("o" and
"a" for free ones, whose contents may be any JSON; ("O", node, next property) and ("A", node, items so far) for a
schema's); aux is the mode's own detail (whitespace run and the node a value must match, string or number
sub-state, the literals still possible: a range of their sorted texts). Nodes and literal sets compare by
identity, so states of different schemas never mix, and a state hashes in time independent of how many literals
it allows.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import itemgetter

MAX_WS_RUN = 32
MAX_DEPTH = 64

# Modes. START: before the top-level object. OBJ_FIRST: after "{" (a key or "}"). KEY: after "," in an object.
# COLON: after a key. VALUE: a value is required (after ":" or "," in an array). ARR_FIRST: after "[" (a value or
# "]"). AFTER: after a value ("," or the container's closer). STR / KEY_STR: inside a value / a free object's key.
# NUM / INT: inside a number / an integer. LITS: inside one of a set of literal texts (true, false, null, an enum's
# values, a schema object's quoted keys). DONE: the top-level object has closed.
START, OBJ_FIRST, KEY, COLON, VALUE, ARR_FIRST, AFTER, STR, KEY_STR, NUM, INT, LITS, DONE = range(13)
MODE_NAMES = ("START", "OBJ_FIRST", "KEY", "COLON", "VALUE", "ARR_FIRST", "AFTER", "STR", "KEY_STR", "NUM", "INT",
              "LITS", "DONE")

State = tuple[int, object, tuple]

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


def _number_table(integer: bool = False) -> list[list[int | None]]:
    """table[sub][byte] -> the next number sub-state; an integer has no fraction and no exponent."""
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
    if integer:
        table[N_ZERO][ord(".")] = table[N_INT][ord(".")] = None
        table[N_ZERO][ord("e")] = table[N_ZERO][ord("E")] = table[N_INT][ord("e")] = table[N_INT][ord("E")] = None
    return table


_STRING = _string_table()
_NUMBER = _number_table()
_INTEGER = _number_table(integer=True)
_NUMBER_START = {ord("-"): N_MINUS, ord("0"): N_ZERO, **{b: N_INT for b in b"123456789"}}
_WS = frozenset(b" \t\n\r")
WS_MODES = frozenset((START, OBJ_FIRST, KEY, COLON, VALUE, ARR_FIRST, AFTER))  # whose aux holds a whitespace run
NODE_WS_MODES = frozenset((START, COLON, VALUE))  # whose aux is (whitespace run, node)


class Node:
    """What a value must be. kind: ANY (any JSON value), OBJECT, ARRAY, STRING, NUMBER, INTEGER, LITERALS (one of
    a set of exact JSON texts: an enum, a const, booleans, null) or UNION (branches told apart by their first byte).
    Built by json_schema.py (and FREE_OBJECT below); read-only once built (but for `fitting`, a cache filled on
    demand); compared by identity."""

    __slots__ = ("kind", "props", "key_choices", "can_close", "free", "items", "min_items", "max_items", "literals",
                 "lit_set", "dispatch", "starts", "need", "horizon", "key_need", "fitting")

    def __init__(self, kind: str):
        self.kind = kind
        self.props: tuple[tuple[bytes, Node, bool], ...] = ()  # OBJECT: (quoted key, value node, required), in order
        # OBJECT: per next-property index, the quoted keys that may come next (None: no key may come)
        self.key_choices: tuple[Lits | None, ...] = ()
        self.can_close: tuple[bool, ...] = ()  # OBJECT: per next-property index, whether "}" may come
        self.free = False  # OBJECT: any keys and values (JSON mode's object)
        self.items: Node | None = None  # ARRAY
        self.min_items, self.max_items = 0, None  # ARRAY
        self.literals: tuple[bytes, ...] = ()  # LITERALS
        self.lit_set: Lits | None = None  # LITERALS: the same, sorted for stepping (seal)
        self.dispatch: dict[int, Node] = {}  # UNION: first byte -> branch
        self.starts: frozenset[int] = frozenset()  # the bytes a value of this node may start with
        # The fewest containers a value of this node opens, its own included (json_schema.py derives it from the
        # required properties and minItems; a UNION's is its smallest branch's), and the most any node of its
        # schema needs (where a state's mask starts to depend on its depth).
        self.need = 1 if kind in (OBJECT_KIND, ARRAY_KIND) else 0
        self.horizon = 1
        self.key_need: tuple[int, ...] = ()  # OBJECT: per next-property index, the most its key choices' values need
        self.fitting: dict[tuple[int, int], Lits | None] = {}  # OBJECT: key_choices[i] less those that do not fit

    def seal(self) -> Node:
        """Derive the lookup tables once the fields are set."""
        if self.kind == LITERALS_KIND:
            self.lit_set = Lits("v", [(lit, None) for lit in self.literals])
            self.starts = frozenset(lit[0] for lit in self.literals)
        if self.kind == OBJECT_KIND:
            choices = []
            for i in range(len(self.props) + 1):
                keys = []
                for k in range(i, len(self.props)):  # the next properties, up to the first required one
                    keys.append((self.props[k][0], (k, self.props[k][1])))
                    if self.props[k][2]:
                        break
                choices.append(Lits("k", keys) if keys else None)
            closable = [True] * (len(self.props) + 1)  # no required property from i on (from the end: linear)
            for i in range(len(self.props) - 1, -1, -1):
                closable[i] = closable[i + 1] and not self.props[i][2]
            self.key_choices, self.can_close = tuple(choices), tuple(closable)
            self.seal_needs()
        return self

    def seal_needs(self) -> None:
        """Derive key_need from the values' `need` (again once json_schema.py has set them)."""
        if self.kind == OBJECT_KIND:
            self.key_need = tuple(max((value.need for _, value in lits.payloads), default=0) if lits else 0
                                  for lits in self.key_choices)
            self.fitting = {}

    def __repr__(self) -> str:
        return f"<{self.kind} node>"


class Lits:
    """A set of literal texts (LITS' aux is (this, lo, hi, depth): the texts[lo:hi] that share their first `depth`
    bytes, those read so far). Sorted, so a prefix's texts are a contiguous range, the one equal to it first.
    tag "v": the texts are values; "k": a schema object's quoted keys, payload (property index, value node). It
    holds no more than the texts: a byte trie held an object per byte, and an object's keys one per property
    index, which made a 62 KB schema of 361 optional properties a 3 GB, 22 s compile."""

    __slots__ = ("tag", "texts", "payloads", "start")

    def __init__(self, tag: str, choices) -> None:
        """choices: (bytes, payload) pairs; a text given twice keeps its first payload."""
        first: dict[bytes, object] = {}
        for text, payload in choices:
            first.setdefault(text, payload)
        self.tag = tag
        self.texts = tuple(sorted(first))
        self.payloads = tuple(first[text] for text in self.texts)
        self.start = (self, 0, len(self.texts), 0)  # before any byte

    def __repr__(self) -> str:
        return f"<{len(self.texts)} {'keys' if self.tag == 'k' else 'literals'}>"


ANY_KIND, OBJECT_KIND, ARRAY_KIND, STRING_KIND, NUMBER_KIND, INTEGER_KIND, LITERALS_KIND, UNION_KIND = (
    "any", "object", "array", "string", "number", "integer", "literals", "union")
_ANY_LITERALS = Lits("v", ((b"true", None), (b"false", None), (b"null", None)))

ANY = Node(ANY_KIND)
ANY.starts = frozenset(b'{["-0123456789tfn')
FREE_OBJECT = Node(OBJECT_KIND)  # JSON mode's top level: any object
FREE_OBJECT.free, FREE_OBJECT.starts = True, frozenset(b"{")
FREE_OBJECT.seal()


def initial(node: Node = FREE_OBJECT) -> State:
    """The state before a document whose top level is `node` (an OBJECT)."""
    return (START, (0, node), ())


INITIAL: State = initial()


def _close(stack: tuple) -> State:
    """The state after the innermost container closes."""
    stack = stack[:-1]
    return (AFTER, 0, stack) if stack else (DONE, 0, ())


def _lits(aux: tuple, b: int, stack: tuple) -> State | None:
    """LITS: the state after byte b among the texts[lo:hi] that share their first `depth` bytes. A literal that is
    complete while longer ones continue (enum 1 and 12) ends at the first byte none of them takes, which is then
    read after it."""
    lits, lo, hi, depth = aux
    texts = lits.texts
    complete = len(texts[lo]) == depth  # the prefix itself is a text: it sorts first
    # The others share the prefix and are longer, so they are sorted by their next byte: a search on it alone
    # (comparing whole texts re-read the prefix, a cost growing with a long enum value's bytes read).
    at = itemgetter(depth)
    i = bisect_left(texts, b, lo + complete, hi, key=at)
    j = bisect_right(texts, b, i, hi, key=at)
    if i < j:
        if j - i == 1 and len(texts[i]) == depth + 1:  # complete, and no longer text goes on
            return _lits_done(lits.tag, lits.payloads[i], stack)
        return (LITS, (lits, i, j, depth + 1), stack)
    if not complete:
        return None
    return step(_lits_done(lits.tag, lits.payloads[lo], stack), b)


def _lits_done(tag: str, payload, stack: tuple) -> State:
    if tag == "v":
        return (AFTER, 0, stack)
    index, value = payload  # a key: the object moves past its property
    _, node, _ = stack[-1]
    return (COLON, (0, value), stack[:-1] + (("O", node, index + 1),))


def _begin(node: Node, b: int, stack: tuple) -> State | None:
    """The state after byte b starts a value of `node` (None when b cannot start one)."""
    kind = node.kind
    if kind == ANY_KIND:
        if b == 0x7B:
            return (OBJ_FIRST, 0, stack + ("o",)) if len(stack) < MAX_DEPTH else None
        if b == 0x5B:
            return (ARR_FIRST, 0, stack + ("a",)) if len(stack) < MAX_DEPTH else None
        if b == 0x22:
            return (STR, S_PLAIN, stack)
        sub = _NUMBER_START.get(b)
        if sub is not None:
            return (NUM, sub, stack)
        return _lits(_ANY_LITERALS.start, b, stack)
    if kind == UNION_KIND:
        branch = node.dispatch.get(b)
        return None if branch is None else _begin(branch, b, stack)
    if kind == OBJECT_KIND:
        if b != 0x7B or len(stack) + node.need > MAX_DEPTH:  # its required containers must fit too
            return None
        return (OBJ_FIRST, 0, stack + ("o" if node.free else ("O", node, 0),))
    if kind == ARRAY_KIND:
        if b != 0x5B or len(stack) + node.need > MAX_DEPTH:
            return None
        return (ARR_FIRST, 0, stack + (("A", node, 0),))
    if kind == STRING_KIND:
        return (STR, S_PLAIN, stack) if b == 0x22 else None
    if kind == NUMBER_KIND or kind == INTEGER_KIND:
        sub = _NUMBER_START.get(b)
        return None if sub is None else (NUM if kind == NUMBER_KIND else INT, sub, stack)
    if len(stack) + node.need > MAX_DEPTH:  # LITERALS (sealed): its deepest value's containers must fit too
        return None
    return _lits(node.lit_set.start, b, stack)


def _key(top, b: int, stack: tuple, first: bool) -> State | None:
    """OBJ_FIRST (first) or KEY: a key starts, or (OBJ_FIRST only, where the object allows) the object closes."""
    if top == "o":
        if b == 0x22:
            return (KEY_STR, S_PLAIN, stack)
        return _close(stack) if b == 0x7D and first else None
    _, node, index = top
    if b == 0x7D:
        return _close(stack) if first and node.can_close[index] else None
    choices = _fitting_keys(node, index, len(stack))
    return _lits(choices.start, b, stack) if choices is not None else None


def _fitting_keys(node: Node, index: int, depth: int) -> Lits | None:
    """node.key_choices[index] less the optional keys whose values would not fit below MAX_DEPTH at `depth` (the
    object's own frame counted); a required key's value always fits, as its object's `need` counted it."""
    choices = node.key_choices[index]
    room = MAX_DEPTH - depth
    if choices is None or node.key_need[index] <= room:
        return choices
    fit = node.fitting.get((index, room), False)
    if fit is False:  # a few rooms per index at most, near the bound: kept, so states keep comparing by identity
        kept = [(text, payload) for text, payload in zip(choices.texts, choices.payloads, strict=True)
                if payload[1].need <= room]
        fit = node.fitting[(index, room)] = Lits("k", kept) if kept else None
    return fit


def _after(top, b: int, stack: tuple) -> State | None:
    """AFTER: a value ended inside `top`."""
    if top == "o":
        if b == 0x2C:
            return (KEY, 0, stack)
        return _close(stack) if b == 0x7D else None
    if top == "a":
        if b == 0x2C:
            return (VALUE, (0, ANY), stack)
        return _close(stack) if b == 0x5D else None
    tag, node, n = top
    if tag == "O":
        if b == 0x2C:
            return (KEY, 0, stack) if _fitting_keys(node, n, len(stack)) else None
        return _close(stack) if b == 0x7D and node.can_close[n] else None
    if b == 0x2C:  # an array of a schema: n items so far
        if node.max_items is not None and n >= node.max_items:
            return None  # (another item fits where the first one did: its need and depth are the same)
        return (VALUE, (0, node.items), stack[:-1] + (("A", node, n + 1),))
    return _close(stack) if b == 0x5D and n >= node.min_items else None


def step(state: State, b: int) -> State | None:
    """The state after byte b (0-255), or None when b may not come next."""
    mode, aux, stack = state
    if mode == STR or mode == KEY_STR:
        sub = _STRING[aux][b]  # type: ignore[index]
        if sub is None:
            return None
        if sub == _END:
            return (COLON, (0, ANY), stack) if mode == KEY_STR else (AFTER, 0, stack)
        return (mode, sub, stack)
    if mode in WS_MODES and b in _WS:
        if mode in NODE_WS_MODES:
            ws, node = aux  # type: ignore[misc]
            return (mode, (ws + 1, node), stack) if ws < MAX_WS_RUN else None
        return (mode, aux + 1, stack) if aux < MAX_WS_RUN else None  # type: ignore[operator]
    if mode == NUM or mode == INT:
        sub = (_NUMBER if mode == NUM else _INTEGER)[aux][b]  # type: ignore[index]
        if sub is not None:
            return (mode, sub, stack)
        if aux not in _NUM_ENDS:
            return None
        return step((AFTER, 0, stack), b)  # the number ended: b is what follows it
    if mode == LITS:
        return _lits(aux, b, stack)  # type: ignore[arg-type]
    if mode == VALUE or mode == START:
        return _begin(aux[1], b, stack)  # type: ignore[index]
    if mode == OBJ_FIRST or mode == KEY:
        return _key(stack[-1], b, stack, mode == OBJ_FIRST)
    if mode == COLON:
        return (VALUE, (0, aux[1]), stack) if b == 0x3A else None  # type: ignore[index]
    if mode == ARR_FIRST:
        top = stack[-1]
        if top == "a":
            return _close(stack) if b == 0x5D else _begin(ANY, b, stack)
        _, node, _ = top
        if b == 0x5D:
            return _close(stack) if node.min_items == 0 else None
        if node.max_items == 0:
            return None
        return _begin(node.items, b, stack[:-1] + (("A", node, 1),))
    if mode == AFTER:
        return _after(stack[-1], b, stack)
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
    detail = repr(aux)
    if len(detail) > 80:
        detail = detail[:77] + "..."
    return f"{MODE_NAMES[mode]} (aux {detail}, {len(stack)} open)"
