"""The attention-backend interface and the per-step metadata every backend reads.

A step's tokens are flat: sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are the last
q_len positions of its context_lens[i] keys. Sequences with one query row come first (num_decode_seqs of
them), so backends can batch them on a decode path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: (
        torch.Tensor
    )  # [T] int64: cache slot of each new token (block * block_size + offset); -1 skips
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32: keys per sequence, new tokens included; 0 for a padding lane
    block_tables: torch.Tensor  # [B, W] int32
    num_decode_seqs: int  # the first num_decode_seqs sequences have exactly one query row
    max_seqlen_q: int
    max_context_len: int
    block_size: int
    has_padding: bool = False  # some lanes are padding (slot -1, context 0): CUDA-graph batches
    # Decode steps on the triton backend: the sequences by context length, longest first ([B] int32), the
    # order in which attention dispatches their programs (longest_first). Changes no result.
    seq_order: torch.Tensor | None = None
    # Host copies, so backends can plan without reading the device.
    q_lens: list[int] = field(default_factory=list)
    ctx_lens: list[int] = field(default_factory=list)
    # Whatever a backend derives once per step and reuses in every layer.
    cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


def longest_first(ctx_lens: list[int]) -> list[int]:
    """Lane indices by context length, longest first (ties in lane order).

    A decode attention launch runs one program per (sequence, KV head) in a few waves over the SMs. Started in
    this order, the long sequences run in the first waves and the last wave holds the shortest, so no long one
    runs on alone at the end: on an H200 mid workload A (about 215 sequences of 319-1,236 keys) the launch took 183 us
    in batch order, 3.77 TB/s, where equal lengths reach 4.28 TB/s (docs/GPU.md)."""
    return sorted(range(len(ctx_lens)), key=ctx_lens.__getitem__, reverse=True)


class AttentionBackend:
    """Stores the new K/V into the paged cache, then attends over it. One instance per model runner."""

    name = "base"
    # Whether forward() takes k = v = None: the caller has written them into the caches already (the fused
    # q/k-norm and RoPE kernel does, which saves the store's launch a layer).
    takes_stored_kv = False

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D]; None where takes_stored_kv and already stored
        v: torch.Tensor | None,  # [T, Hkv, D]; likewise
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        raise NotImplementedError
