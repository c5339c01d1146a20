"""Programmatic dependent launch (engine_service/pdl.py): refused where it cannot run, and, where it is on, every
launch of the kernels that take part carries it (the GPU checks what it does; compile-only checks that each
kernel waits before its first global access)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_service import pdl


def test_pdl_is_refused_off_cuda_and_off_by_default(tmp_path):
    from engine_service import LLM
    from engine_service.config import EngineConfig
    from tests.integration.tiny import make_qwen3

    with pytest.raises(ValueError, match="pdl=True needs a CUDA device"):
        pdl.enable(torch.device("cpu"), True)
    pdl.enable(torch.device("cpu"), False)  # nothing to turn off, and no CUDA query on the way
    assert EngineConfig(model=str(tmp_path)).pdl is False
    with pytest.raises(ValueError, match="pdl must be True or False"):
        EngineConfig(model=str(tmp_path), pdl="yes")
    make_qwen3(tmp_path, layers=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="pdl=True needs a CUDA device, got cpu"):
        LLM(str(tmp_path), device="cpu", dtype="float32", pdl=True, num_kvcache_blocks=8)
    assert pdl.launch_kwargs(torch.empty(1)) == {}


def test_where_pdl_is_on_the_kernels_launch_with_it(monkeypatch):
    """A stand-in CUDA tensor on a device marked on: the attention plan's launches (attention and split merge)
    take PDL and launch_pdl; on another device, or off, they take neither."""
    from engine_service.attention import triton_kernels as tk
    from engine_service.attention.triton_ref import make_paged_batch

    monkeypatch.setattr(pdl, "_devices", {0})
    assert pdl.launch_kwargs(SimpleNamespace(device=torch.device("cuda", 0))) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_kwargs(SimpleNamespace(device=torch.device("cuda", 1))) == {}
    b = make_paged_batch([1, 1], [40, 9], 4, 2, 16, 8)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.1, 1, torch.empty_like(b.q), 2)
    monkeypatch.setattr(pdl, "launch_kwargs", lambda t: {"PDL": True, "launch_pdl": True})
    on = tk._plan_paged_attention(*args)
    assert len(on) == 2 and all(x.options["PDL"] and x.options["launch_pdl"] for x in on)
    monkeypatch.setattr(pdl, "launch_kwargs", lambda t: {})
    assert all("PDL" not in x.options and "launch_pdl" not in x.options for x in tk._plan_paged_attention(*args))
