"""Edges of TLS and mutual TLS (clients/tls.py, clients/channel.py, the engine pool's dialing) that a mutation
audit found untested. Each test's docstring names the bug it catches."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from clients.engine_client import EngineClient
from clients.tls import (
    UNLIMITED_MS,
    ClientTls,
    PortUnavailable,
    ServerTls,
    _Served,
    add_tls_arguments,
    certificate_dates,
    check_validity,
    files_stamp,
    listen,
    shared_server_options,
    start_health_server,
    tls_from_arguments,
)
from engine_service.server import grpc_options
from engine_service.server_config import ServerConfig
from tests.fake_engine import FakeEngine
from tests.pki import CA
from tests.unit.test_engine_service_fake import Running, wait_serving
from tests.unit.test_tls import health_over, tls_health_server
from tokenizer_service.config import TextServerConfig
from tokenizer_service.engine_pool import EnginePool
from tokenizer_service.server import server_options

pytestmark = pytest.mark.timeout(60)
SERVING = health_pb2.HealthCheckResponse.SERVING
NAME = "engine.test"  # the name in the servers' certificates; the tests dial 127.0.0.1
HOUR, DAY = datetime.timedelta(hours=1), datetime.timedelta(days=1)
SETTINGS = dict(max_message_bytes=3 << 20, keepalive_time_s=7.0, keepalive_timeout_s=4.0, min_ping_interval_s=2.5,
                max_connection_age_s=0)


# ---------------------------------------------------------------------------------------------------------
# Server options


@pytest.mark.parametrize("options", [
    pytest.param(lambda: server_options(TextServerConfig(model="m", engines="e:1", **SETTINGS)), id="tokenizer"),
    pytest.param(lambda: grpc_options(ServerConfig(model="m", **SETTINGS)), id="engine"),
])
def test_both_services_server_options_carry_every_shared_setting(options):
    """Catches a setting dropped from service_server_options or keepalive_options (a message limit left at gRPC's
    4 MiB default, no keepalive or ping timeout so a frozen peer holds its calls, a ping policy that GOAWAYs
    clients, SO_REUSEPORT back on), or a duration passed in seconds where gRPC takes milliseconds."""
    got = options()
    names = [name for name, _ in got]
    assert len(names) == len(set(names)), names
    expected = {
        "grpc.max_send_message_length": 3 << 20, "grpc.max_receive_message_length": 3 << 20,
        "grpc.keepalive_time_ms": 7000, "grpc.keepalive_timeout_ms": 4000, "grpc.http2.ping_timeout_ms": 4000,
        "grpc.keepalive_permit_without_calls": 1, "grpc.http2.min_recv_ping_interval_without_data_ms": 2500,
        "grpc.http2.max_ping_strikes": 0, "grpc.so_reuseport": 0,
    }
    assert {name: dict(got).get(name) for name in expected} == expected
    assert "grpc.max_connection_age_ms" not in dict(got)  # 0: off, not a GOAWAY on every new connection
    assert "grpc.max_connection_idle_ms" not in dict(got)  # 0: off
    assert dict(got)["grpc.server.max_pending_requests"] == dict(got)["grpc.server.max_pending_requests_hard_limit"]
    assert dict(got)["grpc.server.max_pending_requests"] >= 16_384


def test_connection_age_is_in_milliseconds_with_no_grace_limit():
    """Catches the connection age sent in the wrong unit, set when 0 (off), or given a grace that cuts
    generations in flight; and a pending-call queue smaller than four times the call limit."""
    got = dict(shared_server_options(2.5, 5000))
    assert got["grpc.max_connection_age_ms"] == 2500
    assert got["grpc.max_connection_age_grace_ms"] == UNLIMITED_MS
    assert got["grpc.server.max_pending_requests"] == 20_000
    assert "grpc.max_connection_age_ms" not in dict(shared_server_options(0, 1))


@pytest.mark.parametrize("options", [
    pytest.param(lambda: server_options(TextServerConfig(model="m", engines="e:1", **SETTINGS,
                                                         max_connection_idle_s=1.5)), id="tokenizer"),
    pytest.param(lambda: grpc_options(ServerConfig(model="m", **SETTINGS, max_connection_idle_s=1.5)), id="engine"),
])
def test_both_services_pass_the_idle_limit_in_milliseconds(options):
    """Catches --max-connection-idle-s dropped on the way to gRPC, or passed in seconds."""
    assert dict(options())["grpc.max_connection_idle_ms"] == 1500


@pytest.mark.parametrize("make", [
    lambda **kw: TextServerConfig(model="m", engines="e:1", **kw),
    lambda **kw: ServerConfig(model="m", **kw),
], ids=["tokenizer", "engine"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_both_services_refuse_a_bad_idle_limit(make, bad):
    with pytest.raises(ValueError, match="max_connection_idle_s must be 0 \\(off\\) or positive"):
        make(max_connection_idle_s=bad)


def test_a_second_server_cannot_take_a_port_in_use():
    """Catches NO_REUSEPORT dropped from the shared options or from the health server: with gRPC's default
    SO_REUSEPORT a second process binds the same port and takes half of its connections."""
    async def main() -> None:
        first = grpc.aio.server(options=shared_server_options(0, 1))
        port = listen(first, "127.0.0.1:0")
        second = grpc.aio.server(options=shared_server_options(0, 1))
        with pytest.raises(PortUnavailable, match="port"):
            listen(second, f"127.0.0.1:{port}")
        servicer = health.aio.HealthServicer()
        held, health_port = await start_health_server(servicer, "127.0.0.1", 0)
        try:
            with pytest.raises(PortUnavailable, match="health_port"):
                await start_health_server(servicer, "127.0.0.1", health_port)
        finally:
            await held.stop(None)
            await first.stop(None)
            await second.stop(None)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------
# Noticing changed files


def test_files_stamp_moves_on_a_chmod_and_on_a_same_size_rewrite(tmp_path):
    """Catches ctime or mtime dropped from files_stamp: a chmod that makes an unreadable key readable, or a file
    rewritten in place with one of the same size (certificates of one issuer often are), went unnoticed and the
    old pair kept being served."""
    path = tmp_path / "tls.crt"
    path.write_bytes(b"a" * 100)
    before = files_stamp(str(path))
    time.sleep(0.05)  # past the file system's timestamp granularity
    os.chmod(path, 0o600)
    chmodded = files_stamp(str(path))
    assert chmodded != before
    time.sleep(0.05)
    path.write_bytes(b"b" * 100)
    assert files_stamp(str(path)) != chmodded


def test_a_client_stamp_watches_its_ca_and_its_key_too(tmp_path):
    """Catches ClientTls.stamp() leaving out the CA or the key file: a rotated CA or key never reached a new
    channel, and once the old one expired every call failed."""
    ca = CA(tmp_path / "ca", "test-ca")
    pair = ca.issue("client")
    tls = ClientTls(str(ca.cert), str(pair.cert), str(pair.key))
    for path in (ca.cert, pair.key, pair.cert):
        before = tls.stamp()
        path.write_bytes(path.read_bytes() + b"\n")
        assert tls.stamp() != before, path.name


def test_tls_server_name_alone_turns_tls_on():
    """Catches --tls-server-name left out of what turns a command-line client's TLS on: given alone, the client
    dialled in plaintext."""
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    tls = tls_from_arguments(parser.parse_args(["--tls-server-name", "svc.test"]))
    assert tls is not None and tls.options() == [("grpc.ssl_target_name_override", "svc.test")]
    assert tls_from_arguments(parser.parse_args([])) is None


# ---------------------------------------------------------------------------------------------------------
# Expiry


def test_the_expiry_warning_window_is_one_day(tmp_path, caplog):
    """Catches the expiry warning window in the wrong unit (minutes for hours) or with its sign flipped (a warning
    for every certificate), and a certificate accepted before its notBefore."""
    cert = str(CA(tmp_path, "test-ca").issue("leaf").cert)
    not_before, not_after = certificate_dates(cert)
    with caplog.at_level(logging.WARNING, logger="clients.tls"):
        check_validity(cert, now=not_after - 25 * 3600)
        assert not caplog.records
        check_validity(cert, now=not_after - 2 * 3600)
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "within a day" in caplog.text
    with pytest.raises(ValueError, match="not valid before"):
        check_validity(cert, now=not_before - 60)
    with pytest.raises(ValueError, match="expired"):
        check_validity(cert, now=not_after)


def test_the_served_certificate_is_checked_once_per_period_and_right_after_a_reload(tmp_path, caplog):
    """Catches _Served.check() not rate-limited (an ERROR per handshake, flooding the log), warning of a near
    expiry again and again, or a reload that does not reset the period (an expired certificate loaded went
    unreported for up to RELOAD_RETRY_S)."""
    ca = CA(tmp_path, "test-ca")
    soon = str(ca.issue("soon", valid=(-HOUR, 2 * HOUR)).cert)
    expired = str(ca.issue("expired", valid=(-2 * DAY, -DAY)).cert)
    served = _Served()
    with caplog.at_level(logging.WARNING, logger="clients.tls"):
        served.load(soon, ("a",))
        for _ in range(3):
            served.check()
        served.check_at = 0.0  # the period has passed
        served.check()
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        served.load(expired, ("b",))
        served.check()
        served.check()
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR]


# ---------------------------------------------------------------------------------------------------------
# Handshakes


def test_a_rotated_client_ca_is_picked_up_without_a_restart(tmp_path):
    """Catches ServerTls leaving the client CA out of the files it watches: after the client CA was rotated (to
    drop a compromised CA) the server kept trusting the old CA's clients and refused the new ones until
    restarted."""
    server_ca, old, new = CA(tmp_path / "s", "server-ca"), CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new")
    pair = server_ca.issue(NAME, NAME)
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(old.cert.read_bytes())
    callers = [old.issue("caller"), new.issue("caller")]
    old_caller, new_caller = (ClientTls(str(server_ca.cert), str(c.cert), str(c.key), NAME) for c in callers)

    async def main() -> list[object]:
        server, target = await tls_health_server(ServerTls(str(pair.cert), str(pair.key), str(client_ca)))
        try:
            seen = [await health_over(target, old_caller), await health_over(target, new_caller)]
            client_ca.write_bytes(new.cert.read_bytes())
            return seen + [await health_over(target, old_caller), await health_over(target, new_caller)]
        finally:
            await server.stop(None)

    unavailable = grpc.StatusCode.UNAVAILABLE
    assert asyncio.run(main()) == [SERVING, unavailable, unavailable, SERVING]


def test_the_pool_dials_a_tls_engine_with_a_ca_alone(tmp_path):
    """Catches the engine pool dialling in plaintext when TLS to the engines has a CA but no client certificate
    (an engine serving TLS without asking for one): every dial failed, or the hop went unencrypted."""
    ca = CA(tmp_path, "test-ca")
    pair = ca.issue(NAME, NAME)
    engine = Running(FakeEngine(), tls_cert=str(pair.cert), tls_key=str(pair.key))
    try:
        with EngineClient(engine.target, timeout=20, tls=ClientTls(str(ca.cert), server_name=NAME)) as client:
            wait_serving(client)
            model = client.model_info()
        config = TextServerConfig(model="fake", engines=engine.target, reconnect_min_s=0.05, reconnect_max_s=0.2,
                                  engine_tls_ca=str(ca.cert), engine_tls_server_name=NAME)

        async def ready() -> bool:
            pool = EnginePool(config, model.vocab_size, set(model.eos_token_ids), [])
            pool.start()
            try:
                for _ in range(200):
                    if pool.ready:
                        return True
                    await asyncio.sleep(0.05)
                return False
            finally:
                await pool.close()

        assert asyncio.run(ready())
    finally:
        assert engine.stop() == 0
