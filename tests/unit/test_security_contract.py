"""docs/SECURITY.md read as an operator deploying with TLS or mutual TLS reads it: each test holds one of its
concrete statements to the code (clients/tls.py, the services' settings, the mtls overlay), where no other test
did. In-process, with throwaway CAs (tests/pki.py); the docstrings quote the statement."""

from __future__ import annotations

import argparse
import ast
import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2

from clients.tls import ClientTls, ServerTls, certificate_dates
from engine_service.server_config import parse_config as parse_engine_config
from tests.pki import CA
from tests.unit.test_tls import health_over, tls_health_server
from tokenizer_service.config import TextServerConfig

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "SECURITY.md").read_text()
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "mtls"
SERVING = health_pb2.HealthCheckResponse.SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NAME = "engine.test"  # the name in the servers' certificates; the tests dial 127.0.0.1


async def stderr_until(capfd, pattern: str, wait: bool, timeout_s: float = 10.0) -> str:
    """What the process wrote to stderr since the last read: gRPC's C core logs from its own threads, so where a
    line is expected (wait) it is read again until `pattern` shows or timeout_s passes, rather than once."""
    err = capfd.readouterr().err
    deadline = time.monotonic() + timeout_s
    while wait and not re.search(pattern, err) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        err += capfd.readouterr().err
    return err


def overlay_env(config_map: str) -> dict[str, str]:
    """The literals the mtls overlay merges into a service's ConfigMap (VAR=value)."""
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    for generator in kustomization["configMapGenerator"]:
        if generator["name"] == config_map:
            return dict(literal.split("=", 1) for literal in generator["literals"])
    raise AssertionError(f"the mtls overlay merges nothing into {config_map}")


def test_the_start_up_refusal_the_doc_quotes_is_the_one_a_pod_without_its_secret_prints():
    """'Settings that cannot work are refused at start-up, with a message that names the settings and the file',
    followed by the line an operator greps for. The doc's line had lost the '(set by ...)' the services append
    naming where each setting came from; here it is the engine of the mtls overlay, started before its Secret's
    files are there, printing what engine_service.server.main prints (f"engine-service: {exc}")."""
    quoted = re.search(r"```\n(engine-service: TLS [^\n]*)\n```", DOC)
    assert quoted, "docs/SECURITY.md quotes no engine-service TLS refusal in a block of its own"
    env = overlay_env("llm-engine-config")
    assert not Path(env["ENGINE_TLS_KEY"]).exists()  # the Secret's mount path, absent on a test machine
    with pytest.raises(ValueError) as refused:
        parse_engine_config(["--model", "m"], env=env)
    assert f"engine-service: {refused.value}" == quoted.group(1)


def test_an_rsa_key_under_2048_bits_is_refused_and_2048_is_taken(tmp_path):
    """'RSA (2048 bits or more) or ECDSA on P-256 or P-384 only': a 1024-bit RSA key is refused at start-up with a
    message naming the file and what to issue instead, on the server side and for a client certificate."""
    ca = CA(tmp_path / "ca", "test-ca")
    small = ca.issue("small", "localhost", leaf_key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    for make, args in ((ServerTls, (str(small.cert), str(small.key))),
                       (ClientTls, (str(ca.cert), str(small.cert), str(small.key)))):
        with pytest.raises(ValueError, match=r"small.key' is too small.*issue an RSA key of 2048 bits or more"):
            make(*args)
    enough = ca.issue("enough", "localhost", leaf_key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ServerTls(str(enough.cert), str(enough.key))


def test_a_refused_caller_sees_unavailable_and_the_server_logs_the_failed_handshake(tmp_path, capfd):
    """'A caller without one, or with one from another CA, is refused during the handshake, before any request is
    read. The caller sees UNAVAILABLE, and the server logs the failed handshake.' The log is gRPC's own, on
    stderr at its default verbosity (GRPC_VERBOSITY=ERROR hides it), naming why."""
    ca, stranger = CA(tmp_path / "ca", "test-ca"), CA(tmp_path / "stranger", "stranger-ca")
    pair, member, outsider = ca.issue(NAME, NAME), ca.issue("member"), stranger.issue("outsider")
    callers = {"member": ClientTls(str(ca.cert), str(member.cert), str(member.key), NAME),
               "anonymous": ClientTls(str(ca.cert), server_name=NAME),
               "outsider": ClientTls(str(ca.cert), str(outsider.cert), str(outsider.key), NAME)}

    logged = os.environ.get("GRPC_VERBOSITY", "").upper() not in ("ERROR", "NONE")  # the doc's exception

    async def main() -> dict[str, object]:
        server, target = await tls_health_server(ServerTls(str(pair.cert), str(pair.key), str(ca.cert)))
        try:
            seen = {}
            for who, tls in callers.items():
                capfd.readouterr()
                status = await health_over(target, tls)
                seen[who] = (status, await stderr_until(capfd, "Handshake failed", logged and status != SERVING))
            return seen
        finally:
            await server.stop(None)

    seen = asyncio.run(main())
    assert seen["member"][0] == SERVING and "Handshake failed" not in seen["member"][1]
    assert seen["anonymous"][0] == UNAVAILABLE and bool(re.search(
        r"Handshake failed .*PEER_DID_NOT_RETURN_A_CERTIFICATE", seen["anonymous"][1])) == logged, seen["anonymous"]
    assert seen["outsider"][0] == UNAVAILABLE and bool(re.search(
        r"Handshake failed .*CERTIFICATE_VERIFY_FAILED", seen["outsider"][1])) == logged, seen["outsider"]


def test_a_certificate_holding_its_chain_leaf_first_is_served_whole(tmp_path):
    """'Certificates may hold a chain, leaf first': a leaf signed by an intermediate, served with the
    intermediate after it, verifies against the root alone; the expiry watched is the leaf's."""
    root, intermediate = CA(tmp_path / "root", "root-ca"), CA(tmp_path / "inter", "inter-ca")
    intermediate.cert.write_bytes(root._sign("inter-ca", intermediate._key, ca=True, sans=()))
    leaf = intermediate.issue(NAME, NAME)
    chain = tmp_path / "chain.crt"
    chain.write_bytes(leaf.cert.read_bytes() + intermediate.cert.read_bytes())
    served = ServerTls(str(chain), str(leaf.key))
    assert served.expiry() == certificate_dates(str(leaf.cert))[1]

    async def main() -> list[object]:
        seen = []
        for cert in (chain, leaf.cert):  # the leaf alone: the root cannot verify it
            server, target = await tls_health_server(ServerTls(str(cert), str(leaf.key)))
            try:
                seen.append(await health_over(target, ClientTls(str(root.cert), server_name=NAME)))
            finally:
                await server.stop(None)
        return seen

    assert asyncio.run(main()) == [SERVING, UNAVAILABLE]


def test_a_half_written_client_ca_keeps_the_current_one_with_a_warning(tmp_path, caplog):
    """'A change that does not load keeps the current certificate, and a warning is logged. That covers a
    half-written file (the CA's included)': the clients the old CA signed still get in, and the whole file, once
    written, is taken on the next handshake."""
    server_ca, old, new = CA(tmp_path / "s", "server-ca"), CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new")
    pair = server_ca.issue(NAME, NAME)
    client_ca = tmp_path / "ca.crt"
    client_ca.write_bytes(old.cert.read_bytes())
    old_caller, new_caller = (ClientTls(str(server_ca.cert), str(c.cert), str(c.key), NAME)
                              for c in (old.issue("caller"), new.issue("caller")))

    async def main() -> list[object]:
        server, target = await tls_health_server(ServerTls(str(pair.cert), str(pair.key), str(client_ca)))
        try:
            whole = new.cert.read_bytes()
            client_ca.write_bytes(whole[: len(whole) // 2])
            seen = [await health_over(target, old_caller), await health_over(target, new_caller)]
            client_ca.write_bytes(whole)
            return seen + [await health_over(target, old_caller), await health_over(target, new_caller)]
        finally:
            await server.stop(None)

    with caplog.at_level(logging.INFO, logger="clients.tls"):
        assert asyncio.run(main()) == [SERVING, UNAVAILABLE, UNAVAILABLE, SERVING]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ca.crt' holds no usable CA certificate" in warnings[0], warnings
    assert "keeping the current certificate" in warnings[0]


def test_no_refusal_or_warning_quotes_a_key(tmp_path, caplog):
    """A key's bytes are never logged: the refusals at start-up and the warnings of a rotation that does not load
    name the file and what is wrong with it, not its contents, for a damaged, mismatched or encrypted key."""
    ca = CA(tmp_path / "ca", "test-ca")
    pair, other = ca.issue(NAME, NAME), ca.issue("other", NAME)
    locked = ca.issue("locked", NAME, passphrase=b"secret")
    good_key = pair.key.read_bytes()
    body_lines = [line for line in good_key.decode().splitlines() + other.key.read_text().splitlines()
                  + locked.key.read_text().splitlines() if line and not line.startswith("-----")]
    damaged = tmp_path / "damaged.key"
    damaged.write_bytes(good_key[:60] + b"!!" + good_key[62:])
    said = []
    for cert, key in ((pair.cert, damaged), (pair.cert, other.key), (locked.cert, locked.key)):
        for make, args in ((ServerTls, (str(cert), str(key))), (ClientTls, (str(ca.cert), str(cert), str(key)))):
            with pytest.raises(ValueError) as refused:
                make(*args)
            said.append(str(refused.value))

    async def rotate() -> None:
        server, target = await tls_health_server(ServerTls(str(pair.cert), str(pair.key)))
        try:
            for bad in (damaged.read_bytes(), other.key.read_bytes()):
                # A new file renamed over the key (a new inode): an in-place write of the same size within one
                # timestamp tick of the last could go unnoticed by the change check, (inode, mtime, ctime, size).
                staged = pair.key.with_suffix(".new")
                staged.write_bytes(bad)
                os.replace(staged, pair.key)
                await health_over(target, ClientTls(str(ca.cert), server_name=NAME))
        finally:
            await server.stop(None)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(rotate())
    said += [r.getMessage() for r in caplog.records]
    assert len([s for s in said if "keeping the current certificate" in s]) == 2, said
    leaked = [s for s in said if any(line in s for line in body_lines) or "secret" in s]
    assert not leaked, leaked


def test_the_engine_name_checked_defaults_to_engine_dns_else_each_address(tmp_path):
    """'--engine-tls-server-name: the name to check in an engine's certificate. Default: the host of --engine-dns
    (llm-engine), else the host of each --engines address': with --engines, no name is set, so gRPC checks each
    address's own host."""
    ca = CA(tmp_path / "ca", "test-ca")
    by_dns = TextServerConfig(model="m", engine_dns="llm-engine:50051", engine_tls_ca=str(ca.cert)).engine_tls
    assert by_dns.server_name == "llm-engine"
    assert by_dns.options() == [("grpc.ssl_target_name_override", "llm-engine")]
    by_address = TextServerConfig(model="m", engines="engine-a:50051,engine-b:50051", engine_tls_ca=str(ca.cert))
    assert by_address.engine_tls.server_name == "" and by_address.engine_tls.options() == []


def test_a_certificate_without_the_engine_services_name_fails_with_the_message_the_doc_quotes(tmp_path, capfd):
    """'The certificates must name the Services the other side dials: the try-out's localhost ones do not do in a
    cluster (the tokenizer checks the name llm-engine, and its handshake fails with "No match found for server
    name: llm-engine", so it never turns ready)'. The name checked is the overlay's TOKENIZER_ENGINE_DNS host."""
    base = (ROOT / "deploy" / "k8s" / "base" / "tokenizer.env").read_text()  # the overlay keeps the base's
    host = re.search(r"^TOKENIZER_ENGINE_DNS=(.*):\d+$", base, re.M).group(1)
    assert "TOKENIZER_ENGINE_DNS" not in overlay_env("llm-tokenizer-config")
    assert f'"No match found for server name: {host}"' in DOC.replace("\n", " ")
    ca = CA(tmp_path / "ca", "test-ca")
    try_out, in_cluster = ca.issue("try-out", "localhost", "127.0.0.1"), ca.issue("cluster", host, "localhost")
    dialer = TextServerConfig(model="m", engine_dns=f"{host}:50051", engine_tls_ca=str(ca.cert)).engine_tls

    async def main() -> list[tuple[object, str]]:
        seen = []
        for pair in (try_out, in_cluster):
            server, target = await tls_health_server(ServerTls(str(pair.cert), str(pair.key)))
            try:
                capfd.readouterr()
                status = await health_over(target, dialer)
                seen.append((status, await stderr_until(capfd, "No match found", status != SERVING)))
            finally:
                await server.stop(None)
        return seen

    (refused, said), (taken, _) = asyncio.run(main())
    assert refused == UNAVAILABLE and f"No match found for server name: {host}" in said, said
    assert taken == SERVING


def test_a_secret_rotated_the_way_the_kubelet_does_it_is_served_from_the_next_handshake(tmp_path):
    """'A Kubernetes Secret updated by cert-manager is picked up this way': the kubelet writes the new files into a
    new directory and swaps the ..data symlink the file names point through, so the files named never change
    themselves; the service reads the new pair on the next handshake."""
    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    mount = tmp_path / "tls"
    mount.mkdir()

    def publish(ca: CA, version: str) -> None:  # as the kubelet's atomic writer does
        directory = mount / version
        directory.mkdir()
        ca.issue(NAME, NAME, cert=directory / "tls.crt", key=directory / "tls.key")
        (directory / "ca.crt").write_bytes(ca.cert.read_bytes())
        (mount / "..data_tmp").symlink_to(version)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish(old_ca, "..2026_01_01")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (mount / name).symlink_to(f"..data/{name}")
    trusts_old, trusts_new = (ClientTls(str(ca.cert), server_name=NAME) for ca in (old_ca, new_ca))

    async def main() -> list[object]:
        server, target = await tls_health_server(ServerTls(str(mount / "tls.crt"), str(mount / "tls.key")))
        try:
            seen = [await health_over(target, trusts_old)]
            publish(new_ca, "..2026_02_01")
            return seen + [await health_over(target, trusts_new), await health_over(target, trusts_old)]
        finally:
            await server.stop(None)

    assert asyncio.run(main()) == [SERVING, SERVING, UNAVAILABLE]


def test_the_tls_module_imports_only_grpc_its_health_package_and_the_standard_library():
    """'The code is clients/tls.py, shared by both services and the clients (it imports only grpc and its health
    package)': neither service's package, so that neither imports the other through it."""
    tree = ast.parse((ROOT / "clients" / "tls.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported - set(sys.stdlib_module_names) == {"grpc", "grpc_health"}, imported
    assert "it imports only grpc and its health package" in " ".join(DOC.split())


ROOTS_PROBE = """
import asyncio, sys
from clients.tls import ClientTls, ServerTls
from tests.unit.test_tls import health_over, tls_health_server

async def main():
    server, target = await tls_health_server(ServerTls(sys.argv[1], sys.argv[2]))
    try:
        print(await health_over(target, ClientTls("", server_name=sys.argv[3])))
    finally:
        await server.stop(None)

asyncio.run(main())
"""


def test_tls_without_a_ca_trusts_the_roots_grpc_ships_unless_told_the_systems(tmp_path):
    """`--tls` (ClientTls with ca_file=""): the doc said 'system roots', but grpcio trusts the roots it ships
    (grpc/_cython/_credentials/roots.pem) ahead of the machine's store: a private CA added to the system store was
    not trusted. The doc now says so, and how to trust the system's bundle (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, or
    --tls-ca naming it); the help of --tls says the same. gRPC reads these settings once per process, hence one
    subprocess per setting. GRPC_SYSTEM_SSL_ROOTS_DIR stands in for the machine's store here."""
    import subprocess

    from clients.tls import add_tls_arguments

    ca = CA(tmp_path / "ca", "private-ca")
    pair = ca.issue(NAME, NAME)
    store = tmp_path / "store"
    store.mkdir()
    (store / "private-ca.pem").write_bytes(ca.cert.read_bytes())
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}

    def status(**env: str) -> str:
        done = subprocess.run([sys.executable, "-c", ROOTS_PROBE, str(pair.cert), str(pair.key), NAME], cwd=ROOT,
                              env={**base, **env}, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert status(GRPC_SYSTEM_SSL_ROOTS_DIR=str(store)) == "StatusCode.UNAVAILABLE"  # not the machine's store
    assert status(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(ca.cert)) == str(SERVING)
    prose = " ".join(DOC.split())
    assert "system roots" not in prose and "the system's root certificates" not in prose
    assert "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/etc/ssl/certs/ca-certificates.crt" in prose
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    assert "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH" in " ".join(parser.format_help().split())


def test_the_docs_cert_manager_certificates_fit_the_overlay_and_its_mounts_follow_a_rotation():
    """The doc's cert-manager Certificates write the Secrets the mtls overlay mounts (llm-engine-tls for the
    engine, llm-tokenizer-tls for the tokenizer), name the engine Service the tokenizer checks, and give the
    tokenizer's certificate client auth (it is also the client certificate toward the engines). 'Kubernetes
    updates the mounted files when the Secret changes ... and the services reload them' holds only for a whole
    Secret volume: a subPath mount is never updated."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    certificates = {doc["spec"]["secretName"]: doc["spec"] for block in blocks for doc in yaml.safe_load_all(block)
                    if doc and doc.get("kind") == "Certificate"}
    mounted = {}
    for patch, container_name in (("engine-tls.yaml", "engine"), ("tokenizer-tls.yaml", "tokenizer")):
        pod = yaml.safe_load((OVERLAY / patch).read_text())["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == container_name]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/llmserve/tls"]
        assert "subPath" not in mount and mount["readOnly"], f"{patch}: a subPath mount never sees a rotation"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        mounted[container_name] = volume["secret"]["secretName"]
    assert mounted == {"engine": "llm-engine-tls", "tokenizer": "llm-tokenizer-tls"}
    assert set(certificates) == set(mounted.values()), certificates.keys()
    base = (ROOT / "deploy" / "k8s" / "base" / "tokenizer.env").read_text()
    engine_host = re.search(r"^TOKENIZER_ENGINE_DNS=(.*):\d+$", base, re.M).group(1)
    assert engine_host in certificates["llm-engine-tls"]["dnsNames"]
    assert "llm-tokenizer" in certificates["llm-tokenizer-tls"]["dnsNames"]
    for spec in certificates.values():
        assert {"server auth", "client auth"} <= set(spec["usages"]), spec
