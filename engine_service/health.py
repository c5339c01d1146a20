"""Truthful health for the engine service: a cached grpc.health.v1 status kept honest by canaries.

A Kubernetes probe times out in about a second, so Check answers from a cached state. That state turns
SERVING only after a tiny canary generation has gone through the real engine loop at start-up, and an idle
service runs the canary again now and then so a broken engine cannot look healthy. A busy one is judged by its
traffic: outputs reaching requests prove it; requests failing while none gets an output call the canary. A
watchdog fails the service when the loop stops making progress while requests wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from clients.tls import HealthServicer
from engine_service.engine_loop import EngineLoop, EngineUnavailable
from engine_service.outputs import StepOutput
from engine_service.sampling_params import SamplingParams

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _CanarySink:
    def __init__(self, future: asyncio.Future[str | None]) -> None:
        self.future = future

    def on_output(self, output: StepOutput) -> None:
        if output.finished and not self.future.done():
            self.future.set_result(None)

    def on_failure(self, code: str, message: str) -> None:
        if not self.future.done():
            self.future.set_result(message)


class Health:
    """The health servicer plus the canary and watchdog tasks that keep it truthful."""

    def __init__(self, service_names: list[str]) -> None:
        self.servicer = HealthServicer()
        self._names = ["", *service_names]  # "" is the whole server
        self._ids = itertools.count()
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        for name in self._names:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for good (draining or failed)."""
        self.serving = False
        await self.servicer.enter_graceful_shutdown()

    async def canary(self, loop: EngineLoop, vocab_size: int, timeout_s: float) -> str | None:
        """Generate two greedy tokens through the loop; None if that worked, else why not."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        request_id = f"canary:{next(self._ids)}"
        prompt = list(range(min(4, vocab_size)))
        try:
            # The lowest priority value there is: a full queue never displaces the canary (which would read as a failed
            # engine under exactly the load that fills it), and it never waits behind traffic.
            loop.add(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, priority=-2**31),
                     _CanarySink(future))
        except EngineUnavailable as exc:
            return str(exc)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            loop.abort(request_id)
            return f"the canary generation took more than {timeout_s}s"
        except asyncio.CancelledError:  # a stop during the canary: its request does not outlive it
            loop.abort(request_id)
            raise

    async def run_idle_canaries(self, loop: EngineLoop, vocab_size: int, interval_s: float, timeout_s: float,
                                is_draining: Callable[[], bool]) -> None:
        """Re-check the engine every interval_s: an idle one with the canary; a busy one by its traffic.

        Busy, outputs delivered since the last check prove the engine (SERVING again after a canary that failed
        once: under steady traffic no idle canary would ever turn it back, and the liveness probe restarted a pod
        that was serving every request). Busy with requests failing and none getting an output, the canary decides
        (every request failing on a broken device left health SERVING for as long as traffic lasted): it is not
        run behind healthy traffic, where it could wait for a free sequence slot past its timeout, and requests
        that fail alone (a client's bad input) do not decide it."""
        delivered, failed = loop.outputs_delivered, loop.requests_failed
        while True:
            await asyncio.sleep(interval_s)
            if is_draining() or loop.failure is not None:
                return
            if loop.num_live > 0:
                outputs_came = loop.outputs_delivered != delivered
                failures_came = loop.requests_failed != failed
                delivered, failed = loop.outputs_delivered, loop.requests_failed
                if outputs_came:
                    if not self.serving and not is_draining():
                        log.info("health: traffic is being served again; SERVING")
                        await self.set_serving(True)
                    continue
                if not failures_came:
                    continue  # long prefills, or a stall (the watchdog's)
            problem = await self.canary(loop, vocab_size, timeout_s)
            delivered, failed = loop.outputs_delivered, loop.requests_failed  # the canary's own are not traffic
            if problem is not None:
                log.error("health canary failed: %s", problem)
            if not is_draining() and (problem is None) != self.serving:
                await self.set_serving(problem is None)

    async def watchdog(self, loop: EngineLoop, stall_s: float) -> None:
        """Fail the loop (its live requests get INTERNAL, then on_fatal) when requests wait but it has made no
        progress for stall_s seconds."""
        while loop.failure is None:
            await asyncio.sleep(min(5.0, stall_s / 4))
            stalled = time.monotonic() - loop.last_progress
            if loop.failure is None and loop.num_live > 0 and stalled > stall_s:
                workers = getattr(loop.engine, "workers", None)
                # NCCL waits on a dead peer. Off the event loop: dead_worker() may wait for a worker to exit, or
                # for the engine's thread asking the same (seconds), and health checks must still be answered.
                cause = await asyncio.to_thread(workers.dead_worker) if workers is not None else None
                loop.fail(f"the engine loop has not stepped for {stalled:.0f}s while {loop.num_live} "
                          "requests wait (watchdog)" + (f": {cause}" if cause else ""))
                return
