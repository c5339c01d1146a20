"""logit_bias equals transformers' sequence_bias for single tokens, on the same weights, in float64 on CPU.

transformers applies the bias before the repetition penalty, and so does the engine. Batching, chunked prefill,
preemption and overlap scheduling must not change the tokens; logprobs stay those of the raw distribution.
"""

from __future__ import annotations

import pytest
import torch

from engine_service import SamplingParams
from engine_service.sampling_params import MAX_LOGIT_BIAS_TOKENS
from tests.integration.tiny import exact_engine, generate_in, make_qwen3, random_prompts

MAX_NEW = 16


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("logit_bias")
    return make_qwen3(path, heads=4, kv_heads=2, head_dim=16, hidden=64), path


def hf_biased(model, prompt: list[int], p: SamplingParams) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                             min_new_tokens=p.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=None,
                             repetition_penalty=p.repetition_penalty,
                             sequence_bias={(t,): float(b) for t, b in p.logit_bias} or None)
    return out[0, len(prompt) :].tolist()


def _params(model, prompts) -> list[SamplingParams]:
    """Biases that change greedy's tokens: greedy's own first token banned, or pushed down beside others pushed up."""
    firsts = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            firsts.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item())
    return [
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logit_bias={firsts[0]: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW),  # no bias, beside biased rows
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logit_bias={firsts[2]: -3.5, 7: 2.25, 100: 1.5}),
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logit_bias={firsts[3]: -2.0, 11: 0.75},
                       repetition_penalty=1.4),
    ]


SETTINGS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 16, "max_num_seqs": 4},
    "overlap-scheduling": {"overlap_scheduling": True},
    "preemption": {"num_kvcache_blocks": 7, "max_num_seqs": 4},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_biased_greedy_tokens_equal_transformers(model_and_dir, setting):
    model, path = model_and_dir
    prompts = random_prompts(11, [6, 40, 17, 30])
    params = _params(model, prompts)
    outs = generate_in(path, setting, SETTINGS[setting], prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out["token_ids"] == hf_biased(model, prompt, p), p
    assert outs[0]["token_ids"][0] != hf_biased(model, prompts[0], params[1])[0]  # the bias bit


def test_a_large_bias_decides_sampled_tokens_and_leaves_logprobs_raw(model_and_dir):
    """+100 makes one token all but certain at any temperature; the logprobs reported are still the model's own
    (log_softmax of the raw logits), so the forced token's logprob is its unbiased one."""
    model, path = model_and_dir
    [prompt] = random_prompts(12, [9])
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=8, logprobs=1, logit_bias={42: 100.0})
    with exact_engine(path) as llm:
        [out] = llm.generate([prompt], p)
    assert out["token_ids"] == [42] * 8
    ids = torch.tensor([prompt + out["token_ids"][:-1]])
    with torch.no_grad():
        raw = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], -1)
    for pos, lp in enumerate(out["logprobs"]):
        assert abs(lp.logprob - raw[len(prompt) - 1 + pos, 42].item()) <= 1e-9
        assert lp.top_token_ids == [raw[len(prompt) - 1 + pos].argmax().item()]


def test_logit_bias_outside_the_vocabulary_is_refused_alone(model_and_dir):
    _, path = model_and_dir
    with exact_engine(path) as llm:
        vocab = llm.model_cfg.vocab_size
        with pytest.raises(ValueError, match=f"^logit_bias holds token {vocab}, outside the vocabulary"):
            llm.add_request("far", [1, 2], SamplingParams(max_tokens=2, logit_bias={3: 1.0, vocab: 1.0}))
        [out] = llm.generate([[1, 2]], SamplingParams(temperature=0.0, max_tokens=2, logit_bias={vocab - 1: 100.0}))
    assert out["token_ids"] == [vocab - 1] * 2


@pytest.mark.parametrize(("value", "says"), [
    ({-1: 1.0}, "keys must be non-negative token ids"), ({1.5: 1.0}, "keys must be non-negative token ids"),
    ({True: 1.0}, "keys must be non-negative token ids"), ({1: 100.5}, r"values must be numbers in \[-100, 100\]"),
    ({1: float("nan")}, "values must be numbers"), ({1: "3"}, "values must be numbers"),
    ([(1, 2.0), (1, 3.0)], "holds token 1 twice"), ("1:2", "must map token ids to biases"),
    ([1, 2], "must map token ids to biases"),
    ({i: 1.0 for i in range(MAX_LOGIT_BIAS_TOKENS + 1)}, f"must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens"),
])
def test_bad_logit_bias_is_refused_naming_the_field(value, says):
    with pytest.raises(ValueError, match=f"^logit_bias {says}"):
        SamplingParams(logit_bias=value)
