"""The tokenizer service in front of two engine replicas addressed as a headless Service addresses them.

A headless Service is one DNS name that resolves to every ready engine pod, all on one port. Here the name
`llm-engine.llmserve.test` resolves to 127.0.0.1 and 127.0.0.2, where two engine processes (CPU, demo model)
listen on the same port. The tokenizer service gets only `--engine-dns NAME:PORT`.

Name resolution: the tokenizer service resolves TOKENIZER_ENGINE_DNS with the event loop's getaddrinfo, which
calls socket.getaddrinfo. It has no resolver hook of its own, so this module, run as
`python -m tests.e2e.test_headless_dns <tokenizer flags>`, starts the tokenizer service with socket.getaddrinfo
answering names listed in a hosts file (LLMSERVE_TEST_HOSTS: lines `name addr addr ...`, re-read on every
lookup) and resolving everything else as usual.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

HOSTS_ENV = "LLMSERVE_TEST_HOSTS"
DNS_NAME = "llm-engine.llmserve.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2")
LONG = dict(max_tokens=1200, ignore_eos=True, temperature=0.0)
SHORT = dict(max_tokens=8, ignore_eos=True, temperature=0.0)

pytestmark = pytest.mark.timeout(120)


def install_hosts_file_resolver(path: str) -> None:
    """socket.getaddrinfo answers the names in `path` with their addresses, in order (a headless Service)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        names: dict[str, list[str]] = {}
        for line in Path(path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, *addrs = line.split()
                names[name] = addrs
        if isinstance(host, bytes):
            host = host.decode()
        if host in names and family in (0, socket.AF_INET):
            return [(socket.AF_INET, type or socket.SOCK_STREAM, proto or socket.IPPROTO_TCP, "", (a, int(port)))
                    for a in names[host]]
        return real(host, port, family, type, proto, flags)

    socket.getaddrinfo = getaddrinfo




@pytest.fixture(scope="module")
def cluster(demo_model_dir, tmp_path_factory):
    from tests.e2e.conftest import ENGINE_FLAGS, Service
    from tests.support import free_port

    try:
        with socket.socket() as s:
            s.bind((ADDRESSES[1], 0))
    except OSError:
        pytest.skip(f"{ADDRESSES[1]} is not a loopback address on this machine")
    port = free_port(*ADDRESSES)
    hosts = tmp_path_factory.mktemp("dns") / "hosts"
    hosts.write_text(f"{DNS_NAME} {' '.join(ADDRESSES)}\n")
    engines = []
    for address in ADDRESSES:
        engine = Service(["engine_service.server", "--model", str(demo_model_dir), "--host", address,
                          "--port", str(port), *ENGINE_FLAGS], port)
        engine.target = f"{address}:{port}"
        engines.append(engine)
    tokenizer_port = free_port()
    tokenizer = Service(["tests.e2e.test_headless_dns", "--model", str(demo_model_dir), "--host", "127.0.0.1",
                         "--port", str(tokenizer_port), "--engine-dns", f"{DNS_NAME}:{port}",
                         "--dns-refresh-s", "0.5", "--reconnect-min-s", "0.1", "--reconnect-max-s", "1",
                         "--grace-s", "5", "--log-level", "WARNING", "--metrics-port", "0"], tokenizer_port,
                        env={HOSTS_ENV: str(hosts)})
    try:
        for engine in engines:
            engine.wait_serving(90)
        tokenizer.wait_serving(60)
        yield engines, tokenizer
    finally:
        tokenizer.stop(15)
        for engine in engines:
            engine.stop(15)


def live_requests(engine) -> int:
    from clients.engine_client import EngineClient

    try:
        with EngineClient(engine.target, timeout=5) as client:
            return client.load().num_live_requests
    except grpc.RpcError:
        return -1


def open_streams(text, n: int) -> list:
    """n long streaming requests, each read up to its first chunk (so each is live in some engine)."""
    streams = [text.generate(f"spread {i}: the sea", **LONG) for i in range(n)]
    for stream in streams:
        next(iter(stream))
    return streams


def test_requests_spread_over_both_engines_and_survive_losing_one(cluster):
    from clients.text_client import TextClient
    from protos.llmserve.text.v1 import text_pb2 as pb

    engines, tokenizer = cluster
    with TextClient(tokenizer.target, timeout=60) as text:
        # Spread: concurrent requests land on both addresses behind the one name (the pool connects to every
        # address DNS returns; it may still be connecting to the second one right after turning SERVING).
        # The balance is read from a round opened once an earlier one reached both: a round during which the
        # second connection came up could put 7 on one engine and 1 on the other without any fault of the pool's.
        deadline = time.monotonic() + 20
        both = False
        while True:
            streams = open_streams(text, 8)
            counts = [live_requests(e) for e in engines]
            if both and min(counts) > 0 or time.monotonic() > deadline:
                break
            both = min(counts) > 0
            for stream in streams:
                stream.cancel()
            time.sleep(0.5)
        assert min(counts) > 0 and sum(counts) == 8, f"live requests per engine {counts}: not spread over both"
        assert max(counts) - min(counts) <= 2, f"live requests per engine {counts}: not balanced by load"

        # Lose an engine: kill the second without a drain, as a node failure would. Its streams that already
        # had tokens fail with UNAVAILABLE; the other engine's streams finish.
        engines[1].proc.send_signal(signal.SIGKILL)
        engines[1].proc.wait(10)
        finished, lost = 0, 0
        for stream in streams:
            try:
                chunks = list(stream)
                assert chunks and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
                finished += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                lost += 1
        assert finished == counts[0] and lost == counts[1], (finished, lost, counts)

        # New requests right after the loss, while DNS still lists the dead address (as it does until its
        # readiness probe fails): every one is served, by the surviving engine.
        results: list[object] = []

        def one(i: int) -> None:
            try:
                chunks = list(text.generate(f"after the loss {i}", **SHORT))
                results.append(chunks[-1].finish_reason)
            except grpc.RpcError as exc:
                results.append(exc.code())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [pb.FINISH_REASON_LENGTH] * 8, f"new requests after losing an engine: {results}"
        assert live_requests(engines[1]) == -1 and live_requests(engines[0]) == 0


if __name__ == "__main__":
    # The tokenizer service process for the fixture above, resolving through the hosts file.
    install_hosts_file_resolver(os.environ[HOSTS_ENV])
    from tokenizer_service.server import main

    main(sys.argv[1:])
