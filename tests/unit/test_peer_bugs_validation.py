"""Request-validation failure modes other inference servers shipped, checked at this project's doors: the engine's
Python API (SamplingParams, LLM.generate), the engine service's request conversion, and the tokenizer service's
prepare(). References: transformers in float64, or the rule itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine_service.penalties import Penalties
from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import Sequence, Status
from engine_service.validation import sampling_params_from_proto
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.integration.tiny import exact_engine, hf_greedy, make_qwen3, random_prompts
from tokenizer_service.validation import TextLimits, prepare

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peer-validation")
    return make_qwen3(path), path


@pytest.mark.parametrize("value", [1e39, 10**40, 10**400, math.inf], ids=["1e39", "10**40", "10**400", "inf"])
def test_a_repetition_penalty_float32_cannot_hold_is_refused_naming_the_field(value):
    """A repetition penalty checked only for being finite in Python: 1e39 was inf in the sampler's float32, and a
    seen token's zero logit times inf was NaN, drawn as a token (the last of the vocabulary, reported finite); an
    integer past a float's range failed the whole step, every request in it."""
    with pytest.raises(ValueError, match=r"^repetition_penalty must be a number above 0 and at most 3\.4"):
        SamplingParams(repetition_penalty=value)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_largest_repetition_penalty_allowed_samples_as_transformers_does(temperature):
    logits = torch.tensor([0.0, 1.0, -0.5, 2.0, -1.0])
    seen = [0, 3]
    ref = RepetitionPenaltyLogitsProcessor(FLOAT32_MAX)(torch.tensor([seen]), logits.double()[None].clone())[0]
    want = torch.softmax(ref, dim=-1)
    params = SamplingParams(temperature=temperature, repetition_penalty=FLOAT32_MAX, max_tokens=8, seed=0)
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False, penalties=Penalties(1, 5, torch.device("cpu")))
    seq = Sequence("a", seen, params, 64)
    seq.status = Status.RUNNING
    slot = sampler.penalties.slot(seq)
    n = 1 if temperature == 0.0 else 3000
    draws = []
    for _ in range(n):  # one row a call: the slot's counts are this one sequence's
        tokens, finite = sampler(logits[None].clone(), [SamplingRow(params, None, penalty_slot=slot)])
        assert finite == [True]
        draws += tokens
        sampler.penalties.output_counts.zero_()
        sampler.penalties.seen[slot].zero_()
        sampler.penalties.seen[slot, seen] = True
    if temperature == 0.0:
        assert draws == [int(ref.argmax())]
    else:
        freq = torch.bincount(torch.tensor(draws), minlength=5).double() / n
        assert (freq - want).abs().max() < 0.03, (freq, want)


def test_numpy_integers_in_stop_token_ids_and_logit_bias_are_the_numbers_they_stand_for(model_and_dir):
    """Ids read from numpy (a tokenizer's or a dataset's arrays) were refused in stop_token_ids and logit_bias
    ("must be non-negative integers, got np.int64(5)") while a prompt of them and an array of stop ids were taken."""
    _, path = model_and_dir
    plain = SamplingParams(stop_token_ids=[7, 5], logit_bias={3: 1.5, 9: -2.0})
    numpy = SamplingParams(stop_token_ids=[np.int64(7), np.int32(5), np.int64(7)],
                           logit_bias={np.int64(3): np.float32(1.5), np.int16(9): np.int8(-2)})
    assert numpy == plain
    assert all(type(t) is int for t in numpy.stop_token_ids)
    assert all(type(t) is int for t, _ in numpy.logit_bias) and type(numpy.logit_bias[0][1]) is float
    for kwargs, field in ((dict(stop_token_ids=[np.float64(5.0)]), "stop_token_ids"),
                          (dict(stop_token_ids=[np.bool_(True)]), "stop_token_ids"),
                          (dict(logit_bias={np.float64(3.0): 1.0}), "logit_bias"),
                          (dict(logit_bias={3: np.float64("nan")}), "logit_bias")):
        with pytest.raises(ValueError, match=f"^{field}"):
            SamplingParams(**kwargs)
    # Through the engine: a greedy run stopped at its third token by that token's id, as numpy gives it.
    prompt = random_prompts(3, [9])[0]
    with exact_engine(path, num_kvcache_blocks=16, max_model_len=64) as llm:
        free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]["token_ids"]
        stop = free[2]
        stopped = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6,
                                                        stop_token_ids=[np.int64(stop)]))
    assert stopped[0]["token_ids"] == free[: free.index(stop) + 1] and stopped[0]["finish_reason"] == "stop"


FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_sampling_numbers_are_refused_at_the_engine_door_naming_the_field(name, value):
    """NaN passing range checks written as `value < low or value > high` (every comparison with NaN is false), and
    infinities passing one-sided ones: the request sampled from an undefined distribution, or crashed the sampler."""
    with pytest.raises(ValueError, match=f"^{name} must be"):
        sampling_params_from_proto(engine_pb.SamplingParams(**{name: value}), {})
    with pytest.raises(ValueError, match="^logit_bias values must be numbers in"):
        sampling_params_from_proto(engine_pb.SamplingParams(logit_bias={5: value}), {})


def test_prompt_token_ids_refusals_name_the_requests_own_field():
    """Refusals of a tokenized prompt named the Detokenize call's field ("token_ids[1] is -1") or said the ids
    must "encode to at least one token"."""
    limits = TextLimits(vocab_size=100)

    def refusal(ids: list[int]) -> str:
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids))
        with pytest.raises(ValueError) as err:
            prepare(request, None, {}, max_model_len=64, limits=limits)
        return str(err.value)

    assert refusal([]) == "prompt_token_ids: must hold at least one token id (got none)"
    for ids, index, value in (([5, -1], 1, -1), ([5, 6, 100], 2, 100)):
        message = refusal(ids)
        assert message.startswith("prompt_token_ids: must be integers in [0, vocabulary size)"), message
        assert f"(prompt_token_ids[{index}] is {value}" in message, message
    assert "max_model_len is 64" in refusal([1] * 64)
    ok = prepare(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] * 63)), None, {}, max_model_len=64,
                 limits=limits)
    assert ok.num_prompt_tokens == 63


def test_a_prompt_one_short_of_max_model_len_generates_one_token_with_max_tokens_unset(model_and_dir):
    """A prompt exactly max_model_len long admitted (no room for a token: peers crashed or wrote past the cache), or
    one a token shorter refused because the default max_tokens did not fit: here the first is refused naming
    max_model_len and the second gets transformers' one greedy token, finished by length."""
    model, path = model_and_dir
    prompt = random_prompts(5, [32])[0]
    with exact_engine(path, num_kvcache_blocks=16, max_model_len=33) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0))[0]
        with pytest.raises(ValueError, match="max_model_len is 33"):
            llm.generate([prompt + [1]], SamplingParams(temperature=0.0))
        assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]
    assert out["token_ids"] == hf_greedy(model, prompt, 1) and out["finish_reason"] == "length"


def test_a_text_prompt_with_a_lone_surrogate_is_refused_naming_the_character(demo_model_dir):
    """The tokenizer's own error for it is a TypeError about its input types, which names neither the prompt nor
    the character (the gRPC door never sees one: protobuf refuses the string)."""
    from engine_service import LLM

    with LLM(str(demo_model_dir), device="cpu", dtype="float32", enforce_eager=True, max_model_len=64,
             num_kvcache_blocks=16) as llm:
        with pytest.raises(ValueError, match=r"character 3 \('\\ud800'\) is a lone surrogate"):
            llm.generate(["hi \ud800 there"], SamplingParams(max_tokens=1))
        assert llm.generate(["hi there"], SamplingParams(max_tokens=1, temperature=0.0))[0]["token_ids"]
