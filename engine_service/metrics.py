"""Prometheus metrics and per-request log lines of the engine service (names: docs/OBSERVABILITY.md).

The engine loop's consumer thread calls `on_add` for each admitted request and `on_step` once per engine
step; nothing is updated per token. on_step walks the step's outputs once, sums what it needs (tokens,
first tokens, finished requests, inter-token gaps, which are equal for every request that also advanced in
the previous step), and then takes one lock to apply the sums. Gauges and the prefix-cache counters are not
updated at all: they are read from the loop's `engine.stats()` snapshot when Prometheus scrapes.

Each server has its own CollectorRegistry, so several servers in one process (tests) never share series.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from clients.logs import REQUEST_LOGGER
from engine_service.outputs import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, StepOutput

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)

PREFIX = "llmserve:"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR)
# Bucket upper bounds in seconds: roughly 1-2.5-5 per decade, over the range each latency lives in. A GPU's decode
# step takes 1-2.5 ms (docs/PERFORMANCE.md: 1.2 ms at batch 1, 2.3 ms at batch 64 on an H200), and a short
# prompt's first token comes within 5 ms of its arrival on an idle engine: the low ends are finer, or every
# observation there fell in one bucket and histogram_quantile could not tell batch 1 from batch 64.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
               0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
                   600.0, 1200.0)


class Histogram:
    """Bucket counts and a sum, with weighted observations (n equal values at once); not thread-safe."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, name: str, doc: str, model: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([model], buckets, self.sum)
        return family


@dataclass(slots=True)
class _Request:
    """Timestamps (time.monotonic) of one tracked request."""

    trace_id: str
    arrival: float
    prompt_tokens: int = 0
    scheduled: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    num_tokens: int = 0
    cached_tokens: int = 0  # as the engine last reported them (for a failure's log line, which has no output)
    error: str = ""  # set when the service ended it for a reason of its own (it then finishes as an error)
    stopped: bool = False  # its client ended it on a stop string (its abort then finishes as a stop)


class EngineMetrics:
    """Request and step metrics of one engine service; see the module docstring."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, int]], num_waiting: Callable[[], int],
                 log_requests: bool = True) -> None:
        self.model_name = model_name
        self._stats, self._num_waiting = stats, num_waiting  # read at scrape time
        self._certificate_expiry: Callable[[], float] | None = None  # serving TLS: watch_certificate
        self._log_requests = log_requests
        self._live: dict[str, _Request] = {}  # engine request id -> timestamps; consumer thread only
        self._last_admit = -1  # highest Sequence.admit_order seen in the scheduler's running list
        self._lock = threading.Lock()  # consumer thread writes the figures below, the HTTP thread reads them
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.e2e, self.queue = Histogram(REQUEST_BUCKETS), Histogram(REQUEST_BUCKETS)
        self.prefill, self.decode = Histogram(REQUEST_BUCKETS), Histogram(REQUEST_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def watch_certificate(self, expiry: Callable[[], float]) -> None:
        """Export when the served TLS certificate expires (ServerTls.expiry), read when scraped."""
        self._certificate_expiry = expiry

    # ---- consumer thread ----------------------------------------------------------------------------------

    def on_add(self, request_id: str, trace_id: str, arrival: float, prompt_tokens: int = 0) -> None:
        """The engine accepted a request that arrived (time.monotonic) at `arrival`."""
        self._live[request_id] = _Request(trace_id, arrival, prompt_tokens)

    def on_step(self, outputs: list[StepOutput], started: float, ended: float, engine: Any = None) -> None:
        """Account one step: it started and ended at these time.monotonic values."""
        live = self._live
        if not live:
            return
        self._mark_scheduled(engine, started)
        generated = prompt = 0
        ttfts: list[float] = []
        gaps: dict[float, int] = {}  # seconds per token -> tokens; one entry per distinct previous step
        done: list[tuple[_Request, StepOutput]] = []
        for out in outputs:
            req = live.get(out.request_id)
            if req is None:
                continue
            n = len(out.new_token_ids)
            req.cached_tokens = out.num_cached_tokens or req.cached_tokens
            if n:
                generated += n
                if req.num_tokens == 0:
                    req.first_token = ended
                    req.scheduled = req.scheduled or started
                    prompt += out.num_prompt_tokens
                    ttfts.append(ended - req.arrival)
                else:
                    gap = (ended - req.last_token) / n
                    gaps[gap] = gaps.get(gap, 0) + n
                req.last_token = ended
                req.num_tokens += n
            if out.finish_reason is not None:
                del live[out.request_id]
                reason = out.finish_reason
                if out.finish_reason == FINISH_ABORT:
                    reason = FINISH_ERROR if req.error else FINISH_STOP if req.stopped else FINISH_ABORT
                done.append((req, out, reason))
        with self._lock:
            self.generation_tokens += generated
            self.prompt_tokens += prompt
            for value in ttfts:
                self.ttft.observe(value)
            for gap, n in gaps.items():
                self.itl.observe(gap, n)
            for req, _, reason in done:
                self._finish(req, reason, ended)
        if self._log_requests:
            for req, out, reason in done:
                self._log(out.request_id, req, out, reason, ended)

    def _mark_scheduled(self, engine: Any, started: float) -> None:
        """Stamp requests the scheduler admitted this step. They are not always at the tail of its running list:
        one of a lower priority value is inserted before the running ones of a higher value (Scheduler._run), so
        the whole list (max_num_seqs at most) is walked, but only on a step that admitted something."""
        scheduler = getattr(engine, "scheduler", None)
        running = getattr(scheduler, "running", None)
        if not running:
            return
        newest = getattr(scheduler, "num_admissions", None)
        if newest is not None and newest - 1 <= self._last_admit:
            return  # nothing admitted since the last walk
        last = self._last_admit
        for seq in running:
            order = getattr(seq, "admit_order", -1)
            if order > last:
                req = self._live.get(seq.request_id)
                if req is not None and not req.scheduled:
                    req.scheduled = started
        # Everything admitted so far is seen: one gone from `running` already finished or was aborted, or was
        # preempted and takes a new admit_order when readmitted. (Left behind, the walk ran at every step.)
        if newest is not None:
            self._last_admit = newest - 1
        else:  # a scheduler that does not count its admissions
            self._last_admit = max([last] + [getattr(seq, "admit_order", -1) for seq in running])

    def _finish(self, req: _Request, reason: str, now: float) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.e2e.observe(now - req.arrival)
        if req.num_tokens:
            self.queue.observe(req.scheduled - req.arrival)
            self.prefill.observe(req.first_token - req.scheduled)
            self.decode.observe(now - req.first_token)

    @staticmethod
    def _log(request_id: str, req: _Request, out: StepOutput, reason: str, now: float, error: str = "") -> None:
        error = req.error or out.error or error
        request_log.info("request finished", extra={"fields": {
            "request_id": req.trace_id, "engine_request_id": request_id,
            "prompt_tokens": out.num_prompt_tokens or req.prompt_tokens, "completion_tokens": req.num_tokens,
            "cached_tokens": out.num_cached_tokens or req.cached_tokens,
            "queue_s": round(req.scheduled - req.arrival, 6) if req.num_tokens else None,
            "ttft_s": round(req.first_token - req.arrival, 6) if req.num_tokens else None,
            "total_s": round(now - req.arrival, 6), "finish_reason": reason,
            **({"error": error} if error else {}),
        }})

    def mark_failed(self, request_id: str, error: str) -> None:
        """The service is aborting this request for a reason of its own (a deadline passed, a slow reader):
        when its abort comes back, count and log it as an error with this message."""
        req = self._live.get(request_id)
        if req is not None:
            req.error = error

    def mark_stopped(self, request_id: str) -> None:
        """The client aborted this request because its stop string matched: count and log it as a stop."""
        req = self._live.get(request_id)
        if req is not None:
            req.stopped = True

    def refused(self, trace_id: str, error: str, arrival: float | None = None, prompt_tokens: int = 0,
                engine_request_id: str | None = None) -> None:
        """A request refused before it reached the engine (or by it): counted and logged as an error, with every
        field of a finished request's line (arrival: its time.monotonic() when known, else it was refused on
        arrival; engine_request_id: None for one refused before it was given one). Any thread."""
        with self._lock:
            self.finished[FINISH_ERROR] += 1
        if self._log_requests:
            total = time.monotonic() - arrival if arrival else 0.0
            request_log.info("request finished", extra={"fields": {
                "request_id": trace_id, "engine_request_id": engine_request_id, "prompt_tokens": prompt_tokens,
                "completion_tokens": 0, "cached_tokens": 0,
                "queue_s": None, "ttft_s": None, "total_s": round(total, 6), "finish_reason": FINISH_ERROR,
                "error": error}})

    def fail_live(self, error: str, now: float) -> int:
        """The engine loop is dying: every tracked request finishes as an error with this message, counted and
        logged (on the consumer thread, its last act). Returns how many there were."""
        live, self._live = self._live, {}
        with self._lock:
            for req in live.values():
                self._finish(req, FINISH_ERROR, now)
        if self._log_requests:
            for request_id, req in live.items():
                self._log(request_id, req, StepOutput(request_id, finish_reason=FINISH_ERROR), FINISH_ERROR, now,
                          error)
        return len(live)

    # ---- Prometheus (HTTP thread) -------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        stats, model = self._stats(), self.model_name
        gauges = (
            ("num_requests_running", "Requests in the engine's running batch.", stats.get("num_running", 0)),
            ("num_requests_waiting", "Requests admitted by the service and not yet running.", self._num_waiting()),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live requests (1 = full).",
             (stats.get("num_used_blocks", 0) / stats["num_blocks"]) if stats.get("num_blocks") else 0.0),
        )
        if self._certificate_expiry is not None:
            gauges += (("tls_certificate_expiry_timestamp_seconds", "When the TLS certificate served expires (its "
                        "notAfter, Unix time).", self._certificate_expiry()),)
        for name, doc, value in gauges:
            yield _one(GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"]), model, value)
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.get("prefix_cache_queries", 0)),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.get("prefix_cache_hits", 0)),
            ("num_preemptions", "Running requests preempted (to be recomputed) for lack of KV blocks, or for a "
             "request of a lower priority value that needed their slot or blocks.",
             stats.get("num_preemptions", 0)),
            ("json_mask_hits", "JSON-mode and JSON-Schema token masks found in the cache.",
             stats.get("json_mask_hits", 0)),
            ("json_mask_misses", "JSON-mode and JSON-Schema token masks computed (not in the cache).",
             stats.get("json_mask_misses", 0)),
            ("json_mask_compute_seconds", "Time spent computing JSON-mode and JSON-Schema token masks, on the "
             "engine's loop.", stats.get("json_mask_compute_seconds", 0.0)),
        ]
        with self._lock:
            counters += [("prompt_tokens", "Prompt tokens of requests that got their first token.", self.prompt_tokens),
                         ("generation_tokens", "Tokens generated.", self.generation_tokens)]
            finished = dict(self.finished)
            histograms = [
                (self.ttft, "time_to_first_token_seconds", "Arrival to first generated token."),
                (self.itl, "inter_token_latency_seconds", "Time between a request's consecutive tokens."),
                (self.e2e, "e2e_request_latency_seconds", "Arrival to finish (any reason)."),
                (self.queue, "request_queue_time_seconds", "Arrival to first scheduled."),
                (self.prefill, "request_prefill_time_seconds", "First scheduled to first token."),
                (self.decode, "request_decode_time_seconds", "First token to finish."),
            ]
            families = [h.family(PREFIX + name, doc, model) for h, name, doc in histograms]
        for name, doc, value in counters:
            yield _one(CounterMetricFamily(PREFIX + name, doc, labels=["model_name"]), model, value)
        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason, count in finished.items():
            success.add_metric([model, reason], count)
        yield success
        yield from families


def _one(family: Any, model: str, value: float) -> Any:
    family.add_metric([model], value)
    return family


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> HTTPServer | None:
    """Serve /metrics on host:port in a daemon thread; None (and an error logged) if the port is taken.

    Metrics never take the service down: a busy port costs the metrics, not the inference.
    """
    try:
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); serving without metrics (choose a free --metrics-port, "
                  "or 0 to turn metrics off)", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
