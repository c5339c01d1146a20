"""GenerateMulti aborts at the edges of backpressure and --stream-interval, and cancels at a request's deadline:
an abort loses no response that was produced (one waiting for room on a full call, an n > 1 request's queued or
held-back text), its usage counts what the caller got, no message follows a request's last, and a cancel inside
the deadline's slack while the request is being tokenized counts as the deadline, as it does later on."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from clients.logs import REQUEST_LOGGER
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.unit.test_text_service_regressions import _call_context
from tokenizer_service import servicer as servicer_module
from tokenizer_service.engine_pool import RequestFailed
from tokenizer_service.servicer import TextServicer

pytestmark = pytest.mark.timeout(60)

SEED = 1000  # completion i samples with SEED + i: the fake engines key what they produced by it
TEXT = "The sea \U0001f996 and the \u00fc sky \u2014 again, \u732b and more. "  # characters of 2 to 4 bytes


class _Engine:
    address = "fake:1"


class _Engines:
    """An engine pool for the servicer alone: each engine request streams max_tokens of the script's ids (cycling),
    one an update, step_s apart; what each handed the servicer is kept by its seed."""

    max_model_len = 100_000

    def __init__(self, script: list[int], step_s: float = 0.0) -> None:
        self.script, self.step_s = script, step_s
        self.produced: dict[int, list[int]] = {}
        self.live = 0
        self.conn = _Engine()

    def can_try_another(self, tried, params) -> bool:
        return False

    @property
    def total(self) -> int:
        return sum(map(len, self.produced.values()))

    async def submit(self, request, timeout_s, avoid=(), prefer=None):
        pool, ids = self, self.produced.setdefault(request.sampling_params.seed, [])
        self.live += 1

        class Handle:
            conn, got_tokens, closed = pool.conn, False, False

            async def _updates(self):
                n = request.sampling_params.max_tokens
                for k in range(n):
                    ids.append(pool.script[k % len(pool.script)])  # as the update goes to the servicer
                    self.got_tokens = True
                    yield engine_pb.RequestUpdate(new_token_ids=ids[-1:], finish_reason=engine_pb.FINISH_REASON_LENGTH
                                                  if k == n - 1 else 0)
                    await asyncio.sleep(pool.step_s)

            def __aiter__(self):
                return self._updates()

            def close(self, stopped: bool = False) -> None:
                if not self.closed:
                    self.closed = True
                    pool.live -= 1

        return Handle()


def _servicer(tokenizer, pool, stream_interval: int = 1) -> TextServicer:
    return TextServicer(tokenizer, pool, "demo", len(tokenizer), {0}, {}, 100, stream_interval=stream_interval,
                        stream_max_wait_s=0)


def _generate(rid: str, n: int, max_tokens: int, **fields) -> pb.MultiRequest:
    return pb.MultiRequest(generate=pb.GenerateRequest(request_id=rid, prompt="the sea", n=n, **fields,
                                                       sampling_params=pb.SamplingParams(max_tokens=max_tokens,
                                                                                         seed=SEED)))


class _Call:
    """A GenerateMulti call driven by the test: frames sent from a queue (None half-closes it), responses read one
    at a time, or not at all (a reader that stalls: the call's queues fill)."""

    def __init__(self, servicer: TextServicer) -> None:
        self.frames: asyncio.Queue = asyncio.Queue()
        self.got: list[pb.GenerateResponse] = []

        async def requests():
            while (frame := await self.frames.get()) is not None:
                yield frame

        self.responses = servicer.GenerateMulti(requests(), _call_context())

    async def read(self) -> None:
        self.got.append(await anext(self.responses))

    async def read_to_end(self) -> None:
        self.got += [response async for response in self.responses]


async def _until_stalled(pool: _Engines) -> None:
    """Until the servicer takes no more tokens from the engines: a stalled reader has filled the call."""
    seen = -1
    while pool.total != seen:
        seen = pool.total
        await asyncio.sleep(0.05)


async def _nothing_left(servicer: TextServicer, pool: _Engines) -> None:
    """The call left no task running, no place taken and no engine request open."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}, asyncio.all_tasks()
    assert (servicer.inflight, servicer.admitting, servicer.num_calls, pool.live) == (0, 0, 0, 0)


def _finished(servicer: TextServicer, reason: str) -> float:
    return servicer.metrics.registry.get_sample_value("llmserve:text_requests_total",
                                                      {"model_name": "demo", "finished_reason": reason})


def _check_completions(tokenizer, pool: _Engines, got: list[pb.GenerateResponse], n: int) -> list[int]:
    """Each completion got every id its engine request produced, in order, with their text; its ids' count."""
    counts = []
    for i in range(n):
        ids = [t for r in got if r.index == i for t in r.token_ids]
        assert ids == pool.produced[SEED + i], (i, len(ids), len(pool.produced[SEED + i]))
        assert "".join(r.text for r in got if r.index == i) == tokenizer.decode(ids)
        counts.append(len(ids))
    return counts


@pytest.mark.parametrize("reader", ["stalled", "keeping-up"])
@pytest.mark.parametrize("interval", [1, 4])
@pytest.mark.parametrize("n", [1, 2])
def test_an_abort_sends_everything_produced_before_its_abort(demo_tokenizer, monkeypatch, n, interval, reader):
    """An abort while a response waited for room on a full call (the reader stalled) dropped that response, and
    with it its ids, though the text the detokenizer still held for them went out; an n > 1 request's abort also
    dropped what its completions had queued and what --stream-interval held back. Each completion now gets every
    id produced before the abort, with its text, then one ABORT whose usage counts them all."""
    monkeypatch.setattr(servicer_module, "MULTI_QUEUED_RESPONSES", 16)
    pool = _Engines(demo_tokenizer.encode(TEXT, add_special_tokens=False), step_s=0.0 if reader == "stalled" else 0.002)

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, pool, interval)
        call = _Call(servicer)
        await call.frames.put(_generate("a", n, 100_000))
        await call.read()
        if reader == "stalled":
            await _until_stalled(pool)
            reading = call.read_to_end()
        else:  # aborted once each completion has ids held back (a message carries `interval` after the first)
            reading = asyncio.create_task(call.read_to_end())
            while len(pool.produced) < n or not all(len(ids) > 2 * interval and (interval == 1 or (len(ids) - 1) % interval)
                                                    for ids in pool.produced.values()):
                await asyncio.sleep(0)
        await call.frames.put(pb.MultiRequest(abort_request_id="a"))
        await call.frames.put(None)
        await reading
        await _nothing_left(servicer, pool)
        assert (_finished(servicer, "abort"), _finished(servicer, "cancelled")) == (1, 0)
        return call.got

    got = asyncio.run(main())
    *streamed, last = got
    assert last.finish_reason == pb.FINISH_REASON_ABORT and not any(r.finish_reason for r in streamed)
    counts = _check_completions(demo_tokenizer, pool, got, n)
    assert last.usage.completion_tokens == sum(counts) and last.usage.prompt_tokens > 0


@pytest.mark.parametrize("n", [1, 2])
def test_an_abort_of_a_request_whose_last_messages_wait_on_the_call_sends_no_abort(demo_tokenizer, monkeypatch, n):
    """A request whose last message (n > 1: every completion's) was made but waited for room on a full call, when
    an abort came: that message was dropped and an ABORT sent instead; sending both would put a message after the
    last. The request had finished: its messages go out, none after them, and it counts as finished so."""
    monkeypatch.setattr(servicer_module, "MULTI_QUEUED_RESPONSES", 4)
    pool = _Engines(demo_tokenizer.encode(TEXT, add_special_tokens=False))
    # n = 1: one read, 4 queued, the last in the request's task's hand; n = 2: 4 more in the completions' queue
    max_tokens = 6 if n == 1 else 5

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, pool)
        call = _Call(servicer)
        await call.frames.put(_generate("a", n, max_tokens))
        await call.read()
        await _until_stalled(pool)
        await call.frames.put(pb.MultiRequest(abort_request_id="a"))
        await call.frames.put(None)
        await call.read_to_end()
        await _nothing_left(servicer, pool)
        assert (_finished(servicer, "length"), _finished(servicer, "abort")) == (1, 0)
        return call.got

    got = asyncio.run(main())
    assert _check_completions(demo_tokenizer, pool, got, n) == [max_tokens] * n
    ends = [r for r in got if r.finish_reason]
    assert sorted(r.index for r in ends) == list(range(n)) and got[-1] is ends[-1]
    assert all(r.finish_reason == pb.FINISH_REASON_LENGTH and r.usage.completion_tokens == max_tokens for r in ends)


def test_a_failed_completions_error_comes_after_all_the_others_made(demo_tokenizer):
    """When one of n completions failed, the others' responses that waited for room in the request's queue (their
    tasks blocked on it: a slow reader) were dropped as their tasks were stopped, leaving a gap in the caller's text
    before the error."""
    class FailsOne(_Engines):  # the engine request of SEED + 1 fails early, before the others fill the queue
        async def submit(self, request, timeout_s, avoid=(), prefer=None):
            handle = await super().submit(request, timeout_s, avoid, prefer)
            if request.sampling_params.seed == SEED + 1:
                async def failing():
                    while self.total < 10:
                        await asyncio.sleep(0)
                    yield engine_pb.RequestUpdate(finish_reason=engine_pb.FINISH_REASON_ERROR, status=engine_pb.Status(
                        code=grpc.StatusCode.INTERNAL.value[0], message="boom (test)"))

                handle.__class__.__aiter__ = lambda _: failing()
            return handle

    pool = FailsOne(demo_tokenizer.encode(TEXT, add_special_tokens=False))

    async def main() -> tuple[list[pb.GenerateResponse], RequestFailed]:
        servicer = _servicer(demo_tokenizer, pool)
        request = _generate("a", 3, 100_000).generate
        responses = servicer.Generate(request, _call_context())
        got = [await anext(responses)]
        await _until_stalled(pool)  # the error is queued; behind it the others' responses fill the queue
        with pytest.raises(RequestFailed) as failed:
            async for response in responses:
                got.append(response)
        await _nothing_left(servicer, pool)
        return got, failed.value

    got, failed = asyncio.run(main())
    assert failed.code == grpc.StatusCode.INTERNAL and "boom (test)" in failed.message
    assert not any(r.finish_reason for r in got) and pool.produced[SEED + 1] == []
    for i in (0, 2):  # the completions that were running: every id they produced, with its text
        ids = [t for r in got if r.index == i for t in r.token_ids]
        assert ids == pool.produced[SEED + i] and len(ids) > 16, (i, len(ids), len(pool.produced[SEED + i]))
        assert "".join(r.text for r in got if r.index == i) == demo_tokenizer.decode(ids)


class _SlowToTokenize:
    """The servicer's _prepare, taking `delay_s` before it prepares the request (as behind busy worker threads)."""

    def __init__(self, servicer: TextServicer, delay_s: float) -> None:
        self.prepare, self.delay_s, self.started = servicer._prepare, delay_s, asyncio.Event()
        servicer._prepare = self

    async def __call__(self, request):
        self.started.set()
        await asyncio.sleep(self.delay_s)
        return await self.prepare(request)


@pytest.mark.parametrize("stage", ["tokenizing", "streaming-n1", "streaming-n2"])
@pytest.mark.parametrize("how,after_s,reason", [
    ("Generate", 0.3, "error"), ("Generate", 0.05, "cancelled"),
    ("GenerateMulti", 0.3, "error"), ("GenerateMulti", 0.05, "cancelled"),
    ("abort", 0.3, "abort"),
], ids=["Generate-in-slack", "Generate-early", "multi-in-slack", "multi-early", "abort-in-slack"])
def test_a_cancel_in_the_deadlines_slack_counts_as_the_deadline_at_every_stage(demo_tokenizer, monkeypatch, caplog,
                                                                               stage, how, after_s, reason):
    """A cancel within DEADLINE_SLACK_S of deadline_ms is the deadline (the client's timer fires first): counted
    and logged as a DEADLINE_EXCEEDED error. It was while the request was streamed with one completion, but
    "cancelled" while it was being tokenized, and with n > 1 completions. An earlier cancel stays "cancelled",
    and an abort is the client's, whenever it comes."""
    monkeypatch.setattr(servicer_module, "DEADLINE_SLACK_S", 0.2)  # deadline 0.4 s: in it from 0.2 s on
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    pool = _Engines(demo_tokenizer.encode(TEXT, add_special_tokens=False), step_s=0.01)
    n = 2 if stage == "streaming-n2" else 1
    frame = _generate("a", n, 100_000, deadline_ms=400)

    async def main() -> TextServicer:
        servicer = _servicer(demo_tokenizer, pool)
        slow = _SlowToTokenize(servicer, 10.0 if stage == "tokenizing" else 0.0)
        if how == "Generate":
            async def consume():
                async for _ in servicer.Generate(frame.generate, _call_context()):
                    pass
            consumer = asyncio.create_task(consume())
        else:
            call = _Call(servicer)
            await call.frames.put(frame)
            consumer = asyncio.create_task(call.read_to_end())
        await slow.started.wait()
        await asyncio.sleep(after_s)
        assert (pool.total > 0) == (stage != "tokenizing")
        if how == "abort":
            await call.frames.put(pb.MultiRequest(abort_request_id="a"))
            await call.frames.put(None)
            await consumer
            assert call.got[-1].finish_reason == pb.FINISH_REASON_ABORT
        else:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
        await _nothing_left(servicer, pool)
        return servicer

    servicer = asyncio.run(main())
    assert _finished(servicer, reason) == 1
    [line] = [r.fields for r in caplog.records if r.name == REQUEST_LOGGER]
    assert line["finish_reason"] == reason
    assert ("DEADLINE_EXCEEDED" in line.get("error", "")) == (reason == "error"), line


def test_a_drain_does_not_end_a_call_before_an_aborts_last_messages_are_on_it(demo_tokenizer, monkeypatch):
    """A drain ends a GenerateMulti call once it has no live request. An aborted request is no longer live, but its
    last messages (what it produced, then ABORT) are queued by the call's reader, which waited for room on a full
    call: the call emptied its queue, found no live request and ended, and the ABORT was never sent."""
    monkeypatch.setattr(servicer_module, "MULTI_QUEUED_RESPONSES", 4)
    pool = _Engines(demo_tokenizer.encode(TEXT, add_special_tokens=False))

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, pool)
        call = _Call(servicer)
        await call.frames.put(_generate("a", 1, 100_000))
        await call.read()
        await _until_stalled(pool)  # 4 responses queued, a fifth in the request's task's hand
        await call.frames.put(pb.MultiRequest(abort_request_id="a"))
        for _ in range(20):  # the reader applies the abort and waits for room to queue its last messages
            await asyncio.sleep(0)
        servicer.begin_drain()
        await call.read_to_end()
        await _nothing_left(servicer, pool)
        assert (_finished(servicer, "abort"), _finished(servicer, "cancelled")) == (1, 0)
        return call.got

    got = asyncio.run(main())
    *streamed, last = got
    assert last.finish_reason == pb.FINISH_REASON_ABORT and not any(r.finish_reason for r in streamed)
    assert last.usage.completion_tokens == _check_completions(demo_tokenizer, pool, got, 1)[0]
