"""The multiplexing layer's rules at their edges: OutputStream's room event (cleared at exactly
MAX_BUFFERED_UPDATES, back only at half), a stop-string abort inside the deadline's slack, a finished request's
deadline timer against a reused id, a duplicate of a live id on the engine, the pool's per-request update bound,
which requests a lost engine marks retryable, and a stream proven by time alone. Each test was written against a
one-line change the rest of the suite let pass (a mutation audit)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from engine_service.outputs import StepOutput
from engine_service.servicer import EngineServicer
from engine_service.streams import MAX_BUFFERED_UPDATES, OutputStream
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
from tests.unit.test_service_regressions import pool_config, wait_for
from tokenizer_service import engine_pool
from tokenizer_service.engine_pool import EngineConnection, EnginePool, RequestFailed, RequestHandle, _Outbox


def test_room_clears_at_exactly_max_buffered_updates():
    """A call stops being read once MAX_BUFFERED_UPDATES updates wait to be sent, not one later."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=100)
        for i in range(MAX_BUFFERED_UPDATES - 1):
            stream.reject(f"r{i}", grpc.StatusCode.INVALID_ARGUMENT, "no")
        assert stream.room.is_set()  # one short of the bound: still read
        stream.reject("last", grpc.StatusCode.INVALID_ARGUMENT, "no")
        assert stream.num_buffered == MAX_BUFFERED_UPDATES and not stream.room.is_set()

    asyncio.run(main())


def test_room_comes_back_only_once_half_the_updates_are_sent():
    """Reading resumes only once the writer has sent half the backlog, so a slow reader is not read a frame at a time."""
    async def main():
        # A small frame budget: each take() sends a slice of the refusals.
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=100, max_frame_bytes=2_000)
        for i in range(MAX_BUFFERED_UPDATES):
            stream.reject(f"r{i}", grpc.StatusCode.INVALID_ARGUMENT, "no")
        assert not stream.room.is_set()
        while stream.num_buffered >= MAX_BUFFERED_UPDATES // 2:
            assert stream.take()
            if stream.num_buffered >= MAX_BUFFERED_UPDATES // 2:
                assert not stream.room.is_set(), stream.num_buffered  # below the bound, not yet below half
        assert stream.room.is_set()

    asyncio.run(main())


def test_a_stop_string_abort_at_the_deadline_is_a_stop():
    """A client's stop-string abort inside the deadline's slack is the stop it is, not DEADLINE_EXCEEDED."""
    async def main():
        aborted = []
        stream = OutputStream(lambda engine_id, error=None, stopped=False: aborted.append((engine_id, error, stopped)),
                              max_buffered_tokens=100)
        stream.register("due", "s1:1:due", 0.02)  # within DEADLINE_SLACK_S of its deadline
        assert stream.abort("due", stopped=True)
        assert aborted == [("s1:1:due", None, True)]
        [update] = stream.take()
        assert update.finish_reason == pb.FINISH_REASON_ABORT and not update.HasField("status")

    asyncio.run(main())


def test_an_ended_requests_deadline_never_fails_a_reused_id():
    """A finished request's deadline timer is cancelled: left running, it failed a new request that reused the id."""
    async def main():
        aborted = []
        stream = OutputStream(lambda engine_id, error=None, stopped=False: aborted.append((engine_id, error)),
                              max_buffered_tokens=100)
        stream.register("x", "s1:1:x", 0.1)
        stream.on_output("x", StepOutput("s1:1:x", [5], "length"))  # finished well before its deadline
        stream.register("x", "s1:2:x", None)  # the id reused, with no deadline
        await asyncio.sleep(0.2)  # past the first request's deadline
        assert "x" in stream.live and aborted == []
        updates = stream.take()
        assert [u.finish_reason for u in updates] == [pb.FINISH_REASON_LENGTH]

    asyncio.run(main())


class _Loop:
    metrics = None
    failure = None
    stats = {"num_running": 0, "num_waiting": 0}

    def __init__(self):
        self.added, self.aborted = [], []

    @property
    def num_live(self):
        return len(self.added) - len(self.aborted)

    def outranks(self, priority):
        return False

    def add(self, engine_id, prompt, params, sink, trace_id=None, if_full=None):
        self.added.append((engine_id, sink))

    def abort(self, engine_id, error=None, stopped=False):
        self.aborted.append(engine_id)


def test_a_duplicate_of_a_live_id_is_refused_and_the_live_request_kept():
    """A new request under a live id is refused before the engine; the live request stays abortable under its own engine id."""
    async def main():
        servicer = EngineServicer(max_waiting=10, max_buffered_tokens=100)
        servicer.attach(_Loop(), {"vocab_size": 100, "max_model_len": 64}, {})
        servicer.started = True
        stream = servicer._new_stream()
        req = pb.NewRequest(request_id="a", prompt_token_ids=[1, 2])
        servicer._start(stream, "s1:", req, None)
        servicer._start(stream, "s1:", req, None)
        assert len(servicer.loop.added) == 1  # the duplicate never reached the engine
        first_id, sink = servicer.loop.added[0]
        sink.on_output(StepOutput(first_id, [7]))
        live, refused = stream.take()
        assert (live.request_id, list(live.new_token_ids), live.finish_reason) == ("a", [7], 0)
        assert refused.finish_reason == pb.FINISH_REASON_ERROR and "already live" in refused.status.message
        assert stream.abort("a") and servicer.loop.aborted == [first_id]  # still abortable, as itself

    asyncio.run(main())


class _Conn:
    address = "fake:1"

    def __init__(self):
        self.inflight, self.aborted = {}, []

    def abort(self, request_id, stopped=False):
        self.inflight.pop(request_id, None)
        self.aborted.append(request_id)


def test_the_update_past_max_buffered_fails_the_request():
    """The pool fails (and aborts) a request whose reader leaves more than max_buffered updates queued, at the first one past."""
    async def main():
        conn = _Conn()
        handle = conn.inflight["0"] = RequestHandle(conn, "0", max_buffered=3)
        for t in range(3):
            handle.push(pb.RequestUpdate(request_id="0", new_token_ids=[t]))
        assert not handle.done and conn.aborted == []  # exactly at the bound: kept
        handle.push(pb.RequestUpdate(request_id="0", new_token_ids=[3]))
        assert handle.done and conn.aborted == ["0"] and "0" not in conn.inflight
        first = await handle.__anext__()  # the three kept updates, joined; then the failure
        assert list(first.new_token_ids) == [0, 1, 2]
        with pytest.raises(RequestFailed) as err:
            await handle.__anext__()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than 3 updates" in err.value.message

    asyncio.run(main())


def test_only_requests_without_tokens_are_retryable_when_the_engine_is_lost():
    """A lost engine's requests are retryable only if no token reached them, also after a later update without tokens."""
    async def main():
        conn = object.__new__(EngineConnection)  # its fields only: no stream task
        conn.address, conn.inflight, conn._outbox = "fake:1", {}, _Outbox()
        fresh = conn.inflight["0"] = RequestHandle(conn, "0", max_buffered=10)
        going = conn.inflight["1"] = RequestHandle(conn, "1", max_buffered=10)
        going.push(pb.RequestUpdate(request_id="1", new_token_ids=[5]))
        going.push(pb.RequestUpdate(request_id="1"))  # a later update without tokens keeps got_tokens
        conn._lose_inflight("the stream dropped")
        assert not conn.inflight
        with pytest.raises(RequestFailed) as err:
            await fresh.__anext__()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.retryable
        assert list((await going.__anext__()).new_token_ids) == [5]
        with pytest.raises(RequestFailed) as err:
            await going.__anext__()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and not err.value.retryable

    asyncio.run(main())


class _QuietEngine(pb_grpc.EngineServicer):
    """No heartbeats; its first Generate call stays open 0.6 s with no frame, then ends OK."""

    def __init__(self):
        self.calls = 0

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name="m", vocab_size=100, eos_token_ids=[99], max_model_len=64, heartbeat_ms=0)

    async def Generate(self, request_iterator, context):
        self.calls += 1
        await asyncio.sleep(0.6 if self.calls == 1 else 30)
        return
        yield


def test_a_stream_open_past_stream_proven_s_without_a_frame_is_lost_not_refused(caplog, monkeypatch):
    """A stream open for STREAM_PROVEN_S proves itself without a frame: when it ends, the engine was lost, not refusing the call."""
    monkeypatch.setattr(engine_pool, "STREAM_PROVEN_S", 0.3)

    async def main():
        server = grpc.aio.server()
        engine = _QuietEngine()
        pb_grpc.add_EngineServicer_to_server(engine, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = EnginePool(pool_config(engines=f"127.0.0.1:{port}"), 100, {99}, [])
        pool.start()
        try:
            await wait_for(lambda: engine.calls >= 2 and len(pool.ready) == 1)  # the first stream ended, 0.6 s in
            return list(pool.conns.values())[0].failure
        finally:
            await pool.close()
            await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="tokenizer_service.engine_pool"):
        failure = asyncio.run(main())
    assert failure.startswith("lost ("), failure
    assert not any("refused the stream" in r.getMessage() for r in caplog.records)
