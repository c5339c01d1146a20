"""Triton kernels for the `triton` attention backend: KV-cache store and paged attention.

Layouts (all strides are passed explicitly, so views such as q/k/v split from a packed qkv work):
  q, out           [num_tokens, num_heads, head_dim]      flat variable-length batch
  k, v (new)       [num_tokens, num_kv_heads, head_dim]
  k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]
  block_tables     [num_seqs, max_blocks] int32           physical block of each logical block
  cu_seqlens_q     [num_seqs + 1]                         sequence i owns q rows cu[i]:cu[i+1]
  context_lens     [num_seqs]                             keys of sequence i, its new tokens included

This module imports triton at import time and decorates its kernels then: on CPU, set
TRITON_INTERPRET=1 *before* importing it (triton reads the variable when a kernel is decorated).
Nothing here queries CUDA unless the tensors are on a CUDA device.

Paged attention is one kernel for every case (decode, prefill, prefill over a cached prefix, chunks,
mixed batches). Its grid is (query tiles, kv heads, kv splits):
  * a query tile holds TOKENS_PER_TILE consecutive query tokens of one sequence times the GQA ratio
    G = num_heads // num_kv_heads query heads sharing one KV head, i.e. BLOCK_M >= 16 rows with
    row r = (token r // G, head r % G); unused rows are masked. So K/V are read once per KV head
    and every tl.dot has M >= 16 even for decode with G = 1.
  * query tile slots are laid out as in a ragged batch: sequence i's tiles start at
    cu_seqlens_q[i] // TOKENS_PER_TILE + i, which needs no host sync; each program finds its
    sequence by a binary search over cu_seqlens_q, and slots past a sequence's last tile exit.
  * with num_kv_splits > 1 each program covers one slice of the visible key range and writes a
    normalised partial output plus its log-sum-exp; a small reduction kernel merges the splits.
Rows with no visible keys (context_len 0: padding lanes) are written as zeros, never NaN.

Interpreter (CPU) notes: its bf16 tl.dot is wrong, so bf16 inputs on CPU are upcast to fp32 before
the dots (UPCAST); its fp32 -> bf16 cast truncates where the GPU rounds to nearest; loop bounds loaded
from memory need numpy < 2.4. fp32 is the CPU dtype the engine uses.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from engine_service import pdl
from engine_service.attention import FP8_KV_DTYPE, next_pow2, to_kv_cache
from engine_service.attention.base import longest_first

__all__ = ["store_kvcache", "paged_attention", "default_num_kv_splits", "tune_decode_tile", "tune_prefill_tile",
           "prefill_tuning_blocks", "spread_lengths", "decode_order_pays", "decode_order_timings"]

_LOG2E = 1.4426950408889634

# Tiles: (BLOCK_N keys per inner iteration, num_stages of software pipelining of the K/V loads, num_warps,
# heads_first). The interpreter ignores stages and warps. BLOCK_N 64 keeps a head_dim-128 bf16 K+V tile at
# 32 KiB per stage. heads_first 1 puts the KV heads on the grid's fastest axis, so the programs of one
# sequence's heads run side by side and together read whole [block_size, kv_heads, head_dim] cache blocks
# (each alone reads head_dim-wide rows kv_heads * head_dim apart); 0 puts the query tiles there.
# Decode steps (max_seqlen_q == 1) use the tile tune_decode_tile picked for their shapes and device, at
# engine start-up, among DECODE_TILES; the first is the default where nothing was timed.
Tile = tuple[int, int, int, int]
DECODE_TILES: tuple[Tile, ...] = (
    (64, 2, 4, 0), (64, 3, 4, 0), (128, 2, 4, 0), (128, 2, 8, 0), (32, 3, 4, 0), (64, 2, 4, 1), (128, 2, 4, 1),
)
# Prefill tiles: (BLOCK_M query rows per program, BLOCK_N, num_stages, num_warps); KV heads never first. Prefill
# steps in bf16/fp16 use the one tune_prefill_tile picked at start-up among these; the first (64 rows and
# PREFILL_TILE) is the default. 128 rows over 8 warps halve the K/V loads per query row, yet on the H200
# (2026-11-30, 8,192 tokens of 512-token prompts) (64, 32, 3, 4) was fastest, 20-25% under the default.
PrefillTile = tuple[int, int, int, int]
PREFILL_TILES: tuple[PrefillTile, ...] = (
    (64, 64, 2, 4), (128, 64, 2, 8), (128, 64, 3, 8), (128, 128, 2, 8), (64, 32, 3, 4),
)
PREFILL_TILE: Tile = (*PREFILL_TILES[0][1:], 0)  # the default prefill tile as a Tile (BLOCK_N, stages, warps, 0)
# "BLOCK_M,BLOCK_N,num_stages,num_warps": pin the prefill tile, no timing.
PREFILL_TILE_ENV = "LLMSERVE_PREFILL_TILE"
_prefill_tiles: dict[tuple, PrefillTile] = {}  # _tile_key(...) -> the tile prefill steps use
# float32 ("ieee" dots) holds twice the bytes per element: at PREFILL_TILE a 64-row x head_dim-128 tile spills
# ~30 KB per thread (a 9 KB stack frame) and takes ptxas 6-35 s per variant; half the keys over twice the
# warps spills ~1 KB and compiles in ~1 s (sm_90, measured with ptxas -v). Only tests run float32 on CUDA.
FP32_PREFILL_TILE: Tile = (32, 2, 8, 0)
# "BLOCK_N,num_stages,num_warps[,heads_first]": pin a decode tile, no timing.
DECODE_TILE_ENV = "LLMSERVE_DECODE_TILE"
_decode_tiles: dict[tuple, Tile] = {}  # _tile_key(...) -> the tile decode steps use
# _tile_key(...) -> (microseconds launched longest first, in batch order) with the picked tile, as the start-up
# tuner timed them; where batch order was faster, decode steps with those shapes ignore their seq_order.
_decode_order_timings: dict[tuple, tuple[float, float]] = {}
_PREFILL_BLOCK_M = 64  # query rows per program (tokens x GQA) when queries are long
_MIN_DOT = 16  # NVIDIA's compiler rejects tl.dot with an inner size under 16; M, N >= 16 for mma too
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third axes
_MAX_KV_SPLITS = 16


# --------------------------------------------------------------------------------------------------
# KV store
# --------------------------------------------------------------------------------------------------
@triton.jit
def _round_to_e4m3(x):
    """x rounded to float8 e4m3 as torch's x.clamp(-448, 448).to(torch.float8_e4m3fn) rounds it: to nearest,
    ties to even, saturating at +-448, the sign of zero kept. The rounding is done in float32 arithmetic (exact:
    scaling by powers of two and the 2**23 trick), so that the cast only meets values e4m3 holds exactly: the
    interpreter's own cast rounds some values differently from the hardware's."""
    xf = x.to(tl.float32)
    a = tl.abs(xf)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # below 2**-6: subnormals, 2**-9 apart
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e-3): 3 mantissa bits
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.minimum(((a * inv_step + 8388608.0) - 8388608.0) * step, 448.0)  # + - 2**23 rounds to nearest even
    sign = xf.to(tl.int32, bitcast=True) & -2147483648
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    # NaN becomes e4m3's NaN, 0x7f (the interpreter's cast of a NaN gives a finite value).
    bits = tl.where(a == a, r.to(tl.float8e4nv).to(tl.uint8, bitcast=True), 0x7F).to(tl.uint8)
    return bits.to(tl.float8e4nv, bitcast=True)


@triton.jit
def to_cache_type(x, CACHE_TY: tl.constexpr):
    """x as the KV cache holds it: rounded to e4m3 for an fp8 cache (_round_to_e4m3), else cast."""
    if CACHE_TY == tl.float8e4nv:
        return _round_to_e4m3(x)
    return x.to(CACHE_TY)


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # One program per token: copies its [num_kv_heads, head_dim] K and V rows into the cache slot.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = slot >= 0  # slot -1: padding lane, write nothing
    slot = tl.maximum(slot, 0)  # keep even the masked addresses inside the cache
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & valid
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs
    tl.store(kc + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd,
             to_cache_type(k, k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd,
             to_cache_type(v, v_cache_ptr.dtype.element_ty), mask=mask)


class _Launch(NamedTuple):
    """One kernel launch: kernel[grid](*args, **constexprs, **options)."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def _plan_store_kvcache(k, v, k_cache, v_cache, slot_mapping) -> list[_Launch]:
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match k {tuple(k.shape)}")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return []
    return [_Launch(
        _store_kvcache_kernel, (num_tokens,),
        (k, v, k_cache, v_cache, slot_mapping,
         *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride()),
        dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=next_pow2(num_kv_heads),
             D_PAD=next_pow2(head_dim), BLOCK_SIZE=k_cache.shape[1]),
        dict(num_warps=1 if num_kv_heads * head_dim <= 256 else 4),
    )]


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write new K/V rows into the paged cache.

    k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping: [num_tokens] int32/int64, slot = block_id * block_size + offset; slot -1 is skipped.
    """
    for launch in _plan_store_kvcache(k, v, k_cache, v_cache, slot_mapping):
        launch.run()


# --------------------------------------------------------------------------------------------------
# Paged attention
# --------------------------------------------------------------------------------------------------
# Integer arguments that change from step to step are not specialised: triton would otherwise compile a
# variant for each of "== 1", "divisible by 16" and neither, the first time a step met it, inside that step.
@triton.jit(do_not_specialize=["num_seqs", "search_iters", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    cu_q_ptr, ctx_ptr, bt_ptr, order_ptr,
    scale_log2,  # softmax scale * log2(e): the softmax runs in base 2
    num_seqs, search_iters,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    stride_pt, stride_ph, stride_ps,  # partial outputs [num_tokens, num_heads, splits, D_PAD] (d stride 1)
    stride_lt, stride_lh, stride_ls,  # partial lse [num_tokens, num_heads, splits]
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    GQA: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # query rows per program, >= 16, >= GQA
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // GQA
    BLOCK_N: tl.constexpr,  # keys per inner iteration, >= 16
    NUM_SPLITS: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no TF32 on GPU), "tf32" (ignored) otherwise
    UPCAST: tl.constexpr,  # compute the dots in fp32: bf16 under the interpreter, whose bf16 tl.dot is wrong
    HEADS_FIRST: tl.constexpr,  # grid (kv heads, query tiles, splits) instead of (query tiles, kv heads, splits)
    ORDERED: tl.constexpr,  # decode: tile slot i is sequence order_ptr[i]'s one query token (no search)
    PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        pid_tile = tl.program_id(1)
    else:
        pid_tile = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)

    if ORDERED:
        # Decode (at most one query token per sequence): slot i is the order's i-th sequence, so programs are
        # dispatched in that order (longest context first: no long sequence starts in the last wave).
        seq = tl.load(order_ptr + pid_tile)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        tok0 = pid_tile * 0
    else:
        # ---- which sequence owns this tile slot: the largest i with cu_q[i] // T + i <= pid_tile.
        # Fixed iteration count (ceil(log2(num_seqs))) passed from the host: no data-dependent loop.
        lo = pid_tile * 0
        hi = lo + num_seqs
        for _ in range(search_iters):
            mid = (lo + hi) // 2
            mid_start = tl.load(cu_q_ptr + mid) // TOKENS_PER_TILE + mid
            right = mid_start <= pid_tile
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        seq = lo
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        tok0 = (pid_tile - (q_start // TOKENS_PER_TILE + seq)) * TOKENS_PER_TILE
    if tok0 >= q_len:
        return  # spare slot of a ragged layout, or a sequence with no query token
    ctx_len = tl.load(ctx_ptr + seq)

    # ---- query rows: row r is token tok0 + r // GQA, head kvh * GQA + r % GQA.
    offs_m = tl.arange(0, BLOCK_M)
    tok = tok0 + offs_m // GQA  # [BLOCK_M] token index inside the sequence
    head = kvh * GQA + offs_m % GQA  # [BLOCK_M] query head
    row_ok = (offs_m < TOKENS_PER_TILE * GQA) & (tok < q_len)
    q_pos = ctx_len - q_len + tok  # [BLOCK_M] absolute position; sees keys 0..q_pos (causal)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)

    # ---- keys visible to the tile: [0, kv_end), kv_end = position of its last token + 1.
    last_tok = tl.minimum(tok0 + TOKENS_PER_TILE, q_len) - 1
    kv_end = tl.maximum(tl.minimum(ctx_len - q_len + last_tok + 1, ctx_len), 0)
    # This split's slice, in whole BLOCK_N tiles.
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    kv_lo = split * tiles_per_split * BLOCK_N
    kv_hi = tl.minimum(kv_lo + tiles_per_split * BLOCK_N, kv_end)

    # Online softmax state. m starts finite so that all-masked rows give p = 0 and alpha = 1, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start_n + offs_n0  # [BLOCK_N] key positions
        n_ok = offs_n < kv_hi
        # Block-table gather: physical block of each key (entries past the used ones are never read).
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        in_blk = offs_n % BLOCK_SIZE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + (blk * stride_kb + in_blk * stride_ks + kvh * stride_kh)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_cache_ptr + (blk * stride_vb + in_blk * stride_vs + kvh * stride_vh)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        if k_cache_ptr.dtype.element_ty != q_ptr.dtype.element_ty:  # an fp8 cache: read back in q's dtype
            if q_ptr.dtype.element_ty == tl.float64:  # the interpreter cannot cast e4m3 subnormals to float64
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N] fp32
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # rows without keys: acc = 0 -> zeros
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partial (normalised) output and its log2-sum-exp; an empty split writes lse = -inf.
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        p_row = part_out_ptr + row64 * stride_pt + head * stride_ph + split * stride_ps  # [BLOCK_M]
        tl.store(p_row[:, None] + offs_d[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse_ptr + row64 * stride_lt + head * stride_lh + split * stride_ls, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_ot, stride_oh, stride_od,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh, stride_ls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    # One program per (token, head): out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse).
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < NUM_SPLITS
    base = t * stride_pt + h * stride_ph
    lse = tl.load(part_lse_ptr + t * stride_lt + h * stride_lh + offs_s * stride_ls, mask=s_ok,
                  other=float("-inf"))  # [S_PAD] log2-sum-exp of each split
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight is 0
    w = tl.math.exp2(lse - m)  # [S_PAD]
    o = tl.load(part_out_ptr + base + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=s_ok[:, None] & (w[:, None] > 0.0), other=0.0)  # [S_PAD, D_PAD]
    den = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seqlen_q: int,
                          device: torch.device) -> int:
    """Split-KV heuristic, a function of the batch shape only (never of context lengths, which live on
    the device), so that a CUDA graph captured for a batch size can fix it.

    Prefill and mixed steps have many query tiles and use 1. Decode splits until about two waves of
    programs cover the SMs (132 on an H200): batch 256 x 8 KV heads needs none, batch 1 gets 16.
    On CPU (the interpreter) it is 1: more programs only cost time there.
    """
    if max_seqlen_q > 1 or device.type != "cuda":
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(_MAX_KV_SPLITS, -(-2 * _sm_count(device) // programs)))


def _tile_key(q: torch.Tensor, k_cache: torch.Tensor) -> tuple:
    """What a decode tile is chosen for: device, the query's and the cache's dtypes, query heads, and the cache's
    block size, KV heads and head_dim."""
    return (str(k_cache.device), q.dtype, k_cache.dtype, q.shape[1], *k_cache.shape[1:])


def decode_order_timings(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[float, float] | None:
    """(microseconds launched longest first, in batch order) of the tuner's batch with its tile for these
    shapes, or None where nothing was timed."""
    return _decode_order_timings.get(_tile_key(q, k_cache))


def decode_order_pays(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode steps of these shapes launch longest first: unless the start-up tuner found batch order
    faster with its tile (the prediction, 8-12% mid workload A, is a model's until the GPU check measures it)."""
    timed = decode_order_timings(q, k_cache)
    return timed is None or timed[0] <= timed[1]


def _plan_paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                          max_seqlen_q, out, num_kv_splits, tile=None, seq_order=None,
                          prefill_tile=None) -> list[_Launch]:
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, kd = k_cache.shape
    if kd != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.dtype == FP8_KV_DTYPE:
        raise ValueError("q is float8: queries are in the model's dtype, only the KV cache may be float8_e4m3fn")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8_KV_DTYPE):
        raise ValueError(f"caches in {k_cache.dtype}/{v_cache.dtype}: they must both hold q's dtype ({q.dtype}) "
                         f"or float8_e4m3fn")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("cu_seqlens_q must have num_seqs + 1 entries and block_tables num_seqs rows")
    if seq_order is not None:
        if max_seqlen_q != 1:
            raise ValueError(f"seq_order is for decode steps (max_seqlen_q 1), got max_seqlen_q {max_seqlen_q}")
        if seq_order.shape != (num_seqs,) or seq_order.dtype != torch.int32 or seq_order.device != q.device:
            raise ValueError(f"seq_order is {tuple(seq_order.shape)} {seq_order.dtype} on {seq_order.device}; "
                             f"expected ({num_seqs},) int32 on {q.device}, a permutation of the sequences")
    if num_tokens == 0 or num_seqs == 0:
        return []
    # The tuner's verdict on the order applies to the tuned tile; a caller naming its tile (the tuner's own timings,
    # the GPU check's launch-order table) gets the order it asked for.
    if seq_order is not None and tile is None and not decode_order_pays(q, k_cache):
        seq_order = None

    gqa = num_heads // num_kv_heads
    prefill_m = _PREFILL_BLOCK_M
    if tile is None and max_seqlen_q > 1:
        if q.dtype == torch.float32:
            tile = FP32_PREFILL_TILE
        else:
            prefill_m, *rest = prefill_tile or _prefill_tiles.get(_tile_key(q, k_cache), PREFILL_TILES[0])
            tile = (*rest, 0)
    # Rows per program: enough for max_seqlen_q tokens x GQA, at least 16 (tl.dot minimum), at most
    # the prefill tile's unless one token's heads alone need more.
    block_m = min(max(_MIN_DOT, next_pow2(max(1, max_seqlen_q) * gqa)), max(prefill_m, next_pow2(gqa)))
    tokens_per_tile = block_m // gqa
    d_pad = max(_MIN_DOT, next_pow2(head_dim))
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(num_seqs, num_kv_heads, max_seqlen_q, q.device)
    num_kv_splits = max(1, int(num_kv_splits))
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # interpreter: bf16 tl.dot is wrong
    dot_prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    if tile is None:
        tile = _decode_tiles.get(_tile_key(q, k_cache), DECODE_TILES[0])
    block_n, num_stages, num_warps, heads_first = tile
    ordered = seq_order is not None
    # Launched in an order, the KV heads go on the fastest axis whatever the tile says: otherwise the GPU starts
    # one KV head's programs for every sequence before the next head's, and the last head's longest sequences
    # still start in the last wave.
    heads_first = heads_first or ordered
    num_tiles = num_seqs if ordered else num_tokens // tokens_per_tile + num_seqs
    grid = (num_kv_heads, num_tiles, num_kv_splits) if heads_first else (num_tiles, num_kv_heads, num_kv_splits)
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(f"{grid[1]} programs on the grid's second axis exceed CUDA's {_MAX_GRID_Y}")

    if num_kv_splits > 1:
        # fp32 partials: normalised outputs [num_tokens, num_heads, splits, d_pad] and their
        # log2-sum-exp [num_tokens, num_heads, splits]. Allocated per call (inside a CUDA-graph
        # capture this comes from the graph's pool).
        part_out = torch.empty((num_tokens, num_heads, num_kv_splits, d_pad), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
        part_strides = (*part_out.stride()[:3], *part_lse.stride())
    else:
        part_out = part_lse = out  # unused
        part_strides = (0, 0, 0, 0, 0, 0)

    launches = [_Launch(
        _paged_attention_kernel, grid,
        (q, k_cache, v_cache, out, part_out, part_lse,
         cu_seqlens_q, context_lens, block_tables, seq_order if ordered else context_lens,
         float(scale) * _LOG2E,
         num_seqs, (num_seqs - 1).bit_length(),  # = ceil(log2(num_seqs)) binary-search steps
         *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
         block_tables.stride(0), *part_strides),
        dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, GQA=gqa, BLOCK_M=block_m,
             TOKENS_PER_TILE=tokens_per_tile, BLOCK_N=block_n, NUM_SPLITS=num_kv_splits, DOT_PREC=dot_prec,
             UPCAST=upcast, HEADS_FIRST=bool(heads_first), ORDERED=ordered),
        dict(num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs(q)),
    )]
    if num_kv_splits > 1:
        launches.append(_Launch(
            _merge_splits_kernel, (num_tokens, num_heads),
            (out, part_out, part_lse, *out.stride(), *part_strides),
            dict(HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_kv_splits, S_PAD=next_pow2(num_kv_splits)),
            dict(num_warps=2, **pdl.launch_kwargs(q)),
        ))
    return launches


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_seqlen_q: int, out: torch.Tensor | None = None,
                    num_kv_splits: int | None = None, tile: Tile | None = None,
                    seq_order: torch.Tensor | None = None, prefill_tile: PrefillTile | None = None) -> torch.Tensor:
    """Causal attention of flat variable-length queries over a paged KV cache.

    q: [num_tokens, num_heads, head_dim]; sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1]
    (cu_seqlens_q[-1] must not exceed num_tokens; rows past it belong to no sequence and are left unspecified).
    context_lens[i] counts sequence i's keys including its new tokens, whose K/V must already be in the
    cache; its query rows are its last q_len positions. block_tables: [num_seqs, max_blocks] (unused
    entries may hold anything). max_seqlen_q: the longest per-sequence query length; without seq_order it only
    sizes the tiles (any value gives correct results), with seq_order it must be exact (1: every sequence has
    at most one query token; only its first would be computed). num_kv_splits: KV-range splits per query tile (None: the
    default_num_kv_splits heuristic; fix it per captured batch size under CUDA graphs). tile: (BLOCK_N,
    num_stages, num_warps, heads_first) instead of the tuned or default one. seq_order: for decode steps
    (max_seqlen_q 1), a permutation of the sequences ([num_seqs] int32 on q's device) in which their programs
    are dispatched, all KV heads of one sequence side by side (heads_first is implied); longest_first(context
    lengths) gives each launch a short tail (a long sequence started in the last wave would run on alone). It
    changes no result. Without a tile, it is ignored where the start-up tuner found batch order faster for
    these shapes; with one, it is always followed. prefill_tile: (BLOCK_M, BLOCK_N, num_stages, num_warps) for a bf16/fp16 step with
    max_seqlen_q > 1 instead of the tuned or default one (tile, where given, wins, with 64 rows). Returns out
    [num_tokens, num_heads, head_dim] in q's dtype; a row with no keys (context_len 0) is zeros.
    """
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)}")
    for launch in _plan_paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                        max_seqlen_q, out, num_kv_splits, tile, seq_order, prefill_tile):
        launch.run()
    return out


def parse_prefill_tile(text: str) -> PrefillTile:
    """"BLOCK_M,BLOCK_N,num_stages,num_warps" -> a prefill tile; ValueError naming what a valid one looks like."""
    try:
        block_m, block_n, stages, warps = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{PREFILL_TILE_ENV}={text!r}: expected BLOCK_M,BLOCK_N,num_stages,num_warps, "
                         "e.g. 128,64,2,8") from None
    # BLOCK_M at most 128: start-up's warm-up compiles the query tiles up to that (ModelRunner.WARMUP_QUERY_LENS).
    if (min(block_m, block_n) < _MIN_DOT or block_m > 128 or block_m & (block_m - 1) or block_n & (block_n - 1)
            or stages < 1 or warps not in (1, 2, 4, 8, 16)):
        raise ValueError(f"{PREFILL_TILE_ENV}={text!r}: BLOCK_M must be a power of two from {_MIN_DOT} to 128, "
                         f"BLOCK_N one >= {_MIN_DOT}, num_stages >= 1 and num_warps a power of two up to 16")
    return block_m, block_n, stages, warps


def tune_prefill_tile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, tokens: int, prompt_len: int,
                      decode_rows: int = 0, decode_len: int = 512, q_dtype: torch.dtype | None = None, *,
                      iters: int = 5, timer=None, seed: int = 0
                      ) -> tuple[PrefillTile | None, dict[PrefillTile, float | str]]:
    """Time every PREFILL_TILES candidate on one prefill step over these caches and make the fastest the tile of
    prefill steps with these shapes on this device. Returns (the tile picked, or None when none passed and the
    default stays; {tile: microseconds per call, or why it was dropped}).

    The step, as a mixed step meets it: decode_rows sequences of one query token over decode_len keys, then
    prompts of prompt_len tokens with no cached prefix filling what is left of `tokens` (at least one), all in
    random distinct blocks of the caches, which get random K/V (call it before the caches hold anything; size
    them with prefill_tuning_blocks). A candidate's output is NaN-poisoned and must then agree with the default
    tile's (max |difference| within 2% of its largest value: only the order of the softmax's sums differs)
    before it is timed. With LLMSERVE_PREFILL_TILE set, that tile is used untimed. q_dtype: the model's (None:
    the caches', which differs for an fp8 cache).
    timer(fn, iters) -> microseconds; default CUDA events.
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    dtype = _query_dtype(q_dtype, k_cache)
    key = _tile_key(torch.empty((1, num_heads, head_dim), dtype=dtype, device="meta"), k_cache)
    pinned = os.environ.get(PREFILL_TILE_ENV)
    if pinned:
        _prefill_tiles[key] = tile = parse_prefill_tile(pinned)
        return tile, {}
    q_lens, ctx_lens = _prefill_tuning_step(tokens, prompt_len, decode_rows, decode_len)
    per_seq = [-(-c // block_size) for c in ctx_lens]
    if sum(per_seq) > num_blocks:
        raise ValueError(f"the tuning step needs {sum(per_seq)} blocks of the caches, which have {num_blocks}")
    gen = torch.Generator().manual_seed(seed)
    dev = k_cache.device
    used = torch.randperm(num_blocks, generator=gen)[: sum(per_seq)]
    tables = torch.zeros(len(q_lens), max(per_seq), dtype=torch.int32)
    for i, row in enumerate(used.split(per_seq)):
        tables[i, : len(row)] = row
    used = used.to(dev)
    on_dev = torch.Generator(device=dev).manual_seed(seed)  # ~90M values: drawn where they are used
    for cache in (k_cache, v_cache):
        drawn = to_kv_cache(torch.randn((used.numel(), *cache.shape[1:]), generator=on_dev, device=dev, dtype=dtype),
                            cache.dtype)
        if cache.dtype == FP8_KV_DTYPE:  # indexed writes need no float8 kernel as bytes
            cache, drawn = cache.view(torch.uint8), drawn.view(torch.uint8)
        cache[used] = drawn
    q = torch.randn((sum(q_lens), num_heads, head_dim), generator=on_dev, device=dev, dtype=dtype)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=dev)
    args = (q, k_cache, v_cache, cu, torch.tensor(ctx_lens, dtype=torch.int32, device=dev), tables.to(dev),
            head_dim ** -0.5, max(q_lens))
    want = paged_attention(*args, prefill_tile=PREFILL_TILES[0]).float()
    limit = 0.02 * float(want.abs().max()) + 1e-6
    out = torch.empty_like(q)
    timer = timer or _cuda_event_timer
    timings: dict[PrefillTile, float | str] = {}
    for tile in PREFILL_TILES:
        def call(tile=tile):
            paged_attention(*args, out=out, prefill_tile=tile)

        try:
            out.fill_(float("nan"))  # a tile that leaves rows unwritten must not pass on the last one's output
            call()  # compiles
            err = float((out.float() - want).abs().max())
            if not err <= limit:  # NaN fails too
                timings[tile] = f"differs from the default tile by {err:.3g}"
                continue
            timings[tile] = timer(call, iters)
        except Exception as exc:  # e.g. out of shared memory for this tile on this device: not a candidate
            timings[tile] = f"{type(exc).__name__}: {exc}"
    timed = {t: us for t, us in timings.items() if isinstance(us, float)}
    if not timed:
        return None, timings
    _prefill_tiles[key] = picked = min(timed, key=timed.get)
    return picked, timings


def _query_dtype(q_dtype: torch.dtype | None, k_cache: torch.Tensor) -> torch.dtype:
    """A tuner's query dtype: the model's, which an fp8 cache cannot stand for."""
    if q_dtype is None and k_cache.dtype == FP8_KV_DTYPE:
        raise ValueError("the cache is float8_e4m3fn: pass q_dtype, the model's dtype the engine's queries have")
    return q_dtype or k_cache.dtype


def _prefill_tuning_step(tokens: int, prompt_len: int, decode_rows: int, decode_len: int
                         ) -> tuple[list[int], list[int]]:
    """(query lengths, context lengths) of tune_prefill_tile's step: the decode rows first, then whole prompts."""
    if min(tokens, prompt_len) < 1 or decode_rows < 0 or (decode_rows and decode_len < 1):
        raise ValueError(f"tokens {tokens} and prompt_len {prompt_len} must be >= 1, decode_rows {decode_rows} >= 0 "
                         f"and decode_len {decode_len} >= 1")
    decode_rows = min(decode_rows, tokens - 1)  # room for one prompt token at least
    prompts = max(1, (tokens - decode_rows) // prompt_len)
    length = min(prompt_len, tokens - decode_rows)
    return [1] * decode_rows + [length] * prompts, [decode_len] * decode_rows + [length] * prompts


def prefill_tuning_blocks(tokens: int, prompt_len: int, decode_rows: int, decode_len: int, block_size: int) -> int:
    """Cache blocks tune_prefill_tile's step uses."""
    _, ctx_lens = _prefill_tuning_step(tokens, prompt_len, decode_rows, decode_len)
    return sum(-(-c // block_size) for c in ctx_lens)


def parse_tile(text: str) -> Tile:
    """"BLOCK_N,num_stages,num_warps[,heads_first]" -> a tile; ValueError naming what a valid one looks like."""
    try:
        values = [int(x) for x in text.split(",")]
        if len(values) == 3:
            values.append(0)
        block_n, stages, warps, heads_first = values
    except ValueError:
        raise ValueError(f"{DECODE_TILE_ENV}={text!r}: expected BLOCK_N,num_stages,num_warps[,heads_first], "
                         "e.g. 64,2,4 or 64,2,4,1") from None
    if (block_n < _MIN_DOT or block_n & (block_n - 1) or stages < 1 or warps not in (1, 2, 4, 8, 16)
            or heads_first not in (0, 1)):
        raise ValueError(f"{DECODE_TILE_ENV}={text!r}: BLOCK_N must be a power of two >= {_MIN_DOT}, "
                         "num_stages >= 1, num_warps a power of two up to 16 and heads_first 0 or 1")
    return block_n, stages, warps, heads_first


def _cuda_event_timer(fn, iters: int) -> float:
    """Mean microseconds per call of fn on the current CUDA stream (fn has already run once)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def spread_lengths(batch: int, mean: int, gen: torch.Generator) -> list[int]:
    """`batch` context lengths spread evenly from about mean/8 to 15*mean/8, in a random order. They average
    `mean` up to rounding, unless the floor of 1 key lifts the shortest (tiny means only)."""
    if batch == 1:
        return [mean]
    step = 1.75 * mean / (batch - 1)
    lens = [max(1, round(mean + (i - (batch - 1) / 2) * step)) for i in range(batch)]
    return [lens[i] for i in torch.randperm(batch, generator=gen).tolist()]


def tune_decode_tile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, batch: int, context_len: int,
                     q_dtype: torch.dtype | None = None, *, iters: int = 20, timer=None, seed: int = 0
                     ) -> tuple[Tile | None, dict[Tile, float | None]]:
    """Time every DECODE_TILES candidate on one decode batch over these caches and make the fastest the tile
    of decode steps with these shapes on this device. Returns (the tile picked, or None when no candidate ran
    and the default stays; {tile: microseconds per call, or None where it failed to compile or launch}).

    The batch: `batch` sequences of context_len keys on average, spread evenly from an eighth of it to 15/8 of
    it in a random order (as decode steps meet them: the kernel's tail depends on the spread), in random blocks
    of the caches, launched longest first as the engine's decode steps are. The picked tile is then timed in
    batch order too, KV heads first and second (decode_order_timings): where either is faster, decode steps of
    these shapes keep batch order, with the faster one.
    It only reads the caches (what they hold does not change the timing). With LLMSERVE_DECODE_TILE set, that
    tile is used untimed, launched longest first. q_dtype: the model's (None: the caches').
    timer(fn, iters) -> microseconds; default CUDA events.
    """
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    q = torch.zeros((batch, num_heads, head_dim), dtype=_query_dtype(q_dtype, k_cache), device=k_cache.device)
    key = _tile_key(q, k_cache)
    _decode_order_timings.pop(key, None)  # the candidates are timed launched in order
    pinned = os.environ.get(DECODE_TILE_ENV)
    if pinned:
        tile = parse_tile(pinned)
        _decode_tiles[key] = tile
        return tile, {}
    gen = torch.Generator().manual_seed(seed)
    lens = spread_lengths(batch, context_len, gen)
    tables = torch.randint(0, k_cache.shape[0], (batch, -(-max(lens) // block_size)), generator=gen,
                           dtype=torch.int32)
    order = longest_first(lens)
    args = (q, k_cache, v_cache, torch.arange(batch + 1, dtype=torch.int32, device=q.device),
            torch.tensor(lens, dtype=torch.int32, device=q.device), tables.to(q.device), head_dim ** -0.5, 1)
    order_t = torch.tensor(order, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    timer = timer or _cuda_event_timer
    timings: dict[Tile, float | None] = {}
    for tile in DECODE_TILES:
        def call(tile=tile):
            paged_attention(*args, out=out, tile=tile, seq_order=order_t)

        try:
            call()  # compiles
            timings[tile] = timer(call, iters)
        except Exception:  # e.g. out of shared memory for this tile on this device: not a candidate
            timings[tile] = None
    timed = {t: us for t, us in timings.items() if us is not None}
    if not timed:
        return None, timings
    _decode_tiles[key] = picked = min(timed, key=timed.get)
    # The same tile in batch order, with the KV heads first and second (launched in order they are always first,
    # so the pick's heads_first is a coin toss between equal timings): decode steps keep the order only where it
    # pays, and in batch order use the faster of the two.
    in_batch_order: dict[Tile, float] = {}
    for tile in (picked[:3] + (0,), picked[:3] + (1,)):
        def call(tile=tile):
            paged_attention(*args, out=out, tile=tile)

        try:
            call()  # compiles this variant (no order), outside the timing
            in_batch_order[tile] = timer(call, iters)
        except Exception:  # it ran in order a moment ago: keep the order
            return picked, timings
    best = min(in_batch_order, key=in_batch_order.get)
    _decode_order_timings[key] = (timed[picked], in_batch_order[best])
    if in_batch_order[best] < timed[picked]:
        _decode_tiles[key] = picked = best
    return picked, timings
