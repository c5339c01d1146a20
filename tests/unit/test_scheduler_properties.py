"""Property tests: random arrivals, aborts and lengths through the scheduler and block manager.

A fake model "writes" each computed token's KV as the hash of the whole prefix it depends on, so the
checks can see whether any sequence would ever read KV that is not its own prefix's.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine_service.block_manager as bm_module
from engine_service.block_manager import BlockManager
from engine_service.sampling_params import SamplingParams
from engine_service.scheduler import Scheduler
from engine_service.sequence import Sequence, Status

BLOCK = 4
REAL_HASH = bm_module.hash_block
VOCAB = 6  # a tiny vocabulary makes shared prefixes (and cache hits) common


class Sim:
    """The scheduler and block manager driven as the engine drives them, over a fake device.

    overlap=True drives them as overlap scheduling does (engine.step): the next batch is scheduled ahead and
    "launched" before the current one is read back. The fake device runs launches in order, as a CUDA stream
    does: a launch writes its KV at once, and a batch scheduled ahead takes its input tokens from the
    previous launch's samples, which the scheduler sees only when that launch is read back.
    """

    def __init__(self, num_blocks: int, budget: int, max_seqs: int, max_model_len: int, overlap: bool = False):
        self.bm = BlockManager(num_blocks, BLOCK)
        self.sched = Scheduler(self.bm, max_seqs, budget, eos_token_ids={VOCAB - 1})
        self.max_model_len = max_model_len
        self.kv: dict[int, int] = {}  # slot -> hash of the prefix whose last token's KV is stored there
        self.live: dict[str, Sequence] = {}
        self.next_id = 0
        self.overlap = overlap
        self.inflight = None  # (batch, its samples) launched ahead and not yet read back
        self.num_ahead = 0
        self.num_ahead_with_prompts = 0  # of those, batches with prompt chunks (continued or newly admitted)

    def add(self, prompt: list[int], max_tokens: int, priority: int = 0) -> None:
        need = -(-(min(len(prompt) + max_tokens, self.max_model_len) - 1) // BLOCK)  # as engine.add_request
        if len(prompt) >= self.max_model_len or need > self.bm.num_blocks:
            return  # the engine refuses these at admission
        seq = Sequence(str(self.next_id), prompt, SamplingParams(max_tokens=max_tokens, priority=priority),
                       self.max_model_len)
        self.next_id += 1
        self.live[seq.request_id] = seq
        self.sched.add(seq)

    def abort(self, pick: int) -> None:
        if self.live:
            rid = sorted(self.live)[pick % len(self.live)]
            self.sched.abort(self.live.pop(rid))

    def step(self, rng: random.Random) -> None:
        if self.overlap:
            self._step_overlap(rng)
            return
        had_work = self.sched.has_unfinished()
        cached_before = {s.request_id: s.status for s in self.live.values()}
        batch = self.sched.schedule()
        if had_work:
            assert batch.num_tokens >= 1, "a step with work to do made no progress"
        self._complete(batch, self._launch(batch, rng, cached_before))

    def _launch(self, batch, rng: random.Random, cached_before=None, previous: list | None = None) -> list:
        """The fake device computes `batch`: writes its KV and returns its samples (None for rows that do not
        sample). A batch scheduled ahead computes position len(seq), whose token is the previous launch's
        sample for that sequence."""
        cached_before = cached_before or {}
        # Every batch, scheduled in turn or ahead, within the step's limits.
        assert sum(batch.num_new_tokens) <= self.sched.max_num_batched_tokens
        assert len(batch.seqs) <= self.sched.max_num_seqs
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            assert n >= 1
            source = None if batch.input_rows is None else batch.input_rows[row]
            if source is None:
                # A batch scheduled ahead with prompt chunks says where each starts: the previous batch, still in
                # flight, has not advanced num_computed_tokens.
                start = seq.num_computed_tokens if batch.starts is None else batch.starts[row]
                tokens = seq.token_ids
                assert seq.num_computed_tokens <= start and start + n <= len(seq)
                assert batch.sample[row] == (start + n == len(seq))
                if cached_before.get(seq.request_id) is Status.WAITING:
                    # Admitted this step: even a prompt cached whole computes at least one token.
                    assert seq.num_computed_tokens < len(seq)
            else:
                assert seq.status is Status.RUNNING and n == 1 and len(seq) + 1 < seq.max_len
                assert batch.starts is None or batch.starts[row] == len(seq)
                start, tokens = len(seq), seq.token_ids + [previous[source]]
            self._check_prefix(seq)
            for p in range(start, start + n):
                slot = seq.block_table[p // BLOCK] * BLOCK + p % BLOCK
                block = self.bm.blocks[seq.block_table[p // BLOCK]]
                assert block.ref_count == 1, "a token's KV would be written into a shared block"
                assert block.hash is None, "a token's KV would be written into a published block"
                self.kv[slot] = hash(tuple(tokens[: p + 1]))
        samples = [rng.randrange(VOCAB) if take else None for take in batch.sample]
        return [t for t in samples if t is not None]  # the device's [N] sampled tokens, in row order

    def _complete(self, batch, samples: list) -> None:
        """Read a launch back: rows of sequences no longer running are dropped, as engine._complete does."""
        it = iter(samples)
        sampled = []
        for seq, take in zip(batch.seqs, batch.sample, strict=True):
            token = next(it) if take else None
            sampled.append(token if seq.status is Status.RUNNING else None)
        for seq in self.sched.postprocess(batch, sampled):
            self.live.pop(seq.request_id, None)
        self.check()

    def _step_overlap(self, rng: random.Random) -> None:
        current, self.inflight = self.inflight, None
        if current is not None and not any(s.status is Status.RUNNING for s in current[0].seqs):
            current = None
        if current is None:
            if not self.sched.has_unfinished():
                return
            cached_before = {s.request_id: s.status for s in self.live.values()}
            batch = self.sched.schedule()
            assert batch.num_tokens >= 1, "a step with work to do made no progress"
            current = (batch, self._launch(batch, rng, cached_before))
        ahead = self.sched.schedule_ahead(current[0])
        if ahead is not None:
            self.num_ahead += 1
            self.num_ahead_with_prompts += ahead.starts is not None
            self.inflight = (ahead, self._launch(ahead, rng, previous=current[1]))
        self._complete(*current)

    def _check_prefix(self, seq: Sequence) -> None:
        """Every computed token of `seq` finds its own prefix's KV in its slot (cache hits included)."""
        for p in range(seq.num_computed_tokens):
            slot = seq.block_table[p // BLOCK] * BLOCK + p % BLOCK
            assert self.kv.get(slot) == hash(tuple(seq.token_ids[: p + 1])), f"{seq} reads foreign KV at {p}"

    def check(self) -> None:
        owners: dict[int, list[Sequence]] = {}
        for seq in self.sched.running:
            assert seq.status is Status.RUNNING
            for i, b in enumerate(seq.block_table):
                owners.setdefault(b, []).append((seq, i))
        for seq in self.sched.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        for block in self.bm.blocks:
            users = owners.get(block.block_id, [])
            assert block.ref_count == len(users), (
                f"block {block.block_id} ref count {block.ref_count} != {len(users)}"
            )
            assert (block.block_id in self.bm.free) == (block.ref_count == 0)
            if len(users) > 1:
                # Shared only as a cached, full prefix block of every owner.
                assert block.hash is not None
                for seq, i in users:
                    assert i < len(seq.block_hashes) and seq.block_hashes[i] == block.hash
                    assert block.token_ids == tuple(seq.token_ids[i * BLOCK : (i + 1) * BLOCK])
        for h, b in self.bm.cached.items():
            assert self.bm.blocks[b].hash == h
        free_cached = sum(1 for b in self.bm.free if self.bm.blocks[b].hash is not None)
        assert self.bm.num_cached_blocks == free_cached
        if bm_module.hash_block is REAL_HASH:  # a colliding hash strands a prefix's children by design (2^-64)
            _assert_every_cached_block_is_reachable(self.bm)
        assert len(self.sched.running) <= self.sched.max_num_seqs
        # Priority order: running by (priority, admission), the last being the next victim; waiting by priority.
        keys = [(seq.params.priority, seq.admit_order) for seq in self.sched.running]
        assert keys == sorted(keys), f"running out of (priority, admission) order: {keys}"
        waiting = [seq.params.priority for seq in self.sched.waiting]
        assert waiting == sorted(waiting), f"waiting out of priority order: {waiting}"

    def drain(self, rng: random.Random) -> None:
        for _ in range(5000):
            if not self.sched.has_unfinished() and self.inflight is None:
                break
            self.step(rng)
        assert not self.sched.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks


ops = st.lists(
    st.one_of(
        # (base prompt, length, max_tokens, priority): three priorities, so that preemption for priority happens
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 30), st.integers(1, 20), st.integers(-1, 1)),
        st.tuples(st.just("abort"), st.integers(0, 100)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=60,
)

BASES = [[1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2], [2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 0, 1, 0, 1, 0, 1, 0]]


def _prompt(rng: random.Random, base: int, length: int) -> list[int]:
    if base < len(BASES):  # a shared prefix, then random tokens
        prefix = BASES[base][:length]
        return prefix + [rng.randrange(VOCAB) for _ in range(length - len(prefix))]
    return [rng.randrange(VOCAB) for _ in range(length)]


def _run(ops_list, seed, num_blocks, budget, max_seqs, max_model_len, overlap=False):
    rng = random.Random(seed)
    sim = Sim(num_blocks, budget, max_seqs, max_model_len, overlap)
    for op in ops_list:
        if op[0] == "add":
            sim.add(_prompt(rng, op[1], op[2]), op[3], op[4])
        elif op[0] == "abort":
            sim.abort(op[1])
        else:
            for _ in range(op[1]):
                sim.step(rng)
    sim.drain(rng)
    return sim


# overlap: the same traffic with steps scheduled ahead, so aborts and stops land while a batch is in flight.
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops_list=ops,
    seed=st.integers(0, 2**16),
    num_blocks=st.integers(4, 24),
    budget=st.integers(4, 40),
    max_seqs=st.integers(1, 4),
    max_model_len=st.integers(8, 64),
)
def test_random_traffic_keeps_every_invariant(overlap, ops_list, seed, num_blocks, budget, max_seqs,
                                              max_model_len):
    _run(ops_list, seed, num_blocks, budget, max(1, min(max_seqs, budget)), max_model_len, overlap)


@settings(max_examples=60, deadline=None)
@given(ops_list=ops, seed=st.integers(0, 2**16))
def test_hash_collisions_never_splice_prefixes(ops_list, seed):
    """With a hash that collides constantly, hits must still be confirmed by token ids and parent."""
    original = bm_module.hash_block
    bm_module.hash_block = lambda parent, tokens: (sum(tokens) + parent) % 3
    try:
        _run(ops_list, seed, 16, 12, 3, 48)
    finally:
        bm_module.hash_block = original


def test_whole_prompt_hit_recomputes_last_block_into_its_own_block():
    bm = BlockManager(8, BLOCK)
    sched = Scheduler(bm, 4, 64)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]  # exactly two blocks
    first = Sequence("a", prompt, SamplingParams(max_tokens=2), 64)
    sched.add(first)
    batch = sched.schedule()
    sched.postprocess(batch, [0])
    second = Sequence("b", prompt, SamplingParams(max_tokens=2), 64)
    sched.add(second)
    batch = sched.schedule()
    n = dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens, strict=True))
    assert second.num_cached_tokens == BLOCK  # the first block is shared...
    assert n["b"] == BLOCK  # ...and the last block is recomputed into a fresh block
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]
    assert bm.blocks[second.block_table[1]].ref_count == 1


def test_eviction_takes_suffixes_before_prefixes():
    bm = BlockManager(6, BLOCK)
    sched = Scheduler(bm, 4, 64)
    seq = Sequence("a", list(range(12)) + [1], SamplingParams(max_tokens=1), 64)  # 3 full blocks + 1
    sched.add(seq)
    sched.postprocess(sched.schedule(), [0])
    assert seq.status is Status.FINISHED
    cached_order = [b for b in bm.free if bm.blocks[b].hash is not None]
    assert len(cached_order) == 3
    # Least recently freed first: each cached block is evicted before the block it hangs on.
    for child, parent in zip(cached_order, cached_order[1:], strict=False):
        assert bm.blocks[child].parent == bm.blocks[parent].ref


@pytest.mark.parametrize("num_blocks", [8, 9])
def test_two_requests_each_needing_half_the_pool_do_not_deadlock(num_blocks):
    sim = Sim(num_blocks, budget=4, max_seqs=2, max_model_len=64)
    sim.add([1] * 17, 15)  # 32 tokens -> 8 blocks at the end
    sim.add([2] * 17, 15)
    sim.drain(random.Random(0))


def test_random_traffic_does_exercise_cache_hits_and_preemption():
    """The invariants above mean something only if the traffic shares blocks and runs out of them."""
    rng, priorities = random.Random(0), random.Random(1)
    ops_list = []
    for _ in range(120):
        kind = rng.random()
        if kind < 0.45:
            ops_list.append(("add", rng.randrange(4), rng.randint(1, 30), rng.randint(1, 20),
                             priorities.choice((0, 0, 0, 1, -1))))
        elif kind < 0.55:
            ops_list.append(("abort", rng.randrange(100)))
        else:
            ops_list.append(("step", rng.randint(1, 4)))
    sim = _run(ops_list, seed=0, num_blocks=12, budget=16, max_seqs=4, max_model_len=48)
    assert sim.bm.prefix_hits > 0
    assert sim.sched.num_preemptions > 0
    sim = _run(ops_list, seed=0, num_blocks=12, budget=16, max_seqs=4, max_model_len=48, overlap=True)
    assert sim.bm.prefix_hits > 0 and sim.sched.num_preemptions > 0
    assert sim.num_ahead > 20  # and it really schedules ahead
    assert sim.num_ahead_with_prompts > 5  # beside prompt chunks too


def test_a_readmission_after_preemption_is_not_a_prompt_cache_hit():
    """A preempted sequence readmitted over its own cached blocks (generated tokens included) saves recompute,
    but its cached_tokens (prompt tokens served from the cache) and the hit rate must not count them: two
    prompts that share nothing report 0 cached tokens and no hits, preemption or not."""
    bm = BlockManager(6, BLOCK)
    sched = Scheduler(bm, 2, 64)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=15), 64)
    b = Sequence("b", [5, 4, 3, 2, 1], SamplingParams(max_tokens=15), 64)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.postprocess(batch, [rng.randrange(1, VOCAB - 1) if take else None for take in batch.sample])
    assert sched.num_preemptions > 0  # b was preempted and readmitted over its own published blocks
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    assert bm.prefix_hits == 0 and bm.prefix_queries == 10


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_preempted_sequence_is_readmitted_only_when_its_recompute_fits(prefix_caching):
    """Readmitted as soon as its first chunk fitted, a preempted long sequence recomputed into the same shortage
    and, as the newest, was preempted again: 74 preemptions and 94% of the computed tokens thrown away here
    (without prefix caching, which would otherwise hand it its blocks back)."""
    bm = BlockManager(24, BLOCK, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, 8, 16)
    seqs = [Sequence("a", list(range(1, 5)), SamplingParams(max_tokens=75, ignore_eos=True), 256),
            Sequence("b", list(range(100, 150)), SamplingParams(max_tokens=25, ignore_eos=True), 256)]
    for seq in seqs:
        sched.add(seq)
    computed = steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        computed += batch.num_tokens
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
        steps += 1
        assert steps < 1000
    assert all(s.status is Status.FINISHED for s in seqs)
    assert sched.num_preemptions <= 2, sched.num_preemptions
    useful = sum(s.num_prompt_tokens + s.num_output_tokens - 1 for s in seqs)
    assert computed <= 1.5 * useful, (computed, useful)


def _assert_every_cached_block_is_reachable(bm: BlockManager) -> None:
    """Each free block that holds a hash (counted by num_cached_blocks) is found by a lookup of the prefix it caches:
    its own tokens after those of its parents, followed back to the first block through the refs they name."""
    by_ref = {b.ref: b for b in bm.blocks if b.hash is not None}
    for block_id in bm.free:
        block = bm.blocks[block_id]
        if block.hash is None:
            continue
        chain, at = [block.token_ids], block
        while at.parent is not None:
            at = by_ref.get(at.parent)
            assert at is not None, f"cached block {block_id} is counted, but a block on its prefix left the cache"
            chain.append(at.token_ids)
        tokens = [t for ids in reversed(chain) for t in ids]
        probe = Sequence("probe", tokens + [0], SamplingParams(max_tokens=1), len(tokens) + 8)
        matched = bm.match_prefix(probe)
        assert matched[len(chain) - 1 : len(chain)] == [block_id], (
            f"cached block {block_id} is counted, but a lookup of its prefix finds {matched}")


def _drain_all(sched: Scheduler) -> int:
    """Run the scheduler to the end with a fake model; the prompt tokens computed."""
    computed = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens  # advanced by postprocess
            computed += max(0, min(start + n, seq.num_prompt_tokens) - start)
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
    return computed


def _step(sched: Scheduler, token: int = 1) -> None:
    """One step with a fake model that samples `token` for every row that samples."""
    batch = sched.schedule()
    sched.postprocess(batch, [token if take else None for take in batch.sample])


def test_a_prompt_of_repeated_blocks_is_cached_whole_and_prefixes_sharing_a_last_block_both_stay():
    """A block's hash is seeded with its parent's, so that it names the whole prefix through the block. Hashed on
    its own tokens alone, the three identical blocks of a prompt had one hash: only the first was cached, and the
    same prompt again hit 1 block, not 3. And of two prefixes ending in the same block, the later one's last block
    displaced the earlier one's, which then missed."""
    sched = Scheduler(BlockManager(32, BLOCK), 4, 64)
    repeated = [3] * (3 * BLOCK) + [1]
    ends_alike = {"x": [1] * BLOCK + [4] * BLOCK + [0], "y": [2] * BLOCK + [4] * BLOCK + [0]}
    for rid, prompt in [("r", repeated), *ends_alike.items()]:
        sched.add(Sequence(rid, prompt, SamplingParams(max_tokens=1), 64))
        _drain_all(sched)
    for rid, prompt in [("r", repeated), *ends_alike.items()]:
        again = Sequence(rid + "2", prompt, SamplingParams(max_tokens=1), 64)
        sched.add(again)
        _drain_all(sched)
        assert again.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK, rid  # every full block


def test_a_freed_block_holding_no_prefix_is_reused_before_cached_ones():
    """A freed block with no hash (a partial last block) goes to the front of the free list: the next block taken is
    it, not the least recently freed block that still caches a prefix. At the back, the cached prefix of a request
    that ended first was evicted for nothing."""
    bm = BlockManager(2, BLOCK)
    sched = Scheduler(bm, 4, 64)
    cached = [1, 2, 3, 4]  # one full block: published
    for rid, prompt in (("cached", cached), ("partial", [5, 6]), ("next", [6, 5])):  # each ends before the next
        sched.add(Sequence(rid, prompt, SamplingParams(max_tokens=1), 64))
        _drain_all(sched)
    assert bm.num_cached_blocks == 1
    hit = Sequence("hit", cached + [8], SamplingParams(max_tokens=1), 64)
    sched.add(hit)
    _drain_all(sched)
    assert hit.num_cached_tokens == BLOCK


def test_blocks_computed_after_an_unpublished_copy_are_found_through_the_cached_one():
    """b recomputes the last block of a prompt a cached whole (into a block of its own) while a still holds a's copy:
    b's copy is not published, and its children record a's copy as their parent, the one a lookup goes through.
    Recording b's copy, the block b generated next was never matched after a ended."""
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, 4, 64)
    prompt = list(range(1, 2 * BLOCK + 1))  # two whole blocks
    a = Sequence("a", prompt, SamplingParams(max_tokens=3), 64)
    b = Sequence("b", list(prompt), SamplingParams(max_tokens=BLOCK + 1), 64)
    sched.add(a)
    _step(sched)
    sched.add(b)
    _step(sched)  # b computes its copy of a's block 1 while a runs
    assert b.num_cached_tokens == BLOCK and a.status is Status.RUNNING
    _drain_all(sched)  # a ends, then b fills and publishes its block 2
    assert a.status is b.status is Status.FINISHED
    c = Sequence("c", b.token_ids[: 3 * BLOCK] + [0], SamplingParams(max_tokens=1), 64)
    assert len(bm.confirm(c, bm.match_prefix(c))) == 3


def test_a_burst_sharing_a_prompt_prefix_computes_it_once():
    """Eight requests with one 32-token system prompt arrive together. Hashes are published after the step, so
    each admitted in that step computed its own copy (and the cache counted copies no lookup could reach);
    now the first computes it and the rest, a step later, find it cached."""
    bm = BlockManager(200, BLOCK)
    sched = Scheduler(bm, 16, 512)
    system = list(range(1, 33))  # 8 blocks
    seqs = [Sequence(str(i), system + [40 + i, 41 + i], SamplingParams(max_tokens=3, ignore_eos=True), 256)
            for i in range(8)]
    for seq in seqs:
        sched.add(seq)
    computed = _drain_all(sched)
    assert [s.num_cached_tokens for s in seqs] == [0] + [32] * 7
    assert computed == 32 + 8 * 2
    reachable = {bm.cached[h] for h in bm.cached}
    assert bm.num_cached_blocks == len([b for b in bm.free if b in reachable])


def test_a_copy_computed_beside_a_cached_block_keeps_the_cached_blocks_children_reachable():
    """T computes a prompt block while S, admitted before T published it, computes its own copy; T goes on past it
    and finishes. When S published its copy, T's free one was cleared, and the blocks T computed after it (whose
    parent it was) stayed cached, counted, but no lookup could reach them: a next chat turn over T's prompt
    found one block of three. S's copy now takes the cleared one's place in the chain."""
    bm = BlockManager(16, 2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=6)

    def step():
        batch = sched.schedule()
        sched.postprocess(batch, [7 if take else None for take in batch.sample])

    sched.add(Sequence("F", [100, 101, 102, 103], SamplingParams(max_tokens=50), 64))  # takes budget: T is chunked
    sched.add(Sequence("T", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=1), 64))
    step()
    sched.add(Sequence("S", [1, 2, 3, 4, 50, 51, 52], SamplingParams(max_tokens=1), 64))
    step()  # T computes [3, 4] and [5, 6] and finishes; S, admitted over [1, 2], computes its own [3, 4]
    step()
    again = Sequence("T2", [1, 2, 3, 4, 5, 6, 9], SamplingParams(max_tokens=1), 64)
    assert len(bm.confirm(again, bm.match_prefix(again))) == 3
    _assert_every_cached_block_is_reachable(bm)


def test_a_head_waiting_for_blocks_is_not_rehashed_every_step(monkeypatch):
    """A request over a long cached document waiting at the head for blocks: each step looks it up again, and
    hashing its whole prefix every time cost 1.75 ms a step at 32k tokens. The hashes are memoized."""
    bm = BlockManager(40, BLOCK)
    sched = Scheduler(bm, 4, 64)
    doc = list(range(1, 121))  # 30 blocks
    first = Sequence("doc", doc + [1], SamplingParams(max_tokens=1), 512)
    sched.add(first)
    _drain_all(sched)  # the document is now cached
    hog = Sequence("hog", [2] * 8, SamplingParams(max_tokens=100, ignore_eos=True), 512)
    sched.add(hog)
    sched.postprocess(sched.schedule(), [1])
    # Too big to fit beside the hog: it waits at the head while the hog decodes.
    waiting = Sequence("again", doc + [3] * 100, SamplingParams(max_tokens=20), 512)
    sched.add(waiting)
    calls = []
    real = bm_module.hash_block
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: calls.append(1) or real(parent, tokens))
    for _ in range(20):
        batch = sched.schedule()
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
        assert waiting.status is Status.WAITING
    assert len(calls) < 40  # the hog's own new blocks, and the waiting prefix hashed once (not 20 x 31)


@pytest.mark.parametrize("length", [31, 32, 33])
def test_identical_prompts_are_admitted_together_whatever_their_length(length):
    """A prompt of a whole number of blocks always recomputes its last block, so a request waiting for that
    block to be published waited in vain, and identical prompts were admitted one a step (the run behind
    them too)."""
    bm = BlockManager(200, BLOCK)
    sched = Scheduler(bm, 16, 512)
    seqs = [Sequence(str(i), list(range(1, length + 1)), SamplingParams(max_tokens=3, ignore_eos=True), 256)
            for i in range(8)]
    for seq in seqs:
        sched.add(seq)
    admitted_per_step = []
    while sched.has_unfinished():
        before = sum(s.status is not Status.WAITING for s in seqs)
        batch = sched.schedule()
        admitted_per_step.append(sum(s.status is not Status.WAITING for s in seqs) - before)
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
    assert admitted_per_step[:2] == [1, 7], admitted_per_step


def _sched(num_blocks: int = 64, max_seqs: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_seqs, budget)


def _seq(rid: str, length: int = 6, priority: int = 0, max_tokens: int = 8) -> Sequence:
    """A request whose prompt is its own (drawn from its id), so that no two share a prefix block."""
    rng = random.Random(rid)
    return Sequence(rid, [rng.randrange(VOCAB) for _ in range(length)],
                    SamplingParams(max_tokens=max_tokens, priority=priority), 64)


def test_waiting_requests_are_admitted_in_priority_then_arrival_order():
    sched = _sched(max_seqs=1)
    for rid, priority in (("a0", 0), ("b1", 1), ("c0", 0), ("d9", -1), ("e1", 1)):
        sched.add(_seq(rid, priority=priority))
    assert [s.request_id for s in sched.waiting] == ["d9", "a0", "c0", "b1", "e1"]
    admitted = []
    while sched.has_unfinished():
        batch = sched.schedule()
        for seq in batch.seqs:
            if seq.request_id not in admitted:
                admitted.append(seq.request_id)
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
    assert admitted == ["d9", "a0", "c0", "b1", "e1"]


def test_a_lower_value_preempts_the_last_running_for_a_slot_and_nothing_else_does():
    """max_num_seqs 2, both slots held by priority 1: a priority-0 arrival preempts the newer of them and runs in
    the same step; the victim goes back to the front of its priority and resumes once a slot frees. Arrivals of an
    equal or higher value wait, and an arrival that fits preempts nothing."""
    sched = _sched(max_seqs=2)
    old, new = _seq("o1", priority=1), _seq("n1", priority=1)
    sched.add(old)
    sched.add(new)
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["o1", "n1"]
    sched.add(_seq("t1", priority=1))  # equal: waits
    sched.schedule()
    assert sched.num_preemptions == 0 and [s.request_id for s in sched.running] == ["o1", "n1"]
    urgent = _seq("u0", priority=0)
    sched.add(urgent)
    batch = sched.schedule()
    assert sched.num_preemptions == 1 and new.status is Status.WAITING and new.block_table == []
    assert [s.request_id for s in sched.running] == ["u0", "o1"] and urgent in batch.seqs
    assert [s.request_id for s in sched.waiting] == ["n1", "t1"]  # the victim before the later arrival


def test_a_lower_value_preempts_for_blocks_until_its_first_chunk_fits():
    """Room for the slots but not the blocks: running priority-2 sequences are preempted, newest first, until the
    arrival's first chunk fits; no more than that."""
    sched = _sched(num_blocks=8, max_seqs=8)
    first, second, third = (_seq(rid, length=8, priority=2) for rid in ("a2", "b2", "c2"))
    for seq in (first, second, third):  # 2 blocks each: 6 of 8 taken
        sched.add(seq)
    sched.schedule()
    assert sched.bm.num_free_blocks == 2
    urgent = _seq("u0", length=22, priority=0)  # 6 blocks for its 22 tokens: 2 free, 2 per victim
    sched.add(urgent)
    batch = sched.schedule()
    assert third.status is Status.WAITING and second.status is Status.WAITING and first.status is Status.RUNNING
    assert sched.num_preemptions == 2 and urgent in batch.seqs


def test_no_preemption_that_cannot_make_room():
    """A priority-1 sequence holds 2 blocks, a priority-0 one 6 of the 10; a priority-0 arrival needing 5 blocks
    cannot fit even if the priority-1 one goes (2 + 2 free): it is not preempted (its work would be lost, and it
    would then wait behind the arrival)."""
    sched = _sched(num_blocks=10, max_seqs=8)
    big, low = _seq("b0", length=24, priority=0), _seq("l1", length=8, priority=1)
    sched.add(big)
    sched.add(low)
    sched.schedule()
    assert sched.bm.num_free_blocks == 2
    sched.add(_seq("h0", length=20, priority=0))
    sched.schedule()
    assert sched.num_preemptions == 0 and low.status is Status.RUNNING


def _long(rid: str, length: int, priority: int) -> Sequence:
    rng = random.Random(rid)
    return Sequence(rid, [rng.randrange(VOCAB) for _ in range(length)],
                    SamplingParams(max_tokens=4, priority=priority), 4096)


def test_an_urgent_arrival_is_not_held_back_by_a_low_priority_prefill():
    """A priority-5 prompt of 1,000 tokens is prefilling in chunks of the whole budget; a priority -1 request of
    10 tokens arrives, with slots and blocks to spare. It used to wait out the whole prefill (15 steps of 64
    tokens): running prefills took the budget before admission. It now starts in the next step, and the prefill
    takes what is left of that step's budget."""
    sched = Scheduler(BlockManager(400, BLOCK), 8, 64)
    low = _long("low", 1000, priority=5)
    sched.add(low)
    sched.postprocess(sched.schedule(), [None])
    urgent = _long("urgent", 10, priority=-1)
    sched.add(urgent)
    batch = sched.schedule()
    assert dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens, strict=True)) == {"urgent": 10, "low": 64 - 10}
    assert [s.request_id for s in sched.running] == ["urgent", "low"] and sched.num_preemptions == 0
    # With one priority, the running prefill keeps the budget first (the arrival starts after it), as before.
    sched = Scheduler(BlockManager(400, BLOCK), 8, 64)
    first = _long("first", 1000, priority=0)
    sched.add(first)
    sched.postprocess(sched.schedule(), [None])
    sched.add(_long("later", 10, priority=0))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["first"] and batch.num_new_tokens == [64]


def test_no_preemption_for_an_arrival_the_budget_cannot_start():
    """Two slots: a priority 9 sequence decoding, a priority -2 prompt of 1,000 tokens prefilling. A priority -1
    arrival needs a slot, but the more urgent prefill takes the whole budget for 15 more steps: the priority 9
    sequence used to be preempted at once for it, and then waited, its work lost, as long as the arrival did.
    It is preempted when the arrival can start."""
    sched = Scheduler(BlockManager(400, BLOCK), 2, 64)
    victim = Sequence("v9", [3] * 5, SamplingParams(max_tokens=500, priority=9, ignore_eos=True), 4096)
    sched.add(victim)
    sched.postprocess(sched.schedule(), [1])
    urgent = _long("a", 1000, priority=-2)
    sched.add(urgent)
    sched.postprocess(sched.schedule(), [1, None])
    arrival = _long("u", 10, priority=-1)
    sched.add(arrival)
    steps = 0
    while arrival.status is Status.WAITING:
        batch = sched.schedule()
        if arrival.status is Status.WAITING:
            assert victim.status is Status.RUNNING and sched.num_preemptions == 0
        sched.postprocess(batch, [1 if take else None for take in batch.sample])
        steps += 1
    assert sched.num_preemptions == 1 and victim.status is Status.WAITING
    # It starts in the step that ends the prefill (63 tokens a step beside the decode, 63 done before it came),
    # with what that step leaves.
    assert urgent.num_computed_tokens == 1000 and arrival in batch.seqs and steps == -(-(1000 - 63) // 63)

def test_the_decodes_of_victims_that_stay_count_against_the_arrivals_budget():
    """Budget 8, 6 blocks of 16: four priority-1 sequences decode, a priority-0 prompt has 5 to 7 tokens left. A
    priority-0 arrival needs one block, so the newest priority-1 sequence would have to go; but the three that
    stay decode first (3 tokens) and the prefill takes the rest: the arrival could not start. It used to be
    preempted anyway (its work lost while the arrival waited): only the arrival's own-priority work was counted."""
    sched = Scheduler(BlockManager(6, 16), 10, 8)
    low = [Sequence(f"v{i}", [1, 2], SamplingParams(max_tokens=100, priority=1, ignore_eos=True), 4096)
           for i in range(4)]
    for seq in low:
        sched.add(seq)

    def step():
        batch = sched.schedule()
        sched.postprocess(batch, [3 if take else None for take in batch.sample])
        return batch

    step()
    prefill = Sequence("A", list(range(30)), SamplingParams(max_tokens=5, priority=0), 4096)
    sched.add(prefill)
    while len(prefill.token_ids) - prefill.num_computed_tokens not in range(5, 8):
        step()
    arrival = Sequence("W", [4, 5], SamplingParams(max_tokens=5, priority=0), 4096)
    sched.add(arrival)
    batch = step()
    assert sched.num_preemptions == 0 and all(seq.status is Status.RUNNING for seq in low)
    assert arrival.status is Status.WAITING and sum(batch.num_new_tokens) == 8

def test_many_arrivals_behind_one_low_priority_request_cost_a_step_each():
    """A new request is placed from the end of the queue: behind one low-priority request, 4,000 default ones are
    placed in order without scanning the queue each time."""
    sched = _sched()
    sched.add(_seq("w9", priority=9))
    for i in range(4000):
        sched.add(_seq(f"a{i}"))
    order = [seq.request_id for seq in sched.waiting]
    assert order[-1] == "w9" and order[:3] == ["a0", "a1", "a2"] and len(order) == 4001


def test_a_hash_collision_between_two_prefixes_is_not_spliced(monkeypatch):
    """Prefixes A and B differ in block 0, and (one 64-bit collision) B's chain hash at block 1 equals A's. Block 2,
    computed after A, matched by hash, parent hash and its own tokens for B + block 2's tokens: its KV, computed
    after A, would have been read as if after B. A match now follows the very parent block it was computed after.

    And a collision found when a match is confirmed (D, after B0, hashes as B1 while B1 is in use) takes the
    colliding hash out of the cache, so that D's own block is published in its place and the next request over
    B0 + D hits it: kept, the block in use was never displaced and every later request over B0 + D missed D."""
    real = bm_module.hash_block
    a, b, c, d = [1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 2, 2, 0], [5, 5, 5, 5], [4, 4, 4, 4]
    a1, b0 = real(real(0, a[:4]), a[4:]), real(0, b[:4])
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: (
        a1 if (parent == b0 and list(tokens) in (b[4:], d)) else real(parent, tokens)))
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, 4, 64)
    for rid, prompt in (("x", a + c + [3]), ("y", b + [3])):  # caches A0 A1 C (C after A), then B0 and B1
        sched.add(Sequence(rid, prompt, SamplingParams(max_tokens=1), 64))
        while sched.has_unfinished():
            batch = sched.schedule()
            sched.postprocess(batch, [1 if take else None for take in batch.sample])
    spliced = Sequence("s", b + c + [3], SamplingParams(max_tokens=1), 64)
    assert len(bm.confirm(spliced, bm.match_prefix(spliced))) <= 2  # B's own blocks at most, never C

    holder = Sequence("h", b + [3], SamplingParams(max_tokens=50), 64)  # takes B0 and B1 from the cache, keeps them
    first_d = Sequence("d1", b[:4] + d + [3], SamplingParams(max_tokens=50), 64)  # finds B1 by hash: confirmed away
    for seq in (holder, first_d):
        sched.add(seq)
        _step(sched)
    assert first_d.num_cached_tokens == BLOCK and first_d.block_table[1] != holder.block_table[1]
    second_d = Sequence("d2", b[:4] + d + [3], SamplingParams(max_tokens=1), 64)
    assert bm.confirm(second_d, bm.match_prefix(second_d)) == first_d.block_table[:2]


def test_a_full_queue_is_displaced_from_its_newest_highest_value_that_has_produced_nothing():
    """Scheduler.displaceable (the service's queue limit): the last waiting sequence of a higher value than the
    arrival's, unless it has produced tokens (a preempted one: its client has them), and never one of an equal
    or lower value."""
    sched = _sched(max_seqs=2)
    old, new = _seq("o1", priority=1), _seq("n1", priority=1)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    sched.postprocess(batch, [1 if take else None for take in batch.sample])
    assert new.num_output_tokens == 1
    sched.add(_seq("u0", priority=0))
    sched.schedule()  # u0 preempts n1, which waits at the front of priority 1 with a token produced
    for rid, priority in (("t1", 1), ("w2", 2), ("x2", 2)):
        sched.add(_seq(rid, priority=priority))
    assert [s.request_id for s in sched.waiting] == ["n1", "t1", "w2", "x2"]
    assert sched.displaceable(0).request_id == "x2" and sched.displaceable(1).request_id == "x2"
    assert sched.displaceable(2) is None and sched.displaceable(5) is None
    for rid in ("x2", "w2"):
        sched.abort(next(s for s in sched.waiting if s.request_id == rid))
    assert sched.displaceable(0).request_id == "t1" and sched.displaceable(1) is None
    sched.abort(sched.waiting[1])
    assert [s.request_id for s in sched.waiting] == ["n1"] and sched.displaceable(0) is None  # it has a token
