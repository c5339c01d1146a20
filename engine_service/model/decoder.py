"""The decoder the engine serves, over a paged KV cache: RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings.

One module serves the families that share this shape (ModelConfig.from_dict reads which parts each has):
- Qwen3: q/k-norm (RMSNorm on each head before RoPE); biases on q/k/v/o when attention_bias is set;
- Qwen2 and Qwen2.5: biases on q/k/v, none on o, no q/k-norm;
- Llama (2, 3, 3.1+ with "llama3" RoPE scaling) and Mistral: no q/k-norm; Llama's attention_bias and mlp_bias.

Follows the transformers references numerically (float32 RMSNorm and RoPE tables), so that float64 on CPU
reproduces their greedy tokens exactly. Inputs are flat: all of a step's tokens in one dimension.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.attention.base import AttentionBackend, AttentionMetadata
from engine_service.model.config import ModelConfig
from engine_service.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
    load_fused_ops,
)


def _stream(streams, i: int):
    """The context that makes streams[i] current (CUDA), or nothing (streams None)."""
    return torch.cuda.stream(streams[i]) if streams is not None else contextlib.nullcontext()


def kv_heads_per_rank(cfg: ModelConfig, tp: TPInfo) -> int:
    """KV heads held by one rank; when ranks outnumber KV heads, each head is replicated."""
    return max(1, cfg.num_key_value_heads // tp.size)


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model's heads cannot be split over (ValueError naming them)."""
    if cfg.num_attention_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide num_attention_heads {cfg.num_attention_heads}"
        )
    if size > cfg.num_key_value_heads and size % cfg.num_key_value_heads:
        raise ValueError(
            f"tensor_parallel_size {size} must be a multiple of num_key_value_heads "
            f"{cfg.num_key_value_heads} when it exceeds it"
        )
    if size <= cfg.num_key_value_heads and cfg.num_key_value_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} must divide intermediate_size {cfg.intermediate_size}")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, fused: bool = False):
        super().__init__()
        d = cfg.head_dim
        self.fused_ops = load_fused_ops(fused)
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_heads_per_rank(cfg, tp)
        self.head_dim = d
        self.scale = d**-0.5
        kv_share = max(1, tp.size // cfg.num_key_value_heads)  # ranks holding the same KV head
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [("q", self.num_heads * d), ("k", self.num_kv_heads * d), ("v", self.num_kv_heads * d)],
            bias=cfg.qkv_bias,
            tp=tp,
            replicas={"k": kv_share, "v": kv_share},
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, cfg.o_proj_bias, tp)
        # Qwen3 normalises each q and k head before RoPE; the other families rotate the projections as they are.
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, rope, hidden, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused_ops is not None:  # q-norm, k-norm and RoPE in one launch, from the packed projection
            cos, sin = rope
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (None, None, 0.0)
            # K and V straight into the cache where the backend takes them stored (k = v = None then).
            store = (kv_cache[0], kv_cache[1], meta.slot_mapping) if backend.takes_stored_kv else None
            q, k = self.fused_ops.qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, self.head_dim, *norms,
                                               cos[:, 0], sin[:, 0], cache=store)
            v = None if store is not None else qkv[:, q_size + kv_size:].view(t, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            v = v.view(t, self.num_kv_heads, self.head_dim)
            q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
            k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = RotaryEmbedding.apply(q, k, rope)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, fused: bool = False):
        super().__init__()
        self.fused_ops = load_fused_ops(fused)
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [("gate", inter), ("up", inter)], cfg.mlp_bias, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)
        self.inter = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_ops is not None:
            return self.down_proj(self.fused_ops.silu_and_mul(gate_up))
        gate, up = gate_up.split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, fused: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, tp, fused)
        self.mlp = MLP(cfg, tp, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, rope, x, residual, kv_cache, meta, backend):
        """x: the previous layer's MLP output, added to the residual stream here (the embeddings, and no
        residual yet, at the first layer) -> (this layer's MLP output, the residual stream)."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(rope, h, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, max_positions: int, dtype: torch.dtype, fused: bool = False):
        """fused: the norms, RoPE and SiLU run engine_service.model.fused_ops' Triton kernels."""
        super().__init__()
        check_tensor_parallel(cfg, tp.size)
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, fused) for _ in range(cfg.num_hidden_layers))
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, dtype, cfg.rope_scaling
        )  # shared by all layers
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, backend: AttentionBackend):
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        return self.forward_batches([(input_ids, positions, meta, backend)], kv_caches)[0]

    def forward_batches(self, batches, kv_caches, streams=None) -> list[torch.Tensor]:
        """Independent batches through the model, interleaved layer by layer: batches is
        [(input_ids [T], positions [T], meta, backend)] -> [final hidden states [T, hidden]] for each.

        streams (CUDA): one stream per batch, current while its kernels are issued; each batch's backend may put
        its attention on a stream of its own (cuda_graphs' two-batch overlap: two halves of a decode batch).
        Issued a layer at a time, batch after batch, so that a shared attention stream runs a, b, a, b, ... while
        each batch's GEMMs run between its own attentions. None: all on the current stream, the same
        computation in the same order."""
        states = []
        for i, (ids, positions, meta, backend) in enumerate(batches):
            with _stream(streams, i):
                # The RoPE table lookup once per forward, for every layer.
                states.append([self.embed_tokens(ids), None, self.rotary.lookup(positions), meta, backend])
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            for i, state in enumerate(states):
                hidden, residual, rope, meta, backend = state
                with _stream(streams, i):
                    state[0], state[1] = layer(rope, hidden, residual, kv_cache, meta, backend)
        out = []
        for i, (hidden, residual, *_) in enumerate(states):
            with _stream(streams, i):
                out.append(self.norm.add_forward(hidden, residual)[0])
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
