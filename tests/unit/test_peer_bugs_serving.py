"""Serving-lifecycle failure modes other inference servers shipped, checked against both services on fakes:
health Watch, a stop during the start-up canary, accounting when the engine loop dies, aborts of finished
requests, gauges after aborts."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.logs import REQUEST_LOGGER
from engine_service import health as engine_health
from engine_service.engine_loop import EngineLoop
from engine_service.metrics import EngineMetrics
from engine_service.outputs import FINISH_ERROR, StepOutput
from engine_service.sampling_params import SamplingParams
from engine_service.server_config import ServerConfig
from engine_service.servicer import load_from_stats
from engine_service.streams import OutputStream
from protos.llmserve.engine.v1 import engine_pb2 as pb
from tests.fake_engine import FakeEngine
from tests.unit.test_engine_loop_failures import Sink

pytestmark = pytest.mark.timeout(60)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BlockedEngine(FakeEngine):
    """A FakeEngine whose first step waits for `release` (a first step that compiles kernels, or hangs), then
    raises `error` if one is given."""

    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__()
        self.stepping, self.release, self.error = threading.Event(), threading.Event(), error
        self.abort_calls: list[str] = []  # FakeEngine.aborted empties at each step

    def abort_request(self, request_id: str) -> bool:
        self.abort_calls.append(request_id)
        return super().abort_request(request_id)

    def step(self, on_launch=None) -> list[StepOutput]:
        if not self.stepping.is_set():
            self.stepping.set()
            self.release.wait(20)
        if self.error is not None:
            raise self.error
        return super().step(on_launch)


async def _until(event: threading.Event, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not event.is_set():
        assert time.monotonic() < deadline, "the event never came"
        await asyncio.sleep(0.01)


# ---- health ---------------------------------------------------------------------------------------------------------
def test_both_services_serve_health_with_the_fixed_watch():
    from clients.tls import HealthServicer
    from tokenizer_service import server as tokenizer_server

    assert isinstance(engine_health.Health([]).servicer, HealthServicer)
    assert tokenizer_server.HealthServicer is HealthServicer


def test_a_health_watch_hears_not_serving_after_another_watch_of_its_name_ended():
    """grpcio-health-checking's aio Watch dropped a name's shared condition when any one watcher of it ended: the
    others (client-side health checking, a load balancer) never heard NOT_SERVING on a drain and kept sending.
    Each watcher still open hears it; once none is, the name holds no condition (no growth per name asked)."""

    async def main():
        from clients.tls import HealthServicer

        servicer = HealthServicer()
        await servicer.set("", SERVING)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
                assert [(await w.read()).status for w in watches] == [SERVING] * 3
                watches[0].cancel()
                await asyncio.sleep(0.3)  # the server side of the cancelled call unwinds on a later turn
                await servicer.enter_graceful_shutdown()
                heard = [(await asyncio.wait_for(w.read(), 5)).status for w in watches[1:]]
                for w in watches[1:]:
                    w.cancel()
                for _ in range(100):
                    if "" not in servicer._server_watchers:
                        break
                    await asyncio.sleep(0.01)
                return heard, dict(servicer._server_watchers)
        finally:
            await server.stop(0)

    heard, left = asyncio.run(main())
    assert heard == [NOT_SERVING, NOT_SERVING]
    assert left == {}


# ---- a stop during the start-up canary ---------------------------------------------------------------------------
def test_a_stop_during_the_start_up_canary_exits_0_at_once_and_never_serves(monkeypatch):
    """SIGTERM during warm-up: the canary (the engine's first step, which can compile kernels for minutes or hang)
    was awaited whatever the stop; the service then turned SERVING after the signal, or, the canary timing out,
    exited 1 as a failed engine. Here the first step is held past canary_timeout_s: the stop ends the service with
    exit 0, never SERVING, and the canary's request is aborted rather than left in the engine."""
    from engine_service.server import serve

    said: list[bool] = []
    set_serving = engine_health.Health.set_serving

    async def recording(self, serving: bool) -> None:
        said.append(serving)
        await set_serving(self, serving)

    monkeypatch.setattr(engine_health.Health, "set_serving", recording)
    engine = BlockedEngine()
    config = ServerConfig(model="fake", host="127.0.0.1", port=0, metrics_port=0, canary_interval_s=0,
                          canary_timeout_s=1.0, grace_s=1.0)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, engine_factory=lambda c: engine, stop=stop, handle_signals=False))
        await _until(engine.stepping)
        stop.set()
        # The step is held past canary_timeout_s; the engine loop's own stop (a blocking join, as for a stuck step
        # in any drain) waits for it, hence a timer thread rather than this event loop.
        release = threading.Timer(1.5, engine.release.set)
        release.start()
        try:
            return await asyncio.wait_for(task, 10)
        finally:
            release.cancel()
            engine.release.set()

    assert asyncio.run(main()) == 0
    assert True not in said, said
    assert [rid for rid in engine.abort_calls if rid.startswith("canary:")], engine.abort_calls


def test_a_stop_while_the_canary_step_hangs_exits_without_closing_the_engine_under_it(monkeypatch):
    """A device that hangs in the first step: the stop ended the service with exit 0 after the engine loop's stop
    wait, then closed the engine (freeing its state) while the stuck step still ran in it, and main() left the
    stuck thread to the interpreter's shutdown. The engine stays unclosed, and main() treats the live engine
    thread as it does an abandoned load (os._exit)."""
    from engine_service import server

    monkeypatch.setattr(server, "ENGINE_STOP_WAIT_S", 0.3)
    closed: list[bool] = []

    class Hung(BlockedEngine):
        def close(self):
            closed.append(not self.release.is_set())
            super().close()

    engine = Hung()
    config = ServerConfig(model="fake", host="127.0.0.1", port=0, metrics_port=0, canary_interval_s=0,
                          canary_timeout_s=60.0, grace_s=1.0)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(server.serve(config, engine_factory=lambda c: engine, stop=stop,
                                                handle_signals=False))
        await _until(engine.stepping)
        stop.set()
        return await asyncio.wait_for(task, 10)

    try:
        assert asyncio.run(main()) == 0
        assert closed == [], "closed while its step still ran"
        assert any(t.name == server.ENGINE_THREAD and t.is_alive() for t in threading.enumerate())
    finally:
        engine.release.set()


# ---- the engine loop dies -------------------------------------------------------------------------------------------
def test_requests_queued_when_the_engine_loop_dies_are_counted_and_logged_once(caplog):
    """A request added while the step that kills the loop ran never reached the engine: it was failed INTERNAL but
    neither counted in request_success{error} nor logged (metrics.fail_live sees only the engine's requests), so
    the metrics said one request failed where two did."""

    async def run():
        fatal: list[str] = []
        engine = BlockedEngine(RuntimeError("device lost"))
        loop = EngineLoop(engine, asyncio.get_running_loop(), fatal.append)
        loop.metrics = EngineMetrics("fake", lambda: {}, lambda: 0)
        loop.start()
        sinks = {rid: Sink(asyncio.Event()) for rid in ("in-engine", "queued")}
        loop.add("in-engine", [1, 2, 3], SamplingParams(max_tokens=5), sinks["in-engine"], trace_id="trace-in-engine")
        await _until(engine.stepping)
        loop.add("queued", [1, 2], SamplingParams(max_tokens=5), sinks["queued"], trace_id="trace-queued")
        engine.release.set()
        await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks.values())), 10)
        loop.stop()
        return loop, sinks, fatal

    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        loop, sinks, fatal = asyncio.run(run())
    assert len(fatal) == 1
    assert all(s.failure is not None and s.failure[0] == "INTERNAL" for s in sinks.values())
    lines = [r.fields for r in caplog.records if r.name == REQUEST_LOGGER]
    assert sorted(f["request_id"] for f in lines) == ["trace-in-engine", "trace-queued"]
    queued = next(f for f in lines if f["request_id"] == "trace-queued")
    assert queued["finish_reason"] == FINISH_ERROR and "device lost" in queued["error"]
    assert queued["prompt_tokens"] == 2 and queued["engine_request_id"] == "queued"
    assert loop.metrics.finished[FINISH_ERROR] == 2


# ---- aborts and gauges ----------------------------------------------------------------------------------------------
def test_an_abort_of_a_finished_request_is_a_no_op_on_the_stream_and_in_the_engine():
    """An abort that crosses the request's last token (the client's abort and the engine's finish in flight at
    once) must neither raise, nor turn the finished request's update into ABORT, nor reach the engine."""

    async def run():
        aborted: list[str] = []
        stream = OutputStream(lambda engine_id, *a, **k: aborted.append(engine_id), max_buffered_tokens=100)
        stream.register("r", "s1:1:r", timeout_s=5.0)
        stream.on_output("r", StepOutput("s1:1:r", [7], "length", num_prompt_tokens=1))
        found = stream.abort("r")
        return found, stream.take(), aborted

    found, updates, aborted = asyncio.run(run())
    assert found is False and aborted == []
    assert [(u.request_id, list(u.new_token_ids), u.finish_reason) for u in updates] == \
        [("r", [7], pb.FINISH_REASON_LENGTH)]


def test_the_waiting_gauge_and_used_blocks_never_go_negative_on_stale_stats():
    """Gauges read between an abort and the next step's stats (vLLM's and others' running/waiting gauges went
    negative there): the engine's stats still count the aborted requests as running, the live count does not."""

    async def run():
        engine = BlockedEngine()
        loop = EngineLoop(engine, asyncio.get_running_loop(), lambda message: None)
        loop.start()
        for rid in ("a", "b", "c"):
            loop.add(rid, [1], SamplingParams(max_tokens=5), Sink(asyncio.Event()))
        await _until(engine.stepping)  # held in its step: the stats below stay the last step's
        loop.stats = {"num_running": 3, "num_waiting": 0}
        loop.abort("a")
        loop.abort("b")
        waiting = loop.num_waiting
        engine.release.set()
        loop.stop()
        return waiting

    assert asyncio.run(run()) == 0
    load = load_from_stats({"num_blocks": 8, "num_free_blocks": 10, "num_running": 0}, 0)
    assert load.num_kv_blocks_used == 0
