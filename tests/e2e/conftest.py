"""Both services as real processes on loopback, on the demo model, on CPU.

Fixtures start processes on free ports and wait for grpc.health.v1 SERVING; teardown sends SIGTERM and
kills whatever has not exited, so no server outlives its test module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / ".demo_model"
# Small and quick on 2 cores: a modest KV pool so "every block free" is cheap to check.
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch", "--enforce-eager", "true",
                "--num-kvcache-blocks", "512", "--max-num-seqs", "16", "--max-num-batched-tokens", "1024",
                "--canary-interval-s", "0", "--log-level", "WARNING", "--metrics-port", "0"]




@pytest.fixture(scope="session")
def demo_model() -> str:
    from scripts.demo_model import build_demo_model

    return str(build_demo_model(DEMO_DIR))


class Service:
    """One service process on 127.0.0.1:port."""

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None,
                 health_port: int | None = None) -> None:
        self.port, self.target = port, f"127.0.0.1:{port}"
        # A TLS service is asked for its health on its plaintext health-only port.
        self.health_target = f"127.0.0.1:{health_port}" if health_port else self.target
        self.args, self.env = args, {**os.environ, **(env or {})}
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmserve-e2e-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def health(self, service: str = "", timeout: float = 1.0) -> int | None:
        """The health status, or None when the server does not answer."""
        with grpc.insecure_channel(self.health_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                return reply.status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.args} not SERVING after {timeout}s: {self.log.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def start_engine(model: str, port: int | None = None, extra: list[str] = (), env: dict[str, str] | None = None,
                 health_port: int | None = None) -> Service:
    port = port or free_port()
    args = ["engine_service.server", "--model", model, "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
            *extra, *(["--health-port", str(health_port)] if health_port else [])]
    return Service(args, port, env, health_port)


def start_tokenizer(model: str, engines: list[Service], extra: list[str] = (),
                    health_port: int | None = None, port: int | None = None) -> Service:
    port = port or free_port()
    args = ["tokenizer_service.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--engines", ",".join(e.target for e in engines), "--reconnect-max-s", "1", "--log-level", "WARNING",
            "--metrics-port", "0", *extra, *(["--health-port", str(health_port)] if health_port else [])]
    return Service(args, port, health_port=health_port)


def wait_idle(engine_client, timeout: float = 20.0):
    """The engine's Load once it holds no request; every KV block is then free (cached ones included)."""
    deadline = time.monotonic() + timeout
    while True:
        load = engine_client.load()
        if (load.num_live_requests == 0 and load.num_running == 0 and load.num_waiting == 0) or \
                time.monotonic() > deadline:
            return load
        time.sleep(0.05)
