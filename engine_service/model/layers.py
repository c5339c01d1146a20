"""Building blocks of the model: tensor-parallel linears and embeddings, RMSNorm, RoPE.

Each parameter carries a `weight_loader(param, tensor, shard)` that copies this rank's slice of a
checkpoint tensor into it, so the loader only maps names (and drops them once it is done: each is a bound
method of its module, a reference cycle that kept the model alive). At tensor_parallel_size 1 nothing here touches
torch.distributed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.model.config import RopeScaling


@dataclass(slots=True, frozen=True)
class TPInfo:
    """This process's place in the tensor-parallel group.

    `group` is a process group object of its own (gloo or NCCL over a file store), not torch.distributed's
    global default group, so several engines can live in one process.
    """

    rank: int = 0
    size: int = 1
    group: object = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return parts

    def min_int(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        if getattr(self.group, "name", lambda: "")() == "nccl":
            t = t.cuda(torch.cuda.current_device())
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN
        self.group.allreduce([t], opts).wait()
        return int(t.item())


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _expect_shape(loaded: torch.Tensor, *shape: int) -> None:
    """Refuse a whole checkpoint tensor of another shape than config.json implies: a larger one would be sliced
    into this rank's share without complaint, and a dimension of 1 broadcast, serving garbage."""
    if tuple(loaded.shape) != shape:
        raise RuntimeError(f"the whole tensor should be {shape}")


_gemm_picks_on = True


@contextlib.contextmanager
def gemm_picks_off():
    """torch's GEMMs inside, whatever the tuner picked (cuda_graphs' two-batch overlap: the picks' split-K
    tiles share one workspace, which two GEMMs on two streams at once would race for)."""
    global _gemm_picks_on
    before, _gemm_picks_on = _gemm_picks_on, False
    try:
        yield
    finally:
        _gemm_picks_on = before


def _matmul(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias): F.linear, or the Triton GEMM the start-up tuner picked for this many rows
    (model/gemm.py; `gemms` is set only on CUDA, for the decode batch sizes CUDA graphs capture)."""
    picks = layer.gemms
    if picks and _gemm_picks_on:
        pick = picks.get(x.shape[0])
        if pick is not None:
            return pick.run(x, layer.weight, bias)
    return F.linear(x, layer.weight, bias)


def _load_whole(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
    """A parameter every rank holds whole (norms, a row-parallel bias)."""
    _expect_shape(loaded, *param.shape)
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over ranks; `shards` lists (name, rows per rank, rows in file).

    A packed layer (q/k/v, gate/up) is one matmul over several checkpoint tensors; each shard's slice of
    this rank is copied to its offset. `replicate` lists shards whose rows are not split but repeated
    (KV heads when tensor parallelism exceeds their count).
    """

    def __init__(
        self,
        in_features: int,
        shards: list[tuple[str, int]],
        bias: bool,
        tp: TPInfo,
        replicas: dict[str, int] | None = None,
    ):
        super().__init__()
        self.tp = tp
        self.shards = shards
        self.replicas = replicas or {}  # shard name -> how many ranks share one slice
        self.offsets: dict[str, int] = {}
        off = 0
        for name, rows in shards:
            self.offsets[name] = off
            off += rows
        self.weight = _param(off, in_features)
        self.weight.weight_loader = self._load
        self.bias = _param(off) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load
        self.gemms = None  # rows -> model.gemm.GemmPick, set by the start-up tuner on CUDA

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        if shard not in self.offsets:  # a checkpoint that packs them itself (qkv_proj, gate_up_proj): KeyError(None)
            raise ValueError(f"it packs this layer's {'/'.join(self.offsets)} parts in one tensor; the engine loads "
                             "them from separate checkpoint tensors (as the model's transformers class saves them)")
        rows = dict(self.shards)[shard]
        share = self.replicas.get(shard, 1)
        _expect_shape(loaded, rows * self.tp.size // share, *param.shape[1:])
        start = (self.tp.rank // share) * rows
        piece = loaded.narrow(0, start, rows)
        param.data.narrow(0, self.offsets[shard], rows).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.in_per_rank = in_features // tp.size
        self.weight = _param(out_features, self.in_per_rank)
        self.weight.weight_loader = self._load_weight
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = _load_whole
        self.gemms = None  # rows -> model.gemm.GemmPick, set by the start-up tuner on CUDA

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        _expect_shape(loaded, param.shape[0], self.in_per_rank * self.tp.size)
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(self, x, None)
        y = self.tp.all_reduce(y)
        # The bias is added once, after the reduction.
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over ranks; the vocabulary is padded to a multiple of the size."""

    def __init__(self, vocab_size: int, dim: int, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = _param(self.per_rank, dim)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        _expect_shape(loaded, self.vocab_size, param.shape[1])
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()  # padded rows stay zero
        param.data[:rows].copy_(loaded[self.start : self.start + rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; each rank computes its vocabulary slice and the slices are gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, dim] -> [N, vocab]
        logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = torch.cat(self.tp.all_gather(logits.contiguous()), dim=-1)
        return logits[:, : self.vocab_size]


def load_fused_ops(fused: bool):
    """engine_service.model.fused_ops where the fused kernels are on, else None. Resolved once, when a layer
    is built: the module imports triton, which the engine must not need where fused ops are off."""
    if not fused:
        return None
    from engine_service.model import fused_ops

    return fused_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the model dtype, as transformers does (exactness).

    fused: `add_forward` runs fused_ops' kernel (one launch for the residual add and the norm) instead of
    torch's eight-odd elementwise kernels.
    """

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused_ops = load_fused_ops(fused)
        self.weight = _param(dim)
        self.weight.weight_loader = _load_whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, H] -> (norm(s), s), s = residual + x, the residual stream (x itself when None)."""
        if self.fused_ops is not None:
            return self.fused_ops.add_rms_norm(x, self.weight, self.eps, residual)
        total = x if residual is None else residual + x
        return self(total), total


class RotaryEmbedding(nn.Module):
    """RoPE with a cos/sin table over every position, computed in float32 as transformers does.

    One table serves every layer: `lookup` runs once per forward and the layers `apply` its result. RoPE
    scaling (linear, yarn) changes only the table: its frequencies, and for yarn a factor on cos and sin.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", (emb.cos() * attention_factor).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_factor).to(dtype), persistent=False)

    def keep_positions(self, n: int) -> None:
        """Keep the first n positions' rows only (the rest freed), once the KV pool bounds the positions served.
        Before any CUDA graph is captured: a graph holds the table's address."""
        if n < self.cos.shape[0]:
            self.cos, self.sin = self.cos[:n].clone(), self.sin[:n].clone()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
        """q: [T, Hq, D], k: [T, Hkv, D] rotated by the looked-up angles."""
        cos, sin = cos_sin
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim // 2] (float32) and the factor on cos and sin, by transformers'
    formulas: plain, linear (frequencies / factor), llama3 (see _llama3_frequencies) or yarn (frequencies that
    interpolate by factor below the trained length's slowest rotations and keep the fast ones, with a ramp
    between, and cos and sin scaled by 0.1 ln(factor) + 1 unless attention_factor or mscale says otherwise)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    if scaling is None:
        return 1.0 / (theta ** exponents), 1.0
    if scaling.rope_type == "linear":
        return 1.0 / (theta ** exponents) / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        return _llama3_frequencies(1.0 / (theta ** exponents), scaling), 1.0
    factor = scaling.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension whose wavelength makes `rotations` turns
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** exponents
    keep = 1 - ramp  # 1: extrapolate (fast dimensions keep their frequency), 0: interpolate by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling: a rotation whose wavelength is longer than original / low_freq_factor positions is
    slowed by factor, one shorter than original / high_freq_factor is kept, and one between is blended, its
    weight on the kept frequency rising linearly in original / wavelength from low_freq_factor to
    high_freq_factor."""
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    kept = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - kept) * inv_freq / scaling.factor + kept * inv_freq
    long_waves = wavelength > original / scaling.low_freq_factor
    short_waves = wavelength < original / scaling.high_freq_factor
    return torch.where(long_waves, inv_freq / scaling.factor, torch.where(short_waves, inv_freq, blended))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
