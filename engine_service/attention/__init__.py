"""Attention backends behind one interface, chosen by `attention_backend`.

- torch: the reference; batched tensor operations on any device.
- triton: KV-store and paged-attention kernels; CUDA, or CPU under TRITON_INTERPRET=1.
- flash_attn: where the package imports, the block size suits its paged kernels (multiples of 256) and the model
  runs in float16 or bfloat16 (its kernels take nothing else).
- auto: flash_attn where it fits, then triton on CUDA (unless TRITON_INTERPRET=1, or the model runs in float64, which
  the kernels do not compile for there), else torch.

Imports are lazy, so a machine without triton or flash-attn still imports the engine.

The KV cache holds the model's dtype, or with `kv_cache_dtype="fp8"` float8 e4m3 (half the bytes): K and V are
rounded to it as they are stored (to nearest, ties to even, saturating at +-448, with no scale factor), and
read back into the model's dtype for attention. The torch and triton backends both serve it; flash-attn does not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re

import torch

from engine_service.attention.base import AttentionBackend, AttentionMetadata, longest_first
from engine_service.config import KV_CACHE_DTYPES

log = logging.getLogger(__name__)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "check_interpreter_numpy",
    "check_triton_usable",
    "compiled_triton",
    "kv_cache_torch_dtype",
    "longest_first",
    "make_backend",
    "resolve_backend_name",
    "to_kv_cache",
    "triton_interpreted",
]

FLASH_ATTN_BLOCK_MULTIPLE = 256
# flash-attn's kernels take half precision only (a float32 or float64 model fails its first step there).
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value: larger K/V saturate to it, as no scale factor is applied
# Triton converts to e4m3 in hardware from compute capability 8.9 (Ada, Hopper) on.
FP8_MIN_CAPABILITY = (8, 9)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype for "auto", float8 e4m3 for "fp8"."""
    if kv_cache_dtype == "fp8":
        return FP8_KV_DTYPE
    if kv_cache_dtype == "auto":
        return model_dtype
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def to_kv_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """K or V rounded to the cache's element type as the Triton kernels round them (to nearest even; for fp8
    clamped to +-FP8_MAX first, so that what is out of range saturates whatever torch's own cast makes of it)."""
    if cache_dtype == FP8_KV_DTYPE:
        return x.clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): a kernel's block size. triton.next_power_of_2 is a
    constexpr function in triton 3.6, about 4 us of host time a call where this takes 0.1; the eager wrappers
    call it several times a layer."""
    return 1 << max(0, int(x) - 1).bit_length()


def triton_interpreted() -> bool:
    """Whether Triton kernels in this process run under the interpreter (chosen when a kernel is decorated).
    Interpreted kernels copy every argument to the host: usable on CPU, never on CUDA tensors (and never
    inside a CUDA-graph capture)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton 3.6's interpreter holds a runtime loop bound (a kernel argument or a loaded value) as a 1-element array
# and turns it into a Python int, which numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted
# to Python scalars"). The attention and sampling kernels both loop to such bounds (a sequence's blocks, the
# vocabulary), so neither can run interpreted there.
INTERPRETER_MAX_NUMPY = (2, 4)


def check_interpreter_numpy(what: str, instead: str) -> None:
    """Refuse, before any step, to run `what` under Triton's interpreter with a numpy it cannot work with;
    `instead` names the way around it in the message."""
    import numpy

    found = tuple(int(part) for part in re.findall(r"\d+", numpy.__version__)[:2])
    if found >= INTERPRETER_MAX_NUMPY:
        raise ValueError(
            f"{what}: on CPU the kernels run under Triton's interpreter, which fails with numpy {numpy.__version__} "
            f"(its loops to bounds known only at run time need numpy<2.4); install 'numpy<2.4' (the project pins it), or {instead}"
        )


def compiled_triton(device: torch.device) -> bool:
    """Whether Triton kernels compile for `device` in this process: CUDA, triton importable, no interpreter.
    What every 'auto' choice of a Triton path (attention, sampling, fused ops) asks."""
    return device.type == "cuda" and _importable("triton") and not triton_interpreted()


def check_triton_usable(what: str, device: torch.device, instead: str) -> None:
    """Refuse an explicit request for Triton kernels (`what`) where they cannot run in this process: triton
    missing, interpreted kernels on CUDA, or the interpreter on CPU with a numpy it fails on. `instead` names
    the way around it in the message."""
    if not _importable("triton"):
        raise ValueError(f"{what} needs the triton package (pip install 'triton==3.6.*')")
    if device.type == "cuda" and triton_interpreted():
        raise ValueError(
            f"{what} on CUDA needs compiled kernels, but TRITON_INTERPRET=1 is set in this process (the "
            f"interpreter runs kernels on the host); unset TRITON_INTERPRET, or {instead}"
        )
    if device.type != "cuda":
        check_interpreter_numpy(what, instead)


def _fp8_too_old(device: torch.device) -> str | None:
    """The CUDA device's compute capability ("8.0") where it is below FP8_MIN_CAPABILITY, too old for the triton
    backend's e4m3 conversions; None where it is recent enough."""
    capability = torch.cuda.get_device_capability(device)
    return ".".join(map(str, capability)) if capability < FP8_MIN_CAPABILITY else None


_FP8_MIN = ".".join(map(str, FP8_MIN_CAPABILITY))


def resolve_backend_name(name: str, device: torch.device, block_size: int, kv_cache_dtype: str = "auto",
                         dtype: torch.dtype | None = None) -> str:
    """Turn 'auto' into a concrete backend and refuse combinations that cannot run. dtype: the model's (None:
    not known yet, so not checked)."""
    on_cuda = device.type == "cuda"
    fp8 = kv_cache_dtype == "fp8"
    half = dtype is None or dtype in FLASH_ATTN_DTYPES
    if name == "auto":
        if (on_cuda and not fp8 and half and _importable("flash_attn")
                and block_size % FLASH_ATTN_BLOCK_MULTIPLE == 0):
            return "flash_attn"
        if compiled_triton(device) and dtype != torch.float64:
            too_old = fp8 and _fp8_too_old(device)
            if not too_old:
                return "triton"
            log.warning("kv_cache_dtype='fp8' on a GPU of compute capability %s: the triton backend needs %s or "
                        "later for e4m3, so attention runs on the torch backend, without CUDA graphs and several "
                        "times slower; kv_cache_dtype='auto' keeps the triton backend", too_old, _FP8_MIN)
        return "torch"
    if name == "flash_attn":
        if not on_cuda or not _importable("flash_attn"):
            raise ValueError("attention_backend='flash_attn' needs CUDA and the flash_attn package")
        if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
            raise ValueError(
                f"attention_backend='flash_attn' needs kvcache_block_size a multiple of "
                f"{FLASH_ATTN_BLOCK_MULTIPLE}, got {block_size}"
            )
        if not half:
            raise ValueError(
                f"attention_backend='flash_attn' computes in float16 or bfloat16 only, and the model runs in "
                f"{str(dtype).removeprefix('torch.')}; use dtype 'bfloat16' or 'float16', or attention_backend "
                f"'torch' (or 'triton', in float32)"
            )
    if name == "triton":
        check_triton_usable("attention_backend='triton'", device, "use attention_backend='torch'")
        if on_cuda and dtype == torch.float64:
            raise ValueError(
                "attention_backend='triton' on CUDA computes in float32 at most (its kernels do not compile for "
                "float64), and the model runs in float64; use attention_backend='torch' (or 'auto', which picks it "
                "for float64), or dtype 'float32', 'bfloat16' or 'float16'"
            )
        if fp8 and on_cuda and (too_old := _fp8_too_old(device)):
            raise ValueError(
                f"kv_cache_dtype='fp8' with the triton backend needs compute capability {_FP8_MIN} or later (Ada, "
                f"Hopper), this GPU has {too_old}; use kv_cache_dtype='auto', or attention_backend='torch'")
    return name


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """Instantiate a concrete backend by name (see resolve_backend_name)."""
    if name == "torch":
        from engine_service.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from engine_service.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(device)
    if name == "flash_attn":
        from engine_service.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}")
