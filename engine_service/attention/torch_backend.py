"""The reference attention backend: batched tensor operations over the paged cache, on any device.

It defines correctness for the other backends. No Python loop over sequences: per step, it groups the
sequences by context length (a group's longest at most twice its shortest, so one long sequence does not pad
every short one to its length) and builds one gather index and one mask per group, reused by every layer;
each layer then gathers K/V through the block tables and runs one batched attention per group (torch's
fused SDPA where it supports GQA, else two batched matmuls, half precision upcast to float32). A long prefill
chunk's query rows go in tiles, so that no mask exceeds MASK_ELEMENTS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_service.attention import FP8_KV_DTYPE, to_kv_cache
from engine_service.attention.base import AttentionBackend, AttentionMetadata
from engine_service.host_copy import to_device


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
        for sel, idx, allowed, live in plan["decode"]:  # sel: the group's decode rows (None: all of them)
            qd = (q[:nd] if sel is None else q[sel]).unsqueeze(2)  # [b, Hq, 1, D]
            keys, values = _rows(k_rows, idx, q.dtype), _rows(v_rows, idx, q.dtype)  # [b, Hkv, 1, D]
            o = _attention(qd, keys, values, allowed, scale)  # [b, Hq, 1, D]
            if meta.has_padding:  # padding lanes write zeros (whatever their key 0 held: 0 * NaN is NaN)
                o = torch.where(live.view(-1, 1, 1, 1), o, 0.0)
            o = o.view(-1, num_heads, d).to(out.dtype)
            if sel is None:
                out[:nd] = o
            else:
                out[sel] = o
        q_pre, out_pre = q[nd:], out[nd:]  # prefill rows (out_pre is a view: writes land in out)
        for idx, tiles in plan["prefill"]:
            keys, values = _rows(k_rows, idx, q.dtype), _rows(v_rows, idx, q.dtype)  # [b, Hkv, K, D], once a group
            for rows, seq_of_row, pos_of_row, q_max, k_tile, allowed in tiles:
                if not isinstance(allowed, torch.Tensor):  # a tile of a long sequence: its mask made per use
                    allowed = _causal_mask(*allowed, q_max, k_tile)
                qp = q.new_zeros(keys.shape[0], q_max, num_heads, d)
                qp[seq_of_row, pos_of_row] = q_pre[rows]
                o = _attention(qp.transpose(1, 2), keys[:, :, :k_tile], values[:, :, :k_tile], allowed, scale)
                out_pre[rows] = o.transpose(1, 2)[seq_of_row, pos_of_row].to(out.dtype)  # [b, Q, Hq, D] -> real rows
        return out


def store_kvcache(k, v, k_cache, v_cache, slot_mapping: torch.Tensor, has_padding: bool = False) -> None:
    """Write new K/V ([T, Hkv, D]) at their slots, in the cache's dtype (to_kv_cache); slot -1 (a padding lane)
    is skipped."""
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping
    if has_padding:
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    if k_cache.dtype != k.dtype:
        k, v = to_kv_cache(k, k_cache.dtype), to_kv_cache(v, v_cache.dtype)
    if k_cache.dtype == FP8_KV_DTYPE:  # index_copy_ has no float8 kernel on CPU: copy the bytes
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v)


def _rows(rows: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows[idx] for idx [b, Hkv, K] -> [b, Hkv, K, D] in dtype (an fp8 cache is read back in the model's; no
    copy otherwise); index_select is several times faster on CPU."""
    if rows.dtype == FP8_KV_DTYPE:  # gathered as bytes, as they are stored: no float8 kernel needed on any device
        picked = torch.index_select(rows.view(torch.uint8), 0, idx.reshape(-1)).view(FP8_KV_DTYPE)
    else:
        picked = torch.index_select(rows, 0, idx.reshape(-1))
    return picked.view(*idx.shape, rows.shape[-1]).to(dtype)


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


def _gather_index(block_tables: torch.Tensor, k_max: int, block_size: int, kv_heads: int,
                  ctx: torch.Tensor) -> torch.Tensor:
    """[b, W] block tables and [b] context lengths -> [b, Hkv, k_max] rows of the cache viewed as [slots * Hkv, D].

    Gathering (slot, head) rows directly gives K in [b, Hkv, K, D] order, ready for a batched matmul. A row's
    positions past its context (padding to the group's longest) gather its last key again: the slots there hold
    whatever their block held before (another request's leftovers, an inf or NaN among them), and a masked-out
    NaN or inf value still turns the softmax's 0 weight times it into NaN.
    """
    dev = block_tables.device
    j = torch.minimum(torch.arange(k_max, device=dev)[None, :], (ctx.long() - 1).clamp(min=0)[:, None])  # [b, K]
    blocks = block_tables[:, : -(-k_max // block_size)].long().gather(1, j // block_size)
    slots = blocks * block_size + j % block_size  # [b, K]
    return slots[:, None, :] * kv_heads + torch.arange(kv_heads, device=dev)[None, :, None]


# Rows of one batched attention call are padded to the group's longest context: contexts up to this many keys
# share a group, longer ones go with contexts at least half their length.
GROUP_MIN_KEYS = 256
# A prefill call's [b, Q, K] mask (which torch's CPU SDPA copies as float) holds at most this many elements;
# past it, a sequence's query rows are split into tiles over the same gathered K/V.
MASK_ELEMENTS = 1 << 24


def context_groups(ctx_lens: list[int]) -> list[list[int]]:
    """Indices of ctx_lens grouped so that each group's longest context is at most twice its shortest (or at most
    GROUP_MIN_KEYS): padding every row to the step's longest context made 64 short decodes beside one 32k
    sequence cost as much as 65 long ones (368 ms a step instead of 7)."""
    groups: list[list[int]] = []
    shortest = 0
    for i in sorted(range(len(ctx_lens)), key=ctx_lens.__getitem__):
        if not groups or ctx_lens[i] > max(2 * shortest, GROUP_MIN_KEYS):
            groups.append([])
            shortest = ctx_lens[i]
        groups[-1].append(i)
    return groups


def _plan(meta: AttentionMetadata, device, kv_heads: int) -> dict:
    """Per step, reused by every layer: the decode groups and the prefill groups with their query tiles."""
    nd, bs = meta.num_decode_seqs, meta.block_size
    plan: dict = {"decode": [], "prefill": []}
    for rows in context_groups(meta.ctx_lens[:nd]) if nd else []:
        sel = None if len(rows) == nd else to_device(rows, torch.long, device)  # one group: every row, in order
        k_max = max(1, max(meta.ctx_lens[i] for i in rows))
        ctx = (meta.context_lens[:nd] if sel is None else meta.context_lens[sel]).long()
        idx = _gather_index(meta.block_tables[:nd] if sel is None else meta.block_tables[sel], k_max, bs, kv_heads,
                            ctx)
        allowed = torch.arange(k_max, device=device)[None, :] < ctx[:, None]  # [b, K]
        allowed[:, 0] |= ctx == 0  # a padding lane sees key 0 so its softmax is finite; it is zeroed
        plan["decode"].append((sel, idx, allowed[:, None, None, :], ctx > 0))
    if meta.num_seqs == nd:
        return plan
    q_lens, ctx_lens = meta.q_lens[nd:], meta.ctx_lens[nd:]
    first_row = [0]
    for n in q_lens:
        first_row.append(first_row[-1] + n)
    groups = []
    for group in context_groups(ctx_lens):
        if len(group) > 1 and len(group) * max(q_lens[s] for s in group) * ctx_lens[group[-1]] > MASK_ELEMENTS:
            groups.extend([s] for s in group)  # too big to pad together: one sequence per group, tiled below
        else:
            groups.append(group)
    for group in groups:
        whole = len(group) == len(q_lens)
        if whole:
            group = list(range(len(q_lens)))  # the step's order, which the tables and rows are in
        tables = meta.block_tables[nd:] if whole else meta.block_tables[nd:][to_device(group, torch.long, device)]
        k_max = max(ctx_lens[s] for s in group)
        q_max = max(q_lens[s] for s in group)
        if len(group) * q_max * k_max <= MASK_ELEMENTS:
            tile = _prefill_tile(group, [0] * len(group), [q_lens[s] for s in group], q_lens, ctx_lens, first_row,
                                 device)
            tiles = [(slice(None), *tile[1:]) if whole else tile]  # whole: every prefill row, in order
        else:  # one long sequence: query tiles of at most MASK_ELEMENTS // k_max rows
            (s,) = group
            step = max(1, MASK_ELEMENTS // k_max)
            tiles = [_prefill_tile(group, [a], [min(step, q_lens[s] - a)], q_lens, ctx_lens, first_row, device,
                                   keep_mask=False) for a in range(0, q_lens[s], step)]
        ctx = to_device([ctx_lens[s] for s in group], torch.long, device)
        plan["prefill"].append((_gather_index(tables, k_max, bs, kv_heads, ctx), tiles))
    return plan


def _prefill_tile(group, starts, counts, q_lens, ctx_lens, first_row, device, keep_mask: bool = True):
    """Query rows starts[i] : starts[i] + counts[i] of each sequence group[i], padded to [b, Q]: (their rows in
    the step's prefill rows, each row's sequence and place in the padded batch, Q, the keys they need, the
    causal mask [b, 1, Q, K], or with keep_mask=False what makes it: a long sequence's tiles together would
    hold a mask as large as the untiled one, so each tile's is made when it is used and dropped after)."""
    b = len(group)
    q_max = max(counts)
    # Query row r of sequence s (row starts + r of its chunk) sits at position ctx - q_len + start + r.
    offsets = [ctx_lens[s] - q_lens[s] + a for s, a in zip(group, starts, strict=True)]
    k_tile = max(o + n for o, n in zip(offsets, counts, strict=True))
    count = to_device(counts, torch.long, device)
    mask_args = (to_device(offsets, torch.long, device), count)
    total = sum(counts)  # from the host lists: no device sync
    seq_of_row = torch.repeat_interleave(torch.arange(b, device=device), count, output_size=total)
    pos_of_row = torch.arange(total, device=device) - (torch.cumsum(count, 0) - count)[seq_of_row]
    if b == 1:
        first = first_row[group[0]] + starts[0]
        rows = slice(first, first + counts[0])
    else:
        row_starts = to_device([first_row[s] + a for s, a in zip(group, starts, strict=True)], torch.long, device)
        rows = row_starts[seq_of_row] + pos_of_row
    allowed = _causal_mask(*mask_args, q_max, k_tile) if keep_mask else mask_args
    return rows, seq_of_row, pos_of_row, q_max, k_tile, allowed


def _causal_mask(offsets: torch.Tensor, count: torch.Tensor, q_max: int, k_max: int) -> torch.Tensor:
    """[b, 1, Q, K]: padded query row r of sequence i, at position offsets[i] + r, sees keys up to it."""
    r = torch.arange(q_max, device=offsets.device)
    j = torch.arange(k_max, device=offsets.device)
    allowed = j[None, None, :] <= offsets[:, None, None] + r[None, :, None]  # [b, Q, K]
    real = r[None, :] < count[:, None]  # [b, Q]
    allowed &= real[:, :, None]
    allowed[:, :, 0] |= ~real  # padding rows see key 0 so their softmax is finite; they are dropped
    return allowed[:, None]
