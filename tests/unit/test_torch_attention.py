"""The torch reference backend against an explicit per-sequence float64 reference, on both of its paths."""

from __future__ import annotations

import pytest
import torch

from engine_service.attention import torch_backend
from engine_service.attention.base import AttentionMetadata
from engine_service.attention.triton_ref import make_paged_batch, ref_paged_attention

# Decode rows first (q_len 1), then prefill rows: a whole prompt, a chunk after a cached prefix, one token.
Q_LENS = [1, 1, 1, 7, 5, 1]
CTX_LENS = [1, 19, 33, 7, 21, 40]


def _slots(tables: torch.Tensor, q_lens, ctx_lens, block_size: int) -> torch.Tensor:
    out = []
    for i, (n, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        for p in range(c - n, c):
            out.append(int(tables[i, p // block_size]) * block_size + p % block_size)
    return torch.tensor(out)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_matches_reference(monkeypatch, fused, heads, kv_heads):
    if fused and not torch_backend.SDPA_GQA:
        pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa")
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused)
    bs = 8
    # Decode rows must come first; a one-token "prefill" at the end still counts as a decode row.
    order = sorted(range(len(Q_LENS)), key=lambda i: Q_LENS[i] != 1)
    q_lens, ctx_lens = [Q_LENS[i] for i in order], [CTX_LENS[i] for i in order]
    g = torch.Generator().manual_seed(heads)
    batch = make_paged_batch(
        q_lens, ctx_lens, heads, kv_heads, 16, bs, dtype=torch.float64, table_fill=0, generator=g
    )
    slots = _slots(batch.block_tables, q_lens, ctx_lens, bs)
    k_new = batch.k_cache.view(-1, kv_heads, 16)[slots].clone()
    v_new = batch.v_cache.view(-1, kv_heads, 16)[slots].clone()
    meta = AttentionMetadata(
        slot_mapping=slots,
        cu_seqlens_q=batch.cu_seqlens_q,
        context_lens=batch.context_lens,
        block_tables=batch.block_tables,
        num_decode_seqs=sum(1 for n in q_lens if n == 1),
        max_seqlen_q=max(q_lens),
        max_context_len=max(ctx_lens),
        block_size=bs,
        q_lens=q_lens,
        ctx_lens=ctx_lens,
    )
    out = torch_backend.TorchAttentionBackend().forward(
        batch.q, k_new, v_new, batch.k_cache, batch.v_cache, meta, 16**-0.5
    )
    ref = ref_paged_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.cu_seqlens_q,
        batch.context_lens,
        batch.block_tables,
        16**-0.5,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
