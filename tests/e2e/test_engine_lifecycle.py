"""Issue 4 acceptance around engine processes: two engines, a killed and restarted engine, the failure hook,
and SIGTERM drains of both services during streams."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.engine_client import EngineClient
from clients.text_client import TextClient
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.e2e.conftest import ROOT, start_engine, start_tokenizer
from tests.support import free_port

pytestmark = pytest.mark.timeout(90)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def two(demo_model):
    engines = [start_engine(demo_model), start_engine(demo_model)]
    tokenizer = start_tokenizer(demo_model, engines, health_port=free_port())
    try:
        for service in (*engines, tokenizer):
            service.wait_serving()
        wait_engines_connected(tokenizer, 2)
        yield engines, tokenizer
    finally:
        for service in (tokenizer, *engines):
            service.stop()


def wait_engines_connected(tokenizer, n: int, timeout_s: float = 30.0) -> None:
    """SERVING means one engine is connected; wait until the tokenizer service has all n streams up."""
    deadline = time.monotonic() + timeout_s
    with TextClient(tokenizer.target, timeout=5) as client:
        while client.model_info().num_engines < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tokenizer service did not connect to {n} engines in {timeout_s}s")
            time.sleep(0.05)


def wait_health(service, status, timeout_s: float = 5.0) -> None:
    """Poll until the service answers health with exactly `status` (no answer at all does not count)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = service.health()
        if seen == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"health stayed {seen}, expected {status}")


def wait_port_closed(port: int, timeout_s: float = 10.0) -> None:
    """Wait until nothing listens on 127.0.0.1:port (a plain bind succeeds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} still has a listener after {timeout_s}s") from None
        time.sleep(0.05)


def complete(client: TextClient, prompt: str, n: int = 8) -> list[pb.GenerateResponse]:
    chunks = list(client.generate(prompt, temperature=0.0, max_tokens=n, ignore_eos=True))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and chunks[-1].usage.completion_tokens == n
    return chunks


def test_both_engines_take_requests(two):
    engines, tokenizer = two
    with TextClient(tokenizer.target, timeout=60) as client:
        streams = [client.generate(f"Spread {i}", max_tokens=400, ignore_eos=True) for i in range(8)]
        for s in streams:
            next(iter(s))
        live = []
        for e in engines:
            with EngineClient(e.target, timeout=10) as ec:
                live.append(ec.load().num_live_requests)
        for s in streams:
            s.cancel()
    assert all(n > 0 for n in live), live


def test_killed_engine_leaves_requests_succeeding(two):
    engines, tokenizer = two
    engines[1].signal(signal.SIGKILL)
    engines[1].proc.wait(10)
    with TextClient(tokenizer.target, timeout=60) as client:
        for i in range(6):
            complete(client, f"After the kill {i}")


def test_restarted_engine_serves_without_restarting_the_tokenizer(two):
    engines, tokenizer = two
    tokenizer_pid = tokenizer.proc.pid
    if engines[1].proc.poll() is None:  # not killed by an earlier test: kill it here
        engines[1].signal(signal.SIGKILL)
        engines[1].proc.wait(10)
    engines[1].start()  # the same port
    engines[1].wait_serving()
    engines[0].signal(signal.SIGKILL)
    engines[0].proc.wait(10)
    with TextClient(tokenizer.target, timeout=60) as client:
        for i in range(4):
            complete(client, f"After the restart {i}")
    assert tokenizer.proc.pid == tokenizer_pid and tokenizer.proc.poll() is None


def test_sigterm_drains_tokenizer_then_engine(two, demo_model):
    engines, tokenizer = two
    engine = engines[1]
    results: list[object] = []
    # Each stream's first chunk has come: the drain starts with all four in flight (a fixed sleep before the
    # signal could, on a slow machine, come before some of them had reached the service).
    streaming = [threading.Event() for _ in range(4)]

    def run(client: TextClient, i: int) -> None:
        try:
            chunks = []
            for chunk in client.generate(f"Drain {i}", temperature=0.0, max_tokens=1500, ignore_eos=True):
                chunks.append(chunk)
                streaming[i].set()
                time.sleep(0.004)  # a slow reader: the stream stays in flight for seconds, whatever the CPU
            assert chunks[-1].usage.completion_tokens == 1500
            results.append(chunks)
        except grpc.RpcError as exc:
            results.append(exc)

    replacement = None
    try:
        with TextClient(tokenizer.target, timeout=60) as client:
            first = client.generate("Warm", max_tokens=1)
            first.text()
            threads = [threading.Thread(target=run, args=(client, i)) for i in range(4)]
            for t in threads:
                t.start()
            assert all(event.wait(30) for event in streaming), "the four streams did not start"
            tokenizer.signal(signal.SIGTERM)
            # The drain sends GOAWAY and closes the port at once, while the four streams go on (before, the
            # port stayed open, refusing new calls, until the drain ended).
            wait_port_closed(tokenizer.port, timeout_s=3)
            assert tokenizer.proc.poll() is None and any(t.is_alive() for t in threads), \
                "the streams ended before the port closed: this test saw no drain"
            # Unready while draining, but alive: liveness must not restart a pod that is finishing its streams.
            assert tokenizer.health("") == NOT_SERVING and tokenizer.health("liveness") == SERVING
            # A replacement can listen there (as another replica behind a ClusterIP would take the next
            # connection), and the same client channel's next call reaches it.
            replacement = start_tokenizer(demo_model, engines, port=tokenizer.port)
            replacement.wait_serving()
            new = complete(client, "New while draining", n=2)
            assert new[-1].usage.completion_tokens == 2
            for t in threads:
                t.join(60)
        assert len(results) == 4 and all(isinstance(r, list) for r in results), results
        assert tokenizer.proc.wait(30) == 0
    finally:
        if replacement is not None:
            replacement.stop()

    with EngineClient(engine.target, timeout=60) as ec:
        outs: list[list[int]] = []
        generating = [threading.Event() for _ in range(3)]

        def run_engine(i: int) -> None:
            tokens = []
            for update in ec.generate([3, 4, 5], max_tokens=300, ignore_eos=True):
                tokens += update.new_token_ids
                generating[i].set()
            outs.append(tokens)

        threads = [threading.Thread(target=run_engine, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert all(event.wait(30) for event in generating), "the three requests did not start"
        engine.signal(signal.SIGTERM)
        wait_health(engine, NOT_SERVING)
        with pytest.raises(grpc.RpcError) as err:
            list(ec.generate([1, 2], max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(60)
    assert len(outs) == 3 and all(len(o) == 300 for o in outs)
    assert engine.proc.wait(30) == 0


def test_failing_step_is_internal_and_not_serving(demo_model):
    engine = start_engine(demo_model, env={"ENGINE_TEST_FAIL_AFTER_STEPS": "3"})
    try:
        engine.wait_serving()
        with EngineClient(engine.target, timeout=30) as ec:
            with pytest.raises(grpc.RpcError) as err:
                list(ec.generate([1, 2, 3], max_tokens=50, ignore_eos=True))
            assert err.value.code() == grpc.StatusCode.INTERNAL and "step" in err.value.details()
        assert engine.health() == NOT_SERVING
        assert engine.proc.wait(30) == 1
    finally:
        engine.stop()


def sigterm_once_logged(cmd: list[str], log: Path, marker: str) -> tuple[int, float, str]:
    """Start cmd, wait until its output shows marker, SIGTERM it: (exit status, seconds to exit, its output)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while marker not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(15)
        return rc, time.monotonic() - t0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sigterm_while_the_model_loads_exits_at_once(demo_model, tmp_path):
    """A SIGTERM during a (here endless) model load ends the process in seconds with exit 0: nothing is in flight
    yet, and the pod's grace period must not run out into a SIGKILL while the load goes on."""
    port = free_port()
    code = ("import sys, threading, engine_service.server as s; "
            "s.load_engine = lambda config: threading.Event().wait(600); s.main(sys.argv[1:])")
    rc, took, text = sigterm_once_logged(
        [sys.executable, "-c", code, "--model", demo_model, "--host", "127.0.0.1", "--port", str(port), "--device",
         "cpu", "--metrics-port", "0", "--log-level", "INFO"], tmp_path / "engine.log", "loading")
    assert rc == 0, text
    assert took < 5, f"exit took {took:.1f}s\n{text}"
    assert "stop signal while the model was loading" in text, text


@pytest.mark.parametrize("flag", ["--port", "--health-port"])
def test_a_port_held_by_another_grpc_server_is_a_clear_start_up_error(demo_model, flag):
    """gRPC binds with SO_REUSEPORT by default: a second server on a taken port would start, and the kernel
    would split the connections between the two. The engine service refuses such a port, in one line."""
    from concurrent.futures import ThreadPoolExecutor

    squatter = grpc.server(ThreadPoolExecutor(1))  # gRPC's defaults, SO_REUSEPORT included
    taken = squatter.add_insecure_port("127.0.0.1:0")
    squatter.start()
    port = taken if flag == "--port" else free_port()
    extra = ["--health-port", str(taken)] if flag == "--health-port" else []
    try:
        proc = subprocess.run([sys.executable, "-m", "engine_service.server", "--model", demo_model,
                               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--metrics-port", "0",
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        squatter.stop(0)
    assert proc.returncode == 1, proc.stderr
    what = "port" if flag == "--port" else "health_port"
    assert f"engine-service: cannot listen on 127.0.0.1:{taken} ({what})" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_tokenizer_sigterm_while_loading_exits_cleanly(demo_model, tmp_path):
    """The tokenizer service handles SIGTERM from its first moments: a SIGTERM during the load exits 0 with a
    warning (as a container's PID 1, a signal without a handler is ignored, and the pod would wait out its
    grace period)."""
    code = ("import sys, time, tokenizer_service.server as s; real = s.load_tokenizer; "
            "s.load_tokenizer = lambda d: (print('LOADING', flush=True), time.sleep(3), real(d))[2]; "
            "s.main(sys.argv[1:])")
    rc, _, text = sigterm_once_logged(
        [sys.executable, "-c", code, "--model", demo_model, "--host", "127.0.0.1", "--port", str(free_port()),
         "--engines", "127.0.0.1:1", "--metrics-port", "0"], tmp_path / "tokenizer.log", "LOADING")
    assert rc == 0, text
    assert "stop signal while the tokenizer was loading" in text, text


@pytest.mark.parametrize("damage", ["no-config", "bad-json", "truncated-weights", "bad-index"])
def test_a_model_that_cannot_load_is_one_line_not_a_traceback(demo_model, tmp_path, damage):
    """The engine service reported every load failure (no config.json, a config that is not JSON, a truncated
    safetensors file) as a 40-line traceback, the last naming neither the file nor the fix."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    if damage == "no-config":
        (model / "config.json").unlink()
        want = "config.json does not exist"
    elif damage == "bad-json":
        (model / "config.json").write_text('{"model_type": "qwen3",')
        want = "config.json cannot be read as JSON"
    elif damage == "truncated-weights":
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        want = f"{weights} cannot be read as safetensors"
    else:
        (model / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
        want = "model.safetensors.index.json cannot be read as JSON"
    assert_one_line_failure(["engine_service.server", "--model", str(model), "--device", "cpu"], want)


def assert_one_line_failure(args: list[str], want: str) -> None:
    """python -m args (on a free port, no metrics) exits 1 with `want` in an ERROR line, and no traceback."""
    proc = subprocess.run([sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                           "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert want in proc.stderr and "cannot serve" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["missing", "no-tokenizer-files", "bad-generation-config"])
def test_a_tokenizer_that_cannot_load_is_one_line(demo_model, tmp_path, case):
    """A missing directory was 91 lines of Hugging Face Hub tracebacks (a name that looked like a repo id
    stalled 48 s on the network first), and a directory without tokenizer files started and reported healthy
    with an empty tokenizer, failing every request with 'must encode to at least one token'."""
    import shutil

    model = tmp_path / "model"
    if case == "no-tokenizer-files":
        model.mkdir()
        shutil.copy(Path(demo_model) / "config.json", model / "config.json")
        want = "has no tokenizer files"
    elif case == "bad-generation-config":
        shutil.copytree(demo_model, model)
        (model / "generation_config.json").write_text("{not json")
        want = "generation_config.json cannot be read as JSON"
    else:
        want = "is not a directory"
    assert_one_line_failure(["tokenizer_service.server", "--model", str(model), "--engines", "127.0.0.1:1"], want)


@pytest.mark.parametrize("package, args, said", [
    ("engine_service", ["--device", "cpu"], "stop signal while the model was loading"),
    ("tokenizer_service", ["--engines", "127.0.0.1:1"], "stop signal before the tokenizer loaded"),
])
def test_a_sigterm_before_the_services_imports_stops_it_cleanly(demo_model, package, args, said):
    """As a container's PID 1 a process drops a signal it has no handler for, and the kubelet sends SIGTERM once:
    one that came while the service imported its modules, parsed its flags or opened its ports was lost (the pod
    loaded, turned ready and ran until SIGKILL); elsewhere it killed the process without a line. The package's
    entry point holds it from its first line: here it comes right after, before the service's imports, and the
    service exits 0 with the warning of a stop during loading."""
    code = ("import os, runpy, signal, sys; from clients.stop_signals import hold; hold(); "
            "os.kill(os.getpid(), signal.SIGTERM); "
            f"sys.argv = [{package!r}, *sys.argv[1:]]; runpy.run_module({package!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "--model", demo_model, "--host", "127.0.0.1", "--port",
                           str(free_port()), "--metrics-port", "0", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

