"""The engine service process: `engine-service --model DIR` (every flag also reads an ENGINE_* variable).

serve() wires the servicer, health, reflection, TLS, limits and keepalive, loads the engine, runs the start-up
canary, and then waits for SIGTERM (drain) or an engine failure (exit 1). main() only parses flags.
Test hook: ENGINE_TEST_FAIL_AFTER_STEPS=N makes step() raise after N steps past warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.cpus import available_cpus
from clients.flags import warn_unknown
from clients.logs import configure_logging
from clients.stop_signals import hold, ignore, take_over
from clients.tls import (
    PortUnavailable,
    add_checked_servicer,
    describe,
    listen,
    service_server_options,
    start_health_server,
)
from engine_service.engine_loop import ENGINE_THREAD, EngineLoop
from engine_service.health import Health
from engine_service.metrics import EngineMetrics, serve_metrics
from engine_service.server_config import ENV_PREFIX, ServerConfig, parse_config
from engine_service.servicer import EngineServicer
from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("engine_service")
FAIL_AFTER_STEPS_ENV = "ENGINE_TEST_FAIL_AFTER_STEPS"
SHORT_CALL_HEADROOM = 64  # unary and health calls beyond max_concurrent_rpcs generation calls


def fail_after_steps() -> int | None:
    """The test hook's step count (ENGINE_TEST_FAIL_AFTER_STEPS; unset or empty: None), or a ValueError."""
    text = os.environ.get(FAIL_AFTER_STEPS_ENV, "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{FAIL_AFTER_STEPS_ENV} (a test hook) must be a whole number of steps, 1 or more, "
                         f"got {text!r}; unset it to run normally")
    return int(text)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The server's options (service_server_options), its calls counting the short ones beside generation."""
    return service_server_options(config, config.max_concurrent_rpcs + SHORT_CALL_HEADROOM)


def torch_threads(config: ServerConfig, cuda_available: bool, num_cores: int, torch_default: int) -> int | None:
    """torch's intra-op thread count for this service, or None to leave torch's default.

    On a small CPU machine the engine shares the cores with its own gRPC threads and with the tokenizer
    service: torch threads beyond one then wait on each other at every small matmul (a 2-core machine ran
    workload B markedly slower with two), so the default there is one. Elsewhere torch's default, capped at
    the CPUs the process may use (num_cores, from available_cpus()).
    """
    if config.torch_threads:
        return config.torch_threads
    on_cpu = config.device == "cpu" or (config.device == "auto" and not cuda_available)
    if on_cpu and num_cores <= 4:
        return 1
    return num_cores if torch_default > num_cores else None


def load_engine(config: ServerConfig) -> Any:
    """The LLMEngine for config.model (slow: runs in a worker thread)."""
    import torch

    from engine_service import LLMEngine  # the model stack loads only in the service process

    threads = torch_threads(config, torch.cuda.is_available(), available_cpus(), torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)  # process-wide: the engine loop thread picks it up too
    log.info("torch intra-op threads: %d", torch.get_num_threads())
    return LLMEngine(config.model, **config.engine_kwargs())


LOADER_THREAD = "engine-load"
ENGINE_STOP_WAIT_S = 5.0  # how long a stop waits for the engine thread to end its step


async def _done_before(future: asyncio.Future, stop: asyncio.Event) -> bool:
    """Wait for `future` or `stop`, whichever comes first; whether `future` is done."""
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([future, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return future.done()


async def load_unless_stopped(engine_factory: Callable[[ServerConfig], Any], config: ServerConfig,
                              stop: asyncio.Event) -> Any | None:
    """The engine from engine_factory(config), run on a daemon thread; None if `stop` is set first.

    A load can take minutes (weights, warm-up, graph capture) and cannot be interrupted, while nothing is in
    flight yet: a SIGTERM then (a rollout, a scale-down) should end the process at once, not after the load
    and not in a SIGKILL at the end of the pod's grace period. The thread is a daemon, and main() exits with
    os._exit when it is still running, so neither the interpreter nor asyncio.run waits for it.
    """
    if stop.is_set():  # a signal held since start-up (clients/stop_signals.py): nothing to load for
        return None
    aio = asyncio.get_running_loop()
    done: asyncio.Future[Any] = aio.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (engine_factory(config), None)
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the event loop
            outcome = (None, exc)
        try:
            aio.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the service stopped during the load and its event loop is gone

    threading.Thread(target=run, name=LOADER_THREAD, daemon=True).start()
    if await _done_before(done, stop):
        return done.result()
    done.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late failure is not "never retrieved"
    return None


async def canary_unless_stopped(health: Health, loop: EngineLoop, vocab_size: int, timeout_s: float,
                                stop: asyncio.Event) -> str | None:
    """The start-up canary's verdict (Health.canary), or None when `stop` is set first (the canary is aborted).

    The canary is the engine's first real step, which can take long (kernels compiled or tuned on first use) or
    hang (a broken device): a SIGTERM then must not wait up to canary_timeout_s, turn the service SERVING once
    the canary passes after all, or exit 1 when it times out; nothing is in flight yet."""
    canary = asyncio.ensure_future(health.canary(loop, vocab_size, timeout_s))
    if await _done_before(canary, stop):
        return canary.result()
    canary.cancel()  # Health.canary aborts its request
    try:
        await canary
    except asyncio.CancelledError:
        pass
    return None


async def _calls_end(servicer: EngineServicer, seconds: float = 1.0) -> None:
    """Up to `seconds` for the generation calls still open to end (their handlers run on later turns of the loop)."""
    until = time.monotonic() + seconds
    while servicer.num_calls and time.monotonic() < until:
        await asyncio.sleep(0.02)

async def serve(config: ServerConfig, *, engine_factory: Callable[[ServerConfig], Any] | None = None,
                stop: asyncio.Event | None = None, bound_port: asyncio.Future[int] | None = None,
                handle_signals: bool = True) -> int:
    """Run the service until `stop` is set and it has drained (returns 0), or the engine fails (returns 1).

    engine_factory defaults to load_engine (looked up at call time, so a test may replace it).
    """
    aio = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if handle_signals:
        take_over(aio, stop.set)  # first: a stop while the ports open or the model loads exits 0 at once
    exit_code = 0

    def on_fatal(message: str) -> None:
        nonlocal exit_code
        log.error("engine failure, exiting: %s", message)
        exit_code = 1
        stop.set()

    health = Health([config.service_name])
    await health.set_serving(False)
    servicer = EngineServicer(config.max_waiting, config.max_buffered_tokens, config.max_message_bytes // 2,
                              max_calls=config.max_concurrent_rpcs, max_running=config.max_num_seqs)
    # gRPC's own limit counts every call alike; the servicer counts the generation calls, and this leaves room
    # for the short ones (GetLoad, GetModelInfo, Abort, health) when they are all open.
    server = grpc.aio.server(options=grpc_options(config),
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs + SHORT_CALL_HEADROOM)
    add_checked_servicer(engine_pb2_grpc.add_EngineServicer_to_server, servicer, server, engine_pb2.DESCRIPTOR)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    names = [engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    tls = config.server_tls
    address = f"{config.host}:{config.port}"
    port = listen(server, address, tls, "port")
    await server.start()  # health answers NOT_SERVING while the model loads
    health_server = None
    if config.health_port:
        try:
            health_server, health_port = await start_health_server(health.servicer, config.host, config.health_port)
        except PortUnavailable:
            await server.stop(0)
            raise
        log.info("plaintext health on %s:%d", config.host, health_port)
    metrics = EngineMetrics(Path(config.model).name, lambda: servicer.loop.stats if servicer.loop else {},
                            lambda: servicer.loop.num_waiting if servicer.loop else 0, config.log_requests)
    if tls is not None:
        metrics.watch_certificate(tls.expiry)
    metrics_server = None
    if config.metrics_port:
        metrics_server = serve_metrics(metrics.registry, config.host, config.metrics_port)
    if bound_port is not None:
        bound_port.set_result(port)
    log.info("engine service listening on %s:%d (%s), loading %s", config.host, port, describe(tls), config.model)

    async def close_side_servers() -> None:
        """The plaintext health port and the metrics endpoint."""
        if health_server is not None:
            await health_server.stop(0.5)
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.shutdown)
            metrics_server.server_close()

    async def stop_before_serving(code: int) -> int:
        """Nothing was in flight yet: close the servers and return the exit code."""
        await health.shutdown()
        await server.stop(0.5)
        await close_side_servers()
        log.info("engine service stopped (exit %d)", code)
        return code

    try:
        engine = await load_unless_stopped(engine_factory or load_engine, config, stop)
    except Exception as exc:  # a model that cannot load: one line that says why, not a traceback
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        log.debug("model load failed", exc_info=True)
        log.error("cannot serve %s: %s", config.model, reason)
        return await stop_before_serving(1)
    if engine is None:
        log.warning("stop signal while the model was loading: exiting now, without waiting for the load "
                    "(no request was in flight)")
        return await stop_before_serving(0)
    loop = EngineLoop(engine, aio, on_fatal)
    metrics.model_name = str(engine.model_info["model_name"])
    if config.metrics_port or config.log_requests:
        loop.metrics = metrics
    servicer.attach(loop, dict(engine.model_info), dict(engine.generation_defaults))
    loop.start()
    vocab = int(engine.model_info["vocab_size"])
    tasks = [asyncio.create_task(health.watchdog(loop, config.watchdog_s))]
    problem = await canary_unless_stopped(health, loop, vocab, config.canary_timeout_s, stop)
    if problem is not None:
        on_fatal(f"start-up canary failed: {problem}")
    elif stop.is_set():  # never SERVING: the drain below finds nothing in flight
        if exit_code == 0:  # a stop signal, not an engine failure (which said why already)
            log.warning("stop signal during the start-up canary: stopping now, without waiting for it (no request "
                        "was in flight)")
    else:
        fail_after = fail_after_steps()  # main() checked it before the ports opened
        if fail_after is not None:
            loop.fail_at_step = loop.steps + fail_after
        # What starting made (the model, kernels, imports: some 220,000 objects) lives as long as the process:
        # frozen, the collector's full passes skip it (one took 50 ms and more, the engine thread waiting on the
        # GIL meanwhile: a latency spike for every stream).
        gc.collect()
        gc.freeze()
        # Process-wide: the engine thread, back from a GPU wait, takes the GIL within this of asking for it
        # (server_config.py says why).
        sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
        servicer.started = True
        await health.set_serving(True)
        log.info("engine service SERVING on port %d", port)
        if config.canary_interval_s > 0:
            tasks.append(asyncio.create_task(health.run_idle_canaries(
                loop, vocab, config.canary_interval_s, config.canary_timeout_s, lambda: servicer.draining)))

    await stop.wait()
    await health.shutdown()
    servicer.begin_drain()
    if exit_code == 0:
        log.info("draining: finishing %d calls within %gs", servicer.num_calls, config.grace_s)
        deadline = time.monotonic() + config.grace_s
        while servicer.num_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if servicer.num_calls:
            reason = f"the service stopped: its drain's grace period ({config.grace_s:g}s) ended before the request did"
            servicer.shutdown_error = f"UNAVAILABLE: {reason}"
            log.warning("drain: cutting %d calls at the end of the grace period", servicer.num_calls)
            # Each live request ends with the reason as its status; let the calls send it before the stop.
            if servicer.cut_all(reason):
                await _calls_end(servicer)
        # What is still open now is no generation call the drain waits for (a health Watch, say, or a call whose
        # client stopped reading): a moment to end, not the rest of the grace period.
        await server.stop(min(1.0, max(0.5, deadline - time.monotonic())))
        # The cancelled calls' handlers unwind on later turns of the event loop: let them queue their aborts (and
        # so their request lines) before the engine loop stops.
        await _calls_end(servicer)
    else:
        # Probes see NOT_SERVING (and clients get their INTERNAL statuses) before the process exits.
        await asyncio.sleep(config.failure_linger_s)
        await server.stop(1.0)
    await close_side_servers()
    for task in tasks:
        task.cancel()
    if exit_code == 0:
        if loop.stop(ENGINE_STOP_WAIT_S):
            engine.close()
        else:  # main() exits without the interpreter's shutdown, which would wait on the stuck step
            log.warning("the engine thread is still in a step after the stop's wait (a hung device?): exiting "
                        "without closing the engine")
    gc.unfreeze()  # a serve() run in-process (tests) leaves the collector as it found it
    log.info("engine service stopped (exit %d)", exit_code)
    return exit_code


def main(argv: list[str] | None = None) -> None:
    """The service (`engine-service` runs engine_service/__main__.py, which holds SIGTERM before these imports)."""
    hold()  # python -m engine_service.server: from here at least
    try:
        config = parse_config(argv)
        fail_after_steps()
    except ValueError as exc:
        sys.exit(f"engine-service: {exc}")
    configure_logging(config.log_level, config.log_format)
    warn_unknown(ServerConfig, ENV_PREFIX, "engine-service")
    try:
        code = asyncio.run(serve(config))
    except PortUnavailable as exc:
        sys.exit(f"engine-service: {exc}")
    finally:
        ignore()  # stopped: a second stop signal during the teardown is ignored (see clients/stop_signals.py)
    sys.stdout.flush()
    sys.stderr.flush()
    stuck = any(t.name in (LOADER_THREAD, ENGINE_THREAD) and t.is_alive() for t in threading.enumerate())
    if code or stuck:
        tp = sys.modules.get("engine_service.tp")  # loaded with tensor parallelism only
        if tp is not None:
            tp.end_all_groups()  # os._exit skips the worker groups' own clean-up (their workers, directories)
        logging.shutdown()
        # A stuck engine thread must not hold a process up, failed or stopped, nor an abandoned load a stopped one
        # (the interpreter's shutdown would wait on torch's threads, or finalise under their feet).
        os._exit(code)


if __name__ == "__main__":
    main()
