"""The rules that end a request, through the engine on a tiny model: stop ids beside ignore_eos, max_tokens past
max_model_len, the EOS ban under min_tokens, and the min_tokens edge with overlap scheduling."""
from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service import LLM, SamplingParams
from tests.integration.tiny import VOCAB, make_qwen3

KW = dict(device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=24,
          max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny23d")
    make_qwen3(path, dtype=torch.float32)
    return path


def _prompt(seed):
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(12)]


def test_stop_token_ids_stop_with_ignore_eos(model_dir):
    """Through the engine: a stop token id ends a request that ignores EOS, at the first time it is generated."""
    with LLM(model_dir, **KW) as e:
        greedy = e.generate([_prompt(9)], SamplingParams(temperature=0.0, max_tokens=12))[0]["token_ids"]
        stop = greedy[5]
        out = e.generate([_prompt(9)], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop],
                                                      ignore_eos=True))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == greedy[: greedy.index(stop) + 1]


def test_max_tokens_past_max_model_len_is_capped_not_refused(model_dir):
    """A request asking for more tokens than max_model_len leaves is served up to max_model_len, not refused as one
    that could never fit the pool (its worst case is capped at max_model_len)."""
    with LLM(model_dir, **KW) as e:  # 24 blocks of 16; max_model_len 256 needs 16
        out = e.generate([_prompt(1)], SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 256 - 12


def test_eos_is_banned_under_min_tokens(tmp_path):
    """Under min_tokens the EOS id is banned from sampling, not only kept from finishing the request (it came out as
    text); with ignore_eos it is an ordinary token there too, not banned (no test had pinned that)."""
    make_qwen3(tmp_path, dtype=torch.float32)
    with LLM(tmp_path, **KW) as e:
        greedy = e.generate([_prompt(11)], SamplingParams(temperature=0.0, max_tokens=10))[0]["token_ids"]
    eos = greedy[3]
    first = greedy.index(eos)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    with LLM(tmp_path, **KW) as e:
        out = e.generate([_prompt(11)], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=first + 3))[0]
        ignoring = e.generate([_prompt(11)], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10,
                                                            ignore_eos=True))[0]
    assert eos not in out["token_ids"][: first + 3]
    assert ignoring["token_ids"] == greedy and ignoring["finish_reason"] == "length"


def test_min_tokens_boundary_is_the_same_with_overlap(model_dir):
    """A stop token allowed as the token right after min_tokens stops the request with overlap scheduling as without
    (the ban counted the token in flight one too many, and the overlap run went on to max_tokens)."""
    prompt = _prompt(3)
    with LLM(model_dir, **KW) as e:
        greedy = e.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0]["token_ids"]
    k = next(i for i in range(4, 16) if greedy[i] not in greedy[:i])
    p = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[greedy[k]], min_tokens=k)
    for overlap in (False, True):
        with LLM(model_dir, **KW, overlap_scheduling=overlap) as e:
            out = e.generate([prompt], p)[0]
        assert (out["token_ids"], out["finish_reason"]) == (greedy[: k + 1], "stop"), overlap
