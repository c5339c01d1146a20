"""Prometheus metrics, request ids and per-request log lines of the tokenizer service (docs/OBSERVABILITY.md).

Request ids: a client may send one in the `x-request-id` metadata of a call; otherwise one is generated. It
goes to the engine inside the request (`NewRequest.trace_id`), so both services log the same id. Each server
has its own CollectorRegistry, so several servers in one process (tests) never share series.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from clients.logs import REQUEST_LOGGER

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)

PREFIX = "llmserve:"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# Per-request CPU work in seconds: tokenizing a prompt, and detokenizing a whole completion.
TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def clean_request_id(value: str, limit: int = MAX_REQUEST_ID_CHARS) -> str:
    """A client's id as the service uses it: '%' and characters outside printable ASCII percent-encoded
    (UTF-8), cut to `limit` characters without splitting an escape. It goes back in the call's trailing
    metadata, which takes printable ASCII only (a request_id of "café-1" failed a finished Generate with
    INTERNAL), and into log lines as it is."""
    out: list[str] = []
    size = 0
    for c in value:
        piece = c if " " <= c <= "~" and c != "%" else urllib.parse.quote(c, safe="")
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def multi_request_id(call_id: str, request_id: str) -> str:
    """A GenerateMulti request's id: `<call id>/<its request_id>`, the call's part at most half of the 128
    characters, so that a long call id never hides which request a line is about."""
    call = clean_request_id(urllib.parse.unquote(call_id), MAX_REQUEST_ID_CHARS // 2)
    return f"{call}/{clean_request_id(request_id, MAX_REQUEST_ID_CHARS - len(call) - 1)}"


def request_id_from(metadata: Iterable[tuple[str, str]] | None, fallback: str = "") -> str:
    """The call's x-request-id, else fallback, else a new random id; cleaned (clean_request_id)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return clean_request_id(value)
    return clean_request_id(fallback) or uuid.uuid4().hex


@dataclass(slots=True)
class RequestTrace:
    """One request as this service saw it, for its log line (times from time.monotonic)."""

    request_id: str
    start: float = field(default_factory=time.monotonic)
    first_token: float = 0.0
    detokenize_s: float = 0.0  # incremental detokenization and stop strings, summed over the request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "cancelled"  # until a finish or an error says otherwise
    error: str = ""
    engine: str = ""
    retries: int = 0  # times the request was sent to an engine again (one lost it, or refused it, before a token)
    logged: bool = False  # finish() ran: a request is counted and logged once
    streamed_tokens: int = 0  # token ids put on a GenerateMulti call for it (n completions together): an abort's usage
    # (text, token ids, logprobs) generated but held back for --stream-interval, not yet sent: whoever ends the
    # request early sends them first (a GenerateMulti abort, this trace's; the first error of n completions, each
    # completion's, which they hold in their own traces).
    held: tuple | None = None
    # The request's TextStream while it streams: an early end flushes what it holds back (an incomplete character,
    # a possible stop-string prefix) into the held message, so the ids sent come with their text.
    text: Any = None
    # An n > 1 request's while it streams: a function that stops its completions and returns the responses they
    # produced that were not yet handed on (queued, or held back), each completion's in order; a GenerateMulti
    # abort sends them before its ABORT.
    unsent: Callable[[], list] | None = None


class TextMetrics:
    """The tokenizer service's Prometheus series, labelled with the model name."""

    def __init__(self, model_name: str, log_requests: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._log_requests = log_requests
        # Set when the service itself cuts the calls its drain left: those are errors, not "cancelled".
        self.shutdown_error = ""
        model = {"model_name": model_name}
        labels = list(model)
        self.tokenize_time = Histogram(
            PREFIX + "tokenize_time_seconds", "Turning one request's prompt or chat into token ids.", labels,
            registry=self.registry, buckets=TIME_BUCKETS).labels(**model)
        self.detokenize_time = Histogram(
            PREFIX + "detokenize_time_seconds", "Turning one request's generated ids into text (whole request).",
            labels, registry=self.registry, buckets=TIME_BUCKETS).labels(**model)
        self.reconnects = Counter(
            PREFIX + "engine_stream_reconnects", "Engine streams lost or refused, then retried.", labels,
            registry=self.registry).labels(**model)
        self._finished = Counter(PREFIX + "text_requests", "Finished text requests by finish reason.",
                                 [*labels, "finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error", "cancelled"):
            self._finished.labels(model_name=model_name, finished_reason=reason)
        self._retries = Counter(PREFIX + "engine_request_retries", "Requests sent to an engine again, by why the "
                                "last one did not serve them before a token: unavailable (lost, draining) or "
                                "resource_exhausted (its queue full).", [*labels, "reason"], registry=self.registry)
        for reason in ("unavailable", "resource_exhausted"):
            self._retries.labels(model_name=model_name, reason=reason)
        self._model = model_name
        self.inflight = Gauge(PREFIX + "text_requests_inflight",
                              "Requests in progress in this service, each of a request's n completions counted (as "
                              "max_inflight counts them).", labels, registry=self.registry).labels(**model)
        self.engines = Gauge(PREFIX + "engines_connected", "Engine streams ready for new requests.", labels,
                             registry=self.registry).labels(**model)

    def watch(self, inflight: Callable[[], float], engines: Callable[[], float]) -> None:
        """Read the two gauges from the service when scraped."""
        self.inflight.set_function(inflight)
        self.engines.set_function(engines)

    def watch_certificate(self, expiry: Callable[[], float]) -> None:
        """Export when the served TLS certificate expires (ServerTls.expiry), read when scraped."""
        gauge = Gauge(PREFIX + "tls_certificate_expiry_timestamp_seconds",
                      "When the TLS certificate served expires (its notAfter, Unix time).", ["model_name"],
                      registry=self.registry)
        gauge.labels(model_name=self._model).set_function(expiry)

    def retried(self, trace: RequestTrace, reason: str) -> None:
        """The request goes to an engine again: the last one lost or refused it before a token; reason: the
        status code's name in lower case (unavailable, resource_exhausted)."""
        trace.retries += 1
        self._retries.labels(model_name=self._model, reason=reason).inc()

    def finish(self, trace: RequestTrace) -> None:
        """Account a finished request and write its log line (once per trace)."""
        if trace.logged:
            return
        trace.logged = True
        if trace.finish_reason == "cancelled" and self.shutdown_error:
            trace.finish_reason, trace.error = "error", self.shutdown_error
        now = time.monotonic()
        # A request refused before generation (by the service, or by every engine it was sent to: queues full) had
        # nothing to detokenize: no 0 s observation, which under overload pulled the quantiles toward zero.
        if trace.engine and trace.first_token:
            self.detokenize_time.observe(trace.detokenize_s)
        self._finished.labels(model_name=self._model, finished_reason=trace.finish_reason).inc()
        if not self._log_requests:
            return
        request_log.info("request finished", extra={"fields": {
            "request_id": trace.request_id, "prompt_tokens": trace.prompt_tokens,
            "completion_tokens": trace.completion_tokens, "cached_tokens": trace.cached_tokens,
            "ttft_s": round(trace.first_token - trace.start, 6) if trace.first_token else None,
            "total_s": round(now - trace.start, 6), "detokenize_s": round(trace.detokenize_s, 6),
            "finish_reason": trace.finish_reason, "engine": trace.engine, "retries": trace.retries,
            **({"error": trace.error} if trace.error else {}),
        }})


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> HTTPServer | None:
    """Serve /metrics on host:port in a daemon thread; None (and an error logged) if the port is taken.

    Metrics never take the service down: a busy port costs the metrics, not the requests.
    """
    try:
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); serving without metrics (choose a free --metrics-port, "
                  "or 0 to turn metrics off)", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
