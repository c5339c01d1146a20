"""A Triton kernel that samples one token per row straight from the logits: temperature, softmax and the
inverse-CDF draw in two passes over the row.

The torch path of Sampler._sample materialises float32 copies of the logits for the division, the softmax
and the cumulative sum: at a batch of 256 over Qwen3's 151,936-token vocabulary that is about 1.2 GB of
memory traffic a step, some 0.3 ms of an H200's time. This kernel reads the (bf16) logits twice and writes one
integer per row. Sampler uses it on CUDA for rows without top-k, top-p or min-p filters.

The draw is the same as the torch path's: with p_i = softmax(logits / T)_i and one uniform u per row, the
token is the first i whose cumulative sum exceeds u times the row's total. Summation order differs from
torch's cumsum, so a u within rounding distance of a boundary may pick the neighbouring token; the token
always has positive probability (a row whose running sum never passes the target, by rounding, takes its
last token of positive probability).

Imports triton at import time: import this module lazily (on CPU, under TRITON_INTERPRET=1 only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocabulary entries per inner iteration: 16 KiB of bf16 in flight per program, so that one program per row
# keeps enough loads outstanding to stream the row near the memory's rate (one row per SM or two at batch 256).
BLOCK_V = 8192
NUM_WARPS = 8


@triton.jit
def _sample_kernel(
    logits_ptr, inv_temp_ptr, u_ptr, out_ptr,
    vocab, stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    scale = tl.load(inv_temp_ptr + row) * 1.4426950408889634  # log2(e): the softmax runs in base 2
    offs = tl.arange(0, BLOCK)

    # Pass 1: the row's max and the sum of 2^(x * scale - max), online. The running max starts at a finite
    # floor, so a lane that has seen only banned (-inf) entries gives 2^(-inf) = 0, never inf - inf.
    m = tl.full([BLOCK], -1.0e30, tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, x)
        acc = acc * tl.math.exp2(m - m_new) + tl.math.exp2(x - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    total = tl.sum(acc * tl.math.exp2(m - row_max), 0)
    target = tl.load(u_ptr + row) * total

    # Pass 2: the first index whose running sum exceeds the target; the last positive one as a fallback.
    running = total * 0.0
    token = vocab * 0 + vocab  # "not found yet"
    last_positive = vocab * 0
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32) * scale
        p = tl.math.exp2(x - row_max)
        cdf = running + tl.cumsum(p, 0)
        hit = (cdf > target) & (p > 0.0)
        token = tl.minimum(token, tl.min(tl.where(hit, idx, vocab), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(p > 0.0, idx, 0), 0))
        running += tl.sum(p, 0)
    token = tl.where(token < vocab, token, last_positive)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_rows(logits: torch.Tensor, inv_temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [n, V] (any float dtype; the last dimension contiguous), drawn from
    softmax(logits * inv_temperature[:, None]) at the uniforms u [n] in [0, 1). Returns [n] int64."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    if n:
        _sample_kernel[(n,)](logits, inv_temperature.float().contiguous(), u.float().contiguous(), out,
                             vocab, logits.stride(0), BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return out


def midpoint_draws(logits: torch.Tensor, inv_temperature: torch.Tensor, generator: torch.Generator,
                   min_prob: float = 1e-3) -> tuple[list[int], torch.Tensor]:
    """For checking sample_rows (CPU tensors in, CPU out): per row, a random token of probability >= min_prob
    and the uniform at the middle of its cdf interval, computed in float64. sample_rows must draw exactly
    those tokens: rounding in another summation order moves a boundary by far less than half an interval."""
    probs = torch.softmax(logits.double() * inv_temperature.double()[:, None], dim=-1)
    cdf = probs.cumsum(-1)
    tokens, u = [], []
    for row in range(logits.shape[0]):
        candidates = (probs[row] >= min_prob).nonzero()[:, 0]
        i = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
        before = float(cdf[row, i - 1]) if i else 0.0
        tokens.append(i)
        u.append((before + float(cdf[row, i])) / 2 / float(cdf[row, -1]))
    return tokens, torch.tensor(u)
