"""The reference attention backend: batched tensor operations over the paged cache, on any device.

It defines correctness for the other backends. No Python loop over sequences: per step, it builds one
gather index and one mask for the decode rows and one for the padded prefill rows, reused by every layer;
each layer then gathers K/V through the block tables and runs one batched attention per group (torch's
fused SDPA where it supports GQA, else two batched matmuls, half precision upcast to float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_service.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, meta.has_padding)
        plan = meta.cache.get("torch")
        if plan is None:
            plan = meta.cache["torch"] = _plan(meta, q.device, k_cache.shape[2])
        num_heads, d = q.shape[1], q.shape[2]
        out = torch.empty_like(q)
        k_rows = k_cache.view(-1, d)  # [slots * Hkv, D]: one row per (slot, kv head)
        v_rows = v_cache.view(-1, d)
        nd = meta.num_decode_seqs
        if nd:
            idx, allowed = plan["decode"]  # [b, Hkv, K], [b, 1, 1, K]
            qd = q[:nd].view(nd, num_heads, 1, d)
            o = _attention(qd, _rows(k_rows, idx), _rows(v_rows, idx), allowed, scale)  # [b, Hq, 1, D]
            if meta.has_padding:
                o = o * (meta.context_lens[:nd] > 0).view(nd, 1, 1, 1)  # padding lanes write zeros
            out[:nd] = o.view(nd, num_heads, d).to(out.dtype)
        if "prefill" in plan:
            idx, allowed, seq_of_row, pos_of_row, q_max = plan["prefill"]  # allowed: [b, 1, Q, K]
            b = idx.shape[0]
            qp = q.new_zeros(b, q_max, num_heads, d)
            qp[seq_of_row, pos_of_row] = q[nd:]
            o = _attention(qp.transpose(1, 2), _rows(k_rows, idx), _rows(v_rows, idx), allowed, scale)
            out[nd:] = o.transpose(1, 2)[seq_of_row, pos_of_row].to(out.dtype)  # [b, Q, Hq, D] -> real rows
        return out


def store_kvcache(k, v, k_cache, v_cache, slot_mapping: torch.Tensor, has_padding: bool = False) -> None:
    """Write new K/V ([T, Hkv, D]) at their slots; slot -1 (a padding lane) is skipped."""
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping
    if has_padding:
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v)


def _rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows[idx] for idx [b, Hkv, K] -> [b, Hkv, K, D]; index_select is several times faster on CPU."""
    return torch.index_select(rows, 0, idx.reshape(-1)).view(*idx.shape, rows.shape[-1])


def _sdpa_has_gqa() -> bool:
    """Whether this torch's scaled_dot_product_attention takes enable_gqa (probed, not assumed)."""
    try:
        q, kv = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4)
        F.scaled_dot_product_attention(
            q, kv, kv, attn_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), enable_gqa=True
        )
        return True
    except (TypeError, RuntimeError):
        return False


SDPA_GQA = _sdpa_has_gqa()


def _attention(q, keys, values, allowed, scale):
    """q: [b, Hq, Q, D]; keys/values: [b, Hkv, K, D]; allowed: [b, 1, Q, K] -> [b, Hq, Q, D].

    torch's fused SDPA where it takes GQA (several times faster on CPU for prefill: it never materialises
    the scores); otherwise the same thing with the query heads of one KV head folded into its rows.
    """
    if SDPA_GQA:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed, scale=scale, enable_gqa=True
        )
    b, hq, nq, d = q.shape
    hkv = keys.shape[1]
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    rows = q.to(dtype).reshape(b, hkv, (hq // hkv) * nq, d)
    scores = torch.matmul(rows, keys.to(dtype).transpose(-1, -2)) * scale  # [b, Hkv, G * Q, K]
    scores.view(b, hkv, hq // hkv, nq, -1).masked_fill_(~allowed[:, :, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.to(dtype))
    return out.view(b, hq, nq, d).to(q.dtype)


def _gather_index(block_tables: torch.Tensor, k_max: int, block_size: int, kv_heads: int) -> torch.Tensor:
    """[b, W] block tables -> [b, Hkv, k_max] rows of the cache viewed as [slots * Hkv, D].

    Gathering (slot, head) rows directly gives K in [b, Hkv, K, D] order, ready for a batched matmul.
    """
    dev = block_tables.device
    j = torch.arange(k_max, device=dev)
    blocks = block_tables[:, : -(-k_max // block_size)].long()
    slots = blocks[:, j // block_size] * block_size + (j % block_size)  # [b, K]
    return slots[:, None, :] * kv_heads + torch.arange(kv_heads, device=dev)[None, :, None]


def _plan(meta: AttentionMetadata, device, kv_heads: int) -> dict:
    plan: dict = {}
    nd, bs = meta.num_decode_seqs, meta.block_size
    if nd:
        k_max = max(1, max(meta.ctx_lens[:nd]))
        ctx = meta.context_lens[:nd].long()
        idx = _gather_index(meta.block_tables[:nd], k_max, bs, kv_heads)
        allowed = torch.arange(k_max, device=device)[None, :] < ctx[:, None]  # [b, K]
        allowed[:, 0] |= ctx == 0  # a padding lane sees key 0 so its softmax is finite; it is zeroed
        plan["decode"] = (idx, allowed[:, None, None, :])
    if meta.num_seqs > nd:
        q_lens, ctx_lens = meta.q_lens[nd:], meta.ctx_lens[nd:]
        q_max, k_max = max(q_lens), max(ctx_lens)
        qlen = torch.tensor(q_lens, device=device)
        ctx = meta.context_lens[nd:].long()
        idx = _gather_index(meta.block_tables[nd:], k_max, bs, kv_heads)
        r = torch.arange(q_max, device=device)
        j = torch.arange(k_max, device=device)
        # Query row r of a sequence sits at position ctx - q_len + r and sees keys up to it (causal).
        allowed = j[None, None, :] <= (ctx - qlen)[:, None, None] + r[None, :, None]  # [b, Q, K]
        real = r[None, :] < qlen[:, None]  # [b, Q]
        allowed &= real[:, :, None]
        allowed[:, :, 0] |= ~real  # padding rows see key 0 so their softmax is finite; they are dropped
        total = sum(q_lens)  # from the host list: no device sync
        seq_of_row = torch.repeat_interleave(torch.arange(len(q_lens), device=device), qlen, output_size=total)
        starts = torch.cumsum(qlen, 0) - qlen
        pos_of_row = torch.arange(total, device=device) - starts[seq_of_row]
        plan["prefill"] = (idx, allowed[:, None], seq_of_row, pos_of_row, q_max)
    return plan
