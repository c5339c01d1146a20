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


def test_kernel_summary_groups_device_kernels_and_counts_idle_time():
    """Names as a CUDA trace gives them (Triton kernels by function name, cuBLAS and torch by theirs):
    each lands in its group, time is per step, and the gaps between kernels count as idle."""
    trace = [  # (name, start_us, duration_us) over 2 steps
        ("_paged_attention_kernel", 0.0, 10.0),
        ("nvjet_tst_128x64_64x4_1x2_h_bz_TNT", 12.0, 20.0),
        ("_add_rms_norm_kernel", 33.0, 2.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 36.0, 1.0),
        ("_paged_attention_kernel", 50.0, 14.0),
        ("Memcpy HtoD (Pinned -> Device)", 70.0, 3.0),
    ]
    # The profiler's step ranges, as torch 2.11 lists them on the device timeline: not kernels.
    annotations = [("ProfilerStep#201", 0.0, 35.0), ("ProfilerStep#202", 36.0, 37.0)]
    s = step_profile.summarize_kernels(trace + annotations, steps=2)
    busy = sum(d for _, _, d in trace)
    assert s["kernels_per_step"] == 3
    assert s["busy_ms"] == busy / 2e3 and s["span_ms"] == 73.0 / 2e3
    assert s["busy_share"] == busy / 73.0
    assert {g: v["ms"] for g, v in s["groups"].items()} == {
        "attention": 24 / 2e3, "matmul": 20 / 2e3, "copy": 3 / 2e3, "fused elementwise": 2 / 2e3, "other": 1 / 2e3}
    assert list(s["groups"]) == ["attention", "matmul", "copy", "fused elementwise", "other"]  # largest first
    top = s["top"][0]
    assert (top["name"], top["per_step"], top["mean_us"]) == ("_paged_attention_kernel", 1.0, 12.0)
    assert step_profile.summarize_kernels([], steps=3) == {"steps": 3, "kernels_per_step": 0.0}
    # The engine's own kernels each have a group (the sampling kernels' renaming once left them in "other").
    from engine_service import sampling_kernels as sk
    from engine_service.attention import triton_kernels as tk
    from engine_service.model import fused_ops as fo
    from engine_service.model import gemm

    ours = [tk._paged_attention_kernel, tk._merge_splits_kernel, tk._store_kvcache_kernel, sk._chunk_stats_kernel,
            sk._chunk_pick_kernel, fo._add_rms_norm_kernel, fo._qk_norm_rope_kernel, fo._silu_and_mul_kernel,
            gemm._gemm_kernel]
    assert [step_profile.kernel_group(k.__name__) for k in ours] == [
        "attention", "attention", "kv store", "sampling", "sampling", "fused elementwise", "fused elementwise",
        "fused elementwise", "matmul"]


def test_decode_latency_draws_new_prompts_at_each_call(monkeypatch):
    """Two calls on one engine (graphs on and off, batch 1 then 64) drew the same prompts, so the second found the
    first's in the prefix cache: a shorter prefill, and seconds that were not the same measurement."""
    seen = []

    class _Llm:
        model_cfg = type("Cfg", (), {"vocab_size": 1000})

        def generate(self, prompts, params):
            seen.append([tuple(p) for p in prompts])

    monkeypatch.setattr(step_profile, "profile_generate", lambda llm, prompts, params: (
        llm.generate(prompts, params), ({"decode": {"median_wall_ms": 1.0}}, 0.5))[1])
    for _ in range(2):
        assert step_profile.decode_latency(_Llm(), 4, prompt_len=8, max_tokens=2)["itl_ms"] == 1.0
    timed = [rows for i, rows in enumerate(seen) if i % 2]  # each call: the warm-up, then the timed batch
    assert len(seen) == 4 and not set(timed[0]) & set(timed[1]) and not set(seen[0]) & set(seen[1])
