"""A thin flash-attn backend: its paged varlen kernel reads our cache through the block tables.

Used only where `flash_attn` imports and the block size is a multiple of 256 (what its paged kernels take).
"""

from __future__ import annotations

import torch

from engine_service.attention.base import AttentionBackend, AttentionMetadata
from engine_service.attention.torch_backend import store_kvcache


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, meta.has_padding)
        cu_k = meta.cache.get("cu_seqlens_k")
        if cu_k is None:
            cu_k = torch.zeros(meta.num_seqs + 1, dtype=torch.int32, device=q.device)
            torch.cumsum(meta.context_lens, 0, out=cu_k[1:])
            meta.cache["cu_seqlens_k"] = cu_k
        return self.varlen(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=meta.cu_seqlens_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_context_len,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables,
        )
