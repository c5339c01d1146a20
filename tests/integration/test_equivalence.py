"""The engine's greedy tokens equal transformers' greedy tokens, in float64 on CPU.

Whatever batching, chunked prefill, prefix caching and preemption do on the way, the tokens must not change.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_service import SamplingParams
from tests.integration.tiny import (
    VOCAB,
    exact_engine,
    hf_greedy,
    make_qwen3,
    random_prompts,
    to_transformers4_config,
)

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)

# (heads, kv_heads, head_dim, hidden, tie, theta): GQA ratios 1-4, head_dim * heads != hidden, both ties.
SHAPES = {
    "gqa1-tied": (4, 4, 16, 64, True, 10000.0),
    "gqa2-untied-wide-heads": (4, 2, 32, 64, False, 1e6),
    "gqa3-tied-narrow-heads": (6, 2, 8, 64, True, 5000.0),
    "gqa4-untied": (8, 2, 16, 96, False, 123456.0),
}




@pytest.fixture(scope="module", params=list(SHAPES))
def model_and_dir(request, tmp_path_factory):
    heads, kv, hd, hidden, tie, theta = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = make_qwen3(path, heads=heads, kv_heads=kv, head_dim=hd, hidden=hidden, tie=tie, theta=theta)
    return model, path


def test_batch_of_lengths_1_to_300(model_and_dir):
    model, path = model_and_dir
    prompts = random_prompts(1, [1, 2, 15, 16, 17, 64, 129, 300])
    with exact_engine(path) as llm:
        outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens"
        assert out["finish_reason"] == "length"


def test_chunked_prefill(model_and_dir):
    model, path = model_and_dir
    prompts = random_prompts(2, [5, 70, 200])
    with exact_engine(path, max_num_batched_tokens=16, max_num_seqs=4) as llm:
        outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, MAX_NEW)


@pytest.fixture(scope="module")
def gqa2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa2")
    return make_qwen3(path, heads=4, kv_heads=2), path


def test_prefix_cache_hits_keep_tokens(gqa2):
    model, path = gqa2
    rng = random.Random(3)
    base = [rng.randrange(VOCAB) for _ in range(48)]  # three full blocks
    prompts = [base, base + [7], base[:40] + [1, 2, 3], base + base[:20], base]
    with exact_engine(path) as llm:
        first = llm.generate(prompts, GREEDY)
        assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]
        hits_before = llm.stats()["prefix_cache_hits"]
        second = llm.generate(prompts, GREEDY)  # now everything is cached
        stats = llm.stats()
    # All five are admitted in one step, and a hash is published only after its KV is written: the
    # first pass cannot hit; the second one must.
    assert stats["prefix_cache_hits"] > hits_before
    for prompt, a, b in zip(prompts, first, second, strict=True):
        expected = hf_greedy(model, prompt, MAX_NEW)
        assert a["token_ids"] == expected
        assert b["token_ids"] == expected
    # A prompt cached whole recomputes its last block: 48 tokens, 2 blocks served from the cache.
    assert second[0]["num_cached_tokens"] == 32
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_prefix_cache_hits_across_steps(gqa2):
    """With a small token budget, later prompts are admitted after earlier blocks were published."""
    model, path = gqa2
    rng = random.Random(7)
    base = [rng.randrange(VOCAB) for _ in range(64)]
    prompts = [base + [i] for i in range(4)]
    with exact_engine(path, max_num_batched_tokens=70, max_num_seqs=4) as llm:
        outs = llm.generate(prompts, GREEDY)
        # Prompt 0 computes the shared 64 tokens; the others wait for them to be published (rather than
        # compute a copy beside it in the first step) and each hit 64 tokens.
        assert llm.stats()["prefix_cache_hits"] == 3 * 64
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, MAX_NEW)


def test_preemption_keeps_tokens(gqa2):
    model, path = gqa2
    prompts = random_prompts(4, [60, 61, 62, 63])
    params = SamplingParams(temperature=0.0, max_tokens=30)
    # Each request needs ceil(93 / 16) = 6 blocks at its end; 4 of them need 24 but the pool has 12.
    with exact_engine(path, num_kvcache_blocks=12, max_num_batched_tokens=64) as llm:
        outs = llm.generate(prompts, params)
        stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 30)


def test_pool_smaller_than_max_model_len_and_budget_smaller_than_prompt(gqa2):
    model, path = gqa2
    prompt = random_prompts(5, [100])[0]
    with exact_engine(path, num_kvcache_blocks=8, max_num_batched_tokens=8, max_num_seqs=2) as llm:
        out = llm.generate([prompt], GREEDY)[0]
    assert out["token_ids"] == hf_greedy(model, prompt, MAX_NEW)


def test_transformers4_config_and_sharded_checkpoint(tmp_path):
    model = make_qwen3(tmp_path, heads=4, kv_heads=1, tie=False, theta=50000.0, shard_size="40KB")
    to_transformers4_config(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompts = random_prompts(6, [9, 33])
    with exact_engine(tmp_path) as llm:
        outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, MAX_NEW)


def test_priority_preemption_keeps_tokens_and_serves_the_urgent_first(gqa2):
    """Two priority-1 requests hold both slots (max_num_seqs 2) mid-decode; a priority-0 request arrives, preempts
    the newer of them and finishes first. Every request still gets transformers' greedy tokens (the victim
    recomputes its prefix)."""
    model, path = gqa2
    prompts = random_prompts(6, [40, 41, 20])
    slow = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, priority=1)
    urgent = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, priority=0)
    tokens: dict[str, list[int]] = {"a": [], "b": [], "u": []}
    finished: list[str] = []
    with exact_engine(path, max_num_seqs=2) as llm:
        llm.add_request("a", prompts[0], slow)
        llm.add_request("b", prompts[1], slow)
        for _ in range(5):  # both prefilled and decoding
            for out in llm.step():
                tokens[out.request_id] += out.new_token_ids
        llm.add_request("u", prompts[2], urgent)
        while llm.has_unfinished_requests():
            for out in llm.step():
                tokens[out.request_id] += out.new_token_ids
                if out.finish_reason:
                    finished.append(out.request_id)
        assert llm.stats()["num_preemptions"] == 1
    assert finished[0] == "u"
    for rid, prompt, n in (("a", prompts[0], 24), ("b", prompts[1], 24), ("u", prompts[2], 6)):
        assert tokens[rid] == hf_greedy(model, prompt, n)


def test_distinct_q_and_k_norm_weights_give_transformers_tokens(tmp_path):
    """transformers initialises q_norm and k_norm to ones, so in every other test model the two are equal and
    normalising k with q_norm's weight went unseen; a real Qwen3's differ. Drawn at random here, in float64."""
    ref = make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.2, 3.0)
    ref.save_pretrained(tmp_path)
    prompts = random_prompts(3, [5, 17, 40])
    with exact_engine(tmp_path) as llm:
        got = [o["token_ids"] for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))]
    assert got == [hf_greedy(ref, p, 8) for p in prompts]
