"""docs/OBSERVABILITY.md as an operator reads it to build dashboards, alerts and log pipelines, checked against the
code in-process: every metric name, label and label value the docs refer to (their PromQL included) is exported,
every series carries `model_name`, the histograms' low buckets are the ones the docs state, the example log lines
have the fields the code writes, and the text format puts a record's fields where the docs say.

A metric or label renamed in the code breaks dashboards silently: these tests fail instead. The neighbours
(tests/unit/test_metrics_edges.py, test_observability_pieces.py) check the metrics tables and request fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clients.logs import JsonFormatter, TextFormatter
from engine_service.metrics import EngineMetrics, serve_metrics
from engine_service.outputs import StepOutput
from tests.support import free_port
from tokenizer_service.metrics import MAX_REQUEST_ID_CHARS, RequestTrace, TextMetrics, multi_request_id

DOCS = Path(__file__).resolve().parents[2] / "docs"
OBSERVABILITY = DOCS / "OBSERVABILITY.md"
MODEL = "my-model"


def engine_metrics(**kwargs) -> EngineMetrics:
    m = EngineMetrics(MODEL, dict, lambda: 0, **kwargs)
    m.watch_certificate(lambda: 1.0)  # the TLS gauge exists only when the service serves TLS
    return m


def text_metrics(**kwargs) -> TextMetrics:
    m = TextMetrics(MODEL, **kwargs)
    m.watch(lambda: 0, lambda: 0)
    m.watch_certificate(lambda: 1.0)
    return m


def families(registry) -> dict[str, object]:
    """Metric families as Prometheus parses the scrape: name (counters with `_total`) -> family."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name.endswith("_created"):
            continue  # prometheus-client's start times (test_created_series_come_from_the_tokenizer_only)
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def series(registry) -> dict[str, list[dict[str, str]]]:
    """Every name a query can select -> its samples' labels: sample names (`_bucket`, `_sum`, `_count`,
    `_created` included), and a histogram's own name (what the docs name; a query takes `_bucket` of it)."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
            if family.type == "histogram" and sample.name == family.name + "_count":
                out.setdefault(family.name, []).append(dict(sample.labels))
    return out


def documented_rows(section: str) -> dict[str, set[str]]:
    """name -> label names from the `### <section>` metrics table (`name{label,...}` in the name cell)."""
    text = OBSERVABILITY.read_text().split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    out = {}
    for row in text.splitlines():
        if row.startswith("| `llmserve:"):
            cell = row.strip().strip("|").split("|")[0]
            for name, labels in re.findall(r"`(llmserve:[a-z0-9_]+)(?:\{([a-z_, ]*)\})?`", cell):
                out[name] = {label.strip() for label in labels.split(",") if label.strip()}
    return out


# ---- metric names, labels and the docs' queries -------------------------------------------------------------


def test_every_series_carries_model_name_and_exactly_the_documented_labels():
    """'Every series has the label model_name' (so the two services' series join), and each metric's other labels
    are the ones its table row names: a label renamed (finished_reason to reason, say) or one added, undocumented,
    splits or empties every panel that groups by it."""
    for section, registry in (("Engine service", engine_metrics().registry),
                              ("Tokenizer service", text_metrics().registry)):
        documented = documented_rows(section)
        got = families(registry)
        assert set(got) == set(documented), section
        for name, family in got.items():
            for sample in family.samples:
                labels = dict(sample.labels)
                assert labels.pop("model_name", None) == MODEL, (section, sample)
                labels.pop("le", None) if sample.name.endswith("_bucket") else None
                assert set(labels) == documented[name], (section, name, sample.name, sorted(labels))


def selectors(text: str) -> list[tuple[str, dict[str, str]]]:
    """Every metric a backticked span of the docs selects: `llmserve:name`, `name{label="value"}`, or a bare
    `name_total` (the docs' short form), with the label matchers given."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for name, matchers in re.findall(r"((?:llmserve:)?[a-z][a-z0-9_]*)(\{[^}]*\})?", span):
            if not name.startswith("llmserve:"):
                if not name.endswith("_total"):
                    continue  # words, functions (`time()`), numbers
                name = "llmserve:" + name
            pairs = dict(re.findall(r'([a-z_]+)\s*=~?\s*"([^"]*)"', matchers or ""))
            out.append((name, pairs))
    return out


def test_every_metric_the_docs_query_is_exported_with_those_labels():
    """The docs' metric references and PromQL (the TLS expiry alert, `request_success_total{finished_reason=
    "error"}`, ENGINE.md's mask-time counter ...) must select series the services export, with the label names
    and values they use: a query over a renamed metric or label returns nothing, and an alert on it never fires."""
    exported: dict[str, list[dict[str, str]]] = {}
    for registry in (engine_metrics().registry, text_metrics().registry):
        for name, labels in series(registry).items():
            exported.setdefault(name, []).extend(labels)
    checked = 0
    for doc in sorted(DOCS.glob("*.md")):
        for name, matchers in selectors(doc.read_text()):
            assert name in exported, f"{doc.name}: `{name}` is not a series either service exports"
            assert any(all(labels.get(k) == v for k, v in matchers.items()) for labels in exported[name]), \
                f"{doc.name}: no series `{name}` has the labels {matchers}"
            checked += 1
    assert checked >= 25  # the tables' rows and the references in the prose: the parser still finds them


def test_the_tls_expiry_alert_reads_a_unix_time():
    """The alert `llmserve:tls_certificate_expiry_timestamp_seconds - time() < 7 * 86400` needs a Unix time in
    seconds (notAfter), not a remaining duration: the gauge exports what the service's expiry() returns, on both."""
    alert = re.search(r"`(llmserve:tls_certificate_expiry_timestamp_seconds - time\(\) < 7 \* 86400)`",
                      OBSERVABILITY.read_text())
    assert alert is not None, "the docs' TLS alert changed: check it against the gauge"
    not_after = time.time() + 3 * 86400
    for metrics in (EngineMetrics(MODEL, dict, lambda: 0), TextMetrics(MODEL)):
        metrics.watch_certificate(lambda: not_after)
        (value,) = [s.value for s in families(metrics.registry)[
            "llmserve:tls_certificate_expiry_timestamp_seconds"].samples]
        assert value == not_after and value - time.time() < 7 * 86400  # the alert would fire


def test_created_series_come_from_the_tokenizer_only():
    """'The tokenizer service's counters and histograms also export *_created series; the engine's own collector
    has none': a query summing `{__name__=~"llmserve:.*"}` or a recording rule relies on which exist."""
    engine = [name for name in series(engine_metrics().registry) if name.endswith("_created")]
    assert engine == []
    tokenizer = {name.removesuffix("_created") for name in series(text_metrics().registry)
                 if name.endswith("_created")}
    kinds = {name: f.type for name, f in families(text_metrics().registry).items()}
    want = {name.removesuffix("_total") for name, kind in kinds.items() if kind in ("counter", "histogram")}
    assert tokenizer == want


def low_buckets(sentence: str) -> list[float]:
    """'at 0.5, 1, 1.5, 2 and 2.5 ms' -> [0.0005, 0.001, ...] (seconds)."""
    return [float(v) / 1000 for v in re.findall(r"\d+(?:\.\d+)?", sentence)]


def test_the_histograms_low_buckets_are_the_documented_ones():
    """The docs state the fine low ends that let histogram_quantile tell a 1.2 ms decode step from a 2.5 ms one:
    'inter-token latency at 0.5, 1, 1.5, 2 and 2.5 ms ..., time to first token at 1, 2.5 and 5 ms'."""
    text = " ".join(OBSERVABILITY.read_text().split())
    itl = re.search(r"inter-token latency at ([\d., and]+) ms", text)
    ttft = re.search(r"time to first token at ([\d., and]+) ms", text)
    assert itl and ttft, "the docs' bucket sentence changed: check it against the code"
    got = families(engine_metrics().registry)
    for name, stated in (("llmserve:inter_token_latency_seconds", low_buckets(itl.group(1))),
                         ("llmserve:time_to_first_token_seconds", low_buckets(ttft.group(1)))):
        bounds = [float(s.labels["le"]) for s in got[name].samples if s.name == name + "_bucket"]
        assert bounds[: len(stated)] == pytest.approx(stated), name
        assert bounds[-1] == float("inf")


def test_the_metrics_endpoint_serves_the_registry_over_http():
    """'GET /metrics, plain HTTP': the endpoint answers with the exposition text of the service's registry."""
    metrics = engine_metrics()
    server = serve_metrics(metrics.registry, "127.0.0.1", 0)
    assert server is not None
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert f'llmserve:request_success_total{{finished_reason="error",model_name="{MODEL}"}} 0.0' in body \
        or f'llmserve:request_success_total{{model_name="{MODEL}",finished_reason="error"}} 0.0' in body


def test_a_refusal_counts_as_an_error_and_is_not_a_latency():
    """'refusals are counted in request_success_total{finished_reason="error"} only': a refusal observed in the
    e2e histogram (at 0 s, or its time at the door) pulls the latency quantiles down exactly under overload."""
    m = engine_metrics(log_requests=False)
    m.refused("r", "RESOURCE_EXHAUSTED: the engine's queue is full", arrival=time.monotonic() - 2.0, prompt_tokens=3)
    got = {(s.name, s.labels.get("finished_reason")): s.value
           for f in families(m.registry).values() for s in f.samples}
    assert got[("llmserve:request_success_total", "error")] == 1
    assert got[("llmserve:e2e_request_latency_seconds_count", None)] == 0
    assert got[("llmserve:prompt_tokens_total", None)] == 0  # only requests that got their first token


# ---- request lines ------------------------------------------------------------------------------------------


def example_lines() -> tuple[dict, dict]:
    """The docs' `--log-format json` example: the tokenizer's line, then the engine's."""
    text = OBSERVABILITY.read_text().split("Example (`--log-format json`)", 1)[1].split("```", 2)[1]
    tokenizer, engine = [json.loads(line) for line in text.strip().splitlines()]
    return tokenizer, engine


def test_the_docs_json_example_has_the_fields_the_code_writes_in_order(caplog):
    """A pipeline built from the docs' example parses these keys: the code's successful request lines have exactly
    them, in that order (ts, level, logger and msg first), and the example's ts has the code's format."""
    tokenizer_example, engine_example = example_lines()
    m, tm = engine_metrics(), text_metrics()
    m.on_add("s1:4:17", "checkout-42", arrival=0.0)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        m.on_step([StepOutput("s1:4:17", [1], "length", 5)], started=0.0, ended=0.01)
        trace = RequestTrace("checkout-42", finish_reason="length", engine="10.0.3.7:50051")
        trace.first_token = trace.start + 0.0141
        tm.finish(trace)
    engine_record, tokenizer_record = [r for r in caplog.records if r.name == "llmserve.request"]
    formatter = JsonFormatter()
    for record, example in ((engine_record, engine_example), (tokenizer_record, tokenizer_example)):
        line = json.loads(formatter.format(record))
        assert list(line) == list(example), (list(line), list(example))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]) and \
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", example["ts"])
        assert (line["level"], line["logger"], line["msg"]) == (example["level"], example["logger"], example["msg"])
        assert line["request_id"] == example["request_id"] == "checkout-42"
        assert {k: type(v) for k, v in line.items()} == {k: type(v) for k, v in example.items()}
    assert engine_example["engine_request_id"] == json.loads(formatter.format(engine_record))["engine_request_id"]


def record(fields: dict | None = None, exc_info=None, msg: str = "request finished") -> logging.LogRecord:
    rec = logging.LogRecord("llmserve.request", logging.INFO, __file__, 1, msg, None, exc_info)
    if fields is not None:
        rec.fields = fields
    return rec


def test_text_fields_follow_the_message_and_a_traceback_follows_them():
    """'writes `time level logger: message` and then key=value pairs ...; a traceback follows on lines of its own':
    the pairs were appended after the traceback, to the end of its last line (`ValueError: bad request_id=a`), so a
    line-based parser found the message without its fields and the exception's text with them."""
    try:
        raise ValueError("bad")
    except ValueError:
        exc_info = sys.exc_info()
    lines = TextFormatter().format(record({"request_id": "a", "finish_reason": "error"}, exc_info)).splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO llmserve\.request: request finished "
                        r"request_id=a finish_reason=error", lines[0]), lines[0]  # the docs' `2026-11-28 17:15:57,010`
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: bad", lines


def test_text_values_are_quoted_as_the_docs_say_and_an_empty_one_is_visible():
    """Quoted (JSON) when a value holds a space, '=', a quote or a character that is not printable; bare otherwise;
    an empty value is written `""` (bare, `engine=` read as a missing value or ran into the next pair)."""
    fields = {"bare": "s1:4:17", "space": "a b", "eq": "k=v", "quote": 'a"b', "newline": "a\nb", "esc": "\x1b[1m",
              "ls": "a\u2028b", "empty": "", "none": None, "number": 0.0042}
    line = TextFormatter().format(record(fields))
    pairs = line.split("request finished ", 1)[1]
    want = ('bare=s1:4:17 space="a b" eq="k=v" quote="a\\"b" newline="a\\nb" esc="\\u001b[1m" ls="a\\u2028b" '
            'empty="" none=None number=0.0042')
    assert pairs == want


def test_a_multi_request_id_keeps_its_own_part():
    """'the call id takes at most 64 of the 128 characters, so that each request keeps its own part'."""
    got = multi_request_id("c" * 300, "r" * 300)
    call, _, own = got.partition("/")
    assert (len(call), len(got)) == (MAX_REQUEST_ID_CHARS // 2, MAX_REQUEST_ID_CHARS) and own == "r" * (MAX_REQUEST_ID_CHARS - len(call) - 1)
    assert multi_request_id("café", "x") == "caf%C3%A9/x"  # encoded as a Generate id is


# ---- scraping in Kubernetes ---------------------------------------------------------------------------------


def test_the_docs_podmonitor_and_the_scrape_annotations_find_both_services_metrics_port():
    """The PodMonitor the docs give to copy must select both Deployments' pods (by their name label), in the base's
    namespace, on a container port named as it says; and the pods' prometheus.io annotations must name that same
    port and /metrics. A relabelled pod or a renamed port scrapes nothing, silently."""
    import yaml

    base = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base"
    monitor = yaml.safe_load(OBSERVABILITY.read_text().split("```yaml\n", 1)[1].split("```", 1)[0])
    assert monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == yaml.safe_load((base / "kustomization.yaml").read_text())["namespace"]
    (selector,) = monitor["spec"]["selector"]["matchExpressions"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert selector["operator"] == "In"
    selected = []
    for name in ("engine-deployment.yaml", "tokenizer-deployment.yaml"):
        pod = yaml.safe_load((base / name).read_text())["spec"]["template"]
        value = pod["metadata"]["labels"].get(selector["key"])
        assert value in selector["values"], f"{name}: its pods' {selector['key']} {value!r} is not selected"
        selected.append(value)
        (container,) = [c for c in pod["spec"]["containers"] if any(p.get("name") == endpoint["port"]
                                                                    for p in c.get("ports", []))]
        (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == endpoint["port"]]
        annotations = pod["metadata"]["annotations"]
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"],
                annotations["prometheus.io/path"]) == ("true", str(port), "/metrics"), name
    assert sorted(selected) == sorted(selector["values"])


def test_metrics_port_0_serves_no_metrics_endpoint(monkeypatch):
    """'0 = off' (what several services on one machine pass): with --metrics-port 0 the engine service opens no
    metrics endpoint (port 0 to start_http_server would bind a random free port nobody scrapes); with a port it
    serves its registry there. The model load fails at once here: start-up up to the endpoint is what is checked."""
    import asyncio

    from engine_service import server
    from engine_service.server_config import ServerConfig

    opened: list[int] = []
    monkeypatch.setattr(server, "serve_metrics", lambda registry, host, port: opened.append(port))

    def factory(config):
        raise ValueError("no model here")

    def start(metrics_port: int) -> int:
        config = ServerConfig(model="fake", host="127.0.0.1", port=0, metrics_port=metrics_port, canary_interval_s=0)
        return asyncio.run(server.serve(config, engine_factory=factory, handle_signals=False))

    assert start(0) == 1 and opened == []
    free = free_port()
    assert start(free) == 1 and opened == [free]


# ---- request ids at the engine ------------------------------------------------------------------------------


def test_the_engine_logs_the_documented_ids_when_a_caller_sends_none(caplog):
    """'when a caller of the engine API sends none, it logs the stream-scoped client id (s<stream>:<id>), and for
    GenerateStream the x-request-id metadata, else the request's request_id'; engine_request_id is
    `s<stream>:<n>:<id>` on a bidi stream, `u:<n>:<id>` for GenerateStream; a trace id is cut to 128 characters.
    A log search for a client's id, or a join on engine_request_id, relies on these shapes."""
    from clients.engine_client import EngineClient
    from protos.llmserve.engine.v1 import engine_pb2 as pb
    from tests.fake_engine import FakeEngine
    from tests.unit.test_engine_service_fake import Running, wait_serving

    def new(rid: str, trace: str = "") -> pb.NewRequest:
        return pb.NewRequest(request_id=rid, prompt_token_ids=[1, 2], trace_id=trace,
                             sampling_params=pb.SamplingParams(max_tokens=2))

    def lines() -> dict[str, dict]:
        return {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "llmserve.request"}

    server = Running(FakeEngine())
    try:
        with caplog.at_level(logging.INFO, logger="llmserve.request"), EngineClient(server.target, timeout=10) as c:
            wait_serving(c)
            caplog.clear()  # the start-up canary is not a client request (and logs no line): start clean
            list(c.stub.GenerateStream(new("unary-1"), timeout=10))
            list(c.stub.GenerateStream(new("unary-2", "t" * 300), timeout=10))
            frames = iter([pb.ClientFrame(requests=[new("bidi-1")])])
            for frame in c.stub.Generate(frames, timeout=10):
                if any(u.finish_reason for u in frame.updates):
                    break
            deadline = time.monotonic() + 10  # the lines are written as the requests end, on the server's loop
            while len(lines()) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        server.stop()
    got = lines()
    assert re.fullmatch(r"u:\d+:unary-1", got["unary-1"]["engine_request_id"]), got["unary-1"]
    assert "t" * MAX_REQUEST_ID_CHARS in got and len(got) == 3, sorted(got)
    (bidi,) = [k for k in got if k.endswith(":bidi-1")]
    stream = re.fullmatch(r"(s\d+):bidi-1", bidi)
    assert stream and re.fullmatch(rf"{stream.group(1)}:\d+:bidi-1", got[bidi]["engine_request_id"]), got[bidi]
