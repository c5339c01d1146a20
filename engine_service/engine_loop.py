"""The engine loop: gRPC handlers produce commands, one consumer thread owns the engine and runs step().

Handlers (on the asyncio thread) never block: `add` and `abort` put a command on a thread-safe queue. The
consumer thread is the only caller of the engine (it is not thread-safe). It drains the commands, runs one
step, and hands the step's outputs back to the asyncio thread in one `call_soon_threadsafe`, where each
output goes to the sink of its request. All of a step's outputs are delivered in one callback, so a stream
that multiplexes many requests can send them as one frame.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine_service.metrics import EngineMetrics
from engine_service.outputs import FINISH_ERROR, StepOutput
from engine_service.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where one request's outputs go; called on the asyncio thread only."""

    def on_output(self, output: StepOutput) -> None: ...

    def on_failure(self, code: str, message: str) -> None:
        """The request ended with an error; code is a gRPC status name (INVALID_ARGUMENT, INTERNAL,
        RESOURCE_EXHAUSTED)."""


class EngineUnavailable(RuntimeError):
    """The loop has failed or stopped and takes no new requests."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    trace_id: str | None = None  # the client's id, for metrics and logs; None: untracked (the canary)
    arrival: float = 0.0  # time.monotonic() when the handler queued it
    # (message, max_waiting): the queue was full when it came. If it still is when the engine thread applies it, it
    # displaces a waiting request of a higher priority value that has produced nothing, or is refused
    # (RESOURCE_EXHAUSTED) with this message.
    if_full: tuple[str, int] | None = None


@dataclass(slots=True)
class _Abort:
    request_id: str
    error: str | None = None  # why the service ended it (a deadline, a slow reader); None: the client asked
    stopped: bool = False  # the client ended it because its stop string matched


_STOP = object()
ENGINE_THREAD = "engine-loop"  # the consumer thread's name
# A step that raises fails only its own requests; this many in a row mean the engine cannot continue, and
# the process exits (health NOT_SERVING, non-zero status) for Kubernetes to restart it.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineLoop:
    """Owns an LLMEngine on one thread; see the module docstring."""

    def __init__(
        self, engine: Any, aio_loop: asyncio.AbstractEventLoop, on_fatal: Callable[[str], None]
    ) -> None:
        self._engine = engine
        self._aio = aio_loop
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # live requests; asyncio thread only
        self._priorities: dict[str, int] = {}  # their priorities (SamplingParams.priority); asyncio thread only
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
        # Written by the consumer thread, read by the asyncio thread (whole-object replacement is atomic).
        self.stats: dict[str, int] = dict(engine.stats())
        self.last_progress = time.monotonic()
        self.steps = 0
        self.fail_at_step: int | None = None  # test hook: step() raises once this many steps have run
        self.failure: str | None = None
        self.metrics: EngineMetrics | None = None  # set before start(); called on the consumer thread
        # What traffic tells health (asyncio thread only): outputs handed to live requests, and requests the
        # engine ended with an error (FINISH_ERROR: a failed step, non-finite logits).
        self.outputs_delivered = 0
        self.requests_failed = 0

    # ---- asyncio side -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def engine(self) -> Any:
        """The engine (its methods are for the engine thread; health reads its workers' state)."""
        return self._engine

    @property
    def num_live(self) -> int:
        return len(self._sinks)

    @property
    def num_waiting(self) -> int:
        """Live requests not yet running: queued commands plus the engine's waiting queue."""
        return max(0, len(self._sinks) - int(self.stats.get("num_running", 0)))

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        trace_id: str | None = None,
        if_full: tuple[str, int] | None = None,
    ) -> None:
        """Queue a request; its outputs go to sink. Raises EngineUnavailable once the loop is down.

        if_full: (message, max_waiting) when the service found its queue full. If the engine's waiting queue is
        still that long when the request reaches the engine thread (aborts in the same batch go first), the request
        takes the place of the newest waiting request of the highest priority value above its own that has produced
        nothing yet (that one fails with RESOURCE_EXHAUSTED, which a client may retry elsewhere); where there is
        none it is refused with RESOURCE_EXHAUSTED and the message. A request the engine refuses displaces nobody.
        """
        if self.failure is not None or not self._thread.is_alive():
            raise EngineUnavailable(self.failure or "the engine loop is not running")
        if request_id in self._sinks:
            raise ValueError(f"request_id {request_id!r} is already live")
        self._sinks[request_id] = sink
        self._priorities[request_id] = params.priority
        self._commands.put(_Add(request_id, prompt_token_ids, params, trace_id, time.monotonic(), if_full))

    def outranks(self, priority: int) -> bool:
        """Whether a live request has a higher priority value (is served later) than `priority`: a request of
        `priority` that finds the queue full may then displace one (see add). O(live requests): asked only when
        the queue is full."""
        return any(p > priority for p in self._priorities.values())

    def abort(self, request_id: str, error: str | None = None, stopped: bool = False) -> bool:
        """Forget the request now and free its KV blocks on the engine thread; False if it was not live.
        `error` (a deadline passed, a slow reader) makes the request's metrics and log line an error; `stopped`
        (the client's stop string matched) makes them a stop."""
        if self._sinks.pop(request_id, None) is None:
            return False
        del self._priorities[request_id]
        self._commands.put(_Abort(request_id, error, stopped))
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the consumer thread (after the commands queued before this call); False when it is still in a step
        after `timeout` (a hung device): the engine is then still in use and must not be closed."""
        self._commands.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _deliver(self, outputs: list[StepOutput], rejected: list[tuple[str, str, str]]) -> None:
        priorities = self._priorities
        for request_id, code, message in rejected:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                del priorities[request_id]
                sink.on_failure(code, message)
        sinks = self._sinks  # up to max_num_seqs outputs a step: keep this loop lean
        delivered = 0
        for out in outputs:
            sink = sinks.get(out.request_id)
            if sink is None:
                continue  # aborted meanwhile
            if out.finish_reason is not None:  # out.finished
                del sinks[out.request_id], priorities[out.request_id]
                if out.finish_reason == FINISH_ERROR:
                    self.requests_failed += 1
                    sink.on_failure("INTERNAL", out.error or "the engine failed this request")
                    continue
            sink.on_output(out)
            delivered += 1
        self.outputs_delivered += delivered

    def fail(self, message: str) -> None:
        """The engine cannot continue (e.g. the watchdog saw it stall): refuse new requests, fail every live
        one with INTERNAL, and call on_fatal. Call it on the asyncio thread only; later calls do nothing."""
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        if self.failure is not None:
            return  # already failed (the watchdog, then the stuck step raising, say): report it once
        self.failure = message
        sinks, self._sinks = self._sinks, {}
        self._priorities = {}
        # A consumer thread that died gave each tracked request its line (metrics.fail_live); one that is stuck
        # (the watchdog) owns the metrics still, so its requests get only this count. Requests whose add it never
        # took are neither: they get theirs here.
        self._refuse_unapplied(f"engine failure: {message}")
        log.error("engine failure: failing %d in-flight requests with INTERNAL: %s", len(sinks), message)
        for sink in sinks.values():
            sink.on_failure("INTERNAL", f"engine failure: {message}")
        self._on_fatal(message)

    def _refuse_unapplied(self, error: str) -> None:
        """Count and log as refused (an error, once each) the requests still queued for the engine thread, which
        will never apply them: added during the step that failed, or while the thread was stuck. metrics.fail_live
        sees only the requests the engine took, so these were failed with INTERNAL but never counted nor logged.
        (metrics.refused may be called on any thread; the queue hands each command to one side only.)"""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is _STOP:  # stop() timed out on a stuck thread: the stop stays its to take, should it come back
                self._commands.put(_STOP)
                return
            if isinstance(cmd, _Add) and cmd.trace_id is not None and self.metrics is not None:
                self.metrics.refused(cmd.trace_id, f"INTERNAL: {error}", cmd.arrival, len(cmd.prompt_token_ids),
                                     cmd.request_id)

    # ---- consumer thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        # A step's outputs are handed to the asyncio thread when the *next* step launches its forward pass
        # (or at once when there is no next step). Waking the asyncio thread takes the GIL away from this one;
        # waking it while this thread runs GIL-free model kernels overlaps the two instead of convoying them.
        pending: list = []
        failed_steps = 0  # consecutive steps that raised

        def flush() -> None:
            if pending:
                self._aio.call_soon_threadsafe(self._deliver, *pending)
                pending.clear()

        try:
            while True:
                idle = not self._engine.has_unfinished_requests()
                if idle:
                    flush()
                commands = self._drain(block=idle)
                # On stop, the commands queued before it still apply, and one last step reports them: the
                # aborts of a drain's last cut calls get their metrics and request lines too.
                stopping = _STOP in commands
                if stopping:
                    commands = commands[: commands.index(_STOP)]
                rejected = self._apply(commands)
                outputs: list[StepOutput] = []
                if self._engine.has_unfinished_requests():
                    if self.fail_at_step is not None and self.steps >= self.fail_at_step:
                        raise RuntimeError(
                            f"ENGINE_TEST_FAIL_AFTER_STEPS: step {self.steps} raised (test hook)"
                        )
                    started = time.monotonic()
                    try:
                        outputs = self._engine.step(on_launch=flush)
                        failed_steps = 0
                    except Exception as exc:
                        # The engine failed this step's requests and freed their blocks (EngineStepError
                        # carries their outputs): they end INTERNAL and the others go on. A failure that
                        # repeats (a poisoned CUDA context, say) means the engine cannot continue.
                        failed_steps += 1
                        if not hasattr(exc, "outputs") or failed_steps >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise
                        log.exception("engine step failed; its requests fail with INTERNAL")
                        outputs = list(exc.outputs)
                    flush()  # the step launched nothing (e.g. only aborts to report)
                    self.steps += 1
                    if self.metrics is not None:
                        self.metrics.on_step(outputs, started, time.monotonic(), self._engine)
                now = time.monotonic()
                self.stats = self._engine.stats()  # a fresh dict each call; O(1): cached blocks are counted
                self.last_progress = now
                if outputs or rejected:
                    pending[:] = [outputs, rejected]
                if stopping:
                    flush()
                    return
        except BaseException as exc:  # the engine cannot continue; every live request fails
            log.exception("engine loop failed")
            message = f"{type(exc).__name__}: {exc}"
            if self.metrics is not None:  # this thread owns them: each request gets its line and its count
                try:
                    self.metrics.fail_live(f"engine failure: {message}", time.monotonic())
                except Exception:  # noqa: BLE001 -- the failure itself must still reach the requests
                    log.exception("could not account the failed requests")
            try:
                flush()  # what finished before the failure is still delivered, in order
                self._aio.call_soon_threadsafe(self._fail_all, message)
            except RuntimeError:
                pass  # the event loop is already closed

    def _drain(self, block: bool) -> list[object]:
        commands: list[object] = []
        if block:
            try:
                # Wake up now and then so last_progress stays fresh while idle.
                commands.append(self._commands.get(timeout=1.0))
            except queue.Empty:
                self.last_progress = time.monotonic()
                check = getattr(self._engine, "check_workers", None)
                if check is not None:
                    check()  # EngineDeadError when a tensor-parallel worker died while idle: the loop fails
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[object]) -> list[tuple[str, str, str]]:
        """Run add/abort commands in order; return (request_id, gRPC status name, message) of the requests they
        ended: adds the engine refused, and waiting requests a higher-priority add displaced from a full queue.
        Any other exception out of add_request refuses that request alone (an internal error, logged): one
        request must never take the loop, and every other request, down with it (a dead engine is found by the next
        step)."""
        rejected = []
        if any(isinstance(cmd, _Add) and cmd.if_full is not None for cmd in commands):
            # Each abort frees a place that an arrival which found the queue full may take without displacing
            # anyone, so aborts go as early as they can: those of requests admitted before this batch first, those of
            # requests added in it right after their add (engine ids are unique per admission).
            added = {cmd.request_id for cmd in commands if isinstance(cmd, _Add)}
            later: dict[str, list[_Abort]] = {}
            for cmd in commands:
                if isinstance(cmd, _Abort) and cmd.request_id in added:
                    later.setdefault(cmd.request_id, []).append(cmd)
            ordered: list[object] = [cmd for cmd in commands if isinstance(cmd, _Abort) and cmd.request_id not in added]
            for cmd in commands:
                if not isinstance(cmd, _Abort):
                    ordered.append(cmd)
                    if isinstance(cmd, _Add):
                        ordered.extend(later.pop(cmd.request_id, ()))
            commands = ordered
        for cmd in commands:
            if isinstance(cmd, _Add):
                victim = None
                if cmd.if_full is not None:
                    message, limit = cmd.if_full
                    if self._engine.stats()["num_waiting"] >= limit:  # still full, here where the queue is
                        victim = self._engine.displaceable(cmd.params.priority)
                        if victim is None:
                            rejected.append((cmd.request_id, "RESOURCE_EXHAUSTED", message))
                            if self.metrics is not None and cmd.trace_id is not None:
                                self.metrics.refused(cmd.trace_id, f"RESOURCE_EXHAUSTED: {message}", cmd.arrival,
                                                     len(cmd.prompt_token_ids), cmd.request_id)
                            continue
                try:
                    self._engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
                except Exception as exc:  # noqa: BLE001 - see the docstring
                    invalid = isinstance(exc, ValueError)
                    if not invalid:
                        log.exception("admitting request %s failed", cmd.request_id)
                    message = str(exc) if invalid else f"the engine failed admitting this request: " \
                                                       f"{type(exc).__name__}: {exc}"
                    rejected.append((cmd.request_id, "INVALID_ARGUMENT" if invalid else "INTERNAL", message))
                    if self.metrics is not None and cmd.trace_id is not None:
                        self.metrics.refused(cmd.trace_id, f"{'INVALID_ARGUMENT' if invalid else 'INTERNAL'}: {message}",
                                             cmd.arrival, len(cmd.prompt_token_ids), cmd.request_id)
                    continue  # a request the engine refuses displaces nobody
                if victim is not None:
                    self._displace(*victim, cmd.params.priority, rejected)
                if self.metrics is not None and cmd.trace_id is not None:
                    self.metrics.on_add(cmd.request_id, cmd.trace_id, cmd.arrival, len(cmd.prompt_token_ids))
            elif isinstance(cmd, _Abort):
                if cmd.error is not None and self.metrics is not None:
                    self.metrics.mark_failed(cmd.request_id, cmd.error)  # before the abort output comes back
                elif cmd.stopped and self.metrics is not None:
                    self.metrics.mark_stopped(cmd.request_id)
                self._engine.abort_request(cmd.request_id)
        return rejected

    def _displace(self, victim: str, its_priority: int, priority: int, rejected: list[tuple[str, str, str]]) -> None:
        """End the waiting request `victim`, displaced from the full queue by an admitted request of `priority`."""
        message = (f"displaced from the engine's full queue by a request of priority {priority} (this request's "
                   f"priority is {its_priority}; lower values are served first); retry later or on another engine")
        if self.metrics is not None:
            self.metrics.mark_failed(victim, f"RESOURCE_EXHAUSTED: {message}")
        self._engine.abort_request(victim)
        rejected.append((victim, "RESOURCE_EXHAUSTED", message))
