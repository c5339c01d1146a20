"""The engine's Python API as a newcomer calls it (docs/ENGINE_API.md, docs/ENGINE.md's "Arguments" and "Admission
rules", SamplingParams' docstring): values at and just past their bounds, of the wrong type, and empty. Each test
names what the API did before: a bare AttributeError, OverflowError or allocator error from deep inside, a value
taken silently, or a caller's own mistake failing its requests. One tiny float32 Qwen3 on the CPU, built once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from tests.integration.tiny import make_qwen3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-contract")
    make_qwen3(path, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, dtype=torch.float32)
    return path


def _engine(path, **kw) -> LLM:
    args = dict(device="cpu", dtype="float32", enforce_eager=True, attention_backend="torch", kvcache_block_size=16,
                num_kvcache_blocks=16, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128)
    args.update(kw)
    return LLM(path, **args)


# ---- EngineConfig (LLM's keyword arguments) ----


@pytest.mark.parametrize("device", [None, torch.device("cpu"), "cuda:x", "cuda:", "cuda:-1", "cuda:0 "],
                         ids=["None", "torch.device", "cuda:x", "cuda:", "cuda:-1", "trailing-space"])
def test_a_device_that_is_not_a_device_string_is_refused_naming_the_field(device):
    """device=None and torch.device("cpu") failed with "AttributeError: ... has no attribute 'startswith'"; "cuda:x",
    "cuda:" and "cuda:-1" passed the config's check (anything after "cuda:") and failed at start-up with torch's
    RuntimeError "Invalid device string". The docs' table promises 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    with pytest.raises(ValueError, match=r"^device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        EngineConfig.from_kwargs("m", device=device)
    assert EngineConfig.from_kwargs("m", device="cuda:12").device == "cuda:12"


def test_one_named_gpu_for_several_tensor_parallel_ranks_is_refused():
    """Every rank took the one device named (rank 0 its own, the workers too), where rank i takes cuda:i: NCCL
    refused two ranks on one GPU only at the group's first collective."""
    with pytest.raises(ValueError, match=r"^device='cuda:1' names one GPU, and tensor_parallel_size 2 needs one a "
                                         r"rank: give device 'cuda'.*CUDA_VISIBLE_DEVICES"):
        EngineConfig.from_kwargs("m", device="cuda:1", tensor_parallel_size=2)
    assert EngineConfig.from_kwargs("m", device="cuda", tensor_parallel_size=2).device == "cuda"
    assert EngineConfig.from_kwargs("m", device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("name", ["gpu_memory_utilization", "cpu_kvcache_gib", "json_mask_budget_s"])
def test_a_memory_knob_past_a_floats_range_is_refused_naming_the_field(name):
    """An integer too large for a float (10**400) raised "OverflowError: int too large to convert to float" from
    math.isfinite, naming no field."""
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got an integer past a float's range "
                                         rf"\({(10**400).bit_length()} bits\)"):
        EngineConfig.from_kwargs("m", **{name: 10**400})


def test_numpy_numbers_are_taken_as_the_numbers_they_stand_for():
    """max_num_seqs=np.int64(8) was refused with "max_num_seqs must be a positive integer, got np.int64(8)" (a
    positive integer), and gpu_memory_utilization=np.float32(0.5) with "must be a finite number", while
    SamplingParams takes numpy scalars. A numpy float for an integer knob, or a numpy bool for a flag, is still
    refused."""
    config = EngineConfig.from_kwargs("m", max_num_seqs=np.int64(8), max_num_batched_tokens=np.int32(64),
                                      num_kvcache_blocks=np.int64(16), max_model_len=np.uint16(128),
                                      seed=np.int64(3), gpu_memory_utilization=np.float32(0.5),
                                      cpu_kvcache_gib=np.float64(1.5))
    got = (config.max_num_seqs, config.max_num_batched_tokens, config.num_kvcache_blocks, config.max_model_len,
           config.seed, config.gpu_memory_utilization, config.cpu_kvcache_gib)
    assert got == (8, 64, 16, 128, 3, 0.5, 1.5)
    assert [type(v) for v in got] == [int] * 5 + [float] * 2
    for kwargs, field in ((dict(max_num_seqs=np.float64(8.0)), "max_num_seqs"), (dict(seed=np.int64(-1)), "seed"),
                          (dict(enforce_eager=np.bool_(True)), "enforce_eager"),
                          (dict(kvcache_block_size=np.int64(0)), "kvcache_block_size")):
        with pytest.raises(ValueError, match=f"^{field} must be"):
            EngineConfig.from_kwargs("m", **kwargs)


@pytest.mark.parametrize("blocks", [2**40, 2**70], ids=["2**40", "2**70"])
def test_an_explicit_cpu_pool_larger_than_the_machine_is_refused_naming_the_knob(model_dir, blocks):
    """num_kvcache_blocks=2**40 on the CPU failed with the allocator's "DefaultCPUAllocator: can't allocate memory:
    you tried to allocate 35184372088832 bytes", and 2**70 with torch.zeros' TypeError "Overflow when unpacking long
    long": neither named the knob (a GPU's explicit pool is refused naming the most blocks that fit)."""
    with pytest.raises(ValueError, match=rf"^num_kvcache_blocks={blocks} does not fit in this machine's memory: .* "
                                         r"set num_kvcache_blocks well below \d+, or leave it unset"):
        _engine(model_dir, num_kvcache_blocks=blocks, max_model_len=None)


def test_a_block_larger_than_the_machine_is_refused_naming_the_block_size(model_dir):
    """--kvcache-block-size 100000000 was told to "set num_kvcache_blocks well below 0"."""
    with pytest.raises(ValueError, match=r"^kvcache_block_size=\d+ is too large for this machine: one block of K and "
                                         r"V takes .* GiB; lower kvcache_block_size"):
        _engine(model_dir, num_kvcache_blocks=1, kvcache_block_size=2**40, max_model_len=None)


# ---- SamplingParams ----


def test_stop_token_ids_given_as_a_mapping_are_refused():
    """stop_token_ids={7: "x"} was taken as its keys, (7,): silently, where prompt_token_ids refuses a mapping (and
    logit_bias is the field that takes one)."""
    with pytest.raises(ValueError, match=r"^stop_token_ids must be a list of token ids, not a dict"):
        SamplingParams(stop_token_ids={7: "x"})
    assert SamplingParams(stop_token_ids={7, 9}).stop_token_ids in ((7, 9), (9, 7))  # a set stays a set of ids


# ---- LLM.generate and LLMEngine.step ----


@pytest.mark.parametrize("empty", [np.array([], dtype=np.int64), torch.tensor([], dtype=torch.long)],
                         ids=["numpy", "torch"])
def test_an_empty_one_dimensional_array_is_one_empty_prompt(model_dir, empty):
    """A 1-D array is one prompt (docs/ENGINE_API.md), but an empty one turned into an empty list, which generate()
    read as no prompts at all: it returned [] where an empty prompt is refused."""
    with _engine(model_dir) as llm:
        with pytest.raises(ValueError, match="^prompt_token_ids must not be empty"):
            llm.generate(empty, SamplingParams(max_tokens=1))
        assert llm.generate(np.zeros((0, 3), dtype=np.int64), SamplingParams(max_tokens=1)) == []  # a batch of none


def test_a_non_callable_on_launch_is_a_type_error_that_fails_no_request(model_dir):
    """step(on_launch=5) launched the step and called 5 at the forward: "EngineStepError: 'int' object is not
    callable", and every request of the step failed with finish_reason "error" for the caller's typo."""
    params = SamplingParams(temperature=0.0, max_tokens=2)
    with _engine(model_dir) as llm:
        llm.add_request("a", [1, 2, 3], params)
        with pytest.raises(TypeError, match=r"^on_launch must be a callable taking no arguments, or None; got int"):
            llm.step(on_launch=5)
        outs = []
        while llm.has_unfinished_requests():
            outs += llm.step()
        assert [o.finish_reason for o in outs if o.finished] == ["length"]
        assert sum(len(o.new_token_ids) for o in outs) == 2


@pytest.mark.parametrize("seqs", [2**40, 2**70], ids=["2**40", "2**70"])
def test_a_max_num_seqs_whose_sampler_slots_exceed_the_machine_is_refused_naming_it(model_dir, seqs):
    """max_num_seqs=2**40 (with a token budget to match) failed at start-up with the allocator's bare "can't allocate
    memory: you tried to allocate 2251799813685248 bytes", and 2**70 with torch.zeros' TypeError: the penalty slots
    (max_num_seqs x vocabulary x 5 bytes, allocated at start-up) named no setting."""
    with pytest.raises(ValueError, match=rf"^max_num_seqs={seqs} does not fit in this machine's memory: .* lower "
                                         r"max_num_seqs well below that"):
        _engine(model_dir, max_num_seqs=seqs, max_num_batched_tokens=seqs)


def test_abort_request_checks_its_id_as_add_request_does(model_dir):
    """add_request refuses a non-str id with "TypeError: request_id must be a str", but abort_request(["a"]) failed
    with a bare "unhashable type: 'list'" and abort_request(5) answered False, as if 5 could name a request."""
    with _engine(model_dir) as llm:
        llm.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1))
        for bad in (["a"], 5, None, b"a"):
            with pytest.raises(TypeError, match=rf"^request_id must be a str, got {type(bad).__name__}"):
                llm.abort_request(bad)
        assert llm.abort_request("a") and not llm.abort_request("a")
        assert [o.finish_reason for o in llm.step()] == ["abort"]


def test_the_sampling_params_class_passed_for_an_instance_is_named(model_dir):
    """generate(prompts, SamplingParams) (the class, its call forgotten) said "sampling_params must be a
    SamplingParams or a list of them, one per prompt, got type", and add_request "...got type": the class was
    what they got, and "type" named nothing the caller wrote."""
    with _engine(model_dir) as llm:
        with pytest.raises(TypeError, match=r"got the class SamplingParams itself: pass an instance, "
                                            r"SamplingParams\(\.\.\.\)"):
            llm.generate([[1, 2]], SamplingParams)
        with pytest.raises(ValueError, match=r"got the class SamplingParams itself: pass an instance"):
            llm.add_request("a", [1, 2], SamplingParams)
        with pytest.raises(ValueError, match=r"got the class SamplingParams itself: pass an instance"):
            llm.generate([[1, 2]], [SamplingParams])
        assert not llm.has_unfinished_requests()
