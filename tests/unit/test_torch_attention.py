"""The torch reference backend against an explicit per-sequence float64 reference, on both of its paths."""

from __future__ import annotations

import pytest
import torch

from engine_service.attention import to_kv_cache, torch_backend
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


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["model-dtype-kv", "fp8-kv"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_matches_reference(monkeypatch, fused, heads, kv_heads, kv_fp8):
    """kv_fp8: the cache in float8 e4m3 (kv_cache_dtype="fp8"), its new rows zeroed first: the new K/V must be
    stored rounded (to_kv_cache) and everything read back in q's dtype, float64 here."""
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
    if kv_fp8:
        k_new *= 100  # some beyond e4m3's 448: they saturate
        batch.k_cache, batch.v_cache = (to_kv_cache(c, torch.float8_e4m3fn) for c in (batch.k_cache, batch.v_cache))
        for cache in (batch.k_cache, batch.v_cache):
            cache.view(-1, kv_heads, 16)[slots] = torch.zeros((), dtype=cache.dtype)
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
    if kv_fp8:
        for cache, new in ((batch.k_cache, k_new), (batch.v_cache, v_new)):
            stored = cache.view(-1, kv_heads, 16)[slots]
            assert torch.equal(stored.view(torch.uint8), to_kv_cache(new, cache.dtype).view(torch.uint8))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_and_tiles_match_reference(monkeypatch, fused, seed):
    """Contexts from 1 to 300 keys in a random order, with groups and tiles made small, so that a step has several
    decode and prefill groups (out of step order), single-sequence groups and query tiles."""
    if fused and not torch_backend.SDPA_GQA:
        pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa")
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused)
    monkeypatch.setattr(torch_backend, "GROUP_MIN_KEYS", 8)
    monkeypatch.setattr(torch_backend, "MASK_ELEMENTS", 3000)
    rng = torch.Generator().manual_seed(seed)
    ctx = [int(c) for c in torch.randint(1, 300, (14,), generator=rng)]
    q_lens = [1] * 6 + [max(1, int(torch.randint(1, c + 1, (1,), generator=rng))) for c in ctx[6:]]
    q_lens[6:] = [n if n > 1 else 2 for n in q_lens[6:]]
    ctx[6:] = [max(c, n) for c, n in zip(ctx[6:], q_lens[6:], strict=True)]
    groups = torch_backend.context_groups(ctx[:6])
    assert len(groups) > 1 and [i for g in groups for i in g] != list(range(6))  # out of step order
    heads, kv_heads, bs, d = 6, 2, 8, 16
    batch = make_paged_batch(q_lens, ctx, heads, kv_heads, d, bs, dtype=torch.float64, table_fill=0, generator=rng)
    slots = _slots(batch.block_tables, q_lens, ctx, bs)
    meta = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=batch.cu_seqlens_q, context_lens=batch.context_lens,
        block_tables=batch.block_tables, num_decode_seqs=6, max_seqlen_q=max(q_lens), max_context_len=max(ctx),
        block_size=bs, q_lens=q_lens, ctx_lens=ctx,
    )
    k_new = batch.k_cache.view(-1, kv_heads, d)[slots].clone()
    v_new = batch.v_cache.view(-1, kv_heads, d)[slots].clone()
    out = torch_backend.TorchAttentionBackend().forward(batch.q, k_new, v_new, batch.k_cache, batch.v_cache, meta,
                                                        d**-0.5)
    plan = meta.cache["torch"]
    assert len(plan["prefill"]) > 1 and any(len(tiles) > 1 for _, tiles in plan["prefill"])
    ref = ref_paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.context_lens,
                              batch.block_tables, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
def test_padding_lanes_write_zeros_and_real_rows_match_reference(monkeypatch, fused):
    """A CUDA-graph batch's padding lanes (context 0, slot -1, table of block 0, whose keys are not zeros): their
    attention rows must be exactly zero and finite on both paths, and they store nothing. Without the key 0 they are
    let see, the matmul path's softmax over no key made them NaN (torch's fused SDPA happens to give zeros); without
    the multiply by the live mask they held attention over key 0."""
    if fused and not torch_backend.SDPA_GQA:
        pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa")
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused)
    ctx = [19, 0, 33, 0, 1, 0]  # lanes 1, 3 and 5 are padding
    pad, real = [1, 3, 5], [0, 2, 4]
    heads, kv_heads, bs, d = 6, 2, 8, 16
    batch = make_paged_batch([1] * 6, ctx, heads, kv_heads, d, bs, dtype=torch.float64, table_fill=0,
                             generator=torch.Generator().manual_seed(0))
    assert (batch.block_tables[pad] == 0).all()  # padding lanes gather block 0: random keys, not zeros
    slots = torch.full((6,), -1)
    slots[real] = _slots(batch.block_tables[real], [1] * 3, [ctx[i] for i in real], bs)
    rows = slots.clamp(min=0)
    k_new = batch.k_cache.view(-1, kv_heads, d)[rows].clone()
    v_new = batch.v_cache.view(-1, kv_heads, d)[rows].clone()
    k_new[pad] = v_new[pad] = float("nan")  # a padding lane's K/V must never reach the cache
    meta = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=batch.cu_seqlens_q, context_lens=batch.context_lens,
        block_tables=batch.block_tables, num_decode_seqs=6, max_seqlen_q=1, max_context_len=max(ctx), block_size=bs,
        has_padding=True, q_lens=[1] * 6, ctx_lens=ctx,
    )
    out = torch_backend.TorchAttentionBackend().forward(batch.q, k_new, v_new, batch.k_cache, batch.v_cache, meta,
                                                        d**-0.5)
    assert bool(torch.isfinite(out).all()), "padding lanes went NaN"
    assert bool((out[pad] == 0).all()), "padding lanes' attention rows are not zero"
    assert not batch.k_cache.isnan().any() and not batch.v_cache.isnan().any()
    ref = ref_paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.context_lens,
                              batch.block_tables, d**-0.5)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-10, atol=1e-10)


def test_one_long_context_does_not_pad_the_short_ones():
    groups = torch_backend.context_groups([100, 32768, 90, 120, 300, 20000])
    assert groups == [[2, 0, 3], [4], [5, 1]]
