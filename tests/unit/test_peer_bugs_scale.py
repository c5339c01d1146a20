"""The engine's host bookkeeping at production scale: costs other servers shipped as quadratic or as linear per step,
checked by counting operations (never by timing) at two sizes.

Measurements of the same costs with the real classes, before and after the fixes, are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import random
from collections import Counter

from engine_service.block_manager import BlockManager
from engine_service.sampling_params import SamplingParams
from engine_service.scheduler import Scheduler, WaitingQueue
from engine_service.sequence import Sequence, Status

BLOCK = 4


class CountingSeq(Sequence):
    """A Sequence that counts the comparisons made with it (a deque's remove compares every element it passes)."""

    __slots__ = ()
    comparisons = 0

    def __eq__(self, other):
        CountingSeq.comparisons += 1
        return self is other

    __hash__ = Sequence.__hash__


class CountingList(list):
    """A list that counts how many of its elements are read through iteration or slices."""

    reads = 0

    def __iter__(self):
        CountingList.reads += len(self)
        return super().__iter__()

    def __getitem__(self, key):
        if isinstance(key, slice):
            CountingList.reads += len(range(*key.indices(len(self))))
        return super().__getitem__(key)


def _seq(rid: str, length: int = 6, priority: int = 0, max_tokens: int = 8, cls=Sequence) -> Sequence:
    rng = random.Random(rid)
    return cls(rid, [rng.randrange(1000) for _ in range(length)],
               SamplingParams(max_tokens=max_tokens, priority=priority), 10**7)


def _running(sched: Scheduler, seq: Sequence, tokens: int) -> Sequence:
    """Put `seq` in `running` holding its own blocks for `tokens` computed tokens, as an admission leaves it."""
    sched.bm.admit(seq, [])
    sched.bm.append_slots(seq, tokens)
    seq.num_computed_tokens = tokens
    seq.status = Status.RUNNING
    seq.admit_order = sched.num_admissions
    sched.num_admissions += 1
    sched.running.append(seq)
    return seq


def _abort_comparisons(n: int) -> int:
    sched = Scheduler(BlockManager(64, BLOCK), max_num_seqs=1, max_num_batched_tokens=64)
    seqs = [_seq(f"r{i}", priority=i % 3, cls=CountingSeq) for i in range(n)]
    for seq in seqs:
        sched.add(seq)
    CountingSeq.comparisons = 0
    for seq in reversed(seqs):  # newest first: the far end of a front-to-back scan
        sched.abort(seq)
    assert not sched.waiting and len(sched.waiting) == 0
    return CountingSeq.comparisons


def test_aborting_queued_requests_does_not_scan_the_queue():
    """Peers aborted a queued request with a scan of the waiting queue: a mass disconnect of 10,000 queued
    streams was quadratic (0.7 s on the engine's loop here, 2.6 s for 20,000)."""
    small, large = _abort_comparisons(100), _abort_comparisons(2000)
    assert large <= 2 * max(small, 1) and large < 2000, (small, large)


def test_the_waiting_queue_keeps_priority_then_place_order_through_adds_and_removals():
    """An independent model of the order: a list kept sorted by priority, a new request behind the others of its
    priority, a preempted one (front) before them."""
    rng = random.Random(7)
    queue, model, seqs = WaitingQueue(), [], []
    for step in range(600):
        op = rng.random()
        if op < 0.5 or not model:
            seq = _seq(f"s{step}", priority=rng.choice((-1, 0, 0, 2)))
            front = rng.random() < 0.3
            queue.add(seq, front)
            p = seq.params.priority
            at = (next((i for i, s in enumerate(model) if s.params.priority >= p), len(model)) if front
                  else next((i for i, s in enumerate(model) if s.params.priority > p), len(model)))
            model.insert(at, seq)
            seqs.append(seq)
        elif op < 0.8:
            seq = rng.choice(model)
            queue.remove(seq)
            model.remove(seq)
            assert seq not in queue
        else:
            assert queue.popleft() is model.pop(0)
        assert list(queue) == model and list(reversed(queue)) == model[::-1] and len(queue) == len(model)
        if model:
            i = rng.randrange(-len(model), len(model))
            assert queue[0] is model[0] and queue[-1] is model[-1] and queue[i] is model[i]
            assert all(s in queue for s in model)


def _schedule_params_reads(num_waiting: int) -> int:
    """How often one schedule() reads a waiting request's params with `num_waiting` queued behind a head that has
    no slot (max_num_seqs reached)."""
    reads = Counter()

    class Watched(Sequence):
        __slots__ = ()

        @property
        def params(self):
            reads["params"] += 1
            return Sequence.params.__get__(self)

        @params.setter
        def params(self, value):
            Sequence.params.__set__(self, value)

    sched = Scheduler(BlockManager(4096, BLOCK), max_num_seqs=8, max_num_batched_tokens=256)
    for i in range(8):
        _running(sched, _seq(f"run{i}", length=9, priority=1), 8).token_ids.append(1)
    for i in range(num_waiting):
        sched.add(_seq(f"w{i}", priority=i % 2, cls=Watched))
    reads.clear()
    sched.schedule()
    return reads["params"]


def test_a_step_with_a_long_queue_reads_only_its_head():
    """Peers walked the whole waiting queue every step (10,000 queued requests made every step slow). Here the
    priority-0 head preempts a priority-1 sequence, which goes back before the other priority-1 requests: the old
    queue found that place with a scan from the front, once per preemption."""
    assert _schedule_params_reads(5000) <= _schedule_params_reads(5) + 2


def _make_room_table_reads(num_victims: int, fits: bool) -> int:
    """Block-table elements read by one _make_room: `num_victims` priority-5 sequences of 64 tokens (16 blocks
    each) run; a preempted priority-0 request at the head needs its whole recompute, which one victim's blocks
    make room for (fits), or more than every victim and the free blocks hold."""
    blocks_per = 16
    sched = Scheduler(BlockManager(num_victims * blocks_per + 40, BLOCK), max_num_seqs=num_victims + 4,
                      max_num_batched_tokens=4096)  # the victims that stay decode in it first
    # Decodes short of their last block's end, so that the step takes no block for them (_room_below).
    holder = _running(sched, _seq("holder", length=32, max_tokens=1), 31)  # priority 0: 8 blocks, never a victim
    for i in range(num_victims):
        _running(sched, _seq(f"v{i}", length=64, priority=5, max_tokens=1), 63)
    free = sched.bm.num_free_blocks
    want = free + (blocks_per // 2 if fits else num_victims * blocks_per + 1)
    head = _seq("head", length=want * BLOCK, max_tokens=1)
    head.admit_order = 0  # preempted before: it needs its whole recompute
    sched.add(head)
    for seq in sched.running:
        seq.block_table = CountingList(seq.block_table)
    CountingList.reads = 0
    sched._make_room()
    assert sched.num_preemptions == (1 if fits else 0)
    assert holder.status is Status.RUNNING
    return CountingList.reads


def test_making_room_for_an_urgent_request_reads_only_the_victims_it_preempts():
    """Counting every victim's blocks for each candidate number of victims, and all of them every step while the
    request could not fit, took 70-90 ms for 256 victims of 32k tokens (and was quadratic in the victims)."""
    assert _make_room_table_reads(200, fits=True) <= _make_room_table_reads(10, fits=True)
    assert _make_room_table_reads(200, fits=False) == 0


def _brute_fewest_victims(sched: Scheduler, matched: list[int], need: int, victims: list[Sequence]) -> int | None:
    bm = sched.bm
    for k in range(len(victims) + 1):
        gone = victims[len(victims) - k:]
        holders = Counter(b for seq in gone for b in seq.block_table)
        freed = {b for b, n in holders.items() if bm.blocks[b].ref_count == n}
        taken = sum(1 for b in matched if bm.blocks[b].ref_count == 0 or b in freed)
        fresh = bm.blocks_needed(need) - len(matched)
        grown = 0  # the staying victims' decodes ahead of the first staying prefill: each at a block's end takes one
        for seq in victims[:len(victims) - k]:
            if len(seq) - seq.num_computed_tokens > 1:
                break
            grown += seq.num_computed_tokens == len(seq.block_table) * bm.block_size
        if len(sched.running) - k < sched.max_num_seqs and taken + fresh + grown <= bm.num_free_blocks + len(freed):
            return k
    return None


def test_the_fewest_victims_match_a_brute_force_count_with_shared_prefixes():
    rng = random.Random(3)
    for trial in range(60):
        bm = BlockManager(rng.randrange(20, 60), BLOCK)
        sched = Scheduler(bm, max_num_seqs=rng.randrange(3, 9), max_num_batched_tokens=64)
        prefixes = [[rng.randrange(50) for _ in range(BLOCK * rng.randrange(1, 4))] for _ in range(3)]
        for i in range(rng.randrange(2, 8)):
            seq = Sequence(f"{trial}-{i}", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))],
                           SamplingParams(max_tokens=1, priority=rng.choice((0, 5, 5))), 10**6)
            matched = bm.confirm(seq, bm.match_prefix(seq))
            if not bm.can_admit(matched, len(seq) - 1) or len(sched.running) >= sched.max_num_seqs:
                break
            bm.admit(seq, matched)
            bm.append_slots(seq, len(seq) - 1 - len(matched) * BLOCK)
            seq.num_computed_tokens = len(seq) - 1
            bm.publish(seq)
            seq.status = Status.RUNNING
            sched.running.append(seq)
        sched.running.sort(key=lambda s: s.params.priority)
        head = Sequence("h", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 40))],
                        SamplingParams(max_tokens=1), 10**6)
        matched = bm.match_prefix(head)
        victims = [s for s in sched.running if s.params.priority > 0]
        for need in (len(head), rng.randrange(1, len(head) + 1), rng.randrange(1, bm.num_blocks * BLOCK + 1)):
            assert sched._fewest_victims(matched, need, victims) == _brute_fewest_victims(sched, matched, need,
                                                                                          victims)


def _decode_token_reads(context: int) -> int:
    sched = Scheduler(BlockManager(context // BLOCK + 64, BLOCK), max_num_seqs=4, max_num_batched_tokens=64)
    seq = _running(sched, _seq("long", length=context + 1, max_tokens=200), context)
    sched.bm.publish(seq)
    seq.token_ids = CountingList(seq.token_ids)
    CountingList.reads = 0
    for _ in range(40):
        batch = sched.schedule()
        assert batch.num_new_tokens == [1]
        sched.schedule_ahead(batch)  # grows the table ahead when the next token needs a block
        sched.postprocess(batch, [7])
    return CountingList.reads


def test_a_decode_step_does_not_copy_the_sequence_s_tokens():
    """Peers copied a sequence's token list (or re-hashed its prefix) every step: O(len) a step, quadratic over a
    long request."""
    assert _decode_token_reads(32_768) <= _decode_token_reads(64) + 8


def test_a_request_that_needs_every_victim_s_blocks_preempts_them_all_and_one_more_block_none():
    sched = Scheduler(BlockManager(40, BLOCK), max_num_seqs=8, max_num_batched_tokens=256)
    victims = [_running(sched, _seq(f"v{i}", length=17, priority=5), 16) for i in range(3)]  # 4 blocks each
    exact = (sched.bm.num_free_blocks + 12) * BLOCK
    assert sched._fewest_victims([], exact, victims) == 3
    assert sched._fewest_victims([], exact + 1, victims) is None
