"""Edges of the engine service's start-up and shutdown (engine_service/health.py, engine_service/server.py,
clients/stop_signals.py) and of the clients' channel settings (clients/channel.py), on fakes: no model, no GPU."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from engine_service.engine_loop import EngineUnavailable
from engine_service.health import Health, _CanarySink
from engine_service.outputs import StepOutput


class _Loop:
    """What Health reads of an EngineLoop; `finish` answers each canary as the engine would (None: never)."""

    def __init__(self, num_live: int = 0, stalled_s: float = 0.0, finish: str | None = None,
                 unavailable: str | None = None, workers: object = None) -> None:
        self.num_live, self.failure, self.finish, self.unavailable = num_live, None, finish, unavailable
        self.engine = SimpleNamespace(workers=workers) if workers is not None else object()
        self.last_progress = time.monotonic() - stalled_s
        self.added: list[tuple[str, list[int], object]] = []
        self.failed: list[str] = []

    def add(self, request_id, prompt, params, sink) -> None:
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable)
        self.added.append((request_id, prompt, params))
        if self.finish == "ok":
            sink.on_output(StepOutput(request_id, [1], "length"))
        elif self.finish is not None:
            sink.on_failure("INTERNAL", self.finish)

    def abort(self, request_id: str) -> None:
        pass

    def fail(self, message: str) -> None:
        self.failed.append(message)
        self.failure = message


# ---- health ---------------------------------------------------------------------------------------------------------
def test_the_canary_is_two_greedy_tokens_past_eos_on_prompt_ids_the_vocabulary_has():
    """Two tokens (a decode step, not only the prefill), deterministic, not cut short by an EOS; a prompt of ids
    below a tiny vocabulary's size (ids past it fail the canary of a healthy engine)."""
    async def main():
        loop = _Loop(finish="ok")
        assert await Health([]).canary(loop, vocab_size=3, timeout_s=5) is None
        [(_, prompt, params)] = loop.added
        assert prompt and max(prompt) < 3
        assert params.max_tokens >= 2 and params.temperature == 0.0 and params.ignore_eos

    asyncio.run(main())


def test_a_canary_on_a_loop_that_takes_no_requests_says_why():
    async def main():
        return await Health([]).canary(_Loop(unavailable="the engine loop is not running"), 8, 5)

    assert asyncio.run(main()) == "the engine loop is not running"


def test_the_canary_sink_ignores_what_comes_after_its_verdict():
    """A canary that timed out (its future cancelled) may still finish or fail in the engine's next step: that
    must not raise on the engine loop's output path; nor a failure after the finish."""
    async def main():
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        sink = _CanarySink(future)
        sink.on_output(StepOutput("canary:0", [1], "length"))
        sink.on_failure("INTERNAL", "late")
        done = _CanarySink(asyncio.get_running_loop().create_future())
        done.on_output(StepOutput("canary:1", [1], "length"))
        done.on_failure("INTERNAL", "late")
        done.on_output(StepOutput("canary:1", [2], "length"))
        assert done.future.result() is None

    asyncio.run(main())


def test_idle_canaries_skip_a_busy_engine_and_stop_with_the_drain():
    async def main():
        busy = _Loop(num_live=1, finish="ok")
        task = asyncio.create_task(Health([]).run_idle_canaries(busy, 8, 0.01, 1.0, lambda: False))
        await asyncio.sleep(0.1)
        assert busy.added == [] and not task.done()
        task.cancel()
        idle = _Loop(finish="ok")
        await asyncio.wait_for(Health([]).run_idle_canaries(idle, 8, 0.01, 1.0, lambda: True), 2.0)
        assert idle.added == []

    asyncio.run(main())


def test_an_idle_canary_that_ends_after_the_drain_began_changes_nothing():
    """A drain that starts while an idle canary runs: its verdict, pass or fail, must not turn health back."""
    async def main():
        health = Health(["svc"])
        await health.set_serving(False)  # a canary failed earlier
        draining = []

        class Loop(_Loop):
            def add(self, request_id, prompt, params, sink):
                super().add(request_id, prompt, params, sink)
                draining.append(True)  # the drain begins while the canary is in flight
                asyncio.get_running_loop().call_soon(sink.on_output, StepOutput(request_id, [1], "length"))

        await asyncio.wait_for(health.run_idle_canaries(Loop(), 8, 0.01, 1.0, lambda: bool(draining)), 2.0)
        assert health.serving is False

    asyncio.run(main())


def test_the_watchdog_names_a_dead_worker_as_the_cause():
    """With tensor parallelism an NCCL wait on a dead peer is the stall: the message says which worker died."""
    async def main():
        workers = SimpleNamespace(dead_worker=lambda: "tensor-parallel worker rank 1 was killed by signal 9")
        tp = _Loop(num_live=1, stalled_s=100.0, workers=workers)
        await asyncio.wait_for(Health([]).watchdog(tp, stall_s=0.04), 2.0)
        assert tp.failed[0].endswith("(watchdog): tensor-parallel worker rank 1 was killed by signal 9")
        plain = _Loop(num_live=1, stalled_s=100.0)
        await asyncio.wait_for(Health([]).watchdog(plain, stall_s=0.04), 2.0)
        assert plain.failed[0].endswith("(watchdog)")

    asyncio.run(main())


def test_the_watchdog_leaves_a_loop_that_failed_by_itself():
    """The loop failed on its own while the watchdog slept: no second failure over the first, and the watchdog
    ends (it ran on forever)."""
    async def main():
        loop = _Loop(num_live=1, stalled_s=100.0)
        task = asyncio.create_task(Health([]).watchdog(loop, stall_s=0.04))
        await asyncio.sleep(0)
        loop.failure = "step failed"
        await asyncio.wait_for(task, 2.0)
        assert loop.failed == [] and loop.failure == "step failed"

    asyncio.run(main())


# ---- server: loading, refusals before serving, the clean stop ----------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _config(**overrides):
    from engine_service.server_config import ServerConfig

    return ServerConfig(model="fake", host="127.0.0.1", **{"port": 0, "metrics_port": 0, "canary_interval_s": 0,
                                                          **overrides})


def test_a_stop_held_since_start_up_loads_nothing():
    """A SIGTERM held from start-up sets `stop` before the load: exit at once, without starting a load."""
    from engine_service.server import load_unless_stopped

    calls = []

    async def main():
        stop = asyncio.Event()
        stop.set()
        return await load_unless_stopped(lambda c: calls.append(c), _config(), stop)

    assert asyncio.run(main()) is None and calls == []


@pytest.mark.parametrize(("error", "reason"), [(ValueError("no config.json in fake"), "no config.json in fake"),
                                               (OSError("disk gone"), "OSError: disk gone")])
def test_a_model_that_cannot_load_exits_1_in_one_line_and_closes_every_port(caplog, error, reason):
    """A ValueError is the reason as it stands, anything else names its type; the service, health and metrics
    ports close before serve() returns."""
    from engine_service.server import serve

    health_port, metrics_port = _free_port(), _free_port()

    def factory(config):
        raise error

    async def main():
        port = asyncio.get_running_loop().create_future()
        code = await serve(_config(health_port=health_port, metrics_port=metrics_port), engine_factory=factory,
                           bound_port=port, handle_signals=False)
        return code, port.result()

    with caplog.at_level("ERROR", logger="engine_service"):
        code, port = asyncio.run(main())
    assert code == 1
    assert f"cannot serve fake: {reason}" in [r.getMessage() for r in caplog.records]
    assert all(_refused(p) for p in (port, health_port, metrics_port))


def test_a_stop_during_the_load_exits_0_and_closes_every_port():
    import threading

    from engine_service.server import serve

    health_port = _free_port()
    release = threading.Event()

    async def main():
        stop = asyncio.Event()
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(_config(health_port=health_port), engine_factory=lambda c: release.wait(10),
                                         stop=stop, bound_port=port, handle_signals=False))
        await port
        stop.set()
        return await asyncio.wait_for(task, 10), port.result()

    try:
        code, port = asyncio.run(main())
    finally:
        release.set()
    assert code == 0 and _refused(port) and _refused(health_port)


def test_a_health_port_taken_closes_the_service_port_it_opened():
    """The service port opens first: refused the health port, serve() must close it again, not leave it bound."""
    import socket

    from clients.tls import PortUnavailable
    from engine_service.server import serve

    port = _free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(PortUnavailable):
            asyncio.run(serve(_config(port=port, health_port=squatter.getsockname()[1]),
                              engine_factory=lambda c: None, handle_signals=False))
    assert _refused(port)


def test_a_clean_stop_closes_the_engine_and_the_health_port():
    from engine_service.server import serve
    from tests.fake_engine import FakeEngine

    engine, health_port = FakeEngine(), _free_port()

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(_config(grace_s=1.0, health_port=health_port), engine_factory=lambda c: engine,
                                         stop=stop, handle_signals=False))
        await asyncio.sleep(0.3)  # past the start-up canary (two 2 ms steps)
        stop.set()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == 0 and engine.closed and _refused(health_port)


# ---- clients/channel.py ---------------------------------------------------------------------------------------------
def test_channel_options_refuse_what_is_not_a_name_value_pair():
    from clients.channel import channel_options

    for bad in ([("grpc.x",)], [["grpc.x", 1]], [(1, 2)]):
        with pytest.raises(ValueError, match="name, value"):
            channel_options(extra_options=bad)


def _rotating(tmp_path):
    """Channels over a CA file whose text "bad" does not load; (channels, ca path, channels made)."""
    from clients.channel import Channels
    from clients.tls import files_stamp

    ca = tmp_path / "ca.pem"
    ca.write_text("A")

    class Tls:
        ca_file, cert_file, key_file = str(ca), "", ""

        def stamp(self):
            return files_stamp(self.ca_file)

        def credentials(self, warn: bool = True):
            if not ca.exists() or ca.read_text() == "bad":
                raise ValueError("does not load")
            return object()

    made = []

    def open_channel(target, tls, **kwargs):
        made.append(kwargs.get("credentials"))
        return len(made) - 1

    return Channels(open_channel, "t", Tls(), lambda channel: channel), ca, made


def _rewrite(path, text):
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def test_tls_files_that_do_not_load_keep_the_channel_warn_once_and_are_read_again_later(tmp_path, monkeypatch, caplog):
    from clients import channel

    monkeypatch.setattr(channel, "ROTATION_RETRY_S", 0.2)
    channels, ca, made = _rotating(tmp_path)
    _rewrite(ca, "bad")
    with caplog.at_level("WARNING", logger="clients.channel"):
        assert [channels.stub() for _ in range(3)] == [0, 0, 0]
    assert len([r for r in caplog.records if "do not load" in r.getMessage()]) == 1
    _rewrite(ca, "B")
    assert channels.stub() == 0  # within ROTATION_RETRY_S of the failure: not read again yet
    time.sleep(0.25)
    assert channels.stub() == 1 and made[1] is not None  # the new channel takes the credentials just read


def test_a_closed_client_makes_no_channel_on_a_rotation(tmp_path):
    channels, ca, made = _rotating(tmp_path)
    assert channels.close() == [0]
    _rewrite(ca, "B")
    channels.stub()
    assert len(made) == 1


def test_a_tls_file_missing_mid_rotation_keeps_the_current_channel(tmp_path):
    """A rotation that removes a file before writing its successor: calls stay on the channel they have."""
    channels, ca, made = _rotating(tmp_path)
    ca.unlink()
    assert channels.stub() == 0 and len(made) == 1


def test_take_over_stops_only_for_a_signal_held_and_only_once():
    import os
    import signal

    from clients import stop_signals

    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    calls: list[str] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop_signals.take_over(loop, lambda: calls.append("stop"))
        stop_signals.take_over(loop, lambda: calls.append("again"))  # a second serve() in the same process
        for sig in stop_signals.STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    try:
        asyncio.run(run())
        assert calls == []  # nothing was held
        stop_signals.hold()
        os.kill(os.getpid(), signal.SIGTERM)
        asyncio.run(run())
        assert calls == ["stop"]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
