"""Issue 6 acceptance: /metrics of both running services, request ids through both services' logs, and the
serving benchmark's plots. One engine (two sequences at a time, so requests queue) behind one tokenizer service."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.engine_client import EngineClient
from clients.text_client import TextClient
from tests.e2e.conftest import start_engine, start_tokenizer, wait_idle
from tests.support import free_port

pytestmark = pytest.mark.timeout(90)
OBSERVE = ["--log-level", "INFO", "--log-format", "json"]
ENGINE_METRICS = [
    "llmserve:time_to_first_token_seconds", "llmserve:inter_token_latency_seconds",
    "llmserve:e2e_request_latency_seconds", "llmserve:request_queue_time_seconds",
    "llmserve:request_prefill_time_seconds", "llmserve:request_decode_time_seconds",
    "llmserve:num_requests_running", "llmserve:num_requests_waiting", "llmserve:kv_cache_usage_perc",
    "llmserve:prefix_cache_queries_total", "llmserve:prefix_cache_hits_total", "llmserve:prompt_tokens_total",
    "llmserve:generation_tokens_total", "llmserve:request_success_total",
]
TOKENIZER_METRICS = ["llmserve:tokenize_time_seconds", "llmserve:detokenize_time_seconds",
                     "llmserve:engine_stream_reconnects_total"]
HISTOGRAMS = ENGINE_METRICS[:6] + TOKENIZER_METRICS[:2]


@pytest.fixture(scope="module")
def stack(demo_model):
    engine_metrics, tokenizer_metrics = free_port(), free_port()
    engine = start_engine(demo_model, extra=["--max-num-seqs", "2", "--metrics-port", str(engine_metrics), *OBSERVE])
    tokenizer = start_tokenizer(demo_model, [engine], extra=["--metrics-port", str(tokenizer_metrics), *OBSERVE])
    engine.metrics, tokenizer.metrics = engine_metrics, tokenizer_metrics
    try:
        engine.wait_serving()
        tokenizer.wait_serving()
        with TextClient(tokenizer.target, timeout=60) as text, EngineClient(engine.target, timeout=30) as eng:
            yield engine, tokenizer, text, eng
    finally:
        assert tokenizer.stop() == 0
        assert engine.stop() == 0


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Family and sample name -> {sorted label pairs without model_name: value}, from GET /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body):
        out.setdefault(family.name, {})  # a histogram's own name; its samples are _bucket, _sum and _count
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def model_labels(port: int) -> set[str | None]:
    """The model_name label of every llmserve:* sample on a /metrics page."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        sample.labels.get("model_name")
        for family in text_string_to_metric_families(body)
        if family.name.startswith("llmserve:")
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def complete(text: TextClient, ids: list[int], max_tokens: int, **kwargs) -> object:
    *_, last = text.generate_tokens(ids, max_tokens=max_tokens, ignore_eos=True, temperature=0.0, **kwargs)
    return last


def test_metrics_of_both_services(stack):
    engine, tokenizer, text, eng = stack
    e0, t0 = scrape(engine.metrics), scrape(tokenizer.metrics)
    for name in ENGINE_METRICS:
        assert name in e0, f"engine /metrics lacks {name}"
    for name in TOKENIZER_METRICS:
        assert name in t0, f"tokenizer /metrics lacks {name}"
    assert all(f"{h}_bucket" in (e0 | t0) and f"{h}_count" in (e0 | t0) for h in HISTOGRAMS)

    # Eight requests at once on an engine that runs two: some must wait, and the gauge must say so.
    usages, waiting_seen = [], []

    def one(i: int) -> None:
        usages.append(complete(text, [(7 * i + j) % 2000 + 1 for j in range(20 + i)], 24 + i).usage)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        waiting_seen.append(value(scrape(engine.metrics), "llmserve:num_requests_waiting"))
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert len(usages) == 8 and max(waiting_seen) > 0, f"waiting never above 0: {waiting_seen[:20]}"

    # The same prompt twice: the second is served from the prefix cache.
    prompt = [(11 * j) % 2000 + 1 for j in range(70)]
    first = complete(text, prompt, 4).usage
    hits_before = value(scrape(engine.metrics), "llmserve:prefix_cache_hits_total")
    second = complete(text, prompt, 4).usage
    usages += [first, second]
    wait_idle(eng)
    e1, t1 = scrape(engine.metrics), scrape(tokenizer.metrics)
    assert second.cached_tokens > 0 and value(e1, "llmserve:prefix_cache_hits_total") > hits_before

    def delta(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    n = len(usages)
    assert delta(e0, e1, "llmserve:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(e0, e1, "llmserve:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta(e0, e1, "llmserve:request_success_total", finished_reason="length") == n
    assert delta(e0, e1, "llmserve:prefix_cache_queries_total") >= sum(u.prompt_tokens for u in usages)
    for name in ENGINE_METRICS[:6]:
        if name == "llmserve:inter_token_latency_seconds":
            continue  # per token, below
        assert delta(e0, e1, f"{name}_count") == n, name
        assert delta(e0, e1, f"{name}_bucket", le="+Inf") == n, name
        assert delta(e0, e1, f"{name}_sum") > 0, name
    # A request's first token is its time to first token; each later one is one inter-token gap.
    assert delta(e0, e1, "llmserve:inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert value(e1, "llmserve:num_requests_waiting") == 0 and value(e1, "llmserve:num_requests_running") == 0
    assert value(e1, "llmserve:kv_cache_usage_perc") == 0
    assert delta(t0, t1, "llmserve:tokenize_time_seconds_count") == n
    assert delta(t0, t1, "llmserve:detokenize_time_seconds_count") == n
    assert delta(t0, t1, "llmserve:text_requests_total", finished_reason="length") == n
    assert value(t1, "llmserve:engines_connected") == 1
    # Every sample carries the served model's name, as each service reports it.
    with EngineClient(engine.target, timeout=10) as ec:
        assert model_labels(engine.metrics) == {ec.model_info().model_name}
    assert model_labels(tokenizer.metrics) == {text.model_info().model_name}
    # ...and it is the same name on both, so dashboards can join the two services' series.
    assert model_labels(tokenizer.metrics) == model_labels(engine.metrics)


def request_lines(log: Path, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The 'request finished' JSON lines for request_id in a service's log (written just after the reply)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for line in log.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                record = json.loads(line)
                if record.get("msg") == "request finished" and record.get("request_id") == request_id:
                    lines.append(record)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_request_id_reaches_both_services_logs(stack):
    engine, tokenizer, text, _ = stack
    request_id = f"obs-{uuid.uuid4().hex}"
    last = complete(text, [5, 6, 7, 8, 9], 6, request_id=request_id)
    (tok_line,) = request_lines(tokenizer.log, request_id)
    (eng_line,) = request_lines(engine.log, request_id)
    for line in (tok_line, eng_line):
        assert line["completion_tokens"] == last.usage.completion_tokens == 6
        assert line["prompt_tokens"] == last.usage.prompt_tokens == 5
        assert line["finish_reason"] == "length" and line["ttft_s"] <= line["total_s"]
        assert line["cached_tokens"] == last.usage.cached_tokens
    assert tok_line["engine"] == engine.target

    # Without an id the tokenizer service makes one, returns it in the trailing metadata, and both log it.
    stream = text.generate_tokens([9, 8, 7], max_tokens=2, ignore_eos=True)
    list(stream)
    generated = dict(stream._call.trailing_metadata())["x-request-id"]
    assert generated and generated != request_id
    assert len(request_lines(tokenizer.log, generated)) == 1 and len(request_lines(engine.log, generated)) == 1


def test_serving_bench_writes_plots(stack, tmp_path):
    import matplotlib.image

    from clients.serving_bench import main

    _, tokenizer, _, _ = stack
    report = main(["--target", tokenizer.target, "--num-requests", "3", "--rate", "50", "--rate", "inf",
                   "--concurrency", "1", "--concurrency", "3", "--plot-dir", str(tmp_path)])
    assert len(report["runs"]) == 4 and all(r["failed"] == 0 for r in report["runs"])
    for name in ("latency_vs_rate.png", "throughput_vs_concurrency.png"):
        path = tmp_path / name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name  # drawn, not blank
