"""The Triton backend, under TRITON_INTERPRET=1 on CPU in fp32, gives the torch backend's greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from engine_service import LLM, SamplingParams
from tests.integration.tiny import VOCAB, make_qwen3
from tests.support import require_triton_interpreter

require_triton_interpreter()

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


def _engine(path, backend: str, **kw) -> LLM:
    args = dict(
        device="cpu",
        dtype="float32",
        enforce_eager=True,
        attention_backend=backend,
        kvcache_block_size=8,
        num_kvcache_blocks=64,
        max_num_batched_tokens=48,
        max_num_seqs=4,
        max_model_len=128,
    )
    args.update(kw)
    return LLM(path, **args)


@pytest.mark.parametrize(
    "heads,kv_heads", [(2, 2), (4, 2), (6, 2), (8, 2)], ids=["gqa1", "gqa2", "gqa3", "gqa4"]
)
def test_triton_matches_torch(tmp_path, heads, kv_heads):
    make_qwen3(
        tmp_path, heads=heads, kv_heads=kv_heads, head_dim=16, hidden=32, layers=2, dtype=torch.float32
    )
    rng = random.Random(heads)
    shared = [rng.randrange(VOCAB) for _ in range(24)]
    # decode, a prefill longer than the 48-token budget (chunks), and prompts that hit the prefix cache
    prompts = [[rng.randrange(VOCAB) for _ in range(3)], [rng.randrange(VOCAB) for _ in range(70)], shared]
    later = [shared + [1, 2], shared]
    results = {}
    for backend in ("torch", "triton"):
        with _engine(tmp_path, backend) as llm:
            first = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
            second = [o["token_ids"] for o in llm.generate(later, GREEDY)]
            assert llm.stats()["prefix_cache_hits"] > 0
            assert llm.runner.backend_name == backend
        results[backend] = (first, second)
    assert results["triton"] == results["torch"]


def test_an_fp8_kv_cache_holds_four_times_the_tokens_and_both_backends_read_it_alike(tmp_path):
    """kv_cache_dtype="fp8": the pool sized from cpu_kvcache_gib holds 4x the blocks of a float32 cache; the
    triton backend (its store and attention kernels) gives the torch backend's greedy tokens over it, through
    chunked prefill, decode and prefix-cache hits."""
    make_qwen3(tmp_path, heads=6, kv_heads=2, head_dim=16, hidden=48, layers=2, dtype=torch.float32)
    rng = random.Random(8)
    shared = [rng.randrange(VOCAB) for _ in range(24)]
    prompts = [[rng.randrange(VOCAB) for _ in range(3)], [rng.randrange(VOCAB) for _ in range(70)], shared]
    later = [shared + [1, 2], shared]
    sizing = dict(num_kvcache_blocks=None, cpu_kvcache_gib=2 ** -14)  # 64 KiB: a cap the pool meets
    results, blocks = {}, {}
    for backend, kv in (("torch", "auto"), ("torch", "fp8"), ("triton", "fp8")):
        with _engine(tmp_path, backend, kv_cache_dtype=kv, **sizing) as llm:
            first = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
            second = [o["token_ids"] for o in llm.generate(later, GREEDY)]
            assert llm.stats()["prefix_cache_hits"] > 0
            assert llm.runner.k_cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.float32)
            blocks[kv] = llm.runner.num_blocks
        results[backend, kv] = (first, second)
    assert results["triton", "fp8"] == results["torch", "fp8"]
    assert blocks["fp8"] == 4 * blocks["auto"]


def test_triton_on_cpu_makes_no_cuda_query(tmp_path, monkeypatch):
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=1, dtype=torch.float32)

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA query on the CPU path")

    for name in ("is_available", "device_count", "current_device", "get_device_properties", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    with _engine(tmp_path, "triton") as llm:
        out = llm.generate([[1, 2, 3, 4, 5]], GREEDY)[0]
    assert len(out["token_ids"]) == GREEDY.max_tokens


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_model_runner_tunes_the_decode_tile_on_its_own_shapes(tmp_path, monkeypatch, caplog, kv_cache_dtype):
    """The start-up tuning step (CUDA only in the engine) driven on CPU with a stand-in timer: it times every
    candidate on the runner's KV cache and its shapes (an fp8 cache with the model's queries), and decode steps
    then use the fastest."""
    import logging

    from engine_service.attention import triton_kernels as tk

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    monkeypatch.setattr(tk, "_decode_tiles", {})
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    fastest = tk.DECODE_TILES[-1]
    timed = []

    def timer(fn, iters):
        fn()
        timed.append(len(timed))
        return 1.0 if len(timed) == len(tk.DECODE_TILES) else 5.0

    monkeypatch.setattr(tk, "_cuda_event_timer", timer)
    with _engine(tmp_path, "triton", kv_cache_dtype=kv_cache_dtype) as llm:
        with caplog.at_level(logging.INFO, logger="engine_service.model_runner"):
            llm.runner._tune_decode_attention()
        assert len(timed) == len(tk.DECODE_TILES) + 2  # every candidate, then the pick in batch order (heads 1st, 2nd)
        assert f"decode attention tile (BLOCK_N, stages, warps, heads_first) {fastest}" in caplog.text
        assert ("decode attention launched longest first 1 us, in batch order 5 us: decode steps launch longest "
                "first") in caplog.text
        # The GPU check's table reads that line back (from the bench's log): the format and the parser agree.
        from scripts import gpu_check

        log_file = tmp_path / "d.log"
        log_file.write_text(caplog.text)
        assert gpu_check._picked_tile(log_file).startswith(f"tile {fastest} at ")
        # max_model_len 128: a mean of 68 keys, whose spread (up to 15/8 of it) stays within the model's length.
        assert "(4 sequences x 68 keys on average), 1 us launched longest first against 5 in batch order" in \
            gpu_check._picked_tile(log_file)
        key = tk._tile_key(torch.empty(1, 4, 16), llm.runner.k_cache[0])
        assert tk._decode_tiles == {key: fastest}
        tuned = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], GREEDY)
    with _engine(tmp_path, "torch", kv_cache_dtype=kv_cache_dtype) as llm:
        reference = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], GREEDY)
    assert [o["token_ids"] for o in tuned] == [o["token_ids"] for o in reference]
