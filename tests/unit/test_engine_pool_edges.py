"""The engine pool's rules at their edges, from a mutation audit: placement (avoided, preferred and unready
engines, the fallback when every ready engine was tried), the reconnect backoff's doubling and its caps, the
deadline sent to the engine, DNS rounds (an address gone with requests in flight, gone idle, back before and
after its connection closed, listed twice, IPv6), the words of "no engine", and the servicer's retries (the
engines tried, at most MAX_ATTEMPTS, which statuses retry, nothing retried after a token)."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest

from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
from tests.unit.test_service_regressions import pool_config, wait_for
from tokenizer_service import engine_pool
from tokenizer_service.engine_pool import EnginePool, RequestFailed, RequestHandle
from tokenizer_service.metrics import RequestTrace, TextMetrics
from tokenizer_service.servicer import MAX_ATTEMPTS, TextServicer
from tokenizer_service.validation import PreparedRequest

pytestmark = pytest.mark.timeout(60)
POOL_LOG = "tokenizer_service.engine_pool"


class _Conn:
    """A connection as submit() sees one."""

    def __init__(self, address: str, ready: bool = True, load: int = 0) -> None:
        self.address, self.ready, self.retiring, self.refusing = address, ready, False, False
        self.info = pb.ModelInfo()
        self.inflight = {str(i): None for i in range(load)}
        self.failure = ""
        self.sent: list[tuple[pb.NewRequest, float | None]] = []

    def send(self, request, max_buffered_updates, timeout_s=None):
        self.sent.append((request, timeout_s))
        return self


def _pool(*conns: _Conn, **config: object) -> EnginePool:
    pool = EnginePool(pool_config(engines="a:1", **config), 100, {99}, [])  # not started
    pool.conns = {c.address: c for c in conns}
    return pool


def _request() -> pb.NewRequest:
    return pb.NewRequest(prompt_token_ids=[1], sampling_params=pb.SamplingParams(max_tokens=2))


def _picks(pool: EnginePool, times: int = 40, **kwargs: object) -> set[str]:
    async def main() -> set[str]:
        return {(await pool.submit(_request(), None, **kwargs)).address for _ in range(times)}

    return asyncio.run(main())


# ---- placement ------------------------------------------------------------------------------------------------

def test_an_avoided_engine_gets_no_request_while_another_is_ready():
    a, b = _Conn("a:1"), _Conn("b:1", load=5)  # the one not tried is chosen even when busier
    assert _picks(_pool(a, b), avoid={a}) == {"b:1"}


def test_a_request_that_tried_every_ready_engine_goes_back_to_one_of_them():
    """A retry after the only engine was lost and came back: avoiding it left nothing to choose from."""
    a, b = _Conn("a:1", load=1), _Conn("b:1")
    assert _picks(_pool(a, b), avoid={a, b}) == {"b:1"}  # the least loaded of them, as if nothing were avoided


def test_the_preferred_engine_wins_only_where_it_is_ready_and_not_avoided():
    a, b = _Conn("a:1", load=3), _Conn("b:1")
    pool = _pool(a, b)
    assert _picks(pool, prefer=a) == {"a:1"}  # the engine the request's other completions went to, though busier
    assert _picks(pool, prefer=a, avoid={a}) == {"b:1"}
    a.ready = False
    assert _picks(pool, prefer=a) == {"b:1"}
    a.ready, a.refusing = True, True
    assert _picks(pool, prefer=a) == {"b:1"}


def test_load_is_what_is_in_flight_from_this_replica_and_retiring_engines_take_nothing():
    a, b, c = _Conn("a:1", load=2), _Conn("b:1", load=1), _Conn("c:1")
    c.retiring = True
    assert _picks(_pool(a, b, c)) == {"b:1"}
    b.inflight.clear()
    a.inflight.clear()
    assert _picks(_pool(a, b, c), times=100) == {"a:1", "b:1"}


def test_the_prompt_bound_is_the_smallest_ready_engines_max_model_len():
    """With engines of different max_model_len ready, a prompt is checked against the smallest: one that fits only
    the largest would be refused, or fail, on whichever smaller engine it went to."""
    a, b, c = _Conn("a:1"), _Conn("b:1"), _Conn("c:1", ready=False)
    a.info, b.info, c.info = (pb.ModelInfo(max_model_len=n) for n in (200, 100, 50))
    pool = _pool(a, b, c)
    assert pool.max_model_len == 100  # c is not ready: its bound is not the service's yet
    b.retiring = True
    assert pool.max_model_len == 200
    a.ready = False
    assert pool.max_model_len == 0  # none ready


def test_an_engine_of_another_vocabulary_or_eos_ids_is_refused_by_name():
    pool = _pool()
    assert pool.check_model(pb.ModelInfo(vocab_size=100, eos_token_ids=[99])) is None
    assert pool.check_model(pb.ModelInfo(vocab_size=50, eos_token_ids=[99])) == (
        "vocab_size 50 differs from this tokenizer's model (100)")
    for eos in ([7], [7, 99], []):
        assert pool.check_model(pb.ModelInfo(vocab_size=100, eos_token_ids=eos)) == (
            f"eos_token_ids {sorted(eos)} differ from this model's [99]")


# ---- the deadline sent to the engine --------------------------------------------------------------------------

@pytest.mark.parametrize("timeout_s,deadline_ms", [
    (1e-6, 1),  # what is left rounds to 0 ms, which an engine reads as "no deadline"
    (1e12, engine_pool.MAX_DEADLINE_MS),  # a "no deadline" sent as a huge value still fits
    (30.0, None),
    (None, 0),
])
def test_the_deadline_sent_is_what_is_left_never_zero_and_capped(timeout_s, deadline_ms):
    a = _Conn("a:1")
    request = _request()

    async def main() -> None:
        await _pool(a, engine_wait_s=60).submit(request, timeout_s)

    asyncio.run(main())
    [(sent, left_s)] = a.sent
    if deadline_ms is None:  # a moment of it went by before it was sent
        assert 29_000 < sent.deadline_ms <= 30_000 and left_s == sent.deadline_ms / 1000
    else:
        assert sent.deadline_ms == deadline_ms
        assert left_s == (deadline_ms / 1000 if timeout_s is not None else None)  # the pool's own timer's


# ---- the error of a request that found no engine ---------------------------------------------------------------

def test_no_engine_says_why_for_each_engine():
    connecting, failed, gone, refusing = (_Conn("a:1", ready=False), _Conn("b:1", ready=False), _Conn("c:1"),
                                          _Conn("d:1"))
    failed.failure = "refused (vocab_size 50 differs from this tokenizer's model (100))"
    gone.retiring = True
    gone.refusing = True  # a retiring engine's refusal is no reason to call the others connected
    refusing.ready = False  # a refusal from a stream since lost
    refusing.refusing = True
    pool = _pool(connecting, failed, gone, refusing, engine_wait_s=0.1)

    async def main() -> RequestFailed:
        with pytest.raises(RequestFailed) as err:
            await pool.submit(_request(), None)
        return err.value

    error = asyncio.run(main())
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.message.startswith("no engine is connected (waited 0.1s); engines: "), error.message
    assert error.message.endswith("a:1: connecting; b:1: refused (vocab_size 50 differs from this tokenizer's model "
                                  "(100)); c:1: left DNS; d:1: connecting"), error.message


# ---- the reconnect backoff ------------------------------------------------------------------------------------

def _backoffs(caplog, level: int, address: str) -> list[float]:
    """The backoff each "retrying/reconnecting in" line of `address` gave, in order (its last argument)."""
    return [r.args[-1] for r in caplog.records
            if r.name == POOL_LOG and r.levelno == level and r.args and r.args[0] == address]


def _unused_address() -> str:
    with socket.socket() as s:  # a port nobody listens on: each dial fails at once
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _run_pool(pool: EnginePool, until) -> None:
    async def main() -> None:
        pool.start()
        try:
            await wait_for(until)
        finally:
            await pool.close()

    asyncio.run(main())


def test_an_unreachable_engine_is_redialled_after_a_doubling_backoff_capped_at_max(caplog, monkeypatch):
    monkeypatch.setattr(engine_pool, "jittered", lambda backoff: backoff)  # the nominal waits
    address = _unused_address()
    pool = EnginePool(pool_config(engines=address, reconnect_min_s=0.01, reconnect_max_s=0.04), 100, {99}, [])
    with caplog.at_level(logging.WARNING, logger=POOL_LOG):
        _run_pool(pool, lambda: len(_backoffs(caplog, logging.WARNING, address)) >= 6)
    assert _backoffs(caplog, logging.WARNING, address)[:6] == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]
    assert pool.conns[address].failure.startswith("not reached (UNAVAILABLE: ")


def test_a_channel_that_cannot_be_made_is_retried_after_a_doubling_backoff_capped_at_max(caplog, monkeypatch):
    monkeypatch.setattr(engine_pool, "jittered", lambda backoff: backoff)  # the nominal waits
    pool = EnginePool(pool_config(engines="e:1", reconnect_min_s=0.01, reconnect_max_s=0.04), 100, {99}, [])

    def channel(address):
        raise ValueError("--engine-tls-ca: no such file")

    pool.channel = channel
    with caplog.at_level(logging.ERROR, logger=POOL_LOG):
        _run_pool(pool, lambda: len(_backoffs(caplog, logging.ERROR, "e:1")) >= 5)
    assert _backoffs(caplog, logging.ERROR, "e:1")[:5] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert pool.conns["e:1"].failure == "cannot dial: --engine-tls-ca: no such file"


def test_redials_are_spread_a_fifth_either_side_of_the_doubling_backoff(caplog):
    """Tokenizer replicas that lost an engine together (it restarted) redialled it in lockstep: each wait is the
    doubling backoff give or take a fifth at random, as gRPC's own reconnect backoff."""
    address = _unused_address()
    pool = EnginePool(pool_config(engines=address, reconnect_min_s=0.01, reconnect_max_s=0.04), 100, {99}, [])
    with caplog.at_level(logging.WARNING, logger=POOL_LOG):
        _run_pool(pool, lambda: len(_backoffs(caplog, logging.WARNING, address)) >= 6)
    waits = _backoffs(caplog, logging.WARNING, address)[:6]
    for wait, nominal in zip(waits, [0.01, 0.02, 0.04, 0.04, 0.04, 0.04], strict=True):
        assert 0.8 * nominal - 0.005 <= wait <= 1.2 * nominal + 0.005, waits  # as logged, to 0.01 s
    drawn = [engine_pool.jittered(1.0) for _ in range(200)]
    assert min(drawn) >= 0.8 and max(drawn) <= 1.2 and max(drawn) - min(drawn) > 0.3, (min(drawn), max(drawn))


class _OtherModel(pb_grpc.EngineServicer):
    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name="other", vocab_size=50, eos_token_ids=[99], max_model_len=64)


async def _failed_request(servicer, config: dict, ready=None) -> tuple[str, RequestFailed]:
    """A pool of one engine served by `servicer` (None: a gRPC server without the engine API); once ready(address)
    holds, a request to it, which must fail: (the engine's address, the failure)."""
    server = grpc.aio.server()
    if servicer is not None:
        pb_grpc.add_EngineServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    pool = EnginePool(pool_config(engines=address, **config), 100, {99}, [])
    pool.start()
    try:
        if ready is not None:
            await wait_for(lambda: ready(address))
        with pytest.raises(RequestFailed) as err:
            await pool.submit(_request(), None)
        return address, err.value
    finally:
        await pool.close()
        await server.stop(0)


@pytest.mark.parametrize("servicer", [_OtherModel, None], ids=["another-model", "not-an-engine"])
def test_an_engine_that_will_never_serve_us_is_redialled_at_the_max_backoff(caplog, monkeypatch, servicer):
    """A wrong model or a server without the engine API does not come right by redialling fast: from the first
    refusal on, it waits reconnect_max_s."""
    monkeypatch.setattr(engine_pool, "jittered", lambda backoff: backoff)  # the nominal waits
    with caplog.at_level(logging.WARNING, logger=POOL_LOG):
        address, error = asyncio.run(_failed_request(
            servicer() if servicer is not None else None,
            dict(reconnect_min_s=0.01, reconnect_max_s=0.08, engine_wait_s=0.3),
            lambda address: len(_backoffs(caplog, logging.WARNING, address)) >= 3))
    assert _backoffs(caplog, logging.WARNING, address)[:3] == [0.08] * 3
    assert error.code == grpc.StatusCode.UNAVAILABLE and f"{address}: refused (" in error.message, error.message
    if servicer is None:
        assert "UNIMPLEMENTED" in error.message and "is it a tokenizer service?" in error.message, error.message
    else:
        assert "vocab_size 50 differs from this tokenizer's model (100)" in error.message, error.message


class _Silent(pb_grpc.EngineServicer):
    async def GetModelInfo(self, request, context):
        await asyncio.sleep(30)  # took the connection, never answers (a stopped or stalled engine)


def test_an_engine_that_takes_the_connection_but_never_answers_is_named_as_such(monkeypatch):
    """The reason given was "not reached (DEADLINE_EXCEEDED: Deadline Exceeded)", which reads as the request's
    own deadline."""
    monkeypatch.setattr(engine_pool, "MODEL_INFO_TIMEOUT_S", 0.2)

    address, error = asyncio.run(_failed_request(_Silent(), dict(engine_wait_s=0.5)))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert (f"{address}: not reached (GetModelInfo got no answer within 0.2s: a connection that hangs"
            in error.message and "or an engine that took it and did not answer" in error.message), error.message


class _FlakyThenHealthy(pb_grpc.EngineServicer):
    """Refuses GetModelInfo `refusals` times (starting up), then serves; its first stream ends after 0.3 s."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.streams = refusals, 0

    async def GetModelInfo(self, request, context):
        if self.refusals:
            self.refusals -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        return pb.ModelInfo(model_name="m", vocab_size=100, eos_token_ids=[99], max_model_len=64)

    async def Generate(self, request_iterator, context):
        self.streams += 1
        await asyncio.sleep(0.3 if self.streams == 1 else 30)
        return
        yield


def test_a_proven_stream_that_drops_is_redialled_at_the_min_backoff(caplog, monkeypatch):
    """The backoff grown while an engine started up is reset once its stream proved itself: its loss is redialled
    at reconnect_min_s, not where the start-up left it."""
    monkeypatch.setattr(engine_pool, "STREAM_PROVEN_S", 0.1)
    monkeypatch.setattr(engine_pool, "jittered", lambda backoff: backoff)  # the nominal waits

    async def main() -> str:
        server = grpc.aio.server()
        engine = _FlakyThenHealthy(refusals=3)
        pb_grpc.add_EngineServicer_to_server(engine, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        pool = EnginePool(pool_config(engines=address, reconnect_min_s=0.01, reconnect_max_s=0.32), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: engine.streams >= 2)
            return address
        finally:
            await pool.close()
            await server.stop(0)

    with caplog.at_level(logging.WARNING, logger=POOL_LOG):
        address = asyncio.run(main())
    assert _backoffs(caplog, logging.WARNING, address)[:4] == [0.01, 0.02, 0.04, 0.01]
    lost = [r.args[1] for r in caplog.records if r.name == POOL_LOG and r.args and r.args[0] == address]
    assert lost[:4] == ["not reached"] * 3 + ["lost"], lost


# ---- what the engine is sent, and what marks it refusing ------------------------------------------------------

class _Recorder(pb_grpc.EngineServicer):
    """Answers a request whose prompt is [code] (code > 0) with an in-band error of that status; streams a token
    a step to one whose prompt is [0] until it is aborted. Keeps every abort and stop it was sent."""

    def __init__(self) -> None:
        self.aborts: list[str] = []
        self.stops: list[str] = []
        self.frames = 0

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name="m", vocab_size=100, eos_token_ids=[99], max_model_len=64)

    async def Generate(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        live: set[str] = set()

        async def read() -> None:
            async for frame in request_iterator:
                self.frames += 1
                self.aborts += frame.abort_request_ids
                self.stops += frame.stopped_request_ids
                live.difference_update(frame.abort_request_ids)
                for r in frame.requests:
                    if r.prompt_token_ids[0]:
                        await out.put(pb.RequestUpdate(request_id=r.request_id, finish_reason=pb.FINISH_REASON_ERROR,
                                                       status=pb.Status(code=r.prompt_token_ids[0], message="no")))
                    else:
                        live.add(r.request_id)

        reader = asyncio.create_task(read())
        try:
            while True:
                await asyncio.sleep(0.01)
                updates = [out.get_nowait() for _ in range(out.qsize())]
                updates += [pb.RequestUpdate(request_id=rid, new_token_ids=[5]) for rid in sorted(live)]
                if updates:
                    yield pb.ServerFrame(updates=updates)
        finally:
            reader.cancel()


def _prompt(first: int) -> pb.NewRequest:
    return pb.NewRequest(prompt_token_ids=[first], sampling_params=pb.SamplingParams(max_tokens=1000))


def test_only_an_unavailable_refusal_marks_an_engine_refusing_and_aborts_reach_it():
    """An engine's INVALID_ARGUMENT or RESOURCE_EXHAUSTED for one request says nothing about the next: it keeps
    taking requests. Closing a request sends its abort (with the stop mark when a stop string ended it), and so
    does the end of a drain's grace (cut_all), so the engine frees what those requests held."""
    async def main() -> tuple[_Recorder, list[bool], dict[str, str]]:
        server = grpc.aio.server()
        engine = _Recorder()
        pb_grpc.add_EngineServicer_to_server(engine, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        pool = EnginePool(pool_config(engines=address), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: len(pool.ready) == 1)
            conn = pool.ready[0]
            marked = []
            for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.UNAVAILABLE):
                handle = await pool.submit(_prompt(code.value[0]), None)
                [update] = [u async for u in handle]
                assert update.status.code == code.value[0]
                marked.append(conn.refusing)
            conn.refusing = False  # as a new stream would
            ids = {}
            for how in ("stopped", "aborted", "cut"):
                handle = await pool.submit(_prompt(0), None)
                ids[how] = handle.request_id
                await handle.__anext__()  # running in the engine
                if how != "cut":
                    handle.close(stopped=how == "stopped")
            assert pool.cut_all("the drain's grace ended") == 1
            await wait_for(lambda: len(engine.aborts) == 3)
            return engine, marked, ids
        finally:
            await pool.close()
            await server.stop(0)

    engine, marked, ids = asyncio.run(main())
    assert marked == [False, False, True]
    assert sorted(engine.aborts) == sorted(ids.values()) and engine.stops == [ids["stopped"]]


# ---- DNS rounds -----------------------------------------------------------------------------------------------

def _dns(answers: list[tuple[int, str]]):
    async def getaddrinfo(host, port, **kwargs):
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port)) for family, ip in answers]

    return getaddrinfo


def test_dns_rounds_add_retire_and_bring_back_engines():
    port = 50051
    v4, v6 = f"127.0.0.1:{port}", f"[::1]:{port}"
    answers = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]

    def channel(address):  # each connection waits out its backoff: this is about the pool's bookkeeping
        raise ValueError("not dialled in this test")

    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = _dns(answers)
        pool = EnginePool(pool_config(engines="", engine_dns=f"engines.test:{port}", reconnect_min_s=30,
                                      reconnect_max_s=30), 100, {99}, [])  # not started: rounds run by hand
        pool.channel = channel
        try:
            await pool._resolve_once()
            assert sorted(pool.conns) == sorted([v4, v6])  # an address listed twice is one engine
            first = pool.conns[v4]
            busy = first.inflight["0"] = RequestHandle(first, "0", max_buffered=10)  # a request in flight
            answers[:] = [(socket.AF_INET6, "::1")]
            await pool._resolve_once()
            assert pool.conns[v4] is first and first.retiring and not first.finished  # kept until its requests end
            assert not busy.done
            answers[:] = [(socket.AF_INET, "127.0.0.1")]
            await pool._resolve_once()  # back before its connection closed: the same one, in use again
            assert pool.conns[v4] is first and not first.retiring
            assert v6 not in pool.conns  # gone with nothing in flight: closed at once
            answers[:] = []
            await pool._resolve_once()
            assert pool.conns[v4] is first and first.retiring
            await first.close()  # as its task ends when its stream does while it is retiring
            first.inflight.clear()
            answers[:] = [(socket.AF_INET, "127.0.0.1")]
            await pool._resolve_once()  # back after: a new connection, which dials
            assert pool.conns[v4] is not first and not pool.conns[v4].retiring and not pool.conns[v4].finished
        finally:
            await pool.close()

    asyncio.run(main())


def test_no_engine_from_a_dns_name_says_whether_it_failed_to_resolve_or_resolved_to_nothing():
    """With --engine-dns the pool can be empty, and the error said only "engines: none": a name that does not
    resolve (a headless Service with no ready pod, or a typo) and one listing no address read the same."""
    answers: list[tuple[int, str]] = []
    errors = [socket.gaierror(socket.EAI_NONAME, "Name or service not known")]

    async def main() -> list[str]:
        lookup = _dns(answers)

        async def getaddrinfo(host, port, **kwargs):
            if errors:
                raise errors[0]
            return await lookup(host, port, **kwargs)

        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        pool = EnginePool(pool_config(engines="", engine_dns="engines.test:50051", engine_wait_s=0.2), 100, {99}, [])
        messages = []
        for _ in range(2):
            with pytest.raises(RequestFailed) as err:
                await pool.submit(_request(), None)
            messages.append(err.value.message)
            await pool._resolve_once()
            errors.clear()
        with pytest.raises(RequestFailed) as err:
            await pool.submit(_request(), None)
        return [*messages, err.value.message]

    before, failed, empty = asyncio.run(main())
    assert before.endswith("engines: none: engines.test:50051 (--engine-dns) has not been resolved yet"), before
    assert "engines: none: resolving engines.test:50051 (--engine-dns) failed (" in failed, failed
    assert "Name or service not known" in failed and "engine pods is ready" in failed, failed
    assert "engines: none: engines.test:50051 (--engine-dns) resolved to no address" in empty, empty


def test_no_engine_from_a_dns_name_getaddrinfo_raises_on_names_the_error():
    async def main() -> str:
        async def getaddrinfo(host, port, **kwargs):
            raise UnicodeError("label empty or too long")

        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        pool = EnginePool(pool_config(engines="", engine_dns="engines.test:50051", engine_wait_s=0.2,
                                      dns_refresh_s=0.05), 100, {99}, [])
        pool.start()
        try:
            with pytest.raises(RequestFailed) as err:
                await pool.submit(_request(), None)
            return err.value.message
        finally:
            await pool.close()

    message = asyncio.run(main())
    assert "failed (UnicodeError: label empty or too long)" in message, message


# ---- the servicer's retries -----------------------------------------------------------------------------------

class _EngineError(RequestFailed):
    """An engine's in-band refusal: the handle yields it as an error update, as the engine sends it."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, "refused in-band")


class _Attempt:
    """One engine request's handle: yields `tokens` updates, then fails with `error` (or finishes)."""

    def __init__(self, conn: str, tokens: int, error: RequestFailed | None) -> None:
        self.conn = type("Conn", (), {"address": conn})()
        self.tokens, self.error, self.got_tokens = tokens, error, False

    def close(self, stopped: bool = False) -> None:
        pass

    async def _updates(self):
        for i in range(self.tokens):
            self.got_tokens = True
            yield pb.RequestUpdate(new_token_ids=[65 + i])
        if isinstance(self.error, _EngineError):
            yield pb.RequestUpdate(finish_reason=pb.FINISH_REASON_ERROR,
                                   status=pb.Status(code=self.error.code.value[0], message=self.error.message))
            return
        if self.error is not None:
            raise self.error
        yield pb.RequestUpdate(new_token_ids=[70], finish_reason=pb.FINISH_REASON_LENGTH)

    def __aiter__(self):
        return self._updates()


class _Engines:
    """A pool of engines e1, e2, ... whose requests each fail as `fail(attempt)` says (None: served)."""

    max_model_len = 1000

    def __init__(self, fail, tokens: int = 0, engines: int = 5, attempt: type[_Attempt] = _Attempt) -> None:
        self.fail, self.tokens, self.engines, self.attempt = fail, tokens, engines, attempt
        self.avoided: list[set[str]] = []

    def can_try_another(self, tried, params) -> bool:
        return len(tried) < self.engines

    async def submit(self, request, timeout_s, avoid=(), prefer=None):
        self.avoided.append({c.address for c in avoid})
        attempt = len(self.avoided)
        return self.attempt(f"e{attempt}", self.tokens if attempt == 1 else 0, self.fail(attempt))


class _Tokenizer:
    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]


def _run_servicer(pool: _Engines, trace: RequestTrace | None = None,
                  metrics: TextMetrics | None = None) -> tuple[list, RequestFailed | None]:
    servicer = TextServicer(_Tokenizer(), pool, "fake", 100, {99}, {}, max_inflight=10, metrics=metrics)
    prep = PreparedRequest(pb.NewRequest(prompt_token_ids=[1], sampling_params=pb.SamplingParams(max_tokens=9)),
                           (), True, False, 1)

    async def main():
        got = []
        try:
            async for response in servicer._generate(prep, None, trace or RequestTrace("r")):
                got.append(list(response.token_ids))
        except RequestFailed as exc:
            return got, exc
        return got, None

    return asyncio.run(main())


def _lost(code=grpc.StatusCode.UNAVAILABLE, retryable=True):
    return RequestFailed(code, f"lost ({code.name})", retryable=retryable)


def test_a_request_lost_before_its_first_token_is_tried_on_at_most_max_attempts_engines_each_new():
    got, error = _run_servicer(pool := _Engines(lambda attempt: _lost()))
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE and not got
    assert pool.avoided == [set(), {"e1"}, {"e1", "e2"}] and len(pool.avoided) == MAX_ATTEMPTS
    assert error.message == f"lost (UNAVAILABLE) (from e{MAX_ATTEMPTS}, the last of {MAX_ATTEMPTS} attempts before any " \
        f"token, on {', '.join(f'e{i}' for i in range(1, MAX_ATTEMPTS + 1))})"  # not one engine's words alone
    got, error = _run_servicer(pool := _Engines(lambda attempt: _lost() if attempt < MAX_ATTEMPTS else None))
    assert error is None and got[-1] == [70] and len(pool.avoided) == MAX_ATTEMPTS  # the last try is served


def test_full_everywhere_says_how_many_engines_were_tried():
    got, error = _run_servicer(_Engines(lambda attempt: _EngineError(grpc.StatusCode.RESOURCE_EXHAUSTED), engines=2))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message == "refused in-band (from e2, the last of 2 attempts before any token, on e1, e2)"
    got, error = _run_servicer(_Engines(lambda attempt: _EngineError(grpc.StatusCode.RESOURCE_EXHAUSTED), engines=1))
    assert error.message == "refused in-band"  # one engine, one attempt: its words as they were


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_failure_not_marked_retryable_is_the_callers_at_once(code):
    got, error = _run_servicer(pool := _Engines(lambda attempt: _lost(code, retryable=False)))
    assert error.code == code and len(pool.avoided) == 1


def test_nothing_is_retried_once_a_token_was_sent_and_the_tokens_reach_the_caller():
    got, error = _run_servicer(pool := _Engines(lambda attempt: _lost(), tokens=2))
    assert error.code == grpc.StatusCode.UNAVAILABLE and len(pool.avoided) == 1
    assert [t for ids in got for t in ids] == [65, 66]


def test_an_engine_refusing_in_band_is_retried_by_status():
    """UNAVAILABLE (draining) and RESOURCE_EXHAUSTED (its queue full) before any token go to another engine; other
    refusals, and RESOURCE_EXHAUSTED once the engine has sent a token, are the caller's."""
    def refusal(code):
        return lambda attempt: (_EngineError(code) if attempt == 1 else None)

    for code, retried in ((grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
                          (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.INTERNAL, False)):
        got, error = _run_servicer(pool := _Engines(refusal(code)))
        assert (error is None) == retried and len(pool.avoided) == (2 if retried else 1), (code, error)
        if not retried:
            assert error.code == code and error.message == "refused in-band"
    got, error = _run_servicer(pool := _Engines(refusal(grpc.StatusCode.RESOURCE_EXHAUSTED), tokens=1))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(pool.avoided) == 1 and got == [[65]]


class _FailsWithItsFirstTokens(_Attempt):
    """The first update both carries tokens and fails RESOURCE_EXHAUSTED (the engine's buffer for a reader too slow
    overflowed: the tokens it held go out with the error)."""

    async def _updates(self):
        if not self.tokens:
            yield pb.RequestUpdate(new_token_ids=[70], finish_reason=pb.FINISH_REASON_LENGTH)
            return
        self.got_tokens = True
        yield pb.RequestUpdate(new_token_ids=[65], finish_reason=pb.FINISH_REASON_ERROR,
                               status=pb.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="slow"))


def test_resource_exhausted_in_the_update_that_brings_the_first_tokens_is_not_retried():
    """The tokens of the failing update itself count: the request is not run again elsewhere (its first tokens
    would be dropped, another engine's sent instead); they reach the caller, then the error."""
    got, error = _run_servicer(pool := _Engines(lambda attempt: None, tokens=1, attempt=_FailsWithItsFirstTokens))
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (got, error)
    assert len(pool.avoided) == 1 and got == [[65]]


def test_each_retry_is_counted_by_reason_in_the_trace_and_the_metric():
    """A request the servicer sends again counts in its log line's retries and in
    llmserve:engine_request_retries_total{reason}: only metrics.retried itself was tested, not that the servicer
    calls it (a mutation review)."""
    from tests.unit.test_metrics_edges import samples

    fails = {1: _lost(), 2: _EngineError(grpc.StatusCode.RESOURCE_EXHAUSTED)}
    trace, metrics = RequestTrace("r"), TextMetrics("fake")
    got, error = _run_servicer(pool := _Engines(lambda attempt: fails.get(attempt)), trace, metrics)
    assert error is None and got[-1] == [70] and len(pool.avoided) == 3  # served by the third engine
    assert trace.retries == 2
    counts = samples(metrics.registry)
    name = "llmserve:engine_request_retries_total"
    assert counts[(name, ("reason", "unavailable"))] == counts[(name, ("reason", "resource_exhausted"))] == 1
