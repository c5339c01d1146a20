"""tensor_parallel_size=2 over gloo on CPU under a hostile request mix: the tokens of one rank, and a failure on rank
0 alone that leaves the ranks in step."""

from __future__ import annotations

import glob
import os
import random
import tempfile

import pytest

from engine_service import SamplingParams
from engine_service.engine import EngineStepError, LLMEngine
from tests.integration.tiny import make_qwen3

VOCAB = 511  # not divisible by 2: the vocabulary-parallel head pads it
# A pool just above one max_model_len sequence and a small token budget: prompts chunk and sequences preempt. In
# float64, so that a seeded draw landing within float32 rounding of a token's boundary cannot flip on another machine.
ARGS = dict(device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=6,
            max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_soak")
    make_qwen3(path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False)
    return path


@pytest.fixture(scope="module")
def tp2(model_dir):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*")))
    engine = LLMEngine(model_dir, tensor_parallel_size=2, **ARGS)
    procs = list(engine.workers.procs)
    yield engine
    engine.add_request("live-at-close", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8))
    engine.step()
    engine.close()
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*"))) <= before


def _schedule(seed: int, n_ops: int = 70) -> list[tuple]:
    rng = random.Random(seed)
    ops, ids = [], []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.35:
            rid = f"r{len(ids)}"
            ids.append(rid)
            prompt = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 5, 17, 30, 40]))]
            kw = dict(max_tokens=rng.choice([1, 4, 12]), temperature=0.0)
            if rng.random() < 0.3:
                kw.update(temperature=1.0, seed=rng.randrange(1 << 40))
            if rng.random() < 0.3:
                kw["logprobs"] = 3
            if rng.random() < 0.2:
                kw.update(repetition_penalty=1.3, frequency_penalty=0.5)
            if rng.random() < 0.2:
                kw["logit_bias"] = {rng.randrange(VOCAB): 5.0}
            if rng.random() < 0.2:
                kw.update(min_tokens=min(2, kw["max_tokens"]), stop_token_ids=(rng.randrange(VOCAB),))
            ops.append(("add", rid, prompt, kw))
        elif r < 0.5:
            # mostly recent ids (waiting, prefilling, decoding or preempted), some finished ones, some unknown
            pick = rng.random()
            rid = ids[-rng.randint(1, min(len(ids), 3))] if ids and pick < 0.6 else \
                ids[rng.randrange(len(ids))] if ids and pick < 0.8 else "unknown"
            ops.append(("abort", rid))
        else:
            ops.append(("step",))
    return ops


def _run(engine: LLMEngine, ops: list[tuple]) -> tuple[dict, list]:
    """Each request's tokens, logprobs and finish reasons; the abort calls' answers."""
    seen: dict[str, list] = {}
    aborts = []

    def absorb(outs) -> None:
        for out in outs:
            entry = seen.setdefault(out.request_id, [[], [], []])
            entry[0] += out.new_token_ids
            entry[1] += [lp.logprob for lp in out.logprobs or []]
            if out.finished:
                entry[2].append(out.finish_reason)

    start = engine.scheduler.num_preemptions
    for op in ops:
        if op[0] == "add":
            engine.add_request(op[1], op[2], SamplingParams(**op[3]))
        elif op[0] == "abort":
            aborts.append(engine.abort_request(op[1]))
        else:
            absorb(engine.step())
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        absorb(engine.step())
    assert engine.scheduler.num_preemptions > start, "the schedule did not preempt"
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not engine.seqs and not engine.generators
    assert not engine.biases and not engine.runner.sampler.penalties._owners
    return seen, aborts


@pytest.mark.timeout(120)
def test_tp2_matches_tp1_through_aborts_preemption_and_chunking(model_dir, tp2):
    ops = _schedule(3)
    with LLMEngine(model_dir, tensor_parallel_size=1, **ARGS) as one:
        expected, expected_aborts = _run(one, ops)
    got, aborts = _run(tp2, ops)
    assert aborts == expected_aborts and True in aborts and False in aborts
    assert sorted(got) == sorted(expected)
    for rid, (tokens, logprobs, reasons) in got.items():
        assert tokens == expected[rid][0], rid
        assert logprobs == pytest.approx(expected[rid][1], abs=1e-9), rid
        assert reasons == expected[rid][2] and len(reasons) == 1, rid
    assert {r[2][0] for r in got.values()} >= {"abort", "length"}
    assert all(p.is_alive() for p in tp2.workers.procs)


@pytest.mark.timeout(120)
def test_a_sampler_failure_on_rank_0_fails_the_step_and_keeps_the_ranks_in_step(model_dir, tp2, monkeypatch):
    """The sampler runs on rank 0 alone, after every collective of the step: a failure there (on a GPU an
    out-of-memory) left the workers in step, yet took the whole engine down where one rank fails only the step."""
    prompts = [[3, 1, 4, 1, 5] * 4, [2, 7, 1, 8] * 6]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    with LLMEngine(model_dir, tensor_parallel_size=1, **ARGS) as one:
        for i, prompt in enumerate(prompts):
            one.add_request(f"ref{i}", prompt, params)
        reference = _tokens_until_idle(one)
    for i, prompt in enumerate(prompts):
        tp2.add_request(f"doomed{i}", prompt, params)
    tp2.step()

    def boom(*args, **kwargs):
        raise RuntimeError("injected: out of memory in the sampler")

    monkeypatch.setattr(tp2.runner.sampler, "sample_with_logprobs", boom)
    with pytest.raises(EngineStepError) as failed:
        for _ in range(10):
            tp2.step()
    assert sorted(o.request_id for o in failed.value.outputs) == ["doomed0", "doomed1"]
    monkeypatch.undo()
    for i, prompt in enumerate(prompts):
        tp2.add_request(f"ref{i}", prompt, params)
    assert _tokens_until_idle(tp2) == reference
    stats = tp2.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def _tokens_until_idle(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("the engine did not go idle")
