"""The tokenizer service process: `tokenizer-service --model DIR --engines HOST:PORT[,...]`.

Every flag also reads a TOKENIZER_* variable. serve() wires the servicer, the engine pool, health, reflection,
TLS, limits and keepalive; SIGTERM drains (NOT_SERVING, GOAWAY so that clients take new calls elsewhere, in-flight
streams finish, multiplexed streams end from the server side) within the grace period. main() only parses flags.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.flags import warn_unknown
from clients.logs import configure_logging
from clients.stop_signals import hold, ignore, take_over
from clients.tls import (
    HealthServicer,
    PortUnavailable,
    add_checked_servicer,
    describe,
    keepalive_options,
    listen,
    service_server_options,
    start_health_server,
)
from protos.llmserve.text.v1 import text_pb2, text_pb2_grpc
from tokenizer_service.chat import check_chat_template, markup_token_texts, special_token_texts
from tokenizer_service.config import ENV_PREFIX, LIVENESS, TextServerConfig, parse_config
from tokenizer_service.engine_pool import EnginePool
from tokenizer_service.metrics import TextMetrics, serve_metrics
from tokenizer_service.servicer import TextServicer
from tokenizer_service.token_bounds import warm_up
from tokenizer_service.validation import read_eos_token_ids, read_generation_defaults, read_json

log = logging.getLogger("tokenizer_service")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them: a model's tokenizer
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The liveness probe's health name: SERVING from start-up to exit, whatever the engines do (the other names follow
# engine connectivity, and an engine outage must not restart every tokenizer pod). Asked on the health port, it
# is answered by the service's own event loop, so a hung process fails it; a TCP check never fails, since the
# kernel completes handshakes for a process that no longer runs. (LIVENESS is in config.py, which refuses it as
# --service-name.)
NO_LENGTH_LIMIT = int(1e30)  # transformers' own "no limit" for a tokenizer's model_max_length


def server_options(config: TextServerConfig) -> list[tuple[str, int]]:
    """The server's options (service_server_options), for its max_concurrent_rpcs calls."""
    return service_server_options(config, config.max_concurrent_rpcs)


def engine_channel_options(config: TextServerConfig) -> list[tuple[str, int]]:
    """Our side of the engine streams: the engine permits pings every 5 s, we send one every keepalive_time_s."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        *keepalive_options(config.keepalive_time_s, config.keepalive_timeout_s),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def load_tokenizer(model_dir: str) -> tuple[Any, str, int]:
    """The HF tokenizer, the model's name and its vocabulary size (config.json, else the tokenizer's)."""
    from transformers import AutoTokenizer  # heavy: only the service process needs it

    directory = Path(model_dir)
    if not directory.is_dir():
        raise ValueError(f"{model_dir} is not a directory: --model (TOKENIZER_MODEL) names a local model directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the model's "
                         "tokenizer files there")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a corrupt one is named, not just its parse error
        read_json(directory / name)
    # local_files_only: a name that is not a directory here must not turn into minutes of Hub lookups.
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers' and tokenizers' own types
        raise ValueError(f"the tokenizer in {model_dir} cannot be loaded: {exc}") from None
    if len(tokenizer) <= 1:
        raise ValueError(f"the tokenizer in {model_dir} holds {len(tokenizer)} token(s): its files are incomplete")
    # The service bounds prompts by the engines' max_model_len; the tokenizer's own model_max_length (often the
    # unscaled length of a RoPE-scaled model) only made transformers warn of "indexing errors" that never happen.
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    check_chat_template(tokenizer)
    warm_up(tokenizer)  # here, on the loading thread: not on the event loop at the first request
    config = read_json(directory / "config.json")
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer)
    # The directory's name, as the engine names it: both services' metrics carry the same model_name label
    # (config.json's _name_or_path is often an uploader's local path, or absent).
    name = Path(model_dir).resolve().name
    return tokenizer, name, int(vocab)


async def serve(config: TextServerConfig, *, stop: asyncio.Event | None = None,
                bound_port: asyncio.Future[int] | None = None, handle_signals: bool = True) -> int:
    """Run until `stop` (or SIGTERM) and drained; returns the exit code."""
    stop = stop or asyncio.Event()
    if handle_signals:
        # Before the load: as a container's PID 1 the process ignores a SIGTERM it has no handler for, and the
        # kubelet sends one SIGTERM only, so a pod stopped while loading would wait out its grace period. One that
        # came earlier, held since main() (clients/stop_signals.py), stops it at once.
        take_over(asyncio.get_running_loop(), stop.set)
    if stop.is_set():  # a signal held since start-up: not worth loading for
        log.warning("stop signal before the tokenizer loaded: exiting now (no request was in flight)")
        return 0
    loading = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, config.model))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.warning("stop signal while the tokenizer was loading: exiting once the load returns (no request was "
                    "in flight)")
        loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome no longer matters
        return 0
    stopped.cancel()
    try:
        tokenizer, name, vocab = loading.result()
        eos, defaults = read_eos_token_ids(config.model, tokenizer, vocab), read_generation_defaults(config.model)
    except Exception as exc:  # a tokenizer that cannot load: one line that says why, not a traceback
        log.debug("tokenizer load failed", exc_info=True)
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        log.error("cannot serve %s: %s", config.model, reason)
        return 1
    pool = EnginePool(config, vocab, eos, engine_channel_options(config))
    metrics = TextMetrics(name, config.log_requests)
    refuse = config.chat_special_tokens == "refuse"
    servicer = TextServicer(tokenizer, pool, name, vocab, eos, defaults, config.max_inflight, metrics,
                            special_token_texts(tokenizer) if refuse else (), config.max_message_bytes,
                            config.stream_interval, config.stream_max_wait_s,
                            refused_markup_texts=markup_token_texts(tokenizer) if refuse else ())
    pool.metrics = metrics
    metrics.watch(lambda: servicer.inflight, lambda: len(pool.ready))
    health_servicer = HealthServicer()
    server = grpc.aio.server(options=server_options(config), maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    add_checked_servicer(text_pb2_grpc.add_TextGenerationServicer_to_server, servicer, server, text_pb2.DESCRIPTOR)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [text_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    tls = config.server_tls
    address = f"{config.host}:{config.port}"
    port = listen(server, address, tls, "port")
    if tls is not None:
        metrics.watch_certificate(tls.expiry)
    for service in ("", config.service_name):
        await health_servicer.set(service, NOT_SERVING)
    await health_servicer.set(LIVENESS, SERVING)
    # The tokenizer and imports live as long as the process: frozen, the collector's full passes skip them (one
    # took 61 ms on the demo tokenizer, more under load, stalling every stream on this event loop).
    gc.collect()
    gc.freeze()
    await server.start()
    health_server = None
    if config.health_port:
        try:
            health_server, health_port = await start_health_server(health_servicer, config.host, config.health_port)
        except PortUnavailable:
            await server.stop(0)
            raise
        log.info("plaintext health on %s:%d", config.host, health_port)
    metrics_server = None
    if config.metrics_port:
        metrics_server = serve_metrics(metrics.registry, config.host, config.metrics_port)
    if bound_port is not None:
        bound_port.set_result(port)
    pool.start()
    health_task = asyncio.create_task(_track_engines(pool, health_servicer, config.service_name))
    log.info("tokenizer service listening on %s:%d (%s) for %s; engines over %s", config.host, port, describe(tls),
             name, "TLS" if pool.tls else "plaintext")

    await stop.wait()
    health_task.cancel()
    for service in ("", config.service_name):  # unready; LIVENESS stays SERVING: the process is alive, draining
        await health_servicer.set(service, NOT_SERVING)
    servicer.begin_drain()
    deadline = time.monotonic() + config.grace_s
    log.info("draining: finishing %d calls within %gs", servicer.num_calls, config.grace_s)
    # GOAWAY now, and the port closes: clients' channels (pinned to this pod through a ClusterIP) make their
    # next calls on a new connection, to another replica, instead of meeting UNAVAILABLE here for the whole
    # drain. The calls in flight go on; the grace passed to stop() only backs up the deadline below.
    stopping = asyncio.create_task(server.stop(config.grace_s + 5))
    while servicer.num_calls and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if servicer.num_calls:
        reason = f"the service stopped: its drain's grace period ({config.grace_s:g}s) ended before the request did"
        metrics.shutdown_error = f"UNAVAILABLE: {reason}"
        log.warning("drain: cutting %d calls at the end of the grace period", servicer.num_calls)
        # Requests on an engine end with the reason as their status; let their calls send it before the stop.
        if pool.cut_all(reason):
            unwind = time.monotonic() + 1.0
            while servicer.num_calls and time.monotonic() < unwind:
                await asyncio.sleep(0.02)
    await server.stop(0)  # cancels what is left (nothing, when the drain finished): requests not yet on an engine
    await stopping
    if health_server is not None:
        await health_server.stop(0.5)
    await pool.close()
    if metrics_server is not None:
        await asyncio.to_thread(metrics_server.shutdown)
        metrics_server.server_close()
    gc.unfreeze()  # a serve() run in-process (tests) leaves the collector as it found it
    log.info("tokenizer service stopped")
    return 0


async def _track_engines(pool: EnginePool, health_servicer: Any, service_name: str) -> None:
    """SERVING while at least one compatible engine is connected."""
    serving = None
    while True:
        now = bool(pool.ready)
        if now != serving:
            serving = now
            for service in ("", service_name):
                await health_servicer.set(service, SERVING if now else NOT_SERVING)
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    """The service (`tokenizer-service` runs tokenizer_service/__main__.py, which holds SIGTERM before these
    imports)."""
    hold()  # python -m tokenizer_service.server: from here at least
    try:
        config = parse_config(argv)
    except ValueError as exc:
        sys.exit(f"tokenizer-service: {exc}")
    configure_logging(config.log_level, config.log_format)
    warn_unknown(TextServerConfig, ENV_PREFIX, "tokenizer-service")
    try:
        code = asyncio.run(serve(config))
    except PortUnavailable as exc:
        sys.exit(f"tokenizer-service: {exc}")
    finally:
        ignore()  # stopped: a second stop signal during the teardown is ignored (see clients/stop_signals.py)
    sys.exit(code)


if __name__ == "__main__":
    main()
