"""Service-layer regressions, in-process over the fake engine: reused request ids, draining or failed engines
as pool targets, the watchdog, deadlines across retries, and DNS addresses that come back."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import grpc
import pytest

from clients.engine_client import EngineClient
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
from tests.fake_engine import FakeEngine
from tests.unit.test_engine_service_fake import Running, new, wait_serving
from tokenizer_service.config import TextServerConfig
from tokenizer_service.engine_pool import EnginePool, RequestFailed
from tokenizer_service.metrics import RequestTrace
from tokenizer_service.servicer import TextServicer
from tokenizer_service.validation import PreparedRequest

pytestmark = pytest.mark.timeout(60)
LONG = dict(max_tokens=1_000_000, ignore_eos=True)


def long_engine(**overrides: object) -> Running:
    return Running(FakeEngine(max_model_len=10_000_000), **overrides)


def pool_config(**overrides: object) -> TextServerConfig:
    return TextServerConfig(**{"model": "fake", "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **overrides})


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def run_then_stop(running: Running, main) -> None:
    """asyncio.run(main()), then stop the engine server `running`, which must exit 0 whatever main did."""
    try:
        asyncio.run(main())
    finally:
        assert running.stop() == 0


def wait_idle(client: EngineClient) -> pb.Load:
    for _ in range(200):
        load = client.load()
        if load.num_live_requests == 0 and load.num_running == 0:
            break
        threading.Event().wait(0.02)
    return load


# ---- 1: a request id reused right after an abort -----------------------------------------------------------

@pytest.fixture(scope="module")
def slow_steps():
    running = Running(FakeEngine(max_model_len=10_000_000, step_s=0.1))  # an abort and a re-add share a step
    yield running
    assert running.stop() == 0


def test_bidi_id_reused_right_after_abort_gets_its_own_request(slow_steps):
    with EngineClient(slow_steps.target, timeout=30) as client:
        wait_serving(client)
        first_token, second_done = threading.Event(), threading.Event()

        def frames():
            yield pb.ClientFrame(requests=[new("x", [1], **LONG)])
            first_token.wait(10)
            yield pb.ClientFrame(abort_request_ids=["x"])
            yield pb.ClientFrame(requests=[new("x", [50], max_tokens=3)])
            second_done.wait(10)

        updates = []
        for frame in client.stub.Generate(frames(), timeout=30):
            updates += frame.updates
            first_token.set()
            if sum(1 for u in updates if u.finish_reason) == 2:
                second_done.set()
        endings = [(u.finish_reason, i) for i, u in enumerate(updates) if u.finish_reason]
        assert [reason for reason, _ in endings] == [pb.FINISH_REASON_ABORT, pb.FINISH_REASON_LENGTH], updates
        second = [t for u in updates[endings[0][1] + 1:] for t in u.new_token_ids]
        assert second == [51, 52, 53]
        load = wait_idle(client)
        assert load.num_live_requests == 0 and load.num_running == 0


def test_bidi_abort_and_reuse_in_one_frame_starts_the_new_request(slow_steps):
    """A frame's aborts applied after its new requests, so a new request under an id the same frame aborts was
    refused as "already live"."""
    with EngineClient(slow_steps.target, timeout=20) as client:
        wait_serving(client)
        first = threading.Event()

        def frames():
            yield pb.ClientFrame(requests=[new("x", [1], **LONG)])
            first.wait(10)
            yield pb.ClientFrame(abort_request_ids=["x"], requests=[new("x", [2], max_tokens=2)])

        seen: list[tuple[str, int, int]] = []
        for frame in client.stub.Generate(frames(), timeout=20):
            for u in frame.updates:
                seen.append((u.request_id, u.finish_reason, u.status.code))
                first.set()
            if any(f == pb.FINISH_REASON_LENGTH for _, f, _ in seen):
                break
    finishes = [(rid, f, code) for rid, f, code in seen if f]
    assert finishes == [("x", pb.FINISH_REASON_ABORT, 0), ("x", pb.FINISH_REASON_LENGTH, 0)], seen


def test_unary_id_reused_right_after_abort_gets_its_own_request(slow_steps):
    with EngineClient(slow_steps.target, timeout=30) as client:
        wait_serving(client)
        first = client.generate([1], request_id="y", **LONG)
        next(first)
        assert client.abort("y")
        assert [u.finish_reason for u in first][-1] == pb.FINISH_REASON_ABORT  # the call has ended
        updates = list(client.generate([50], request_id="y", max_tokens=3))
        assert [t for u in updates for t in u.new_token_ids] == [51, 52, 53]
        assert updates[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert wait_idle(client).num_live_requests == 0


# ---- 2: draining or failed engines are no target ------------------------------------------------------------

def refusal(call) -> grpc.RpcError:
    """The error call() raises once the drain (which begins asynchronously) has begun."""
    for _ in range(100):
        try:
            call()
        except grpc.RpcError as exc:
            return exc
        threading.Event().wait(0.02)
    raise AssertionError(f"{call} kept succeeding")


def test_draining_engine_refuses_model_info_and_new_streams():
    running = long_engine()
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
        blocker = client.generate([1], **LONG)  # keeps the drain going
        next(blocker)
        running.loop.call_soon_threadsafe(running.stop_event.set)
        for call in (client.model_info, lambda: list(client.stub.Generate(iter([]), timeout=5)),
                     lambda: list(client.generate([1], max_tokens=2))):
            error = refusal(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.details()
        blocker.cancel()
    assert running.stop() == 0


def test_failed_engine_refuses_model_info(monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", "2")
    running = Running(FakeEngine(), failure_linger_s=2.0)
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
        with pytest.raises(grpc.RpcError):
            list(client.generate([1], max_tokens=50, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as err:
            client.model_info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "failed" in err.value.details()
    running.thread.join(20)
    assert running.exit_code == 1


def test_pool_sends_nothing_to_a_draining_engine():
    draining, healthy = long_engine(), long_engine()

    async def main() -> tuple[int, int, int]:
        pool = EnginePool(pool_config(engines=f"{draining.target},{healthy.target}"), 100, {99}, [])
        connected: list[str] = []  # the pool calls changed() whenever a connection turns ready
        changed = pool.changed
        pool.changed = lambda: (connected.extend(c.address for c in pool.ready), changed())
        pool.start()
        async with grpc.aio.insecure_channel(draining.target) as channel:
            try:
                await wait_for(lambda: len(pool.ready) == 2)
                conn_d, conn_h = pool.conns[draining.target], pool.conns[healthy.target]
                blocker = pb_grpc.EngineStub(channel).GenerateStream(new("b", [1], **LONG))
                await blocker.read()  # holds the draining engine in its drain
                busy = await pool.submit(new("", [1], **LONG), None, avoid={conn_d})
                assert busy.conn is conn_h  # so an idle draining engine would be preferred if it were ready
                draining.loop.call_soon_threadsafe(draining.stop_event.set)
                await wait_for(lambda: not conn_d.ready)
                connected.clear()
                sent_to_draining = refused = 0
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    handle = await pool.submit(new("", [1], max_tokens=2), None)
                    sent_to_draining += handle.conn is conn_d
                    try:
                        async for _ in handle:
                            pass
                    except RequestFailed:
                        refused += 1
                busy.close()
                blocker.cancel()
                return connected.count(draining.target), sent_to_draining, refused
            finally:
                await pool.close()

    try:
        # The draining engine is never ready again (before: it reconnected every backoff), gets no request
        # and refuses none.
        assert asyncio.run(main()) == (0, 0, 0)
    finally:
        assert draining.stop() == 0 and healthy.stop() == 0


# ---- 3: the watchdog fails the live requests ----------------------------------------------------------------

def test_watchdog_fails_live_requests_internal_and_exits_nonzero():
    engine = FakeEngine()
    running = Running(engine, watchdog_s=1.0, failure_linger_s=0.5)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            engine.step_s = 3.0  # the next step stalls past watchdog_s
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate([1], max_tokens=5))
            assert err.value.code() == grpc.StatusCode.INTERNAL and "watchdog" in err.value.details()
        running.thread.join(20)
        assert running.exit_code == 1
    finally:
        engine.step_s = 0.002


# ---- 4: a deadline does not restart on retry ----------------------------------------------------------------

class _LostBeforeFirstToken:
    """A handle whose engine is lost after a while, before any token (so the request is retried)."""

    def __init__(self, lost_after_s: float) -> None:
        self.lost_after_s = lost_after_s
        self.conn = type("Conn", (), {"address": "lost:1"})()

    def close(self) -> None:
        pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.lost_after_s)
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "lost the engine", retryable=True)


class _LosingPool:
    max_model_len = 1000

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []
        self.submitted: list[float] = []  # when, by time.monotonic()

    async def submit(self, request, timeout_s, avoid=None, prefer=None):
        self.timeouts.append(timeout_s)
        self.submitted.append(time.monotonic())
        return _LostBeforeFirstToken(0.3)


def test_retries_share_one_deadline_and_end_deadline_exceeded():
    pool = _LosingPool()
    servicer = TextServicer(None, pool, "fake", 100, {99}, {}, max_inflight=10)
    prep = PreparedRequest(pb.NewRequest(prompt_token_ids=[1]), (), True, False, 1)

    async def main() -> tuple[RequestFailed, float]:
        started = time.monotonic()
        with pytest.raises(RequestFailed) as err:
            async for _ in servicer._generate(prep, 0.5, RequestTrace("r")):
                pass
        assert time.monotonic() - started < 0.8  # not 3 x 0.3 s: the second attempt had only what was left
        return err.value, started

    error, started = asyncio.run(main())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error.message
    assert len(pool.timeouts) == 2 and pool.timeouts[1] < 0.25
    # The first attempt gets the whole 0.5 s less what passed before it was submitted (not a fixed 50 ms of slack,
    # which a loaded machine can take before the submit).
    assert 0.5 - (pool.submitted[0] - started) - 1e-6 <= pool.timeouts[0] <= 0.5


def test_waiting_for_an_engine_past_the_deadline_is_deadline_exceeded():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"

    async def main() -> None:
        pool = EnginePool(pool_config(engines=address), 100, {99}, [])
        pool.start()
        try:
            with pytest.raises(RequestFailed) as err:
                await pool.submit(new("", [1], max_tokens=2), 0.3)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in err.value.message
            with pytest.raises(RequestFailed) as err:  # engine_wait_s binds: no engine, UNAVAILABLE
                await EnginePool(pool_config(engines=address, engine_wait_s=0.2), 100, {99}, []).submit(
                    new("", [1], max_tokens=2), 5.0)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await pool.close()

    asyncio.run(main())


# ---- 5: an address that leaves DNS and comes back -----------------------------------------------------------

async def retire_with_a_request_in_flight(pool: EnginePool, answers: list[str]):
    """Start a DNS pool, put a long request on its one engine, then take the engine's address out of DNS (the
    answers its getaddrinfo gives); the request's handle, once its connection is retiring."""
    pool.start()
    await wait_for(lambda: len(pool.ready) == 1)
    handle = await pool.submit(new("", [1], **LONG), None)  # in flight: the connection stays
    answers.clear()
    await wait_for(lambda: handle.conn.retiring)
    return handle


def test_address_back_in_dns_takes_requests_again():
    running = long_engine()
    port = int(running.target.rpartition(":")[2])
    answers: list[str] = ["127.0.0.1"]

    async def fake_getaddrinfo(host, port_, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port_)) for ip in answers]

    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = fake_getaddrinfo
        pool = EnginePool(pool_config(engines="", engine_dns=f"engines.test:{port}", dns_refresh_s=0.05),
                          100, {99}, [])
        try:
            handle = await retire_with_a_request_in_flight(pool, answers)
            assert pool.ready == []
            answers.append("127.0.0.1")
            await wait_for(lambda: len(pool.ready) == 1, timeout_s=3.0)
            assert pool.ready == [handle.conn]
            handle.close()
        finally:
            await pool.close()

    run_then_stop(running, main)


def test_engine_counts_deadlines_and_refusals_as_errors(caplog):
    """A request the service ended (deadline passed) was logged and counted as "abort", and one refused before
    the engine (bad input) was neither logged nor counted; a client's own abort stays "abort"."""
    from tests.support import free_port
    from tests.unit.test_text_service_regressions import scrape

    port = free_port()
    running = Running(FakeEngine(max_model_len=10_000_000, step_s=0.01), metrics_port=port)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            before = scrape(port, "llmserve:request_success")
            with caplog.at_level(logging.INFO, logger="llmserve.request"):
                frames = [pb.ClientFrame(requests=[
                    pb.NewRequest(request_id="d", prompt_token_ids=[1], deadline_ms=100, trace_id="deadline",
                                  sampling_params=pb.SamplingParams(max_tokens=1_000_000, ignore_eos=True)),
                    pb.NewRequest(request_id="b", prompt_token_ids=[1], trace_id="bad",
                                  sampling_params=pb.SamplingParams(max_tokens=-1)),
                    pb.NewRequest(request_id="a", prompt_token_ids=[1], trace_id="aborted",
                                  sampling_params=pb.SamplingParams(max_tokens=1_000_000, ignore_eos=True))])]

                def stream():
                    yield from frames
                    threading.Event().wait(0.5)  # the deadline passes meanwhile
                    yield pb.ClientFrame(abort_request_ids=["a"])

                ended = {}
                for frame in client.stub.Generate(stream(), timeout=20):
                    for u in frame.updates:
                        if u.finish_reason:
                            ended[u.request_id] = (u.finish_reason, u.status.code)
                    if len(ended) == 3:
                        break
                for _ in range(100):  # the consumer thread logs once the abort outputs are back
                    if {"deadline", "aborted"} <= {r.fields["request_id"] for r in caplog.records}:
                        break
                    threading.Event().wait(0.05)
            after = scrape(port, "llmserve:request_success")
    finally:
        assert running.stop() == 0
    assert ended == {"d": (pb.FINISH_REASON_ERROR, grpc.StatusCode.DEADLINE_EXCEEDED.value[0]),
                     "b": (pb.FINISH_REASON_ERROR, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
                     "a": (pb.FINISH_REASON_ABORT, 0)}
    lines = {r.fields["request_id"]: r.fields for r in caplog.records}
    assert lines["deadline"]["finish_reason"] == "error" and lines["deadline"]["error"].startswith("DEADLINE_EXCEEDED")
    assert lines["bad"]["finish_reason"] == "error" and lines["bad"]["error"].startswith("INVALID_ARGUMENT")
    assert lines["aborted"]["finish_reason"] == "abort" and "error" not in lines["aborted"]
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("error", "abort")} == {"error": 2, "abort": 1}


def test_engine_takes_no_requests_until_its_start_up_canary_passed():
    """The loop was attached, and GetModelInfo answered, before the start-up canary ran: a tokenizer that
    treats an answer as "ready" sent requests to an engine whose health was NOT_SERVING and which could yet
    fail its canary and exit."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = Running(FakeEngine(step_s=0.4))  # the canary's two steps take about a second
    seen: list[tuple[int, str]] = []
    try:
        with EngineClient(running.target, timeout=5) as client:
            health = health_pb2_grpc.HealthStub(client._channel)
            while True:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                try:
                    client.model_info()
                    answer = "answered"
                except grpc.RpcError as exc:
                    answer = exc.details()
                seen.append((status, answer, time.monotonic()))
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                threading.Event().wait(0.05)
    finally:
        assert running.stop() == 0
    before = [answer for status, answer, _ in seen[:-1]]
    assert any("start-up canary has not passed" in a for a in before), seen
    # Requests are taken from the moment the canary passed, and health turns SERVING an await later (never the
    # other way round: SERVING while refusing). A sample whose health check fell in that gap sees an answer under
    # NOT_SERVING: only right before SERVING, and briefly. The bug answered from the start, for the canary's second.
    first = before.index("answered") if "answered" in before else len(before)
    assert all(a == "answered" for a in before[first:]), seen
    assert first == len(before) or seen[-1][2] - seen[first][2] < 0.5, seen


def test_ties_between_engines_are_broken_at_random():
    """Every replica lists the engines in the same order and sees only its own load: taking the first of the
    least loaded sent every lightly loaded replica's requests to one engine (3.0, 0.0, 0.0 live requests)."""
    from collections import Counter
    from types import SimpleNamespace

    from tokenizer_service.engine_pool import least_loaded

    conns = [SimpleNamespace(name=n, inflight={}) for n in "abc"]
    picks = Counter(least_loaded(conns).name for _ in range(600))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 120, picks
    conns[0].inflight = {"x": 1}
    conns[2].inflight = {"y": 1, "z": 2}
    assert {least_loaded(conns).name for _ in range(50)} == {"b"}  # the least loaded still wins


def test_pool_says_an_engine_failed_not_that_it_drained(monkeypatch, caplog):
    """A failed engine fails its live requests with INTERNAL and then ends each Generate stream OK: the pool named
    that end "the engine ended the stream (draining)" in its warning and in /health's failure text, which sent an
    operator looking for a rollout instead of the engine's traceback."""
    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", "2")
    running = Running(FakeEngine(), failure_linger_s=2.0)
    caplog.set_level(logging.WARNING, logger="tokenizer_service.engine_pool")

    def stream_ends() -> list[str]:
        return [r.getMessage() for r in caplog.records if " lost (" in r.getMessage()]  # a stream that had served

    async def main() -> None:
        pool = EnginePool(pool_config(engines=running.target), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1)
            handle = await pool.submit(new("", [1], max_tokens=50, ignore_eos=True), None)
            updates = [update async for update in handle]
            assert updates[-1].status.code == grpc.StatusCode.INTERNAL.value[0], updates[-1]
            await wait_for(stream_ends)
        finally:
            await pool.close()

    try:
        asyncio.run(main())
    finally:
        running.thread.join(20)  # the failed engine exits by itself once failure_linger_s is over
        if running.thread.is_alive():
            running.stop()
    assert running.exit_code == 1  # it failed, as ENGINE_TEST_FAIL_AFTER_STEPS makes it
    first = stream_ends()[0]
    assert "the engine failed, then ended the stream (engine failure:" in first and "draining" not in first, first
