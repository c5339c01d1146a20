"""The engine service: scheduler, block manager, model runner and the gRPC servicer over them.

`LLM`, `LLMEngine` and `SamplingParams` are exported lazily, so that importing the pure-Python parts
(scheduler, block manager, sequence) does not import torch.
"""

from __future__ import annotations

from engine_service.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "LLMEngine"):
        from engine_service import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'engine_service' has no attribute {name!r}")
