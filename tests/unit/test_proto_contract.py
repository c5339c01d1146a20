"""The API contract as protos/llmserve/*/v1/*.proto's comments state it, for the statements no other test covered:
what GetLoad's fields hold, a GenerateStream id's uniqueness and Abort across callers, what an engine ignores in a
ClientFrame, how a Generate stream ends when its engine fails and a GenerateMulti stream when its service drains,
what GenerateMulti ignores (a message with no kind, an abort of an id that is not live), and which distribution
logprobs come from in JSON mode. Each test quotes the comment it checks; all run in-process, over the fake engine
or the sampler alone."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from clients.engine_client import EngineClient
from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.structured_output import TokenMask
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.fake_engine import FakeEngine
from tests.unit.test_engine_service_fake import Running, new, wait_serving
from tests.unit.test_text_service_regressions import _ScriptedEngines, _servicer, _start_multi

pytestmark = pytest.mark.timeout(60)

# What the engine's stats() say of its KV blocks and prefix cache: 24 of 64 blocks held, 10 of the 40 free ones
# keeping prefix-cache content, 50 of 200 prompt tokens looked up found in the cache.
BLOCK_STATS = dict(num_blocks=64, num_free_blocks=40, num_cached_blocks=10, prefix_cache_queries=200,
                   prefix_cache_hits=50, num_preemptions=3)


class _CountingEngine(FakeEngine):
    """A fake engine whose block and prefix-cache counts are BLOCK_STATS (its queue's counts are its own)."""

    def stats(self) -> dict[str, int]:
        return {**super().stats(), **BLOCK_STATS}


@pytest.fixture(scope="module")
def engine():
    running = Running(_CountingEngine(max_model_len=1_000_000))
    yield running
    assert running.stop() == 0


def test_get_load_reports_the_blocks_and_the_prefix_cache_as_its_fields_say(engine):
    """engine.proto, Load: num_kv_blocks_used "held by live requests"; num_kv_blocks_free "not held; includes cached
    blocks"; num_kv_blocks_cached "not held but keeping prefix-cache content"; prefix_cache_hit_rate "hit tokens /
    queried tokens since start"."""
    with EngineClient(engine.target, timeout=20) as client:
        wait_serving(client)
        load = client.load()
    total, free = BLOCK_STATS["num_blocks"], BLOCK_STATS["num_free_blocks"]
    assert load.num_kv_blocks_total == total
    assert load.num_kv_blocks_used == total - free and load.num_kv_blocks_free == free
    assert load.num_kv_blocks_cached == BLOCK_STATS["num_cached_blocks"] <= load.num_kv_blocks_free
    assert load.prefix_cache_hit_rate == BLOCK_STATS["prefix_cache_hits"] / BLOCK_STATS["prefix_cache_queries"]
    assert load.num_preemptions == BLOCK_STATS["num_preemptions"]
    assert load.num_running == load.num_waiting == load.num_live_requests == 0


def test_a_generate_stream_id_is_unique_engine_wide_and_abort_finds_it_from_any_caller(engine):
    """engine.proto, GenerateStream: "Its request_id is unique among the engine's live GenerateStream requests (Abort
    finds it by that id, from any caller)"; AbortResponse.found. A second caller's request under a live id is
    refused (INVALID_ARGUMENT) without touching the live one; that caller's Abort ends it (its last update says
    FINISH_REASON_ABORT, and its call ends OK); an Abort of an id no longer live finds nothing, and the id is free."""
    with EngineClient(engine.target, timeout=20) as owner, EngineClient(engine.target, timeout=20) as other:
        wait_serving(owner)
        call = owner.generate([1], "shared", max_tokens=100_000, ignore_eos=True)
        first = next(call)
        with pytest.raises(grpc.RpcError) as refused:
            list(other.generate([5], "shared", max_tokens=2))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already live" in refused.value.details()
        assert other.abort("shared") is True
        rest = list(call)  # ends without an error status
        assert [u.request_id for u in [first, *rest]] == ["shared"] * (1 + len(rest))
        assert [u.finish_reason for u in rest if u.finish_reason] == [engine_pb.FINISH_REASON_ABORT] == \
            [rest[-1].finish_reason]
        tokens = [t for u in [first, *rest] for t in u.new_token_ids]  # the fake's: each the last one + 1
        assert tokens == [(1 + i) % 100 for i in range(1, len(tokens) + 1)]  # the live request's, not the refused one's
        assert other.abort("shared") is False
        assert [t for u in other.generate([5], "shared", max_tokens=2) for t in u.new_token_ids] == [6, 7]


def test_a_stopped_id_without_its_abort_and_an_abort_of_an_id_not_live_are_ignored(engine):
    """engine.proto, ClientFrame.stopped_request_ids: "An id here and not in abort_request_ids is ignored, as is an
    abort of an id that is not live." The request named only as stopped runs on to its max_tokens, and the abort of
    an id the stream never sent (or one that already ended) gets no update at all."""
    with EngineClient(engine.target, timeout=20) as client:
        wait_serving(client)
        short_ended = threading.Event()

        def frames():
            yield engine_pb.ClientFrame(requests=[new("short", [1], max_tokens=1),
                                                  new("a", [1], max_tokens=30, ignore_eos=True)])
            short_ended.wait(10)
            yield engine_pb.ClientFrame(stopped_request_ids=["a"], abort_request_ids=["never-sent", "short"])

        updates: list[engine_pb.RequestUpdate] = []
        try:
            for frame in client.stub.Generate(frames(), timeout=20):
                updates += frame.updates
                if any(u.request_id == "short" and u.finish_reason for u in frame.updates):
                    short_ended.set()
        finally:
            short_ended.set()  # a failed call must not leave gRPC's request thread in frames() for 10 s
    assert {u.request_id for u in updates} == {"short", "a"}
    finals = [(u.request_id, u.finish_reason) for u in updates if u.finish_reason]
    assert sorted(finals) == [("a", engine_pb.FINISH_REASON_LENGTH), ("short", engine_pb.FINISH_REASON_LENGTH)]
    assert [t for u in updates if u.request_id == "a" for t in u.new_token_ids] == list(range(2, 32))


def test_an_engine_failure_fails_the_streams_requests_in_frames_and_ends_the_stream_ok(monkeypatch):
    """engine.proto, Generate: "An engine that drains or fails ... fails its live ones when it fails (INTERNAL) ...
    and ends the stream OK once none is live, whether or not the client half-closed it." The comment used to say
    that the stream itself fails when the engine fails: it ends OK (the engine drains on its way out), so a client
    that waited for the stream's status to learn of the failure learnt nothing there; the frames say it."""
    monkeypatch.setenv("ENGINE_TEST_FAIL_AFTER_STEPS", "3")
    running = Running(FakeEngine(max_model_len=1_000_000), failure_linger_s=0.1)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            never_closed = threading.Event()  # the client never half-closes: the engine ends the stream

            def frames():
                yield engine_pb.ClientFrame(requests=[new("a", [1], max_tokens=1000, ignore_eos=True)])
                never_closed.wait(20)

            try:
                finals = [u for frame in client.stub.Generate(frames(), timeout=20) for u in frame.updates
                          if u.finish_reason]  # raises if the stream fails
            finally:
                never_closed.set()  # gRPC's request thread waits in frames(): let it go whatever happened
        assert [(u.request_id, u.finish_reason, u.status.code) for u in finals] == [
            ("a", engine_pb.FINISH_REASON_ERROR, grpc.StatusCode.INTERNAL.value[0])]
        assert "engine failure" in finals[0].status.message
    finally:
        running.thread.join(20)
    assert running.exit_code == 1


def test_multi_ignores_a_message_with_no_kind_and_an_abort_of_an_id_not_live(demo_tokenizer):
    """text.proto, MultiRequest: "A message with neither kind set, or an abort of an id that is not live (ended, or
    never sent), is ignored: no response. A half-closed stream stays open until its live requests end, then ends
    OK." Only the one real request gets responses, and the call ends once it has."""

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, _ScriptedEngines())
        frames, out, consumer = _start_multi(servicer)
        request = pb.GenerateRequest(request_id="real", prompt="hi", sampling_params=pb.SamplingParams(max_tokens=3))
        for frame in (pb.MultiRequest(), pb.MultiRequest(abort_request_id="never-sent"),
                      pb.MultiRequest(generate=request)):
            await frames.put(frame)
        while not any(r.finish_reason for r in out):
            await asyncio.sleep(0.01)
        # "real" has ended: an abort of it now is of an id that is not live. Then the client half-closes.
        for frame in (pb.MultiRequest(), pb.MultiRequest(abort_request_id="real"), None):
            await frames.put(frame)
        await asyncio.wait_for(consumer, 10)  # the call ends (OK) with nothing live
        return out

    out = asyncio.run(main())
    assert {r.request_id for r in out} == {"real"}
    assert [r.finish_reason for r in out if r.finish_reason] == [pb.FINISH_REASON_LENGTH]
    assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH and out[-1].usage.completion_tokens == 3


def test_a_draining_text_service_refuses_new_multi_requests_and_ends_the_stream_once_none_is_live(demo_tokenizer):
    """text.proto, GenerateMulti: "A draining service refuses the stream's new requests (UNAVAILABLE) and ends the
    stream OK once none is live, whether or not the client half-closed it." The request live when the drain began
    runs to its end; the one sent after it is refused in its status; the client never half-closes."""

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, _ScriptedEngines(step_s=0.02))
        frames, out, consumer = _start_multi(servicer)

        def generate(rid: str) -> pb.MultiRequest:
            return pb.MultiRequest(generate=pb.GenerateRequest(request_id=rid, prompt="hi",
                                                               sampling_params=pb.SamplingParams(max_tokens=5)))

        await frames.put(generate("before"))
        while not any(r.token_ids for r in out):
            await asyncio.sleep(0.01)
        servicer.begin_drain()
        await frames.put(generate("after"))
        await asyncio.wait_for(consumer, 10)  # no None put: the stream is never half-closed
        return out

    finals = {r.request_id: r for r in asyncio.run(main()) if r.finish_reason}
    assert finals["before"].finish_reason == pb.FINISH_REASON_LENGTH and finals["before"].usage.completion_tokens == 5
    assert finals["after"].finish_reason == pb.FINISH_REASON_ERROR
    assert finals["after"].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "draining" in finals["after"].status.message


def test_logprobs_are_of_the_distribution_before_a_json_formats_mask():
    """engine.proto, SamplingParams.logprobs and TokenLogprobs: log_softmax of the model's logits "before the logit
    bias, penalties, temperature, top-k, top-p, min-p, the min_tokens ban and a JSON response_format's mask". The
    token drawn is one the mask allows, while the logprobs, the most likely tokens included, are the raw ones."""
    vocab, allowed = 16, torch.tensor([3, 7], dtype=torch.int32)
    logits = torch.linspace(4.0, -4.0, vocab).unsqueeze(0)  # token 0 the most likely, 15 the least
    params = SamplingParams(temperature=0.0, logprobs=4, response_format="json_object")
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    sampled, rows = sampler.sample_with_logprobs(logits.clone(),
                                                 [SamplingRow(params, None, allowed=TokenMask(allowed, True, 2))])
    raw = torch.log_softmax(logits[0].double(), dim=-1)
    token = int(sampled[0, 0])
    assert token == 3  # greedy among the allowed tokens
    assert rows.values[0, 0].item() == pytest.approx(raw[token].item(), abs=1e-6)
    assert rows.top_ids[0].tolist() == [0, 1, 2, 3]  # the raw top 4: three of them the mask forbade
    assert rows.values[0, 1:].tolist() == pytest.approx(raw[:4].tolist(), abs=1e-6)
