"""The scheduler's, the engine loop's and request validation's rules at their exact edges: token budgets met
exactly, stop ids beside ignore_eos, the min_tokens guard, the watchdog's progress stamp, failures apart and in a row,
priority ties, and validation bounds. Each test was written against a change of one comparison or one line that the
rest of the suite let pass (a mutation audit)."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine_service.block_manager import BlockManager
from engine_service.engine_loop import EngineLoop
from engine_service.sampling_params import SamplingParams
from engine_service.scheduler import Scheduler
from engine_service.sequence import Sequence, Status
from engine_service.validation import check_deadline_ms, check_request_id, sampling_params_from_proto
from protos.llmserve.engine.v1 import engine_pb2 as pb
from tests.fake_engine import FakeEngine


def _step(s: Scheduler, token: int = 1):
    b = s.schedule()
    s.postprocess(b, [token if t else None for t in b.sample])
    return b


def test_stop_token_ids_stop_a_request_that_ignores_eos():
    """ignore_eos ignores the EOS ids only: a stop token id still ends the request (checked only when ignore_eos was
    off, it ran on to max_tokens)."""
    s = Scheduler(BlockManager(16, 4), 4, 16, eos_token_ids={5})
    q = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(2,)), 64)
    s.add(q)
    _step(s, 1)
    _step(s, 5)
    assert q.status is Status.RUNNING
    _step(s, 2)
    assert q.finish_reason == "stop"


def test_eos_before_min_tokens_does_not_stop_in_postprocess():
    """The scheduler's own min_tokens guard (the engine also bans EOS until then): an EOS as the second of at least
    three tokens does not finish the request; one as the third does."""
    s = Scheduler(BlockManager(16, 4), 4, 16, eos_token_ids={5})
    q = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=3), 64)
    s.add(q)
    _step(s, 1)
    _step(s, 5)
    assert q.status is Status.RUNNING
    _step(s, 5)
    assert q.finish_reason == "stop"


def test_no_preemption_when_higher_priority_prefill_takes_exactly_the_budget():
    """An arrival that cannot start this step (an urgent prefill takes exactly the token budget) preempts nobody:
    a budget counted one token high preempted a victim for nothing."""
    s = Scheduler(BlockManager(64, 4), 2, 8)
    v = Sequence("v", [1], SamplingParams(max_tokens=50, priority=9, ignore_eos=True), 256)
    s.add(v)
    _step(s)
    a = Sequence("a", list(range(15)), SamplingParams(max_tokens=5, priority=0), 256)
    s.add(a)
    _step(s)
    assert len(a.token_ids) - a.num_computed_tokens == 8
    s.add(Sequence("u", [4, 4, 4], SamplingParams(max_tokens=5, priority=1), 256))
    _step(s)
    assert s.num_preemptions == 0 and v.status is Status.RUNNING


def test_no_preemption_when_the_victims_that_stay_take_exactly_the_budget():
    """When the decodes of the victims that would stay take exactly what the budget leaves, preempting the others
    cannot make room for the arrival: nobody is preempted (a "< 0" check preempted at exactly 0)."""
    s = Scheduler(BlockManager(6, 16), 10, 8)
    low = [Sequence(f"v{i}", [1, 2], SamplingParams(max_tokens=100, priority=1, ignore_eos=True), 4096)
           for i in range(4)]
    for q in low:
        s.add(q)
    _step(s, 3)
    a = Sequence("A", list(range(25)), SamplingParams(max_tokens=5, priority=0), 4096)
    s.add(a)
    while len(a.token_ids) - a.num_computed_tokens != 5:
        _step(s, 3)
    s.add(Sequence("W", [4, 5], SamplingParams(max_tokens=5, priority=0), 4096))
    _step(s, 3)
    assert s.num_preemptions == 0 and all(q.status is Status.RUNNING for q in low)


@pytest.mark.parametrize("prefill_victim", [False, True])
def test_room_made_for_an_arrival_counts_the_blocks_the_staying_decodes_take(prefill_victim):
    """Room was counted from the blocks free before the step; the decodes served before the arrival (its own
    priority's, and the victims' that stay) then crossed into new blocks and took them, the arrival was not
    admitted, and the next step preempted again: 27 preemptions over 18 steps for a 4-block arrival. The blocks
    they take are now counted, so it starts in the first step, for the fewest victims that make room for both.
    A victim's prefill comes after the arrival (schedule() admits it before the chunk): the decodes of victims
    behind it take their blocks too late to count."""
    bs = 16
    s = Scheduler(BlockManager(64, bs, enable_prefix_caching=False), 128, 512)
    tokens = iter(range(1, 10**6))

    def seq(rid, length, priority, max_tokens=1000):
        return Sequence(rid, [next(tokens) % 500 for _ in range(length)],
                        SamplingParams(max_tokens=max_tokens, priority=priority, ignore_eos=True), 10**5)

    urgent = [seq(f"hi{i}", bs + 1 + i, 0) for i in range(16)]  # 2 blocks each, one of them fills one a step
    low = [seq(f"lo{i}", 1, 1) for i in range(32)]  # a block each, far from its end
    for q in urgent + low:
        s.add(q)
    _step(s)
    assert s.bm.num_free_blocks == 0 and s.num_preemptions == 0
    if prefill_victim:  # the first victim's prefill goes after the arrival: the victims' decodes behind it as well
        s.running.remove(low[0])
        s.bm.free_sequence(low[0])  # one block free
        s.bm.admit(low[0], [])
        low[0].num_computed_tokens = 0
        low[0].token_ids += [7] * (bs - 1)  # a chunk that needs blocks of its own
        for q in low[1:4]:  # decodes at a block's end, behind the prefill
            q.num_computed_tokens = 0
            q.token_ids[:] = [1] * (bs + 1)
            q.num_computed_tokens = bs
        s.running.insert(16, low[0])
    growing = sum(q.num_computed_tokens == len(q.block_table) * bs for q in urgent)
    arrival = seq("urgent", 4 * bs, 0, max_tokens=4)
    s.add(arrival)
    s._make_room()  # schedule()'s first move, here alone to count what it preempts
    made = s.num_preemptions
    _step(s)
    assert growing == 1 and arrival.status is Status.RUNNING and arrival.num_computed_tokens == 4 * bs
    # One-block victims: the arrival's four and the urgent decode's one, less the block free beforehand. (Later in
    # the step the victims' own prefill and decodes preempt others of them for their blocks, as without it.)
    assert made == 4 + growing - prefill_victim


def test_room_for_a_first_chunk_counts_it_after_the_staying_victims_decodes():
    """The arrival's first chunk was counted at the whole budget, though the decodes of the victims that stay come
    out of it first: one token more crossed into a block, and a victim was preempted for that one prompt token,
    where the arrival started anyway with the chunk the budget really left it."""
    s = Scheduler(BlockManager(4, 16, enable_prefix_caching=False), 8, 18)

    def running(seq, computed):
        s.bm.admit(seq, [])
        s.bm.append_slots(seq, computed)
        seq.num_computed_tokens, seq.status = computed, Status.RUNNING
        seq.admit_order, s.num_admissions = s.num_admissions, s.num_admissions + 1
        s.running.append(seq)

    params = lambda priority: SamplingParams(max_tokens=100, priority=priority, ignore_eos=True)  # noqa: E731
    running(Sequence("A", list(range(17)), params(0), 10**6), 16)  # urgent decode at its block's end: a block
    victim = Sequence("V", [5, 6], params(1), 10**6)
    running(victim, 1)  # a decode with room in its block
    arrival = Sequence("H", list(range(100, 140)), params(0), 10**6)
    s.add(arrival)
    assert s.bm.num_free_blocks == 2
    batch = s.schedule()
    chunks = dict(zip([q.request_id for q in batch.seqs], batch.num_new_tokens, strict=True))
    assert s.num_preemptions == 0 and victim.status is Status.RUNNING
    assert chunks == {"A": 1, "V": 1, "H": 16}  # 18 less the two decodes


def test_a_chunk_scheduled_ahead_stays_within_the_token_budget():
    """A prefill chunk scheduled ahead (overlap scheduling) takes at most max_num_batched_tokens, as one scheduled
    in turn does."""
    s = Scheduler(BlockManager(64, 4), 4, 8)
    s.add(Sequence("a", list(range(30)), SamplingParams(max_tokens=4), 256))
    b = s.schedule()
    ahead = s.schedule_ahead(b)
    assert b.num_tokens == 8 and ahead is not None and ahead.num_tokens == 8


def test_request_id_length_bound_is_256():
    """Request ids are at most 256 characters, as docs/SERVICES.md says."""
    check_request_id("x" * 256)
    with pytest.raises(ValueError, match="at most 256"):
        check_request_id("x" * 257)


def test_deadline_ms_is_milliseconds():
    """deadline_ms is milliseconds (0: none): 1500 is a second and a half, not fifteen."""
    assert check_deadline_ms(0) is None and check_deadline_ms(1500) == 1.5


def test_an_unknown_response_format_number_is_a_value_error():
    """A response_format number this engine does not know is refused as the request's INVALID_ARGUMENT (a
    ValueError), not a KeyError that would end the whole bidi call INTERNAL."""
    sp = pb.SamplingParams()
    sp.response_format = 7
    with pytest.raises(ValueError, match="response_format 7"):
        sampling_params_from_proto(sp, {})


@pytest.mark.parametrize("fields,says", [
    ({"logprobs": 25}, "or None (on the wire: unset) for none"),
    ({"seed": -1}, "or None (on the wire: unset) for a fresh one"),
    ({"json_schema": '{"type": "object"}'}, "got response_format None (free text) and json_schema set"),
])
def test_refusals_of_wire_requests_name_the_unset_field_as_the_wire_does(fields, says):
    """The refusals a gRPC caller reads came in Python's words only: "or None" and "response_format None" for what
    the wire calls an unset field (RESPONSE_FORMAT_TEXT for the format)."""
    with pytest.raises(ValueError) as refused:
        sampling_params_from_proto(pb.SamplingParams(**fields), {})
    assert says in str(refused.value)


def test_last_progress_advances_while_the_loop_steps():
    """The watchdog reads last_progress: it must advance with every step of a busy engine, or a healthy engine
    running one long request would be failed as stalled."""
    async def main():
        loop = EngineLoop(FakeEngine(step_s=0.04), asyncio.get_running_loop(), lambda m: None)
        loop.start()
        done = asyncio.Event()

        class Sink:
            def on_output(self, o):
                if o.finished:
                    done.set()

            def on_failure(self, c, m):
                done.set()

        loop.add("busy", [1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), Sink())
        worst = 0.0
        while not done.is_set():
            worst = max(worst, time.monotonic() - loop.last_progress)
            await asyncio.sleep(0.05)
        loop.stop()
        return worst

    assert asyncio.run(main()) < 1.0


def test_step_failures_that_are_not_in_a_row_are_not_fatal():
    """Failed steps are fatal only in a row: a good step resets the count, so three failures apart fail their
    requests and the engine goes on."""
    from tests.unit.test_engine_loop_failures import _run

    sinks, fatal, loop = asyncio.run(_run({2, 5, 8}))
    assert not fatal and loop.failure is None
    assert sum(s.failure is not None for s in sinks.values()) == 3


def test_outranks_only_a_strictly_higher_value():
    """A request outranks the queue only with a strictly lower priority value than one waiting there: an equal one
    displaces nobody."""
    async def main():
        loop = EngineLoop(FakeEngine(), asyncio.get_running_loop(), lambda m: None)
        loop.start()

        class Sink:
            def on_output(self, o): ...
            def on_failure(self, c, m): ...

        loop.add("a", [1, 2, 3], SamplingParams(max_tokens=2, priority=0), Sink())
        result = (loop.outranks(0), loop.outranks(-1))
        loop.stop()
        return result

    assert asyncio.run(main()) == (False, True)


def test_a_release_cut_short_and_run_again_frees_each_block_once():
    """Scheduler.recover runs free_sequence again over a sequence whose release a Ctrl-C cut short: the blocks
    released before the interrupt were released again (a ref count of -1, "freed more often than taken")."""
    from collections import OrderedDict

    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("r", list(range(1, 13)), SamplingParams(max_tokens=4), 64)
    bm.admit(seq, [])
    bm.append_slots(seq, 12)
    assert len(seq.block_table) == 3

    class Interrupting(OrderedDict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if len(self) == 6:  # the second block released
                raise KeyboardInterrupt

    bm.free = Interrupting(bm.free)
    with pytest.raises(KeyboardInterrupt):
        bm.free_sequence(seq)
    bm.free = OrderedDict(bm.free)
    bm.free_sequence(seq)
    assert [b.ref_count for b in bm.blocks] == [0] * 8 and bm.num_free_blocks == 8 and seq.block_table == []
