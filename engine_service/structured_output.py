"""JSON mode and JSON Schema: which tokens may come next in a request whose output must be a JSON object.

A request with a response_format ("json_object", or "json_schema" with a schema json_schema.py compiled) has a
JsonCursor: the state of json_grammar's automaton over the bytes its output holds so far. Each step, the cursor
gives the sampler a TokenMask (the tokens whose bytes the automaton accepts from that state, as the ids of the
allowed or of the banned ones); the sampler sets the other logits to -inf. When the
top-level object closes, the engine finishes the request (finish reason "stop"); until then no end-of-sequence
token is allowed. A request cut short by max_tokens ends with an unfinished document (finish reason "length").

Masks are computed from the state by walking the vocabulary sorted by bytes (a trie kept implicit in the sorted
order: one walk step per distinct prefix the automaton accepts, plus one per rejected branch), and cached per
state in an LRU shared by every request: a state's mask depends only on its mode, its detail and the innermost
few open containers, so documents of the same shape reuse them. Inside a string, the tokens that cannot leave it
(no quote, backslash or control byte, whole UTF-8 characters) are allowed at once, and only the rest are walked.

The masks need each token's exact bytes, which the tokenizer's decoder defines (token_bytes): byte-level BPE
(GPT-2's byte-to-character map: Qwen, Llama 3, Mistral Nemo) and SentencePiece-style tokenizers ("▁" for a space,
with or without <0xNN> byte tokens: Llama 2, Mistral 7B) are supported. Special and added tokens are never allowed
inside JSON.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from engine_service import json_grammar as jg
from engine_service.host_copy import tensor_to_device

log = logging.getLogger(__name__)

# Device memory the cached masks may take (each the int32 ids of the allowed or of the banned tokens, whichever are
# fewer: at most half the vocabulary, 0.3 MB for Qwen3's 151,936 tokens; most states allow a few dozen tokens, and
# strings ban about a tenth). The least recently used go first.
MASK_CACHE_BYTES = 64 << 20
# Each mask counts as its ids' bytes rounded up to the CUDA caching allocator's 512-byte blocks: a mask of a dozen ids
# takes 512 bytes of device memory, and counted as 48 the budget let some 1.4 million of them hold 700 MB. Host memory
# is not counted: each mask also keeps its ids on the host, its key and Python objects, about 1.0-1.5 KB for a
# small mask, so a budget full of small ones (131,072) holds about 130-190 MB of host memory beside the 64 MiB.
MASK_BLOCK_BYTES = 512
# A mask computed in more than this is logged (a warning once, then at debug level).
SLOW_MASK_S = 0.05


class MaskBudgetError(RuntimeError):
    """A request's mask cache misses took more of the engine's time than its budget (json_mask_budget_s)."""


def mask_bytes(mask: TokenMask) -> int:
    """What a cached mask counts against MASK_CACHE_BYTES: its ids in whole MASK_BLOCK_BYTES blocks (one at least)."""
    return max(1, -(-mask.ids.numel() * mask.ids.element_size() // MASK_BLOCK_BYTES)) * MASK_BLOCK_BYTES


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's map from bytes to printable characters: the printable Latin-1 bytes stand
    for themselves, and every other byte, in increasing order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 0x100 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _piece_decoder(spec: dict | None):
    """From the tokenizer's decoder (its tokenizer.json entry), a function from one token's text to the bytes it
    adds in the middle of a decoded text (None: a character outside the byte-level map), or a ValueError naming a
    decoder whose tokens' bytes are not known.

    Steps that act on the whole text once the tokens are fused (Strip: a SentencePiece text's first space) change
    nothing in the middle of one, and neither does Metaspace's handling of the first token."""
    kind = spec.get("type") if spec else None
    if kind == "ByteLevel":
        table = _byte_decoder()

        def byte_level(text: str) -> bytes | None:
            try:
                return bytes(table[c] for c in text)
            except KeyError:
                return None
        return byte_level
    if kind == "Metaspace":
        replacement = spec.get("replacement", "\u2581")
        return lambda text: text.replace(replacement, " ").encode("utf-8")
    if kind == "Sequence":
        replaces: list[tuple[str, str]] = []
        byte_fallback = fused = False
        for part in spec.get("decoders", []):
            step = part.get("type")
            if fused and step == "Strip":
                continue
            if not fused and step == "Replace" and "String" in part.get("pattern", {}):
                replaces.append((part["pattern"]["String"], part.get("content", "")))
            elif not fused and step == "ByteFallback":
                byte_fallback = True
            elif not fused and step == "Fuse":
                fused = True
            else:
                raise ValueError(f"a {step} step {'after' if fused else 'before'} Fuse")
        byte_token = re.compile(r"<0x([0-9A-Fa-f]{2})>")

        def sentencepiece(text: str) -> bytes:
            for pattern, content in replaces:
                text = text.replace(pattern, content)
            match = byte_token.fullmatch(text) if byte_fallback else None
            return bytes((int(match.group(1), 16),)) if match else text.encode("utf-8")
        return sentencepiece
    raise ValueError(f"a {kind or 'missing'} decoder")


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Each token id's bytes (None for ids never allowed: special and added tokens, ids the tokenizer lacks), or a
    ValueError saying why the tokenizer cannot serve JSON mode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is None:
            raise ValueError("no fast tokenizer (tokenizer.json)")
        decode = _piece_decoder(json.loads(backend.to_str()).get("decoder"))
    except ValueError as exc:
        raise ValueError(f"response_format json_object and json_schema need a tokenizer whose tokens' bytes are "
                         f"known: byte-level BPE (as Qwen's and Llama 3's) or SentencePiece-style (as Llama 2's and "
                         f"Mistral's); this model's has {exc}") from None
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    out: list[bytes | None] = [None] * vocab_size
    unmapped = 0
    for text, i in backend.get_vocab(with_added_tokens=False).items():
        if not 0 <= i < vocab_size or i in added:
            continue
        out[i] = decode(text)
        unmapped += out[i] is None
    if unmapped:
        log.warning("JSON mode: %d tokens hold characters outside the byte-level map and are never allowed", unmapped)
    return out


@dataclass(frozen=True, slots=True)
class TokenMask:
    """The tokens allowed in one state, as the fewer of the two id sets: `ids` (int32, on the sampler's device) are
    the allowed tokens when `allowed` is True, else the banned ones. `count` is how many are allowed."""

    ids: torch.Tensor
    allowed: bool
    count: int
    host_ids: torch.Tensor | None = None  # the same ids on the CPU (to derive other masks from), where kept

    def dense(self, vocab_size: int) -> torch.Tensor:
        """A bool per vocabulary entry, True where allowed, on the CPU (for tests and logs)."""
        mask = torch.full((vocab_size,), not self.allowed, dtype=torch.bool)
        mask[self.ids.cpu()] = self.allowed
        return mask


class JsonMasks:
    """The allowed-token mask of every automaton state, computed on demand and cached (one per engine)."""

    def __init__(self, vocab: list[bytes | None], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vocab_size = len(vocab)
        self.token_bytes = vocab
        pairs = sorted((b, i) for i, b in enumerate(vocab) if b)
        stays = [_stays_from(b) for b, _ in pairs]
        self._all = _Sorted(pairs, stays, [_digits_from(b) for b, _ in pairs])
        self._unsafe = _Sorted([p for p, bits in zip(pairs, stays, strict=True) if not bits & 1],
                               [bits for bits in stays if not bits & 1])
        self._string_safe = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._string_safe[[i for (_, i), bits in zip(pairs, stays, strict=True) if bits & 1]] = True
        # How much of the stack a token can reach: it pops at most as many containers as it holds closers, and
        # then reads the one below. It pushes at most as many as it holds openers (MAX_DEPTH applies).
        self._keep = 1 + max((b.count(b"}") + b.count(b"]") for b, _ in pairs), default=0)
        self._opens = max((b.count(b"{") + b.count(b"[") for b, _ in pairs), default=0)
        self._commas = max((b.count(b",") for b, _ in pairs), default=0)  # items a token can add to an array
        self._lead_ws = torch.tensor([len(b) - len(b.lstrip(b" \t\n\r")) if b else 0 for b in vocab], dtype=torch.int32)
        self._cache: OrderedDict[tuple, TokenMask] = OrderedDict()
        # A key holds the nodes of its schema, so a mask of a schema no lookup can reach again (no longer compiled,
        # no request of it live) would keep the schema's compiled tree alive: 4 MB for a 9 KB schema of 300 optional
        # properties, one per distinct schema up to the budget's 131,072 masks. The masks of a held schema root are
        # filed under it, and dropped with its last holder (release).
        self._holds: dict[jg.Node, int] = {}  # schema root -> holders (the schema cache, live requests)
        self._filed: dict[jg.Node, set[tuple]] = {}  # held root -> the keys of its cached masks
        self._root_of: dict[tuple, jg.Node] = {}  # the other way
        self.cache_bytes = 0
        self.hits = self.misses = 0
        self.compute_s = 0.0
        self._warned = False

    def key(self, state: jg.State) -> tuple:
        """What of a state its mask depends on."""
        mode, aux, stack = state
        if len(stack) + self._opens >= jg.MAX_DEPTH:
            return (mode, aux, tuple(map(self._frame, stack)), 0)  # near the depth bound the whole depth matters
        if len(stack) > self._keep:
            kept = stack[-self._keep :]
            # A schema's values and keys are offered only where the containers they need fit below MAX_DEPTH: the
            # depth matters that much earlier (horizon: the most any node of the schema needs).
            horizon = max([aux[1].horizon if mode in jg.NODE_WS_MODES else 1,  # type: ignore[index]
                           *(frame[1].horizon for frame in kept if type(frame) is tuple)])
            if len(stack) + self._opens + horizon > jg.MAX_DEPTH:
                return (mode, aux, tuple(map(self._frame, stack)), 0)
            return (mode, aux, tuple(map(self._frame, kept)), 1)
        return (mode, aux, tuple(map(self._frame, stack)), 2)

    def _frame(self, frame):
        """A schema array's item count matters only where a token's commas can bring it to min/maxItems (at
        minItems or more, or so far below it that no token reaches it, every count allows the same tokens)."""
        if type(frame) is tuple and frame[0] == "A":
            _, node, n = frame
            if node.max_items is None or n + self._commas < node.max_items:
                if n >= node.min_items:
                    return ("A", node, -1)
                if n + self._commas < node.min_items:
                    return ("A", node, -2)
        return frame

    def hold(self, root: jg.Node) -> None:
        """A holder of a schema's root (the schema cache, a live request): its masks are kept while it has one."""
        self._holds[root] = self._holds.get(root, 0) + 1
        self._filed.setdefault(root, set())

    def release(self, root: jg.Node) -> None:
        """A holder let go of the root; with the last one go the masks filed under it (no lookup can reach them:
        the same schema text compiles to new nodes)."""
        left = self._holds[root] - 1
        if left:
            self._holds[root] = left
            return
        del self._holds[root]
        for key in self._filed.pop(root):
            del self._root_of[key]
            self.cache_bytes -= mask_bytes(self._cache.pop(key))

    def allowed(self, state: jg.State, root: jg.Node | None = None) -> TokenMask:
        """The tokens allowed next (shared: do not modify its tensor). root: the schema the state belongs to; a
        mask computed for a held root is dropped with it (release)."""
        return self._fetch(state, counted=True, root=root)

    def _fetch(self, state: jg.State, counted: bool, root: jg.Node | None) -> TokenMask:
        key = self.key(state)
        mask = self._cache.get(key)
        if mask is not None:
            self._cache.move_to_end(key)
            self.hits += counted
            return mask
        self.misses += counted
        before, t0 = self.compute_s, time.perf_counter()
        mask = self._after_whitespace(state, root) or self._sparse(self._compute(state))
        took = time.perf_counter() - t0
        self.compute_s = before + took  # took holds a nested fetch's time (a run's start), which counted its own
        if took > SLOW_MASK_S:
            log.log(logging.DEBUG if self._warned else logging.WARNING,
                    "JSON mode: a token mask took %.0f ms to compute (state %s); later ones with its shape are cached",
                    took * 1e3, jg.describe(state))
            self._warned = True
        filed = self._filed.get(root) if root is not None else None
        if filed is not None:  # else not held (JSON mode's free object, a caller of its own): the LRU alone keeps it
            filed.add(key)
            self._root_of[key] = root  # type: ignore[assignment]
        self._cache[key] = mask
        self.cache_bytes += mask_bytes(mask)
        while self.cache_bytes > MASK_CACHE_BYTES and len(self._cache) > 1:
            old_key, old = self._cache.popitem(last=False)
            self.cache_bytes -= mask_bytes(old)
            old_root = self._root_of.pop(old_key, None)
            if old_root is not None:
                self._filed[old_root].discard(old_key)
        return mask

    def _after_whitespace(self, state: jg.State, root: jg.Node | None) -> TokenMask | None:
        """The mask of a state w bytes into a whitespace run, from the same state at the run's start (cached or
        computed once): the tokens allowed there whose leading whitespace still fits MAX_WS_RUN. (A token's
        whitespace after other bytes starts a run of its own.) None for a state not in a run."""
        mode, aux, stack = state
        if mode not in jg.WS_MODES:
            return None
        run, node = aux if mode in jg.NODE_WS_MODES else (aux, None)  # type: ignore[misc]
        if not run:
            return None
        base = self._fetch((mode, (0, node) if mode in jg.NODE_WS_MODES else 0, stack), counted=False, root=root)
        mask = torch.full((self.vocab_size,), not base.allowed, dtype=torch.bool)
        mask[base.host_ids] = base.allowed
        return self._sparse(mask & (self._lead_ws <= jg.MAX_WS_RUN - run))

    def _sparse(self, mask: torch.Tensor) -> TokenMask:
        count = int(mask.sum())
        allowed = 2 * count <= self.vocab_size
        ids = (mask if allowed else ~mask).nonzero().flatten().to(torch.int32)
        return TokenMask(tensor_to_device(ids, self.device), allowed, count, ids)

    def _compute(self, state: jg.State) -> torch.Tensor:
        """A bool per vocabulary entry on the CPU, True where the token is allowed."""
        ids: list[int] = []
        runs: list[np.ndarray] = []
        mode, aux, _ = state
        if mode in (jg.STR, jg.KEY_STR) and aux == jg.S_PLAIN:
            self._unsafe.collect(0, len(self._unsafe.keys), 0, state, ids, runs)
            mask = self._string_safe.clone()
        else:
            self._all.collect(0, len(self._all.keys), 0, state, ids, runs)
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if ids:
            mask[ids] = True
        if runs:
            mask[torch.from_numpy(np.concatenate(runs))] = True
        return mask


def _stays_in_string(data: bytes) -> bool:
    """Whether a token, read inside a string with nothing pending, never leaves it and ends with nothing pending:
    allowed in every such state, a key's or a value's, whatever the containers around it. (Returning to the same
    state is not enough: '","":"' closes a value's string and opens the next one.)"""
    state: jg.State | None = (jg.STR, jg.S_PLAIN, ("o",))
    for b in data:
        state = jg.step(state, b)  # type: ignore[arg-type]
        if state is None or state[0] != jg.STR:
            return False
    return state is not None and state[1] == jg.S_PLAIN


# Positions of a token that _stays_from reports on: the first 63 (a uint64 bit each, the top bit unused).
STAY_POSITIONS = 63
SMALL_RANGE = 24  # tokens under a prefix below which they are checked one by one, not with numpy


def _stays_from(data: bytes) -> int:
    """Bit p set where the token's bytes from position p on, read inside a string with nothing pending, stay in it
    (_stays_in_string), for p below STAY_POSITIONS. A token without a backslash that is safe from its start stays
    from each character's first byte after it; the others are walked from each position (escapes pair up
    differently from another start: '\\\\.' is safe, its '\\.' is not)."""
    if b"\\" not in data and _stays_in_string(data):
        return sum(1 << p for p in range(min(len(data), STAY_POSITIONS)) if not 0x80 <= data[p] < 0xC0)
    return sum(1 << p for p in range(min(len(data), STAY_POSITIONS)) if _stays_in_string(data[p:]))


def _digits_from(data: bytes) -> int:
    """Bit p set where the token's bytes from position p on are all ASCII digits (p below STAY_POSITIONS): read in a
    number's digits (integer part, fraction or exponent), such a rest stays in it."""
    start = len(data)
    while start and 0x30 <= data[start - 1] <= 0x39:
        start -= 1
    return sum(1 << p for p in range(start, min(len(data), STAY_POSITIONS)))


# Number sub-states in which every digit keeps the state as it is (digits after the first of an integer part, of
# a fraction, of an exponent).
_DIGIT_LOOPS = frozenset((jg.N_INT, jg.N_FRAC, jg.N_EXP))


class _Sorted:
    """Tokens sorted by their bytes, for walking them as a trie: a prefix's tokens are a contiguous range."""

    def __init__(self, pairs: list[tuple[bytes, int]], stays: list[int], digits: list[int] | None = None):
        self.keys = [b for b, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.ids_np = np.array(self.ids, dtype=np.int64)
        self.stays = stays  # _stays_from of each
        self.stays_np = np.array(stays, dtype=np.uint64)
        self.digits = digits  # _digits_from of each, where numbers are walked
        self.digits_np = None if digits is None else np.array(digits, dtype=np.uint64)

    def collect(self, lo: int, hi: int, depth: int, state: jg.State, out: list[int], runs: list[np.ndarray]) -> None:
        """Add to `out` (or, as arrays, to `runs`) the ids of keys[lo:hi] (all sharing their first `depth` bytes,
        which took the automaton to `state`) whose remaining bytes it accepts."""
        keys = self.keys
        mode = state[0]
        if 0 < depth < STAY_POSITIONS and (mode == jg.STR or mode == jg.KEY_STR) and state[1] == jg.S_PLAIN:
            # Inside a string with nothing pending: the tokens whose rest stays in it are all allowed at once, and
            # only the others are walked (a whole subtree of word pieces would cost a step per byte).
            self._shortcut(self.stays, self.stays_np, lo, hi, depth, state, out, runs)
            return
        if 0 < depth < STAY_POSITIONS and (mode == jg.NUM or mode == jg.INT) and state[1] in _DIGIT_LOOPS \
                and self.digits is not None:
            # Among a number's digits, past a token's first byte: the tokens whose rest is digits stay in it (a
            # code-trained vocabulary has thousands), the others are walked. (At depth 0 the walk by first byte
            # prunes better.)
            self._shortcut(self.digits, self.digits_np, lo, hi, depth, state, out, runs)
            return
        i = lo
        while i < hi and len(keys[i]) == depth:  # the prefix itself is a token (it sorts first)
            out.append(self.ids[i])
            i += 1
        while i < hi:
            key = keys[i]
            b = key[depth]
            j = hi if b == 255 else bisect.bisect_left(keys, key[:depth] + bytes((b + 1,)), i, hi)
            nxt = jg.step(state, b)
            if nxt is not None:
                self.collect(i, j, depth + 1, nxt, out, runs)
            i = j

    def _shortcut(self, bits: list[int], bits_np: np.ndarray, lo: int, hi: int, depth: int, state: jg.State,
                  out: list[int], runs: list[np.ndarray]) -> None:
        """keys[lo:hi] whose bit `depth` is set are allowed without a walk; the others are walked one by one."""
        keys = self.keys
        if hi - lo <= SMALL_RANGE:  # numpy's per-call cost is more than a few tokens' own
            for k in range(lo, hi):
                if bits[k] >> depth & 1 or jg.walk(state, keys[k][depth:]) is not None:
                    out.append(self.ids[k])
            return
        safe = ((bits_np[lo:hi] >> np.uint64(depth)) & np.uint64(1)).astype(bool)
        runs.append(self.ids_np[lo:hi][safe])
        for k in np.flatnonzero(~safe).tolist():
            if jg.walk(state, keys[lo + k][depth:]) is not None:
                out.append(self.ids[lo + k])


class JsonCursor:
    """One request's place in its JSON document."""

    __slots__ = ("masks", "top", "state", "_mask", "budget_s", "spent_s")

    def __init__(self, masks: JsonMasks, top: jg.Node = jg.FREE_OBJECT, budget_s: float = 0.0):
        """top: the top-level object's node (a compiled schema's, json_schema.py), else any object. budget_s: the
        seconds its masks' cache misses may take in all (0: no bound); past it allowed() raises MaskBudgetError."""
        self.masks = masks
        self.top = top  # the root its masks are filed under (JsonMasks.hold)
        self.state: jg.State = jg.initial(top)
        self._mask: TokenMask | None = None  # the state's mask, looked up once per state
        self.budget_s = budget_s
        self.spent_s = 0.0  # the time its misses took (hits cost about a microsecond, not counted)

    def allowed(self) -> TokenMask:
        if self._mask is None:
            before = self.masks.compute_s
            self._mask = self.masks.allowed(self.state, self.top)
            self.spent_s += self.masks.compute_s - before
        if self.budget_s and self.spent_s > self.budget_s:
            # Checked after the miss: the mask that crossed the budget is computed (and cached for later requests),
            # so a request takes at most its budget plus one miss.
            raise MaskBudgetError(
                f"JSON mode: this request's token masks took {self.spent_s:.3g} s of the engine's time to compute, "
                f"past json_mask_budget_s={self.budget_s:g} (the engine's --json-mask-budget-s), while every other "
                f"request waited; a schema whose masks are cached (its documents after the first) or a smaller one "
                f"costs less, or raise the budget (0: no bound)")
        return self._mask

    def advance(self, token: int) -> bool:
        """Take a sampled token; False (the state kept) when the automaton refuses its bytes."""
        data = self.masks.token_bytes[token] if 0 <= token < self.masks.vocab_size else None
        nxt = None if data is None else jg.walk(self.state, data)
        if nxt is None:
            return False
        self.state = nxt
        self._mask = None
        return True

    @property
    def done(self) -> bool:
        return jg.is_done(self.state)
