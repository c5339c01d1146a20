"""Sampling failure modes other inference servers shipped, checked against this engine's sampler, sampling kernel
and JSON Schema compiler (references: transformers' logits processors in float64, or the schema's own rules)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine_service import json_grammar as jg
from engine_service.json_schema import SchemaError, compile_schema
from engine_service.penalties import Penalties
from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import Sequence, Status


def _reference(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, seen: list[int] | None = None) -> torch.Tensor:
    """transformers' probabilities for one row of logits, in float64, in generate()'s order."""
    x = logits.double()[None].clone()
    if repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(repetition_penalty)(torch.tensor([seen]), x)
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p > 0.0:
        x = MinPLogitsWarper(min_p)(None, x)
    return torch.softmax(x, dim=-1)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k", [(0.5, -1), (1e-5, -1), (0.5, 3)])
def test_a_huge_finite_logit_over_a_low_temperature_is_drawn_not_the_last_token(dtype, temperature, top_k):
    """Very small temperatures overflowing the tempered logits to inf: the probabilities became NaN and every draw
    took the vocabulary's last token, with the row reported finite."""
    logits = torch.tensor([3e38, 1.0, 0.0, -1.0, 2.0])
    want = _reference(logits, temperature, top_k=top_k)
    assert want[0] > 0.999999  # the huge logit is all but certain
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    rows = [SamplingRow(SamplingParams(temperature=temperature, top_k=top_k), None)] * 32
    tokens, finite = sampler(logits.to(dtype).repeat(32, 1), rows)
    assert all(finite) and tokens == [0] * 32


def test_a_repetition_penalty_near_zero_makes_the_seen_token_certain_as_transformers_does():
    """A penalised logit past float32's range is clamped (penalties.py); the temperature then overflowed it to inf
    and the draw fell on the last token instead of the seen one."""
    logits = torch.tensor([10.0, 1.0, 0.0, -1.0, 2.0])
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-38, max_tokens=8)
    want = _reference(logits, 0.5, repetition_penalty=1e-38, seen=[0])
    assert int(want.argmax()) == 0 and want[0] > 0.999999
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False,
                      penalties=Penalties(1, 5, torch.device("cpu")))
    seq = Sequence("a", [0], params, 64)
    seq.status = Status.RUNNING
    slot = sampler.penalties.slot(seq)
    for _ in range(4):
        tokens, finite = sampler(logits[None].clone(), [SamplingRow(params, None, penalty_slot=slot)])
        assert finite == [True] and tokens == [0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on -inf products
def test_the_sampling_kernel_draws_a_huge_finite_logit_over_a_low_temperature():
    """The kernels' tempered maximum overflowed the same way (inf - inf: NaN sums) and drew an arbitrary token."""
    from engine_service import sampling_kernels as sk
    from engine_service.attention import triton_interpreted

    device = "cpu" if triton_interpreted() else "cuda"
    logits = torch.full((3, 40), -5.0)
    logits[0, 0] = logits[1, 17] = logits[2, 39] = 3e38  # in the first, a middle and the last chunk of 8
    inv_temperature = torch.tensor([2.0, 1e5, 1.0])
    u = torch.tensor([0.3, 0.99, 0.0])
    both = sk.sample_rows(logits.to(device), inv_temperature.to(device), u.to(device), check_finite=True, block=8)
    assert both.tolist() == [[0, 17, 39], [1, 1, 1]]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 6, 0.8, 0.05), (1.5, 20, 0.9, 0.2),
                                                           (2.0, 3, 1.0, 0.3), (0.5, 8, 0.99, 0.1)])
def test_combined_filters_under_a_temperature_follow_transformers_warpers(temperature, top_k, top_p, min_p):
    """Filters applied in another order than transformers' (min-p before top-p, top-p before temperature) keep
    another set of tokens; each combination's frequencies must match transformers' float64 probabilities."""
    g = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    logits = torch.randn(12, generator=g, dtype=torch.float64) * 2
    want = _reference(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 8000
    sampler = Sampler(torch.device("cpu"), seed=1, triton_sampling=False)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens, finite = sampler(logits.float()[None].repeat(n, 1), [SamplingRow(params, None)] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=12).double() / n
    assert all(finite)
    assert set(freq.nonzero().flatten().tolist()) == set(want.nonzero().flatten().tolist())
    assert (freq - want).abs().max() < 0.025


ENDLESS = {
    "required self-reference": ({"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}},
                                 "required": ["next"],
                                 "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}},
                                                    "required": ["next"]}}}, "#"),
    "minItems over itself": ({"type": "object", "properties": {"tree": {"$ref": "#/$defs/t"}},
                              "$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}, "minItems": 1}}},
                             "#/properties/tree"),
    "two definitions requiring each other": (
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}, "n": {"type": "integer"}}, "required": ["n"],
         "$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                   "b": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 2}}}, "#/properties/a"),
}


@pytest.mark.parametrize("name", list(ENDLESS))
def test_a_schema_no_finite_document_meets_is_refused_naming_the_place(name):
    """A grammar that never terminates: a required property (or minItems) that recurses without end was compiled,
    and the request wrote 64 nested objects before failing with no token to write."""
    schema, where = ENDLESS[name]
    with pytest.raises(SchemaError, match=f"^json_schema at {where}: no finite value meets it"):
        compile_schema(json.dumps(schema))


FINITE = [
    ({"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
      "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}}, b'{"next":{"next":{}}}'),
    ({"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"],
      "$defs": {"n": {"anyOf": [{"type": "null"},
                                {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                 "required": ["next"]}]}}}, b'{"next":{"next":null}}'),
    ({"type": "object", "properties": {"tree": {"$ref": "#/$defs/t"}}, "required": ["tree"],
      "$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}}, b'{"tree":[[],[[]]]}'),
]


@pytest.mark.parametrize("schema,document", FINITE)
def test_recursive_schemas_with_a_way_out_still_compile_and_close(schema, document):
    state = jg.walk(jg.initial(compile_schema(json.dumps(schema))), document)
    assert state is not None and jg.is_done(state)


def test_seeded_penalised_filtered_tokens_are_the_same_through_preemption(tmp_path):
    """Seeded requests losing their reproducibility when preempted and recomputed (a draw spent twice, or penalty
    counts rebuilt wrong): a pool too small for the batch must give the tokens a roomy one gives."""
    from engine_service import LLM
    from tests.integration.tiny import VOCAB, make_qwen3

    make_qwen3(tmp_path / "m")
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (30, 40, 50, 20)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, ignore_eos=True, top_p=0.9,
                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2) for i in range(4)]
    outs, preempted = [], []
    for blocks in (200, 12):
        with LLM(tmp_path / "m", device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=16,
                 num_kvcache_blocks=blocks, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=192) as llm:
            outs.append([o["token_ids"] for o in llm.generate(prompts, params)])
            preempted.append(llm.stats()["num_preemptions"])
    assert preempted[0] == 0 and preempted[1] > 0
    assert outs[1] == outs[0]
