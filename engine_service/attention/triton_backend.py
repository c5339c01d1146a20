"""The Triton backend: our own KV-store and paged-attention kernels (see triton_kernels.py).

On CPU the kernels run under Triton's interpreter. The interpreter is chosen when a kernel is decorated,
so TRITON_INTERPRET=1 must be set before triton is first imported; this backend sets it when it can and
refuses clearly when triton was already imported without it.
"""

from __future__ import annotations

import os
import sys

import torch

from engine_service.attention import triton_interpreted
from engine_service.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    takes_stored_kv = True

    def __init__(self, device: torch.device):
        if device.type == "cpu" and not triton_interpreted():
            if "triton" in sys.modules:
                raise ValueError(
                    "attention_backend='triton' on CPU needs TRITON_INTERPRET=1 set before triton is "
                    "imported; set it in the environment of the process"
                )
            os.environ["TRITON_INTERPRET"] = "1"
        from engine_service.attention import triton_kernels

        self.kernels = triton_kernels

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None):
        """out: where to write the [T, Hq, D] result, when the caller made it (cuda_graphs' two-batch overlap
        makes it on the stream that reads it)."""
        if k is not None:  # else the fused RoPE kernel stored them
            self.kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.context_lens,
            meta.block_tables,
            scale,
            meta.max_seqlen_q,
            out=out,
            num_kv_splits=meta.cache.get("num_kv_splits"),
            seq_order=meta.seq_order,
        )
