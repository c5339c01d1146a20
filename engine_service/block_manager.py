"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and prefix caching.

Pure Python: no torch, no grpc. The model runner owns the tensors; this module only hands out block ids.

Prefix caching:
- A full block's hash is xxhash of its token ids, seeded with the previous block's hash, so one hash
  names the whole prefix up to and including that block.
- A lookup hit counts only when the cached block's own token ids match and its parent is the block matched
  just before it (that block itself, by id and by a generation that changes whenever the block is reused), so a
  hash collision can never splice two prefixes together: the KV of every matched block was computed after the
  very blocks matched before it. Lookups go by hash (memoized on the sequence); the token ids are compared only
  for a match about to be admitted.
- One block per hash: a block computed twice side by side is cached once (the copy in use, else the newer).
  The other copy's children stay reachable: a copy that gives way hands its ref to the one cached (a cached
  copy freed while its twin is in use hands that twin its hash), so no cached block is counted that a lookup
  cannot reach (but after a 64-bit hash collision).
- A hash is published only after the block's KV has been written (`publish`, called after the step).
- A block whose reference count drops to 0 keeps its content and hash until it is reused. Free blocks are
  kept in least-recently-freed order; a sequence frees its blocks tail first, so eviction drops suffixes
  before the prefixes they hang on.
- Nothing is ever written into a shared block: a sequence computes from its first uncached token, which
  always starts a block of its own (see `match_prefix`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

import xxhash

from engine_service.sequence import Sequence

ROOT_HASH = 0  # the "parent" of a sequence's first block


def hash_block(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Hash of a full block given its parent's hash: names the whole prefix."""
    return xxhash.xxh3_64_intdigest(array("q", token_ids).tobytes(), seed=parent_hash)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent", "token_ids", "generation", "ref")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and its KV written
        self.parent: tuple[int, int] | None = None  # the ref of the block its KV was computed after; None: first
        self.token_ids: tuple[int, ...] = ()
        self.generation = 0  # counts the block's reuses, so that a ref to an earlier content never matches
        # What a child computed after this block records as its parent: (block id, generation); for a copy computed
        # beside the cached block of the same prefix (and so never published), that block's ref.
        self.ref = (block_id, 0)

    def clear(self) -> None:
        self.hash = None
        self.parent = None
        self.token_ids = ()
        self.generation += 1
        self.ref = (self.block_id, self.generation)


class BlockManager:
    """Hands out KV blocks to sequences and keeps the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. Cached ones keep their hash.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self._num_free_cached = 0  # free blocks that still hold a hash (kept as a count: stats() is per step)
        # Cached block id -> the in-use copies computed beside it, which took its ref (publish); when it is freed
        # first, one of them takes its hash over (free_sequence), so that their children stay reachable.
        self._twins: dict[int, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # tokens found in the cache

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return self._num_free_cached

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------------
    def chain_hash(self, seq: Sequence, i: int) -> int:
        """The hash of seq's full block i (which names the prefix through it), memoized on the sequence."""
        chain, bs = seq.hash_chain, self.block_size
        while len(chain) <= i:
            k = len(chain)
            chain.append(hash_block(chain[k - 1] if k else ROOT_HASH, seq.token_ids[k * bs : (k + 1) * bs]))
        return chain[i]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids caching the longest prefix of `seq` by hash, without taking them or checking their
        tokens (`confirm` does, for a match about to be admitted).

        At most (len - 1) // block_size blocks are matched, so at least one token is always computed and
        the first computed token starts a fresh block: a prompt cached whole recomputes its last block
        into a block of its own, and nothing is written into a shared block.
        """
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent = None
        for i in range(self._matchable_blocks(seq)):
            h = self.chain_hash(seq, i)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.hash != h or block.parent != parent:
                break
            matched.append(block_id)
            parent = block.ref
        return matched

    def confirm(self, seq: Sequence, matched: list[int]) -> list[int]:
        """The part of a match whose blocks hold seq's own tokens: a hash collision must never splice prefixes.
        A colliding block's hash leaves the cache, so that later lookups stop before it too."""
        bs = self.block_size
        for i, block_id in enumerate(matched):
            block = self.blocks[block_id]
            if list(block.token_ids) != seq.token_ids[i * bs : (i + 1) * bs]:
                if self.cached.get(block.hash) == block_id:  # type: ignore[arg-type]
                    del self.cached[block.hash]  # type: ignore[arg-type]
                return matched[:i]
        return matched

    def next_prompt_hash(self, seq: Sequence, matched: list[int]) -> int | None:
        """The hash of the first prompt block after `matched`, if a lookup could ever match it: a full prompt
        block, and not the last block of a prompt cached whole, which is always recomputed (None otherwise)."""
        i = len(matched)
        full = (i + 1) * self.block_size <= seq.num_prompt_tokens
        return self.chain_hash(seq, i) if full and i < self._matchable_blocks(seq) else None

    def _matchable_blocks(self, seq: Sequence) -> int:
        """How many leading blocks a lookup may match: all but the one holding the last token (see
        match_prefix)."""
        return (len(seq.token_ids) - 1) // self.block_size

    def prompt_hashes(self, seq: Sequence, start: int) -> list[int]:
        """The hashes of seq's full prompt blocks from block `start` on: the blocks it will compute."""
        return [self.chain_hash(seq, i) for i in range(start, seq.num_prompt_tokens // self.block_size)]

    def can_admit(self, matched: list[int], num_tokens: int) -> bool:
        """Whether a sequence reusing `matched` can hold `num_tokens` tokens now."""
        taken_from_free = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(num_tokens) - len(matched)
        return taken_from_free + fresh <= len(self.free)

    def admit(self, seq: Sequence, matched: list[int], looked_up: bool = True) -> None:
        """Give `seq` the matched prefix blocks (shared, ref-counted); it computes from there. looked_up: False for
        a request that skipped the lookup (prompt logprobs), which the hit rate does not count."""
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
                self._num_free_cached -= 1  # a matched block always has a hash
            block.ref_count += 1
            seq.block_hashes.append(block.hash)  # type: ignore[arg-type]
        seq.block_table = list(matched)
        seq.num_computed_tokens = len(matched) * self.block_size
        if seq.admit_order < 0 and looked_up:
            # First admission: what the prompt found in the cache. A readmission after preemption finds the
            # sequence's own blocks, generated tokens included: that is recompute saved, not a prompt hit, and
            # neither the request's cached_tokens nor the hit rate may count it.
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += seq.num_cached_tokens

    # ---- growth --------------------------------------------------------------------------------
    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so tokens up to num_computed + num_new have slots."""
        self.grow_to(seq, seq.num_computed_tokens + num_new_tokens)

    def grow_to(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table so that the first `num_tokens` tokens have slots."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self.free)} (check can_append)")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed: evict it
        block = self.blocks[block_id]
        if block.hash is not None:
            self._num_free_cached -= 1
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
        block.clear()
        block.ref_count = 1
        return block_id

    def publish(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed. Call after their KV is written."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = self.blocks[seq.block_table[i - 1]].ref if i else None
            h = self.chain_hash(seq, i)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            owner = self.cached.get(h)
            if owner is not None and owner != block.block_id:
                # The same block computed twice (two sequences side by side). One copy serves lookups: the
                # one in use, else the newer, and the other holds no hash, so that it is evicted first and
                # the count of cached blocks counts only blocks a lookup can reach.
                old = self.blocks[owner]
                twin = old.parent == parent and old.token_ids == tokens  # the same prefix, truly (no collision)
                if old.ref_count > 0:
                    if twin:  # children computed after this copy are found through the cached one
                        block.ref = old.ref
                        # Pruned as it grows: a hot block (a system prompt's) can stay in use for days.
                        self._twins[owner] = [*self._live_twins(old), block.block_id]
                    continue
                # The free copy gives way. Its children still cached (computed after it, by a sequence that has
                # finished) name its ref as their parent: this copy takes that ref over, so that they stay
                # reachable, rather than counted as cached while no lookup could reach them.
                ref = old.ref
                self._twins.pop(owner, None)  # none in use: a twin in use would hold the hash (free_sequence)
                old.clear()
                self._num_free_cached -= 1
                self.free.move_to_end(owner, last=False)
                if twin:
                    block.ref = ref
            block.hash, block.parent, block.token_ids = h, parent, tokens
            self.cached[h] = block.block_id

    # ---- release -------------------------------------------------------------------------------
    def free_sequence(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks, tail first, and reset its cache state. Each leaves the table as it is
        released, so that a second call after one cut short (a Ctrl-C inside it: Scheduler.recover) releases only
        the rest: a block freed twice had a ref count of -1 (or, shared, was handed out while still in use)."""
        table = seq.block_table
        while table:
            block_id = table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is not None and block_id in self._twins and self._hand_over(block):
                    self.free.move_to_end(block_id, last=False)  # the copy in use holds the prefix now
                elif block.hash is not None:
                    self._num_free_cached += 1
                else:
                    # Holds nothing reusable: make it the first to be taken.
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _live_twins(self, block: Block) -> list[int]:
        """The copies of `block` still in use and still holding its ref (entries of copies freed since, and perhaps
        reused, are stale)."""
        return [t for t in self._twins.get(block.block_id, ()) if self.blocks[t].ref_count > 0
                and self.blocks[t].hash is None and self.blocks[t].ref == block.ref]

    def _hand_over(self, block: Block) -> bool:
        """A cached block just freed while a copy computed beside it (holding its ref) is still in use: that copy
        takes its hash, and this one is cleared. Otherwise the copy's children, found through this block's ref,
        would be stranded once this block is evicted: counted as cached, reachable by no lookup. False: no copy
        in use."""
        live = self._live_twins(block)
        self._twins.pop(block.block_id, None)
        if not live:
            return False
        heir = self.blocks[live[0]]
        heir.hash, heir.parent, heir.token_ids = block.hash, block.parent, block.token_ids
        self.cached[block.hash] = heir.block_id  # type: ignore[index]
        if len(live) > 1:
            self._twins[heir.block_id] = live[1:]
        block.clear()
        return True
