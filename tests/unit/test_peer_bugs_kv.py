"""Scheduling and KV-cache failure modes other inference servers shipped, checked against this engine: greedy tokens
against transformers' in float64, and the scheduler driven by random traffic."""

from __future__ import annotations

import random

import pytest

from engine_service import SamplingParams
from engine_service.sequence import Status
from tests.integration.tiny import drain, exact_engine, hf_greedy, make_qwen3, random_prompts
from tests.unit.test_scheduler_properties import Sim, _prompt

BS = 16  # exact_engine's block size


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peer-kv")
    return make_qwen3(path, heads=4, kv_heads=2), path


def test_the_block_ending_in_a_finished_requests_last_token_is_not_served_from_the_cache(model_and_dir):
    """A finished request's blocks published by their tokens rather than by the KV computed: the last sampled
    token's KV is never computed, so a follow-up prompt (the conversation so far, then more) that hit the block
    ending in it read an empty slot."""
    model, path = model_and_dir
    prompt = random_prompts(11, [20])[0]
    with exact_engine(path) as llm:
        first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2 * BS - 20, ignore_eos=True))[0]
        follow_up = prompt + first["token_ids"] + [5, 6, 7]
        assert len(prompt + first["token_ids"]) == 2 * BS  # the last token completes block 1
        second = llm.generate([follow_up], SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert second["num_cached_tokens"] == BS  # block 0 only: block 1's last slot was never written
    assert second["token_ids"] == hf_greedy(model, follow_up, 6)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_an_abort_mid_prefill_leaves_only_the_blocks_it_computed_in_the_cache(model_and_dir, overlap):
    """A request aborted in the middle of its chunked prefill (with overlap scheduling, while its next chunk is in
    flight beside another request's decode, and read back after the abort) leaking its blocks, or leaving blocks
    findable whose KV was not written or belongs to a chunk no one reads back: the same prompt again hits exactly
    the whole blocks of the chunk read back before the abort, and gets transformers' tokens."""
    model, path = model_and_dir
    other, prompt = random_prompts(12, [5, 100])
    with exact_engine(path, max_num_batched_tokens=2 * BS, overlap_scheduling=overlap) as llm:
        llm.add_request("o", other, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        llm.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=4))
        first = llm.step()  # o's prompt (5 tokens) and x's first chunk (27 tokens: one whole block) are read back
        assert (llm._inflight is not None) == overlap  # x's second chunk is in flight with overlap
        assert llm.abort_request("x")
        seen = drain(llm)
        o_tokens = [t for out in first for t in out.new_token_ids] + seen["o"][0]
        assert seen["x"][1] == "abort" and o_tokens == hf_greedy(model, other, 20)
        again = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]
        stats = llm.stats()
    assert again["num_cached_tokens"] == BS
    assert again["token_ids"] == hf_greedy(model, prompt, 6)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_prompts_diverging_on_either_side_of_a_block_boundary_share_only_the_blocks_before_it(model_and_dir):
    """Prefix hits across prompts that differ only after a block boundary (a hash naming the block alone, not the
    prefix through it, or a match that took the block the difference falls in): cached tokens are the whole
    blocks before the first difference, and every prompt gets transformers' tokens."""
    model, path = model_and_dir
    shared = random_prompts(13, [3 * BS])[0]
    other = (shared[BS - 1] + 1) % 512, (shared[BS] + 1) % 512
    prompts = [shared[: BS - 1] + [other[0]] + shared[BS:],  # differs at the last token of block 0
               shared[:BS] + [other[1]] + shared[BS + 1 :],  # differs at the first token of block 1
               shared[BS:] + shared[:BS]]  # the same blocks in another order
    params = SamplingParams(temperature=0.0, max_tokens=6)
    with exact_engine(path) as llm:
        llm.generate([shared], params)
        outs = llm.generate(prompts, params)
    assert [o["num_cached_tokens"] for o in outs] == [0, BS, 0]
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 6)


def test_every_decoding_sequence_is_scheduled_each_step_unless_it_is_preempted():
    """A running request silently skipped for a step when a preemption (for priority or for blocks) shifted the
    running list under the scheduler's cursor: whatever the traffic, each decoding sequence is in the next batch
    or was preempted."""
    skipped, preemptions = [], 0
    for seed in range(150):
        rng = random.Random(seed)
        max_seqs = rng.randint(1, 4)
        sim = Sim(rng.randint(4, 24), rng.randint(max_seqs, 40), max_seqs, rng.randint(8, 64))
        schedule = sim.sched.schedule

        def checked(sim=sim, schedule=schedule, seed=seed):
            decoding = [seq for seq in sim.sched.running if seq.is_decoding]
            batch = schedule()
            skipped.extend((seed, seq.request_id) for seq in decoding
                           if seq.status is Status.RUNNING and seq not in batch.seqs)
            return batch

        sim.sched.schedule = checked
        for _ in range(60):
            kind = rng.random()
            if kind < 0.4:
                sim.add(_prompt(rng, rng.randrange(4), rng.randint(1, 30)), rng.randint(1, 20),
                        rng.choice((0, 0, 1, -1)))
            elif kind < 0.45:
                sim.abort(rng.randrange(100))
            else:
                sim.step(rng)
        sim.drain(rng)
        preemptions += sim.sched.num_preemptions
    assert not skipped
    assert preemptions > 50  # the traffic does preempt (for blocks and for priority)
