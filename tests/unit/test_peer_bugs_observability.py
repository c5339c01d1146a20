"""Observability failure modes other inference servers shipped, checked against ours: histogram buckets too coarse
for a GPU's latencies, client strings forging log lines, and token and prefix-cache counters under preemption."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import socket

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clients.logs import TextFormatter
from engine_service import LLM, SamplingParams
from engine_service.engine_loop import EngineLoop
from engine_service.metrics import EngineMetrics
from engine_service.outputs import StepOutput
from tests.fake_engine import FakeEngine
from tests.integration.test_engine_core_edges import _Sink
from tests.integration.tiny import VOCAB, make_qwen3
from tests.unit.test_metrics_edges import samples


def histogram_quantile(q: float, registry, name: str) -> float:
    """What Prometheus's histogram_quantile estimates from the exported buckets (linear within a bucket, the
    first bucket starting at 0)."""
    buckets = sorted((float(s.labels["le"]), s.value)
                     for family in text_string_to_metric_families(generate_latest(registry).decode())
                     for s in family.samples if s.name == f"{name}_bucket")
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    raise AssertionError("no bucket holds the rank")


# ---- histogram buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap_s", [0.0007, 0.00123, 0.00184, 0.00228])
def test_inter_token_latency_quantiles_resolve_a_gpus_decode_steps(gap_s):
    """Buckets too coarse for a GPU: every decode step of 1 to 2.5 ms (docs/PERFORMANCE.md: 1.23 ms at batch 1,
    2.28 ms at batch 64 on an H200) fell in one (1, 2.5] ms bucket, so histogram_quantile read 1.75 ms for both;
    a sub-millisecond step read as 0.5 ms."""
    m = EngineMetrics("m", dict, lambda: 0, log_requests=False)
    m.on_add("a", "a", arrival=0.0)
    t = 0.003
    m.on_step([StepOutput("a", [1], num_prompt_tokens=4)], started=0.0, ended=t)
    for _ in range(100):
        m.on_step([StepOutput("a", [1])], started=t, ended=t + gap_s)
        t += gap_s
    estimate = histogram_quantile(0.5, m.registry, "llmserve:inter_token_latency_seconds")
    assert estimate == pytest.approx(gap_s, rel=0.15)


def test_time_to_first_token_quantiles_resolve_a_short_prompt_on_an_idle_gpu():
    """The lowest TTFT bucket was 5 ms: an idle engine's first tokens (4.2 ms in docs/OBSERVABILITY.md's example)
    all fell in it, and histogram_quantile read half its bound, whatever they were."""
    m = EngineMetrics("m", dict, lambda: 0, log_requests=False)
    for i in range(50):
        m.on_add(f"r{i}", f"r{i}", arrival=float(i))
        m.on_step([StepOutput(f"r{i}", [1], "length", 4)], started=float(i), ended=i + 0.0042)
    estimate = histogram_quantile(0.5, m.registry, "llmserve:time_to_first_token_seconds")
    assert estimate == pytest.approx(0.0042, rel=0.15)


# ---- log injection ------------------------------------------------------------------------------------------


class _RefusingEngine(FakeEngine):
    def add_request(self, request_id, prompt_token_ids, params):
        raise RuntimeError("admission broke")


def test_a_clients_request_id_in_a_log_message_cannot_forge_a_line():
    """Log injection: the text format escaped field values but not the message, and the engine logs a failed
    admission with the client's request id in it: an id holding a newline wrote a forged request line."""
    forged = "x\n1999-01-01 00:00:00,000 INFO llmserve.request: request finished request_id=admin finish_reason=stop"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("engine_service.engine_loop")
    logger.addHandler(handler)

    async def main():
        loop = EngineLoop(_RefusingEngine(step_s=0.001), asyncio.get_running_loop(), lambda message: None)
        loop.start()
        try:
            sink = _Sink()
            loop.add(f"s1:0:{forged}", [1, 2, 3], SamplingParams(max_tokens=2), sink)
            await asyncio.wait_for(sink.done.wait(), 5)
            return sink
        finally:
            loop.stop()

    try:
        sink = asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    assert len(sink.failures) == 1 and sink.failures[0][0] == "INTERNAL"
    lines = stream.getvalue().splitlines()
    (message,) = [line for line in lines if "admitting request" in line]
    assert "request_id=admin" in message  # the id is there, escaped, on the message's own line
    assert lines[lines.index(message) + 1].startswith("Traceback")  # the traceback still follows on its lines
    assert not [line for line in lines if line.startswith("1999-01-01")], lines


# ---- counters under preemption, on the real engine ----------------------------------------------------------


def test_preemption_counts_no_prompt_generated_or_cached_token_twice(tmp_path):
    """A request preempted and recomputed had its prompt counted again, its regenerated tokens counted again, or
    its own blocks, found in the cache at readmission, counted as prefix-cache hits (and as its cached_tokens)."""
    make_qwen3(tmp_path, dtype=torch.float32)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=16,
              num_kvcache_blocks=5, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=80)
    readmitted: list[int] = []  # blocks each readmission found in the cache
    admit = llm.block_manager.admit

    def watched(seq, matched, looked_up=True):
        if seq.admit_order >= 0:
            readmitted.append(len(matched))
        return admit(seq, matched, looked_up)

    llm.block_manager.admit = watched
    metrics = EngineMetrics("m", llm.stats, lambda: 0)
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(VOCAB) for _ in range(20)] for i in range(3)}
    max_tokens = 20

    async def main():
        loop = EngineLoop(llm, asyncio.get_running_loop(), lambda message: None)
        loop.metrics = metrics
        loop.start()
        try:
            sinks = {rid: _Sink() for rid in prompts}
            for rid, prompt in prompts.items():
                loop.add(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0),
                         sinks[rid], trace_id=f"trace-{rid}")
            await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks.values())), 60)
            return sinks
        finally:
            loop.stop()

    logger = logging.getLogger("llmserve.request")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        sinks = asyncio.run(main())
        got = samples(metrics.registry)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        llm.close()
    assert got[("llmserve:num_preemptions_total",)] >= 1 and any(readmitted), readmitted  # what this test is about
    generated = {rid: sum(len(o.new_token_ids) for o in sink.outputs) for rid, sink in sinks.items()}
    assert generated == dict.fromkeys(prompts, max_tokens)
    total_prompt = sum(map(len, prompts.values()))
    assert got[("llmserve:prompt_tokens_total",)] == total_prompt
    assert got[("llmserve:generation_tokens_total",)] == len(prompts) * max_tokens
    assert got[("llmserve:prefix_cache_queries_total",)] == total_prompt
    assert got[("llmserve:prefix_cache_hits_total",)] == 0  # distinct random prompts share no block
    assert got[("llmserve:time_to_first_token_seconds_count",)] == len(prompts)
    assert got[("llmserve:inter_token_latency_seconds_count",)] == len(prompts) * (max_tokens - 1)
    assert got[("llmserve:e2e_request_latency_seconds_count",)] == len(prompts)
    assert got[("llmserve:request_success_total", ("finished_reason", "length"))] == len(prompts)
    assert got[("llmserve:num_requests_running",)] == 0 and got[("llmserve:kv_cache_usage_perc",)] == 0
    lines = {r.fields["request_id"]: r.fields for r in records}
    assert set(lines) == {f"trace-{rid}" for rid in prompts}
    for line in lines.values():
        assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (20, max_tokens, 0)
        assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["total_s"]


# ---- the metrics endpoint -----------------------------------------------------------------------------------


def test_a_busy_metrics_port_costs_the_metrics_not_the_service(caplog):
    """A metrics port already taken raised out of start-up and took inference down with it (docs: the service logs
    an error and serves without metrics)."""
    from engine_service.metrics import serve_metrics as engine_serve
    from tokenizer_service.metrics import TextMetrics
    from tokenizer_service.metrics import serve_metrics as tokenizer_serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            assert engine_serve(EngineMetrics("m", dict, lambda: 0).registry, "127.0.0.1", port) is None
            assert tokenizer_serve(TextMetrics("m").registry, "127.0.0.1", port) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(f"cannot listen on 127.0.0.1:{port}" in e for e in errors), errors
