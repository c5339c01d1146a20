"""Failure modes other inference servers shipped in their attention backends and step inputs, checked against ours.

Triton kernels run under the interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA); shapes are
tiny. References are the float64 per-sequence attention of triton_ref, which gathers exactly each context's keys.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_service import attention
from engine_service.attention import torch_backend
from engine_service.attention.base import AttentionMetadata
from engine_service.attention.triton_ref import make_paged_batch, ref_paged_attention
from tests.support import require_triton_interpreter

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def installed(monkeypatch):
    import numpy

    present: set[str] = set()
    monkeypatch.setattr(attention, "_importable", lambda name: name in present)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels, as on a GPU machine
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    return present


def test_flash_attn_is_never_picked_for_a_model_in_float32_or_float64_and_refused_when_named(installed):
    """flash-attn's kernels take float16 and bfloat16 only: a float32 model on a GPU with flash-attn installed and
    a block size it pages failed its first step with flash-attn's own RuntimeError."""
    installed |= {"flash_attn", "triton"}
    for half in (torch.float16, torch.bfloat16):
        assert attention.resolve_backend_name("auto", CUDA, 256, "auto", half) == "flash_attn"
        assert attention.resolve_backend_name("flash_attn", CUDA, 256, "auto", half) == "flash_attn"
    assert attention.resolve_backend_name("auto", CUDA, 256, "auto", torch.float32) == "triton"
    for wide in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match=r"float16 or bfloat16 only.*runs in float(32|64).*dtype 'bfloat16'"):
            attention.resolve_backend_name("flash_attn", CUDA, 256, "auto", wide)


def test_triton_attention_is_never_picked_for_a_float64_model_on_cuda_and_refused_when_named(installed):
    """The paged-attention kernel's softmax state is float32 and its dots return float64 for float64 inputs, so
    NVIDIA's compiler rejects it ("loop-carried variable m_i ... re-assigned to fp64"): a float64 engine on a GPU
    failed at its warm-up. On CPU the interpreter runs it (the float64 tests' path), so that stays allowed."""
    installed.add("triton")
    assert attention.resolve_backend_name("auto", CUDA, 16, "auto", torch.float64) == "torch"
    assert attention.resolve_backend_name("auto", CUDA, 16, "auto", torch.float32) == "triton"
    with pytest.raises(ValueError, match=r"triton' on CUDA computes in float32 at most.*attention_backend='torch'"):
        attention.resolve_backend_name("triton", CUDA, 16, "auto", torch.float64)
    assert attention.resolve_backend_name("triton", CPU, 16, "auto", torch.float64) == "triton"


def test_the_runner_resolves_its_backend_with_the_models_dtype(monkeypatch):
    from engine_service import model_runner
    from engine_service.config import EngineConfig

    seen = []

    def resolve(*args, **kwargs):
        seen.append((args, kwargs))
        raise LookupError("stop here")

    monkeypatch.setattr(model_runner, "resolve_backend_name", resolve)
    config = EngineConfig("/m", device="cpu", dtype="float64", attention_backend="torch")
    with pytest.raises(LookupError):
        model_runner.ModelRunner(config, SimpleNamespace(torch_dtype="float32"), 64, SimpleNamespace(rank=0, size=1))
    ((args, kwargs),) = seen
    assert torch.float64 in (*args, *kwargs.values())


def _leftovers_batch(q_lens, ctx, poison, block_size=8, heads=4, kv_heads=2, d=16, dtype=torch.float64):
    """A paged batch whose cache holds `poison` in every slot past each sequence's context, as a freed block keeps
    another request's values (an fp16 overflow's inf, an fp8 cache's NaN); padding lanes' tables name a block no
    sequence owns, whose first slot is poisoned too. Returns (batch, slots of the new tokens)."""
    b = make_paged_batch(q_lens, ctx, heads, kv_heads, d, block_size, dtype=dtype, table_fill=0,
                         generator=torch.Generator().manual_seed(len(ctx)))
    owned = {int(x) for i, c in enumerate(ctx) for x in b.block_tables[i, : -(-c // block_size)]}
    spare = min(set(range(b.k_cache.shape[0])) - owned)
    for i, c in enumerate(ctx):
        if c == 0:  # a padding lane: its table names a block no sequence owns, holding leftovers
            b.block_tables[i] = spare
            b.k_cache[spare, 0] = b.v_cache[spare, 0] = poison
            continue
        last = int(b.block_tables[i, (c - 1) // block_size])
        for cache in (b.k_cache, b.v_cache):
            cache[last, (c - 1) % block_size + 1 :] = poison
    slots = [int(b.block_tables[i, p // block_size]) * block_size + p % block_size
             for i, (n, c) in enumerate(zip(q_lens, ctx, strict=True)) for p in range(c - n, c)]
    return b, torch.tensor(slots, dtype=torch.long)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_torch_backend_never_reads_a_freed_blocks_leftovers_past_a_context(monkeypatch, fused, poison):
    """A shorter context batched with a longer one gathered keys up to the longer one's length from its own last
    block and its table's padding: masked out, a NaN or inf there still made 0 * NaN in the softmax's weighted sum,
    and a healthy request's attention NaN because of what an earlier one left in a reused block."""
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused and torch_backend.SDPA_GQA)  # a torch without it: matmuls
    q_lens, ctx = [1, 1, 1, 5, 3], [3, 12, 9, 5, 11]
    b, slots = _leftovers_batch(q_lens, ctx, poison)
    d, kv_heads = b.q.shape[2], b.k_cache.shape[2]
    k_new = b.k_cache.view(-1, kv_heads, d)[slots].clone()
    v_new = b.v_cache.view(-1, kv_heads, d)[slots].clone()
    meta = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=b.cu_seqlens_q, context_lens=b.context_lens, block_tables=b.block_tables,
        num_decode_seqs=3, max_seqlen_q=max(q_lens), max_context_len=max(ctx), block_size=8, q_lens=q_lens,
        ctx_lens=ctx,
    )
    out = torch_backend.TorchAttentionBackend().forward(b.q, k_new, v_new, b.k_cache, b.v_cache, meta, d**-0.5)
    ref = ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, d**-0.5)
    assert bool(ref.isfinite().all())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
def test_torch_backend_padding_lanes_are_zeros_whatever_their_tables_block_holds(monkeypatch, fused):
    """A padding lane (context 0) attends to key 0 of its table's first block so that its softmax is finite, then
    is zeroed: multiplied by 0, a NaN there stayed NaN."""
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused and torch_backend.SDPA_GQA)  # a torch without it: matmuls
    ctx = [19, 0, 6, 0]
    b, real_slots = _leftovers_batch([1, 1, 1, 1], ctx, float("nan"))
    slots = torch.full((4,), -1, dtype=torch.long)
    slots[[0, 2]] = real_slots[[0, 2]]
    d, kv_heads = b.q.shape[2], b.k_cache.shape[2]
    k_new = b.k_cache.view(-1, kv_heads, d)[slots.clamp(min=0)].clone()
    v_new = b.v_cache.view(-1, kv_heads, d)[slots.clamp(min=0)].clone()
    meta = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=b.cu_seqlens_q, context_lens=b.context_lens, block_tables=b.block_tables,
        num_decode_seqs=4, max_seqlen_q=1, max_context_len=19, block_size=8, has_padding=True, q_lens=[1] * 4,
        ctx_lens=ctx,
    )
    out = torch_backend.TorchAttentionBackend().forward(b.q, k_new, v_new, b.k_cache, b.v_cache, meta, d**-0.5)
    assert bool((out[[1, 3]] == 0).all())
    ref = ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, d**-0.5)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_attention_never_reads_a_freed_blocks_leftovers_past_a_context(splits):
    """The same leftovers under the Triton kernel (decode, prefill over a prefix, padding lanes, KV splits that
    get no keys): only each context's keys are loaded, so every row equals the reference."""
    require_triton_interpreter()
    from engine_service.attention import triton_kernels as tk

    q_lens, ctx = [1, 1, 1, 1, 5, 3], [3, 12, 0, 9, 5, 11]
    b, _ = _leftovers_batch(q_lens, ctx, float("nan"), dtype=torch.float32)
    out = tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.25,
                             max(q_lens), num_kv_splits=splits)
    ref = ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 0.25)
    assert bool(out.isfinite().all())
    assert float((out.double() - ref).abs().max()) <= 2e-5


@pytest.mark.parametrize("head_dim,block_size,heads,kv_heads", [
    (80, 1, 5, 1),  # a head_dim that is no power of two, one-token blocks, MQA with 5 query heads
    (256, 3, 6, 2),  # past 128 (Gemma-sized), a block size of 3, GQA 3
])
def test_both_backends_at_odd_head_dims_block_sizes_and_gqa(head_dim, block_size, heads, kv_heads):
    """Paged kernels written for head_dim 64/128 and power-of-two blocks gave wrong answers at 80, 96, 112 or 256
    and at block size 1; decodes whose context ends a block, and a chunk that starts mid-block after a cached
    prefix, beside them."""
    require_triton_interpreter()
    from engine_service.attention import triton_kernels as tk

    q_lens = [1, 1, 4, 3]
    ctx = [6 * block_size, 2 * block_size + 1, 4 * block_size + 2, 3]  # a block's end; mid-block chunk starts
    b = make_paged_batch(q_lens, ctx, heads, kv_heads, head_dim, block_size, table_fill=0,
                         generator=torch.Generator().manual_seed(head_dim))
    scale = head_dim**-0.5
    ref = ref_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, scale)
    out = tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, scale,
                             max(q_lens), num_kv_splits=2)
    assert float((out.double() - ref).abs().max()) <= 2e-5
    slots = torch.tensor([int(b.block_tables[i, p // block_size]) * block_size + p % block_size
                          for i, (n, c) in enumerate(zip(q_lens, ctx, strict=True)) for p in range(c - n, c)])
    meta = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=b.cu_seqlens_q, context_lens=b.context_lens, block_tables=b.block_tables,
        num_decode_seqs=2, max_seqlen_q=max(q_lens), max_context_len=max(ctx), block_size=block_size,
        q_lens=q_lens, ctx_lens=ctx,
    )
    k_new = b.k_cache.view(-1, kv_heads, head_dim)[slots].clone()
    v_new = b.v_cache.view(-1, kv_heads, head_dim)[slots].clone()
    got = torch_backend.TorchAttentionBackend().forward(b.q, k_new, v_new, b.k_cache, b.v_cache, meta, scale)
    assert float((got.double() - ref).abs().max()) <= 2e-5
