"""Per-request state is released, and caches stay bounded, over traffic of every kind (found by a leak audit):
the engine's structures return to idle after normal, aborted, refused, penalised, biased, JSON-mode, prioritised
and preempted requests; the service's and the tokenizer service's per-request maps empty; and the JSON mask cache
keeps no schema alive that no request can reach."""

from __future__ import annotations

import gc
import json
import random
import time

import grpc
import pytest

from engine_service import SamplingParams
from engine_service import json_grammar as jg
from tests.integration.tiny import exact_engine

pytestmark = pytest.mark.timeout(120)


def _engine(path, **overrides):
    """A small pool (preemption) and a small step budget (chunked prefills) on the demo model, in float32."""
    args = dict(dtype="float32", kvcache_block_size=8, num_kvcache_blocks=40, max_num_batched_tokens=48,
                max_num_seqs=6, max_model_len=256)
    return exact_engine(path, **{**args, **overrides})


def _schema(i: int) -> str:
    return json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}, "b": {"enum": [i, "x"]}},
                       "required": [f"k{i}"], "additionalProperties": False})


def _request(rng: random.Random, i: int, vocab: int, system: list[int]):
    """(prompt, params, steps before an abort or None) of request i: each kind in turn."""
    prompt = system + [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 30))]
    n = rng.randrange(1, 12)
    kinds = [
        lambda: (prompt, SamplingParams(max_tokens=n, temperature=0), None),
        lambda: (prompt * 3, SamplingParams(max_tokens=20), 1),  # aborted mid-prefill (chunked)
        lambda: (prompt, SamplingParams(max_tokens=40, ignore_eos=True), rng.randrange(3, 8)),  # mid-decode
        lambda: ([vocab + 5], SamplingParams(max_tokens=3), None),  # refused
        lambda: (prompt, SamplingParams(max_tokens=n, logprobs=3, prompt_logprobs=2, seed=i), None),
        lambda: (prompt, SamplingParams(max_tokens=n, repetition_penalty=1.3, presence_penalty=0.5,
                                        frequency_penalty=0.2, seed=i), None),
        lambda: (prompt, SamplingParams(max_tokens=n, logit_bias={rng.randrange(vocab): 5.0, 7: -100}), None),
        lambda: (prompt, SamplingParams(max_tokens=n + 10, response_format="json_object", seed=i), None),
        lambda: (prompt, SamplingParams(max_tokens=n + 20, response_format="json_schema", json_schema=_schema(i),
                                        seed=i), None),
        lambda: (prompt, SamplingParams(max_tokens=n, response_format="json_schema",  # refused schema
                                        json_schema=json.dumps({"type": "object", "patternProperties": {}})), None),
        lambda: (prompt, SamplingParams(max_tokens=n, stop_token_ids=[rng.randrange(vocab)], priority=i % 5 - 2,
                                        seed=i), None),
        lambda: (system + [5, 6, 7], SamplingParams(max_tokens=n, seed=i), None),  # n>1 style: one prompt
        lambda: (prompt * 2, SamplingParams(max_tokens=60, ignore_eos=True, priority=i % 3), None),  # preempted
        lambda: (prompt, SamplingParams(max_tokens=n + 1, min_tokens=1, top_k=5, top_p=0.9, min_p=0.05, seed=i),
                 None),
    ]
    return kinds[i % len(kinds)]()


def _traffic(llm, seed: int, count: int) -> int:
    """Add `count` requests of every kind (aborting some partway), stepping as they come; run until idle. Returns
    how many the engine refused."""
    rng = random.Random(seed)
    system = [random.Random(9).randrange(3, 1000) for _ in range(24)]
    aborts: dict[str, int] = {}
    refused = 0

    def step() -> None:
        llm.step()
        for rid in list(aborts):
            aborts[rid] -= 1
            if not aborts[rid]:
                llm.abort_request(rid)
                del aborts[rid]

    for i in range(count):
        prompt, params, abort_after = _request(rng, i, llm.model_cfg.vocab_size, system)
        try:
            llm.add_request(f"{seed}-{i}", prompt, params)
        except ValueError:
            refused += 1
            continue
        if abort_after is not None:
            aborts[f"{seed}-{i}"] = abort_after
        if i % 4 == 3:
            step()
    for _ in range(5000):
        if not llm.has_unfinished_requests():
            return refused
        step()
    raise AssertionError("the engine did not go idle")


def _assert_idle(llm) -> None:
    bm, sched, penalties = llm.block_manager, llm.scheduler, llm.runner.sampler.penalties
    assert bm.num_free_blocks == bm.num_blocks and not any(b.ref_count for b in bm.blocks)
    # The prefix cache keeps hashes of free blocks, one block per hash at most, each naming its block's own hash.
    assert len(bm.cached) <= bm.num_blocks and all(bm.blocks[b].hash == h for h, b in bm.cached.items())
    assert not (llm.seqs or llm.generators or llm.biases or llm.cursors or llm._pending or llm._pending_ids)
    assert llm._inflight is None and not sched.running and not sched.waiting
    assert not sched.waiting._levels and not sched.waiting._priorities
    assert not penalties._owners and len(penalties._free) == penalties.output_counts.shape[0]
    # Only the schemas the cache holds keep masks (no request is live).
    assert set(llm.json_masks._holds) == set(llm.schemas._nodes.values())


@pytest.mark.parametrize("overrides", [{}, {"overlap_scheduling": True}], ids=["plain", "overlap"])
def test_every_kind_of_request_leaves_the_engine_idle(demo_model_dir, overrides):
    with _engine(demo_model_dir, **overrides) as llm:
        for seed in (1, 2):
            refused = _traffic(llm, seed, 112)
            assert refused == 16  # the refused kinds, and nothing else
            _assert_idle(llm)
        stats = llm.stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and stats["json_mask_hits"] > 0


def _live_nodes() -> int:
    gc.collect()
    return sum(type(o) is jg.Node for o in gc.get_objects())


def test_masks_keep_no_schema_alive_that_no_request_can_reach(demo_model_dir):
    """A mask's cache key holds its schema's nodes: once the schema cache evicted a schema, its masks (which no
    lookup could reach again: its text compiles to new nodes) kept its compiled tree alive until the mask budget's
    131,072 masks, 4 MB for a 9 KB schema of 300 optional properties. The tree is now freed with the schema's last
    holder, the cache or a live request."""
    with _engine(demo_model_dir) as llm:
        llm.schemas.size = 2

        def run(first: int, count: int) -> None:
            llm.generate([[1, 2, 3]] * count, [SamplingParams(max_tokens=4, response_format="json_schema",
                                                              json_schema=_schema(i), seed=i)
                                               for i in range(first, first + count)])

        run(0, 3)
        before = _live_nodes()
        run(100, 12)
        assert _live_nodes() == before  # the two schemas cached, nothing of the other thirteen
        assert len(llm.json_masks._cache) > 0


def test_a_live_request_keeps_its_schemas_masks_until_it_ends(demo_model_dir):
    """A schema the cache evicts while a request of it runs keeps its masks for that request (they are looked up at
    every token), and loses them when the request ends."""
    with _engine(demo_model_dir) as llm:
        llm.schemas.size = 1
        llm.add_request("long", [1, 2, 3], SamplingParams(max_tokens=60, response_format="json_schema",
                                                          json_schema=_schema(1), temperature=0))
        for _ in range(4):
            llm.step()
        root = llm.cursors["long"].top
        kept = set(llm.json_masks._filed[root])
        assert kept
        llm.generate([[4, 5]], SamplingParams(max_tokens=3, response_format="json_schema", json_schema=_schema(2)))
        assert root not in llm.schemas._nodes.values() and kept <= set(llm.json_masks._cache)
        llm.abort_request("long")
        llm.step()
        assert root not in llm.json_masks._holds and not kept & set(llm.json_masks._cache)


# ---- the services, in-process over the real engine --------------------------------------------------------------
def _wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    until = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > until:
            raise AssertionError(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.02)


def _record(monkeypatch, module, name: str, made: dict) -> None:
    """module.<name> (a class) records the instance it makes in made[name]."""
    base = getattr(module, name)

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made[name] = self

    monkeypatch.setattr(module, name, Recorded)


def _series(registry) -> set[tuple]:
    """Every labelled series a registry exports (its cardinality must not grow with the requests)."""
    return {(s.name, tuple(sorted(s.labels.items()))) for metric in registry.collect() for s in metric.samples}


def _in_threads(calls, width: int = 4) -> None:
    import threading

    running: list[threading.Thread] = []
    for call in calls:
        thread = threading.Thread(target=call)
        thread.start()
        running.append(thread)
        if len(running) >= width:
            running.pop(0).join()
    for thread in running:
        thread.join()


def test_the_engine_service_forgets_every_request(demo_model_dir, monkeypatch):
    """Bidi streams with aborts, deadlines, refusals, duplicate ids and cancelled calls, and GenerateStream calls
    aborted, timed out or cancelled: the servicer's, the loop's and the metrics' per-request maps empty, the engine
    goes idle, and the metric series are the same after more traffic."""
    import engine_service.server as server
    from protos.llmserve.engine.v1 import engine_pb2 as pb
    from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
    from tests.unit.test_engine_service_fake import Running

    made: dict[str, server.EngineServicer] = {}
    _record(monkeypatch, server, "EngineServicer", made)
    llm = _engine(demo_model_dir)
    running = Running(llm, max_waiting=4, max_num_seqs=6, log_requests=True, metrics_port=0)
    try:
        _wait_for(lambda: made and made["EngineServicer"].started, "the start-up canary")
        servicer = made["EngineServicer"]
        loop = servicer.loop
        vocab = llm.model_cfg.vocab_size
        codes: list[grpc.StatusCode] = []  # the calls' error statuses (a call's own thread cannot fail the test)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EngineStub(channel)

            def bidi(seed: int) -> None:
                rng = random.Random(seed)
                params = [pb.SamplingParams(max_tokens=5, logprobs=2, prompt_logprobs=1),
                          pb.SamplingParams(max_tokens=5, repetition_penalty=1.2, logit_bias={5: 3.0}),
                          pb.SamplingParams(max_tokens=20, response_format=pb.RESPONSE_FORMAT_JSON_SCHEMA,
                                            json_schema=_schema(seed)),
                          pb.SamplingParams(max_tokens=60, ignore_eos=True, priority=rng.randrange(5)),
                          pb.SamplingParams(max_tokens=5, temperature=-1.0)]  # refused
                requests = [pb.NewRequest(request_id=str(i), prompt_token_ids=[rng.randrange(3, vocab)] * (1 + i),
                                          sampling_params=params[i % len(params)], deadline_ms=(0, 0, 30)[i % 3])
                            for i in range(10)]
                requests += [pb.NewRequest(request_id="x", prompt_token_ids=[vocab + 1]),  # refused
                             pb.NewRequest(request_id="3", prompt_token_ids=[4])]  # a live id: refused

                def frames():
                    yield pb.ClientFrame(requests=requests[:6])
                    yield pb.ClientFrame(requests=requests[6:], abort_request_ids=["1", "2"],
                                         stopped_request_ids=["2"])

                call = stub.Generate(frames(), timeout=30)
                try:
                    for n, _ in enumerate(call):
                        if seed % 2 and n == 2:
                            call.cancel()  # the client goes away with requests live
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            def unary(seed: int) -> None:
                request = pb.NewRequest(request_id=f"u{seed}", prompt_token_ids=[7, 8, 9],
                                        sampling_params=pb.SamplingParams(max_tokens=100, ignore_eos=True))
                calls = stub.GenerateStream(request, timeout=(30, 30, 0.05)[seed % 3])
                try:
                    for n, _ in enumerate(calls):
                        if n == 2 and seed % 3 == 0:
                            stub.Abort(pb.AbortRequest(request_id=f"u{seed}"))
                        if n == 2 and seed % 3 == 1:
                            calls.cancel()
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            series = None
            for batch in range(2):
                _in_threads([lambda s=s: (bidi if s % 3 else unary)(s) for s in range(batch * 100, batch * 100 + 18)])
                # Cancelled by the client, past the deadline, or a full queue: nothing the services got wrong.
                assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
                _wait_for(lambda: not servicer._streams and not loop._sinks and not llm.has_unfinished_requests(),
                          "the calls' end")
                time.sleep(0.1)  # the engine thread's last step and its metrics
                assert not servicer._unary and not loop._priorities and not loop.metrics._live
                assert loop._commands.empty()
                _assert_idle(llm)
                if series is None:
                    series = _series(loop.metrics.registry)
                assert _series(loop.metrics.registry) == series
                assert set(loop.metrics.finished) == {"stop", "length", "abort", "error"}
    finally:
        assert running.stop() == 0


def test_the_tokenizer_service_forgets_every_request(demo_model_dir, monkeypatch):
    """Text requests (streamed, with stop strings, n > 1, chat, deadlines, cancelled calls, refused) and GenerateMulti
    calls with aborts: the engine pool's per-request maps and outboxes empty, the servicer counts none in flight,
    and the metric series stay the same."""
    import tokenizer_service.server as text_server
    from protos.llmserve.text.v1 import text_pb2 as pb
    from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
    from tests.unit.test_engine_service_fake import Running
    from tests.unit.test_text_service_regressions import TextServer, wait_ready

    made: dict[str, object] = {}
    _record(monkeypatch, text_server, "EnginePool", made)
    _record(monkeypatch, text_server, "TextServicer", made)
    llm = _engine(demo_model_dir, num_kvcache_blocks=60, max_num_seqs=8)
    engine = Running(llm, log_requests=False)
    text = TextServer(demo_model_dir, engines=engine.target, log_requests=False)
    words = "the cat sat on a mat and went home { } [ ] : ,".split()
    try:
        with grpc.insecure_channel(text.target) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            wait_ready(stub)
            pool, servicer = made["EnginePool"], made["TextServicer"]
            codes: list[grpc.StatusCode] = []  # the calls' error statuses (a call's own thread cannot fail the test)

            def params(rng: random.Random, i: int) -> pb.SamplingParams:
                return [pb.SamplingParams(max_tokens=8, temperature=0),
                        pb.SamplingParams(max_tokens=6, logprobs=2, prompt_logprobs=1, seed=i),
                        pb.SamplingParams(max_tokens=12, response_format=pb.RESPONSE_FORMAT_JSON_OBJECT),
                        pb.SamplingParams(max_tokens=4, temperature=-2),  # refused
                        pb.SamplingParams(max_tokens=60, ignore_eos=True, priority=rng.randrange(3))][i % 5]

            def one(seed: int) -> None:
                rng = random.Random(seed)
                request = pb.GenerateRequest(prompt=" ".join(rng.choices(words, k=8)), sampling_params=params(rng, seed),
                                             stop=["e", "at"][: seed % 3], n=1 + seed % 3)
                if seed % 4 == 1:
                    request.chat.messages.add(role="user", content="hi there")
                if seed % 4 == 2:
                    request.deadline_ms = 20
                call = stub.Generate(request, timeout=30)
                try:
                    for n, _ in enumerate(call):
                        if seed % 4 == 3 and n == 1:
                            call.cancel()
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            def multi(seed: int) -> None:
                rng = random.Random(seed)

                def messages():
                    for i in range(6):
                        yield pb.MultiRequest(generate=pb.GenerateRequest(
                            request_id=str(i), prompt=" ".join(rng.choices(words, k=5)),
                            sampling_params=params(rng, seed + i), stop=["o"] if i % 2 else [], n=1 + i % 2))
                    yield pb.MultiRequest(abort_request_id="4")
                    yield pb.MultiRequest(abort_request_id="never")

                call = stub.GenerateMulti(messages(), timeout=30)
                try:
                    for n, _ in enumerate(call):
                        if seed % 2 and n == 4:
                            call.cancel()
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            series = None
            for batch in range(2):
                _in_threads([lambda s=s: (multi if s % 3 == 0 else one)(s) for s in range(batch * 100, batch * 100 + 24)])
                # Cancelled, past the deadline, refused (temperature -2) or a full queue: nothing the services got wrong.
                assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
                assert grpc.StatusCode.INVALID_ARGUMENT in codes  # the refused kind was refused
                _wait_for(lambda: not servicer.inflight and not any(c.inflight for c in pool.conns.values())
                          and not llm.has_unfinished_requests(), "the requests' end")
                assert not servicer.admitting and not servicer._multi_wakes
                for conn in pool.conns.values():
                    outbox = conn._outbox
                    assert not (outbox.new or outbox.aborts or outbox.stopped)
                if series is None:
                    series = _series(servicer.metrics.registry)
                assert _series(servicer.metrics.registry) == series
        _wait_for(lambda: not llm.has_unfinished_requests(), "the engine's idle")
        time.sleep(0.1)
        _assert_idle(llm)
    finally:
        text.stop()
        assert engine.stop() == 0
