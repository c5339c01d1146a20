"""Programmatic dependent launch (PDL) for the engine's own Triton kernels, on Hopper and later (EngineConfig.pdl).

A decode step is some 280 kernels, most of a few microseconds, and the GPU sits idle in the gaps between them
(3% of a step mid workload A on the H200, 2026-11-30). A kernel launched with PDL may be scheduled before the
kernel ahead of it in the stream has finished; its first instruction (griddepcontrol.wait, `gdc_wait`) then
blocks until that kernel has completed and its writes are visible, so what overlaps is the launch itself, never
a read of unfinished data. Each kernel that takes part starts with `if PDL: gdc_wait()` and is launched with
`**launch_kwargs(tensor)`, which adds `PDL=True` and triton's `launch_pdl=True` where it is on for that tensor's
device; CUDA graphs capture the launches with their programmatic edges. Off by default until the GPU check
measures what it gives.

The setting is kept per device for the whole process (kernels are launched from functions that know their
tensors, not their engine): the last engine started on a device sets it for every engine on that device. The
server runs one engine a process; where two live side by side, give them the same setting (a differing one
never changes a result, but the other engine would compile the other variants mid-serving).
"""

from __future__ import annotations

import torch

_ON = {"PDL": True, "launch_pdl": True}
_devices: set[int] = set()


def enable(device: torch.device, on: bool) -> None:
    """Launch this CUDA device's kernels with PDL (on) or plainly; ValueError on a device that cannot."""
    if device.type != "cuda":
        if on:
            raise ValueError(f"pdl=True needs a CUDA device, got {device}; leave pdl off")
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    if not on:
        _devices.discard(index)
        return
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        raise ValueError(f"pdl=True needs compute capability 9.0 or later (Hopper); {device} has {major}.{minor}: "
                         "leave pdl off")
    _devices.add(index)


def launch_kwargs(t: torch.Tensor) -> dict:
    """What a launch of one of the engine's kernels on t's device adds: {} unless PDL is on there."""
    return _ON if t.device.type == "cuda" and t.device.index in _devices else {}
