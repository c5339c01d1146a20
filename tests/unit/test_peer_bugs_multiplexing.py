"""Multiplexing checked against bugs other servers shipped: n > 1 completions spread over several engines (their
prompt's prefix cache lost) when sent while no engine was ready, a cancelled multiplexed call leaving its
requests' engine requests running, and a reused id's updates mixed with the previous request's (or per-request
state left behind) on the engine's side of a long-lived stream."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from engine_service.outputs import StepOutput
from engine_service.streams import OutputStream
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.unit.test_service_regressions import pool_config
from tests.unit.test_text_service_regressions import _call_context, _ScriptedEngines, _servicer
from tokenizer_service.engine_pool import EnginePool, RequestFailed

pytestmark = pytest.mark.timeout(60)


class _Conn:
    """An engine connection as the pool and the servicer see one: each request it takes finishes after one token,
    unless the connection is lost first (then it fails retryable, before any token)."""

    def __init__(self, address: str, ready: bool) -> None:
        self.address, self.ready, self.retiring, self.refusing = address, ready, False, False
        self.info = engine_pb.ModelInfo(max_model_len=1000)
        self.inflight: dict[str, object] = {}
        self.failure = ""
        self.taken = 0
        self.lost = asyncio.Event()
        self.finish = asyncio.Event()

    def send(self, request, max_buffered, timeout_s=None):
        self.taken += 1
        rid = f"{self.address}/{self.taken}"
        conn = self

        class Handle:
            got_tokens = False

            def __init__(self) -> None:
                self.conn = conn

            def __aiter__(self):
                return self._updates()

            async def _updates(self):
                lost, finish = asyncio.create_task(conn.lost.wait()), asyncio.create_task(conn.finish.wait())
                await asyncio.wait([lost, finish], return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                finish.cancel()
                if conn.lost.is_set():
                    raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "lost", retryable=True)
                yield engine_pb.RequestUpdate(new_token_ids=[7], finish_reason=engine_pb.FINISH_REASON_LENGTH)

            def close(self, stopped: bool = False) -> None:
                conn.inflight.pop(rid, None)

        handle = self.inflight[rid] = Handle()
        return handle


def _pool(demo_tokenizer, *conns: _Conn) -> EnginePool:
    pool = EnginePool(pool_config(engines="a:1"), len(demo_tokenizer), {0}, [])  # not started
    pool.conns = {c.address: c for c in conns}
    return pool


async def _generate(servicer, n: int) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt="the sea", n=n, sampling_params=pb.SamplingParams(max_tokens=1))
    return [r async for r in servicer.Generate(request, _call_context())]


def test_n_completions_sent_while_no_engine_is_ready_follow_the_first_when_engines_come(demo_tokenizer):
    """Each completion read the engine to follow before waiting for a ready one: an n = 4 request sent while no
    engine was connected (start-up, or every engine reconnecting) went two and two to the engines that came back."""
    async def main() -> list[int]:
        a, b = _Conn("a:1", ready=False), _Conn("b:1", ready=False)
        pool = _pool(demo_tokenizer, a, b)
        servicer = _servicer(demo_tokenizer, pool)
        call = asyncio.create_task(_generate(servicer, 4))
        await asyncio.sleep(0.1)  # every completion waits for an engine
        a.ready = b.ready = True
        pool.changed()
        while a.taken + b.taken < 4:
            await asyncio.sleep(0.01)
        a.finish.set()
        b.finish.set()
        responses = await asyncio.wait_for(call, 10)
        assert sorted(r.index for r in responses if r.finish_reason) == [0, 1, 2, 3]
        return sorted([a.taken, b.taken])

    assert asyncio.run(main()) == [0, 4]


def test_n_completions_retried_while_no_engine_is_ready_follow_the_first_retry(demo_tokenizer):
    """The engine of an n = 3 request is lost before the first token while no other engine is ready: the retries
    waited with the lost engine as the one to follow, and spread over the two engines that came back."""
    async def main() -> tuple[int, list[int]]:
        a, b, c = _Conn("a:1", ready=True), _Conn("b:1", ready=False), _Conn("c:1", ready=False)
        pool = _pool(demo_tokenizer, a, b, c)
        servicer = _servicer(demo_tokenizer, pool)
        call = asyncio.create_task(_generate(servicer, 3))
        while a.taken < 3:
            await asyncio.sleep(0.01)
        a.ready = False
        a.lost.set()
        await asyncio.sleep(0.1)  # every completion waits for an engine to retry on
        b.ready = c.ready = True
        pool.changed()
        while b.taken + c.taken < 3:
            await asyncio.sleep(0.01)
        b.finish.set()
        c.finish.set()
        responses = await asyncio.wait_for(call, 10)
        assert sorted(r.index for r in responses if r.finish_reason) == [0, 1, 2]
        return a.taken, sorted([b.taken, c.taken])

    assert asyncio.run(main()) == (3, [0, 3])


def test_a_cancelled_multi_call_ends_every_engine_request_of_its_n_requests(demo_tokenizer):
    """A multiplexed call cancelled mid-stream (the client went away) must abort its requests' engine requests,
    every completion of an n > 1 request included, and give their places back."""
    async def main() -> tuple[int, int, int]:
        pool = _ScriptedEngines(step_s=0.01)
        servicer = _servicer(demo_tokenizer, pool)
        frames: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (frame := await frames.get()) is not None:
                yield frame

        for rid, n in (("a", 1), ("b", 3)):
            await frames.put(pb.MultiRequest(generate=pb.GenerateRequest(
                request_id=rid, prompt="hi", n=n, sampling_params=pb.SamplingParams(max_tokens=100_000))))
        got: list[pb.GenerateResponse] = []

        async def consume() -> None:
            async for response in servicer.GenerateMulti(requests(), _call_context()):
                got.append(response)

        consumer = asyncio.create_task(consume())
        while len({(r.request_id, r.index) for r in got}) < 4:
            await asyncio.sleep(0.01)
        assert pool.live == 4
        consumer.cancel()
        for _ in range(10):
            await asyncio.sleep(0.01)
        return pool.live, servicer.inflight, servicer.num_calls

    assert asyncio.run(main()) == (0, 0, 0)


@pytest.mark.parametrize("max_frame_bytes", [32 * 2**20, 40], ids=["one-frame", "tiny-frames"])
def test_reused_ids_never_mix_updates_and_leave_no_state_on_a_long_lived_stream(max_frame_bytes):
    """Requests under three ids, started, refused, aborted, failed and finished at random with the writer taking
    frames between (tiny frames too): each id's updates, read in order, are its requests' own tokens (tagged by
    request) each ending with its own finish, never a later request's tokens before an earlier one's end; and
    once all ended, the stream holds no per-request state."""
    async def scenario(seed: int) -> None:
        rng = random.Random(seed)
        stream = OutputStream(lambda *args, **kwargs: None, max_buffered_tokens=50, max_frame_bytes=max_frame_bytes)
        ids = ("a", "b", "c")
        lives: dict[str, list[list]] = {i: [] for i in ids}  # per id: [tokens, finish reason] per request
        engine_ids: dict[str, str] = {}
        got: dict[str, list[tuple[list[int], int]]] = {i: [] for i in ids}

        def end(cid: str, reason: int) -> None:
            lives[cid][-1][1] = reason

        def take() -> None:
            for update in stream.take():
                got[update.request_id].append((list(update.new_token_ids), update.finish_reason))

        for step in range(300):
            cid, op = rng.choice(ids), rng.random()
            if op < 0.15 and cid not in stream.live:
                lives[cid].append([[], 0])
                if rng.random() < 0.3:  # refused before the engine (a full queue)
                    stream.reject(cid, grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
                    end(cid, engine_pb.FINISH_REASON_ERROR)
                else:
                    engine_ids[cid] = f"s1:{step}:{cid}"
                    stream.register(cid, engine_ids[cid], None)
            elif op < 0.6 and cid in stream.live:
                token = len(lives[cid]) * 1000 + len(lives[cid][-1][0])
                finished = rng.random() < 0.1
                stream.on_output(cid, StepOutput(engine_ids[cid], [token], "length" if finished else None))
                lives[cid][-1][0].append(token)
                if finished:
                    end(cid, engine_pb.FINISH_REASON_LENGTH)
                elif cid not in stream.live:  # past max_buffered_tokens
                    end(cid, engine_pb.FINISH_REASON_ERROR)
            elif op < 0.7 and stream.abort(cid):
                end(cid, engine_pb.FINISH_REASON_ABORT)
            elif op < 0.75 and cid in stream.live:
                stream.fail(cid, grpc.StatusCode.INTERNAL, "failed", abort=True)
                end(cid, engine_pb.FINISH_REASON_ERROR)
            elif op >= 0.75:
                take()
        for cid in list(stream.live):
            stream.abort(cid)
            end(cid, engine_pb.FINISH_REASON_ABORT)
        while stream.has_updates:
            take()
        for cid in ids:
            read, tokens = [], []
            for update_tokens, reason in got[cid]:
                assert len({t // 1000 for t in update_tokens}) <= 1, (seed, cid, update_tokens)
                tokens.extend(update_tokens)
                if reason:
                    read.append([tokens, reason])
                    tokens = []
            assert tokens == [] and read == lives[cid], (seed, cid)
        assert not (stream.live or stream.pending or stream.ended or stream.refused or stream._refused_ids)

    for seed in range(40):
        asyncio.run(scenario(seed))
