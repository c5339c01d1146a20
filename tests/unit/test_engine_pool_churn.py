"""The tokenizer service's engine pool under churn, in-process over the fake engine (found by an audit): an
--engine-dns name getaddrinfo refuses, an engine that answers GetModelInfo but refuses the Generate call, a
retired engine ending its stream, and requests that find every engine draining."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import grpc
import pytest

from clients.engine_client import EngineClient
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
from tests.fake_engine import FakeEngine
from tests.unit.test_engine_service_fake import Running, new, wait_serving
from tests.unit.test_service_regressions import (
    LONG,
    long_engine,
    pool_config,
    retire_with_a_request_in_flight,
    run_then_stop,
    wait_for,
)
from tokenizer_service import engine_pool
from tokenizer_service.config import TextServerConfig
from tokenizer_service.engine_pool import EnginePool, RequestFailed

pytestmark = pytest.mark.timeout(60)
POOL_LOG = "tokenizer_service.engine_pool"


class Reconnects:
    """Stands in for TextMetrics: counts engine_stream_reconnects_total."""

    def __init__(self) -> None:
        self.reconnects = self
        self.count = 0

    def inc(self) -> None:
        self.count += 1


def dns_answers(port: int, answers: list[str], errors: list[Exception]):
    """A loop.getaddrinfo answering `answers` (127.0.0.x), after raising the queued `errors` one per call."""

    async def getaddrinfo(host, port_, **kwargs):
        if errors:
            raise errors.pop(0)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers]

    return getaddrinfo


@pytest.mark.parametrize("name", ["llm-engine..svc.cluster.local", "x" * 64 + ".svc.cluster.local",
                                  "bad_name!", "llm engine", "-llm-engine", "a." * 127 + "b"])
def test_an_engine_dns_name_getaddrinfo_refuses_is_a_config_error(name):
    """An empty label or one over 63 characters passed the config, and then every lookup raised UnicodeError."""
    with pytest.raises(ValueError) as err:
        TextServerConfig(model="m", engine_dns=f"{name}:50051")
    for part in ("engine_dns", "--engine-dns", "TOKENIZER_ENGINE_DNS", "1 to 63 characters", name):
        assert part in str(err.value), str(err.value)
    TextServerConfig(model="m", engine_dns="llm-engine.llmserve.svc.cluster.local.:50051")  # a trailing dot is fine


def test_dns_refresh_outlives_an_unexpected_error(caplog):
    """getaddrinfo raising anything but OSError (UnicodeError for a bad label) ended the refresh task for good,
    with nothing in the log: no engine was ever connected."""
    running = long_engine()
    port = int(running.target.rpartition(":")[2])
    errors: list[Exception] = [UnicodeError("label empty or too long")] * 3

    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = dns_answers(port, ["127.0.0.1"], errors)
        pool = EnginePool(pool_config(engine_dns=f"engines.test:{port}", dns_refresh_s=0.05), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1, timeout_s=5.0)
        finally:
            await pool.close()

    try:
        with caplog.at_level(logging.ERROR, logger=POOL_LOG):
            asyncio.run(main())
    finally:
        assert running.stop() == 0
    failed = [r for r in caplog.records if r.name == POOL_LOG and "UnicodeError" in r.getMessage()]
    assert len(failed) == 3 and all(f"engines.test:{port}" in r.getMessage() for r in failed), failed
    assert [bool(r.exc_info) for r in failed] == [True, False, False]  # one traceback, not one a round


def test_an_engine_refusing_the_generate_call_is_backed_off_and_gets_no_requests(caplog, monkeypatch):
    """GetModelInfo reset the backoff and made the connection ready before the Generate call was known to be up:
    an engine whose generation calls were all taken was redialled every reconnect_min_s forever, and requests
    placed on it in the instant it looked ready failed at once with "lost the engine: RESOURCE_EXHAUSTED"."""
    # A refusal arrives within a round trip; on a loaded 2-core machine give it 3 s rather than 1 to count as one.
    monkeypatch.setattr(engine_pool, "STREAM_PROVEN_S", 3.0)
    running = Running(FakeEngine(max_model_len=10_000_000), max_concurrent_rpcs=1)
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)

    async def main() -> tuple[int, RequestFailed, float, list[int]]:
        pool = EnginePool(pool_config(engines=running.target, reconnect_max_s=1.0, engine_wait_s=1.0),
                          100, {99}, [])
        pool.metrics = metrics = Reconnects()
        async with grpc.aio.insecure_channel(running.target) as channel:
            hog = pb_grpc.EngineStub(channel).GenerateStream(new("hog", [1], **LONG))
            await hog.read()  # the engine's one generation call is taken
            pool.start()
            try:
                await wait_for(lambda: metrics.count >= 1)  # refused once
                start = time.monotonic()
                with pytest.raises(RequestFailed) as err:  # not placed on it: it waits, then says why
                    await pool.submit(new("", [1], max_tokens=2), None)
                waited = time.monotonic() - start
                await asyncio.sleep(1.0)
                redials = metrics.count
                hog.cancel()  # the engine takes a stream again: the pool connects and serves
                await wait_for(lambda: len(pool.ready) == 1, timeout_s=15.0)  # after its probation
                tokens: list[int] = []
                handle = await pool.submit(new("", [1], max_tokens=2), None)
                async for update in handle:
                    tokens.extend(update.new_token_ids)
                return redials, err.value, waited, tokens
            finally:
                await pool.close()

    try:
        with caplog.at_level(logging.WARNING, logger=POOL_LOG):
            redials, error, waited, tokens = asyncio.run(main())
    finally:
        assert running.stop() == 0
    # In ~2 s with reconnect_min_s 0.05 growing to 1.0: about 5 attempts (before: one every 0.05 s, ~40).
    assert redials <= 8, redials
    assert error.code == grpc.StatusCode.UNAVAILABLE and waited >= 0.9, (error.message, waited)
    assert "no engine is connected" in error.message and "refused the stream (RESOURCE_EXHAUSTED" in error.message
    assert running.target in error.message, error.message
    assert tokens == [2, 3]
    refused = [r.getMessage() for r in caplog.records if "refused the stream" in r.getMessage()]
    assert refused and "reconnecting in" in refused[-1], refused


def test_a_retired_engine_ending_its_stream_is_not_reconnected(caplog):
    """An engine that had left DNS and then ended its stream was logged as "lost ... reconnecting in 0.05s"
    and counted as a reconnect, though its connection then closed for good. (On a loaded machine the DNS round
    may close the retired connection first, once its one request has ended: that is no reconnect either, and it
    logs nothing; the line is required only where the stream's end came first.)"""
    running = Running(FakeEngine(max_model_len=10_000_000), grace_s=0.3)  # cuts its streams 0.3 s into a drain
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
    port = int(running.target.rpartition(":")[2])
    answers = ["127.0.0.1"]

    closed_by_dns = []

    async def main() -> tuple[int, bool]:
        asyncio.get_running_loop().getaddrinfo = dns_answers(port, answers, [])
        pool = EnginePool(pool_config(engine_dns=f"engines.test:{port}", dns_refresh_s=0.05), 100, {99}, [])
        pool.metrics = metrics = Reconnects()
        try:
            handle = await retire_with_a_request_in_flight(pool, answers)
            running.loop.call_soon_threadsafe(running.stop_event.set)
            updates = [update async for update in handle]  # the drain's end fails it in-band, with the reason
            assert updates[-1].finish_reason == pb.FINISH_REASON_ERROR, updates[-1]
            assert updates[-1].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "grace period" in updates[-1].status.message
            await wait_for(lambda: handle.conn.finished, timeout_s=3.0)
            await asyncio.sleep(0.2)  # a reconnect would have been counted by now
            closed_by_dns.append(handle.conn._task.cancelled())
            return metrics.count, handle.conn.finished
        finally:
            await pool.close()

    try:
        with caplog.at_level(logging.INFO, logger=POOL_LOG):
            assert asyncio.run(main()) == (0, True)
    finally:
        running.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == POOL_LOG and running.target in r.getMessage()]
    assert not any("reconnecting in" in line for line in lines), lines
    assert closed_by_dns == [True] or any("left DNS: not reconnecting" in line for line in lines), lines


def test_requests_finding_every_engine_draining_are_told_so():
    """With every engine connected but refusing new requests (draining), a request's error said "no engine is
    connected"."""
    engines = [long_engine(), long_engine()]

    async def main() -> RequestFailed:
        pool = EnginePool(pool_config(engines=",".join(e.target for e in engines), engine_wait_s=0.3),
                          100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 2)
            for conn in pool.conns.values():
                conn.mark_refusing()  # as the pool's reader does when an engine refuses a request with UNAVAILABLE
            with pytest.raises(RequestFailed) as err:
                await pool.submit(new("", [1], max_tokens=2), None)
            return err.value
        finally:
            await pool.close()

    try:
        error = asyncio.run(main())
    finally:
        for engine in engines:
            assert engine.stop() == 0
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "no engine is connected" not in error.message, error.message
    assert error.message.startswith("every connected engine refuses new requests (draining or failed)"), error.message
    for engine in engines:
        assert f"{engine.target}: refuses new requests" in error.message, error.message


class _Conn:
    """A connection as submit() sees one: ready or not, with the engine's features."""

    def __init__(self, address: str, ready: bool, features: tuple[str, ...]) -> None:
        self.address, self.ready, self.retiring, self.refusing = address, ready, False, False
        self.info = pb.ModelInfo(features=features)
        self.inflight: dict = {}

    def send(self, request, max_buffered_updates, timeout_s=None):
        return ("sent to", self.address)


def test_a_request_using_penalties_waits_for_a_capable_engine_that_is_reconnecting():
    """With an old engine ready and an upgraded one reconnecting, a penalised request failed at once, while a
    plain request with no engine ready waits up to engine_wait_s."""
    async def main() -> None:
        pool = EnginePool(pool_config(engines="old:1", engine_wait_s=5), 100, {1}, [])  # not started
        old, new = _Conn("old:1", True, ()), _Conn("new:1", False, ("logprobs", "penalties"))
        pool.conns = {"old:1": old, "new:1": new}
        penalised = pb.NewRequest(prompt_token_ids=[1], sampling_params=pb.SamplingParams(repetition_penalty=1.2))

        async def reconnect() -> None:
            await asyncio.sleep(0.3)
            new.ready = True
            pool.changed()

        task = asyncio.create_task(reconnect())
        started = time.monotonic()
        assert await pool.submit(penalised, None) == ("sent to", "new:1")
        assert 0.25 < time.monotonic() - started < 3
        await task
        # A capable engine that is draining comes back: worth waiting for too.
        new.ready, new.refusing = True, True
        started = time.monotonic()

        async def stop_refusing() -> None:
            await asyncio.sleep(0.3)
            new.refusing = False
            pool.changed()

        undrain = asyncio.create_task(stop_refusing())
        assert await pool.submit(penalised, None) == ("sent to", "new:1")
        assert 0.25 < time.monotonic() - started < 3
        await undrain
        # Nothing else to wait for, or only engines known to lack the feature: refused at once, naming them.
        for others in ({}, {"older:1": _Conn("older:1", False, ("logprobs",))}):
            pool.conns = {"old:1": old, **others}
            with pytest.raises(RequestFailed) as err:
                await asyncio.wait_for(pool.submit(penalised, None), 1)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "old:1 predate them" in err.value.message
        plain = pb.NewRequest(prompt_token_ids=[1], sampling_params=pb.SamplingParams(repetition_penalty=1.0))
        assert await pool.submit(plain, None) == ("sent to", "old:1")

    asyncio.run(main())


def test_the_text_api_lists_the_features_a_ready_engine_applies():
    pool = EnginePool(pool_config(engines="a:1"), 100, {1}, [])  # not started
    pool.conns = {"a:1": _Conn("a:1", True, ("logprobs", "json_object", "json_schema")),
                  "b:1": _Conn("b:1", True, ("penalties", "something_newer")),
                  "c:1": _Conn("c:1", False, ("logit_bias",))}  # not ready: not counted
    assert pool.features == ["logprobs", "penalties", "json_object", "json_schema"]
    pool.conns["a:1"].ready = False
    assert pool.features == ["penalties"]


def test_an_engine_refusing_in_band_is_marked_by_the_stream_that_said_so():
    """The servicer marked an engine refusing when its caller read the in-band UNAVAILABLE, which a slow caller did
    long after: by then the engine had restarted on the same address and the mark landed on the new, healthy
    stream, which nothing cleared (the replica stayed NOT_SERVING for good). The pool's reader marks it on
    receipt, unread by anyone."""
    running = Running(FakeEngine(max_model_len=10_000_000), grace_s=0.3)  # cuts its streams 0.3 s into a drain
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)

    async def main() -> bool:
        # room for every update the unread request gets (past the bound, the pool would end it itself)
        pool = EnginePool(pool_config(engines=running.target, max_buffered_updates=10**7), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1)
            conn = next(iter(pool.conns.values()))
            handle = await pool.submit(new("", [1], **LONG), None)  # never read
            await wait_for(lambda: handle.got_tokens)  # running in the engine (else the drain refuses it unseen)
            running.loop.call_soon_threadsafe(running.stop_event.set)
            await wait_for(lambda: conn.refusing, timeout_s=5.0)
            return handle.done
        finally:
            await pool.close()

    try:
        assert asyncio.run(main())
    finally:
        running.stop()


def test_a_request_on_a_stalled_engine_fails_at_its_deadline(monkeypatch):
    """A request's deadline was the engine's to enforce: an engine whose loop stalled (or a frozen process, until
    keepalive noticed, 40 s by default) held GenerateMulti requests long past their deadline_ms. The pool's handle
    fails it DEADLINE_GRACE_S after the deadline, and aborts it in the engine."""
    monkeypatch.setattr(engine_pool, "DEADLINE_GRACE_S", 0.2)
    running = long_engine()

    async def main() -> tuple[RequestFailed, float]:
        pool = EnginePool(pool_config(engines=running.target), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1)
            running.loop.call_soon_threadsafe(time.sleep, 2.5)  # the engine's loop stalls
            started = time.monotonic()
            handle = await pool.submit(new("", [1], **LONG), 0.3)
            with pytest.raises(RequestFailed) as err:
                async for _ in handle:
                    pass
            took = time.monotonic() - started
            assert not handle.conn.inflight
            return err.value, took
        finally:
            await pool.close()

    try:
        error, took = asyncio.run(main())
    finally:
        assert running.stop() == 0
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error.message
    assert "did not end the request within" in error.message and running.target in error.message, error.message
    assert 0.45 <= took < 2.0, took


def test_a_failed_lookup_does_not_bring_back_an_engine_that_left_dns():
    """One failed DNS lookup (EAI_AGAIN; or NXDOMAIN, a headless Service with no ready pods) kept 'every engine
    known', retiring ones included, and so put an engine that had left DNS back into use."""
    running = long_engine()
    port = int(running.target.rpartition(":")[2])
    answers = ["127.0.0.1"]
    errors: list[Exception] = []

    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = dns_answers(port, answers, errors)
        pool = EnginePool(pool_config(engine_dns=f"engines.test:{port}", dns_refresh_s=0.05), 100, {99}, [])
        try:
            handle = await retire_with_a_request_in_flight(pool, answers)
            errors.extend([socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")] * 50)
            await wait_for(lambda: len(errors) <= 47)  # lookups failed three rounds in a row
            assert handle.conn.retiring and not pool.ready
            errors.clear()
            handle.close()
        finally:
            await pool.close()

    run_then_stop(running, main)


class _Stream:
    """What a RequestHandle needs of its connection."""

    address = "engine:1"

    def __init__(self) -> None:
        self.inflight: dict = {}
        self.aborted: list[str] = []

    def abort(self, request_id: str, stopped: bool = False) -> None:
        self.aborted.append(request_id)


def test_updates_queued_while_the_reader_was_busy_come_as_one():
    """Each engine update went to the caller alone, so a GenerateMulti call, whose one response stream backs up
    every request's reader, wrote one message per token and relayed at most ~7,000 tokens/s however far behind it
    fell. Updates queued meanwhile now come as one: tokens, logprobs and the finish joined in order; a failure
    queued after them, the pool's or the engine's error update, comes after them on its own (joined, its error
    was raised before their text, or a stop string they complete, reached the caller); one update alone is passed
    as it is."""
    def update(ids, finish=0, **fields):
        lps = [pb.TokenLogprobs(logprob=-float(i), top_token_ids=[i]) for i in ids]
        return pb.RequestUpdate(new_token_ids=ids, logprobs=lps, finish_reason=finish, **fields)

    async def read(handle):
        got = []
        try:
            async for item in handle:
                got.append(item)
        except RequestFailed as exc:
            got.append(exc)
        return got

    async def main():
        conn = _Stream()
        handle = conn.inflight["7"] = engine_pool.RequestHandle(conn, "7", max_buffered=100)
        first = update([5], num_prompt_tokens=3, num_cached_tokens=2,
                       prompt_logprobs=[pb.TokenLogprobs(logprob=-1.0)] * 2)
        handle.push(first)
        alone = await handle.__anext__()
        assert alone is first  # nothing else was queued: no copy
        for ids in ([6], [7, 8], [9]):
            handle.push(update(ids))
        handle.push(update([10], finish=pb.FINISH_REASON_LENGTH))
        joined = await read(handle)
        assert len(joined) == 1 and list(joined[0].new_token_ids) == [6, 7, 8, 9, 10]
        assert [lp.top_token_ids[0] for lp in joined[0].logprobs] == [6, 7, 8, 9, 10]
        assert joined[0].finish_reason == pb.FINISH_REASON_LENGTH and not conn.inflight

        handle = conn.inflight["8"] = engine_pool.RequestHandle(conn, "8", max_buffered=100)
        handle.push(update([1]))
        handle.push(update([2]))
        handle.fail(RequestFailed(grpc.StatusCode.UNAVAILABLE, "lost the engine"))
        got = await read(handle)
        assert [list(u.new_token_ids) for u in got[:-1]] == [[1, 2]] and isinstance(got[-1], RequestFailed)

        handle = conn.inflight["9"] = engine_pool.RequestHandle(conn, "9", max_buffered=100)
        handle.push(update([1]))
        handle.push(pb.RequestUpdate(finish_reason=pb.FINISH_REASON_ERROR,
                                     status=pb.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="drain")))
        handle.push(update([99]))  # after the finish: dropped
        got = await read(handle)  # the engine's error update apart: the caller reads the tokens before it first
        assert [list(u.new_token_ids) for u in got] == [[1], []] and got[1].status.message == "drain"

    asyncio.run(main())


def test_a_full_engine_is_retried_only_on_an_engine_that_could_take_the_request():
    """A request refused as queue-full went to 'an engine not yet tried' while any ready engine was untried, even one
    lacking what the request uses: submit() could only send it back to the full one (three times)."""
    pool = EnginePool(pool_config(engines="a:1"), 100, {1}, [])  # not started
    full, plain = _Conn("a:1", True, ("logprobs",)), _Conn("b:1", True, ())
    pool.conns = {"a:1": full, "b:1": plain}
    assert not pool.can_try_another([full], pb.SamplingParams(logprobs=2))
    assert pool.can_try_another([full], pb.SamplingParams())
    assert not pool.can_try_another([full, plain], pb.SamplingParams())


def test_a_dial_failing_with_an_os_error_is_retried():
    """Making a channel could raise OSError (TLS files read with no temporary directory left): the connection's
    task ended with it, silently, and the engine was never dialled again."""
    running = long_engine()

    async def main() -> None:
        pool = EnginePool(pool_config(engines=running.target), 100, {99}, [])
        real, calls = pool.channel, []

        def channel(address: str):
            calls.append(address)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return real(address)

        pool.channel = channel
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1)
            assert len(calls) >= 2
        finally:
            await pool.close()

    run_then_stop(running, main)
