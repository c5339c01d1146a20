"""Benchmark failure modes other inference servers shipped, checked against our offline and serving benchmarks.

Each test names the peer's failure mode; the stand-in clients and engines are as small as the behaviour allows.
"""

from __future__ import annotations

import asyncio
import json
import math
import platform
import subprocess
import types
from importlib import metadata
from pathlib import Path

import pytest

from clients import serving_bench as sb
from clients.requests import generate_request
from engine_service import bench
from engine_service.engine import LLMEngine
from engine_service.validation import sampling_params_from_proto
from tests.unit.test_bench_edges import _FakeAsyncClient

REPO = Path(__file__).resolve().parents[2]


class _RecordingClient(_FakeAsyncClient):
    """An AsyncTextClient stand-in: streams each request's tokens one a message, the last with `cached` prompt tokens
    in its usage, and records the keyword arguments of every request."""

    requests: list[dict] = []
    cached = 0

    async def _stream(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            last = i == n - 1
            yield types.SimpleNamespace(token_ids=[1], usage=types.SimpleNamespace(cached_tokens=self.cached if last
                                                                                   else 0))

    def generate_tokens(self, prompt, **kwargs):
        type(self).requests.append({"prompt": list(prompt), **kwargs})
        return self._stream(kwargs["max_tokens"])


class _Engine:
    """An LLMEngine stand-in with the model's generation defaults: every request gets all its tokens in one step."""

    def __init__(self, defaults, cached=0):
        self.generation_defaults, self.cached = defaults, cached
        self.params, self.live = [], {}

    def add_request(self, rid, prompt, params):
        self.params.append(params)
        self.live[rid] = params.max_tokens

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        outs = [types.SimpleNamespace(request_id=rid, new_token_ids=[1] * n, finished=True, error=None,
                                      num_cached_tokens=self.cached) for rid, n in self.live.items()]
        self.live.clear()
        return outs


def test_inprocess_requests_do_the_sampling_work_the_services_do_for_grpc_requests(monkeypatch):
    """A paired benchmark ran its two sides with different settings: the services fill the model's
    generation_config.json defaults (top_k, top_p, a repetition penalty) into every field a request leaves unset,
    while the in-process side built bare SamplingParams and skipped that work."""
    defaults = LLMEngine._generation_defaults({"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.25,
                                               "temperature": 1.0}, Path("generation_config.json"))
    w = sb.Workload([[3, 4, 5], [6, 7]], [3, 2])
    monkeypatch.setattr(sb, "AsyncTextClient", _RecordingClient)
    _RecordingClient.requests = []
    asyncio.run(sb.run_grpc("x:1", w, 4, math.inf))
    engine = _Engine(defaults)
    sb.run_inprocess(engine, w, 4, math.inf)

    for sent, local in zip(_RecordingClient.requests, engine.params, strict=True):
        request = generate_request(prompt_token_ids=sent.pop("prompt"), **sent)
        served = sampling_params_from_proto(request.sampling_params, defaults)  # what the engine service runs
        for name in ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "max_tokens", "ignore_eos"):
            assert getattr(local, name) == pytest.approx(getattr(served, name)), name
        assert local.temperature == pytest.approx(served.temperature) == pytest.approx(0.6)
    assert engine.params[0].top_k == 20 and engine.params[0].repetition_penalty == pytest.approx(1.25)


def test_messages_without_tokens_are_not_token_arrivals():
    """A stream message that carries no token (a role-only first chunk, prompt logprobs, a last message with only the
    finish and usage) was taken as the first token (TTFT too short) or added an inter-token gap of its own."""
    t = sb.Timing(start=0.0, chunks=[(0.05, 0), (0.1, 1), (0.2, 1), (1.0, 0)])
    silent = sb.Timing(start=0.0, chunks=[(0.3, 0)])
    row = sb.summarize([t, silent], wall=1.0)
    assert row["ttft_ms_p50"] == pytest.approx(100.0)
    assert row["itl_ms_p50"] == row["itl_ms_p99"] == pytest.approx(100.0)  # the one gap between the two tokens
    assert row["e2e_ms_p50"] == pytest.approx(1000.0)  # the stream still ends at its last message
    assert (row["output_tokens"], row["failed"], row["errors"]) == (2, 1, {"no response": 1})


def test_prefix_cache_hits_are_reported_for_both_paths(monkeypatch):
    """A benchmark that does not read the engine's cached-token count cannot tell that a run was served from a warm
    prefix cache, which inflates its throughput and shortens its TTFT."""
    w = sb.Workload([[3, 4, 5], [6, 7]], [3, 2])
    monkeypatch.setattr(sb, "AsyncTextClient", _RecordingClient)
    monkeypatch.setattr(_RecordingClient, "cached", 16)
    grpc_row = sb.summarize(*asyncio.run(sb.run_grpc("x:1", w, 4, math.inf)))
    local_row = sb.summarize(*sb.run_inprocess(_Engine({}, cached=32), w, 4, math.inf))
    assert (grpc_row["cached_prompt_tokens"], local_row["cached_prompt_tokens"]) == (32, 64)


def _invocation(monkeypatch, argv, cache: set):
    """main with a stand-in gRPC driver in front of services whose prefix cache, `cache`, keeps every prompt sent to
    them; returns (report, [(prompts, how many of them the cache held) for each run, the warm-up first])."""
    runs = []

    async def fake_run_grpc(target, w, concurrency, rate, tls=None):
        prompts = [tuple(p) for p in w.prompts]
        runs.append((w.prompts, sum(p in cache for p in prompts)))
        cache.update(prompts)
        return [sb.Timing(start=0.0, chunks=[(0.1, n)]) for n in w.max_tokens], 1.0

    monkeypatch.setattr(sb, "run_grpc", fake_run_grpc)
    return sb.main(argv), runs


def test_a_second_invocation_against_the_same_services_sends_none_of_the_first_ones_prompts(monkeypatch):
    """Repeated invocations drew the same seeded prompts, so every invocation after the first against one server was
    served from its warm prefix cache (up to 86% more throughput in the peer's report)."""
    cache: set = set()
    argv = ["--vocab-size", "1000000", "--num-requests", "3", "--pairs", "2"]
    _, first_runs = _invocation(monkeypatch, argv, cache)
    second, second_runs = _invocation(monkeypatch, argv, cache)
    assert second_runs[0][1] == 1  # the warm-up may hit: it is there to warm
    assert [hits for _, hits in first_runs[1:] + second_runs[1:]] == [0] * 4
    # The salt is recorded: the timed prompts can be rebuilt from the report.
    w = sb.workload("B", 1_000_000, 3)
    rebuilt = sb.salted(w, sb.salt_of(second["salt_base"], 0, 1_000_000), 1_000_000)
    assert rebuilt.prompts == second_runs[1][0]


def test_a_run_served_from_the_prefix_cache_is_warned_about(monkeypatch, capsys):
    """The warning that the cached-token count exists for: a run the cache served must say so where its figures
    are printed."""

    async def cached_run(target, w, concurrency, rate, tls=None):
        return [sb.Timing(start=0.0, chunks=[(0.1, n)], cached_tokens=16) for n in w.max_tokens], 1.0

    monkeypatch.setattr(sb, "run_grpc", cached_run)
    report = sb.main(["--vocab-size", "100", "--num-requests", "2"])
    assert report["runs"][0]["cached_prompt_tokens"] == 32
    assert "32 prompt tokens from a prefix cache" in capsys.readouterr().err


def _commit_matches(recorded: str | None) -> bool:
    """Whether the recorded commit ("-dirty" appended for a changed tree) is HEAD's, or None outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except OSError:  # no git at all
        return recorded is None
    if head.returncode != 0:
        return recorded is None
    return recorded is not None and recorded.removesuffix("-dirty") == head.stdout.strip()


def test_serving_report_records_the_command_versions_and_commit(monkeypatch, tmp_path):
    """A results file without the command, the library versions and the commit cannot be reproduced or compared with
    a later run."""

    async def fake_run_grpc(target, w, concurrency, rate, tls=None):
        return [sb.Timing(start=0.0, chunks=[(0.1, n)]) for n in w.max_tokens], 1.0

    monkeypatch.setattr(sb, "run_grpc", fake_run_grpc)
    out = tmp_path / "r.json"
    argv = ["--vocab-size", "100", "--num-requests", "2", "--rate", "4", "--json", str(out)]
    sb.main(argv)
    data = json.loads(out.read_text())
    assert data["command"] == "python -m clients.serving_bench " + " ".join(argv)
    env = data["environment"]
    assert env["python"] == platform.python_version()
    assert (env["grpcio"], env["protobuf"]) == (metadata.version("grpcio"), metadata.version("protobuf"))
    assert _commit_matches(env["commit"])
    assert isinstance(data["salt_base"], int) and data["inprocess"] is None


def test_offline_report_records_the_versions_commit_and_threads(monkeypatch, tmp_path):
    """The offline figures' JSON named the command but not the torch and transformers versions, the commit or the
    torch thread count (torch's default differs between machines), all of which move the figure."""
    import torch
    import transformers

    (tmp_path / "config.json").write_text('{"vocab_size": 128}')
    monkeypatch.setattr(bench, "build_preset", lambda name, cache_dir: tmp_path)
    monkeypatch.setattr(bench, "run_engine", lambda plan, kwargs: bench.Result(runs_s=[1.0], requested_tokens=8))
    report = bench.run(bench.parse_args(["--preset", "cpu-small", "--num-seqs", "2", "--device", "cpu"]))
    env = report["environment"]
    assert (env["torch"], env["transformers"]) == (torch.__version__, transformers.__version__)
    assert env["torch_threads"] == torch.get_num_threads()
    assert _commit_matches(env["commit"])
    assert report["workload"]["seed"] == 0


def test_engine_timed_runs_leave_detokenization_outside_the_clock(demo_model_dir):
    """The engine's clock ran on while generate() decoded every output to text, work the transformers peers (token
    ids only) never do: about 0.1 s of a workload A run with a real tokenizer."""
    from engine_service import LLM

    plan = bench.Plan(warmup=([[5, 6, 7]], [2]), batches=[([[8, 9, 10, 11], [12, 13]], [3, 2])] * 2,
                      model_dir=demo_model_dir, device="cpu", dtype="float32")
    with LLM(str(demo_model_dir), device="cpu", dtype="float32", enforce_eager=True, max_model_len=64,
             num_kvcache_blocks=16, attention_backend="torch") as llm:
        tokenizer = llm.tokenizer
        decoded = []
        real_decode = tokenizer.decode
        tokenizer.decode = lambda ids, **kw: decoded.append(list(ids)) or real_decode(ids, **kw)
        result = bench.time_engine(llm, plan, bench.Result())
        assert llm.tokenizer is tokenizer  # set back for whatever uses the engine next
        assert llm.generate([[5, 6]], bench.engine_params([2]))[0]["text"] is not None
    assert len(result.runs_s) == 2 and result.error is None
    assert result.generated_tokens == 5
    assert len(decoded) == 2  # the warm-up's one output and the check above: none from the timed runs
