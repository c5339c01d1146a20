"""Plain-torch references for the Triton kernels, and a random paged-batch builder, for tests and checks.

Slow on purpose: one sequence at a time, straight from the definitions. No triton import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ref_store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads, head_dim]."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """The first ctx_len keys of one sequence: [ctx_len, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    pos = torch.arange(ctx_len, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[pos // block_size]
    return cache[blocks, pos % block_size]


def ref_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, compute_dtype: torch.dtype = torch.float64,
                        use_sdpa: bool = False) -> torch.Tensor:
    """Causal paged attention, computed in compute_dtype; returns [num_tokens, num_heads, head_dim] in it.

    Query row r of sequence i (q_len rows) sits at position context_len - q_len + r and sees keys
    0..that position. Rows with no keys are zeros. use_sdpa: compute with
    F.scaled_dot_product_attention (what a torch backend does), else with explicit softmax.
    """
    num_tokens, num_heads, head_dim = q.shape
    gqa = num_heads // k_cache.shape[2]
    out = torch.zeros((num_tokens, num_heads, head_dim), dtype=compute_dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        s, e = cu[i], cu[i + 1]
        q_len = e - s
        if q_len == 0 or ctx == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], ctx).to(compute_dtype).repeat_interleave(gqa, dim=1)
        v = gather_kv(v_cache, block_tables[i], ctx).to(compute_dtype).repeat_interleave(gqa, dim=1)
        qi = q[s:e].to(compute_dtype)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, ctx]
        if use_sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(
                qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible, scale=scale)
            o = o.transpose(0, 1)
        else:
            scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
            scores = scores.masked_fill(~visible[None], float("-inf"))
            o = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
        out[s:e] = o.masked_fill((q_pos < 0)[:, None, None], 0.0)  # rows before position 0: no keys
    return out


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    max_seqlen_q: int


def make_paged_batch(q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", extra_blocks: int = 3, table_fill: int = -1,
                     generator: torch.Generator | None = None) -> PagedBatch:
    """A random batch whose sequences own shuffled, non-contiguous cache blocks.

    Sequence i has q_lens[i] query rows and ctx_lens[i] keys (ctx 0 with q_len 1 is a padding lane).
    The whole cache is random, so a kernel that reads an unowned block gives a wrong answer.
    Block-table entries past a sequence's used blocks hold table_fill.
    """
    dev = torch.device(device)
    g_cpu = generator if generator is not None and generator.device.type == "cpu" else None
    # Random data straight on the device (large caches would be slow to build on the CPU).
    g_dev = generator if generator is not None and generator.device.type == dev.type else None
    blocks_needed = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max([1, *blocks_needed]) + 1  # one spare column of table_fill
    num_blocks = sum(blocks_needed) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g_cpu).tolist()
    tables = torch.full((len(ctx_lens), max_blocks), table_fill, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    kv_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(kv_shape, generator=g_dev, device=dev).to(dtype)
    v_cache = torch.randn(kv_shape, generator=g_dev, device=dev).to(dtype)
    q = torch.randn((sum(q_lens), num_heads, head_dim), generator=g_dev, device=dev).to(dtype)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    return PagedBatch(q, k_cache, v_cache, cu.to(dev), torch.tensor(ctx_lens, dtype=torch.int32).to(dev),
                      tables.to(dev), max([1, *q_lens]))
