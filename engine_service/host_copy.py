"""Host lists to device tensors without waiting for the device, and the device a block of launches targets.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the stream: it waits
for every kernel already queued. A step that builds its inputs while the previous step still computes
(overlap scheduling, engine.py) must never do that, so every per-step upload goes through here: pinned
memory and an asynchronous copy on CUDA (the caching host allocator keeps the pinned block until the copy
has run), a plain tensor elsewhere.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

# Integer lists go through numpy: torch.tensor converts a list element by element (0.6 ms for a prefill step's
# 8,192 token ids on the 2-core CPU machine, against 0.2 ms), and a prefill step uploads three such lists before
# its first kernel can run.
_NUMPY_INTS = {torch.int64: np.int64, torch.int32: np.int32}


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a list of equal-length lists) as a tensor on `device`; never synchronises."""
    np_dtype = _NUMPY_INTS.get(dtype)
    if np_dtype is None:
        if device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=device)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    array = np.array(values, dtype=np_dtype)
    if device.type != "cuda":
        return torch.from_numpy(array).to(device)
    host = torch.empty(array.shape, dtype=dtype, pin_memory=True)
    host.numpy()[...] = array
    return host.to(device, non_blocking=True)


def tensor_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; never synchronises (on CUDA it is first copied into pinned memory)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def rows_to_device(rows: list[list[int]], width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`rows` padded with 0 to `width`, as a [len(rows), width] tensor on `device`; never synchronises. Filled
    row by row through numpy: torch.tensor converts a nested list element by element (1.8 ms for 256 block
    tables of 128 blocks, against 0.35 ms)."""
    pin = device.type == "cuda"
    out = torch.zeros((len(rows), width), dtype=dtype, pin_memory=pin)
    view = out.numpy()
    for i, row in enumerate(rows):
        view[i, : len(row)] = row
    return out.to(device, non_blocking=pin)


def on_device(device: torch.device):
    """A context making `device` the current CUDA device (a no-op elsewhere). Triton launches and graph
    captures target the current device, which is per thread: the engine loop's thread starts on device 0,
    while a runner may own cuda:1."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
