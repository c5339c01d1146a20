"""Metrics, log lines and request ids, piece by piece (the running services: tests/e2e/test_observability.py)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from clients.logs import JsonFormatter, TextFormatter
from engine_service.metrics import EngineMetrics, Histogram
from engine_service.outputs import StepOutput
from engine_service.server_config import parse_config as engine_config
from tests.unit.test_metrics_edges import samples
from tokenizer_service.config import parse_config as tokenizer_config
from tokenizer_service.metrics import RequestTrace, TextMetrics, request_id_from


def test_histogram_buckets_are_upper_bounds_and_weighted():
    h = Histogram((0.1, 1.0))
    h.observe(0.1)  # on a bound: that bucket (le means "less or equal")
    h.observe(0.5, 3)
    h.observe(7.0)
    assert h.counts == [1, 3, 1] and h.sum == pytest.approx(0.1 + 1.5 + 7.0)
    family = h.family("x", "doc", "m")
    assert [(s.labels.get("le"), s.value) for s in family.samples if s.name == "x_bucket"] == \
        [("0.1", 1), ("1.0", 4), ("+Inf", 5)]


def test_engine_metrics_account_one_step_at_a_time():
    stats = {"num_running": 2, "num_blocks": 10, "num_used_blocks": 4, "prefix_cache_queries": 30,
             "prefix_cache_hits": 16, "json_mask_hits": 40, "json_mask_misses": 3, "json_mask_compute_seconds": 0.25}
    m = EngineMetrics("tiny", lambda: stats, lambda: 3)
    seq_a, seq_b = SimpleNamespace(request_id="a", admit_order=0), SimpleNamespace(request_id="b", admit_order=1)
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[seq_a, seq_b]))
    m.on_add("a", "trace-a", arrival=1.0)
    m.on_add("b", "trace-b", arrival=1.5)
    m.on_step([], started=2.0, ended=2.5, engine=engine)  # both admitted: a chunked prefill, no tokens yet
    m.on_step([StepOutput("a", [5], None, 10), StepOutput("b", [6], None, 20), StepOutput("zzz", [1])],
              started=2.5, ended=3.0, engine=engine)
    m.on_step([StepOutput("a", [7], None, 10), StepOutput("b", [8], "length", 20, 16)], started=3.0, ended=3.25,
              engine=engine)
    m.on_step([StepOutput("a", [], "abort", 10)], started=3.25, ended=4.0, engine=engine)
    got = samples(m.registry)
    assert got[("llmserve:prompt_tokens_total",)] == 30  # the unknown request "zzz" is not counted
    assert got[("llmserve:generation_tokens_total",)] == 4
    assert got[("llmserve:time_to_first_token_seconds_sum",)] == pytest.approx((3.0 - 1.0) + (3.0 - 1.5))
    # Both second tokens came 0.25 s after the first: one weighted observation of two gaps.
    assert got[("llmserve:inter_token_latency_seconds_count",)] == 2
    assert got[("llmserve:inter_token_latency_seconds_sum",)] == pytest.approx(0.5)
    assert got[("llmserve:request_queue_time_seconds_sum",)] == pytest.approx((2.0 - 1.0) + (2.0 - 1.5))
    assert got[("llmserve:request_prefill_time_seconds_sum",)] == pytest.approx(1.0 + 1.0)
    assert got[("llmserve:request_decode_time_seconds_sum",)] == pytest.approx((3.25 - 3.0) + (4.0 - 3.0))
    assert got[("llmserve:e2e_request_latency_seconds_sum",)] == pytest.approx((3.25 - 1.5) + (4.0 - 1.0))
    assert got[("llmserve:request_success_total", ("finished_reason", "length"))] == 1
    assert got[("llmserve:request_success_total", ("finished_reason", "abort"))] == 1
    assert got[("llmserve:request_success_total", ("finished_reason", "stop"))] == 0
    assert got[("llmserve:num_requests_running",)] == 2 and got[("llmserve:num_requests_waiting",)] == 3
    assert got[("llmserve:kv_cache_usage_perc",)] == pytest.approx(0.4)
    assert got[("llmserve:prefix_cache_hits_total",)] == 16 and got[("llmserve:prefix_cache_queries_total",)] == 30
    assert got[("llmserve:json_mask_hits_total",)] == 40 and got[("llmserve:json_mask_misses_total",)] == 3
    assert got[("llmserve:json_mask_compute_seconds_total",)] == 0.25


def test_engine_request_line_carries_the_trace_id(caplog):
    m = EngineMetrics("tiny", dict, lambda: 0)
    m.on_add("s1:7", "client-id-1", arrival=0.0)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("s1:7", [3], "stop", 12, 8)], started=0.5, ended=1.0)
    (record,) = caplog.records
    assert record.fields["request_id"] == "client-id-1" and record.fields["engine_request_id"] == "s1:7"
    assert record.fields["completion_tokens"] == 1 and record.fields["cached_tokens"] == 8
    assert record.fields["ttft_s"] == 1.0 and record.fields["total_s"] == 1.0
    assert record.fields["finish_reason"] == "stop"


def test_json_and_text_log_lines():
    record = logging.LogRecord("llmserve.request", logging.INFO, __file__, 1, "request finished", (), None)
    record.fields = {"request_id": "r-1", "completion_tokens": 3}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "request finished" and obj["request_id"] == "r-1" and obj["completion_tokens"] == 3
    assert obj["level"] == "INFO" and obj["ts"].endswith("Z")
    assert TextFormatter().format(record).endswith("request finished request_id=r-1 completion_tokens=3")


def test_request_ids_from_metadata():
    assert request_id_from([("other", "x"), ("x-request-id", "abc")], "fallback") == "abc"
    assert request_id_from([], "fallback") == "fallback"
    generated = {request_id_from(None) for _ in range(3)}
    assert len(generated) == 3 and all(len(g) == 32 for g in generated)
    assert len(request_id_from([("x-request-id", "y" * 1000)])) == 128


def test_text_metrics_count_finished_requests():
    m = TextMetrics("tiny", log_requests=False)
    m.watch(lambda: 2, lambda: 1)
    trace = RequestTrace("r")
    trace.detokenize_s, trace.finish_reason, trace.engine = 0.002, "length", "10.0.0.1:50051"
    trace.first_token = trace.start + 0.01  # served: its tokens came
    m.retried(trace, "resource_exhausted")  # an engine's queue was full: sent to another
    m.finish(trace)
    m.finish(RequestTrace("refused", finish_reason="error", error="INVALID_ARGUMENT: prompt: empty"))
    m.finish(RequestTrace("full everywhere", finish_reason="error", engine="10.0.0.2:50051",
                          error="RESOURCE_EXHAUSTED: the engine's queue is full"))  # sent, but refused: no token
    got = samples(m.registry)
    assert got[("llmserve:text_requests_total", ("finished_reason", "length"))] == 1
    assert got[("llmserve:text_requests_total", ("finished_reason", "error"))] == 2
    # A refusal (by the service, or by the engines) had nothing to detokenize: it added a 0 s observation that
    # pulled the quantiles down.
    assert got[("llmserve:detokenize_time_seconds_count",)] == 1
    assert got[("llmserve:text_requests_inflight",)] == 2 and got[("llmserve:engines_connected",)] == 1
    assert got[("llmserve:engine_stream_reconnects_total",)] == 0
    assert trace.retries == 1 and got[("llmserve:engine_request_retries_total", ("reason", "resource_exhausted"))] == 1
    assert got[("llmserve:engine_request_retries_total", ("reason", "unavailable"))] == 0


def test_metrics_port_and_log_format_settings():
    assert engine_config(["--model", "/m"], {}).metrics_port == 9400
    assert engine_config(["--model", "/m"], {"ENGINE_METRICS_PORT": "0"}).metrics_port == 0
    assert tokenizer_config(["--model", "/m", "--engines", "e:1"], {}).metrics_port == 9401
    cfg = tokenizer_config(["--model", "/m", "--engines", "e:1", "--metrics-port", "9555", "--log-format", "json"],
                           {"TOKENIZER_METRICS_PORT": "1"})
    assert cfg.metrics_port == 9555 and cfg.log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        engine_config(["--model", "/m", "--log-format", "xml"], {})
    with pytest.raises(ValueError, match="metrics_port"):
        engine_config(["--model", "/m", "--metrics-port", "70000"], {})


def test_log_level_takes_any_case_and_refuses_unknown_names():
    """ENGINE_LOG_LEVEL=debug in a ConfigMap must not crash-loop the pod with logging's own traceback."""
    from clients import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for config in (engine_config(["--model", "/m"], {"ENGINE_LOG_LEVEL": "debug"}),
                       tokenizer_config(["--model", "/m", "--engines", "e:1", "--log-level", "Warning"], {})):
            logs.configure_logging(config.log_level, config.log_format)
            assert root.level == getattr(logging, config.log_level.upper())
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    with pytest.raises(ValueError, match="log_level must be one of DEBUG, INFO"):
        engine_config(["--model", "/m", "--log-level", "verbose"], {})
    with pytest.raises(ValueError, match="log_level"):
        tokenizer_config(["--model", "/m", "--engines", "e:1"], {"TOKENIZER_LOG_LEVEL": "trace"})


@contextlib.contextmanager
def json_logs(logs, monkeypatch):
    """logs.configure_logging("INFO", "json") writing to a StringIO (yielded); the root logger restored after."""
    stream = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure_logging("INFO", "json")
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_configure_logging_writes_json_lines(monkeypatch):
    from clients import logs

    with json_logs(logs, monkeypatch) as stream:
        logging.getLogger("llmserve.request").info("request finished", extra={"fields": {"request_id": "q"}})
    assert json.loads(stream.getvalue().strip().splitlines()[-1])["request_id"] == "q"


def test_engine_service_logs_the_request_id_from_metadata_or_frame(caplog):
    from clients.engine_client import EngineClient
    from protos.llmserve.engine.v1 import engine_pb2 as pb
    from tests.fake_engine import FakeEngine
    from tests.unit.test_engine_service_fake import Running, wait_serving

    server = Running(FakeEngine())
    try:
        with caplog.at_level(logging.INFO, logger="llmserve.request"), EngineClient(server.target, timeout=10) as c:
            wait_serving(c)
            request = pb.NewRequest(prompt_token_ids=[1, 2], sampling_params=pb.SamplingParams(max_tokens=3))
            list(c.stub.GenerateStream(request, metadata=(("x-request-id", "from-metadata"),), timeout=10))
            list(c.generate([1, 2], trace_id="from-frame", max_tokens=2))
            for _ in range(100):
                if len([r for r in caplog.records if r.name == "llmserve.request"]) >= 2:
                    break
                time.sleep(0.02)
    finally:
        server.stop()
    lines = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "llmserve.request"}
    assert lines["from-metadata"]["completion_tokens"] == 3 and lines["from-frame"]["completion_tokens"] == 2


def test_text_log_lines_survive_values_with_spaces_quotes_and_newlines():
    """key=value fields were written bare: an error message with spaces or a newline (a CUDA error), or a
    client's request id such as 'a finish_reason=stop', split or forged fields."""
    import re

    formatter = TextFormatter()
    fields = {"request_id": "a finish_reason=stop", "completion_tokens": 3, "ttft_s": None, "finish_reason": "error",
              "error": 'INTERNAL: CUDA error:\nan illegal "memory" access', "empty": "",
              "trace": "\x1b[31mred\u2028\x00"}  # an ANSI escape, a line separator, a NUL: quoted too
    record = logging.LogRecord("llmserve.request", logging.INFO, __file__, 1, "request finished", None, None)
    record.fields = fields
    line = formatter.format(record)
    assert "\n" not in line and line.isprintable(), repr(line)
    parsed = {k: json.loads(v) if v.startswith('"') else v
              for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.split("request finished", 1)[1])}
    assert parsed == {k: str(v) for k, v in fields.items()}


def test_tokenizer_names_the_model_as_the_engine_does(demo_model_dir, tmp_path):
    """The tokenizer service took config.json's _name_or_path (often an uploader's local path) as model_name,
    the engine the directory's name: the two services' metrics labels did not join."""
    import shutil

    from tokenizer_service.server import load_tokenizer

    model = tmp_path / "my-finetune"
    shutil.copytree(demo_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": "/home/someone/ckpt-3000"}))
    _, name, _ = load_tokenizer(str(model))
    assert name == "my-finetune"


def test_json_logs_take_in_transformers_own_lines(monkeypatch):
    """transformers writes through a stderr handler of its own: with --log-format json its warnings ('Token
    indices sequence length is longer than ...') came out as plain text among the JSON lines."""
    from transformers.utils import logging as hf_logging

    from clients import logs

    try:
        with json_logs(logs, monkeypatch) as stream:
            hf_logging.get_logger("transformers.tokenization_utils_base").warning("Token indices sequence length")
    finally:
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
    lines = stream.getvalue().strip().splitlines()
    assert lines and all(json.loads(line)["msg"] for line in lines)
    assert any("Token indices" in json.loads(line)["msg"] for line in lines)


def test_json_logs_start_with_json_where_torch_is_absent():
    """The tokenizer image has no torch: importing transformers there printed an advisory ('PyTorch was not
    found ...') through transformers' own handler as the first, plain-text line of every pod's log."""
    code = ("import sys; sys.modules['torch'] = None\n"  # as the tokenizer Dockerfile leaves it out
            "import logging\n"
            "from clients.logs import configure_logging\n"
            "configure_logging('INFO', 'json')\n"
            "logging.getLogger('tokenizer_service').info('configured')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines
    assert json.loads(lines[-1])["msg"] == "configured"


def test_queue_time_ends_when_a_priority_request_is_admitted_before_older_ones():
    """A request of a lower priority value is admitted into `running` before the running ones of a higher value;
    the metrics looked for newly admitted requests at the tail only, so its queue time ran on to its first token
    (a chunked prefill's earlier chunks counted as queueing, not prefill)."""
    import types

    from engine_service.metrics import EngineMetrics
    from engine_service.outputs import StepOutput

    def seq(rid: str, order: int):
        return types.SimpleNamespace(request_id=rid, admit_order=order)

    scheduler = types.SimpleNamespace(running=[], num_admissions=0)
    engine = types.SimpleNamespace(scheduler=scheduler)
    metrics = EngineMetrics("m", lambda: {}, lambda: 0, log_requests=False)
    metrics.on_add("a", "a", 0.0, 4)
    scheduler.running, scheduler.num_admissions = [seq("a", 0)], 1
    metrics.on_step([StepOutput("a", [7], num_prompt_tokens=4)], 1.0, 1.5, engine)
    metrics.on_add("b", "b", 2.0, 200)
    scheduler.running, scheduler.num_admissions = [seq("b", 1), seq("a", 0)], 2  # b before a: a lower value
    for started in (3.0, 4.0, 5.0):  # b prefills in three chunks; a decodes
        metrics.on_step([StepOutput("a", [7])], started, started + 0.5, engine)
    metrics.on_step([StepOutput("a", [7]), StepOutput("b", [9], num_prompt_tokens=200)], 6.0, 6.5, engine)
    b = metrics._live["b"]
    assert b.scheduled == 3.0 and b.first_token == 6.5  # queued 1 s, prefilled 3.5 s


def test_the_running_list_is_walked_only_on_steps_that_admitted():
    """When the newest admission was gone from `running` before the metrics looked (it finished in the step that
    admitted it), the walk's high-water mark never caught up, and every later step walked the whole list."""
    import types

    from engine_service.metrics import EngineMetrics
    from engine_service.outputs import StepOutput

    class Counted(list):
        walks = 0

        def __iter__(self):
            Counted.walks += 1
            return super().__iter__()

    seqs = [types.SimpleNamespace(request_id=f"r{i}", admit_order=i) for i in range(8)]
    scheduler = types.SimpleNamespace(running=Counted(seqs), num_admissions=8)
    engine = types.SimpleNamespace(scheduler=scheduler)
    metrics = EngineMetrics("m", lambda: {}, lambda: 0, log_requests=False)
    for seq in seqs:
        metrics.on_add(seq.request_id, seq.request_id, 0.0, 4)
    metrics.on_add("short", "short", 0.0, 4)
    metrics.on_step([StepOutput("r0", [1])], 1.0, 1.1, engine)
    assert Counted.walks == 1 and all(metrics._live[s.request_id].scheduled == 1.0 for s in seqs)
    scheduler.num_admissions = 9  # "short" was admitted and finished within one step: never in `running`
    metrics.on_step([StepOutput("short", [1], finish_reason="stop", num_prompt_tokens=4)], 2.0, 2.1, engine)
    Counted.walks = 0
    for k in range(50):
        metrics.on_step([StepOutput("r0", [1])], 3.0 + k, 3.1 + k, engine)
    assert Counted.walks == 0


def test_a_request_with_n_completions_logs_their_retries():
    """Each completion's retries were counted, but the request's line (the completions summed) said 0."""
    from tokenizer_service.servicer import _sum_parts

    parts = [RequestTrace("r"), RequestTrace("r"), RequestTrace("r")]
    parts[0].retries, parts[2].retries = 1, 2
    trace = RequestTrace("r")
    _sum_parts(trace, parts)
    assert trace.retries == 3


def test_an_n_requests_reason_when_closed_early_is_its_worst_completions():
    """An n > 1 request closed before its completions' ends were read (still "cancelled") takes the first of
    cancelled, error, length among its completions' reasons, else stop, and the first error; a request whose own
    reason is already decided is left alone. No test pinned the order (length before error passed)."""
    from tokenizer_service.servicer import _decide_from_parts

    def decided(*parts: tuple[str, str], own: str = "cancelled") -> tuple[str, str]:
        trace = RequestTrace("r", finish_reason=own)
        _decide_from_parts(trace, [RequestTrace("r", finish_reason=r, error=e) for r, e in parts])
        return trace.finish_reason, trace.error

    assert decided(("length", ""), ("error", "INTERNAL: x")) == ("error", "INTERNAL: x")
    assert decided(("error", "INTERNAL: x"), ("cancelled", "")) == ("cancelled", "INTERNAL: x")
    assert decided(("stop", ""), ("length", "")) == ("length", "")
    assert decided(("stop", ""), ("stop", "")) == ("stop", "")
    assert decided(("error", "INTERNAL: x"), own="length") == ("length", "")


def test_an_empty_request_id_header_is_no_id():
    """An empty x-request-id header falls back to the request's own field, else a generated id: taken as given,
    the request was logged and echoed under "" (a mutation review)."""
    from tokenizer_service.metrics import REQUEST_ID_HEADER

    assert request_id_from([(REQUEST_ID_HEADER, "")], "from-the-field") == "from-the-field"
    generated = request_id_from([(REQUEST_ID_HEADER, "")])
    assert len(generated) == 32 and generated != request_id_from([(REQUEST_ID_HEADER, "")])  # a fresh uuid4 hex
    assert request_id_from([(REQUEST_ID_HEADER, ""), (REQUEST_ID_HEADER, "second")]) == "second"


def test_a_request_without_a_token_logs_no_ttft(caplog):
    """ttft_s is null for a request that got no token, not first_token (0) less start, a large negative number
    that log-based latency dashboards would average in (a mutation review)."""
    metrics = TextMetrics("tiny", log_requests=True)
    with caplog.at_level(logging.INFO):
        metrics.finish(RequestTrace("refused", finish_reason="error", error="INVALID_ARGUMENT: prompt: empty"))
        served = RequestTrace("served", finish_reason="length", engine="e1")
        served.first_token = served.start + 0.25
        metrics.finish(served)
    fields = {r.fields["request_id"]: r.fields for r in caplog.records if getattr(r, "fields", None)}
    assert fields["refused"]["ttft_s"] is None and fields["served"]["ttft_s"] == 0.25


def test_a_trace_finished_twice_is_counted_and_logged_once(caplog):
    """TextMetrics.finish is once per trace (Generate's finally calls it after _generate's did): without the guard
    every request was counted and logged twice; only a chaos test caught it (a mutation review)."""
    from tests.unit.test_metrics_edges import samples

    metrics = TextMetrics("tiny", log_requests=True)
    trace = RequestTrace("r", finish_reason="length", engine="e1")
    trace.first_token = trace.start + 0.01
    with caplog.at_level(logging.INFO):
        metrics.finish(trace)
        metrics.finish(trace)
    got = samples(metrics.registry)
    assert got[("llmserve:text_requests_total", ("finished_reason", "length"))] == 1
    assert got[("llmserve:detokenize_time_seconds_count",)] == 1
    assert sum(r.getMessage() == "request finished" for r in caplog.records) == 1
