"""Engine configuration: one frozen dataclass, built in one place, validated with ValueError."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields

DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
KV_CACHE_DTYPES = ("auto", "fp8")

# On CPU, with no num_kvcache_blocks given, the pool holds enough blocks for max_num_seqs sequences of
# max_model_len tokens, capped at this many GiB of K and V together.
DEFAULT_CPU_KVCACHE_GIB = 4.0
# On GPU, the share of the device's memory the engine may fill: weights, the warm-up's peak activations, and
# the KV cache in what is left.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# JSON mode: the seconds of the engine's time one request's token masks may take to compute (cache misses, on the
# engine's loop, where every other request waits for them); past it the request fails. 0: no bound. The first
# document of a 200-property schema took 8.4 s of misses on a 2-core CPU (docs/ENGINE.md, JSON mode).
DEFAULT_JSON_MASK_BUDGET_S = 20.0
# What `device` may say: "auto", "cpu", "cuda" or "cuda:N".
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# The fields __post_init__ wants as Python ints (or None, for the last two), and as Python numbers.
_INT_FIELDS = ("kvcache_block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size", "seed",
               "num_kvcache_blocks", "max_model_len")
_FLOAT_FIELDS = ("gpu_memory_utilization", "cpu_kvcache_gib", "json_mask_budget_s")
_FLOAT_MAX = 1.7976931348623157e308  # a Python float's largest


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Every engine knob. `LLM(model_dir, **kwargs)` takes keywords that name a field here; any other is a ValueError
    listing the valid ones (from_kwargs). Each field is checked here, with a ValueError naming it."""

    model: str
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: str = "auto"  # "auto": the checkpoint's dtype on GPU, float32 on CPU
    enforce_eager: bool = False  # True turns CUDA graphs off
    attention_backend: str = "auto"
    # The KV cache's element type: "auto" the model's dtype; "fp8" float8 e4m3 (half the bytes a token, so twice
    # the tokens in the same memory and half the bytes decode attention reads), K and V rounded to it as stored.
    # It changes results (not bitwise equal to "auto"); the torch and triton backends serve it (triton on CUDA
    # from compute capability 8.9), flash-attn does not.
    kv_cache_dtype: str = "auto"
    kvcache_block_size: int = 16
    num_kvcache_blocks: int | None = None  # None: sized from memory (GPU) or the CPU default
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings (stretched by RoPE scaling)
    # RoPE scaling over config.json's, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 32768}: its keys replace the config's (a read-only model volume)
    rope_scaling: dict | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    cpu_kvcache_gib: float = DEFAULT_CPU_KVCACHE_GIB
    enable_prefix_caching: bool = True
    # Overlap scheduling: schedule and launch a decode step while the previous one still computes. None turns
    # it on where it pays, CUDA with tensor_parallel_size 1; on CPU every kernel runs in place, so there is
    # nothing to overlap (True still works there: tests use it).
    overlap_scheduling: bool | None = None
    # Fused elementwise kernels (engine_service/model/fused_ops.py: residual add + RMSNorm, q/k-norm + RoPE,
    # SiLU * up). None turns them on where Triton compiles them, CUDA without TRITON_INTERPRET=1, except in
    # float64; True on CPU needs the interpreter (tests); False keeps torch's eager ops (the reference, and
    # the A/B baseline).
    fused_ops: bool | None = None
    # Decode GEMMs of our own (engine_service/model/gemm.py): where CUDA graphs are captured (CUDA, the triton
    # backend, tensor_parallel_size 1, bfloat16 or float16), start-up times Triton GEMM tiles against torch's at
    # every captured batch size and uses a tile where it is faster. False keeps torch's GEMMs everywhere.
    triton_gemm: bool = True
    # Programmatic dependent launch for the engine's Triton kernels (engine_service/pdl.py): each may be launched
    # before the kernel ahead of it ends, and waits for it on the device. CUDA of compute capability 9.0+ only;
    # off by default until measured.
    pdl: bool = False
    # Two-batch overlap for CUDA-graph decode steps (engine_service/cuda_graphs.py): captured batches of at least
    # 32 sequences run as two halves, each's GEMMs and elementwise kernels on a high-priority stream while the
    # other's attention runs, so the latency-bound GEMMs hide under the bandwidth-bound attention. Only where
    # decode graphs are captured (CUDA, the triton backend, one rank, not enforce_eager); off by default until
    # measured.
    two_batch_overlap: bool = False
    # JSON mode: the seconds of engine time one request's mask cache misses may take before the request fails
    # (docs/ENGINE.md, JSON mode); 0 for no bound.
    json_mask_budget_s: float = DEFAULT_JSON_MASK_BUDGET_S
    seed: int = 0  # seeds unseeded sampling, so a run is repeatable

    def __post_init__(self) -> None:
        # numpy's scalars (np.int64, np.float32: what arrays and argument parsers built on them give) as the Python
        # numbers they stand for, as SamplingParams takes them; a numpy float for an integer is still refused below.
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            value = getattr(self, name)
            if type(value) not in (bool, int, float) and isinstance(value, numbers.Real):  # np.float64 too
                if isinstance(value, numbers.Integral):
                    object.__setattr__(self, name, int(value))
                elif name in _FLOAT_FIELDS:
                    object.__setattr__(self, name, float(value))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8" and self.attention_backend == "flash_attn":
            raise ValueError("attention_backend='flash_attn' reads a KV cache in the model's dtype only: with "
                             "kv_cache_dtype='fp8' use attention_backend 'auto', 'triton' (CUDA compute capability "
                             "8.9+) or 'torch'")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a str, N a device index such as 0), "
                             f"got {self.device!r}")
        positive = ["kvcache_block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kvcache_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.rope_scaling is not None and (
            not isinstance(self.rope_scaling, dict) or not all(isinstance(k, str) for k in self.rope_scaling)
        ):
            raise ValueError(f"rope_scaling must be a dict such as {{'rope_type': 'yarn', 'factor': 4.0, "
                             f"'original_max_position_embeddings': 32768}}, got {self.rope_scaling!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running decode is scheduled every step, one token each.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), so that every running sequence can decode each step"
            )
        overlap = self.overlap_scheduling
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap_scheduling must be True, False or None (auto), got {overlap!r}")
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda:"):
            # Rank i takes cuda:i; one device named for every rank put them all on it (NCCL refuses two ranks on
            # one GPU, at the group's first collective).
            raise ValueError(
                f"device={self.device!r} names one GPU, and tensor_parallel_size {self.tensor_parallel_size} needs "
                f"one a rank: give device 'cuda' (rank i takes cuda:i) and pick the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if overlap and self.tensor_parallel_size > 1:
            raise ValueError(
                "overlap_scheduling=True needs tensor_parallel_size 1; leave it None (auto) or set it False"
            )
        if self.fused_ops is not None and not isinstance(self.fused_ops, bool):
            raise ValueError(f"fused_ops must be True, False or None (auto), got {self.fused_ops!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "triton_gemm", "pdl", "two_batch_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                # math.isfinite raised OverflowError on an integer past a float's range, naming no field
                raise ValueError(f"{name} must be a finite number, got an integer past a float's range "
                                 f"({value.bit_length()} bits)")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kvcache_gib <= 0:
            raise ValueError(f"cpu_kvcache_gib must be positive, got {self.cpu_kvcache_gib}")
        if self.json_mask_budget_s < 0:
            raise ValueError(f"json_mask_budget_s must be 0 (no bound) or a positive number of seconds, got "
                             f"{self.json_mask_budget_s}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> EngineConfig:
        """Build from keyword arguments, refusing names that are not config fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown engine argument(s) {unknown}; valid ones are {sorted(known - {'model'})}"
            )
        return cls(model=str(model), **kwargs)  # type: ignore[arg-type]
