"""The engine service's gRPC layer in-process over a fake engine: multiplexing, aborts, errors, failure."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.engine_client import EngineClient
from clients.logs import REQUEST_LOGGER
from engine_service.outputs import FINISH_ERROR, StepOutput
from engine_service.server import serve
from engine_service.server_config import ServerConfig
from protos.llmserve.engine.v1 import engine_pb2 as pb
from tests.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(60)


class Running:
    """serve() on its own event loop thread; stop() drains it and returns its exit code."""

    def __init__(self, engine: FakeEngine, **overrides: object) -> None:
        self.engine = engine
        # Several servers in one process: no fixed metrics port. No idle canary unless a test asks for one.
        overrides = {"metrics_port": 0, "canary_interval_s": 0, **overrides}
        self.config = ServerConfig(model="fake", host="127.0.0.1", port=0, **overrides)
        self.loop = asyncio.new_event_loop()
        self.port_ready = threading.Event()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        if not self.port_ready.wait(10):
            raise RuntimeError("server did not start")
        self.target = f"127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        port = self.loop.create_future()
        port.add_done_callback(lambda f: (setattr(self, "port", f.result()), self.port_ready.set()))
        self.exit_code = self.loop.run_until_complete(serve(
            self.config, engine_factory=lambda c: self.engine, stop=self.stop_event, bound_port=port,
            handle_signals=False))

    def stop(self) -> int | None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        return self.exit_code


def wait_serving(client: EngineClient) -> None:
    """Wait for health SERVING: the start-up canary has run (and the test hook is armed)."""
    stub = health_pb2_grpc.HealthStub(client._channel)
    for _ in range(200):
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        threading.Event().wait(0.05)
    raise RuntimeError("never SERVING")


def new(rid: str, prompt: list[int], **sampling: object) -> pb.NewRequest:
    return pb.NewRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=pb.SamplingParams(**sampling))


@pytest.fixture(scope="module")
def server():
    """One fake engine shared by the module's tests, SERVING (its start-up canary passed) before any of them runs:
    a test that called none of wait_serving got UNAVAILABLE "still starting" when xdist ran it first."""
    running = Running(FakeEngine(max_model_len=1_000_000))
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
    yield running
    assert running.stop() == 0


def test_bidi_multiplexes_requests_and_reports_errors_in_frames(server):
    with EngineClient(server.target, timeout=20) as client:
        wait_serving(client)
        frames = [pb.ClientFrame(requests=[new("7", [1, 2], max_tokens=3), new("8", [10], max_tokens=5),
                                           new("bad", [], max_tokens=3), new("t", [1], temperature=-1.0)])]
        got: dict[str, list[int]] = {}
        finish: dict[str, pb.RequestUpdate] = {}
        for frame in client.stub.Generate(iter(frames), timeout=20):
            for u in frame.updates:
                got.setdefault(u.request_id, []).extend(u.new_token_ids)
                if u.finish_reason:
                    finish[u.request_id] = u
        assert got["7"] == [3, 4, 5] and got["8"] == [11, 12, 13, 14, 15]
        assert finish["7"].finish_reason == pb.FINISH_REASON_LENGTH and finish["7"].num_prompt_tokens == 2
        assert finish["bad"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "prompt_token_ids" in finish["bad"].status.message
        assert "temperature" in finish["t"].status.message


def test_a_generate_stream_ends_at_the_sooner_of_deadline_ms_and_the_calls_deadline(server):
    """GenerateStream's request ends at the shorter of its deadline_ms and the call's own deadline: deadline_ms=300
    under a 20 s call timeout ends it DEADLINE_EXCEEDED after 0.3 s (no test pinned the shorter one winning)."""
    with EngineClient(server.target, timeout=20) as client:
        request = new("dl", [1, 2], max_tokens=1_000_000, ignore_eos=True)
        request.deadline_ms = 300
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in client.stub.GenerateStream(request, timeout=20):
                pass
        took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in err.value.details()
    assert took < 5, took


def test_an_idle_generate_stream_gets_heartbeats_and_a_busy_one_none_extra(monkeypatch):
    """A Generate stream with nothing to send gets an empty frame every heartbeat period (ModelInfo.heartbeat_ms), so
    that a client can tell an idle engine from a stuck one; a stream whose requests advance gets no empty frame."""
    from engine_service import servicer

    monkeypatch.setattr(servicer, "HEARTBEAT_S", 0.3)
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01))
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            assert client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).heartbeat_ms == 300
            idle = threading.Event()

            def frames():
                yield pb.ClientFrame(requests=[new("busy", [1], max_tokens=40)])
                idle.wait(10)

            call = client.stub.Generate(frames(), timeout=20)
            got, seen, started = [], [], time.monotonic()  # seen: (when, how many updates) of each frame
            for frame in call:
                seen.append((time.monotonic() - started, len(frame.updates)))
                got += [t for u in frame.updates for t in u.new_token_ids]
                if len(got) == 40 and sum(1 for at, n in seen if n == 0 and at > finished_at(seen)) == 3:
                    break
            call.cancel()
            idle.set()
        assert got == list(range(2, 42))
        end = finished_at(seen)
        beats = [at for at, n in seen if n == 0]
        assert all(at > end for at in beats), seen  # none while tokens flowed (a 10 ms step, far under the period)
        assert len(beats) == 3 and beats[0] - end < 0.7, seen  # then one a period (0.3 s) after a period with none
        assert max(b - a for a, b in itertools.pairwise(beats)) < 0.5, seen  # every period, not every other
    finally:
        assert running.stop() == 0


def finished_at(seen: list[tuple[float, int]]) -> float:
    """When the last frame that carried updates came."""
    return max((at for at, n in seen if n), default=0.0)


def test_the_engine_client_takes_the_channel_settings_the_text_client_does(server):
    """EngineClient took no channel settings: a tool could not raise its message limit or pass gRPC options."""
    with pytest.raises(TypeError, match=r"unknown client setting\(s\) \['max_message_byte'\]"):
        EngineClient(server.target, max_message_byte=1)
    with EngineClient(server.target, timeout=20, max_message_bytes=64, extra_options=[("grpc.enable_retries", 0)]
                      ) as small:
        with pytest.raises(grpc.RpcError) as err:  # a 64-byte limit on what the channel takes: ModelInfo is more
            small.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with EngineClient(server.target, timeout=20, extra_options=[("grpc.enable_retries", 0)]) as client:
        assert [t for u in client.generate([1, 2], max_tokens=3) for t in u.new_token_ids] == [3, 4, 5]


def test_in_band_abort_frees_the_request(server):
    with EngineClient(server.target, timeout=20) as client:
        wait_serving(client)
        gate = threading.Event()

        def frames():
            yield pb.ClientFrame(requests=[new("a", [1], max_tokens=10_000, ignore_eos=True)])
            gate.wait(10)
            yield pb.ClientFrame(abort_request_ids=["a"])

        reasons = []
        for frame in client.stub.Generate(frames(), timeout=20):
            gate.set()
            reasons += [u.finish_reason for u in frame.updates if u.finish_reason]
        assert reasons == [pb.FINISH_REASON_ABORT]
        for _ in range(100):  # the abort reaches the engine thread asynchronously
            load = client.load()
            if load.num_running == 0:
                break
            threading.Event().wait(0.02)
        assert load.num_live_requests == 0 and load.num_running == 0 and load.num_kv_blocks_used == 0


def test_unary_stream_errors_are_statuses(server):
    with EngineClient(server.target, timeout=20) as client:
        wait_serving(client)
        tokens = [t for u in client.generate([5], max_tokens=4) for t in u.new_token_ids]
        assert tokens == [6, 7, 8, 9]
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate([1000], max_tokens=4))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate([1], max_tokens=0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.details()


def test_queue_full_is_resource_exhausted():
    running = Running(FakeEngine(max_num_seqs=1, max_model_len=1_000_000), max_waiting=1, max_num_seqs=1)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            reqs = [new(str(i), [1], max_tokens=10_000, ignore_eos=True) for i in range(3)]
            call = client.stub.Generate(iter([pb.ClientFrame(requests=reqs)]), timeout=20)
            frame = next(call)
            errors = [u for u in frame.updates if u.status.code]
            assert errors and errors[0].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "queue is full" in errors[0].status.message
            call.cancel()
    finally:
        assert running.stop() == 0


def test_step_failure_fails_requests_internal_and_exits_nonzero(monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", "2")
    running = Running(FakeEngine(), failure_linger_s=0.1)
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate([1], max_tokens=50, ignore_eos=True))
        assert err.value.code() == grpc.StatusCode.INTERNAL
    running.thread.join(20)
    assert running.exit_code == 1


def test_generation_calls_at_their_limit_leave_load_and_health_answering():
    """gRPC's own max_concurrent_rpcs counted every call alike: open generation streams (even idle ones) locked
    out GetLoad, GetModelInfo and health with 'Concurrent RPC limit exceeded!'. The servicer counts generation
    calls itself, refuses the next one naming the flag, and the short calls still answer (as does the
    plaintext health port the deploy's probes use)."""
    from tests.support import free_port

    health_port = free_port()
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01), max_concurrent_rpcs=2,
                      health_port=health_port)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            streams = [client.generate([1, 2], f"busy-{i}", max_tokens=100_000, ignore_eos=True) for i in range(2)]
            for stream in streams:
                next(stream)  # both calls are running: generation calls are at their limit
            with pytest.raises(grpc.RpcError) as refused:
                next(client.generate([1, 2], "one-too-many", max_tokens=2))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_rpcs 2" in refused.value.details()
            assert client.load().num_live_requests == 2
            main = health_pb2_grpc.HealthStub(client._channel)
            assert main.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", running.config.service_name):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            for stream in streams:
                stream.cancel()
    finally:
        assert running.stop() == 0


def test_default_rpc_limits_leave_room_for_the_services_own_refusals():
    """A full service must refuse in its own words ("queue is full"), not with grpc's generic "Concurrent RPC
    limit exceeded!": the RPC limit sits above what the services admit."""
    from tokenizer_service.config import TextServerConfig

    engine = ServerConfig(model="m")
    assert engine.max_concurrent_rpcs > engine.max_waiting + engine.max_num_seqs
    text = TextServerConfig(model="m", engines="e:1")
    assert text.max_concurrent_rpcs > text.max_inflight


def test_requests_cut_at_the_drain_deadline_are_errors_not_aborts(caplog):
    """What the drain's grace period leaves, the service ends itself: counted and logged as errors with the
    reason, not as aborts (which say the client asked). Callers get UNAVAILABLE with that reason, on both RPCs,
    not grpc's 'Cancelling all calls' from the server's stop."""
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01), grace_s=0.3)
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER), EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
        stream = client.generate([1, 2], "cut-me", trace_id="cut-me", max_tokens=100_000, ignore_eos=True)
        next(stream)
        frames = client.stub.Generate(iter([pb.ClientFrame(requests=[new("bidi", [1, 2], max_tokens=100_000,
                                                                          ignore_eos=True)])]), timeout=20)
        next(frames)
        assert running.stop() == 0
        with pytest.raises(grpc.RpcError) as cut:
            for _ in stream:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE and "grace period (0.3s)" in cut.value.details()
        ends = [u for frame in frames for u in frame.updates if u.finish_reason]
    assert [(u.request_id, u.finish_reason, u.status.code) for u in ends] == [
        ("bidi", pb.FINISH_REASON_ERROR, grpc.StatusCode.UNAVAILABLE.value[0])]
    assert "grace period (0.3s)" in ends[0].status.message
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _lines(caplog, "cut-me"):
        time.sleep(0.05)
    (line,) = _lines(caplog, "cut-me")
    assert line["finish_reason"] == FINISH_ERROR and "grace period" in line["error"], line


def test_an_open_health_watch_does_not_hold_an_idle_engine_past_its_drain():
    """A drain with no generation call open ends at once: a client watching health on the main port (gRPC
    client-side health checking, a mesh) held the exit for the whole grace period (21.5 s of 20)."""
    running = Running(FakeEngine(max_model_len=1_000_000), grace_s=20)
    with EngineClient(running.target, timeout=20) as client:
        wait_serving(client)
        watch = health_pb2_grpc.HealthStub(client._channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        start = time.monotonic()
        assert running.stop() == 0
        took = time.monotonic() - start
    assert took < 5, f"the engine took {took:.1f}s to stop with only a health Watch open"


def _lines(caplog, trace_id: str) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == REQUEST_LOGGER and r.fields.get("request_id") == trace_id]


def test_max_connection_age_moves_new_calls_without_cutting_a_long_stream():
    """--max-connection-age-s sends GOAWAY once a connection is that old, so new calls open a new connection;
    a generation already streaming on the old one must still run to its end, however long it takes (a grace
    of --grace-s cut it after 0.5 s here)."""
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01), max_connection_age_s=0.3, grace_s=0.5)
    try:
        with EngineClient(running.target, timeout=30) as client:
            wait_serving(client)
            updates = list(client.generate([1, 2], "long", max_tokens=150, ignore_eos=True))  # about 1.5 s
            assert sum(len(u.new_token_ids) for u in updates) == 150
            assert updates[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        assert running.stop() == 0


def test_idle_connections_are_closed_but_a_silent_stream_is_not():
    """--max-connection-idle-s sends GOAWAY to a connection with no call open for that long: the client's channel
    drops to IDLE and its next call dials again and succeeds. A stream open on a connection keeps it, however
    quiet: a generation slower than the limit runs to its end."""
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.4), max_connection_idle_s=0.3)
    states: list[grpc.ChannelConnectivity] = []
    try:
        with EngineClient(running.target, timeout=30) as client:
            wait_serving(client)
            updates = list(client.generate([1, 2], "slow", max_tokens=4, ignore_eos=True))  # 0.4 s between tokens
            assert sum(len(u.new_token_ids) for u in updates) == 4
            client._channel.subscribe(states.append, try_to_connect=False)
            deadline = time.monotonic() + 10
            while grpc.ChannelConnectivity.IDLE not in states and time.monotonic() < deadline:
                time.sleep(0.05)
            assert grpc.ChannelConnectivity.IDLE in states, f"the idle connection was kept: {states}"
            updates = list(client.generate([1, 2], "again", max_tokens=2, ignore_eos=True))
            assert sum(len(u.new_token_ids) for u in updates) == 2
    finally:
        assert running.stop() == 0


def test_trace_ids_are_cut_to_128_characters(caplog):
    """A trace id is only a log field: a client must not write megabytes of log per request with it."""
    running = Running(FakeEngine(max_model_len=1_000_000))
    try:
        with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER), \
                EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            list(client.generate([1, 2], "long-trace", trace_id="t" * 100_000, max_tokens=2))
            frames = [pb.ClientFrame(requests=[pb.NewRequest(request_id="bidi", prompt_token_ids=[1],
                                                             trace_id="u" * 100_000,
                                                             sampling_params=pb.SamplingParams(max_tokens=2))])]
            for frame in client.stub.Generate(iter(frames), timeout=20):
                if any(u.finish_reason for u in frame.updates):
                    break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(_lines(caplog, "t" * 128) + _lines(caplog, "u" * 128)) < 2:
            time.sleep(0.05)
        assert len(_lines(caplog, "t" * 128)) == 1 and len(_lines(caplog, "u" * 128)) == 1
    finally:
        assert running.stop() == 0


def test_a_burst_within_free_running_slots_is_not_refused_as_queue_full():
    """The queue bound read live minus the last step's running count, so requests arriving during a step counted
    as waiting: 6 requests to an idle engine with 8 slots and max_waiting 2 had 2 refused."""
    running = Running(FakeEngine(max_num_seqs=8, max_model_len=1_000_000, step_s=0.2), max_waiting=2, max_num_seqs=8)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            reqs = [new(str(i), [1], max_tokens=3) for i in range(6)]
            updates = [u for frame in client.stub.Generate(iter([pb.ClientFrame(requests=reqs)]), timeout=20)
                       for u in frame.updates]
            assert not [u.status.message for u in updates if u.status.code]
            assert sum(1 for u in updates if u.finish_reason) == 6
    finally:
        assert running.stop() == 0


def test_generate_stream_refused_at_the_call_is_counted_and_logged(caplog):
    """A GenerateStream refused before its request was read (too many calls open, draining) left no request
    line, unlike every other refusal."""
    running = Running(FakeEngine(max_model_len=1_000_000), max_concurrent_rpcs=1)
    try:
        with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER), \
                EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            hog = client.generate([1], "hog", max_tokens=100_000, ignore_eos=True)
            next(hog)
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate([1], "second", trace_id="refused-7", max_tokens=2))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hog.cancel()
        (line,) = _lines(caplog, "refused-7")
        assert line["finish_reason"] == FINISH_ERROR and "max_concurrent_rpcs" in line["error"], line
    finally:
        assert running.stop() == 0


def test_a_frame_that_is_not_a_client_frame_ends_the_call_invalid_argument():
    """A frame that does not parse (here an abort id of invalid UTF-8) half-closed the stream in silence: the
    requests after it were never read nor refused, and the call ended OK."""
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01))
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            good = pb.ClientFrame(requests=[new("a", [1], max_tokens=100_000, ignore_eos=True)]).SerializeToString()

            def frames():
                yield good
                time.sleep(0.2)
                yield b"\x12\x01\xff"  # ClientFrame.abort_request_ids = [b"\xff"]

            call = client._channel.stream_stream("/llmserve.engine.v1.Engine/Generate")(frames(), timeout=20)
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid ClientFrame" in err.value.details()
            deadline = time.monotonic() + 5
            while client.load().num_live_requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.load().num_live_requests == 0  # its request was aborted, not left generating
    finally:
        assert running.stop() == 0


def test_a_request_that_does_not_parse_is_invalid_argument_without_a_traceback(caplog):
    """gRPC answered UNKNOWN and logged an ERROR with a traceback per such request: garbage on the wire could
    flood the logs and trip alerts."""
    running = Running(FakeEngine(max_model_len=1_000_000))
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            bad_utf8 = b"\x0a\x01\xff"  # field 1 (a string: request_id) holding invalid UTF-8
            with caplog.at_level(logging.ERROR):
                for method, call in (("GenerateStream", client._channel.unary_stream),
                                     ("Abort", client._channel.unary_unary)):
                    with pytest.raises(grpc.RpcError) as err:
                        result = call(f"/llmserve.engine.v1.Engine/{method}")(bad_utf8, timeout=10)
                        list(result) if method == "GenerateStream" else None
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
                    assert "is not a valid" in err.value.details()
                assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert list(client.generate([1], max_tokens=2))[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        assert running.stop() == 0


def test_max_waiting_counts_the_running_batch_once_requests_wait():
    """Counting every live request past max_num_seqs as waiting let up to max_num_seqs more wait when the KV
    cache, not the slots, bounded the batch."""
    running = Running(FakeEngine(max_num_seqs=1, max_model_len=1_000_000, step_s=0.05), max_waiting=2,
                      max_num_seqs=8)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            first = [new(str(i), [1], max_tokens=100_000, ignore_eos=True) for i in range(3)]
            call = client.stub.Generate(iter([pb.ClientFrame(requests=first)]), timeout=20)
            next(call)
            deadline = time.monotonic() + 5
            while client.load().num_waiting < 2 and time.monotonic() < deadline:  # stats: one runs, two wait
                time.sleep(0.05)
            later = [new(f"later-{i}", [1], max_tokens=2) for i in range(4)]
            updates = [u for frame in client.stub.Generate(iter([pb.ClientFrame(requests=later)]), timeout=20)
                       for u in frame.updates]
            refused = [u for u in updates if u.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
            assert len(refused) == 4, [(u.request_id, u.status.message) for u in updates]
            call.cancel()
    finally:
        assert running.stop() == 0


def test_a_full_queue_takes_a_request_that_outranks_a_waiting_one_by_displacing_the_newest(caplog):
    """max_waiting 2, one running and two waiting at priority 5. Of four arrivals on another call: priority 5 is
    refused (queue full, it outranks nobody); two of priority 0 each displace the newest waiting priority-5
    request, which fails RESOURCE_EXHAUSTED ("displaced", retryable elsewhere); the third finds only the running
    one and its peers left and is refused. The queue never grows past the limit, and the running request goes on."""
    running = Running(FakeEngine(max_num_seqs=1, max_model_len=1_000_000, step_s=0.05), max_waiting=2,
                      max_num_seqs=1)
    try:
        with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER), \
                EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            low = [new(str(i), [1], max_tokens=100_000, ignore_eos=True, priority=5) for i in range(3)]
            for request in low:
                request.trace_id = f"low-{request.request_id}"
            first = client.stub.Generate(iter([pb.ClientFrame(requests=low)]), timeout=20)
            next(first)
            deadline = time.monotonic() + 5
            while client.load().num_waiting < 2 and time.monotonic() < deadline:  # stats: one runs, two wait
                time.sleep(0.05)
            later = [new("x5", [1], max_tokens=100_000, ignore_eos=True, priority=5)]
            later += [new(f"h{i}", [1], max_tokens=100_000, ignore_eos=True, priority=0) for i in range(3)]
            second = client.stub.Generate(iter([pb.ClientFrame(requests=later)]), timeout=20)
            errors: dict[str, pb.RequestUpdate] = {}
            deadline = time.monotonic() + 10
            for frame in first:
                errors.update((u.request_id, u) for u in frame.updates if u.status.code)
                if len(errors) >= 2 or time.monotonic() > deadline:
                    break
            exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert sorted(errors) == ["1", "2"], {k: u.status.message for k, u in errors.items()}
            for update in errors.values():
                assert update.status.code == exhausted and "displaced" in update.status.message
                assert "priority 0" in update.status.message and "priority is 5" in update.status.message
            refused: dict[str, pb.RequestUpdate] = {}
            for frame in second:
                refused.update((u.request_id, u) for u in frame.updates if u.status.code)
                if len(refused) >= 2 or time.monotonic() > deadline:
                    break
            assert sorted(refused) == ["h2", "x5"], {k: u.status.message for k, u in refused.items()}
            assert all(u.status.code == exhausted and "queue is full" in u.status.message for u in refused.values())
            load = client.load()
            assert load.num_running == 1 and load.num_waiting == 2  # h0 and h1; "0" still runs
            first.cancel()
            second.cancel()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(_lines(caplog, "low-1") + _lines(caplog, "low-2")) < 2:
            time.sleep(0.05)
        for trace_id in ("low-1", "low-2"):  # each displaced request is counted and logged once, as an error
            [line] = _lines(caplog, trace_id)
            assert line["finish_reason"] == FINISH_ERROR and "RESOURCE_EXHAUSTED: displaced" in line["error"]
    finally:
        assert running.stop() == 0


def test_a_bug_applying_a_frame_fails_the_call_internal_and_is_logged(monkeypatch, caplog):
    """With only unreadable frames caught, an exception applying one escaped the reader task unseen: the call
    ended OK and the requests after it were dropped without a word."""
    from engine_service.servicer import EngineServicer

    start = EngineServicer._start

    def buggy(self, stream, prefix, req, timeout_s):
        if req.request_id == "bug":
            raise KeyError("simulated bug")
        return start(self, stream, prefix, req, timeout_s)

    monkeypatch.setattr(EngineServicer, "_start", buggy)
    running = Running(FakeEngine(max_model_len=1_000_000, step_s=0.01))
    try:
        with caplog.at_level(logging.ERROR), EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            reqs = [new(rid, [1], max_tokens=3) for rid in ("a", "bug", "c")]
            with pytest.raises(grpc.RpcError) as err:
                for _ in client.stub.Generate(iter([pb.ClientFrame(requests=reqs)]), timeout=20):
                    pass
            assert err.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in err.value.details()
            assert any("applying a frame failed" in r.getMessage() for r in caplog.records)
    finally:
        assert running.stop() == 0


def test_the_start_up_heap_is_frozen_while_serving_and_thawed_after():
    """A full garbage collection over what start-up made (the model, kernels, imports: some 220,000 objects)
    took 50 ms and more, stalling the engine thread on the GIL: serve() freezes it once the engine serves."""
    import gc

    running = Running(FakeEngine())
    try:
        with EngineClient(running.target) as client:
            wait_serving(client)
        frozen = gc.get_freeze_count()
    finally:
        assert running.stop() == 0
    assert frozen > 1000, frozen
    assert gc.get_freeze_count() == 0  # serve() in-process leaves the collector as it found it


class BreakableEngine(FakeEngine):
    """A FakeEngine whose generation breaks without raising when `broken` is set: "error" ends every request
    FINISH_ERROR (NaN logits, say), "hang" steps on without producing anything."""

    broken: str | None = None

    def step(self, on_launch=None) -> list[StepOutput]:
        if self.broken is None:
            return super().step(on_launch)
        time.sleep(self.step_s)
        if self.broken == "hang":
            return []
        failed, self.waiting, self.running = self.waiting + self.running, [], []
        outputs = [StepOutput(rid, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        for rid in failed:
            del self.reqs[rid]
        return outputs + [StepOutput(rid, finish_reason=FINISH_ERROR, error="NaN logits") for rid in failed]


def wait_health(client: EngineClient, status: int, seconds: float) -> int:
    """Poll health until it answers `status` or `seconds` pass; the last answer."""
    stub = health_pb2_grpc.HealthStub(client._channel)
    deadline = time.monotonic() + seconds
    while True:
        got = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.mark.parametrize("breakage", ["error", "hang"])
def test_health_turns_not_serving_when_generation_breaks_and_serving_when_it_works_again(breakage):
    """No test ran the idle canary's verdict: health could stay SERVING (a canary that ended in error counted as
    passed, or its result was ignored) while every request failed or none made progress. With a canary every
    0.2 s timed out at 0.5 s, an idle engine whose generation breaks turns NOT_SERVING within seconds, and
    SERVING again once generation works."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    engine = BreakableEngine(max_model_len=1_000_000)
    running = Running(engine, canary_interval_s=0.2, canary_timeout_s=0.5)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            engine.broken = breakage
            assert wait_health(client, not_serving, 4) == not_serving
            engine.broken = None
            assert wait_health(client, serving, 4) == serving
    finally:
        assert running.stop() == 0


def test_an_engine_whose_generation_is_broken_from_the_start_never_serves_and_exits_1(caplog):
    """A failed start-up canary (its request ended in error) was ignored: the engine said SERVING and took
    traffic it could only fail. It must never answer SERVING, log why, and serve() must return 1."""
    engine = BreakableEngine()
    engine.broken = "error"
    running = Running(engine, failure_linger_s=0.2)
    seen = []
    try:
        with caplog.at_level(logging.ERROR), EngineClient(running.target, timeout=20) as client:
            stub = health_pb2_grpc.HealthStub(client._channel)
            deadline = time.monotonic() + 5
            while running.thread.is_alive() and time.monotonic() < deadline:
                try:
                    seen.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                except grpc.RpcError as err:
                    seen.append(err.code())
                time.sleep(0.02)
    finally:
        code = running.stop()
    assert health_pb2.HealthCheckResponse.SERVING not in seen, seen
    assert code == 1
    assert any("start-up canary failed: NaN logits" in r.getMessage() for r in caplog.records)


def test_a_cancelled_generate_stream_frees_its_request(server):
    """Cancelling a GenerateStream call (a client gone, a deadline) did not abort its request: it ran on to
    max_tokens, holding its slot and blocks. After a cancel at the first token or mid-stream, GetLoad shows
    nothing live or running within 2 s."""
    with EngineClient(server.target, timeout=20) as client:
        wait_serving(client)
        for n_read in (1, 6):
            stream = client.generate([1, 2], f"cancel-after-{n_read}", max_tokens=100_000, ignore_eos=True)
            for _ in range(n_read):
                next(stream)
            stream.cancel()
            deadline = time.monotonic() + 2
            while ((load := client.load()).num_live_requests or load.num_running) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert load.num_live_requests == 0 and load.num_running == 0, (n_read, load)


def test_64_generate_streams_straight_to_an_engine_with_default_limits_are_all_served():
    """test_64_concurrent_streams goes through the tokenizer service, which puts everything on one engine stream:
    an engine whose gRPC call limit was 32 refused half of 64 GenerateStream calls made straight to it with
    "Concurrent RPC limit exceeded!". With the default limits all 64 are open at once and each streams."""
    running = Running(FakeEngine(max_model_len=1_000_000, max_num_seqs=64, num_blocks=4096, step_s=0.01))
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            streams = [client.generate([1, 2], f"s{i}", max_tokens=100_000, ignore_eos=True) for i in range(64)]
            try:
                assert [next(stream).new_token_ids[0] for stream in streams] == [3] * 64
                assert client.load().num_live_requests == 64
            finally:
                for stream in streams:
                    stream.cancel()
            deadline = time.monotonic() + 5
            while client.load().num_live_requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.load().num_live_requests == 0
    finally:
        assert running.stop() == 0


def test_a_refusal_at_the_door_logs_the_prompt_it_refused(caplog):
    """A request the servicer refuses (an id outside the vocabulary) logged prompt_tokens 0, where the same
    request refused on the engine thread logs its prompt's length; its line carries every documented field."""
    running = Running(FakeEngine(max_model_len=1_000_000))
    try:
        with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER), \
                EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            frames = [pb.ClientFrame(requests=[pb.NewRequest(request_id="bad", prompt_token_ids=[1, 2, 10**9],
                                                             trace_id="bad-ids",
                                                             sampling_params=pb.SamplingParams(max_tokens=2))])]
            for frame in client.stub.Generate(iter(frames), timeout=20):
                if any(u.finish_reason for u in frame.updates):
                    break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _lines(caplog, "bad-ids"):
            time.sleep(0.05)
        (line,) = _lines(caplog, "bad-ids")
        assert (line["prompt_tokens"], line["finish_reason"], line["engine_request_id"]) == (3, "error", None)
        assert line["error"].startswith("INVALID_ARGUMENT: ") and {"queue_s", "ttft_s", "total_s"} <= set(line)
    finally:
        assert running.stop() == 0


def test_a_prompt_past_max_model_len_is_refused_before_its_ids_are_copied():
    """A 64 MiB frame holds millions of ids: they were copied into a Python list (8 bytes and an int object each)
    before the length check refused them."""
    import tracemalloc

    running = Running(FakeEngine(max_model_len=64))
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            request = new("long", list(range(1000, 1_001_000)), max_tokens=1)
            tracemalloc.start()
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    list(client.stub.GenerateStream(request, timeout=20))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_model_len is 64" in refused.value.details()
        # The frame's bytes as gRPC hands them over (about 3 MB) and their copies: some 9 MB; the ids as a list
        # added 37 MB more.
        assert peak < 20_000_000, f"{peak} bytes traced while refusing a million ids"
    finally:
        assert running.stop() == 0


def test_prompt_logprobs_over_a_quarter_of_max_message_bytes_are_refused():
    """The bound its message and the docs name, a quarter of max_message_bytes, not the whole frame (half of it):
    a request whose first update took a quarter to a half was taken (a mutation review)."""
    running = Running(FakeEngine(max_model_len=1_000_000), max_message_bytes=1 << 20)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            # 2000 tokens * (17 + 9 * 20) bytes = 394,000: over 1 MiB / 4, under the frame's 1 MiB / 2.
            with pytest.raises(grpc.RpcError) as refused:
                list(client.stub.GenerateStream(new("p", [1] * 2000, max_tokens=1, prompt_logprobs=20), timeout=20))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "prompt_logprobs=20" in refused.value.details()
    finally:
        assert running.stop() == 0
