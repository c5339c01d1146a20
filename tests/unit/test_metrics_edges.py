"""Edges of the metrics, request log lines and health state that the other observability tests leave open.

Each test names the bug it catches; docs/OBSERVABILITY.md is the reference for names and fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clients import logs
from clients.logs import JsonFormatter, TextFormatter
from engine_service.engine_loop import EngineUnavailable
from engine_service.health import NOT_SERVING, Health, _CanarySink
from engine_service.metrics import EngineMetrics
from engine_service.outputs import StepOutput
from tokenizer_service.metrics import RequestTrace, TextMetrics, clean_request_id, multi_request_id

DOCS = Path(__file__).resolve().parents[2] / "docs" / "OBSERVABILITY.md"


def samples(registry) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, *sorted((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def request_lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "llmserve.request"]


def engine_metrics() -> EngineMetrics:
    return EngineMetrics("m", dict, lambda: 0)


# ---- engine metrics -----------------------------------------------------------------------------------------


def test_a_step_of_several_tokens_observes_one_gap_per_token():
    """Inter-token latency of a step that produced n tokens: the step's time was not divided by n, or its n
    tokens were observed as one gap (docs: one observation per token after the first)."""
    m = engine_metrics()
    m.on_add("a", "a", arrival=0.0)
    m.on_step([StepOutput("a", [1], num_prompt_tokens=3)], started=0.5, ended=1.0)
    m.on_step([StepOutput("a", [2, 3])], started=1.0, ended=2.0)
    got = samples(m.registry)
    assert got[("llmserve:inter_token_latency_seconds_count",)] == 2
    assert got[("llmserve:inter_token_latency_seconds_sum",)] == pytest.approx(1.0)
    assert got[("llmserve:inter_token_latency_seconds_bucket", ("le", "0.5"))] == 2


def test_a_stop_string_abort_counts_and_logs_as_a_stop(caplog):
    """A request its tokenizer service ended on a stop string (the in-band abort says so) was counted and logged
    as `abort` when mark_stopped was lost."""
    m = engine_metrics()
    m.on_add("a", "trace-a", arrival=0.0)
    m.on_step([StepOutput("a", [1], num_prompt_tokens=3)], started=0.0, ended=1.0)
    m.mark_stopped("a")
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("a", [], "abort")], started=1.0, ended=1.5)
    got = samples(m.registry)
    assert got[("llmserve:request_success_total", ("finished_reason", "stop"))] == 1
    assert got[("llmserve:request_success_total", ("finished_reason", "abort"))] == 0
    assert [line["finish_reason"] for line in request_lines(caplog)] == ["stop"]


def test_a_request_ended_before_its_first_token_observes_e2e_only(caplog):
    """A request aborted before any token: its e2e latency was not observed (docs: arrival to finish, whatever the
    reason), or queue/prefill/decode times were observed from unset timestamps (negative values)."""
    m = engine_metrics()
    m.on_add("a", "a", arrival=1.0)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("a", [], "abort")], started=2.0, ended=3.0)
    got = samples(m.registry)
    assert got[("llmserve:e2e_request_latency_seconds_count",)] == 1
    assert got[("llmserve:e2e_request_latency_seconds_sum",)] == pytest.approx(2.0)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "time_to_first_token_seconds"):
        assert got[(f"llmserve:{name}_count",)] == 0, name
    (line,) = request_lines(caplog)
    assert line["queue_s"] is None and line["ttft_s"] is None and line["total_s"] == 2.0


def test_a_failed_request_line_keeps_the_cached_tokens_reported_earlier(caplog):
    """The engine reports cached tokens on a request's first output only: a later output (0) overwrote them, or the
    dying loop's line took them from its synthetic output, and the request's error line said cached_tokens=0."""
    m = engine_metrics()
    m.on_add("a", "a", arrival=0.0, prompt_tokens=12)
    m.on_step([StepOutput("a", [1], num_prompt_tokens=12, num_cached_tokens=8)], started=0.0, ended=1.0)
    m.on_step([StepOutput("a", [2], num_prompt_tokens=12)], started=1.0, ended=2.0)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        assert m.fail_live("engine failure: boom", now=3.0) == 1
    (line,) = request_lines(caplog)
    assert line["cached_tokens"] == 8 and line["prompt_tokens"] == 12 and line["completion_tokens"] == 2
    assert line["finish_reason"] == "error" and line["error"] == "engine failure: boom"


def test_the_log_lines_queue_time_ends_when_the_request_is_scheduled(caplog):
    """queue_s is arrival to first scheduled (docs): it was measured to the first token, so a long prefill read as
    queueing."""
    m = engine_metrics()
    scheduler = SimpleNamespace(running=[SimpleNamespace(request_id="a", admit_order=0)], num_admissions=1)
    engine = SimpleNamespace(scheduler=scheduler)
    m.on_add("a", "a", arrival=1.0)
    m.on_step([], started=2.0, ended=2.5, engine=engine)  # admitted: a first prefill chunk
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("a", [1], "length", 4)], started=2.5, ended=4.0, engine=engine)
    (line,) = request_lines(caplog)
    assert line["queue_s"] == 1.0 and line["ttft_s"] == 3.0 and line["total_s"] == 3.0


def test_a_preempted_request_keeps_its_first_scheduling_time():
    """Queue time ends when the scheduler FIRST admits the request (docs): a request preempted during its prefill
    and readmitted (a new admit_order) had its scheduled time moved to the readmission."""
    m = engine_metrics()
    scheduler = SimpleNamespace(running=[SimpleNamespace(request_id="a", admit_order=0)], num_admissions=1)
    engine = SimpleNamespace(scheduler=scheduler)
    m.on_add("a", "a", arrival=1.0)
    m.on_step([], started=2.0, ended=2.5, engine=engine)
    scheduler.running, scheduler.num_admissions = [SimpleNamespace(request_id="x", admit_order=1)], 2  # preempted
    m.on_step([], started=3.0, ended=3.5, engine=engine)
    scheduler.running, scheduler.num_admissions = [SimpleNamespace(request_id="a", admit_order=2)], 3  # readmitted
    m.on_step([StepOutput("a", [1], "length", 4)], started=5.0, ended=6.0, engine=engine)
    got = samples(m.registry)
    assert got[("llmserve:request_queue_time_seconds_sum",)] == pytest.approx(1.0)
    assert got[("llmserve:request_prefill_time_seconds_sum",)] == pytest.approx(4.0)


# ---- docs/OBSERVABILITY.md agrees with the code -------------------------------------------------------------


def documented_metrics(section: str) -> dict[str, str]:
    """name -> type from the metrics table under `### <section>`."""
    text = DOCS.read_text().split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    out = {}
    for row in text.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if row.startswith("| `llmserve:"):
            for name in re.findall(r"`(llmserve:[a-z0-9_]+)", cells[0]):
                out[name] = cells[1]
    return out


def exported_metrics(registry) -> dict[str, str]:
    types = re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(registry).decode(), re.M)
    return {name: kind for name, kind in types if not name.endswith("_created")}


def test_the_engine_exports_exactly_the_documented_metrics():
    """A metric renamed (num_preemptions_total, say) or added without its docs row: dashboards and alerts built
    from docs/OBSERVABILITY.md read nothing. The e2e test's list leaves several metrics out."""
    m = engine_metrics()
    m.watch_certificate(lambda: 1.0)
    assert exported_metrics(m.registry) == documented_metrics("Engine service")
    labels = {s.labels.get("finished_reason") for f in m.registry.collect() for s in f.samples
              if s.name == "llmserve:request_success_total"}
    assert labels == {"stop", "length", "abort", "error"}


def test_the_tokenizer_exports_exactly_the_documented_metrics():
    """As for the engine; and every finish reason the docs list (cancelled included) is exported from the start,
    at 0, so a rate() over it exists before the first such request."""
    m = TextMetrics("m", log_requests=False)
    m.watch(lambda: 0, lambda: 0)
    m.watch_certificate(lambda: 1.0)
    assert exported_metrics(m.registry) == documented_metrics("Tokenizer service")
    got = samples(m.registry)
    for reason in ("stop", "length", "abort", "error", "cancelled"):
        assert got[("llmserve:text_requests_total", ("finished_reason", reason))] == 0, reason
    for reason in ("unavailable", "resource_exhausted"):
        assert got[("llmserve:engine_request_retries_total", ("reason", reason))] == 0, reason


def documented_fields() -> tuple[set[str], set[str]]:
    """The request line's fields, engine and tokenizer (`error` included: 'when failed')."""
    table = DOCS.read_text().split("| field | engine | tokenizer | meaning |", 1)[1].split("\n\n", 1)[0]
    engine, tokenizer = set(), set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names = set(re.findall(r"`([a-z0-9_]+)`", cells[0]))
        engine |= names if cells[1] else set()
        tokenizer |= names if cells[2] else set()
    return engine, tokenizer


def test_request_lines_carry_the_documented_fields(caplog):
    """A request line's field renamed (detokenize_s, finish_reason, engine_request_id ...) or dropped: log
    pipelines that parse the documented names lose it."""
    engine_fields, tokenizer_fields = documented_fields()
    m = engine_metrics()
    m.on_add("s1:1:a", "a", arrival=0.0)
    m.on_add("s1:2:b", "b", arrival=0.0)
    tm = TextMetrics("m")
    trace = RequestTrace("t", engine="10.0.0.1:50051", finish_reason="error", error="INTERNAL: x")
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("s1:1:a", [1], "length", 3)], started=0.0, ended=1.0)
        m.fail_live("engine failure: x", now=2.0)
        tm.finish(trace)
        m.refused("c", "INVALID_ARGUMENT: at the door")  # before it had an engine id or an arrival stamp
        m.refused("d", "RESOURCE_EXHAUSTED: queue full", arrival=time.monotonic() - 0.5, prompt_tokens=4,
                  engine_request_id="s1:3:d")
    ok, failed, text, door, admission = request_lines(caplog)
    assert set(ok) == engine_fields - {"error"} and set(failed) == engine_fields
    assert set(text) == tokenizer_fields
    # Refusals had only request_id, the token counts, finish_reason and error: the documented fields, all of them.
    assert set(door) == set(admission) == engine_fields
    assert (door["engine_request_id"], door["ttft_s"], door["queue_s"], door["total_s"]) == (None, None, None, 0.0)
    assert (admission["engine_request_id"], admission["prompt_tokens"], admission["cached_tokens"]) == ("s1:3:d", 4, 0)
    assert 0.5 <= admission["total_s"] < 30


# ---- tokenizer service --------------------------------------------------------------------------------------


def test_a_cut_request_id_never_skips_characters():
    """clean_request_id cut at the first piece that did not fit: skipping a long escape and taking a later short
    character made an id that is not a prefix of the client's."""
    assert clean_request_id("a" * 127 + "é" + "b") == "a" * 127
    assert clean_request_id("100%") == "100%25"


def test_a_multi_request_id_does_not_encode_the_call_id_twice():
    """The call id comes in already cleaned: encoded again, `caf%C3%A9` became `caf%25C3%25A9`."""
    assert multi_request_id("caf%C3%A9", "x") == "caf%C3%A9/x"
    assert multi_request_id("100%25", "y") == "100%25/y"


def test_shutdown_turns_only_cancelled_requests_into_errors():
    """The service's shutdown error is for the calls its drain cut ('cancelled' otherwise): a request that finished
    on its own (length, stop) during the drain was counted as an error."""
    m = TextMetrics("m", log_requests=False)
    m.shutdown_error = "UNAVAILABLE: the service is shutting down"
    m.finish(RequestTrace("done", finish_reason="length"))
    m.finish(RequestTrace("cut"))
    got = samples(m.registry)
    assert got[("llmserve:text_requests_total", ("finished_reason", "length"))] == 1
    assert got[("llmserve:text_requests_total", ("finished_reason", "error"))] == 1
    assert got[("llmserve:text_requests_total", ("finished_reason", "cancelled"))] == 0


def test_the_tokenizer_lines_ttft_is_arrival_to_first_token(caplog):
    """ttft_s: arrival to first token (docs), not first token to finish."""
    m = TextMetrics("m")
    trace = RequestTrace("r", start=time.monotonic() - 5.0, finish_reason="length", engine="e:1")
    trace.first_token = trace.start + 0.25
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.finish(trace)
    (line,) = request_lines(caplog)
    assert line["ttft_s"] == 0.25 and line["total_s"] >= 5.0


# ---- log formats --------------------------------------------------------------------------------------------


def record(fields: dict | None = None, exc_info=None) -> logging.LogRecord:
    rec = logging.LogRecord("llmserve.request", logging.INFO, __file__, 1, "request finished", None, exc_info)
    if fields is not None:
        rec.fields = fields
    return rec


def test_text_values_with_an_equals_sign_or_a_quote_are_quoted():
    """A value holding '=' or '"' but no space was written bare: `a=b=c` or `say"hi` splits ambiguously."""
    line = TextFormatter().format(record({"request_id": "k=v", "error": 'say"hi'}))
    assert line.endswith(' request_id="k=v" error="say\\"hi"'), line


def test_json_lines_take_any_field_value_and_tracebacks():
    """A field value JSON cannot encode (an exception, a Path) broke the line; a record's traceback was dropped."""
    try:
        raise ValueError("bad")
    except ValueError:
        exc_info = sys.exc_info()
    obj = json.loads(JsonFormatter().format(record({"error": ValueError("x"), "path": Path("/m")}, exc_info)))
    assert obj["error"] == "x" and obj["path"] == "/m"
    assert "Traceback" in obj["exc"] and "ValueError: bad" in obj["exc"]


def test_json_timestamps_have_three_digit_milliseconds():
    """ts is ISO 8601 with milliseconds: 5 ms was written `.5Z` (which reads as 500 ms)."""
    rec = record()
    rec.created, rec.msecs = 1764547200.005, 5.0
    assert JsonFormatter().format(rec).startswith('{"ts": "2025-12-01T00:00:00.005Z"')


def test_configuring_logging_twice_keeps_one_handler(monkeypatch):
    """configure_logging added a handler instead of replacing them: every line came out twice."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure_logging("INFO", "json")
        logs.configure_logging("INFO", "text")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, TextFormatter)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()


# ---- health -------------------------------------------------------------------------------------------------


async def status(health: Health, service: str) -> int:
    context = SimpleNamespace(abort=None)
    response = await health.servicer.Check(health_pb2.HealthCheckRequest(service=service), context)
    return response.status


def test_shutdown_is_not_serving_for_good():
    """Draining or failed, the service must answer NOT_SERVING for the server and its service names, and a canary
    that passes later must not turn it SERVING again."""
    async def main():
        health = Health(["llmserve.engine.v1.Engine"])
        await health.set_serving(True)
        await health.shutdown()
        assert not health.serving
        await health.set_serving(True)
        assert [await status(health, s) for s in ("", "llmserve.engine.v1.Engine")] == [NOT_SERVING] * 2

    asyncio.run(main())


class FakeLoop:
    """What Health reads of an EngineLoop. finish: how the engine answers each canary ("ok", an error message, or
    None: never); unavailable: add() refuses with that reason; workers: the engine's tensor-parallel group."""

    def __init__(self, num_live: int = 0, stalled_s: float = 0.0, failure: str | None = None,
                 finish: str | None = None, unavailable: str | None = None, workers: object = None) -> None:
        self.num_live, self.failure, self.finish, self.unavailable = num_live, failure, finish, unavailable
        self.engine = SimpleNamespace(workers=workers) if workers is not None else None
        self.last_progress = time.monotonic() - stalled_s
        self.added, self.aborted, self.failed = [], [], []
        self.requests: list[tuple[str, list[int], object]] = []  # (request_id, prompt, params) of each add()
        self.outputs_delivered = self.requests_failed = 0  # traffic's: a test moves them

    def add(self, request_id, prompt, params, sink) -> None:
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable)
        self.added.append(request_id)
        self.requests.append((request_id, prompt, params))
        if self.finish == "ok":
            sink.on_output(StepOutput(request_id, [1], "length"))
        elif self.finish is not None:
            sink.on_failure("INTERNAL", self.finish)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def fail(self, message: str) -> None:
        self.failed.append(message)
        self.failure = message


def test_the_canary_passes_only_when_its_generation_finishes():
    """A canary that resolved on its first token passed an engine that broke on the second."""
    async def main():
        sink = _CanarySink(asyncio.get_running_loop().create_future())
        sink.on_output(StepOutput("canary:0", [1]))
        assert not sink.future.done()
        sink.on_output(StepOutput("canary:0", [2], "length"))
        assert sink.future.result() is None

    asyncio.run(main())


def test_a_canary_that_times_out_is_aborted():
    """A canary past its timeout was left in the engine: a stuck request every health interval."""
    async def main():
        loop = FakeLoop()
        problem = await Health([]).canary(loop, vocab_size=8, timeout_s=0.05)
        assert "more than 0.05s" in problem and loop.aborted == loop.added == ["canary:0"]

    asyncio.run(main())


def test_idle_canaries_stop_once_the_loop_failed():
    """The idle canary task ran on (forever) against a loop that had already failed."""
    async def main():
        loop = FakeLoop(failure="boom")
        await asyncio.wait_for(Health([]).run_idle_canaries(loop, 8, 0.01, 1.0, lambda: False), 2.0)
        assert loop.added == []

    asyncio.run(main())


def test_the_watchdog_fails_a_stalled_loop_only_while_requests_wait():
    """An idle loop makes no progress by design: the watchdog failed an idle engine whose last step was long ago."""
    async def main():
        idle = FakeLoop(num_live=0, stalled_s=100.0)
        task = asyncio.create_task(Health([]).watchdog(idle, stall_s=0.04))
        await asyncio.sleep(0.1)
        assert idle.failed == [] and not task.done()
        task.cancel()
        busy = FakeLoop(num_live=2, stalled_s=100.0)
        await asyncio.wait_for(Health([]).watchdog(busy, stall_s=0.04), 2.0)
        assert len(busy.failed) == 1 and "2 requests wait" in busy.failed[0]

    asyncio.run(main())


class _CountingLoop(FakeLoop):
    """As EngineLoop: a canary's delivered output counts in outputs_delivered, its failure in requests_failed."""

    def add(self, request_id, prompt, params, sink) -> None:
        super().add(request_id, prompt, params, sink)
        if self.finish == "ok":
            self.outputs_delivered += 1
        elif self.finish is not None:
            self.requests_failed += 1


def test_a_canarys_own_output_does_not_prove_failing_traffic():
    """After an idle canary passed, its own output counted as traffic delivered: a busy engine whose requests all
    failed was judged healthy by it, and health stayed SERVING (a mutation review: no test pinned the reset)."""
    async def main():
        health = Health(["svc"])
        loop = _CountingLoop(finish="ok")
        task = asyncio.create_task(health.run_idle_canaries(loop, 8, 0.02, 1.0, lambda: False))
        for _ in range(100):  # an idle canary passes
            await asyncio.sleep(0.01)
            if health.serving:
                break
        assert health.serving and loop.added
        loop.finish, loop.num_live = "device lost", 16  # the device breaks: every request fails, the canary too
        loop.requests_failed += 16
        await asyncio.sleep(0.2)
        serving = health.serving
        task.cancel()
        return serving

    assert asyncio.run(main()) is False


def test_the_watchdog_notices_a_long_stall_within_a_quarter_of_stall_s():
    """The watchdog looks every stall_s / 4 (at most 5 s): a loop already stalled is failed within a quarter of
    stall_s, not a whole one later (a mutation review: checking once per stall_s passed)."""
    async def main():
        loop = FakeLoop(num_live=1, stalled_s=60.0)
        await asyncio.wait_for(Health([]).watchdog(loop, stall_s=4.0), timeout=2.5)  # checks every 1 s
        return loop.failed

    [message] = asyncio.run(main())
    assert "watchdog" in message
