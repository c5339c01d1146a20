"""Continuous batching: which sequences run this step, and how many tokens each computes.

Pure Python: no torch, no grpc.

Each step:
0. Priority (SamplingParams.priority, lower first): while the first waiting sequence has a lower value than
   the last running one and does not fit (no free slot under max_num_seqs, or too few blocks for its first
   chunk), that running sequence is preempted; never when the token budget would not admit it anyway.
1. Running sequences, in (priority, admission) order. A decoding sequence computes its one new token; a
   sequence still prefilling computes a chunk of whatever budget is left after reserving one token per decode,
   so a long prompt never stalls the running streams. When blocks run out, the last running sequence (the
   lowest priority, most recently admitted) is preempted: its blocks are freed and it is requeued at the front
   of its priority to recompute.
2. If nothing was preempted in 1, waiting sequences are admitted in (priority, arrival) order (prefix-cache
   lookup first) while the sequence cap, the token budget and the free blocks allow. Those of a lower value
   than a running prefill are admitted before it takes its chunk, so a long low-priority prompt does not hold
   an urgent request back for the whole of its prefill.

With one priority (the default, 0) the orders are plain admission and arrival. Every step makes progress: the
first running sequence is always scheduled, because admission refused any request whose worst case does not
fit the pool on its own.
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, islice
from operator import attrgetter, eq

from engine_service.block_manager import BlockManager
from engine_service.outputs import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP
from engine_service.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: sequences with their token counts; rows computing one token come first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Whether the step reaches the end of each sequence's tokens, so its last logits are sampled.
    sample: list[bool] = field(default_factory=list)
    # Set on a batch scheduled ahead (schedule_ahead): for each sequence, the row of the previous batch's
    # sampled tokens that is its input token. None on a batch from schedule(). In a batch scheduled ahead with
    # prompt chunks (`starts` set), None marks a row whose tokens are already in the sequence.
    input_rows: list[int | None] | None = None
    # Set on a batch scheduled ahead with prompt chunks: the position each row's tokens start at (the previous
    # batch, still in flight, has not advanced num_computed_tokens yet). None: num_computed_tokens, or for rows
    # with an input row, len(seq).
    starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class WaitingQueue:
    """The waiting sequences in (priority, place) order, as the scheduler reads them (`[0]`, `[-1]`, iteration either
    way, `len`), with any one taken out in O(1): each priority's sequences are an insertion-ordered dict. A deque's
    remove scans from the front, so aborting 10,000 queued requests (a client's mass disconnect, close()) held the
    engine's loop 0.7 s, 20,000 2.6 s."""

    __slots__ = ("_levels", "_priorities", "_len")

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[Sequence, None]] = {}
        self._priorities: list[int] = []  # those with a waiting sequence, ascending
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Sequence]:
        for p in self._priorities:
            yield from self._levels[p]

    def __reversed__(self) -> Iterator[Sequence]:
        for p in reversed(self._priorities):
            yield from reversed(self._levels[p])

    def __contains__(self, seq: object) -> bool:
        level = self._levels.get(seq.params.priority) if isinstance(seq, Sequence) else None
        return level is not None and seq in level

    @property
    def head_priority(self) -> int | None:
        """The priority of the first waiting sequence (the lowest value waiting); None when none waits."""
        return self._priorities[0] if self._priorities else None

    def __getitem__(self, i: int) -> Sequence:
        if i == 0 and self._len:
            return next(iter(self._levels[self._priorities[0]]))
        if not -self._len <= i < self._len:
            raise IndexError(f"waiting queue index {i} out of range (it holds {self._len})")
        if i == -1:
            return next(reversed(self._levels[self._priorities[-1]]))
        if i < 0:
            return next(islice(reversed(self), -i - 1, None))
        return next(islice(self, i, None))

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Put seq behind the others of its priority, or before them (front)."""
        p = seq.params.priority
        level = self._levels.get(p)
        if level is None:
            level = self._levels[p] = OrderedDict()
            bisect.insort(self._priorities, p)
        level[seq] = None
        if front:
            level.move_to_end(seq, last=False)
        self._len += 1

    def popleft(self) -> Sequence:
        seq = self[0]
        self.remove(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        p = seq.params.priority
        level = self._levels.get(p)
        if level is None or seq not in level:
            raise ValueError(f"sequence {seq.request_id!r} is not in the waiting queue")
        del level[seq]
        self._len -= 1
        if not level:
            del self._levels[p]
            self._priorities.remove(p)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []  # in (priority, admission) order: the last is the next victim
        self.num_preemptions = 0
        self.num_admissions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new request behind every waiting one of its priority or a lower value."""
        self._queue(seq, front=False)

    def _queue(self, seq: Sequence, front: bool) -> None:
        """Put seq in `waiting`, which is in priority order: behind the others of its priority, or before them
        (front: a preempted sequence, which was admitted before any of them)."""
        self.waiting.add(seq, front)

    def recover(self, seqs: Iterable[Sequence]) -> int:
        """After an interrupt (Ctrl-C) inside schedule() or schedule_ahead(): put back each live sequence that was
        taken off one queue and not yet put on the other (admitted or preempted halfway), its blocks freed, at the
        front of the waiting queue, as a preempted one. Left as it was, it was in neither: never scheduled again,
        never reported, its blocks held, and aborting it raised "not in the waiting queue". Returns how many."""
        running = {id(s) for s in self.running}
        lost = [s for s in seqs if s.status is not Status.FINISHED and id(s) not in running and s not in self.waiting]
        for seq in lost:
            self.bm.free_sequence(seq)
            seq.status = Status.WAITING
            self._queue(seq, front=True)
        return len(lost)

    def _run(self, seq: Sequence) -> None:
        """Put a newly admitted seq in `running`, behind every running one of its priority or a lower value."""
        p, running = seq.params.priority, self.running
        if not running or running[-1].params.priority <= p:
            running.append(seq)  # one priority: always here
        else:
            running.insert(next(i for i, other in enumerate(running) if other.params.priority > p), seq)

    def _make_room(self) -> None:
        """Step 0: preempt running sequences of a higher priority value than the first waiting one, the last first,
        until it fits (a slot under max_num_seqs, and the blocks for its first chunk over its cached prefix, or
        for its whole recompute if it was preempted). Nothing is preempted when all of them together would not make
        it fit (an equal or lower value holds the room): their work would be thrown away for nothing."""
        head = self.waiting[0]
        p = head.params.priority
        budget, taken = self._room_below(p)
        if budget <= 0:
            return  # running sequences of its priority or a lower value take the whole step: it could not start
        matched = self.bm.match_prefix(head) if head.prompt_logprobs is None else []  # preempting keeps it valid
        need = self._admission_need(head, matched, budget)
        victims = [seq for seq in self.running if seq.params.priority > p]  # the end of `running`
        k = self._fewest_victims(matched, need, victims, taken, budget, chunked=head.admit_order < 0)
        if not k:
            return
        for seq in reversed(victims[len(victims) - k:]):
            self._preempt(seq)

    def displaceable(self, priority: int) -> Sequence | None:
        """The waiting sequence a request of this priority takes the place of when the service's queue is full: the
        last in waiting order (the highest priority value, the newest) of a higher value than `priority` that has
        produced no token. A preempted sequence that has produced tokens is never displaced: its client has them."""
        for seq in reversed(self.waiting):
            if seq.params.priority <= priority:
                return None
            if seq.num_output_tokens == 0:
                return seq
        return None

    def _room_below(self, p: int) -> tuple[int, int]:
        """The token budget left for admitting a sequence of priority p, and the blocks taken before it: the
        decodes and prefill chunks of the running sequences of priority p or a lower value are served first this
        step (those of a higher value are the victims, whose decodes preempting them gives back), and take the
        blocks their new tokens cross into. Room made for it without those blocks was taken by them again, and
        the next step preempted once more (27 preemptions over 18 steps for a 4-block arrival)."""
        ahead = [(seq, len(seq.token_ids) - seq.num_computed_tokens) for seq in self.running if seq.params.priority <= p]
        budget = self.max_num_batched_tokens - sum(1 for _, uncomputed in ahead if uncomputed == 1)  # decodes first
        taken, bm = 0, self.bm
        for seq, uncomputed in ahead:
            n = 1 if uncomputed == 1 else min(uncomputed, max(budget, 0))
            if uncomputed > 1:
                budget -= n
            taken += max(0, bm.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table))
        return budget, taken

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _fewest_victims(self, matched: list[int], need: int, victims: list[Sequence], taken: int = 0,
                        budget: int | None = None, chunked: bool = False) -> int | None:
        """How many of `victims`, the fewest from the end, must be preempted for a sequence over `matched` needing
        `need` tokens to be admitted (0: it fits now), or None when preempting all of them would not do: it needs a
        slot, and blocks (a block is freed when every sequence holding it is a victim; a matched block that is free,
        or freed, is taken from the free ones), beside the `taken` blocks the sequences ahead of the victims take
        this step, and those the decodes of the victims that stay take: the first of them that is a prefill comes
        after the sequence is admitted (schedule()), and so do the ones behind it.

        budget: the tokens the step leaves it before the victims' decodes, which schedule() serves first: where
        those of the victims that stay take it all once it fits, None (it could not start). chunked: `need` is a
        first chunk the budget caps (a new request), so it is smaller by what they take (counted at the whole
        budget, it could cost a victim for one more prompt token).

        One pass over the victims' block tables, from the end, stopping where it fits, after a bound from their
        lengths that answers None at once when even every block they hold would not do (a long preempted request
        waiting for room that running ones of its own priority hold, every step). Counting all the victims' blocks
        first, and again for each candidate, took 70 ms for 256 victims of 32k tokens where one victim made room,
        and 90 ms every step of such a wait. What is left: victims sharing most of their blocks with a running
        sequence that is no victim (a long common prefix) are walked in full while the request cannot fit."""
        blocks, bm = self.bm.blocks, self.bm
        if len(self.running) - len(victims) >= self.max_num_seqs:
            return None
        fresh = bm.blocks_needed(need) - len(matched) + taken
        from_free = sum(1 for block_id in matched if blocks[block_id].ref_count == 0)
        # Each freed matched block counts on both sides, so only the victims' other blocks can make room.
        if from_free + fresh > bm.num_free_blocks + sum(len(seq.block_table) for seq in victims):
            return None
        # grown[j]: the blocks the first j victims' decodes take if they stay (up to the first prefill among them);
        # decoding[j]: the tokens the decodes among the first j take from the budget.
        grown, decoding, size = [0], [0], bm.block_size
        prefilled = False  # a prefill among them so far: the decodes behind it come after the sequence is admitted
        for seq in victims:
            decode = len(seq.token_ids) - seq.num_computed_tokens == 1
            decoding.append(decoding[-1] + decode)
            prefilled = prefilled or not decode
            if not prefilled:
                grown.append(grown[-1] + (seq.num_computed_tokens >= len(seq.block_table) * size))
        cached = len(matched) * size
        in_match = set(matched)
        holders: Counter[int] = Counter()
        freed = 0
        ref_count, block_of = attrgetter("ref_count"), blocks.__getitem__
        for k in range(len(victims) + 1):
            if k:
                table = victims[-k].block_table
                holders.update(table)
                # Its blocks whose every holder is now a victim (a block's holders never outnumber its ref count).
                # Mapped in C: a Python loop per block took 3.5 times as long.
                last = list(compress(table, map(eq, map(ref_count, map(block_of, table)),
                                                map(holders.__getitem__, table))))
                freed += len(last)
                if in_match:
                    from_free += len(in_match.intersection(last))
            staying = len(victims) - k
            left = budget - decoding[staying] if budget is not None else 1
            want = fresh if left <= 0 or not chunked else bm.blocks_needed(min(need, cached + left)) - len(matched) + taken
            if (len(self.running) - k < self.max_num_seqs
                    and from_free + want + grown[min(staying, len(grown) - 1)] <= bm.num_free_blocks + freed):
                # Where the decodes of the victims that stay take the budget it would start with, none is preempted:
                # more victims would only make room in the budget, and these would lose their work while it waits.
                return k if left > 0 else None
        return None

    # ---- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        computing: set[int] = set()  # see _admit
        preempted = False
        head = self.waiting.head_priority
        if head is not None and self.running and self.running[-1].params.priority > head:
            self._make_room()
        # Every sequence in `running` is RUNNING, so is_decoding is one uncomputed token (inlined: per step
        # and per sequence).
        decodes_left = sum(1 for s in self.running if len(s.token_ids) - s.num_computed_tokens == 1)
        slots_per_block = self.bm.block_size
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            if uncomputed == 1:
                n = 1
                decodes_left -= 1
            else:
                head = self.waiting.head_priority
                if not preempted and head is not None and head < seq.params.priority:
                    # Waiting sequences of a lower value are admitted before this prefill takes its chunk. They
                    # go into `running` before it: it stays the next to schedule, and the victims stay after it.
                    budget -= self._admit(picked, budget - decodes_left, computing, below=seq.params.priority)
                    i = self.running.index(seq)
                n = min(uncomputed, budget - decodes_left)
                if n <= 0:
                    i += 1
                    continue
            if seq.num_computed_tokens + n <= len(seq.block_table) * slots_per_block:
                # Its blocks have room for the new tokens (most decode steps): nothing to take or preempt.
                picked.append((seq, n))
                budget -= n
                i += 1
                continue
            while not self.bm.can_append(seq, n):
                victim = self.running[-1]
                if victim.is_decoding and victim is not seq:
                    decodes_left -= 1
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq preempted itself: it was the last running sequence
            self.bm.append_slots(seq, n)
            picked.append((seq, n))
            budget -= n
            i += 1

        if not preempted:
            self._admit(picked, budget, computing)
        return self._batch(picked)

    def schedule_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The step after `batch`, scheduled while `batch` still computes; None when it depends on its results.

        Overlap scheduling (see engine.py). Called before `batch`'s tokens are appended and its computed counts
        advanced. Every running sequence must be in `batch`; then:
        - each that samples a token in `batch` decodes it (at position len(seq)), except those it brings to
          max_len. A sampled stop token cannot be foreseen: its sequence computes one row in vain and
          postprocess skips it;
        - each still prefilling takes its next chunk, from where `batch`'s chunk ends, in what the token budget
          leaves after the decodes;
        - waiting requests are admitted in what is left, as schedule() admits them, except that one whose next
          prompt block `batch` is computing waits (that block is published once `batch` is read back).
        Never with a JSON-mode request running (its allowed tokens follow from the token being sampled), and
        never where schedule() might preempt: when the new blocks do not fit, or a waiting request has a lower
        priority value than a running one, it returns None and the next step is scheduled normally.
        """
        if not self.running:
            return None
        rows: dict[Sequence, int] = {}
        chunks: dict[Sequence, int] = {}  # sequences prefilling in `batch` -> where their chunk there ends
        for seq, n, take in zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True):
            if take:
                rows[seq] = len(rows)
            else:
                chunks[seq] = seq.num_computed_tokens + n
        if any(seq not in rows and seq not in chunks for seq in self.running):
            return None  # left out of `batch`: schedule() must decide
        if any(seq.params.response_format is not None for seq in self.running):
            return None  # a JSON-mode request's next mask depends on the token `batch` samples
        head = self.waiting.head_priority
        if head is not None and head < self.running[-1].params.priority:
            return None  # schedule() may preempt for it
        bs = self.bm.block_size
        if not chunks and not self.waiting:  # the steady state of decoding: every running sequence decodes
            picked = [seq for seq in self.running if len(seq.token_ids) + 1 < seq.max_len]
            if not picked:
                return None
            # The sequences whose blocks have no room for one more token: each needs exactly one more block.
            growing = [seq for seq in picked if len(seq.token_ids) + 1 > len(seq.block_table) * bs]
            if len(growing) > self.bm.num_free_blocks:
                return None
            for seq in growing:
                self.bm.grow_to(seq, len(seq.token_ids) + 1)
            n = len(picked)
            return ScheduledBatch(picked, [1] * n, [True] * n, [rows[seq] for seq in picked])
        # Steps with prompt chunks: (sequence, start, tokens, input row or None), decodes first.
        plan: list[tuple[Sequence, int, int, int | None]] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq in rows and len(seq.token_ids) + 1 < seq.max_len:
                plan.append((seq, len(seq.token_ids), 1, rows[seq]))
                budget -= 1
        for seq in self.running:
            if seq in chunks and budget > 0:
                start = chunks[seq]
                n = min(len(seq.token_ids) - start, budget)
                plan.append((seq, start, n, None))
                budget -= n
        need = sum(max(0, self.bm.blocks_needed(start + n) - len(seq.block_table)) for seq, start, n, _ in plan)
        if need > self.bm.num_free_blocks:
            return None
        for seq, start, n, _ in plan:
            self.bm.grow_to(seq, start + n)
        if self.waiting and budget > 0:
            computing: set[int] = set()  # see _admit: the prompt blocks `batch` and what follows it will compute
            if self.bm.enable_prefix_caching:
                # Every sequence computing prompt blocks in `batch`, those whose prompt ends there (sampling in
                # `batch`) included: their blocks are published only once `batch` is read back.
                for seq in batch.seqs:
                    if seq.status is Status.RUNNING and seq.num_computed_tokens < seq.num_prompt_tokens:
                        computing.update(self.bm.prompt_hashes(seq, seq.num_computed_tokens // bs))
            admitted: list[tuple[Sequence, int]] = []
            self._admit(admitted, budget, computing)
            plan += [(seq, seq.num_computed_tokens, n, None) for seq, n in admitted]
        if not plan:
            return None
        if all(row is not None for _, _, _, row in plan):
            # Decodes only (nothing admitted, no chunk left): the pure-decode form, which CUDA graphs can run.
            return ScheduledBatch([seq for seq, _, _, _ in plan], [1] * len(plan), [True] * len(plan),
                                  [row for _, _, _, row in plan])
        plan.sort(key=lambda p: p[2] != 1)  # one-token rows first, as _batch orders them
        return ScheduledBatch(
            [seq for seq, _, _, _ in plan],
            [n for _, _, n, _ in plan],
            [row is not None or start + n == len(seq.token_ids) for seq, start, n, row in plan],
            [row for _, _, _, row in plan],
            [start for _, start, _, _ in plan],
        )

    def _admit(self, picked: list[tuple[Sequence, int]], budget: int, computing: set[int],
               below: int | None = None) -> int:
        """Admit waiting sequences (of a priority value under `below`, if given) into `picked` within `budget`
        tokens; returns the tokens they take.

        computing: the hashes of the prompt blocks this step's admissions will compute. A request whose next block
        is one of them waits a step and then finds it cached, rather than computing its own copy: a burst of
        requests sharing a system prompt computes it once, not once per request that fits the step (a prompt
        longer than the budget is partly computed twice: docs/ENGINE.md says why that is left so)."""
        start = budget
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if below is not None and seq.params.priority >= below:
                break
            # A request still owed prompt logprobs computes its whole prompt: cached blocks have no logits.
            matched = self.bm.match_prefix(seq) if seq.prompt_logprobs is None else []
            if computing and seq.prompt_logprobs is None and self.bm.next_prompt_hash(seq, matched) in computing:
                break
            need = self._admission_need(seq, matched, budget)
            if not self.bm.can_admit(matched, need):
                break  # checked before confirming the match: a head waiting for blocks costs lookups only
            confirmed = self.bm.confirm(seq, matched)
            if len(confirmed) < len(matched):  # a hash collision: a shorter match needs more blocks
                matched, need = confirmed, self._admission_need(seq, confirmed, budget)
                if not self.bm.can_admit(matched, need):
                    break
            n = min(len(seq) - len(matched) * self.bm.block_size, budget)
            if self.bm.enable_prefix_caching:
                computing.update(self.bm.prompt_hashes(seq, len(matched)))
            self.waiting.popleft()
            self.bm.admit(seq, matched, looked_up=seq.prompt_logprobs is None)
            self.bm.append_slots(seq, n)
            seq.status = Status.RUNNING
            seq.admit_order = self.num_admissions
            self.num_admissions += 1
            self._run(seq)
            picked.append((seq, n))
            budget -= n
        return start - budget

    def _admission_need(self, seq: Sequence, matched: list[int], budget: int) -> int:
        """Tokens `seq` must have room for to be admitted over `matched`. A new request needs its first chunk.
        A preempted one needs its whole recompute: readmitted on a first chunk, it would recompute into the
        same shortage and be preempted again (the newest is the victim), over and over."""
        cached = len(matched) * self.bm.block_size
        return cached + min(len(seq) - cached, budget) if seq.admit_order < 0 else len(seq)

    @staticmethod
    def _batch(picked: list[tuple[Sequence, int]]) -> ScheduledBatch:
        # One-token rows first: the attention backends batch them on their decode path.
        picked.sort(key=lambda p: p[1] != 1)
        return ScheduledBatch(
            [seq for seq, _ in picked],
            [n for _, n in picked],
            [seq.num_computed_tokens + n == len(seq.token_ids) for seq, n in picked],
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_sequence(seq)
        seq.status = Status.WAITING
        self._queue(seq, front=True)
        self.num_preemptions += 1

    # ---- after the forward pass ----------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance computed counts, publish full blocks, append sampled tokens; return finished seqs."""
        finished = []
        bm = self.bm
        caching, bs = bm.enable_prefix_caching, bm.block_size
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            if seq.status is not Status.RUNNING:
                continue  # aborted between schedule and postprocess
            seq.num_computed_tokens += n
            if caching and seq.num_computed_tokens // bs > len(seq.block_hashes):
                bm.publish(seq)  # a block became full (publish's own loop is empty otherwise)
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        length = len(seq.token_ids)  # per sequence and step: no properties
        if length - seq.num_prompt_tokens >= p.min_tokens:
            if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
                return FINISH_STOP
        if length >= seq.max_len:
            return FINISH_LENGTH
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.bm.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self.finish(seq, FINISH_ABORT)
