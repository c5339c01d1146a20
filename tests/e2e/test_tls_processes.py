"""Both services and llm-client as real processes with mutual TLS on both hops, set by their command-line flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, start_engine, start_tokenizer
from tests.pki import CA
from tests.support import free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(demo_model, tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    ca = CA(pki, "e2e-ca")
    engine_pair, text_pair, client = ca.issue("engine", "127.0.0.1"), ca.issue("text", "127.0.0.1"), ca.issue("me")
    engine = start_engine(demo_model, health_port=free_port(), extra=[
        "--tls-cert", str(engine_pair.cert), "--tls-key", str(engine_pair.key), "--tls-client-ca", str(ca.cert)])
    text = None
    try:
        engine.wait_serving()
        text = start_tokenizer(demo_model, [engine], health_port=free_port(), extra=[
            "--tls-cert", str(text_pair.cert), "--tls-key", str(text_pair.key), "--tls-client-ca", str(ca.cert),
            "--engine-tls-ca", str(ca.cert), "--engine-tls-cert", str(text_pair.cert),
            "--engine-tls-key", str(text_pair.key)])
        text.wait_serving()  # SERVING: its mutual-TLS stream to the engine is up
        yield dict(text=text, ca=ca, client=client)
    finally:
        for service in (text, engine):
            if service is not None:
                assert service.stop() == 0, service.log.read_text()[-2000:]


def llm_client(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients.cli", "--target", target, "--max-tokens", "8",
                           "--usage", "--timeout", "30", *flags, "Once upon a time"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_llm_client_streams_through_mutual_tls_on_both_hops(stack):
    ca, client = stack["ca"], stack["client"]
    done = llm_client(stack["text"].target, "--tls-ca", str(ca.cert), "--tls-cert", str(client.cert),
                      "--tls-key", str(client.key))
    assert done.returncode == 0, done.stderr
    assert "completion_tokens=8" in done.stderr and done.stdout.strip()


def test_llm_client_without_a_certificate_is_refused_and_told_what_to_check(stack):
    without_cert = llm_client(stack["text"].target, "--tls-ca", str(stack["ca"].cert))
    assert without_cert.returncode == 1 and "UNAVAILABLE" in without_cert.stderr
    assert "--tls-cert/--tls-key are from its client CA" in without_cert.stderr
    plaintext = llm_client(stack["text"].target)
    assert plaintext.returncode == 1 and "If it serves TLS, give --tls-ca" in plaintext.stderr
