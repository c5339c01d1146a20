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
        self.failure: tuple[str, str] | None = None
        self.finished, self.done = False, done

    def on_output(self, output: StepOutput) -> None:
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
        loop.add("urgent", [1], SamplingParams(max_tokens=2, priority=-2**31), urgent, if_full="queue is full")
        problem = await canary
        await asyncio.wait_for(urgent.done.wait(), 10)
        loop.stop()
        return problem, urgent.failure

    problem, urgent_failure = asyncio.run(main())
    assert problem is None
    assert urgent_failure == ("RESOURCE_EXHAUSTED", "queue is full")  # nothing of a higher value waited
