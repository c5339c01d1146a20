"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the stream: it waits
for every kernel already queued. A step that builds its inputs while the previous step still computes
(overlap scheduling, engine.py) must never do that, so every per-step upload goes through here: pinned
memory and an asynchronous copy on CUDA (the caching host allocator keeps the pinned block until the copy
has run), a plain tensor elsewhere.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a list of equal-length lists) as a tensor on `device`; never synchronises."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
