"""Repetition, presence and frequency penalties equal transformers' on the same weights, in float64 on CPU.

repetition_penalty is transformers' own `generate(repetition_penalty=...)`. Presence and frequency penalties (OpenAI's
rule, which transformers does not have) are checked against a logits processor written here from the rule.
Batching, chunked prefill, prefix caching, preemption and overlap scheduling must not change the tokens.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from engine_service import SamplingParams
from tests.integration.tiny import exact_engine, make_qwen3, random_prompts

MAX_NEW = 24


class OpenAIPenalties(LogitsProcessor):
    """logit -= presence * [token generated] + frequency * (times generated), over the generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for token, n in Counter(input_ids[0, self.prompt_len :].tolist()).items():
            scores[0, token] -= self.presence + self.frequency * n
        return scores


def hf_penalised(model, prompt: list[int], p: SamplingParams) -> list[int]:
    ids = torch.tensor([prompt])
    processors = LogitsProcessorList()
    if p.presence_penalty or p.frequency_penalty:
        processors.append(OpenAIPenalties(len(prompt), p.presence_penalty, p.frequency_penalty))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                             min_new_tokens=p.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=None,
                             repetition_penalty=p.repetition_penalty, logits_processor=processors)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("penalties")
    return make_qwen3(path, heads=4, kv_heads=2, head_dim=16, hidden=64), path




PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.4),
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW),  # no penalty, beside penalised rows
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=0.7),  # below 1 favours repeats
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, presence_penalty=1.5),
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, frequency_penalty=0.6),
    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.2, presence_penalty=-0.5,
                   frequency_penalty=0.8),
]
SETTINGS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 16, "max_num_seqs": 4},
    "overlap-scheduling": {"overlap_scheduling": True},
    "preemption": {"num_kvcache_blocks": 9, "max_num_seqs": 4},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_penalised_greedy_tokens_equal_transformers(model_and_dir, setting):
    model, path = model_and_dir
    prompts = random_prompts(5, [6, 40, 17, 3, 60, 25])
    with exact_engine(path, **SETTINGS[setting]) as llm:
        outs = llm.generate(prompts, PARAMS)
        if setting == "preemption":
            assert llm.stats()["num_preemptions"] > 0, "the case did not preempt"
        assert llm.runner.sampler.penalties._owners == {}  # every slot returned
    for prompt, p, out in zip(prompts, PARAMS, outs, strict=True):
        assert out["token_ids"] == hf_penalised(model, prompt, p), p


class BanUntil(LogitsProcessor):
    """min_tokens as the engine applies it: the stop ids are banned until that many tokens were generated."""

    def __init__(self, prompt_len: int, ids: list[int], min_tokens: int):
        self.prompt_len, self.ids, self.min_tokens = prompt_len, ids, min_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_len < self.min_tokens:
            scores = scores.clone()
            scores[:, self.ids] = float("-inf")
        return scores


def test_penalties_beside_min_tokens_bans(model_and_dir):
    """The banned-token positions overwrote the penalised rows' slot positions: a penalised request in a step
    with any request still under its min_tokens had its tokens counted in a slot named by a banned token id
    (an index error when that id was past the slots, which on CUDA would have poisoned the device), or not at
    all."""
    model, path = model_and_dir
    prompts = random_prompts(9, [7, 20, 13])
    stop = [300, 301]  # token ids past the 8 slots
    params = [SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.4, frequency_penalty=0.3),
              SamplingParams(temperature=0.0, max_tokens=16, min_tokens=10, stop_token_ids=stop),
              SamplingParams(temperature=0.0, max_tokens=16, min_tokens=6, stop_token_ids=stop,
                             repetition_penalty=1.3)]
    with exact_engine(path, overlap_scheduling=True) as llm:
        outs = llm.generate(prompts, params)
    assert outs[0]["token_ids"] == hf_penalised(model, prompts[0], params[0])
    for prompt, p, out in list(zip(prompts, params, outs, strict=True))[1:]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(out["token_ids"]),
                                 min_new_tokens=len(out["token_ids"]), do_sample=False, eos_token_id=None,
                                 pad_token_id=None, repetition_penalty=p.repetition_penalty,
                                 logits_processor=LogitsProcessorList([BanUntil(len(prompt), stop, p.min_tokens)]))
        assert out["token_ids"] == ref[0, len(prompt) :].tolist()


def test_penalties_change_the_tokens(model_and_dir):
    """The checks above compare with transformers; this one makes sure the penalties bite on this model."""
    _, path = model_and_dir
    [prompt] = random_prompts(6, [8])
    with exact_engine(path) as llm:
        plain, penalised = llm.generate([prompt, prompt], [PARAMS[1], PARAMS[0]])
    assert plain["token_ids"] != penalised["token_ids"]
    assert len(set(penalised["token_ids"])) > len(set(plain["token_ids"]))


def test_a_prefix_cache_hit_keeps_the_prompt_penalised(model_and_dir):
    model, path = model_and_dir
    [prompt] = random_prompts(7, [50])
    p = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.5)
    with exact_engine(path) as llm:
        llm.generate([prompt], p)
        again = llm.generate([prompt], p)[0]
    assert again["num_cached_tokens"] >= 48 and again["token_ids"] == hf_penalised(model, prompt, p)


def test_seeded_penalised_tokens_do_not_depend_on_the_batch(model_and_dir):
    """Counts are per request: a seeded, penalised request draws the same tokens alone or among others."""
    _, path = model_and_dir
    prompts = random_prompts(8, [9, 30, 12, 44])
    p = [SamplingParams(temperature=0.9, seed=i, max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.4)
         for i in range(4)]
    with exact_engine(path, overlap_scheduling=True) as llm:
        together = [o["token_ids"] for o in llm.generate(prompts, p)]
        alone = [llm.generate([prompt], q)[0]["token_ids"] for prompt, q in zip(prompts, p, strict=True)]
    assert together == alone


@pytest.mark.parametrize(("field", "value"), [("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                                              ("repetition_penalty", float("inf")), ("presence_penalty", 2.5),
                                              ("frequency_penalty", -3.0), ("frequency_penalty", float("nan"))])
def test_out_of_range_penalties_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
