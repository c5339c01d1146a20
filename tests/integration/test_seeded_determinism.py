"""A seeded request's tokens do not depend on how the engine serves it, in float64 on CPU (docs/ENGINE.md, Sampling).

Its generator is its own, lives as long as it does and makes one draw per token: preemption (at every point of its
life, the recompute chunked or not), chunked prefill, prefix-cache hits, overlap scheduling, its batch companions,
logprobs, stop tokens and tensor parallelism must leave its tokens those it gets alone in a plain engine. Every
comparison is between two runs of the engine; a case meant to exercise a path (a preemption, a cache hit, a step
scheduled ahead) checks that it did.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest

from engine_service import LLM, SamplingParams
from engine_service.sequence import Sequence
from tests.integration.tiny import VOCAB, count_ahead, drain, exact_engine, make_qwen3, random_prompts

SEEDED = [
    SamplingParams(temperature=1.0, seed=11, max_tokens=12),
    SamplingParams(temperature=0.8, seed=12, max_tokens=10, top_k=40, top_p=0.9, min_p=0.01),
    SamplingParams(temperature=1.0, seed=2**62 + 13, max_tokens=14, repetition_penalty=1.3, frequency_penalty=0.4,
                   logit_bias={5: 2.0, 9: -1.5}),
]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeded")
    make_qwen3(path, heads=4, kv_heads=2)
    return path


def _serve(llm: LLM, requests: list[tuple[int, str, list[int], SamplingParams]]) -> dict[str, list]:
    """Add each (arrival step, request id, prompt, params) at its step and step until idle: each request's
    [tokens, finish reason]. The engine must end with every block free and no request's generator left."""
    pending = sorted(requests, key=lambda r: r[0])
    seen: dict[str, list] = {}
    step = 0
    while pending or llm.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            llm.add_request(rid, prompt, params)
        for out in llm.step():
            entry = seen.setdefault(out.request_id, [[], None])
            entry[0] += out.new_token_ids
            if out.finished:
                entry[1] = out.finish_reason
        step += 1
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.generators
    return seen


def _alone(path, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request's tokens alone in a plain engine (no chunking, no overlap, no preemption, a cold cache)."""
    with exact_engine(path, enable_prefix_caching=False) as llm:
        [out] = llm.generate([prompt], params)
    return out["token_ids"]


def _record_preemptions(llm: LLM) -> list[tuple[str, int, int]]:
    """(request id, tokens it had generated, tokens of it computed) at each preemption, in order."""
    points: list[tuple[str, int, int]] = []
    original = llm.scheduler._preempt

    def preempt(seq: Sequence) -> None:
        points.append((seq.request_id, seq.num_output_tokens, seq.num_computed_tokens))
        original(seq)

    llm.scheduler._preempt = preempt
    return points


def test_seeded_streams_differ_by_seed_and_from_greedy(path):
    """The other tests compare seeded streams: they must be streams that a wrong draw would change."""
    prompt = random_prompts(1, [9])[0]
    streams = {tuple(_alone(path, prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=12))) for s in range(4)}
    streams.add(tuple(_alone(path, prompt, SamplingParams(temperature=0.0, max_tokens=12))))
    assert len(streams) == 5


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("target", [0, 2], ids=["plain", "penalised-biased"])
def test_preempted_at_any_point_the_draws_continue_where_they_stopped(path, overlap, target):
    """A request preempted mid-prompt, after its k-th token for every k, and with its last token still to come: its
    recompute (chunked) draws nothing, and its next token takes the next draw, not a fresh or a repeated one. An
    urgent request arriving at step s preempts it (max_num_seqs 1) and takes the penalised one's penalty slot."""
    params = SEEDED[target]
    prompt, urgent = random_prompts(2, [20, 6])
    expected = _alone(path, prompt, params)
    with exact_engine(path, enable_prefix_caching=False) as llm:
        llm.add_request("a", prompt, params)
        generator = llm.generators["a"]
        _serve(llm, [])
        drawn = generator.get_state()  # after one draw per token, un-preempted
    points: set[int] = set()
    for s in range(1, 3 + params.max_tokens + 1):  # 3 prompt chunks, then a token a step
        with exact_engine(path, max_num_seqs=1, max_num_batched_tokens=8, overlap_scheduling=overlap) as llm:
            preemptions = _record_preemptions(llm)
            ahead = count_ahead(llm)
            llm.add_request("a", prompt, params)
            generator = llm.generators["a"]
            got = _serve(llm, [(s, "urgent", urgent, SamplingParams(temperature=1.0, seed=3, max_tokens=4,
                                                                    priority=-1, repetition_penalty=1.2))])
        assert got["a"] == [expected, "length"], f"urgent request at step {s}"
        assert generator.get_state().equal(drawn), f"urgent request at step {s}: the draws went astray"
        assert (ahead[0] > 0) == overlap
        points.update(n for rid, n, _ in preemptions if rid == "a")
        if s == 1:  # mid-prompt (with overlap, after the chunk in flight)
            assert [(rid, n) for rid, n, _ in preemptions] == [("a", 0)] and 0 < preemptions[0][2] < len(prompt)
    # Every point: before its first token (mid-prompt) up to the one with max_tokens - 1 tokens generated.
    assert points == set(range(params.max_tokens))


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_from_a_full_pool_keeps_seeded_tokens(path, overlap):
    """Requests that outgrow a small pool preempt one another (the newest first) and recompute, with or without a
    chunked recompute; each keeps its tokens."""
    prompts = random_prompts(3, [30, 31, 33, 35])
    params = [replace(SEEDED[i % 3], max_tokens=24) for i in range(4)]
    expected = [_alone(path, p, q) for p, q in zip(prompts, params, strict=True)]
    for budget in (64, 8):
        with exact_engine(path, num_kvcache_blocks=7, max_num_batched_tokens=budget, max_num_seqs=4,
                          overlap_scheduling=overlap) as llm:
            preemptions = _record_preemptions(llm)
            got = _serve(llm, [(0, str(i), p, q) for i, (p, q) in enumerate(zip(prompts, params, strict=True))])
        assert any(n > 0 for _, n, _ in preemptions), preemptions  # some preempted after producing tokens
        assert [got[str(i)][0] for i in range(4)] == expected, f"budget {budget}"


@pytest.mark.parametrize("budget", [4, 16, 100])
def test_chunked_prefill_and_prefix_cache_hits_keep_seeded_tokens(path, budget):
    """Prompts computed in chunks of `budget` tokens, served cold, then again from the prefix cache (the same prompt
    after it finished; one sharing 32 tokens with a running request; the same prompt twice at once)."""
    shared = random_prompts(4, [40])[0]
    tails = random_prompts(5, [3, 17])
    prompts = [shared, shared[:32] + tails[0], shared[:32] + tails[1]]
    params = [SEEDED[0], SEEDED[1], SEEDED[2]]
    expected = [_alone(path, p, q) for p, q in zip(prompts, params, strict=True)]
    with exact_engine(path, max_num_batched_tokens=budget, max_num_seqs=4) as llm:
        cold = _serve(llm, [(0, "cold", prompts[0], params[0])])
        assert llm.stats()["prefix_cache_hits"] == 0
        warm = _serve(llm, [(0, "again", prompts[0], params[0]), (2, "beside", prompts[1], params[1]),
                            (2, "twin-a", prompts[2], params[2]), (2, "twin-b", prompts[2], params[2])])
        hits = llm.stats()["prefix_cache_hits"]
    assert hits >= 32 * 4  # each of the four found at least the shared blocks
    assert cold["cold"][0] == warm["again"][0] == expected[0]
    assert warm["beside"][0] == expected[1]
    assert warm["twin-a"][0] == warm["twin-b"][0] == expected[2]


@pytest.mark.parametrize("overlap", [False, True])
def test_batch_companions_do_not_change_seeded_tokens(path, overlap):
    """Seeded requests beside unseeded, greedy, penalised, biased, filtered, min_tokens and logprobs requests,
    arriving before, with and after them, with and without overlap scheduling."""
    prompts = random_prompts(6, [7, 19, 26])
    expected = [_alone(path, p, q) for p, q in zip(prompts, SEEDED, strict=True)]
    others = random_prompts(7, [5, 12, 21, 9, 30, 3])
    companions = [
        SamplingParams(temperature=1.0, max_tokens=9),
        SamplingParams(temperature=0.0, max_tokens=15),
        SamplingParams(temperature=0.7, max_tokens=6, repetition_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=1.2, max_tokens=11, logit_bias={3: 100.0, 4: -100.0}, top_k=3),
        SamplingParams(temperature=0.9, seed=7, max_tokens=8, min_tokens=4, stop_token_ids=list(range(0, VOCAB, 3)),
                       logprobs=5, prompt_logprobs=2),
        SamplingParams(temperature=1.0, max_tokens=13, top_p=0.5, min_p=0.2, logprobs=0),
    ]
    requests = [(0, f"s{i}", p, q) for i, (p, q) in enumerate(zip(prompts, SEEDED, strict=True))]
    requests += [(i % 3 * 2, f"c{i}", p, q) for i, (p, q) in enumerate(zip(others, companions, strict=True))]
    with exact_engine(path, max_num_batched_tokens=32, max_num_seqs=8, overlap_scheduling=overlap) as llm:
        ahead = count_ahead(llm)
        got = _serve(llm, requests)
    assert (ahead[0] > 0) == overlap
    assert [got[f"s{i}"][0] for i in range(3)] == expected


def test_json_mode_companions_do_not_change_seeded_tokens(demo_model_dir):
    """JSON-mode requests' masks touch only their rows (and switch overlap scheduling off while they run)."""
    prompts = [[100 + i, 200 + i, 300 + i] * 4 for i in range(3)]
    with exact_engine(demo_model_dir, enable_prefix_caching=False) as llm:
        expected = [llm.generate([p], [q])[0]["token_ids"] for p, q in zip(prompts, SEEDED, strict=True)]
    json_mode = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, response_format="json_object") for s in (1, 2)]
    requests = [(0, f"s{i}", p, q) for i, (p, q) in enumerate(zip(prompts, SEEDED, strict=True))]
    requests += [(i, f"j{i}", [7, 8, 9], q) for i, q in enumerate(json_mode)]
    with exact_engine(demo_model_dir, overlap_scheduling=True) as llm:
        got = _serve(llm, requests)
    assert [got[f"s{i}"][0] for i in range(3)] == expected


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_do_not_change_seeded_tokens(path, overlap):
    """logprobs and prompt_logprobs (which skips the prefix cache) read the logits; they must not move a draw."""
    prompts = random_prompts(8, [12, 25, 4])
    with exact_engine(path, max_num_batched_tokens=16, max_num_seqs=4, overlap_scheduling=overlap) as llm:
        runs = []
        for extra in ({}, {"logprobs": 5}, {"logprobs": 0, "prompt_logprobs": 3}):
            params = [replace(q, **extra) for q in SEEDED]
            got = _serve(llm, [(0, f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params, strict=True))])
            runs.append([got[f"r{i}"][0] for i in range(3)])
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == [_alone(path, p, q) for p, q in zip(prompts, SEEDED, strict=True)]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_token_cuts_the_seeded_stream_where_it_first_comes(path, overlap):
    """A stop token ends the stream it would have been in, at its first place, with or without overlap scheduling
    (which computes a row in vain after it) and preemption. With min_tokens it is banned until then, which changes
    the draws' distribution: those streams are compared across configurations only."""
    prompts = random_prompts(9, [30, 31, 33, 35])
    params = [replace(SEEDED[i % 3], max_tokens=24) for i in range(4)]
    full = [_alone(path, p, q) for p, q in zip(prompts, params, strict=True)]
    stops = [stream[len(stream) // 2] for stream in full]
    cut = [stream[: stream.index(stop) + 1] for stream, stop in zip(full, stops, strict=True)]
    stopped = [replace(q, stop_token_ids=[stop]) for q, stop in zip(params, stops, strict=True)]
    late = [replace(q, stop_token_ids=[stop], min_tokens=len(c)) for q, stop, c in zip(params, stops, cut, strict=True)]
    runs = []
    for blocks in (64, 8):  # the second preempts
        with exact_engine(path, num_kvcache_blocks=blocks, max_num_batched_tokens=64, max_num_seqs=4,
                          overlap_scheduling=overlap) as llm:
            preemptions = _record_preemptions(llm)
            got = _serve(llm, [(0, f"{kind}{i}", p, q) for kind, ps in (("stop", stopped), ("late", late))
                               for i, (p, q) in enumerate(zip(prompts, ps, strict=True))])
            runs.append(got)
        assert any(n > 0 for _, n, _ in preemptions) == (blocks == 8), preemptions
    for got in runs:
        assert [got[f"stop{i}"] for i in range(4)] == [[c, "stop"] for c in cut]
    assert [runs[0][f"late{i}"] for i in range(4)] == [runs[1][f"late{i}"] for i in range(4)]
    assert all(len(runs[0][f"late{i}"][0]) >= len(c) for i, c in enumerate(cut))


def test_n_completions_with_consecutive_seeds_equal_each_alone(path):
    """The text service sends completion i of n as a request with seed + i and the same prompt: each equals that
    request alone, though all but the first wait for the first's prompt blocks and then hit the cache."""
    prompt = random_prompts(10, [37])[0]
    base = 2**63 - 2  # completion i's seed is (base + i) mod 2**63
    params = [SamplingParams(temperature=1.0, seed=(base + i) % 2**63, max_tokens=10) for i in range(4)]
    expected = [_alone(path, prompt, q) for q in params]
    with exact_engine(path) as llm:
        got = _serve(llm, [(0, str(i), prompt, q) for i, q in enumerate(params)])
        assert llm.stats()["prefix_cache_hits"] == 3 * 32
    assert [got[str(i)][0] for i in range(4)] == expected
    assert len({tuple(t) for t in expected}) == 4


@pytest.mark.parametrize("overlap", [False, True])
def test_a_requests_generator_is_freed_when_it_ends(path, overlap):
    """Finished, aborted while waiting, aborted while running, aborted with its step in flight: the engine keeps no
    reference to its generator once the end is reported, and a new request under the same id and seed starts over."""
    prompt = random_prompts(11, [10])[0]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8)
    expected = _alone(path, prompt, params)
    with exact_engine(path, max_num_seqs=1, max_num_batched_tokens=16, overlap_scheduling=overlap) as llm:
        refs = {}
        for rid in ("done", "waiting"):
            llm.add_request(rid, prompt, params)
            refs[rid] = weakref.ref(llm.generators[rid])
        early = [out for _ in range(3) for out in llm.step()]  # "done" starts; "waiting" waits (max_num_seqs 1)
        assert llm.abort_request("waiting")
        seen = drain(llm)
        assert [t for out in early for t in out.new_token_ids] + seen["done"][0] == expected
        assert seen["waiting"][1] == "abort"
        llm.add_request("running", prompt, params)
        refs["running"] = weakref.ref(llm.generators["running"])
        for _ in range(3):
            llm.step()
        assert (llm._inflight is not None) == overlap  # with overlap, its next step is in flight
        assert llm.abort_request("running")
        assert drain(llm)["running"][1] == "abort" and not llm.generators
        gc.collect()
        assert [rid for rid, ref in refs.items() if ref() is not None] == []
        # The same id and seed again: a fresh generator, the same tokens.
        assert _serve(llm, [(0, "running", prompt, params)])["running"] == [expected, "length"]


@pytest.mark.timeout(240)
def test_tensor_parallel_keeps_seeded_tokens(path):
    """Two ranks over gloo on CPU, through preemption: rank 0 samples with the requests' own generators."""
    prompts = random_prompts(12, [30, 31, 33])
    args = dict(device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=6,
                max_num_batched_tokens=16, max_num_seqs=3, max_model_len=128)
    outs = {}
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, **args) as llm:
            outs[tp] = [o["token_ids"] for o in llm.generate(prompts, SEEDED)]
            assert llm.stats()["num_preemptions"] > 0
    assert outs[2] == outs[1]
    assert outs[1] == [_alone(path, p, q) for p, q in zip(prompts, SEEDED, strict=True)]
