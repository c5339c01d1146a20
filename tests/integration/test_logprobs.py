"""Logprobs equal transformers' log_softmax of its logits on the same weights, in float64 on CPU.

The reference is teacher-forced: transformers runs once over the prompt and the tokens the engine generated, so
sampled requests are checked as exactly as greedy ones. Logprobs are of the raw distribution, so temperature,
filters and the min_tokens ban must not change them; batching, chunked prefill, prefix caching, preemption and
overlap scheduling must not either.
"""

from __future__ import annotations

import pytest
import torch

from engine_service import SamplingParams
from engine_service.sampling_params import MAX_LOGPROBS
from tests.integration.tiny import exact_engine, generate_in, hf_greedy, make_qwen3, random_prompts

TOL = 1e-9  # float64 against float64, different kernels and summation orders


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("logprobs")
    return make_qwen3(path, heads=6, kv_heads=2, head_dim=8, hidden=48), path



def _reference(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: transformers' log_softmax for each generated position, teacher-forced."""
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)


def _check(model, prompt: list[int], out: dict, k: int) -> None:
    ref = _reference(model, prompt, out["token_ids"])
    assert len(out["logprobs"]) == len(out["token_ids"]) == ref.shape[0] > 0
    for pos, (token, lp) in enumerate(zip(out["token_ids"], out["logprobs"], strict=True)):
        assert abs(lp.logprob - ref[pos, token].item()) <= TOL, f"token {pos}"
        values, ids = ref[pos].topk(k)
        assert lp.top_token_ids == ids.tolist(), f"top tokens at {pos}"
        assert max((abs(a - b) for a, b in zip(lp.top_logprobs, values.tolist(), strict=True)), default=0) <= TOL



# Each case mixes: greedy with 5 alternatives; sampled with filters and only the token's own logprob; a row
# without logprobs; the most alternatives allowed; and a row whose min_tokens bans the token greedy would pick.
SETTINGS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 16, "max_num_seqs": 4},
    "overlap-scheduling": {"overlap_scheduling": True},
    "preemption": {"num_kvcache_blocks": 12, "max_num_seqs": 5},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_logprobs_equal_transformers(model_and_dir, setting):
    model, path = model_and_dir
    prompts = random_prompts(3, [5, 40, 17, 70, 9])
    ban = _reference(model, prompts[4], [0])[0].argmax().item()  # greedy's first token for the last prompt
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=5),
        SamplingParams(temperature=1.3, top_k=3, top_p=0.8, seed=7, max_tokens=12, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.7, seed=1, max_tokens=12, logprobs=MAX_LOGPROBS),
        SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, stop_token_ids=[ban], logprobs=2),
    ]
    outs = generate_in(path, setting, SETTINGS[setting], prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        if p.logprobs is None:
            assert out["logprobs"] is None
        else:
            _check(model, prompt, out, p.logprobs)
    # The banned token stays the most likely under the raw distribution, with its own logprob reported.
    assert outs[4]["token_ids"][0] != ban and outs[4]["logprobs"][0].top_token_ids[0] == ban


def test_logprobs_of_a_prefix_cache_hit_equal_those_computed(model_and_dir):
    model, path = model_and_dir
    [prompt] = random_prompts(4, [50])  # three full blocks of 16 come from the cache the second time
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=4)
    with exact_engine(path) as llm:
        first = llm.generate([prompt], greedy)[0]
        second = llm.generate([prompt], greedy)[0]
    assert second["num_cached_tokens"] >= 48
    _check(model, prompt, second, 4)
    assert [lp.logprob for lp in second["logprobs"]] == pytest.approx([lp.logprob for lp in first["logprobs"]],
                                                                      abs=TOL)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True, "3"])
def test_logprobs_out_of_range_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_logprobs_beyond_the_vocabulary_are_refused_alone(tmp_path):
    """More logprobs than the vocabulary holds failed the top-k inside the step: every request of the batch
    failed, and a tensor-parallel engine could not continue."""
    make_qwen3(tmp_path, vocab=16)
    with exact_engine(tmp_path) as llm:
        with pytest.raises(ValueError, match="more tokens than the vocabulary holds"):
            llm.add_request("big", [1, 2], SamplingParams(max_tokens=2, logprobs=17))
        with pytest.raises(ValueError, match="^prompt_logprobs is 17, more tokens than the vocabulary holds"):
            llm.add_request("big", [1, 2], SamplingParams(max_tokens=2, prompt_logprobs=17))
        [out] = llm.generate([[1, 2]], SamplingParams(temperature=0.0, max_tokens=2, logprobs=16))
    assert [len(lp.top_token_ids) for lp in out["logprobs"]] == [16, 16]


# ---- prompt logprobs ---------------------------------------------------------------------------------------------
def _check_prompt(model, prompt: list[int], out: dict, k: int) -> None:
    """Prompt token i's logprob (i >= 1) is transformers' log_softmax at position i - 1, with its k most likely."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], dim=-1)
    assert len(out["prompt_logprobs"]) == len(prompt) - 1
    for pos, lp in enumerate(out["prompt_logprobs"]):
        assert abs(lp.logprob - ref[pos, prompt[pos + 1]].item()) <= TOL, f"prompt token {pos + 1}"
        values, top = ref[pos].topk(k)
        assert lp.top_token_ids == top.tolist(), f"top tokens after prompt token {pos}"
        assert max((abs(a - b) for a, b in zip(lp.top_logprobs, values.tolist(), strict=True)), default=0) <= TOL


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_prompt_logprobs_equal_transformers(model_and_dir, setting):
    """Every prompt token after the first, through chunks, batching and preemption; beside generated logprobs, and
    beside requests that asked for none. A one-token prompt has none to give."""
    model, path = model_and_dir
    prompts = random_prompts(5, [37, 1, 70, 16, 50])
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=2),
        SamplingParams(temperature=0.9, seed=3, max_tokens=24, prompt_logprobs=MAX_LOGPROBS, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=24),
    ]
    outs = generate_in(path, setting, SETTINGS[setting], prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        if p.prompt_logprobs is None:
            assert out["prompt_logprobs"] is None
        else:
            _check_prompt(model, prompt, out, p.prompt_logprobs)
    _check(model, prompts[2], outs[2], 2)


def test_prompt_logprobs_survive_preemption_in_the_middle_of_the_prompt(model_and_dir):
    """A request preempted between two of its prompt's chunks recomputes the prompt and reports each prompt token
    once: the logprobs it had are kept and the recomputed positions are not added again."""
    model, path = model_and_dir
    old, new = random_prompts(6, [150, 100])
    with exact_engine(path, num_kvcache_blocks=12, max_num_batched_tokens=16, max_num_seqs=2) as llm:
        held = []  # prompt logprobs each preempted request held when preempted
        preempt = llm.scheduler._preempt

        def spy(seq):
            held.append(len(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None)
            preempt(seq)

        llm.scheduler._preempt = spy
        outs = llm.generate([old, new], [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                                          SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                         prompt_logprobs=1)])
    assert any(h is not None and 0 < h < len(new) - 1 for h in held), f"no preemption mid-prompt: {held}"
    _check_prompt(model, new, outs[1], 1)
    assert outs[1]["token_ids"] == hf_greedy(model, new, 5)


def test_prompt_logprobs_skip_the_prefix_cache_but_leave_it_usable(model_and_dir):
    """Cached blocks have no logits: a request asking for prompt logprobs computes its whole prompt (it reports no
    cached tokens), and a later request still finds the prompt in the cache."""
    model, path = model_and_dir
    [prompt] = random_prompts(7, [50])
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with exact_engine(path) as llm:
        first = llm.generate([prompt], greedy)[0]
        queries = llm.stats()["prefix_cache_queries"]
        scored = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2))[0]
        # It made no lookup: the hit rate does not count it as a miss (one scoring job made a warm cache look cold).
        assert llm.stats()["prefix_cache_queries"] == queries
        again = llm.generate([prompt], greedy)[0]
    assert scored["num_cached_tokens"] == 0
    _check_prompt(model, prompt, scored, 2)
    assert again["num_cached_tokens"] >= 48
    assert first["token_ids"] == scored["token_ids"] == again["token_ids"]


def test_held_prompt_logprobs_are_compact_copies(model_and_dir):
    """A sequence kept views of its step's whole logprob tensors, at the widest request's K: a prompt_logprobs=0
    request beside a prompt_logprobs=20 one held 21 values a token of the other's rows."""
    _, path = model_and_dir
    wide, narrow = random_prompts(13, [40, 200])
    with exact_engine(path, max_num_batched_tokens=64) as llm:
        llm.add_request("wide", wide, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=MAX_LOGPROBS))
        llm.add_request("narrow", narrow, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))
        seq = llm.seqs["narrow"]
        while seq.num_prompt_logprobs < 60:
            llm.step()
        assert seq.prompt_logprobs is not None  # still in its prompt
        held = seq.prompt_logprobs
        assert sum(c.values.shape[0] for c in held) == seq.num_prompt_logprobs
        assert all(c.values.shape[1] == 1 and c.top_ids.shape[1] == 0 for c in held)
        assert all(c.values.untyped_storage().nbytes() == c.values.nbytes for c in held)  # not views of more


def test_tied_tokens_are_listed_by_id_as_the_greedy_draw_breaks_ties(tmp_path):
    """Greedy takes the lowest id among tied maxima (docs/ENGINE.md); torch.topk listed ties in its own order, so a
    greedy token's tied twin came first in its own top list, and at the k-th place a higher tied id could be kept
    over a lower one. Every token here has a twin with the same LM-head row, so every position has ties."""
    from tests.integration.tiny import VOCAB, make_family

    model = make_family(tmp_path, "llama", tie=False)
    half = VOCAB // 2
    with torch.no_grad():
        model.lm_head.weight[half:] = model.lm_head.weight[:half]
    model.save_pretrained(tmp_path)
    prompt = random_prompts(11, [12])[0]
    k = 3  # two tied pairs: the k-th place falls inside the second
    with exact_engine(tmp_path) as llm:
        [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=k, prompt_logprobs=k))
    ids = torch.tensor([prompt + out["token_ids"][:-1]])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], dim=-1)
    # transformers' GEMM puts the twins up to 2e-15 apart; the ideal distribution ties them exactly.
    assert (ref[:, :half] - ref[:, half:]).abs().max() <= TOL
    order = ref[:, :half].repeat(1, 2).sort(dim=-1, descending=True, stable=True).indices  # equal: ascending ids
    listed = out["prompt_logprobs"] + out["logprobs"]
    assert all(lp.top_logprobs[0] == lp.top_logprobs[1] for lp in listed)  # the engine's ties are exact
    assert [lp.top_token_ids for lp in listed] == order[:, :k].tolist()
    for token, lp in zip(out["token_ids"], out["logprobs"], strict=True):
        assert token < half and lp.top_token_ids[:2] == [token, token + half]  # the drawn one first, then its twin
