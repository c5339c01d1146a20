"""A step that raises fails only its own requests; failures in a row end the engine."""

from __future__ import annotations

import asyncio
import logging

from clients.logs import REQUEST_LOGGER
from engine_service.engine_loop import MAX_CONSECUTIVE_STEP_FAILURES, EngineLoop
from engine_service.metrics import EngineMetrics
from engine_service.outputs import FINISH_ERROR, StepOutput
from engine_service.sampling_params import SamplingParams
from tests.fake_engine import FakeEngine


class StepFailed(RuntimeError):
    """Like EngineStepError: the failed step's requests, already removed from the engine, in .outputs."""

    def __init__(self, outputs: list[StepOutput]):
        super().__init__("boom")
        self.outputs = outputs


class FlakyEngine(FakeEngine):
    def __init__(self, failing_steps: set[int]):
        super().__init__(step_s=0.001)
        self.failing_steps, self.n = failing_steps, 0

    def step(self, on_launch=None) -> list[StepOutput]:
        self.n += 1
        if self.n in self.failing_steps and self.running:
            victim = self.running.pop(0)
            del self.reqs[victim]
            raise StepFailed([StepOutput(victim, finish_reason=FINISH_ERROR, error="step failed: boom")])
        return super().step(on_launch)


class Sink:
    def __init__(self, done: asyncio.Event):
        self.tokens: list[int] = []
        self.outputs = 0
        self.failure: tuple[str, str] | None = None
        self.finished, self.done = False, done

    def on_output(self, output: StepOutput) -> None:
        self.outputs += 1
        self.tokens += output.new_token_ids
        if output.finished:
            self.finished = True
            self.done.set()

    def on_failure(self, code: str, message: str) -> None:
        self.failure = (code, message)
        self.done.set()


async def _run(failing_steps: set[int]):
    fatal: list[str] = []
    loop = EngineLoop(FlakyEngine(failing_steps), asyncio.get_running_loop(), fatal.append)
    loop.start()
    sinks = {}
    for rid in ("a", "b", "c", "d"):
        sinks[rid] = Sink(asyncio.Event())
        loop.add(rid, [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), sinks[rid])
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks.values())), 10)
    loop.stop()
    return sinks, fatal, loop


def test_one_failed_step_fails_its_request_and_the_rest_go_on():
    sinks, fatal, loop = asyncio.run(_run({3}))
    assert sinks["a"].failure == ("INTERNAL", "step failed: boom")
    for rid in "bcd":
        assert sinks[rid].finished and len(sinks[rid].tokens) == 20 and sinks[rid].failure is None
    assert fatal == [] and loop.failure is None
    # What health reads of traffic (engine_service/health.py): outputs handed to requests, requests the engine failed
    assert loop.outputs_delivered == sum(s.outputs for s in sinks.values()) >= 3  # b, c and d got theirs
    assert loop.requests_failed == 1


def test_failures_in_a_row_are_fatal():
    sinks, fatal, loop = asyncio.run(_run(set(range(3, 3 + MAX_CONSECUTIVE_STEP_FAILURES))))
    assert len(fatal) == 1 and loop.failure is not None
    # Three requests failed with their steps; the fourth with the engine.
    assert all(s.failure is not None and s.failure[0] == "INTERNAL" for s in sinks.values())
    assert "engine failure" in sinks["d"].failure[1]


def test_a_dying_loop_gives_every_live_request_its_line_and_count(caplog):
    """When the loop dies, the requests still in flight are counted and logged as errors, each with its own
    line, like the ones whose steps failed before (the consumer thread owns the metrics and does it)."""

    async def run():
        fatal: list[str] = []
        loop = EngineLoop(FlakyEngine(set(range(3, 3 + MAX_CONSECUTIVE_STEP_FAILURES))),
                          asyncio.get_running_loop(), fatal.append)
        loop.metrics = EngineMetrics("fake", lambda: {}, lambda: 0)
        loop.start()
        sinks = {rid: Sink(asyncio.Event()) for rid in ("a", "b", "c", "d")}
        for rid, sink in sinks.items():
            loop.add(rid, [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), sink, trace_id=f"trace-{rid}")
        await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks.values())), 10)
        loop.stop()
        return loop, fatal

    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        loop, fatal = asyncio.run(run())
    assert len(fatal) == 1
    lines = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == REQUEST_LOGGER}
    assert set(lines) == {"trace-a", "trace-b", "trace-c", "trace-d"}, lines
    assert all(f["finish_reason"] == FINISH_ERROR for f in lines.values())
    assert "engine failure" in lines["trace-d"]["error"] and lines["trace-d"]["prompt_tokens"] == 3
    assert loop.metrics.finished[FINISH_ERROR] == 4


def test_an_idle_loop_notices_a_dead_tensor_parallel_worker():
    """Nothing watched the workers between requests: one killed while idle was found by the next request."""

    class WorkerLost(FakeEngine):
        def check_workers(self) -> None:
            from engine_service.engine import EngineDeadError

            raise EngineDeadError("tensor-parallel worker rank 1 was killed by signal 9")

    async def main() -> list[str]:
        fatal: list[str] = []
        loop = EngineLoop(WorkerLost(), asyncio.get_running_loop(), fatal.append)
        loop.start()
        for _ in range(60):  # the idle loop wakes once a second
            if fatal:
                break
            await asyncio.sleep(0.05)
        loop.stop()
        return fatal

    (message,) = asyncio.run(main())
    assert "rank 1 was killed by signal 9" in message


class AdmissionBug(FakeEngine):
    """add_request raises something other than ValueError for request "b" (a RecursionError out of a schema
    compiler once did): the loop must refuse that request alone."""

    def __init__(self):
        super().__init__(step_s=0.001)

    def add_request(self, request_id, prompt_token_ids, sampling_params):
        if request_id == "b":
            raise RecursionError("maximum recursion depth exceeded")
        super().add_request(request_id, prompt_token_ids, sampling_params)


def test_an_admission_that_raises_refuses_its_request_alone():
    async def run():
        fatal: list[str] = []
        loop = EngineLoop(AdmissionBug(), asyncio.get_running_loop(), fatal.append)
        loop.start()
        sinks = {rid: Sink(asyncio.Event()) for rid in "abc"}
        for rid, sink in sinks.items():
            loop.add(rid, [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True), sink)
        await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks.values())), 10)
        loop.stop()
        return sinks, fatal, loop

    sinks, fatal, loop = asyncio.run(run())
    assert sinks["b"].failure == ("INTERNAL", "the engine failed admitting this request: RecursionError: maximum recursion "
                                         "depth exceeded")  # INTERNAL, not INVALID_ARGUMENT
    assert all(sinks[r].finished and len(sinks[r].tokens) == 10 for r in "ac")
    assert fatal == [] and loop.failure is None


def test_an_admission_that_fails_on_the_device_leaves_nothing_behind(tmp_path, monkeypatch):
    import pytest

    from tests.integration.tiny import exact_engine, make_qwen3

    make_qwen3(tmp_path / "m")
    with exact_engine(tmp_path / "m") as llm:
        def oom(params):
            raise RuntimeError("CUDA out of memory (injected)")

        monkeypatch.setattr(llm.runner.sampler, "bias_tensors", oom)
        with pytest.raises(RuntimeError, match="injected"):
            llm.add_request("r", [1, 2, 3], SamplingParams(seed=3, logit_bias={5: 1.0}))
        assert not llm.generators and not llm.biases and not llm.seqs and not llm.has_unfinished_requests()


def test_a_full_queue_never_displaces_the_health_canary():
    """The canary has the lowest priority value there is, so no request displaces it from a full queue: a
    displaced canary read as a failed engine (NOT_SERVING until the next canary) under exactly the load that
    fills the queue."""
    from engine_service.health import Health

    async def main():
        loop = EngineLoop(FakeEngine(max_num_seqs=1, step_s=0.005), asyncio.get_running_loop(), lambda _: None)
        loop.start()
        busy = Sink(asyncio.Event())
        loop.add("busy", [1], SamplingParams(max_tokens=20, ignore_eos=True), busy)  # holds the only slot
        canary = asyncio.create_task(Health([]).canary(loop, 100, timeout_s=10))
        await asyncio.sleep(0.05)  # the canary waits behind "busy"
        urgent = Sink(asyncio.Event())
        loop.add("urgent", [1], SamplingParams(max_tokens=2, priority=-2**31), urgent, if_full=("queue is full", 1))
        problem = await canary
        await asyncio.wait_for(urgent.done.wait(), 10)
        loop.stop()
        return problem, urgent.failure

    problem, urgent_failure = asyncio.run(main())
    assert problem is None
    assert urgent_failure == ("RESOURCE_EXHAUSTED", "queue is full")  # nothing of a higher value waited


async def _queue_of_three(step_s: float, priorities: tuple[int, int, int]):
    """A loop over a one-slot fake engine: "busy" runs, "w1" and "w2" wait (the engine thread has applied them)."""
    engine = FakeEngine(max_num_seqs=1, max_model_len=64, step_s=step_s)
    loop = EngineLoop(engine, asyncio.get_running_loop(), lambda _: None)
    loop.start()
    sinks = {rid: Sink(asyncio.Event()) for rid in ("busy", "w1", "w2", "new")}
    for rid, priority in zip(("busy", "w1", "w2"), priorities, strict=True):
        loop.add(rid, [1], SamplingParams(max_tokens=50, ignore_eos=True, priority=priority), sinks[rid])
    for _ in range(200):
        if engine.waiting == ["w1", "w2"]:
            break
        await asyncio.sleep(0.01)
    assert engine.waiting == ["w1", "w2"], engine.waiting
    return loop, engine, sinks


async def _settled(loop, engine, sinks):
    """Once "new" waits in the engine: (the engine's waiting queue, the failures of w1, w2 and new); stops the loop."""
    for _ in range(200):
        if "new" in engine.waiting:
            break
        await asyncio.sleep(0.01)
    waiting = list(engine.waiting)
    loop.stop()
    return waiting, [sinks[rid].failure for rid in ("w1", "w2", "new")]


def test_a_request_the_engine_refuses_displaces_nobody_and_the_victim_is_the_highest_value():
    """The victim was aborted before add_request had checked the arrival, so an invalid request (a stop id
    outside the vocabulary, too many KV blocks) evicted a legitimate waiting one from a full queue, again and
    again. And of several higher values the highest goes, then the newest."""
    async def main():
        loop, engine, sinks = await _queue_of_three(0.05, (5, 9, 5))
        full = ("the engine's queue is full", 2)
        loop.add("bad", [1] * 100, SamplingParams(max_tokens=5, priority=0), sinks["new"], if_full=full)
        await asyncio.wait_for(sinks["new"].done.wait(), 10)
        bad = sinks["new"].failure
        await asyncio.sleep(0.1)
        untouched = [sinks[rid].failure for rid in ("w1", "w2")]
        good = Sink(asyncio.Event())
        loop.add("good", [1], SamplingParams(max_tokens=50, ignore_eos=True, priority=0), good, if_full=full)
        await asyncio.wait_for(sinks["w1"].done.wait(), 10)
        waiting = list(engine.waiting)
        loop.stop()
        return bad, untouched, sinks["w1"].failure, sinks["w2"].failure, good.failure, waiting

    bad, untouched, w1, w2, good, waiting = asyncio.run(main())
    assert bad == ("INVALID_ARGUMENT", "prompt too long") and untouched == [None, None]
    assert w1 is not None and w1[0] == "RESOURCE_EXHAUSTED" and "priority is 9" in w1[1]  # 9 over the newer 5
    assert w2 is None and good is None and waiting == ["w2", "good"]


def test_an_abort_in_the_same_batch_frees_the_place_a_queue_full_arrival_takes():
    """The engine thread acted on the door's "full" although an abort applied in the same batch freed a place:
    a waiting request was displaced for nothing, or the one the client aborted was counted as displaced."""
    async def main():
        loop, engine, sinks = await _queue_of_three(0.5, (5, 5, 5))
        # Both land while the engine thread sleeps in its 0.5 s step: one batch, the abort after the add.
        loop.add("new", [1], SamplingParams(max_tokens=50, ignore_eos=True, priority=0), sinks["new"],
                 if_full=("the engine's queue is full", 2))
        loop.abort("w1")
        return await _settled(loop, engine, sinks)

    waiting, failures = asyncio.run(main())
    assert waiting == ["w2", "new"] and failures == [None, None, None]


def test_an_abort_of_a_request_added_in_the_same_batch_frees_its_place_too():
    """Only aborts of requests admitted in earlier batches went before a queue-full arrival: one of a request added
    in the same batch stayed after it, and a waiting request was displaced although the abort freed a place."""
    async def main():
        loop, engine, sinks = await _queue_of_three(0.5, (5, 5, 9))
        brief = Sink(asyncio.Event())
        # One batch, while the engine thread sleeps in its 0.5 s step: "brief" is added (the queue of 3 is full),
        # then "new" (queue full), then "brief" is aborted.
        loop.add("brief", [1], SamplingParams(max_tokens=50, priority=5), brief)
        loop.add("new", [1], SamplingParams(max_tokens=50, ignore_eos=True, priority=0), sinks["new"],
                 if_full=("the engine's queue is full", 3))
        loop.abort("brief")
        return await _settled(loop, engine, sinks)

    waiting, failures = asyncio.run(main())
    assert waiting == ["w1", "w2", "new"] and failures == [None, None, None]


def test_the_last_step_before_a_stop_reaches_its_requests():
    """stop() lets the commands queued before it apply and one last step report them (a drain's last aborts get
    their lines and counts): that step's outputs reach their sinks, not only the engine. No test pinned it."""
    async def main():
        loop = EngineLoop(FakeEngine(step_s=0.3), asyncio.get_running_loop(), lambda _: None)
        loop.start()
        sink = Sink(asyncio.Event())
        loop.add("a", [1], SamplingParams(max_tokens=2, ignore_eos=True), sink)
        await asyncio.sleep(0.1)  # inside the first step: the stop is read after it, and one last step runs
        assert await asyncio.to_thread(loop.stop, 5.0)
        await asyncio.wait_for(sink.done.wait(), 5)
        return sink

    sink = asyncio.run(main())
    assert sink.finished and sink.tokens == [2, 3] and sink.failure is None


def test_a_request_the_engine_refuses_leaves_no_priority_behind():
    """A request the engine refuses on the engine thread (prompt too long) is forgotten with its priority: one left
    behind made outranks() true for good, so every arrival at a full queue tried to displace a request that was
    no longer there. Only a 4-minute leak test caught it."""
    async def main():
        loop = EngineLoop(FakeEngine(max_model_len=64, step_s=0.005), asyncio.get_running_loop(), lambda _: None)
        loop.start()
        bad = Sink(asyncio.Event())
        loop.add("bad", [1] * 100, SamplingParams(max_tokens=5, priority=99), bad)
        assert loop.outranks(50)  # live until the engine thread has refused it
        await asyncio.wait_for(bad.done.wait(), 10)
        live = (loop.num_live, loop.outranks(50))
        loop.stop()
        return bad.failure, live

    failure, (num_live, outranks) = asyncio.run(main())
    assert failure == ("INVALID_ARGUMENT", "prompt too long")
    assert num_live == 0 and not outranks
