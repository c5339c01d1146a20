"""Edges of the engine service's start-up and shutdown (engine_service/health.py, engine_service/server.py,
clients/stop_signals.py) and of the clients' channel settings (clients/channel.py), on fakes: no model, no GPU."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from engine_service.health import Health, _CanarySink
from engine_service.outputs import StepOutput
from tests.support import free_port
from tests.unit.test_metrics_edges import FakeLoop


# ---- health ---------------------------------------------------------------------------------------------------------
def test_the_canary_is_two_greedy_tokens_past_eos_on_prompt_ids_the_vocabulary_has():
    """Two tokens (a decode step, not only the prefill), deterministic, not cut short by an EOS; a prompt of ids
    below a tiny vocabulary's size (ids past it fail the canary of a healthy engine)."""
    async def main():
        loop = FakeLoop(finish="ok")
        assert await Health([]).canary(loop, vocab_size=3, timeout_s=5) is None
        [(_, prompt, params)] = loop.requests
        assert prompt and max(prompt) < 3
        assert params.max_tokens >= 2 and params.temperature == 0.0 and params.ignore_eos

    asyncio.run(main())


def test_a_canary_on_a_loop_that_takes_no_requests_says_why():
    async def main():
        return await Health([]).canary(FakeLoop(unavailable="the engine loop is not running"), 8, 5)

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
        busy = FakeLoop(num_live=1, finish="ok")
        task = asyncio.create_task(Health([]).run_idle_canaries(busy, 8, 0.01, 1.0, lambda: False))
        await asyncio.sleep(0.1)
        assert busy.added == [] and not task.done()
        task.cancel()
        idle = FakeLoop(finish="ok")
        await asyncio.wait_for(Health([]).run_idle_canaries(idle, 8, 0.01, 1.0, lambda: True), 2.0)
        assert idle.added == []

    asyncio.run(main())


def test_a_busy_engine_serving_traffic_turns_serving_again_after_a_failed_canary():
    """One idle canary that failed (a transient) set NOT_SERVING, and under steady traffic no canary ran again and
    nothing else set SERVING: the liveness probe's name read NOT_SERVING while every request was served, and the
    pod was restarted with requests in flight. Outputs reaching requests now prove a busy engine, with no canary."""
    async def main():
        health = Health(["svc"])
        await health.set_serving(False)  # the transient's verdict
        loop = FakeLoop(num_live=3, finish="ok")
        task = asyncio.create_task(health.run_idle_canaries(loop, 8, 0.02, 1.0, lambda: False))
        await asyncio.sleep(0.1)
        assert health.serving is False  # busy, but nothing delivered yet: no verdict
        loop.outputs_delivered += 5
        await asyncio.sleep(0.1)
        serving = health.serving
        task.cancel()
        return serving, loop.added

    serving, added = asyncio.run(main())
    assert serving is True and added == []


@pytest.mark.parametrize("canary", ["ok", "non-finite logits (test)"])
def test_a_busy_engine_whose_requests_all_fail_is_judged_by_the_canary(canary):
    """Every request failing (a broken device: each ends INTERNAL) while traffic kept the engine busy left health
    SERVING for as long as the traffic lasted. Requests failing with none getting an output now call the canary,
    which decides: a broken engine turns NOT_SERVING; one whose failures were the requests' own stays SERVING.
    Failures beside delivered outputs call no canary."""
    async def main():
        health = Health(["svc"])
        await health.set_serving(True)
        loop = FakeLoop(num_live=16, finish=canary)
        task = asyncio.create_task(health.run_idle_canaries(loop, 8, 0.02, 1.0, lambda: False))
        loop.requests_failed += 10
        loop.outputs_delivered += 10
        await asyncio.sleep(0.1)
        mixed = (list(loop.added), health.serving)
        loop.requests_failed += 10
        await asyncio.sleep(0.1)
        task.cancel()
        return mixed, loop.added, health.serving

    mixed, added, serving = asyncio.run(main())
    assert mixed == ([], True)
    assert len(added) == 1 and added[0].startswith("canary:")  # once: the canary's verdict resets the counts
    assert serving is (canary == "ok")


def test_an_idle_canary_that_ends_after_the_drain_began_changes_nothing():
    """A drain that starts while an idle canary runs: its verdict, pass or fail, must not turn health back."""
    async def main():
        health = Health(["svc"])
        await health.set_serving(False)  # a canary failed earlier
        draining = []

        class Loop(FakeLoop):
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
        tp = FakeLoop(num_live=1, stalled_s=100.0, workers=workers)
        await asyncio.wait_for(Health([]).watchdog(tp, stall_s=0.04), 2.0)
        assert tp.failed[0].endswith("(watchdog): tensor-parallel worker rank 1 was killed by signal 9")
        plain = FakeLoop(num_live=1, stalled_s=100.0)
        await asyncio.wait_for(Health([]).watchdog(plain, stall_s=0.04), 2.0)
        assert plain.failed[0].endswith("(watchdog)")

    asyncio.run(main())


def test_the_watchdog_asks_for_a_dead_worker_off_the_event_loop():
    """dead_worker() can wait seconds (for a worker to exit, or for the engine's thread asking at the same time);
    called on the event loop, it held every health check and RPC of the service that long."""
    release = threading.Event()

    def dead_worker():
        release.wait(5)
        return "tensor-parallel worker rank 1 was killed by signal 9"

    async def main():
        loop = FakeLoop(num_live=1, stalled_s=100.0, workers=SimpleNamespace(dead_worker=dead_worker))
        task = asyncio.create_task(Health([]).watchdog(loop, stall_s=0.04))
        ticks = 0
        while ticks < 20 and not task.done():  # the loop keeps turning while dead_worker waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not loop.failed
        release.set()
        await asyncio.wait_for(task, 5.0)
        assert loop.failed[0].endswith("(watchdog): tensor-parallel worker rank 1 was killed by signal 9")

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_the_watchdog_leaves_a_loop_that_failed_by_itself():
    """The loop failed on its own while the watchdog slept: no second failure over the first, and the watchdog
    ends (it ran on forever)."""
    async def main():
        loop = FakeLoop(num_live=1, stalled_s=100.0)
        task = asyncio.create_task(Health([]).watchdog(loop, stall_s=0.04))
        await asyncio.sleep(0)
        loop.failure = "step failed"
        await asyncio.wait_for(task, 2.0)
        assert loop.failed == [] and loop.failure == "step failed"

    asyncio.run(main())


# ---- server: loading, refusals before serving, the clean stop ----------------------------------------------------


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

    health_port, metrics_port = free_port(), free_port()

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

    health_port = free_port()
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

    port = free_port()
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

    engine, health_port = FakeEngine(), free_port()

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(_config(grace_s=1.0, health_port=health_port), engine_factory=lambda c: engine,
                                         stop=stop, handle_signals=False))
        await asyncio.sleep(0.3)  # past the start-up canary (two 2 ms steps)
        stop.set()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == 0 and engine.closed and _refused(health_port)


# ---- server: the drain and the exit after a failure ---------------------------------------------------------------
async def _until_serving(channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(250):
        try:
            if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.02)
    raise AssertionError("never SERVING")


def test_a_clean_stop_leaves_no_task_of_its_own_running():
    """The watchdog and the idle canaries end with serve(): left running in-process, the watchdog would sleep on
    for up to 5 s and the canaries would send requests to a stopped engine loop."""
    from engine_service.server import serve
    from tests.fake_engine import FakeEngine

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(_config(grace_s=1.0, canary_interval_s=0.05), engine_factory=lambda c: FakeEngine(),
                                         stop=stop, handle_signals=False))
        await asyncio.sleep(0.3)
        stop.set()
        code = await asyncio.wait_for(task, 10)
        await asyncio.sleep(0)  # a cancelled task ends on the next turn of the loop
        return code, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(main()) == (0, [])


@pytest.mark.parametrize("grace_s", [20.0, 0.01])
def test_a_short_call_in_flight_when_the_drain_ends_still_gets_its_answer(monkeypatch, grace_s):
    """The server's stop gives the calls still open a moment (at least 0.5 s, even once the grace period is spent):
    a GetLoad that came just before the stop is answered, not cancelled."""
    from engine_service.server import serve
    from engine_service.servicer import EngineServicer
    from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc
    from tests.fake_engine import FakeEngine

    answering, get_load = asyncio.Event(), EngineServicer.GetLoad

    async def slow_get_load(self, request, context):
        answering.set()
        await asyncio.sleep(0.2)
        return await get_load(self, request, context)

    monkeypatch.setattr(EngineServicer, "GetLoad", slow_get_load)

    async def main():
        stop = asyncio.Event()
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(_config(grace_s=grace_s), engine_factory=lambda c: FakeEngine(), stop=stop,
                                         bound_port=port, handle_signals=False))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as channel:
            await _until_serving(channel)
            call = engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
            await answering.wait()
            stop.set()
            load = await call
        return await asyncio.wait_for(task, 10), load

    code, load = asyncio.run(main())
    assert code == 0 and load.num_kv_blocks_total == 64  # FakeEngine's blocks


def test_a_step_failure_comes_n_steps_past_warm_up_and_health_says_not_serving_while_it_lingers(monkeypatch):
    """ENGINE_TEST_FAIL_AFTER_STEPS=N counts from the end of the start-up canary (the request's first steps run:
    tokens come before the failure); a failed engine answers NOT_SERVING for failure_linger_s, then serve() returns
    1."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from engine_service.server import serve
    from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc
    from tests.fake_engine import FakeEngine

    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", "2")

    async def main():
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(_config(failure_linger_s=1.0), engine_factory=lambda c: FakeEngine(step_s=0.05),
                                         bound_port=port, handle_signals=False))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as channel:
            await _until_serving(channel)
            request = engine_pb2.NewRequest(request_id="r", prompt_token_ids=[1],
                                            sampling_params=engine_pb2.SamplingParams(max_tokens=50, ignore_eos=True))
            tokens = []
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for update in engine_pb2_grpc.EngineStub(channel).GenerateStream(request, timeout=10):
                    tokens += update.new_token_ids
            failed_at = time.monotonic()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        exit_code = await asyncio.wait_for(task, 10)
        return failed.value.code(), tokens, health.status, exit_code, time.monotonic() - failed_at

    code, tokens, health, exit_code, lingered = asyncio.run(main())
    # FakeEngine counts up from the prompt; the last step's token may be dropped for the failure that follows it.
    assert code == grpc.StatusCode.INTERNAL and tokens and tokens == [2, 3][:len(tokens)]
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING and exit_code == 1 and lingered > 0.7


def test_a_failed_engine_whose_thread_is_stuck_does_not_hold_the_exit():
    """After the watchdog failed a stuck engine, serve() returns 1 at once: it does not wait on (or close under)
    the engine thread that is still in its step."""
    import threading

    from engine_service.server import serve
    from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc
    from tests.fake_engine import FakeEngine

    release, stuck = threading.Event(), threading.Event()

    class Stuck(FakeEngine):
        def step(self, *args, **kwargs):
            if stuck.is_set():
                release.wait(30)
            return super().step(*args, **kwargs)

    engine = Stuck()

    async def main():
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(_config(watchdog_s=0.2, failure_linger_s=0), engine_factory=lambda c: engine,
                                         bound_port=port, handle_signals=False))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as channel:
            await _until_serving(channel)
            stuck.set()
            request = engine_pb2.NewRequest(request_id="r", prompt_token_ids=[1],
                                            sampling_params=engine_pb2.SamplingParams(max_tokens=5))
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in engine_pb2_grpc.EngineStub(channel).GenerateStream(request, timeout=10):
                    pass
        failed = time.monotonic()
        return await asyncio.wait_for(task, 20), time.monotonic() - failed

    try:
        code, took = asyncio.run(main())
    finally:
        release.set()
    assert code == 1 and took < 3, f"exit {code} {took:.1f}s after the failure"
    assert not engine.closed


def test_the_metrics_page_counts_generation_without_request_lines():
    """--metrics-port with --log-requests false: the step metrics must still be recorded."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from engine_service.server import serve
    from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc
    from tests.fake_engine import FakeEngine

    metrics_port = free_port()

    def generated() -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        return next(s.value for f in text_string_to_metric_families(body) for s in f.samples
                    if s.name == "llmserve:generation_tokens_total")

    async def main():
        stop = asyncio.Event()
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(_config(metrics_port=metrics_port, log_requests=False, grace_s=1.0),
                                         engine_factory=lambda c: FakeEngine(), stop=stop, bound_port=port,
                                         handle_signals=False))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as channel:
                await _until_serving(channel)
                request = engine_pb2.NewRequest(request_id="r", prompt_token_ids=[1],
                                                sampling_params=engine_pb2.SamplingParams(max_tokens=3, ignore_eos=True))
                async for _ in engine_pb2_grpc.EngineStub(channel).GenerateStream(request, timeout=10):
                    pass
            return await asyncio.to_thread(generated)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == 3


def test_a_bad_setting_exits_in_one_line_that_names_the_service():
    import signal

    from clients import stop_signals
    from engine_service.server import main

    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as exited:
            main(["--model", "fake", "--grace-s", "0"])
        held = signal.getsignal(signal.SIGTERM) is not saved[signal.SIGTERM]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert str(exited.value.code) == "engine-service: grace_s must be a positive number, got 0.0 (set by --grace-s)"
    assert held  # `python -m engine_service.server` holds SIGTERM from main()'s first line


def test_a_stop_during_a_load_that_started_threads_of_its_own_still_exits_at_once():
    """A load abandoned at a stop may have started threads that do not end (torch's do not): the process exits
    0 at once anyway, not when they end."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, threading, engine_service.server as s; "
            "s.load_engine = lambda c: (threading.Thread(target=threading.Event().wait, args=(60,), daemon=False).start(), "
            "threading.Event().wait(60)); s.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", "fake", "--host", "127.0.0.1", "--port", "0",
                             "--metrics-port", "0", "--device", "cpu", "--log-level", "INFO"],
                            cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "loading fake" in line:
                break
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(15) == 0 and time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("service", ["engine_service", "tokenizer_service"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_during_the_teardown_still_exits_0(service, sig):
    """Closing the event loop gives SIGTERM and SIGINT their defaults back: a second stop (a Ctrl-C pressed twice,
    systemd's or `timeout`'s repeat) while the interpreter tears down, 0.6-2 s after a served stop, ended the
    process by the signal instead of the documented exit 0. Here the served stop is faked (serve takes the signals
    over, as the real one does, and returns 0 at once), and the second signal comes 0.5 s later, in a teardown
    stood in by a sleep."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import asyncio, os, signal, threading, time, sys, {service}.server as s\n"
            "from clients.stop_signals import take_over\n"
            "async def serve(config):\n"
            "    take_over(asyncio.get_running_loop(), lambda: None)\n"
            f"    threading.Timer(0.5, os.kill, (os.getpid(), signal.{sig})).start()\n"
            "    return 0\n"
            "s.serve = serve\n"
            "try:\n    s.main(sys.argv[1:])\nfinally:\n    time.sleep(1.5)\n")
    args = ["--model", "fake"] if service == "engine_service" else ["--engines", "127.0.0.1:1", "--model", "fake"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("service", ["engine_service", "tokenizer_service"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_while_the_interpreter_finalizes_its_modules_still_exits_0(service, sig):
    """Past main() and its atexit work, the interpreter gives every signal with a Python handler its default back,
    then tears the modules down (grpc's and torch's objects: hundreds of ms in a real service). A second stop
    there killed both services by the signal (-15) after they had logged their clean stop. Here a module-level
    object's finalizer stands in for that teardown, and the signal comes once it has begun."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import asyncio, sys, time, {service}.server as s\n"
            "from clients.stop_signals import take_over\n"
            "async def serve(config):\n"
            "    take_over(asyncio.get_running_loop(), lambda: None)\n"
            "    return 0\n"
            "s.serve = serve\n"
            "class Teardown:\n"
            "    def __del__(self):\n"
            "        sys.__stderr__.write('finalizing\\n'); sys.__stderr__.flush(); time.sleep(1.5)\n"
            "teardown = Teardown()\n"
            "s.main(sys.argv[1:])\n")
    args = ["--model", "fake"] if service == "engine_service" else ["--engines", "127.0.0.1:1", "--model", "fake"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[2],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.strip() == "finalizing":
                proc.send_signal(getattr(signal, sig))
                break
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


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

    now = [1000.0]  # the channel module's clock, moved by hand: a stalled CI machine must not pass the retry time
    monkeypatch.setattr(channel, "time", SimpleNamespace(monotonic=lambda: now[0]))
    channels, ca, made = _rotating(tmp_path)
    _rewrite(ca, "bad")
    with caplog.at_level("WARNING", logger="clients.channel"):
        assert [channels.stub() for _ in range(3)] == [0, 0, 0]
    assert len([r for r in caplog.records if "do not load" in r.getMessage()]) == 1
    _rewrite(ca, "B")
    now[0] += channel.ROTATION_RETRY_S * 0.9
    assert channels.stub() == 0  # within ROTATION_RETRY_S of the failure: not read again yet
    now[0] += channel.ROTATION_RETRY_S * 0.2
    assert channels.stub() == 1 and made[1] is not None  # the new channel takes the credentials just read


def test_a_closed_client_makes_no_channel_on_a_rotation(tmp_path):
    channels, ca, made = _rotating(tmp_path)
    assert channels.close() == [0]
    _rewrite(ca, "B")
    with pytest.raises(ValueError, match="the client of t was closed"):  # a call on a closed client says so
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


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "²"])
def test_a_malformed_fail_after_steps_hook_exits_in_one_line_before_any_port_opens(monkeypatch, value):
    """ENGINE_TEST_FAIL_AFTER_STEPS is read like a flag: a value that is no step count is refused at start-up by
    name (it was a bare int() traceback once the model had loaded, and "0" failed the first step)."""
    import signal

    from clients import stop_signals
    from engine_service import server

    opened = []
    monkeypatch.setattr(server, "serve", lambda *a, **k: opened.append(a))
    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", value)
    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as exited:
            server.main(["--model", "fake"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert str(exited.value.code) == (f"engine-service: ENGINE_TEST_FAIL_AFTER_STEPS (a test hook) must be a whole "
                                      f"number of steps, 1 or more, got {value!r}; unset it to run normally")
    assert opened == []
