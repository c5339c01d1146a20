"""Deployment and client-library failure modes other inference servers shipped, checked against our manifests, the
services' settings parser and the Python clients (on in-process fake services)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent import futures

import grpc
import pytest

from clients.channel import DEFAULT_MAX_MESSAGE_BYTES
from clients.engine_client import EngineClient
from clients.flags import warn_unknown
from clients.text_client import AsyncTextClient, TextClient
from engine_service import server_config as engine_cfg
from protos.llmserve.engine.v1 import engine_pb2 as epb
from protos.llmserve.engine.v1 import engine_pb2_grpc as epb_grpc
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
from tests.unit.test_deploy import ENGINE, OVERLAYS, TOKENIZER, container, one, render
from tokenizer_service import config as tokenizer_cfg

pytestmark = pytest.mark.timeout(60)


class _Fakes(pb_grpc.TextGenerationServicer, epb_grpc.EngineServicer):
    """A text service and an engine whose streams run until the client ends them; `cancelled` is set when one is."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def _endless(self, context, response):
        context.add_callback(self.cancelled.set)
        while context.is_active():
            yield response
            time.sleep(0.01)

    def Generate(self, request, context):
        yield from self._endless(context, pb.GenerateResponse(text="x"))

    def GenerateStream(self, request, context):
        yield from self._endless(context, epb.RequestUpdate(request_id=request.request_id, new_token_ids=[7]))

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name="fake")


@pytest.fixture(scope="module")
def fake_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    fakes = _Fakes()
    pb_grpc.add_TextGenerationServicer_to_server(fakes, server)
    epb_grpc.add_EngineServicer_to_server(fakes, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fakes, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def fake(fake_server):
    fake_server[0].cancelled.clear()
    return fake_server


def default(cls, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# ---------------------------------------------------------------------------------------------------------
# The asyncio client and event loops


def test_an_async_client_made_outside_any_event_loop_serves_the_loop_of_its_first_call(fake):
    """A grpc.aio channel made before asyncio.run() belongs to another loop: every call failed with 'attached to a
    different loop' (a client made at import time, as applications keep them)."""
    _, target = fake
    client = AsyncTextClient(target, timeout=10)

    async def use() -> tuple[str, str]:
        async with client:
            info = await client.model_info()
            async with client.generate("hi") as stream:
                first = await stream.__anext__()
            return info.model_name, first.text

    assert asyncio.run(use()) == ("fake", "x")


def test_an_async_client_called_from_a_second_event_loop_says_so(fake):
    """A client kept from one asyncio.run() to the next failed with 'Event loop is closed' (or 'attached to a
    different loop'), naming neither the client nor the rule; closing it from the second loop must not fail."""
    _, target = fake
    made: list[AsyncTextClient] = []

    async def first() -> str:
        made.append(AsyncTextClient(target, timeout=10))
        return (await made[0].model_info()).model_name

    async def second() -> None:
        with pytest.raises(RuntimeError, match="another event loop.*one AsyncTextClient per event loop"):
            await made[0].model_info()
        await made[0].close()

    assert asyncio.run(first()) == "fake"
    asyncio.run(second())


def test_closing_an_async_client_from_a_second_loop_while_its_own_runs_leaves_it_whole(fake):
    """close() from another event loop, while the client's own was still open, marked the client closed and then
    raised: its channels were never closed, and it refused every later call. It now refuses before changing
    anything; the client goes on in its own loop and closes there."""
    _, target = fake
    own = asyncio.new_event_loop()
    try:
        client = AsyncTextClient(target, timeout=10)
        assert own.run_until_complete(client.model_info()).model_name == "fake"
        with pytest.raises(RuntimeError, match="closed in another event loop"):
            asyncio.run(client.close())
        assert own.run_until_complete(client.model_info()).model_name == "fake"
        own.run_until_complete(client.close())
        with pytest.raises(ValueError, match="closed"):
            own.run_until_complete(client.model_info())
    finally:
        own.close()


def test_an_async_client_made_outside_a_loop_and_never_used_closes_cleanly():
    client = AsyncTextClient("127.0.0.1:1", timeout=1)
    asyncio.run(client.close())
    with pytest.raises(ValueError, match="closed"):
        asyncio.run(client.model_info())


# ---------------------------------------------------------------------------------------------------------
# Abandoned streams


def test_breaking_out_of_a_blocking_stream_cancels_the_call(fake):
    """A streaming iterator left unfinished kept the request generating server-side (vLLM and TGI clients leaked
    requests so); the blocking client must cancel it once nothing refers to the stream."""
    fakes, target = fake
    with TextClient(target, timeout=10) as client:
        for chunk in client.generate("hi"):
            assert chunk.text == "x"
            break
        assert fakes.cancelled.wait(5), "the service's call was left running after the loop was left"


def test_an_engine_client_stream_dropped_unfinished_cancels_the_call(fake):
    fakes, target = fake
    with EngineClient(target, timeout=10) as client:
        stream = client.generate([1, 2, 3], "r1", max_tokens=100)
        assert list(next(stream).new_token_ids) == [7]
        del stream
        assert fakes.cancelled.wait(5), "the engine's call was left running after its stream was dropped"


# ---------------------------------------------------------------------------------------------------------
# Settings from the environment


def test_a_misspelt_setting_variable_is_warned_of_naming_the_closest_flag(caplog):
    """A typo in a manifest (ENGINE_MAX_NUM_SEQ for ENGINE_MAX_NUM_SEQS) left the default in force without a word;
    vLLM warns of unknown VLLM_* variables for the same reason."""
    env = {"ENGINE_MODEL": "/m", "ENGINE_MAX_NUM_SEQ": "16", "ENGINE_MAX_NUM_SEQS": "32", "ENGINE_GRACE": "5"}
    config = engine_cfg.parse_config([], env)
    with caplog.at_level(logging.WARNING, logger="clients.flags"):
        warn_unknown(engine_cfg.ServerConfig, engine_cfg.ENV_PREFIX, "engine-service", env)
    assert config.max_num_seqs == 32 and config.grace_s == default(engine_cfg.ServerConfig, "grace_s")
    warned = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(warned) == 2, warned
    assert "ENGINE_GRACE " in warned[0] and "did you mean ENGINE_GRACE_S" in warned[0]
    assert "ENGINE_MAX_NUM_SEQ " in warned[1] and "did you mean ENGINE_MAX_NUM_SEQS" in warned[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clients.flags"):
        warn_unknown(tokenizer_cfg.TextServerConfig, tokenizer_cfg.ENV_PREFIX, "tokenizer-service",
                     {"TOKENIZER_MODEL": "/m", "TOKENIZER_ENGINES": "e:1", "TOKENIZER_ENGINE_DSN": "llm-engine:50051"})
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable TOKENIZER_ENGINE_DSN is not a setting of tokenizer-service and is ignored; did you "
        "mean TOKENIZER_ENGINE_DNS?"]


def service_link_env(name: str, cluster_ip: str, port: int) -> dict[str, str]:
    """The variables Kubernetes gives every pod of the namespace for a Service (enableServiceLinks, on by default)."""
    n = name.upper().replace("-", "_")
    return {f"{n}_SERVICE_HOST": cluster_ip, f"{n}_SERVICE_PORT": str(port), f"{n}_SERVICE_PORT_GRPC": str(port),
            f"{n}_PORT": f"tcp://{cluster_ip}:{port}", f"{n}_PORT_{port}_TCP": f"tcp://{cluster_ip}:{port}",
            f"{n}_PORT_{port}_TCP_PROTO": "tcp", f"{n}_PORT_{port}_TCP_PORT": str(port),
            f"{n}_PORT_{port}_TCP_ADDR": cluster_ip}


@pytest.mark.parametrize("service, module, base", [
    ("engine", engine_cfg, {"ENGINE_MODEL": "/m"}),
    ("engine-health", engine_cfg, {"ENGINE_MODEL": "/m"}),
    ("tokenizer", tokenizer_cfg, {"TOKENIZER_MODEL": "/m", "TOKENIZER_ENGINES": "e:1"}),
])
def test_a_service_link_where_a_port_belongs_names_enable_service_links(service, module, base):
    """A Kubernetes Service named like a setting's prefix (vLLM: a Service named vllm set VLLM_PORT=tcp://...) made the
    service stop at start with only "invalid literal for int()"."""
    with pytest.raises(ValueError, match=rf"Service named '{service}'.*enableServiceLinks: false"):
        module.parse_config([], {**base, **service_link_env(service, "10.96.0.7", 50051)})


def test_service_link_variables_of_other_services_are_not_taken_for_typos(caplog):
    env = {"ENGINE_MODEL": "/m", "ENGINE_TEST_FAIL_AFTER_STEPS": "3",  # a test hook the engine reads itself
           **service_link_env("engine-gateway", "10.96.0.9", 8080)}
    config = engine_cfg.parse_config([], env)
    with caplog.at_level(logging.WARNING, logger="clients.flags"):
        warn_unknown(engine_cfg.ServerConfig, engine_cfg.ENV_PREFIX, "engine-service", env)
    assert config.port == default(engine_cfg.ServerConfig, "port")
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("service", ["engine_service.server", "tokenizer_service.server"])
def test_the_services_warn_of_unknown_variables_once_their_logging_is_configured(monkeypatch, service):
    """Warned while the settings were parsed, before the service configured its logging, the line went out through
    logging's last resort: plain text among --log-format json lines, whatever --log-level said."""
    import importlib

    module = importlib.import_module(service)
    calls: list[str] = []
    monkeypatch.setattr(module, "configure_logging", lambda *a: calls.append("configure_logging"))
    monkeypatch.setattr(module, "warn_unknown", lambda *a: calls.append("warn_unknown"))
    monkeypatch.setattr(module, "hold", lambda: None)
    # The engine's main() ends with os._exit while an engine thread lives (a stuck step): another test's engine
    # thread still winding down in this process must not end the test run.
    monkeypatch.setattr(threading, "enumerate", lambda: [])

    async def serve(config):
        calls.append("serve")
        return 0

    monkeypatch.setattr(module, "serve", serve)
    try:
        module.main(["--model", "/m", *(["--engines", "e:1"] if service.startswith("tokenizer") else [])])
    except SystemExit as exc:
        assert exc.code == 0
    assert calls == ["configure_logging", "warn_unknown", "serve"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def test_manifests_give_no_service_links_to_the_services(rendered):
    """Any Service later added to the namespace under a name like `engine` would set ENGINE_PORT in every pod."""
    for overlay, objs in rendered.items():
        for name in (ENGINE, TOKENIZER):
            pod = one(objs, "Deployment", name)["spec"]["template"]["spec"]
            assert pod.get("enableServiceLinks") is False, f"{overlay}/{name}: service links are on"
            assert "command" not in container(one(objs, "Deployment", name))


def test_tokenizer_connections_behind_its_cluster_ip_age_out(rendered):
    """A ClusterIP balances connections, not calls: clients' long-lived gRPC channels stayed on the pods they first
    reached, and pods the autoscaler added got no traffic. The tokenizer must GOAWAY old connections (never the
    engines, whose callers dial every pod through the headless Service)."""
    from tests.unit.test_deploy import effective_config

    for overlay, objs in rendered.items():
        service = one(objs, "Service", TOKENIZER)["spec"]
        assert service.get("clusterIP") != "None" and one(objs, "HorizontalPodAutoscaler", TOKENIZER)
        assert effective_config(objs, TOKENIZER).max_connection_age_s > 0, overlay
        assert effective_config(objs, ENGINE).max_connection_age_s == 0, overlay


# ---------------------------------------------------------------------------------------------------------
# Channel limits against the services'


def test_the_clients_message_limit_takes_what_the_services_send():
    """Triton's and others' clients kept gRPC's 4 MiB receive limit while their servers sent more: large responses
    failed RESOURCE_EXHAUSTED on the client. Ours must take at least what either service may send by default."""
    for cls in (engine_cfg.ServerConfig, tokenizer_cfg.TextServerConfig):
        assert DEFAULT_MAX_MESSAGE_BYTES >= default(cls, "max_message_bytes"), cls.__name__


def test_each_overlays_tokenizer_takes_the_messages_its_engines_may_send(rendered):
    """The tokenizer's receive limit is its own max_message_bytes: an engine allowed larger frames (a raised
    ENGINE_MAX_MESSAGE_BYTES alone) would fail requests with RESOURCE_EXHAUSTED at the tokenizer."""
    from tests.unit.test_deploy import effective_config

    for overlay, objs in rendered.items():
        engine, text = effective_config(objs, ENGINE), effective_config(objs, TOKENIZER)
        assert text.max_message_bytes >= engine.max_message_bytes, overlay


@pytest.mark.parametrize("setting, value", [("max_message_bytes", 0), ("max_message_bytes", -5),
                                            ("max_message_bytes", 1.5), ("keepalive_time_s", 0),
                                            ("keepalive_time_s", -1), ("keepalive_time_s", float("nan"))])
def test_channel_settings_that_cannot_work_are_refused_naming_them(setting, value):
    """A receive limit of 0 refused every response (RESOURCE_EXHAUSTED at the first token), a keepalive of 0 or less
    went to gRPC as is, and NaN failed with only "cannot convert float NaN to integer"."""
    with pytest.raises(ValueError, match=setting):
        TextClient("127.0.0.1:1", timeout=1, **{setting: value})
    with TextClient("127.0.0.1:1", timeout=1, max_message_bytes=-1, keepalive_time_s=0.5) as client:
        assert client._channel is not None
