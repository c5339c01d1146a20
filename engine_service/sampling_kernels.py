"""Triton kernels that sample one token per row straight from the logits: temperature, softmax and the
inverse-CDF draw, in two launches that read a row about 1.1 times.

The torch path of Sampler._sample materialises float32 copies of the logits for the division, the softmax
and the cumulative sum: at a batch of 256 over Qwen3's 151,936-token vocabulary that is about 1.2 GB of
memory traffic a step, some 0.3 ms of an H200's time. Here each row is cut into chunks of BLOCK_V entries:
  1. _chunk_stats_kernel, one program per (row, chunk): the chunk's raw max and its sum of exponentials (and,
     when asked, how many of its raw logits are NaN or infinite), so a row is spread over ~19 programs;
  2. _chunk_pick_kernel, one program per row: from the chunks' figures, the chunk where the row's cumulative
     sum passes u times the row's total, then a scan of that chunk only for the token.
A single program streaming a whole row twice (the previous kernel) kept too few loads in flight: 78 us a step
at 216 rows on the H200, where the bytes take about 16.

The draw is the same as the torch path's: with p_i = softmax(logits / T)_i and one uniform u per row, the
token is the first i whose cumulative sum exceeds u times the row's total. Summation order differs from
torch's cumsum, so a u within rounding distance of a boundary may pick the neighbouring token; the token
always has positive probability (when the winning chunk's scan never passes the target, by rounding, it takes
the chunk's last token of positive probability). The chunk size is fixed, not chosen per batch size, so a
seeded request draws the same token whatever else shares its step.

Imports triton at import time: import this module lazily (on CPU, under TRITON_INTERPRET=1 only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine_service.attention import next_pow2

# Vocabulary entries per program: 16 KiB of bf16 loaded at once, 19 programs a row over Qwen3's vocabulary.
BLOCK_V = 8192
NUM_WARPS = 8


@triton.jit
def _chunk_stats_kernel(
    logits_ptr, inv_temp_ptr, max_ptr, sum_ptr, bad_ptr,
    vocab, stride_row,
    BLOCK: tl.constexpr, CHECK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    idx = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = idx < vocab
    raw = tl.load(logits_ptr + row * stride_row + idx, mask=inside, other=-float("inf")).to(tl.float32)
    # The max of the raw logits, which are shifted by it before the temperature scales them: a large finite logit
    # times 1 / T overflowed to inf, and inf - inf made the row's sums NaN. A finite floor under it, so that a
    # chunk of only banned (-inf) entries sums 2^(-inf) = 0, not NaN.
    m = tl.maximum(tl.max(raw, 0), -1.0e30)
    at = row * num_chunks + chunk
    tl.store(max_ptr + at, m)
    scale = tl.load(inv_temp_ptr + row) * 1.4426950408889634
    tl.store(sum_ptr + at, tl.sum(tl.math.exp2((raw - m) * scale), 0))
    if CHECK:  # how many of the chunk's raw logits are NaN or infinite (a float32 sum of them, the check before,
        # overflowed on large finite logits); NaN compares false, so it is counted with the infinities
        tl.store(bad_ptr + at, tl.sum(tl.where(inside & ~(tl.abs(raw) < float("inf")), 1.0, 0.0), 0))


@triton.jit
def _chunk_pick_kernel(
    logits_ptr, inv_temp_ptr, u_ptr, max_ptr, sum_ptr, bad_ptr, out_ptr,
    vocab, stride_row, num_chunks,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr, CHECK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    valid = c < num_chunks
    at = row * num_chunks + c
    chunk_max = tl.load(max_ptr + at, mask=valid, other=-1.0e30)
    row_max = tl.max(chunk_max, 0)
    scale = tl.load(inv_temp_ptr + row) * 1.4426950408889634
    w = tl.load(sum_ptr + at, mask=valid, other=0.0) * tl.math.exp2((chunk_max - row_max) * scale)
    cum = tl.cumsum(w, 0)
    total = tl.sum(tl.where(c == num_chunks - 1, cum, 0.0), 0)  # the same rounding as cum's own prefixes
    target = tl.load(u_ptr + row) * total
    # The first chunk whose running sum passes the target; the last of positive mass where rounding put the
    # target at the total; chunk 0 for a row with no finite mass (NaN: any token inside the vocabulary).
    winner = tl.min(tl.where((cum > target) & (w > 0.0), c, CHUNKS), 0)
    winner = tl.where(winner < CHUNKS, winner, tl.maximum(tl.max(tl.where(w > 0.0, c, -1), 0), 0))
    running = tl.sum(tl.where(c == winner, cum - w, 0.0), 0)

    idx = winner * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32)
    p = tl.math.exp2((x - row_max) * scale)
    hit = (running + tl.cumsum(p, 0) > target) & (p > 0.0)
    token = tl.min(tl.where(hit, idx, vocab), 0)
    last_positive = tl.maximum(tl.max(tl.where(p > 0.0, idx, -1), 0), winner * BLOCK)
    token = tl.where(token < vocab, token, last_positive)
    tl.store(out_ptr + row, token.to(tl.int64))
    if CHECK:  # the second output row: 1 where none of the row's logits is NaN or infinite
        bad = tl.sum(tl.load(bad_ptr + at, mask=valid, other=0.0), 0)
        tl.store(out_ptr + tl.num_programs(0) + row, (bad == 0.0).to(tl.int64))


def sample_rows(logits: torch.Tensor, inv_temperature: torch.Tensor, u: torch.Tensor,
                check_finite: bool = False, block: int = BLOCK_V) -> torch.Tensor:
    """One token per row of logits [n, V] (any float dtype; the last dimension contiguous), drawn from
    softmax(logits * inv_temperature[:, None]) at the uniforms u [n] in [0, 1). Returns [n] int64, or with
    check_finite [2, n] int64: the tokens, and 1 where none of the row's logits is NaN or infinite (Sampler.sample's
    layout and its check). block: vocabulary entries per program (a power of two; tests use small ones)."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    out = torch.empty((2, n) if check_finite else (n,), dtype=torch.long, device=dev)
    if n:
        # No integer argument depends on n and every buffer is an allocation of its own: triton specialises a
        # kernel on ints equal to 1 or divisible by 16 and on pointers' 16-byte alignment, and a variant that
        # depended on the batch size would compile mid-serving (a view at an offset of n rows would too).
        chunks = -(-vocab // block)
        row_max, row_sum = (torch.empty(n, chunks, dtype=torch.float32, device=dev) for _ in range(2))
        bad = torch.empty(n, chunks, dtype=torch.float32, device=dev) if check_finite else row_max
        inv_temperature = inv_temperature.float().contiguous()
        _chunk_stats_kernel[(n, chunks)](logits, inv_temperature, row_max, row_sum, bad, vocab, logits.stride(0),
                                         BLOCK=block, CHECK=check_finite, num_warps=NUM_WARPS)
        _chunk_pick_kernel[(n,)](logits, inv_temperature, u.float().contiguous(), row_max, row_sum, bad, out,
                                 vocab, logits.stride(0), chunks, BLOCK=block,
                                 CHUNKS=next_pow2(chunks), CHECK=check_finite, num_warps=NUM_WARPS)
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
