"""A peer that stops answering while its kernel keeps the TCP connection up (a frozen process, a paused VM or
container) fails the calls on it within the keepalive settings, on both sides of both services' connections.

grpc-core times an unanswered ping by grpc.http2.ping_timeout_ms (60 s by default): with only the keepalive
timeout set, a frozen engine's requests hung a minute whatever --keepalive-timeout-s said.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from engine_service.server import grpc_options
from engine_service.server_config import ServerConfig
from tokenizer_service.config import TextServerConfig
from tokenizer_service.server import engine_channel_options, server_options

KEEPALIVE = {"keepalive_time_s": 1.0, "keepalive_timeout_s": 1.0, "min_ping_interval_s": 0.5}
BOUND_S = 10.0  # 1 s to the first ping, 1 s for its answer, plenty of room for a busy machine; unfixed: 60 s
METHOD = "/test.Hold/Hold"  # one message, then the stream stays open until cancelled

# The peer process: "server" serves METHOD and prints its port; "client PORT" opens a stream, reads its first
# message, says so, and stops itself (SIGSTOP), leaving its connection open but silent.
PEER = r"""
import asyncio, os, signal, sys
import grpc

METHOD = "/test.Hold/Hold"

async def hold(request, context):
    yield b"x"
    await asyncio.Event().wait()

async def server():
    handler = grpc.method_handlers_generic_handler("test.Hold", {"Hold": grpc.unary_stream_rpc_method_handler(hold)})
    server = grpc.aio.server(options=[("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
                                      ("grpc.http2.max_ping_strikes", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

async def client(port):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_stream(METHOD)(b"")
    await call.read()
    print("streaming", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    await asyncio.sleep(3600)

asyncio.run(server() if sys.argv[1] == "server" else client(int(sys.argv[2])))
"""


def start_peer(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", PEER, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"the peer process ({' '.join(args)}) exited before it was ready: rc {proc.wait()}")
    return proc, line


def stop(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL ends a stopped process too
    proc.wait(timeout=10)


def test_the_engine_channel_drops_a_frozen_engine_within_its_keepalive():
    server, port = start_peer("server")
    options = engine_channel_options(TextServerConfig(model="m", engines="e:1", **KEEPALIVE))

    async def main() -> tuple[grpc.StatusCode, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(METHOD)(b"")
            assert await call.read() == b"x"
            os.kill(server.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(call.read(), timeout=90)
            return failed.value.code(), time.monotonic() - frozen

    try:
        code, seconds = asyncio.run(main())
    finally:
        stop(server)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seconds < BOUND_S, f"the frozen engine's stream failed only after {seconds:.1f} s"


@pytest.mark.parametrize("options", [
    pytest.param(lambda: server_options(TextServerConfig(model="m", engines="e:1", **KEEPALIVE)), id="tokenizer"),
    pytest.param(lambda: grpc_options(ServerConfig(model="m", **KEEPALIVE)), id="engine"),
])
def test_a_server_drops_a_frozen_client_within_its_keepalive(options):
    async def main() -> float:
        ended = asyncio.Event()

        async def hold(request, context):
            try:
                yield b"x"
                await asyncio.Event().wait()
            finally:
                ended.set()

        server = grpc.aio.server(options=options())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Hold", {"Hold": grpc.unary_stream_rpc_method_handler(hold)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client, said = await asyncio.to_thread(start_peer, "client", str(port))
        try:
            assert said == "streaming"
            frozen = time.monotonic()
            await asyncio.wait_for(ended.wait(), timeout=90)
            return time.monotonic() - frozen
        finally:
            stop(client)
            await server.stop(0)

    seconds = asyncio.run(main())
    assert seconds < BOUND_S, f"the server noticed its frozen client only after {seconds:.1f} s"
