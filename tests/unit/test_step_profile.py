"""scripts/step_profile.py's bookkeeping, on CPU with stand-in CUDA events, under overlap scheduling.

With overlap, a step() may launch two batches, or launch nothing and only read back the batch the step
before it launched; every step must still land in the split, with a GPU time, so that the GPU check's
"exposed host" figure exists.
"""

from __future__ import annotations

import itertools

import torch

from engine_service import LLM, SamplingParams
from scripts import step_profile
from tests.integration.tiny import make_qwen3


class _FakeEvent:
    """A CUDA event stand-in: records a tick; elapsed_time is 1 ms per tick between two events."""

    clock = itertools.count()

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self, stream=None):
        self.t = next(self.clock)

    def elapsed_time(self, other: _FakeEvent) -> float:
        return float(other.t - self.t)


def test_every_step_lands_in_the_split_with_a_gpu_time(tmp_path, monkeypatch):
    make_qwen3(tmp_path, heads=4, kv_heads=2, layers=1, dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [7] * 20]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 9, 3)]
    with LLM(tmp_path, device="cpu", dtype="float32", attention_backend="torch", max_num_seqs=4,
             max_model_len=64, overlap_scheduling=True) as llm:
        prof = step_profile.StepProfiler(llm)
        prof.cuda = True  # record (stand-in) events as on a GPU
        with prof:
            outs = llm.generate(prompts, params)
        summary = prof.summary()
    assert [len(o["token_ids"]) for o in outs] == [5, 9, 3]
    decode = summary["decode"]
    # 9 tokens for the longest request: 1 from the prefill step, 8 from decode steps, of which one step()
    # may only read back the batch launched before it.
    assert decode["steps"] >= 8
    assert decode["gpu_ms"] is not None and decode["exposed_host_ms"] >= 0
    assert 1 <= decode["mean_batch"] <= 3
    assert decode["wait_ms"] > 0 and decode["schedule_ms"] > 0
    assert "mixed" in summary  # the prefill step
