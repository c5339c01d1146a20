"""Triton KV-store and paged-attention kernels under the interpreter, against float64 torch references.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton decorates any kernel.
Outputs are poisoned with NaN before each call, so an element the kernel fails to write shows up.
Shapes are small: the interpreter runs each program in numpy.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tests.support import require, require_triton_interpreter

require_triton_interpreter()

from engine_service.attention import triton_kernels as tk  # noqa: E402
from engine_service.attention.triton_ref import (  # noqa: E402
    make_paged_batch,
    ref_paged_attention,
    ref_store_kvcache,
)

ROOT = Path(__file__).resolve().parents[2]

# The interpreter turns loop bounds loaded from memory into ints via int(1-element array): numpy 2.x
# warns (and 2.4 fails, hence the numpy<2.4 pin). Expected; keep the report readable.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _run_attention(b, scale, splits=None, dtype=None, out_view=False):
    """Call paged_attention on a NaN-poisoned output; return (out, float64 reference)."""
    q = b.q
    if out_view:  # out as a non-contiguous view (every other row of a wider buffer)
        buf = torch.full((q.shape[0], 2 * q.shape[1], q.shape[2]), float("nan"), dtype=q.dtype)
        out = buf[:, ::2]
    else:
        out = torch.full_like(q, float("nan"))
    res = tk.paged_attention(q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, scale,
                             b.max_seqlen_q, out=out, num_kv_splits=splits)
    assert res is out
    ref = ref_paged_attention(q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, scale)
    return out, ref


def _check(out, ref, atol=2e-5):
    assert not out.isnan().any(), "some output elements were not written"
    err = (out.double() - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3e} > {atol}"


# --------------------------------------------------------------------------------------------------
# store_kvcache
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,slot_dtype", [(16, torch.int32), (5, torch.int64), (256, torch.int64)])
def test_store_kvcache_skips_padding_slots(block_size, slot_dtype):
    g = torch.Generator().manual_seed(block_size)
    nt, kvh, hd, nb = 23, 3, 32, 6  # 6 blocks hold >= 30 slots for 23 tokens
    # k and v as non-contiguous views of one packed qkv row, as a model produces them.
    qkv = torch.randn(nt, 4 * kvh * hd, generator=g)
    k = qkv[:, 2 * kvh * hd:3 * kvh * hd].view(nt, kvh, hd)
    v = qkv[:, 3 * kvh * hd:].view(nt, kvh, hd)
    slots = torch.randperm(nb * block_size, generator=g)[:nt].to(slot_dtype)
    slots[::4] = -1  # padding lanes
    k_cache = torch.randn(nb, block_size, kvh, hd, generator=g)
    v_cache = torch.randn(nb, block_size, kvh, hd, generator=g)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    ref_store_kvcache(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_kvcache_non_pow2_head_dim_and_empty():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(6, 3, 48, generator=g)
    v = torch.randn(6, 3, 48, generator=g)
    kc, vc = torch.zeros(3, 4, 3, 48), torch.zeros(3, 4, 3, 48)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.tensor([11, -1, 0, 5, -1, 7])
    tk.store_kvcache(k, v, kc, vc, slots)
    ref_store_kvcache(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    tk.store_kvcache(k[:0], v[:0], kc, vc, slots[:0])  # no tokens: no launch, no error


FP8 = torch.float8_e4m3fn


def _across_e4m3(n: int, g: torch.Generator) -> torch.Tensor:
    """n values over e4m3's whole range, shuffled: every finite e4m3 value and every midpoint between neighbours
    (ties), subnormals, values past 448 (saturating), both zeros, and normal draws at scales from 1e-3 to 3,000 for
    the rest."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()
    special = torch.tensor([0.0, -0.0, 448.0, 464.0, 465.0, 480.0, -500.0, 1e4, 2.0 ** -10, -(2.0 ** -10)])
    fixed = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, special])
    if fixed.numel() > n:
        raise ValueError(f"{n} values cannot hold the {fixed.numel()} every e4m3 value and midpoint take")
    draws = torch.cat([torch.randn(n, generator=g) * s for s in (1e-3, 0.02, 1.0, 30.0, 3000.0)])
    draws = draws[torch.randperm(draws.numel(), generator=g)][: n - fixed.numel()]
    values = torch.cat([fixed, draws])
    return values[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_rounds_into_an_fp8_cache_as_torch_does(dtype):
    """kv_cache_dtype="fp8": each value lands as torch's x.clamp(-448, 448).to(float8_e4m3fn), bit for bit
    (to nearest even, saturating, the sign of zero kept); padding slots write nothing. The interpreter's own
    cast rounds some values differently, so the kernel rounds before it casts."""
    from engine_service.attention import to_kv_cache

    g = torch.Generator().manual_seed(3)
    nt, kvh, hd, nb, bs = 40, 2, 16, 6, 8
    k = _across_e4m3(nt * kvh * hd, g).view(nt, kvh, hd).to(dtype)
    v = _across_e4m3(nt * kvh * hd, g).view(nt, kvh, hd).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:nt]
    slots[::7] = -1
    k_cache = torch.randint(0, 120, (nb, bs, kvh, hd), generator=g, dtype=torch.uint8).view(FP8)
    v_cache = torch.randint(0, 120, (nb, bs, kvh, hd), generator=g, dtype=torch.uint8).view(FP8)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    ref_store_kvcache(to_kv_cache(k, FP8), to_kv_cache(v, FP8), k_ref, v_ref, slots)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    # A NaN stays NaN (e4m3's 0x7f; the interpreter's own cast made it 384).
    k[1, 0, :3] = torch.tensor([float("nan"), 1.0, float("nan")], dtype=dtype)
    tk.store_kvcache(k[1:2], v[1:2], k_cache, v_cache, slots[1:2])
    stored = k_cache.view(-1, kvh, hd)[slots[1], 0, :3].float()
    assert stored.isnan().tolist() == [True, False, True] and stored[1] == 1.0


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", ["decode", "prefix", "mixed"])
def test_paged_attention_over_an_fp8_cache(dtype, atol, case):
    """With an fp8 cache the kernel reads K/V back in q's dtype (exact) and computes as over any cache: equal,
    within the dtype's tolerance, to the float64 reference over the same fp8 values; split decode and padding
    lanes too."""
    from engine_service.attention import to_kv_cache

    q_lens, ctx = {"decode": CASES["decode"], "prefix": CASES["prefix"],
                   "mixed": ([1, 1, 6, 1], [0, 40, 30, 17])}[case]
    g = torch.Generator().manual_seed(len(case))
    b = make_paged_batch(q_lens, ctx, 6, 2, 32, 16, dtype=dtype, generator=g)
    b.k_cache, b.v_cache = to_kv_cache(b.k_cache * 4, FP8), to_kv_cache(b.v_cache, FP8)
    # Split partials are float32 whatever q's dtype (float64 engines never split: one split on CPU).
    for splits in (None,) if dtype == torch.float64 else (None, 3):
        out, ref = _run_attention(b, 32 ** -0.5, splits=splits)
        assert out.dtype == dtype
        _check(out, ref, atol=atol)
    with pytest.raises(ValueError, match="must both hold q's dtype"):
        tk.paged_attention(b.q, b.k_cache, b.v_cache.to(dtype), b.cu_seqlens_q, b.context_lens, b.block_tables,
                           0.2, b.max_seqlen_q)
    with pytest.raises(ValueError, match="q is float8"):
        tk.paged_attention(b.q.to(FP8), b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables,
                           0.2, b.max_seqlen_q)


# --------------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------------
# (q_lens, ctx_lens): decode, prefill, prefill over a cached prefix, a chunk in the middle of a prompt.
CASES = {
    "decode": ([1, 1, 1, 1], [1, 37, 130, 64]),
    "prefill": ([19, 1, 40], [19, 1, 40]),
    "prefix": ([21, 3], [85, 67]),  # 64 cached tokens each, new tokens at the end
    "chunk": ([16, 33], [48, 97]),  # chunk in the middle of a longer prompt (rest comes later)
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gqa", [1, 2, 3, 4, 5, 7])  # 7: Qwen2.5 (28 or 14 query heads on 4 or 2)
def test_paged_attention_cases_and_gqa(case, gqa):
    q_lens, ctx = CASES[case]
    num_kv = 2 if gqa < 4 else 1
    g = torch.Generator().manual_seed(10 * gqa + len(case))
    b = make_paged_batch(q_lens, ctx, gqa * num_kv, num_kv, 32, 16, generator=g)
    _check(*_run_attention(b, 32 ** -0.5))


@pytest.mark.parametrize("block_size,head_dim,table_fill", [
    (16, 64, 0), (32, 32, -1), (256, 32, 0), (8, 128, -1), (5, 48, -1),  # 5, 48: not powers of two
])
def test_paged_attention_block_sizes_head_dims(block_size, head_dim, table_fill):
    g = torch.Generator().manual_seed(block_size + head_dim)
    b = make_paged_batch([1, 9, 1], [70, 30, 1], 4, 2, head_dim, block_size, table_fill=table_fill,
                         generator=g)
    _check(*_run_attention(b, head_dim ** -0.5))


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv_decode_and_prefill(splits):
    # Contexts that leave some splits empty (1, 10) and some spanning several BLOCK_N tiles (300).
    g = torch.Generator().manual_seed(splits)
    b = make_paged_batch([1, 1, 1, 1, 7], [1, 10, 300, 129, 140], 6, 2, 32, 16, generator=g)
    _check(*_run_attention(b, 0.17, splits=splits))


def test_mixed_batch_with_padding_lanes():
    # Decodes, a prefill over a prefix, a sequence with no query rows, and padding lanes
    # (q_len 1, context 0) as a CUDA-graph batch has them: those rows must be zeros.
    g = torch.Generator().manual_seed(7)
    q_lens = [1, 13, 1, 0, 1, 30, 1, 1]
    ctx = [45, 60, 1, 20, 0, 30, 0, 0]
    b = make_paged_batch(q_lens, ctx, 6, 2, 32, 16, generator=g)
    for splits in (None, 3):
        out, ref = _run_attention(b, 0.2, splits=splits, out_view=(splits == 3))
        _check(out, ref)
        cu = b.cu_seqlens_q.tolist()
        for i in (4, 6, 7):
            assert torch.equal(out[cu[i]:cu[i + 1]], torch.zeros_like(out[cu[i]:cu[i + 1]]))


def test_all_padding_and_empty_batch():
    b = make_paged_batch([1, 1, 1], [0, 0, 0], 4, 2, 32, 16)
    out, _ = _run_attention(b, 0.1, splits=2)
    assert torch.equal(out, torch.zeros_like(out))
    empty = tk.paged_attention(b.q[:0], b.k_cache, b.v_cache, torch.zeros(1, dtype=torch.int32),
                               b.context_lens[:0], b.block_tables[:0], 0.1, 1)
    assert empty.shape == (0, 4, 32)


def test_max_seqlen_q_is_only_a_tile_hint():
    # An underestimated max_seqlen_q gives smaller tiles, never a wrong answer.
    b = make_paged_batch([17, 1, 5], [40, 9, 5], 6, 3, 32, 16, generator=torch.Generator().manual_seed(3))
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, 1,
                       out=out)
    _check(out, ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens,
                                    b.block_tables, 0.2))


def test_fp16_and_non_contiguous_q():
    g = torch.Generator().manual_seed(5)
    b = make_paged_batch([1, 12, 1], [33, 50, 70], 6, 2, 64, 16, dtype=torch.float16, generator=g)
    qkv = torch.randn(b.q.shape[0], 3, 6, 64, generator=g).half()
    b.q = qkv[:, 0]  # non-contiguous view, as split from a packed qkv projection
    out, ref = _run_attention(b, 0.125)
    assert out.dtype == torch.float16
    _check(out, ref, atol=3e-3)
    out2, _ = _run_attention(b, 0.125, splits=2)
    _check(out2, ref, atol=3e-3)


def test_int64_metadata():
    b = make_paged_batch([1, 6, 1], [20, 40, 77], 4, 2, 32, 16, generator=torch.Generator().manual_seed(4))
    b.cu_seqlens_q, b.context_lens, b.block_tables = (b.cu_seqlens_q.long(), b.context_lens.long(),
                                                      b.block_tables.long())
    _check(*_run_attention(b, 0.2, splits=2))


def test_bf16_on_cpu_is_computed_in_fp32():
    # The interpreter's bf16 tl.dot is wrong, so on CPU the kernel upcasts bf16 to fp32 before its dots.
    # Its fp32 -> bf16 cast truncates instead of rounding, hence one bf16 ulp of tolerance.
    b = make_paged_batch([1, 9], [30, 9], 4, 2, 32, 16, dtype=torch.bfloat16,
                         generator=torch.Generator().manual_seed(8))
    _check(*_run_attention(b, 0.2), atol=2 ** -7 * 2)


def test_default_splits_make_no_cuda_query_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA queried on the CPU path")

    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert tk.default_num_kv_splits(1, 8, 1, torch.device("cpu")) == 1
    b = make_paged_batch([1, 1], [5, 80], 4, 2, 32, 16)
    _check(*_run_attention(b, 0.1))


@pytest.mark.parametrize("tile", tk.DECODE_TILES)
@pytest.mark.parametrize("splits", [1, 3])
def test_every_decode_tile_the_tuner_may_pick_is_exact(tile, splits):
    g = torch.Generator().manual_seed(sum(tile) + splits)
    b = make_paged_batch([1, 1, 1, 1], [1, 37, 130, 300], 8, 2, 32, 16, generator=g)
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, 1,
                       out=out, num_kv_splits=splits, tile=tile)
    _check(out, ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2))


@pytest.mark.parametrize("gqa", [1, 2, 3])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("tile", [tk.DECODE_TILES[0], (32, 3, 4, 1)])
def test_decode_launched_in_any_sequence_order_is_the_same_attention(gqa, splits, tile):
    """seq_order only decides which sequence each program takes: any permutation (longest first, as the engine
    launches decode steps, reversed, random) gives the batch-order output bit for bit, padding lanes (context 0)
    and a sequence with no query token included."""
    from engine_service.attention.base import longest_first

    g = torch.Generator().manual_seed(gqa * 7 + (splits or 1))
    q_lens = [1, 1, 1, 0, 1, 1, 1, 1]
    ctx = [37, 300, 0, 12, 1, 129, 0, 64]
    b = make_paged_batch(q_lens, ctx, 2 * gqa, 2, 32, 16, generator=g)
    ref = ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2)
    plain = torch.full_like(b.q, float("nan"))
    tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, 1,
                       out=plain, num_kv_splits=splits, tile=tile)
    _check(plain, ref)
    orders = [longest_first(ctx), list(range(len(ctx)))[::-1], torch.randperm(len(ctx), generator=g).tolist()]
    assert orders[0] == [1, 5, 7, 0, 3, 4, 2, 6]  # ties keep lane order
    for order in orders:
        out = torch.full_like(b.q, float("nan"))
        tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, 1,
                           out=out, num_kv_splits=splits, tile=tile,
                           seq_order=torch.tensor(order, dtype=torch.int32))
        assert torch.equal(out, plain), order


def test_an_order_is_refused_where_it_cannot_hold():
    b = make_paged_batch([1, 1, 1], [5, 9, 2], 4, 2, 32, 16)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2)
    with pytest.raises(ValueError, match=r"expected \(3,\) int32 on cpu, a permutation"):
        tk.paged_attention(*args, 1, seq_order=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected \(3,\) int32"):
        tk.paged_attention(*args, 1, seq_order=torch.tensor([0, 1, 2]))  # int64
    with pytest.raises(ValueError, match="seq_order is for decode steps"):
        tk.paged_attention(*args, 2, seq_order=torch.tensor([0, 1, 2], dtype=torch.int32))
    # Launched in an order, one slot per sequence, and the KV heads on the fastest axis even for a tile that puts
    # them second: every head of the longest sequence starts first.
    out = torch.empty_like(b.q)
    order = torch.tensor([1, 0, 2], dtype=torch.int32)
    assert tk.DECODE_TILES[0][3] == 0
    launch = tk._plan_paged_attention(*args, 1, out, 1, tk.DECODE_TILES[0], order)[0]
    assert launch.constexprs["ORDERED"] and launch.constexprs["HEADS_FIRST"] and launch.grid == (2, 3, 1)


def test_tuner_batch_spreads_the_lengths_it_times():
    """The tuner times a batch of spread lengths averaging the context it is given (a launch's tail depends on
    the spread); equal lengths hid the 12% a tail costs mid workload A on the H200."""
    lens = tk.spread_lengths(256, 1024, torch.Generator().manual_seed(0))
    assert len(lens) == 256 and sum(lens) == 256 * 1024
    assert min(lens) == 128 and max(lens) == 1920 and lens != sorted(lens)
    assert tk.spread_lengths(1, 7, torch.Generator()) == [7]
    assert min(tk.spread_lengths(4, 1, torch.Generator())) == 1


@pytest.mark.parametrize("batch_order_us,ordered", [(9.0, True), (1.5, False)])
def test_decode_keeps_the_launch_order_only_where_the_tuner_found_it_faster(monkeypatch, batch_order_us, ordered):
    """The tuner times its pick in batch order too: where that is faster (the model behind longest-first could be
    wrong on some GPU), decode steps of those shapes ignore their seq_order; the same answer either way."""
    monkeypatch.setattr(tk, "_decode_tiles", {})
    monkeypatch.setattr(tk, "_decode_order_timings", {})
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    calls, launches = [], []
    real = tk.paged_attention
    monkeypatch.setattr(tk, "paged_attention", lambda *a, **k: launches.append(k.get("seq_order")) or real(*a, **k))

    def timer(fn, iters):
        # Each timed variant has run (compiled) just before: a compile must never land inside a timing.
        assert launches, "timed without a warm-up call"
        launches.clear()
        fn()
        launches.clear()
        calls.append(1)
        # Candidates (launched in order) 3 us, the first 2 us; then the pick in batch order, heads first and second.
        return (2.0 if len(calls) == 1 else 3.0) if len(calls) <= len(tk.DECODE_TILES) else batch_order_us

    b = make_paged_batch([1, 1, 1], [40, 9, 17], 4, 2, 16, 8)
    picked, _ = tk.tune_decode_tile(b.k_cache, b.v_cache, 4, batch=3, context_len=20, timer=timer)
    assert picked == tk.DECODE_TILES[0] and len(calls) == len(tk.DECODE_TILES) + 2
    assert tk.decode_order_timings(b.q, b.k_cache) == (2.0, batch_order_us)
    assert tk.decode_order_pays(b.q, b.k_cache) is ordered
    order = torch.tensor([0, 2, 1], dtype=torch.int32)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.1, 1)
    launch = tk._plan_paged_attention(*args, torch.empty_like(b.q), 1, None, order)[0]
    assert launch.constexprs["ORDERED"] is ordered
    out = tk.paged_attention(*args, seq_order=order)
    assert torch.equal(out, tk.paged_attention(*args))
    # A caller naming its tile (the GPU check's launch-order table) gets the order it asked for, whatever the tuner
    # found: otherwise its "longest first" column would silently time batch order.
    launch = tk._plan_paged_attention(*args, torch.empty_like(b.q), 1, tk.DECODE_TILES[0], order)[0]
    assert launch.constexprs["ORDERED"] is True
    # Tuned again, say with the tile pinned, nothing is timed: the order is kept.
    monkeypatch.setenv(tk.DECODE_TILE_ENV, "64,2,4")
    tk.tune_decode_tile(b.k_cache, b.v_cache, 4, batch=3, context_len=20, timer=timer)
    assert tk.decode_order_pays(b.q, b.k_cache)


@pytest.mark.parametrize("tile", tk.PREFILL_TILES)
def test_every_prefill_tile_the_tuner_may_pick_is_exact(tile):
    """fp16 (the interpreter computes bf16 dots wrongly): prompts long enough to fill 128-row tiles, one over a
    cached prefix, a decode row beside them, and a chunk that ends mid-tile."""
    g = torch.Generator().manual_seed(sum(tile))
    b = make_paged_batch([70, 1, 45], [70, 37, 130], 4, 2, 32, 16, dtype=torch.float16, generator=g)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.2, b.max_seqlen_q)
    out = torch.full_like(b.q, float("nan"))
    launch = tk._plan_paged_attention(*args, out, 1, prefill_tile=tile)[0]
    assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"], launch.options["num_stages"],
            launch.options["num_warps"]) == tile
    tk.paged_attention(*args, out=out, num_kv_splits=1, prefill_tile=tile)
    _check(out, ref_paged_attention(*args[:7]), atol=3e-3)


def test_prefill_tuner_picks_the_fastest_agreeing_tile_and_the_environment_pins_one(monkeypatch):
    monkeypatch.setattr(tk, "_prefill_tiles", {})
    monkeypatch.delenv(tk.PREFILL_TILE_ENV, raising=False)
    fastest, broken, wrong, silent = tk.PREFILL_TILES[1], tk.PREFILL_TILES[2], tk.PREFILL_TILES[3], tk.PREFILL_TILES[4]
    real_plan = tk._plan_paged_attention

    def plan(*args, **kwargs):  # `wrong` computes garbage and `silent` nothing: the tuner must drop both untimed
        launches = real_plan(*args, **kwargs)
        tile = kwargs.get("prefill_tile", args[12] if len(args) > 12 else None)
        if tile == silent:  # what a kernel whose programs all returned early would leave: the last tile's output
            return []
        if tile == wrong:
            out = args[8]
            return [*launches, tk._Launch(type("Garbage", (), {"__getitem__": lambda self, grid: (
                lambda *a, **k: out.add_(1.0))})(), (1,), (), {}, {})]
        return launches

    monkeypatch.setattr(tk, "_plan_paged_attention", plan)
    timed = []

    def timer(fn, iters):
        tile = [t for t in tk.PREFILL_TILES if t not in timed and t not in (wrong, silent)][0]
        timed.append(tile)
        if tile == broken:
            raise RuntimeError("out of resources")  # stands in for a tile that does not fit the device
        fn()
        return 2.0 if tile == fastest else 9.0

    b = make_paged_batch([1], [9], 4, 2, 32, 16, dtype=torch.float16, extra_blocks=40)
    # A mixed step as the engine meets it: 3 decode rows over 20 keys, then prompts of 40 in what is left of 96.
    assert tk._prefill_tuning_step(96, 40, 3, 20) == ([1, 1, 1, 40, 40], [20, 20, 20, 40, 40])
    assert tk.prefill_tuning_blocks(96, 40, 3, 20, 16) == 3 * 2 + 2 * 3 <= b.k_cache.shape[0]
    picked, timings = tk.tune_prefill_tile(b.k_cache, b.v_cache, 4, 96, 40, 3, 20, timer=timer)
    assert picked == fastest and set(timings) == set(tk.PREFILL_TILES)
    assert timings[fastest] == 2.0 and "RuntimeError" in timings[broken]
    assert "differs" in timings[wrong] and "differs" in timings[silent]
    assert wrong not in timed and silent not in timed
    with pytest.raises(ValueError, match="needs 93 blocks"):
        tk.tune_prefill_tile(b.k_cache, b.v_cache, 4, 96, 40, 30, 40, timer=timer)
    half = make_paged_batch([70, 1], [70, 9], 4, 2, 32, 16, dtype=torch.float16)
    out = torch.empty_like(half.q)
    args = (half.q, half.k_cache, half.v_cache, half.cu_seqlens_q, half.context_lens, half.block_tables, 0.1, 70)
    launch = real_plan(*args, out, 1)[0]
    assert launch.constexprs["BLOCK_M"] == fastest[0] and launch.options["num_warps"] == fastest[3]
    # float32 prefill keeps its own tile, and other shapes the default.
    assert _plan_tiles(make_paged_batch([70, 1], [70, 9], 4, 2, 32, 16)) == tk.FP32_PREFILL_TILE
    other = make_paged_batch([70, 1], [70, 9], 4, 2, 32, 8, dtype=torch.float16)
    assert _plan_tiles(other) == tk.PREFILL_TILE
    # Pinned by the environment: untimed, and a malformed pin says what a valid one looks like.
    monkeypatch.setenv(tk.PREFILL_TILE_ENV, "128,128,2,8")
    assert tk.tune_prefill_tile(b.k_cache, b.v_cache, 4, 96, 40, timer=timer) == ((128, 128, 2, 8), {})
    for bad in ("128,100,2,8", "256,64,2,8", "128,64,2"):  # 256 rows: a query tile the warm-up never compiles
        monkeypatch.setenv(tk.PREFILL_TILE_ENV, bad)
        with pytest.raises(ValueError, match="BLOCK_M must be a power of two from 16 to 128|expected BLOCK_M"):
            tk.tune_prefill_tile(b.k_cache, b.v_cache, 4, 96, 40, timer=timer)


def test_tuners_time_an_fp8_cache_with_the_models_queries_and_pick_for_that_pairing_only(monkeypatch):
    """kv_cache_dtype="fp8": start-up tunes over the fp8 cache with queries in the model's dtype (q_dtype); the
    tiles picked serve that pairing, not a cache in the model's dtype. The prefill tuner fills the fp8 cache it
    times over (rounded, as bytes)."""
    from engine_service.attention import to_kv_cache

    monkeypatch.setattr(tk, "_prefill_tiles", {})
    monkeypatch.setattr(tk, "_decode_tiles", {})
    monkeypatch.delenv(tk.PREFILL_TILE_ENV, raising=False)
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    b = make_paged_batch([70, 1], [70, 9], 4, 2, 32, 16, dtype=torch.float16, extra_blocks=8)
    plain = (b.k_cache.clone(), b.v_cache.clone())
    b.k_cache, b.v_cache = to_kv_cache(b.k_cache, FP8), to_kv_cache(b.v_cache, FP8)
    before = b.k_cache.view(torch.uint8).clone()
    prefill_pick, decode_pick = tk.PREFILL_TILES[2], tk.DECODE_TILES[3]
    order = iter(tk.PREFILL_TILES)
    picked, _ = tk.tune_prefill_tile(b.k_cache, b.v_cache, 4, 48, 40, q_dtype=torch.float16,
                                     timer=lambda fn, iters: 1.0 if next(order) == prefill_pick else 5.0)
    assert picked == prefill_pick and not torch.equal(b.k_cache.view(torch.uint8), before)
    for tune in (tk.tune_prefill_tile, tk.tune_decode_tile):  # an fp8 cache cannot stand for the queries' dtype
        with pytest.raises(ValueError, match="pass q_dtype"):
            tune(b.k_cache, b.v_cache, 4, 48, 40, timer=lambda fn, iters: 1.0)
    tiles = iter(tk.DECODE_TILES)
    picked, _ = tk.tune_decode_tile(b.k_cache, b.v_cache, 4, batch=2, context_len=12, q_dtype=torch.float16,
                                    timer=lambda fn, iters: 1.0 if next(tiles, None) == decode_pick else 5.0)
    assert picked[:3] == decode_pick[:3]
    launch = tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables,
                                      0.1, b.max_seqlen_q, torch.empty_like(b.q), 1)[0]
    assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]) == prefill_pick[:2]
    launch = tk._plan_paged_attention(b.q, *plain, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.1,
                                      b.max_seqlen_q, torch.empty_like(b.q), 1)[0]
    assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]) == tk.PREFILL_TILES[0][:2]


def _plan_tiles(b):
    out = torch.empty_like(b.q)
    launch = tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables,
                                      0.1, b.max_seqlen_q, out, 1)[0]
    heads_first = launch.constexprs["HEADS_FIRST"]
    assert launch.grid[0 if heads_first else 1] == b.k_cache.shape[2]  # the KV heads' axis
    return (launch.constexprs["BLOCK_N"], launch.options["num_stages"], launch.options["num_warps"],
            int(heads_first))


def test_tuner_picks_the_fastest_tile_for_those_shapes_only(monkeypatch):
    monkeypatch.setattr(tk, "_decode_tiles", {})
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    fastest, broken = (64, 2, 4, 1), tk.DECODE_TILES[1]
    assert fastest != tk.DECODE_TILES[0] and fastest != broken
    calls = []

    def timer(fn, iters):  # called once per candidate, in DECODE_TILES order
        tile = tk.DECODE_TILES[len(calls)]
        calls.append(iters)
        if tile == broken:
            raise RuntimeError("out of resources")  # stands in for a tile that does not fit the device
        fn()
        return 2.0 if tile == fastest else 9.0

    b = make_paged_batch([1, 1], [40, 9], 4, 2, 16, 8)
    picked, timings = tk.tune_decode_tile(b.k_cache, b.v_cache, 4, batch=3, context_len=20, timer=timer)
    assert picked == fastest and timings[broken] is None
    assert set(timings) == set(tk.DECODE_TILES) and len(calls) == len(tk.DECODE_TILES)
    assert _plan_tiles(b) == fastest  # decode steps of these shapes use it
    assert _plan_tiles(make_paged_batch([5, 1], [40, 9], 4, 2, 16, 8)) == tk.FP32_PREFILL_TILE  # prefill does not
    half = make_paged_batch([5, 1], [40, 9], 4, 2, 16, 8, dtype=torch.float16)
    assert _plan_tiles(half) == tk.PREFILL_TILE  # float32 prefill has a smaller tile of its own
    assert _plan_tiles(make_paged_batch([1, 1], [40, 9], 4, 2, 16, 16)) == tk.DECODE_TILES[0]  # other block size
    _check(*_run_attention(b, 0.1))  # and computes the same attention


def test_tuner_tile_pinned_by_the_environment(monkeypatch):
    monkeypatch.setattr(tk, "_decode_tiles", {})
    b = make_paged_batch([1], [12], 4, 2, 16, 8)

    def timer(fn, iters):
        raise AssertionError("a pinned tile is not timed")

    monkeypatch.setenv(tk.DECODE_TILE_ENV, "32,3,4")
    assert tk.tune_decode_tile(b.k_cache, b.v_cache, 4, 2, 12, timer=timer) == ((32, 3, 4, 0), {})
    assert _plan_tiles(b) == (32, 3, 4, 0)
    monkeypatch.setenv(tk.DECODE_TILE_ENV, "128,2,8,1")
    assert tk.tune_decode_tile(b.k_cache, b.v_cache, 4, 2, 12, timer=timer) == ((128, 2, 8, 1), {})
    for bad in ("64,2", "48,2,4", "64,0,4", "64,2,3", "a,b,c", "64,2,4,2", "64,2,4,1,0"):
        monkeypatch.setenv(tk.DECODE_TILE_ENV, bad)
        with pytest.raises(ValueError, match="BLOCK_N"):
            tk.tune_decode_tile(b.k_cache, b.v_cache, 4, 2, 12, timer=timer)


# --------------------------------------------------------------------------------------------------
# Sampling kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,dtype", [(1000, torch.float32), (20_000, torch.bfloat16), (8192, torch.float16)])
def test_sampling_kernel_draws_the_inverse_cdf_token(vocab, dtype):
    """Each row's uniform is put at the middle of a chosen token's cdf interval (in float64, over tokens of
    probability >= 1e-3 anywhere in the vocabulary): the kernel must draw exactly that token. Rounding in a
    different summation order moves a boundary by far less than half such an interval."""
    from engine_service import sampling_kernels as sk

    g = torch.Generator().manual_seed(vocab)
    n = 12
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    inv_temp = 1.0 / torch.tensor([0.3, 0.6, 1.0, 1.7] * 3)
    want, u = sk.midpoint_draws(logits, inv_temp, g)
    assert max(want) > sk.BLOCK_V or vocab <= sk.BLOCK_V  # past the first inner iteration where there is one
    got = sk.sample_rows(logits, inv_temp, u)
    assert got.dtype == torch.long and got.shape == (n,)
    assert got.tolist() == want


@pytest.mark.parametrize("block", [256, 1024])
def test_sampling_kernel_over_many_chunks_draws_the_inverse_cdf_token(block):
    """Small chunks, so that a row spans 12 or 3 of them (the last partly past the vocabulary, and 12 padded to
    16 in the picking kernel): the chunk the draw falls in, and the token within it, must both be right."""
    from engine_service import sampling_kernels as sk

    g = torch.Generator().manual_seed(block)
    n, vocab = 16, 3000
    logits = torch.randn(n, vocab, generator=g) * 2
    inv_temp = 1.0 / torch.linspace(0.4, 1.5, n)
    want, u = sk.midpoint_draws(logits, inv_temp, g, min_prob=2e-4)
    assert len({t // block for t in want}) > 1  # the draws land in several chunks
    got = sk.sample_rows(logits, inv_temp, u, block=block)
    assert got.tolist() == want
    both = sk.sample_rows(logits, inv_temp, u, check_finite=True, block=block)
    assert both.shape == (2, n) and both[0].tolist() == want and both[1].tolist() == [1] * n


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN rows
def test_sampling_kernel_finite_check_flags_nan_and_either_infinity_in_any_chunk():
    from engine_service import sampling_kernels as sk

    vocab = 3000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    logits[0, 2999] = float("nan")  # in the last, partial chunk
    logits[1, 5] = float("inf")
    logits[2, 1500] = float("-inf")  # -inf from the model is not finite either (the torch path's check agrees)
    logits[3] = float("nan")
    logits[4] = 2e35  # every logit finite, their float32 sum not: finite (a sum as the check called it non-finite)
    both = sk.sample_rows(logits, torch.ones(6), torch.full((6,), 0.5), check_finite=True, block=512)
    assert both[1].tolist() == [0, 0, 0, 0, 1, 1]
    assert both[1].bool().tolist() == torch.isfinite(logits).all(-1).tolist()
    assert all(0 <= t < vocab for t in both[0].tolist())


def test_a_temperature_past_float32s_range_samples_like_the_torch_path():
    """1e39 is inf in float32: its inverse 0 times the -inf of lanes past the vocabulary was NaN, and every draw
    fell back to the last token. The sampler clamps the temperature to 1e30 for both paths."""
    from engine_service.sampler import Sampler, SamplingRow
    from engine_service.sampling_params import SamplingParams

    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(4))
    drawn = []
    for kernels in (True, False):
        sampler = Sampler(torch.device("cpu"), 0, triton_sampling=kernels)
        rows = [SamplingRow(SamplingParams(temperature=1e39, seed=i), torch.Generator().manual_seed(i))
                for i in range(8)]
        tokens, finite = sampler(logits.clone(), rows)
        assert finite == [True] * 8
        drawn.append(tokens)
    assert drawn[0] == drawn[1] and len(set(drawn[0])) > 4  # the same near-uniform draws, not token 999 each time


def test_sampling_kernel_never_draws_a_banned_token_even_at_the_ends():
    from engine_service import sampling_kernels as sk

    vocab = 9000  # two inner iterations, the second partly masked
    logits = torch.zeros(4, vocab)
    logits[:, :10] = float("-inf")  # banned at the start
    logits[:, -25:] = float("-inf")  # and at the end
    logits[3, 5000:] = float("-inf")
    u = torch.tensor([0.0, 1.0 - 1e-7, 0.5, 1.0 - 1e-7])
    for block in (sk.BLOCK_V, 1024):  # with 1024, rows whose first or last chunks are all banned
        got = sk.sample_rows(logits, torch.ones(4), u, block=block).tolist()
        assert got[0] == 10 and got[1] == vocab - 26 and got[3] == 4999
        assert 10 <= got[2] < vocab - 25


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN rows
@pytest.mark.parametrize("triton_sampling", [True, False])
def test_a_non_finite_row_still_gets_a_token_inside_the_vocabulary(triton_sampling):
    """Under overlap scheduling the next step embeds the sampled tokens on the device before the host sees
    that a row was non-finite (and fails its request): every token must index the vocabulary."""
    from engine_service.sampler import Sampler, SamplingRow
    from engine_service.sampling_params import SamplingParams

    vocab = 9000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5))
    logits[0, 17] = float("nan")
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    sampler = Sampler(torch.device("cpu"), 0, triton_sampling=triton_sampling)
    tokens, finite = sampler(logits, [SamplingRow(SamplingParams(temperature=0.8), None)] * 4)
    assert finite == [False, False, False, True]
    assert all(0 <= t < vocab for t in tokens)


def test_sampler_uses_the_kernel_for_unfiltered_rows_with_the_same_tokens():
    from engine_service.sampler import Sampler, SamplingRow
    from engine_service.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 3000, generator=g) * 2
    rows = [SamplingRow(SamplingParams(temperature=t, seed=i), torch.Generator().manual_seed(i))
            for i, t in enumerate([0.5, 0.8, 1.0, 1.2, 0.7, 0.9])]
    plain = Sampler(torch.device("cpu"), 0, triton_sampling=False)
    fused = Sampler(torch.device("cpu"), 0, triton_sampling=True)
    assert plain.kernels is None and fused.kernels is not None
    calls = []
    sample_rows = fused.kernels.sample_rows

    def counting(*args, **kwargs):
        calls.append(1)
        return sample_rows(*args, **kwargs)

    fused.kernels = type("K", (), {"sample_rows": staticmethod(counting)})
    tokens_plain, _ = plain(logits.clone(), rows)
    for r, i in zip(rows, range(6), strict=True):
        r.generator.manual_seed(i)  # the same uniforms again
    tokens_fused, _ = fused(logits.clone(), rows)
    assert calls == [1] and tokens_fused == tokens_plain
    # A row with a filter sends the batch down the torch path.
    filtered = rows[:5] + [SamplingRow(SamplingParams(temperature=1.0, top_p=0.9), None)]
    fused(logits.clone(), filtered)
    assert calls == [1]


def test_bad_shapes_raise():
    b = make_paged_batch([1], [5], 6, 4, 32, 16)
    with pytest.raises(ValueError, match="multiple"):
        tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.1, 1)


# --------------------------------------------------------------------------------------------------
# The real compiler: the interpreter accepts things NVIDIA's pipeline rejects (tl.dot sizes, ...).
# --------------------------------------------------------------------------------------------------
def test_kernels_compile_for_sm90():
    require(importlib.util.find_spec("triton.backends.nvidia.compiler") is not None,
            "triton's NVIDIA backend (the test extra's triton==3.6.* wheel has it)")
    ptxas = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    require(ptxas.exists() or shutil.which("ptxas") is not None, "ptxas (triton's wheel carries it) to compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Two halves at once, one a core (the whole took about a minute of CI's ten).
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_kernel_check.py"), "--compile-only",
                               "--shard", f"{i}/2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 240
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:  # a timeout must not leave a compile running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:] + err[-4000:]
    proc = types.SimpleNamespace(stdout="".join(out for out, _ in outputs))
    assert all(f"shard {i}/2 compiled for sm_90" in proc.stdout for i in range(2)), proc.stdout[-4000:]
    # ptxas -v's registers and spilled bytes are read for each kernel (the GPU session reads them beside the
    # tile timings): a number, never '?', where ptxas is present.
    usage = re.findall(r"^decode qwen3 blk16 +_paged_attention_kernel +\d+ +\d+ +\d+ +(\d+)/(\d+) ", proc.stdout, re.M)
    assert len(usage) == 1 and int(usage[0][0]) > 0, proc.stdout[-4000:]
