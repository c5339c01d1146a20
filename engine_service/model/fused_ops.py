"""Fused elementwise kernels (Triton) for the model's layers: one launch where eager torch takes several.

In eager torch a Qwen3 layer launches some 46 small elementwise kernels (each RMSNorm eight: casts, pow,
mean, add, rsqrt, two multiplies; RoPE five per tensor; SiLU and its product; two residual adds) beside its
four GEMMs and its attention. On a GPU each costs a few microseconds even inside a CUDA graph, which over 28
layers is milliseconds a decode step. These kernels do the same work in four launches a layer:

- `add_rms_norm`: the residual add (when given) and RMSNorm of each row;
- `qk_norm_rope`: q-norm and k-norm (Qwen3; the other families have none) and rotary embedding of every query
  and key head, read straight out of the packed q/k/v projection; for the triton attention backend it also
  writes K and V into their KV-cache slots (the KV store's launch);
- `silu_and_mul`: SiLU of the gate times the up projection.

Each rounds where the torch reference rounds (model dtype after the residual add, after the normalisation,
after the weight; each RoPE product and their sum; SiLU and its product), computing in float32 between. What
differs from the reference is the order of a row's sum of squares and the float32 exp (an approximate
instruction here): a rare one-unit difference in the model dtype. Never float64: the engine keeps torch's
ops there (float64 runs are for exactness). They run on CUDA, or on CPU under
TRITON_INTERPRET=1 (tests). This module imports triton: import it only where fused ops are on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from engine_service import pdl
from engine_service.attention import FP8_KV_DTYPE, next_pow2
from engine_service.attention.triton_kernels import to_cache_type

ROW_WARPS = 4


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_res, stride_out, stride_sum,
    n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream, in the model dtype
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (RMSNorm(s) * weight, s) with s = x + residual (or x when residual is None)."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_rms_norm needs unit column strides in x and residual")
    # Shapes too: the kernel reads h columns of every row of each, and would read past a smaller one.
    if x.dim() != 2 or weight.shape != x.shape[1:] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"add_rms_norm takes x [T, H], weight [H] and residual [T, H]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}"
                         f"{f', residual {tuple(residual.shape)}' if residual is not None else ''}")
    t, h = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    if t:
        res = residual if residual is not None else x
        _add_rms_norm_kernel[(t,)](
            x, res, weight, out, total,
            x.stride(0), res.stride(0), out.stride(0), total.stride(0),
            h, eps,
            HAS_RES=residual is not None, BLOCK=next_pow2(h), num_warps=ROW_WARPS, **pdl.launch_kwargs(x),
        )
    return out, total


@triton.jit
def _norm_rope_heads(in_ptr, num_heads, w_ptr, c1, c2, s1, s2, out_ptr, out_head_stride, eps,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, H_PAD: tl.constexpr, NORM: tl.constexpr):
    """num_heads consecutive heads of head_dim = 2 * HALF values from in_ptr: RMSNorm * weight (NORM), then the
    rotation by one token's cos/sin halves (c1, c2, s1, s2: [1, BLOCK_HALF] float32), rounded as torch; head h
    goes to out_ptr + h * out_head_stride."""
    heads = tl.arange(0, H_PAD)[:, None]
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    m = (heads < num_heads) & (offs < HALF)
    src = in_ptr + heads * (2 * HALF) + offs
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    dt = x1.dtype
    h1 = x1.to(tl.float32)
    h2 = x2.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(h1 * h1, axis=1) + tl.sum(h2 * h2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        y1 = (w1 * (h1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2 * (h2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    else:
        y1 = h1
        y2 = h2
    # rotate_half(y) = [-y2, y1]; out = y * cos + rotate_half(y) * sin, each product rounded, then the sum.
    o1 = (y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)
    o2 = (y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)
    dst = out_ptr + heads * out_head_stride + offs
    # Rounded to the model dtype first, as the unfused path's K is before its store: an fp8 cache gets the same bits.
    tl.store(dst, to_cache_type(o1.to(dt), out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, to_cache_type(o2.to(dt), out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qkv, stride_cos, stride_sin, eps,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, NORM: tl.constexpr, STORE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    # Two programs per token, over every head of its packed row (q heads, then k heads, then v heads, side by
    # side): program 0 the q heads, program 1 the k heads (and v, when storing). A head a program left thousands
    # of one-warp programs a layer (4.5 us a decode step's layer on the H200); one a token, a single program
    # for a batch of one.
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    row = qkv_ptr + tok * stride_qkv
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    m = offs < HALF
    c1 = tl.load(cos_ptr + tok * stride_cos + offs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * stride_cos + HALF + offs, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * stride_sin + offs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * stride_sin + HALF + offs, mask=m, other=0.0).to(tl.float32)
    if part == 0:
        _norm_rope_heads(row, NUM_Q, qw_ptr, c1, c2, s1, s2, q_out_ptr + tok * NUM_Q * (2 * HALF), 2 * HALF, eps,
                         HALF, BLOCK_HALF, Q_PAD, NORM)
        return
    k_src = row + NUM_Q * (2 * HALF)
    if STORE:
        # K and V go straight into their cache slot (as store_kvcache would put them); slot -1 (a padding lane)
        # writes nothing.
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            _norm_rope_heads(k_src, NUM_KV, kw_ptr, c1, c2, s1, s2,
                             k_cache_ptr + blk * stride_kcb + off * stride_kcs, stride_kch, eps,
                             HALF, BLOCK_HALF, KV_PAD, NORM)
            heads = tl.arange(0, KV_PAD)[:, None]
            vm = (heads < NUM_KV) & m
            v_src = k_src + NUM_KV * (2 * HALF) + heads * (2 * HALF) + offs
            v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + heads * stride_vch + offs
            cache_ty = v_cache_ptr.dtype.element_ty
            tl.store(v_dst, to_cache_type(tl.load(v_src, mask=vm), cache_ty), mask=vm)
            tl.store(v_dst + HALF, to_cache_type(tl.load(v_src + HALF, mask=vm), cache_ty), mask=vm)
    else:
        _norm_rope_heads(k_src, NUM_KV, kw_ptr, c1, c2, s1, s2, k_out_ptr + tok * NUM_KV * (2 * HALF), 2 * HALF,
                         eps, HALF, BLOCK_HALF, KV_PAD, NORM)


def qk_norm_rope(qkv: torch.Tensor, num_q: int, num_kv: int, head_dim: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """qkv: [T, (num_q + 2 num_kv) * head_dim], rows packed q|k|v; cos, sin: [T, head_dim] (any row stride,
    unit column stride) -> q [T, num_q, head_dim], k [T, num_kv, head_dim], normalised (unless the weights are
    None: the families without q/k-norm) and rotated.

    cache: (k_cache, v_cache, slot_mapping) with caches [num_blocks, block_size, num_kv, head_dim] (head_dim
    contiguous) in qkv's dtype or float8 e4m3 (attention.to_kv_cache's rounding): k and v are written into their slots instead (slot -1 skipped), as
    attention.triton_kernels.store_kvcache would, and the k returned is None. One launch a layer less."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope takes both norm weights or neither")
    t = qkv.shape[0]
    if head_dim % 2:
        raise ValueError(f"qk_norm_rope needs an even head_dim, got {head_dim}")
    # Shapes too: the kernel reads each row's heads, cos/sin's rows and the weights at these sizes, past the end
    # of a smaller tensor.
    width = (num_q + 2 * num_kv) * head_dim
    weights_fit = q_weight is None or (q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,))
    if qkv.dim() != 2 or qkv.shape[1] != width or cos.shape != (t, head_dim) or sin.shape != (t, head_dim) \
            or not weights_fit:
        raise ValueError(f"qk_norm_rope takes qkv [T, {width}] ({num_q} + 2 x {num_kv} heads of {head_dim}), cos "
                         f"and sin [T, {head_dim}] and norm weights [{head_dim}]; got qkv {tuple(qkv.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}"
                         f"{'' if q_weight is None else f', weights {tuple(q_weight.shape)}/{tuple(k_weight.shape)}'}")
    if qkv.stride(1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("qk_norm_rope needs unit column strides in qkv, cos and sin")
    q = torch.empty(t, num_q, head_dim, dtype=qkv.dtype, device=qkv.device)
    if cache is None:
        k = torch.empty(t, num_kv, head_dim, dtype=qkv.dtype, device=qkv.device)
        k_cache = v_cache = slots = q  # unused (STORE off)
        cache_strides = (0,) * 6
        block_size = 1
    else:
        k_cache, v_cache, slots = cache
        k = None
        if (k_cache.shape != v_cache.shape or k_cache.shape[2:] != (num_kv, head_dim) or k_cache.stride(3) != 1
                or v_cache.stride(3) != 1 or k_cache.dtype != v_cache.dtype
                or k_cache.dtype not in (qkv.dtype, FP8_KV_DTYPE)):
            raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} ({k_cache.dtype}) do not take "
                             f"{num_kv} heads of {head_dim} in {qkv.dtype} or float8_e4m3fn")
        if slots.shape != (t,):
            raise ValueError(f"slot_mapping has shape {tuple(slots.shape)} for {t} tokens")
        cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
        block_size = k_cache.shape[1]
    if t:
        half = head_dim // 2
        block_half = next_pow2(half)
        q_pad = next_pow2(num_q)
        _qk_norm_rope_kernel[(t, 2)](
            qkv, qkv if q_weight is None else q_weight, qkv if k_weight is None else k_weight, cos, sin, q,
            q if k is None else k, k_cache, v_cache, slots,
            qkv.stride(0), cos.stride(0), sin.stride(0), eps, *cache_strides,
            NUM_Q=num_q, NUM_KV=num_kv, HALF=half, BLOCK_HALF=block_half, Q_PAD=q_pad,
            KV_PAD=next_pow2(num_kv), NORM=q_weight is not None, STORE=cache is not None,
            BLOCK_SIZE=block_size, num_warps=4 if q_pad * block_half <= 2048 else 8, **pdl.launch_kwargs(qkv),
        )
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = tl.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 I] (gate | up) -> silu(gate) * up: [T, I]."""
    if x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even width with unit column stride, got {tuple(x.shape)}")
    t, two_i = x.shape
    n = two_i // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        block = min(SILU_BLOCK, next_pow2(n))
        _silu_and_mul_kernel[(t, -(-n // block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=ROW_WARPS, **pdl.launch_kwargs(x),
        )
    return out
