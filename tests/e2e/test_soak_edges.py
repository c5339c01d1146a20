"""A hostile client mix against both services as processes (fixed seed): streams cancelled at random points,
deadlines in the queue and mid-generation, GenerateMulti with aborts of live, finished and unknown ids and calls
closed mid-stream, n > 1, stop strings, JSON mode, logprobs, bad requests, and straight to the engine. Once idle,
nothing may be left behind: gauges at 0, every KV block free and usable, each request counted once."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import grpc
import pytest

from clients.engine_client import EngineClient
from clients.requests import generate_request
from protos.llmserve.engine.v1 import engine_pb2 as epb
from protos.llmserve.engine.v1 import engine_pb2_grpc as epb_grpc
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
from tests.e2e.conftest import start_engine, start_tokenizer, wait_idle
from tests.e2e.test_observability import scrape, value
from tests.support import free_port

pytestmark = pytest.mark.timeout(90)
SEED = 20261130
BLOCKS = 64  # 1,024 tokens of KV: a request of that many must still be served after the mix
LONG = dict(max_tokens=1500, ignore_eos=True)  # runs for many seconds unless the abort reaches the engine
WORDS = "the sea river tide moon wave salt storm ship harbour".split()
BAD = [dict(temperature=-1.0), dict(top_p=0.0), dict(logprobs=21), dict(stop=[""]), dict(min_tokens=9, max_tokens=4)]
OBSERVE = ["--log-level", "INFO", "--log-format", "json"]


@pytest.fixture(scope="module")
def stack(demo_model):
    engine_metrics, tokenizer_metrics = free_port(), free_port()
    engine = start_engine(demo_model, extra=["--num-kvcache-blocks", str(BLOCKS), "--max-num-seqs", "6",
                                             "--max-waiting", "12", "--metrics-port", str(engine_metrics), *OBSERVE])
    tokenizer = start_tokenizer(demo_model, [engine], extra=["--metrics-port", str(tokenizer_metrics),
                                                             "--max-inflight", "24", *OBSERVE])
    engine.metrics, tokenizer.metrics = engine_metrics, tokenizer_metrics
    try:
        engine.wait_serving()
        tokenizer.wait_serving()
        with EngineClient(engine.target, timeout=30) as eng:
            yield engine, tokenizer, eng
    finally:
        assert tokenizer.stop() == 0
        assert engine.stop() == 0


def _params(rng: random.Random) -> dict:
    params = dict(max_tokens=rng.choice([1, 4, 12]), temperature=rng.choice([0.0, 1.0]))
    extra = rng.choice([{}, {"stop": ["e", "sea"]}, {"logprobs": 2}, {"response_format": "json_object"},
                        {"n": 2, "seed": 3}, {"ignore_eos": True}])
    return {**params, **extra}


async def _generate(stub, rng: random.Random, rid: str) -> None:
    kind = rng.randrange(4)
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
    params = [{**LONG}, {**LONG}, _params(rng), rng.choice(BAD)][kind]
    timeout = rng.choice([0.05, 0.3, 0.8]) if kind == 1 else 30
    call = stub.Generate(generate_request(prompt, **params), timeout=timeout, metadata=(("x-request-id", rid),))
    try:
        read = 0
        async for _ in call:
            read += 1
            if kind == 0 and read > rng.randint(0, 4):
                call.cancel()
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
    except asyncio.CancelledError:  # grpc.aio ends a cancelled call's iteration so
        pass


async def _multi(stub, rng: random.Random, call_id: str) -> None:
    frames: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (frame := await frames.get()) is not None:
            yield frame

    call = stub.GenerateMulti(requests(), timeout=30, metadata=(("x-request-id", call_id),))
    ended: set[str] = set()

    async def read():
        async for response in call:
            if response.finish_reason:
                ended.add(response.request_id)

    reader = asyncio.create_task(read())
    ids = [f"r{i}" for i in range(rng.randint(3, 8))]
    for rid in ids:
        params = rng.choice([LONG, _params(rng), {**LONG, "deadline_ms": rng.choice([20, 300])}, rng.choice(BAD)])
        frames.put_nowait(pb.MultiRequest(generate=generate_request(" ".join(rng.choices(WORDS, k=9)), request_id=rid,
                                                                    **params)))
        await asyncio.sleep(rng.random() * 0.05)
        target = rng.choice([rng.choice(ids), rng.choice(sorted(ended) or ["x"]), "unknown"])
        frames.put_nowait(pb.MultiRequest(abort_request_id=target))
    try:
        if rng.random() < 0.4:  # the client goes away mid-stream
            await asyncio.sleep(rng.random() * 0.3)
            call.cancel()
        else:
            await asyncio.sleep(rng.random() * 0.3)
            for rid in ids:
                frames.put_nowait(pb.MultiRequest(abort_request_id=rid))
            frames.put_nowait(None)
        await reader
        assert ended == set(ids), f"{call_id}: no last message for {set(ids) - ended}"
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass  # the call we cancelled


async def _engine_direct(stub, rng: random.Random, rid: str, vocab: int) -> None:
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))]
    call = stub.GenerateStream(epb.NewRequest(request_id=rid, trace_id=rid, prompt_token_ids=prompt,
                                              sampling_params=epb.SamplingParams(**LONG)),
                               timeout=rng.choice([0.2, 30]))
    try:
        async for _ in call:
            if rng.random() < 0.5:
                await stub.Abort(epb.AbortRequest(request_id=rid), timeout=5)
            else:
                call.cancel()
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass


def _records(log, start: int) -> list[dict]:
    lines = log.read_bytes()[start:].decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _reasons(samples: dict, name: str) -> collections.Counter:
    return collections.Counter({dict(labels)["finished_reason"]: v for labels, v in samples[name].items()})


def test_hostile_mix_leaves_both_services_idle(stack):
    engine, tokenizer, eng = stack
    vocab = eng.model_info().vocab_size
    e0, t0 = scrape(engine.metrics), scrape(tokenizer.metrics)
    elog, tlog = engine.log.stat().st_size, tokenizer.log.stat().st_size

    async def mix():
        async with grpc.aio.insecure_channel(tokenizer.target) as tch, grpc.aio.insecure_channel(engine.target) as ech:
            text, direct = pb_grpc.TextGenerationStub(tch), epb_grpc.EngineStub(ech)

            async def one(i: int):
                rng = random.Random(SEED * 1000 + i)  # its own: draws shared across tasks would follow the network
                await asyncio.sleep(rng.random() * 1.5)
                kind = rng.random()
                if kind < 0.5:
                    await _generate(text, rng, f"g{i}")
                elif kind < 0.8:
                    await _multi(text, rng, f"m{i}")
                else:
                    await _engine_direct(direct, rng, f"e{i}", vocab)

            await asyncio.gather(*(one(i) for i in range(48)))

    asyncio.run(mix())
    # A cancelled, aborted or expired request is freed at once; one left to run out its 1,500 tokens is not.
    load = wait_idle(eng, timeout=3.0)
    assert load.num_live_requests == load.num_running == load.num_waiting == 0, str(load)
    assert load.num_kv_blocks_used == 0 and load.num_kv_blocks_free == load.num_kv_blocks_total == BLOCKS
    deadline = time.monotonic() + 3
    while value(scrape(tokenizer.metrics), "llmserve:text_requests_inflight") and time.monotonic() < deadline:
        time.sleep(0.05)
    e1, t1 = scrape(engine.metrics), scrape(tokenizer.metrics)
    for name in ("llmserve:num_requests_running", "llmserve:num_requests_waiting", "llmserve:kv_cache_usage_perc"):
        assert value(e1, name) == 0, name
    assert value(t1, "llmserve:text_requests_inflight") == 0
    # Every request finished exactly once, by the reason its log line gives, in each service. A request's count and
    # line come just after its place in the gauges is given back: read until they agree, for a few seconds.
    for before, port, log, start, name in (
            (e0, engine.metrics, engine.log, elog, "llmserve:request_success_total"),
            (t0, tokenizer.metrics, tokenizer.log, tlog, "llmserve:text_requests_total")):
        deadline = time.monotonic() + 3
        while True:
            records = _records(log, start)
            lines = [r for r in records if r.get("msg") == "request finished"]
            counted = _reasons(scrape(port), name) - _reasons(before, name)
            if +counted == collections.Counter(r["finish_reason"] for r in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert +counted == collections.Counter(r["finish_reason"] for r in lines), log
        key = "engine_request_id" if log == engine.log else "request_id"
        twice = [k for k, c in collections.Counter(r[key] for r in lines if r[key]).items() if c > 1]
        assert not twice, f"{log}: logged more than once: {twice}"
        assert counted["abort"] > 0 and counted["error"] > 0, counted
        assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL") or r.get("exc")], log
    # The prefix cache may hold blocks, but a request needing the whole pool is still served.
    draw = random.Random(SEED)
    prompt = [draw.randrange(3, vocab) for _ in range(BLOCKS * 16 - 24)]
    updates = list(eng.generate(prompt, max_tokens=24, ignore_eos=True))
    assert updates[-1].finish_reason == epb.FINISH_REASON_LENGTH
    assert sum(len(u.new_token_ids) for u in updates) == 24
