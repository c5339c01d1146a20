"""Edges of the engine's core loop that a mutation audit found untested: the engine thread's admission, abort,
failure and delivery (EngineLoop), and LLMEngine's step, abort, outputs and generate()."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.engine_loop import EngineLoop, EngineUnavailable
from engine_service.outputs import FINISH_ERROR, StepOutput
from tests.fake_engine import FakeEngine
from tests.integration.tiny import VOCAB, drain, make_qwen3


# ---- the engine thread (EngineLoop), over the fake engine -------------------------------------------------------
class _Sink:
    def __init__(self):
        self.outputs: list[StepOutput] = []
        self.failures: list[tuple[str, str]] = []
        self.done = asyncio.Event()

    def on_output(self, output: StepOutput) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()

    def on_failure(self, code: str, message: str) -> None:
        self.failures.append((code, message))
        self.done.set()


def _with_loop(body, engine=None, on_fatal=None):
    """Run `body(loop)` (a coroutine function) on a started EngineLoop; stop it after."""
    async def main():
        loop = EngineLoop(engine or FakeEngine(step_s=0.001), asyncio.get_running_loop(), on_fatal or (lambda m: None))
        loop.start()
        try:
            return await body(loop)
        finally:
            loop.stop()
    return asyncio.run(main())


def test_a_live_request_id_is_refused_by_the_loop():
    """A second add() under a live id replaced the first request's sink: the first never heard its end."""
    async def body(loop):
        first = _Sink()
        loop.add("x", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), first)
        with pytest.raises(ValueError, match="already live"):
            loop.add("x", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), _Sink())
        await asyncio.wait_for(first.done.wait(), 5)
        assert first.outputs[-1].finish_reason == "length" and not first.failures
    _with_loop(body)


def test_a_stopped_loop_refuses_new_requests():
    """add() on a loop whose thread had stopped queued the request for nobody: its caller waited forever."""
    async def body(loop):
        loop.stop()
        with pytest.raises(EngineUnavailable):
            loop.add("late", [1, 2, 3], SamplingParams(max_tokens=2), _Sink())
    _with_loop(body)


def test_stop_waits_for_the_engine_thread():
    """stop() returned while the engine thread was still in a step: the server then closed the engine under it, and
    the stopped loop still took requests."""
    engine = FakeEngine(step_s=0.3)

    async def body(loop):
        sink = _Sink()
        loop.add("a", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True), sink)
        while not sink.outputs:
            await asyncio.sleep(0.005)
        loop.stop()
        with pytest.raises(EngineUnavailable):
            loop.add("late", [1, 2, 3], SamplingParams(max_tokens=2), _Sink())
    _with_loop(body, engine)


def test_an_aborted_request_no_longer_outranks_arrivals():
    """abort() kept the request's priority: a full queue's arrival was told it could displace a request that was gone."""
    async def body(loop):
        loop.add("low", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True, priority=5), _Sink())
        assert loop.outranks(0)
        assert loop.abort("low")
        assert not loop.outranks(0) and loop.num_live == 0
    _with_loop(body)


def test_running_requests_are_not_counted_as_waiting():
    """num_waiting counted every live request: a queue limit then refused arrivals while nothing waited."""
    async def body(loop):
        sinks = [_Sink(), _Sink()]
        for i, sink in enumerate(sinks):
            loop.add(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True), sink)
        while not all(s.outputs for s in sinks) or loop.stats["num_running"] < 2:
            await asyncio.sleep(0.005)
        assert loop.num_live == 2 and loop.num_waiting == 0
    _with_loop(body)


class _FailingEngine(FakeEngine):
    """Fails request "bad" (finish reason error) at its first step, as the engine does for NaN logits."""

    def step(self, on_launch=None):
        outputs = []
        if "bad" in self.reqs:
            self.abort_request("bad")
            self.aborted.remove("bad")
            outputs.append(StepOutput("bad", [], FINISH_ERROR, error="the model produced NaN"))
        return outputs + super().step(on_launch)


def test_a_failed_request_gets_its_failure_and_no_output():
    """A request the engine failed got on_failure and then on_output too: a stream ended twice, the second as success."""
    async def body(loop):
        sink = _Sink()
        loop.add("bad", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), sink)
        await asyncio.wait_for(sink.done.wait(), 5)
        await asyncio.sleep(0.05)
        assert sink.failures == [("INTERNAL", "the model produced NaN")] and sink.outputs == []
    _with_loop(body, _FailingEngine(step_s=0.001))


def test_a_refused_request_on_an_idle_loop_hears_why():
    """Refusals were delivered only beside a step's outputs: on an idle engine the refused request waited forever."""
    async def body(loop):
        sink = _Sink()
        loop.add("long", list(range(80)), SamplingParams(max_tokens=2), sink)  # FakeEngine: max_model_len 64
        await asyncio.wait_for(sink.done.wait(), 5)
        assert sink.failures and sink.failures[0][0] == "INVALID_ARGUMENT" and loop.num_live == 0
    _with_loop(body)


def test_stop_applies_the_commands_queued_before_it_and_delivers_their_outputs():
    """stop() dropped the commands queued before it, or the last step's outputs: a drain's last requests (and the
    aborts of its cut calls, which free their blocks) never reached the engine or their callers."""
    engine = FakeEngine(step_s=0.001)

    async def body(loop):
        held = _Sink()
        loop.add("held", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True), held)
        while not held.outputs:
            await asyncio.sleep(0.005)
        last = _Sink()
        loop.add("last", [1, 2, 3], SamplingParams(max_tokens=1), last)
        loop.abort("held")
        loop.stop()
        await asyncio.wait_for(last.done.wait(), 2)
        assert [o.finish_reason for o in last.outputs] == ["length"]
        assert "held" not in engine.reqs and not engine.running
    _with_loop(body, engine)


def test_a_failure_is_reported_once():
    """fail() after a failure (the watchdog, then the stuck step raising) called on_fatal again and replaced the
    first cause with the second."""
    fatal: list[str] = []

    async def body(loop):
        sink = _Sink()
        loop.add("a", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True), sink)
        loop.fail("stalled (watchdog)")
        loop.fail("the stuck step raised")
        assert fatal == ["stalled (watchdog)"] and loop.failure == "stalled (watchdog)"
        assert sink.failures == [("INTERNAL", "engine failure: stalled (watchdog)")]
    _with_loop(body, on_fatal=fatal.append)


class _PoisonedEngine(FakeEngine):
    """Raises a plain error (not a failed step's: the loop cannot continue) at the step after "a" finished."""

    def __init__(self):
        super().__init__(step_s=0.001)
        self.poisoned = False

    def step(self, on_launch=None):
        if self.poisoned:
            raise RuntimeError("CUDA context poisoned")
        outputs = super().step(on_launch)
        self.poisoned = any(o.request_id == "a" and o.finished for o in outputs)
        return outputs


def test_what_finished_before_a_fatal_failure_is_still_delivered():
    """A loop that died dropped the outputs of its last good step: a request that had finished was failed INTERNAL."""
    async def body(loop):
        a, b = _Sink(), _Sink()
        loop.add("b", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True), b)
        loop.add("a", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), a)
        await asyncio.wait_for(asyncio.gather(a.done.wait(), b.done.wait()), 5)
        assert [o.finish_reason for o in a.outputs] == [None, "length"] and not a.failures
        assert b.failures and "CUDA context poisoned" in b.failures[0][1]
    _with_loop(body, _PoisonedEngine())


# ---- LLMEngine / LLM on a tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("core_edges")
    make_qwen3(path, heads=4, kv_heads=2, dtype=torch.float32)
    return path


def _llm(path, **kw) -> LLM:
    args = dict(device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=16,
                num_kvcache_blocks=24, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    args.update(kw)
    return LLM(path, **args)


@pytest.fixture
def overlap_llm(model_dir):
    """An engine with overlap scheduling (off by default on CPU)."""
    with _llm(model_dir, overlap_scheduling=True) as llm:
        yield llm


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def test_an_aborted_requests_penalty_state_does_not_pass_to_its_ids_next_request(model_dir):
    """abort_request did not release the request's penalty slot (nor its generator): a later request under the
    same id was penalised for the aborted one's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=5.0, presence_penalty=2.0)
    with _llm(model_dir) as fresh:
        fresh.add_request("x", _prompt(12, 2), params)
        want = drain(fresh, max_steps=1000)["x"][0]
    with _llm(model_dir) as llm:
        llm.add_request("x", _prompt(40, 1), params)
        for _ in range(3):
            llm.step()
        assert llm.abort_request("x")
        assert [o.finish_reason for o in llm.step()] == ["abort"]
        llm.add_request("x", _prompt(12, 2), params)
        assert drain(llm, max_steps=1000)["x"][0] == want


def test_a_finished_requests_id_is_free_again(model_dir):
    """A request that finished stayed registered: its id was refused ("already in use") for ever after, and its
    generator and penalty slot were never freed."""
    params = SamplingParams(temperature=0.0, max_tokens=3, seed=7, repetition_penalty=1.5)
    with _llm(model_dir) as llm:
        llm.add_request("x", _prompt(6, 1), params)
        first = drain(llm, max_steps=1000)["x"]
        assert first[1:] == ["length", 1] and not llm.seqs and not llm.generators
        llm.add_request("x", _prompt(6, 1), params)
        assert drain(llm, max_steps=1000)["x"] == first


def test_logprobs_go_to_their_own_token_beside_an_abort(model_dir):
    """A step that reported an abort (or a failure) first gave the next request's logprobs to that output: the
    request's own token went without them."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    with _llm(model_dir) as llm:
        llm.add_request("a", _prompt(10, 1), params)
        llm.add_request("b", _prompt(10, 2), params)
        llm.step()
        llm.step()
        assert llm.abort_request("b")
        outs = llm.step()
        assert [(o.request_id, o.finish_reason) for o in outs][0] == ("b", "abort")
        assert outs[0].logprobs is None
        (a,) = [o for o in outs if o.request_id == "a"]
        assert len(a.logprobs) == len(a.new_token_ids) == 1
        assert a.logprobs[0].top_token_ids[0] == a.new_token_ids[0]  # greedy: the token is the most likely


def test_a_failed_step_ahead_fails_the_step_it_was_launched_beside(overlap_llm):
    """When launching the step scheduled ahead failed, only its requests failed: one that the current step was
    finishing stayed registered, its last token lost."""
    from engine_service.engine import EngineStepError

    llm = overlap_llm
    llm.add_request("short", _prompt(10, 1), SamplingParams(temperature=0.0, max_tokens=3))
    llm.add_request("long", _prompt(10, 2), SamplingParams(temperature=0.0, max_tokens=30))
    llm.step()
    llm.step()
    real = llm.runner.launch

    def broken(batch, rows, workers=None, on_launch=None, previous=None):
        if previous is not None:
            raise RuntimeError("out of memory")
        return real(batch, rows, workers, on_launch, previous)

    llm.runner.launch = broken
    with pytest.raises(EngineStepError) as info:
        llm.step()
    llm.runner.launch = real
    assert {o.request_id: o.finish_reason for o in info.value.outputs} == {"short": "error", "long": "error"}
    assert not llm.has_unfinished_requests() and not llm.seqs
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]


def _launches(llm: LLM) -> list[int]:
    """Counts the forward passes launched (a one-element list, updated in place)."""
    count, real = [0], llm.runner.launch

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    llm.runner.launch = counting
    return count


def test_an_abort_in_flight_does_not_throw_away_the_others_step(model_dir):
    """A step in flight was dropped when any one of its requests had been aborted: every other request's computed
    tokens were thrown away and computed again (a wasted forward pass per abort)."""
    params = SamplingParams(temperature=0.0, max_tokens=10)
    runs = []
    for abort in (False, True):
        with _llm(model_dir, overlap_scheduling=True) as llm:
            launches = _launches(llm)
            llm.add_request("a", _prompt(10, 1), params)
            llm.add_request("b", _prompt(10, 2), params)
            tokens = [t for _ in range(3) for o in llm.step() if o.request_id == "a" for t in o.new_token_ids]
            assert llm._inflight is not None
            if abort:
                assert llm.abort_request("b")
            tokens += drain(llm, max_steps=1000)["a"][0]
            runs.append((launches[0], tokens))
    assert runs[1][1] == runs[0][1] and len(runs[0][1]) == 10
    assert runs[1][0] <= runs[0][0], runs


def test_close_ends_the_requests_it_holds(model_dir):
    """close() left its live requests registered: the closed engine still had unfinished requests and held their
    ids, generators and penalty slots."""
    llm = _llm(model_dir)
    llm.add_request("a", _prompt(10, 1), SamplingParams(max_tokens=20, seed=3, repetition_penalty=1.2))
    llm.add_request("b", _prompt(10, 2), SamplingParams(max_tokens=20))
    llm.step()
    llm.close()
    assert not llm.has_unfinished_requests() and not llm.seqs and not llm.generators
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]


def test_a_generate_refused_part_way_leaves_none_of_its_requests_behind(model_dir):
    """generate() whose second prompt was refused left its first request running: it held blocks and was stepped
    (its outputs reported to nobody) until it finished."""
    params = SamplingParams(temperature=0.0, max_tokens=5)
    with _llm(model_dir) as llm:
        with pytest.raises(ValueError):
            llm.generate([_prompt(6, 1), [VOCAB + 5]], params)
        assert not llm.has_unfinished_requests() and not llm.seqs and llm.step() == []
        assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]


def test_a_failed_generate_keeps_the_callers_pending_abort(model_dir):
    """generate() that raised before its first step dropped the abort a caller's request was waiting to have
    reported: the request never ended, and its id stayed in use."""
    params = SamplingParams(temperature=0.0, max_tokens=5)
    with _llm(model_dir) as llm:
        llm.add_request("mine", _prompt(6, 1), params)
        assert llm.abort_request("mine")
        with pytest.raises(ValueError):
            llm.generate([_prompt(6, 2), [VOCAB + 5]], params)
        assert [(o.request_id, o.finish_reason) for o in llm.step()] == [("mine", "abort")]
        llm.add_request("mine", _prompt(6, 1), params)
        assert drain(llm, max_steps=1000)["mine"][1] == "length"


def test_generate_skips_an_id_whose_abort_is_still_to_be_reported(model_dir):
    """generate()'s made-up ids skipped live requests' ids but not those aborted and not yet reported: it then
    refused its own prompt as "already in use"."""
    params = SamplingParams(temperature=0.0, max_tokens=3)
    with _llm(model_dir) as llm:
        taken = f"generate-{next(llm._ids) + 1}"  # the id generate() would make next
        llm.add_request(taken, _prompt(6, 1), params)
        assert llm.abort_request(taken)
        (result,) = llm.generate([_prompt(6, 2)], params)
        assert result["finish_reason"] == "length" and result["request_id"] != taken
        assert [(o.request_id, o.finish_reason) for o in llm.step()] == [(taken, "abort")]


def test_outputs_count_the_prompt_not_the_whole_sequence(model_dir):
    """Outputs reported the sequence's length as num_prompt_tokens: usage counted generated tokens as prompt."""
    with _llm(model_dir) as llm:
        llm.add_request("a", _prompt(7, 1), SamplingParams(temperature=0.0, max_tokens=4))
        outs = [o for _ in range(8) for o in llm.step()]
        assert [o.num_prompt_tokens for o in outs] == [7, 7, 7, 7] and outs[-1].finish_reason == "length"


def test_a_failed_step_under_generate_reports_the_callers_request_once(model_dir, monkeypatch):
    """A step that failed under generate() raised every failed request's output, the caller's own requests' among
    them, and kept those for the next step() too: the caller saw its request fail twice."""
    from engine_service.engine import EngineStepError

    params = SamplingParams(temperature=0.0, max_tokens=5)
    with _llm(model_dir) as llm:
        llm.add_request("mine", _prompt(6, 1), params)
        real = llm.runner.collect

        def broken(launched):
            monkeypatch.setattr(llm.runner, "collect", real)
            raise RuntimeError("device lost")

        monkeypatch.setattr(llm.runner, "collect", broken)
        with pytest.raises(EngineStepError) as info:
            llm.generate([_prompt(6, 2)], params)
        assert [o.request_id.startswith("generate-") for o in info.value.outputs] == [True]
        assert [(o.request_id, o.finish_reason) for o in llm.step()] == [("mine", "error")]
        assert not llm.has_unfinished_requests()


def test_close_frees_the_weights_without_waiting_for_a_cyclic_collection(tmp_path):
    """Each parameter's weight_loader, a bound method of its module, made the model a reference cycle: close()
    left the weights (and, under TP, rank 0's process group) alive until the cyclic collector ran, and for good
    after gc.freeze(), which the engine service calls."""
    import gc
    import weakref

    from tests.integration.tiny import exact_engine

    make_qwen3(tmp_path)
    llm = exact_engine(tmp_path)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    weights = [weakref.ref(p) for p in llm.runner.model.parameters()]
    assert weights
    gc.disable()
    try:
        llm.close()
        assert all(w() is None for w in weights)
    finally:
        gc.enable()
