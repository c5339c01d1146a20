"""Penalty slots (engine_service/penalties.py): built from a sequence's tokens, advanced by recorded samples, taken
from a preempted holder only when every slot is held, and rebuilt when that holder samples again."""

from __future__ import annotations

import pytest
import torch

from engine_service.penalties import Penalties
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import Sequence, Status

VOCAB = 10


def _seq(rid: str, prompt: list[int], output: list[int], status: Status = Status.RUNNING) -> Sequence:
    seq = Sequence(rid, prompt, SamplingParams(repetition_penalty=1.2, max_tokens=50), 100)
    seq.token_ids += output
    seq.status = status
    return seq


def _state(pen: Penalties, slot: int) -> tuple[list[int], list[bool]]:
    return pen.output_counts[slot].tolist(), pen.seen[slot].tolist()


def _expected(prompt: list[int], output: list[int]) -> tuple[list[int], list[bool]]:
    return [output.count(t) for t in range(VOCAB)], [t in prompt or t in output for t in range(VOCAB)]


def test_a_slot_is_built_from_the_tokens_and_advanced_by_records():
    """A record counts the sampled token and marks it seen: a token first sampled (7, in neither the prompt nor the
    output) must be seen by the repetition penalty from the next step on."""
    pen = Penalties(2, VOCAB, torch.device("cpu"))
    a = _seq("a", [1, 2, 2], [3, 3, 5])
    slot = pen.slot(a)
    assert pen.slot(a) == slot and _state(pen, slot) == _expected([1, 2, 2], [3, 3, 5])
    pen.record(torch.tensor([slot]), torch.tensor([5]))
    assert _state(pen, slot) == _expected([1, 2, 2], [3, 3, 5, 5])
    pen.record(torch.tensor([slot]), torch.tensor([7]))
    assert _state(pen, slot) == _expected([1, 2, 2], [3, 3, 5, 5, 7])


def test_a_released_slot_is_rebuilt_clean_for_its_next_holder():
    pen = Penalties(1, VOCAB, torch.device("cpu"))
    slot = pen.slot(_seq("a", [1], [4, 4]))
    pen.release("a")
    assert pen.slot(_seq("b", [7], [])) == slot and _state(pen, slot) == _expected([7], [])


def test_a_preempted_holder_gives_its_slot_up_only_when_all_are_held_and_rebuilds_it():
    pen = Penalties(2, VOCAB, torch.device("cpu"))
    a, b = _seq("a", [1], [2, 2]), _seq("b", [3], [4])
    slot_a, slot_b = pen.slot(a), pen.slot(b)
    pen.record(torch.tensor([slot_a]), torch.tensor([6]))  # a's device counts run ahead of ...
    a.token_ids.append(6)  # ... its tokens, as after any step
    a.status = Status.WAITING  # preempted: it keeps its slot while no one needs it
    c = _seq("c", [5], [])
    assert pen.slot(c) == slot_a and _state(pen, slot_a) == _expected([5], [])
    pen.release("b")
    a.status = Status.RUNNING  # readmitted: rebuilt from its tokens into the free slot
    assert pen.slot(a) == slot_b and _state(pen, slot_b) == _expected([1], [2, 2, 6])


def test_every_slot_held_by_running_sequences_is_an_error_not_a_corruption():
    pen = Penalties(1, VOCAB, torch.device("cpu"))
    pen.slot(_seq("a", [1], []))
    with pytest.raises(RuntimeError, match="max_num_seqs"):
        pen.slot(_seq("b", [2], []))


def test_apply_penalises_seen_tokens_only_by_the_rules():
    pen = Penalties(1, VOCAB, torch.device("cpu"))
    slot = pen.slot(_seq("a", [1], [2, 2, 3]))
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 5.0, 0.5, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    params = torch.tensor([[2.0, 0.5, 0.25]], dtype=torch.float64)  # repetition, presence, frequency
    pen.apply(logits, torch.tensor([0]), torch.tensor([slot]), params)
    want = [1.0, 2.0 / 2, -2.0 * 2 - 0.5 - 0.25 * 2, 4.0 / 2 - 0.5 - 0.25, 5.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert logits[0].tolist() == want


def test_penalties_are_computed_wide_and_saturate_half_precision():
    """In the logits' dtype, an fp16 logit divided by a tiny repetition_penalty became inf (sampled as the last
    vocabulary id, with finish 'length'), and bf16 turned a penalty of 1.05 into 1.0547."""
    pen = Penalties(1, VOCAB, torch.device("cpu"))
    slot = pen.slot(_seq("a", [1, 2], []))
    rows, slots = torch.tensor([0]), torch.tensor([slot])
    half = torch.tensor([[0.0, 8.0, -8.0] + [1.0] * (VOCAB - 3)], dtype=torch.float16)
    pen.apply(half, rows, slots, torch.tensor([[1e-6, 0.0, 0.0]]))
    assert torch.isfinite(half).all() and half[0, 1] == torch.finfo(torch.float16).max and half[0, 2] == -8.0 * 1e-6
    bf16 = torch.tensor([[0.0, 10.0, -10.0] + [1.0] * (VOCAB - 3)], dtype=torch.bfloat16)
    pen.apply(bf16, rows, slots, torch.tensor([[1.05, 0.0, 0.0]]))
    assert bf16[0, 1] == torch.tensor(10.0 / 1.05).to(torch.bfloat16)
    assert bf16[0, 2] == torch.tensor(-10.0 * 1.05).to(torch.bfloat16)
