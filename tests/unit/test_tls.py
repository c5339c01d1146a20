"""TLS and mutual TLS on every hop (clients/tls.py), in-process over the fake engine with throwaway CAs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients.engine_client import EngineClient
from clients.text_client import AsyncTextClient
from clients.tls import ClientTls, ServerTls, read_pem
from engine_service.server_config import ServerConfig
from engine_service.server_config import parse_config as parse_engine_config
from tests.fake_engine import FakeEngine
from tests.pki import CA
from tests.support import free_port
from tests.unit.test_engine_service_fake import Running, wait_serving
from tokenizer_service.config import TextServerConfig
from tokenizer_service.engine_pool import EnginePool

pytestmark = pytest.mark.timeout(90)
SERVING = health_pb2.HealthCheckResponse.SERVING
ENGINE_NAME = "engine.test"  # the name in the engine's certificate; the tests dial 127.0.0.1


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA for the services and their callers, a stranger CA, and a certificate from each."""
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = CA(root / "ca", "test-ca"), CA(root / "stranger", "stranger-ca")
    return dict(ca=ca, stranger=stranger, engine=ca.issue(ENGINE_NAME, ENGINE_NAME),
                text=ca.issue("text.test", "127.0.0.1"), client=ca.issue("client"),
                stranger_client=stranger.issue("client"), locked=ca.issue("locked", passphrase=b"secret"))




def tokens(client: EngineClient) -> list[int]:
    out: list[int] = []
    for update in client.generate([1, 2, 3], max_tokens=4, ignore_eos=True):
        out.extend(update.new_token_ids)
    return out


def refused(client: EngineClient) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        tokens(client)
    return info.value.code()


# ---------------------------------------------------------------------------------------------------------
# Settings: refused at start-up with a message naming the setting and the file


def test_read_pem_names_the_path_and_what_is_wrong(pki, tmp_path):
    with pytest.raises(ValueError, match=r"cannot read '.*/nope.pem': No such file"):
        read_pem(str(tmp_path / "nope.pem"), "CERTIFICATE")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM CERTIFICATE"):
        read_pem(str(garbage), "CERTIFICATE")
    with pytest.raises(ValueError, match="holds no PEM PRIVATE KEY"):  # the certificate given as the key
        read_pem(str(pki["engine"].cert), "PRIVATE KEY")
    assert read_pem(str(pki["engine"].key), "PRIVATE KEY").startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("make", [
    lambda **kw: ServerConfig(model="m", **kw),
    lambda **kw: TextServerConfig(model="m", engines="e:1", **kw),
], ids=["engine", "tokenizer"])
def test_half_a_tls_setting_is_refused_naming_the_settings(pki, make):
    cert, key, ca = str(pki["engine"].cert), str(pki["engine"].key), str(pki["ca"].cert)
    with pytest.raises(ValueError, match=r"TLS \(tls_cert, tls_key, tls_client_ca.*certificate and its private key"):
        make(tls_cert=cert)
    with pytest.raises(ValueError, match="certificate and its private key"):
        make(tls_client_ca=ca)  # mutual TLS without our own certificate
    with pytest.raises(ValueError, match="holds no PEM PRIVATE KEY"):
        make(tls_cert=cert, tls_key=cert)
    with pytest.raises(ValueError, match=r"client.key' is not the private key of the certificate in .*engine.test"):
        make(tls_cert=cert, tls_key=str(pki["client"].key))  # another pair's key
    with pytest.raises(ValueError, match="locked.key' is encrypted: give the private key without a passphrase"):
        make(tls_cert=str(pki["locked"].cert), tls_key=str(pki["locked"].key))
    with pytest.raises(ValueError, match="health_port must be in 0..65535"):
        make(health_port=70000)
    with pytest.raises(ValueError, match="health_port 9100 is taken by port or metrics_port"):
        make(health_port=9100, metrics_port=9100)
    assert make(tls_cert=cert, tls_key=key).server_tls == ServerTls(cert, key)
    assert make(tls_cert=cert, tls_key=key, tls_client_ca=ca).server_tls.mutual
    assert make().server_tls is None


def test_engine_side_tls_of_the_tokenizer_needs_the_engines_ca(pki):
    ca, cert, key = str(pki["ca"].cert), str(pki["client"].cert), str(pki["client"].key)
    with pytest.raises(ValueError, match="engine_tls_ca .* turns TLS to the engines on"):
        TextServerConfig(model="m", engines="e:1", engine_tls_cert=cert, engine_tls_key=key)
    with pytest.raises(ValueError, match=r"TLS to the engines .*go together"):
        TextServerConfig(model="m", engines="e:1", engine_tls_ca=ca, engine_tls_cert=cert)
    with pytest.raises(ValueError, match=r"TLS to the engines .*is not the private key of the certificate"):
        TextServerConfig(model="m", engines="e:1", engine_tls_ca=ca, engine_tls_cert=cert,
                         engine_tls_key=str(pki["engine"].key))
    assert TextServerConfig(model="m", engines="e:1").engine_tls is None
    # The name verified in an engine's certificate: the setting, else the headless Service's name.
    by_dns = TextServerConfig(model="m", engine_dns="llm-engine.llm.svc:50051", engine_tls_ca=ca)
    assert by_dns.engine_tls.options() == [("grpc.ssl_target_name_override", "llm-engine.llm.svc")]
    named = TextServerConfig(model="m", engine_dns="llm-engine:50051", engine_tls_ca=ca,
                             engine_tls_server_name="engine.internal")
    assert named.engine_tls.options() == [("grpc.ssl_target_name_override", "engine.internal")]
    assert TextServerConfig(model="m", engines="e:1", engine_tls_ca=ca).engine_tls.options() == []


def test_tls_settings_come_from_the_environment_too(pki, tmp_path):
    env = {"ENGINE_MODEL": "m", "ENGINE_TLS_CERT": str(pki["engine"].cert),
           "ENGINE_TLS_KEY": str(tmp_path / "missing.key")}
    with pytest.raises(ValueError, match=r"tls_key.*cannot read '.*missing.key'"):
        parse_engine_config([], env)
    env["ENGINE_TLS_KEY"] = str(pki["engine"].key)
    assert parse_engine_config([], env).server_tls == ServerTls(env["ENGINE_TLS_CERT"], env["ENGINE_TLS_KEY"])


# ---------------------------------------------------------------------------------------------------------
# The engine service over mutual TLS


@pytest.fixture(scope="module")
def mtls_engine(pki):
    health_port = free_port()
    running = Running(FakeEngine(), tls_cert=str(pki["engine"].cert), tls_key=str(pki["engine"].key),
                      tls_client_ca=str(pki["ca"].cert), health_port=health_port)
    running.health_target = f"127.0.0.1:{health_port}"
    yield running
    assert running.stop() == 0


def client_tls(pki, client: str | None = "client", ca: str = "ca") -> ClientTls:
    pair = pki[client] if client else None
    return ClientTls(str(pki[ca].cert), str(pair.cert) if pair else "", str(pair.key) if pair else "", ENGINE_NAME)


def test_engine_serves_only_callers_with_a_certificate_its_ca_signed(pki, mtls_engine):
    with EngineClient(mtls_engine.target, timeout=20, tls=client_tls(pki)) as good:
        wait_serving(good)
        assert len(tokens(good)) == 4
    with EngineClient(mtls_engine.target, timeout=5) as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    with EngineClient(mtls_engine.target, timeout=5, tls=client_tls(pki, client=None)) as anonymous:
        assert refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    with EngineClient(mtls_engine.target, timeout=5, tls=client_tls(pki, client="stranger_client")) as stranger:
        assert refused(stranger) == grpc.StatusCode.UNAVAILABLE
    # The caller checks the engine too: a caller trusting only another CA refuses this engine.
    with EngineClient(mtls_engine.target, timeout=5, tls=client_tls(pki, ca="stranger")) as wary:
        assert refused(wary) == grpc.StatusCode.UNAVAILABLE


def test_health_port_answers_probes_in_plaintext_and_nothing_else(mtls_engine, pki):
    with EngineClient(mtls_engine.target, timeout=20, tls=client_tls(pki)) as client:
        wait_serving(client)
    with grpc.insecure_channel(mtls_engine.health_target) as channel:
        for name in ("", "llmserve.engine.v1.Engine"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == SERVING, name
    with EngineClient(mtls_engine.health_target, timeout=5) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.model_info()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the engine API is not on the health port


# ---------------------------------------------------------------------------------------------------------
# Rotation: new handshakes get the new certificate, and a change that does not load keeps the old one


async def health_over(target: str, tls: ClientTls) -> object:
    """The health status over `tls`, or the call's status code. A refused handshake fails at once (UNAVAILABLE);
    the deadline only bounds a good one, which a loaded CI machine has taken seconds to finish."""
    async with grpc.aio.secure_channel(target, tls.credentials(), options=tls.options()) as channel:
        try:
            return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)).status
        except grpc.aio.AioRpcError as exc:
            return exc.code()


async def tls_health_server(tls: ServerTls) -> tuple[grpc.aio.Server, str]:
    """A started server answering grpc.health.v1 SERVING over `tls`, and its target."""
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    target = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', tls.credentials())}"
    await server.start()
    return server, target


def test_server_picks_up_a_rotated_certificate_without_a_restart(tmp_path, caplog):
    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    old_ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key)
    trusts_old = ClientTls(str(old_ca.cert), server_name=ENGINE_NAME)
    trusts_new = ClientTls(str(new_ca.cert), server_name=ENGINE_NAME)
    other = new_ca.issue("other", ENGINE_NAME)

    async def main() -> list[object]:
        server, target = await tls_health_server(ServerTls(str(cert), str(key)))
        try:
            seen = [await health_over(target, trusts_old), await health_over(target, trusts_new)]
            new_ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key)  # what a Secret update does
            seen += [await health_over(target, trusts_new), await health_over(target, trusts_old)]
            good_cert, good_key = cert.read_bytes(), key.read_bytes()
            cert.write_bytes(good_cert[: len(good_cert) // 2])  # half-written: a header, a cut body
            seen.append(await health_over(target, trusts_new))
            cert.write_bytes(good_cert)
            key.write_bytes(other.key.read_bytes())  # a key that is not this certificate's
            seen.append(await health_over(target, trusts_new))
            key.write_bytes(good_key)
            seen.append(await health_over(target, trusts_new))
            return seen
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger="clients.tls"):
        seen = asyncio.run(main())
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert seen == [SERVING, unavailable, SERVING, unavailable, SERVING, SERVING, SERVING]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("keeping the current certificate" in w for w in warnings), warnings
    assert "damaged" in warnings[0] and "is not the private key of the certificate" in warnings[1]
    reloads = [r for r in caplog.records if "reloading the certificate" in r.getMessage()]
    assert len(reloads) == 2  # the rotation, and the repaired pair; never a pair that did not load


def test_health_port_turns_not_serving_when_a_drain_starts(pki):
    health_port = free_port()
    running = Running(FakeEngine(max_model_len=10_000_000), health_port=health_port)
    statuses: list[object] = []
    with EngineClient(running.target, timeout=30) as client:
        wait_serving(client)
        stream = client.generate([1], max_tokens=1_000_000, ignore_eos=True)
        next(stream)  # a request in flight holds the drain open
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            statuses.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            running.loop.call_soon_threadsafe(running.stop_event.set)
            for _ in range(100):
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status != SERVING:
                    break
                threading.Event().wait(0.02)
            statuses.append(status)
        stream.cancel()
    assert running.stop() == 0
    assert statuses == [SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


# ---------------------------------------------------------------------------------------------------------
# The tokenizer service: TLS to its callers, mutual TLS to the engine


def test_text_streams_over_tls_on_both_hops(pki, demo_model_dir, demo_tokenizer):
    from tokenizer_service.server import serve
    from tokenizer_service.validation import read_eos_token_ids

    fake = FakeEngine(vocab_size=json.loads((demo_model_dir / "config.json").read_text())["vocab_size"],
                      max_model_len=1000)
    fake.model_info["eos_token_ids"] = sorted(read_eos_token_ids(str(demo_model_dir), demo_tokenizer,
                                                                      fake.model_info["vocab_size"]))
    engine = Running(fake, tls_cert=str(pki["engine"].cert), tls_key=str(pki["engine"].key),
                     tls_client_ca=str(pki["ca"].cert))
    config = TextServerConfig(
        model=str(demo_model_dir), host="127.0.0.1", port=0, metrics_port=0, grace_s=1, engine_wait_s=2,
        engines=engine.target, engine_tls_ca=str(pki["ca"].cert), engine_tls_cert=str(pki["client"].cert),
        engine_tls_key=str(pki["client"].key), engine_tls_server_name=ENGINE_NAME,
        tls_cert=str(pki["text"].cert), tls_key=str(pki["text"].key))
    caller_tls = ClientTls(str(pki["ca"].cert))  # the tokenizer's certificate names 127.0.0.1 itself

    async def main() -> tuple[object, str, object]:
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, stop=stop, bound_port=port, handle_signals=False))
        try:
            target = f"127.0.0.1:{await asyncio.wait_for(asyncio.shield(port), 60)}"
            for _ in range(300):  # SERVING once the mutual-TLS stream to the engine is up
                status = await health_over(target, caller_tls)
                if status == SERVING:
                    break
                await asyncio.sleep(0.05)
            async with AsyncTextClient(target, timeout=30, tls=caller_tls) as client:
                text = await client.generate("Once upon", max_tokens=5, ignore_eos=True).text()
            async with AsyncTextClient(target, timeout=5) as plaintext:
                try:
                    await plaintext.model_info()
                    refusal: object = "answered"
                except grpc.aio.AioRpcError as exc:
                    refusal = exc.code()
            return status, text, refusal
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        status, text, plaintext_refusal = asyncio.run(main())
    finally:
        assert engine.stop() == 0
    assert status == SERVING
    assert text  # five tokens through mutual TLS to the engine, detokenized, and TLS back to us
    assert plaintext_refusal == grpc.StatusCode.UNAVAILABLE


def test_pool_retries_while_its_tls_files_are_missing_then_connects(pki, mtls_engine, tmp_path, caplog):
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki["ca"].cert.read_bytes())
    config = TextServerConfig(model="fake", engines=mtls_engine.target, reconnect_min_s=0.05, reconnect_max_s=0.2,
                              engine_tls_ca=str(ca), engine_tls_cert=str(pki["client"].cert),
                              engine_tls_key=str(pki["client"].key), engine_tls_server_name=ENGINE_NAME)
    info = EngineClient(mtls_engine.target, timeout=20, tls=client_tls(pki))
    wait_serving(info)
    model = info.model_info()
    info.close()

    async def main() -> tuple[bool, bool]:
        pool = EnginePool(config, model.vocab_size, set(model.eos_token_ids), [])
        ca.unlink()  # mid-rotation: the file is gone when the pool first dials
        pool.start()
        try:
            await asyncio.sleep(0.5)
            ready_without = bool(pool.ready)
            ca.write_bytes(pki["ca"].cert.read_bytes())
            for _ in range(200):
                if pool.ready:
                    break
                await asyncio.sleep(0.05)
            return ready_without, bool(pool.ready)
        finally:
            await pool.close()

    with caplog.at_level(logging.ERROR, logger="tokenizer_service.engine_pool"):
        assert asyncio.run(main()) == (False, True)
    assert "cannot dial" in caplog.text and "ca.crt" in caplog.text


def test_pool_checks_the_dns_name_in_the_engines_certificate(pki, mtls_engine):
    """Behind a headless Service the pool dials IP addresses; it checks the DNS name it resolved against the
    engine's certificate (which names only engine.test), or the name set in engine_tls_server_name."""
    port = int(mtls_engine.target.rpartition(":")[2])
    info = EngineClient(mtls_engine.target, timeout=20, tls=client_tls(pki))
    wait_serving(info)
    model = info.model_info()
    info.close()

    async def fake_getaddrinfo(host, port_, **kwargs):
        assert host == ENGINE_NAME
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

    async def ready_within(seconds: float, **overrides: str) -> bool:
        asyncio.get_running_loop().getaddrinfo = fake_getaddrinfo
        config = TextServerConfig(model="fake", engine_dns=f"{ENGINE_NAME}:{port}", dns_refresh_s=0.05,
                                  reconnect_min_s=0.05, reconnect_max_s=0.2, engine_tls_ca=str(pki["ca"].cert),
                                  engine_tls_cert=str(pki["client"].cert), engine_tls_key=str(pki["client"].key),
                                  **overrides)
        pool = EnginePool(config, model.vocab_size, set(model.eos_token_ids), [])
        pool.start()
        try:
            for _ in range(int(seconds / 0.05)):
                if pool.ready:
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            await pool.close()

    assert asyncio.run(ready_within(10.0))  # verified as engine.test, though dialed as 127.0.0.1
    assert not asyncio.run(ready_within(1.5, engine_tls_server_name="another.name"))


def test_cli_refuses_half_a_client_certificate_and_hints_at_tls_when_refused(pki, mtls_engine, capsys):
    from clients.cli import main

    assert main(["hi", "--tls-cert", str(pki["client"].cert)]) == 2
    assert "go together" in capsys.readouterr().err
    # A plaintext call to a TLS port fails like a service that is down: the message says what to check.
    assert main(["hi", "--target", mtls_engine.target, "--timeout", "5"]) == 1
    assert "If it serves TLS, give --tls-ca" in capsys.readouterr().err


def test_serving_bench_takes_the_same_tls_flags(pki, capsys):
    from clients import serving_bench

    with pytest.raises(SystemExit) as info:
        serving_bench.main(["--tls-key", str(pki["client"].key)])
    assert info.value.code == 2 and "go together" in capsys.readouterr().err


def test_docs_name_every_tls_setting():
    """docs/SECURITY.md documents each TLS field of both services."""
    import dataclasses

    text = (Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md").read_text()
    for cls in (ServerConfig, TextServerConfig):
        for field in dataclasses.fields(cls):
            if "tls" in field.name or field.name == "health_port":
                assert f"--{field.name.replace('_', '-')}" in text, f"{cls.__name__}.{field.name} undocumented"


def test_services_doc_names_every_flag_of_both_services():
    """docs/SERVICES.md, where a user looks for a flag, names each setting of both services and of the engine."""
    import dataclasses

    from engine_service.config import EngineConfig

    text = (Path(__file__).resolve().parents[2] / "docs" / "SERVICES.md").read_text()
    fields = [(cls, field.name) for cls in (ServerConfig, TextServerConfig, EngineConfig)
              for field in dataclasses.fields(cls)]
    assert len(fields) > 60 and any(name == "stream_max_wait_s" for _, name in fields)
    missing = [f"{cls.__name__}.{name}" for cls, name in fields if f"--{name.replace('_', '-')}" not in text]
    assert not missing, f"undocumented in docs/SERVICES.md: {missing}"


def test_the_docs_name_every_flag_of_llm_client():
    """README.md or docs/*.md name each llm-client flag; nine (--system, --temperature, ..., --timeout) were in
    --help only."""
    from clients.cli import build_parser

    root = Path(__file__).resolve().parents[2]
    text = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    flags = [s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")]
    assert len(flags) > 30 and "--system" in flags
    missing = [f for f in flags if f != "--help" and not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"llm-client flags no doc names: {missing}"


def test_a_damaged_ca_file_is_refused_naming_it(pki, tmp_path):
    """A truncated CA, or one pasted indented from YAML, went to gRPC unchecked: the server failed to start
    with 'another process holds that port', and a client failed every handshake without naming the file."""
    from clients.tls import ClientTls, ServerTls

    text = pki["ca"].cert.read_text()
    truncated, indented = tmp_path / "truncated.crt", tmp_path / "indented.crt"
    truncated.write_text(text[: len(text) // 2] + "\n-----END CERTIFICATE-----\n")
    indented.write_text("".join("  " + line for line in text.splitlines(keepends=True)))
    for bad in (truncated, indented):
        with pytest.raises(ValueError, match=f"{bad.name}' holds no usable CA certificate"):
            ServerTls(str(pki["engine"].cert), str(pki["engine"].key), str(bad))
        with pytest.raises(ValueError, match=f"{bad.name}' holds no usable CA certificate"):
            ClientTls(ca_file=str(bad))
    ClientTls(ca_file=str(pki["ca"].cert))


def test_expired_not_yet_valid_and_ed25519_certificates_are_refused(pki, tmp_path):
    """An engine with an expired certificate started, said SERVING on its health port and logged nothing,
    while every handshake failed; Ed25519 keys loaded, then no gRPC handshake could use them."""
    import datetime

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from clients.tls import ServerTls
    from tests.pki import CA

    ca = CA(tmp_path / "ca", "test-ca")
    day = datetime.timedelta(days=1)
    expired = ca.issue("expired", "localhost", valid=(-2 * day, -day))
    early = ca.issue("early", "localhost", valid=(day, 2 * day))
    edwards = ca.issue("edwards", "localhost", leaf_key=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="expired.crt' expired on .*: renew it"):
        ServerTls(str(expired.cert), str(expired.key))
    with pytest.raises(ValueError, match="early.crt' is not valid before .*check this machine's clock"):
        ServerTls(str(early.cert), str(early.key))
    with pytest.raises(ValueError, match="edwards.key' is a key of a kind gRPC's TLS cannot sign handshakes with"):
        ServerTls(str(edwards.cert), str(edwards.key))
    ServerTls(str(pki["engine"].cert), str(pki["engine"].key))


def test_only_the_key_kinds_grpc_can_sign_with_are_taken(tmp_path):
    """Python's ssl loads P-521, secp256k1, brainpool and DSA keys, which gRPC's TLS cannot sign handshakes with: a
    service started with one failed every handshake while SERVING, and a rotation to one kept the old certificate
    served while the expiry gauge read the new one's date. RSA and ECDSA P-256/P-384 are taken, in PKCS#8 and in
    the older RSA and EC blocks."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    from clients.tls import check_pair, key_kind
    from tests.pki import CA

    ca = CA(tmp_path / "ca", "test-ca")
    keys = {"RSA": rsa.generate_private_key(65537, 2048), "P-256": ec.generate_private_key(ec.SECP256R1()),
            "P-384": ec.generate_private_key(ec.SECP384R1()), "P-521": ec.generate_private_key(ec.SECP521R1()),
            "secp256k1": ec.generate_private_key(ec.SECP256K1()),
            "brainpool": ec.generate_private_key(ec.BrainpoolP256R1()), "DSA": dsa.generate_private_key(2048)}
    for name, key in keys.items():
        issued = ca.issue(name.lower(), "localhost", leaf_key=key)
        usable = name in ("RSA", "P-256", "P-384")
        for form in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
            issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()))
            assert key_kind(str(issued.key)) == (name if usable else None), (name, form)
            if usable:
                check_pair(str(issued.cert), str(issued.key))
            else:
                with pytest.raises(ValueError, match="cannot sign handshakes with .*issue an RSA key"):
                    check_pair(str(issued.cert), str(issued.key))


def test_a_ca_file_with_no_certificate_valid_now_is_refused(tmp_path):
    """An expired --tls-client-ca (or --engine-tls-ca) was taken: the engine refused every caller with a bare
    'Socket closed' and the tokenizer blamed the engine's certificate. A bundle with one CA valid now is taken."""
    import datetime

    from clients.tls import ClientTls, ServerTls, read_ca
    from tests.pki import CA

    day = datetime.timedelta(days=1)
    ca = CA(tmp_path / "ca", "test-ca")
    leaf = ca.issue("engine", "localhost")
    expired, early, bundle = tmp_path / "expired.pem", tmp_path / "early.pem", tmp_path / "bundle.pem"
    expired.write_bytes(ca._sign("test-ca", ca._key, ca=True, sans=(), valid=(-3 * day, -day)))
    early.write_bytes(ca._sign("test-ca", ca._key, ca=True, sans=(), valid=(day, 3 * day)))
    bundle.write_bytes(expired.read_bytes() + ca.cert.read_bytes())
    with pytest.raises(ValueError, match="no CA certificate in .*expired.pem' is valid now: the last expired on"):
        ClientTls(ca_file=str(expired))
    with pytest.raises(ValueError, match="expired.pem' is valid now: .*during a CA rotation"):
        ServerTls(str(leaf.cert), str(leaf.key), str(expired))
    with pytest.raises(ValueError, match="early.pem' is valid now: the first is not valid before .*clock"):
        read_ca(str(early))
    assert read_ca(str(bundle)) == bundle.read_bytes()


def test_the_pool_says_what_to_check_when_tls_does_not_match():
    """The engine pool logged gRPC's bare 'Socket closed' or 'WRONG_VERSION_NUMBER'; llm-client gave hints. An
    engine certificate that had expired (or another CA signed) got the hint for a missing client certificate."""
    from clients.tls import ClientTls
    from tokenizer_service.engine_pool import tls_hint

    assert "set --engine-tls-ca" in tls_hint("failed to connect: Socket closed", None)
    tls = ClientTls.__new__(ClientTls)
    object.__setattr__(tls, "server_name", "llm-engine")
    object.__setattr__(tls, "cert_file", "")
    assert "give --engine-tls-cert" in tls_hint("Socket closed", tls)
    assert "serves plaintext" in tls_hint("SSL routines::WRONG_VERSION_NUMBER", tls)
    assert "does not name llm-engine" in tls_hint("Hostname Verification Check failed.", tls)
    # gRPC's words for a name that does not resolve hold "hostname lookup": not a certificate's name
    unresolved = ("errors resolving llm-engine-0.llm-engine.invalid:50051: [field:hostname lookup error:address "
                  "lookup failed for llm-engine-0.llm-engine.invalid:50051: Domain name not found]")
    for client in (None, tls):
        assert "did not resolve" in tls_hint(unresolved, client) and "certificate" not in tls_hint(unresolved, client)
    assert tls_hint("Connection refused", tls) == ""
    with_cert = ClientTls.__new__(ClientTls)
    object.__setattr__(with_cert, "cert_file", "client.crt")
    assert "the CA in its --tls-client-ca" in tls_hint("Socket closed", with_cert)  # the engine refused ours
    for why in ("certificate has expired", "unable to get local issuer certificate", "certificate is not yet valid"):
        details = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:58837: Tls handshake "
                   "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                   f"CERTIFICATE_VERIFY_FAILED: {why}: OK")
        for client in (tls, with_cert):
            hint = tls_hint(details, client)
            assert "certificate did not verify against --engine-tls-ca" in hint and "--engine-tls-cert" not in hint


def test_a_renewed_certificate_not_valid_yet_is_served_once_it_is(tmp_path, caplog, monkeypatch):
    """The files were tried once when they changed: a renewal whose notBefore was a second ahead (clock skew) was
    refused, and the old certificate stayed until the files changed again, perhaps until it expired."""
    import datetime

    import clients.tls

    monkeypatch.setattr(clients.tls, "RELOAD_RETRY_S", 0.3)
    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    old_ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key)
    trusts_new = ClientTls(str(new_ca.cert), server_name=ENGINE_NAME)

    async def main() -> list[object]:
        server, target = await tls_health_server(ServerTls(str(cert), str(key)))
        try:
            soon = (datetime.timedelta(seconds=1.5), datetime.timedelta(days=2))
            new_ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key, valid=soon)
            seen = [await health_over(target, trusts_new)]  # not valid yet: the old one is kept
            await asyncio.sleep(2.0)
            seen.append(await health_over(target, trusts_new))
            return seen
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger="clients.tls"):
        assert asyncio.run(main()) == [grpc.StatusCode.UNAVAILABLE, SERVING]
    assert any("is not valid before" in r.getMessage() for r in caplog.records)


def test_a_ca_bundle_with_non_ascii_comments_loads(pki, tmp_path):
    """System bundles carry labels such as '# NetLock Arany (Class Gold) Főtanúsítvány': read_ca raised TypeError."""
    from clients.tls import read_ca

    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# NetLock Arany (Class Gold) Főtanúsítvány\n".encode() + pki["ca"].cert.read_bytes())
    assert read_ca(str(bundle)) == bundle.read_bytes()
    ClientTls(ca_file=str(bundle))


def test_a_burst_past_the_call_limit_is_refused_in_words_not_dropped():
    """With grpc-core's queue of untaken calls as small as the call limit, a burst past the limit was mostly
    dropped with a bare CANCELLED (566 of 600 at a limit of 32) instead of refused with RESOURCE_EXHAUSTED."""
    from collections import Counter

    from clients.tls import shared_server_options

    async def slow(request: bytes, context: object) -> bytes:
        await asyncio.sleep(0.5)
        return request

    async def main() -> Counter:
        server = grpc.aio.server(options=shared_server_options(0, 32), maximum_concurrent_rpcs=32)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {"U": grpc.unary_unary_rpc_method_handler(slow)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes: Counter = Counter()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.T/U")

                async def one() -> None:
                    try:
                        await call(b"x", timeout=30)
                        outcomes["OK"] += 1
                    except grpc.RpcError as exc:
                        outcomes[exc.code().name] += 1

                await asyncio.gather(*(one() for _ in range(600)))
        finally:
            await server.stop(0)
        return outcomes

    outcomes = asyncio.run(main())
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"} and outcomes["OK"] >= 32, outcomes


# ---------------------------------------------------------------------------------------------------------
# Expiry while serving, and clients that outlive their certificate


def not_after(cert: Path) -> float:
    """The certificate's notAfter as a Unix time."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def expiry_gauge(port: int) -> float | None:
    """llmserve:tls_certificate_expiry_timestamp_seconds on a /metrics page, None when it is not there."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(body):
        if family.name == "llmserve:tls_certificate_expiry_timestamp_seconds":
            return family.samples[0].value
    return None


def test_a_server_says_when_the_certificate_it_serves_expires(tmp_path, caplog, monkeypatch):
    """A certificate that expired while the service ran went unnoticed: health said SERVING and nothing was logged
    (the client refuses the handshake, so gRPC logs nothing on the server) over 10,007 failed handshakes."""
    import datetime
    import time

    import clients.tls

    monkeypatch.setattr(clients.tls, "RELOAD_RETRY_S", 0.3)
    ca = CA(tmp_path / "ca", "test-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key, valid=(-datetime.timedelta(minutes=5),
                                                                  datetime.timedelta(seconds=10)))
    short_lived = not_after(cert)
    trusts = ClientTls(str(ca.cert), server_name=ENGINE_NAME)
    tls = ServerTls(str(cert), str(key))

    def ours(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "clients.tls" and r.levelno == level]

    async def main() -> tuple[list[object], float, int, float]:
        server, target = await tls_health_server(tls)
        try:
            seen = [await health_over(target, trusts), await health_over(target, trusts)]
            served = tls.expiry()
            await asyncio.sleep(max(0.0, served - time.time()) + 0.1)
            started = time.monotonic()
            seen += [await health_over(target, trusts) for _ in range(8)]
            elapsed = time.monotonic() - started
            errors = len(ours(logging.ERROR))
            ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key)  # renewed
            await asyncio.sleep(0.4)
            seen += [await health_over(target, trusts), await health_over(target, trusts)]
            return seen, served, errors, elapsed
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger="clients.tls"):
        seen, served, errors, elapsed = asyncio.run(main())
    assert seen == [SERVING] * 2 + [grpc.StatusCode.UNAVAILABLE] * 8 + [SERVING] * 2
    soon = [m for m in ours(logging.WARNING) if "within a day" in m]
    assert len(soon) == 1 and "the certificate served from" in soon[0], soon  # once, not at every check
    expired = ours(logging.ERROR)
    assert expired and all("expired on" in m and "every TLS handshake fails; renew it" in m for m in expired)
    assert 1 <= errors <= 2 + elapsed / 0.3  # once per interval, not once per handshake
    assert len(expired) == errors  # the renewal is served: no more errors
    assert served == short_lived and tls.expiry() == not_after(cert) > time.time() + 86_400


def test_both_services_export_when_their_certificate_expires(pki, demo_model_dir):
    """Operators had no metric to alert on before a certificate expired; a plaintext service has no such series."""
    from tokenizer_service.server import serve

    engine_port, plaintext_port, text_port = free_port(), free_port(), free_port()
    engine = Running(FakeEngine(), metrics_port=engine_port, tls_cert=str(pki["engine"].cert),
                     tls_key=str(pki["engine"].key))
    plaintext = Running(FakeEngine(), metrics_port=plaintext_port)
    config = TextServerConfig(model=str(demo_model_dir), host="127.0.0.1", port=0, metrics_port=text_port,
                              grace_s=1, engines=engine.target, tls_cert=str(pki["text"].cert),
                              tls_key=str(pki["text"].key))

    async def tokenizer_gauge() -> float | None:
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, stop=stop, bound_port=port, handle_signals=False))
        try:
            await asyncio.wait_for(asyncio.shield(port), 60)
            return await asyncio.to_thread(expiry_gauge, text_port)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        assert expiry_gauge(engine_port) == not_after(pki["engine"].cert)
        assert expiry_gauge(plaintext_port) is None
        assert asyncio.run(tokenizer_gauge()) == not_after(pki["text"].cert)
    finally:
        assert engine.stop() == 0 and plaintext.stop() == 0


def test_metrics_have_the_certificate_gauge_only_when_watching_one():
    from engine_service.metrics import EngineMetrics
    from tokenizer_service.metrics import TextMetrics

    name = "llmserve:tls_certificate_expiry_timestamp_seconds"
    for metrics in (EngineMetrics("m", dict, lambda: 0), TextMetrics("m")):
        assert metrics.registry.get_sample_value(name, {"model_name": "m"}) is None  # plaintext: no series
        metrics.watch_certificate(lambda: 1_900_000_000.0)
        assert metrics.registry.get_sample_value(name, {"model_name": "m"}) == 1_900_000_000.0


@pytest.mark.parametrize("kind", ["engine", "text", "async_text"])
def test_a_long_lived_client_moves_to_rotated_files(pki, mtls_engine, tmp_path, caplog, monkeypatch, kind):
    """A client read its TLS files once, for its one channel, whose reconnects reuse those bytes: after a
    rotation, once the old certificate expired, every call failed UNAVAILABLE while a new client on the same
    files worked. The engine trusts only pki["ca"]: the files first hold another CA's certificate."""
    from clients import channel
    from clients.text_client import TextClient

    monkeypatch.setattr(channel, "ROTATION_RETRY_S", 0.0)
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"

    writes = iter(range(1, 100))

    def write(cert_from: Path, key_from: Path) -> None:
        # Each write a second apart, as rotations are: written within one tick of the file system's clock, with
        # the same size, a file keeps its stamp (the clients compare stamps, not bytes, before each call).
        when = (1_700_000_000 + next(writes)) * 10**9
        for path, source in ((cert, cert_from), (key, key_from)):
            path.write_bytes(source.read_bytes())
            os.utime(path, ns=(when, when))

    write(pki["stranger_client"].cert, pki["stranger_client"].key)
    tls = ClientTls(str(pki["ca"].cert), str(cert), str(key), ENGINE_NAME)

    async def outcome(call) -> str:
        try:
            await call()
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    async def steps(call) -> list[str]:
        seen = [await outcome(call)]
        write(pki["client"].cert, pki["stranger_client"].key)  # half-written: the new certificate, the old key
        seen += [await outcome(call), await outcome(call)]
        write(pki["client"].cert, pki["client"].key)
        seen.append(await outcome(call))
        return seen

    async def main() -> list[str]:
        if kind == "async_text":
            async with AsyncTextClient(mtls_engine.target, timeout=5, tls=tls) as client:
                return await steps(client.model_info)
        with (EngineClient if kind == "engine" else TextClient)(mtls_engine.target, timeout=5, tls=tls) as client:
            async def call() -> object:
                return client.model_info()
            return await steps(call)

    with caplog.at_level(logging.WARNING, logger="clients.channel"):
        seen = asyncio.run(main())
    reached = "OK" if kind == "engine" else "UNIMPLEMENTED"  # the engine does not serve the text API
    assert seen == ["UNAVAILABLE"] * 3 + [reached]
    warnings = [r.getMessage() for r in caplog.records if r.name == "clients.channel"]
    assert len(warnings) == 1 and "is not the private key of the certificate" in warnings[0], warnings


def test_a_stream_in_flight_keeps_its_channel_when_the_files_rotate(pki, mtls_engine, tmp_path):
    """New calls go on a channel made from the new files; a stream already open finishes on the old one."""
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    pki["ca"].issue("client", cert=cert, key=key)
    with EngineClient(mtls_engine.target, timeout=20, tls=ClientTls(str(pki["ca"].cert), str(cert), str(key),
                                                                      ENGINE_NAME)) as client:
        wait_serving(client)
        stream = client.generate([1, 2, 3], max_tokens=40, ignore_eos=True)
        first = next(stream)
        old = client._channel
        pki["ca"].issue("client", cert=cert, key=key)  # rotated
        assert client.model_info().model_name == "fake"
        assert client._channel is not old
        updates = [first, *stream]
    assert sum(len(u.new_token_ids) for u in updates) == 40 and updates[-1].finish_reason


def test_a_client_warns_once_of_a_certificate_near_its_end(pki, tmp_path, caplog):
    """The constructor and the channel both read the files, and each warned."""
    import datetime

    pair = pki["ca"].issue("brief", valid=(-datetime.timedelta(minutes=5), datetime.timedelta(hours=1)))
    with caplog.at_level(logging.WARNING, logger="clients.tls"):
        EngineClient("127.0.0.1:1", tls=ClientTls(str(pki["ca"].cert), str(pair.cert), str(pair.key))).close()
    soon = [r.getMessage() for r in caplog.records if "within a day" in r.getMessage()]
    assert len(soon) == 1 and str(pair.cert) in soon[0], soon


def test_touching_the_tls_files_without_changing_them_keeps_the_channel(pki, mtls_engine, tmp_path):
    """The stamp moves on a chmod or a Secret written again with the same bytes: that is no rotation, and each
    one made (and kept) another channel."""
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(pki["client"].cert.read_bytes())
    key.write_bytes(pki["client"].key.read_bytes())
    tls = ClientTls(str(pki["ca"].cert), str(cert), str(key), ENGINE_NAME)
    with EngineClient(mtls_engine.target, timeout=5, tls=tls) as client:
        for second, mode in enumerate((0o600, 0o644, 0o600), start=1):
            cert.chmod(mode)
            key.write_bytes(key.read_bytes())
            for path in (cert, key):  # a second apart each time: the stamps surely move
                os.utime(path, ns=((1_700_000_000 + second) * 10**9,) * 2)
            client.model_info()
        assert client._channels.retired == []
        key.write_bytes(pki["stranger_client"].key.read_bytes())  # a real change (another CA's pair)
        cert.write_bytes(pki["stranger_client"].cert.read_bytes())
        os.utime(cert, ns=((1_700_000_010 * 10**9),) * 2)
        client.stub  # noqa: B018 -- the next call's stub: made on a new channel
        assert len(client._channels.retired) == 1


def test_the_expiry_gauge_follows_files_renewed_before_any_handshake(tmp_path):
    """An engine whose callers hold their connections open may see no handshake for weeks: the gauge kept the old
    certificate's date after cert-manager renewed the files, and the alert on it fired for nothing."""
    import datetime

    ca = CA(tmp_path / "ca", "test-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(ENGINE_NAME, ENGINE_NAME, cert=cert, key=key, valid=(-datetime.timedelta(minutes=5),
                                                                  datetime.timedelta(days=2)))
    tls = ServerTls(str(cert), str(key))
    tls.credentials()  # served from now on
    old = tls.expiry()
    assert old == not_after(cert)
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    ca.issue(ENGINE_NAME, ENGINE_NAME, cert=renewed / "tls.crt", key=renewed / "tls.key",
             valid=(-datetime.timedelta(minutes=5), datetime.timedelta(days=30)))
    key.write_bytes((renewed / "tls.key").read_bytes())  # half-written: the old certificate, the new key
    os.utime(key, ns=(1_700_000_000 * 10**9,) * 2)
    assert tls.expiry() == old  # the next handshake would keep the current pair too
    cert.write_bytes((renewed / "tls.crt").read_bytes())
    assert tls.expiry() == not_after(cert) > old + 86_400


def test_a_closed_client_makes_no_channel_when_its_files_rotate(pki, tmp_path):
    """After close(), a rotation made a new channel on the closed client: calls went out again, and nothing ever
    closed it."""
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(pki["client"].cert.read_bytes())
    key.write_bytes(pki["client"].key.read_bytes())
    client = EngineClient(f"127.0.0.1:{free_port()}", timeout=1, tls=ClientTls(str(pki["ca"].cert), str(cert),
                                                                               str(key), ENGINE_NAME))
    client.close()
    cert.write_bytes(pki["stranger_client"].cert.read_bytes())
    key.write_bytes(pki["stranger_client"].key.read_bytes())
    os.utime(cert, ns=(1_700_000_000 * 10**9,) * 2)
    with pytest.raises(ValueError, match="closed channel"):
        client.model_info()
    assert client._channels.retired == []


def test_the_cli_names_tls_server_name_when_the_certificate_names_another_host():
    """llm-client's hint for a certificate that does not name the target said only to check --tls-ca; and a
    tokenizer service quoting its own failed dial to an engine got the hints meant for an unreachable --target."""
    from clients.cli import connect_hint

    class Refused(grpc.RpcError):
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return self._details

    tls = ClientTls.__new__(ClientTls)
    object.__setattr__(tls, "server_name", "")
    wrong_name = Refused("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5: Tls handshake "
                         "failed (TSI_PROTOCOL_FAILURE): Hostname Verification Check failed.")
    assert "give --tls-server-name a name it holds" in connect_hint(wrong_name, tls)
    assert "--tls-server-name" not in connect_hint(Refused("failed to connect: Socket closed"), tls)
    assert "is the service up?" in connect_hint(Refused("failed to connect: Socket closed"), None)
    # The tokenizer service is up and says it has no engine, quoting its own failed dial: no hint about --target.
    no_engine = Refused("no engine is connected (waited 1.0s); engines: 127.0.0.1:1: not reached (failed to connect "
                        "to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused)")
    assert connect_hint(no_engine, None) == connect_hint(no_engine, tls) == ""


def test_durations_past_what_grpc_options_hold_are_its_limit():
    """A keepalive or connection age of 30 days passed the config, then grpc.aio.server raised OverflowError at
    start-up: gRPC's duration options are milliseconds in a C int (24.8 days)."""
    from clients.tls import UNLIMITED_MS, keepalive_options, shared_server_options

    month = 30 * 86400

    async def main() -> None:
        for options in (shared_server_options(month, 10), keepalive_options(month, month)):
            assert all(value <= UNLIMITED_MS for _, value in options if isinstance(value, int)), options
            server = grpc.aio.server(options=options)
            server.add_insecure_port("127.0.0.1:0")
            await server.start()
            await server.stop(None)

    asyncio.run(main())


def test_reading_a_ca_file_writes_nothing(pki, monkeypatch, tmp_path):
    """The CA date check wrote each certificate to a temporary file: with no writable temporary directory (a full
    /tmp, a read-only root) start-up ended in FileNotFoundError, and an engine connection's task died for good."""
    import tempfile

    from clients.tls import read_ca

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    assert read_ca(str(pki["ca"].cert)) == pki["ca"].cert.read_bytes()
    ClientTls(ca_file=str(pki["ca"].cert))
