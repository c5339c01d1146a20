"""The fused elementwise kernels (engine_service/model/fused_ops.py) against the torch layers they replace,
on CPU under Triton's interpreter, and the engine's tokens with them on and off.

fp32 and fp16 only: the interpreter rounds float32 to bfloat16 unlike the GPU and torch (its residual add
already differs from torch's), so bf16 is checked on the GPU (scripts/gpu_kernel_check.py, part b)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support import require_triton_interpreter

require_triton_interpreter()

from engine_service.model import fused_ops  # noqa: E402  (after the interpreter check)
from engine_service.model.layers import RMSNorm, RotaryEmbedding  # noqa: E402


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: the same up to the order of a row's sum of squares; fp16/bf16: at most one unit in the last
    place of the dtype at the value (that order can move a rounding across a boundary), and mostly equal."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    assert ((got.float() - want.float()).abs() <= ulp + 1e-30).all()
    assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hidden", [256, 200])
def test_add_rms_norm_matches_add_then_rmsnorm(dtype, hidden):
    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.rand(hidden) + 0.5
    norm = norm.to(dtype)
    x = torch.randn(7, hidden).to(dtype)
    residual = torch.randn(7, hidden).to(dtype)

    out, total = fused_ops.add_rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(total, residual + x)  # the residual stream is rounded exactly as torch's add
    _close(out, norm(residual + x))

    out, total = fused_ops.add_rms_norm(x, norm.weight, norm.eps, None)  # the first layer: no residual yet
    assert total is x
    _close(out, norm(x))

    empty = torch.empty(0, hidden, dtype=dtype)
    assert fused_ops.add_rms_norm(empty, norm.weight, norm.eps, empty)[0].shape == (0, hidden)


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,head_dim,norm",
    [(torch.float32, 4, 2, 128, True), (torch.float16, 16, 8, 128, True), (torch.float32, 5, 1, 80, True),
     (torch.float16, 32, 8, 64, False), (torch.float32, 6, 2, 32, False)],
    ids=["fp32-gqa2", "fp16-qwen3-heads", "fp32-gqa5-hd80", "fp16-rope-only", "fp32-rope-only"],
)
def test_qk_norm_rope_matches_norms_then_rotary(dtype, heads, kv_heads, head_dim, norm):
    """norm=False: the families without q/k-norm (Llama, Mistral, Qwen2) rotate the projections as they are."""
    torch.manual_seed(1)
    t = 6
    q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
    q_norm.weight.data = torch.rand(head_dim) + 0.5
    k_norm.weight.data = torch.rand(head_dim) + 0.5
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    rotary = RotaryEmbedding(head_dim, 64, 1_000_000.0, dtype)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([0, 1, 5, 17, 40, 63])
    cos, sin = rotary.lookup(positions)  # [T, 1, D]

    weights = (q_norm.weight, k_norm.weight, q_norm.eps) if norm else (None, None, 0.0)
    q, k = fused_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, *weights, cos[:, 0], sin[:, 0])

    q_ref, k_ref, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref, k_ref = q_ref.reshape(t, heads, head_dim), k_ref.reshape(t, kv_heads, head_dim)
    if norm:
        q_ref, k_ref = q_norm(q_ref), k_norm(k_ref)
    q_ref, k_ref = RotaryEmbedding.apply(q_ref, k_ref, (cos, sin))
    _close(q, q_ref)
    _close(k, k_ref)
    if not norm:  # no sum of squares to order differently: each rounding is torch's
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def _store_both_ways(qkv, heads, kv_heads, head_dim, weights, cos, sin, k_cache, v_cache, slots):
    """K and V stored into the caches by the fused kernel, and into copies of them (returned) as the unfused path
    stores them: the unfused kernel's k and the projection's v through store_kvcache. q must be the same."""
    from engine_service.attention.triton_kernels import store_kvcache

    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_plain, k_plain = fused_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, *weights, cos[:, 0], sin[:, 0])
    v = qkv[:, (heads + kv_heads) * head_dim:].view(qkv.shape[0], kv_heads, head_dim)
    store_kvcache(k_plain, v, k_want, v_want, slots)
    q, k = fused_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, *weights, cos[:, 0], sin[:, 0],
                                  cache=(k_cache, v_cache, slots))
    assert k is None and torch.equal(q, q_plain)
    return k_want, v_want


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,norm,block_size,t",
                         [(torch.float32, 4, 2, 64, True, 16, 7), (torch.float16, 6, 2, 128, True, 5, 7),
                          (torch.float16, 8, 8, 32, False, 8, 7), (torch.float32, 5, 3, 80, True, 7, 7),
                          (torch.float16, 7, 7, 96, False, 16, 1)],
                         ids=["fp32-gqa2", "fp16-gqa3-block5", "fp16-rope-only", "fp32-odd-heads-hd80",
                              "fp16-one-token-hd96"])
def test_qk_norm_rope_can_store_k_and_v_in_their_cache_slots(dtype, heads, kv_heads, head_dim, norm, block_size, t):
    """With the cache given, K and V land in their slots bit for bit as the separate KV store puts the unfused
    kernel's k and the projection's v there; a padding slot (-1) writes nothing; q is the same. Head counts and
    head_dim / 2 that are not powers of two exercise the kernel's masks; one token, a batch of one."""
    torch.manual_seed(4)
    num_blocks = 6
    rotary = RotaryEmbedding(head_dim, 64, 10_000.0, dtype)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim).to(dtype)
    cos, sin = rotary.lookup(torch.tensor([3, 0, 9, 1, 30, 2, 5][:t]))
    weights = ((torch.rand(head_dim) + 0.5).to(dtype), (torch.rand(head_dim) + 0.5).to(dtype), 1e-6) if norm \
        else (None, None, 0.0)
    slots = torch.randperm(num_blocks * block_size)[:t]
    if t > 5:
        slots[[1, 5]] = -1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    k_want, v_want = _store_both_ways(qkv, heads, kv_heads, head_dim, weights, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)

    with pytest.raises(ValueError, match="do not take"):
        fused_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, *weights, cos[:, 0], sin[:, 0],
                               cache=(k_cache.float() if dtype != torch.float32 else k_cache.half(), v_cache, slots))
    with pytest.raises(ValueError, match="slot_mapping has shape"):
        fused_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, *weights, cos[:, 0], sin[:, 0],
                               cache=(k_cache, v_cache, slots[:0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_norm_rope_stores_into_an_fp8_cache_as_the_separate_store_does(dtype):
    """kv_cache_dtype="fp8": K is rounded to the model dtype, then to e4m3, as the unfused path's K is before
    store_kvcache rounds it; V straight to e4m3. The same bits either way; a padding slot writes nothing."""
    torch.manual_seed(5)
    t, heads, kv_heads, head_dim, num_blocks, block_size = 7, 4, 2, 64, 4, 8
    rotary = RotaryEmbedding(head_dim, 64, 10_000.0, dtype)
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * head_dim) * 200).to(dtype)  # some beyond e4m3's 448
    cos, sin = rotary.lookup(torch.tensor([3, 0, 9, 1, 30, 2, 5]))
    weights = ((torch.rand(head_dim) + 0.5).to(dtype), (torch.rand(head_dim) + 0.5).to(dtype), 1e-6)
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[2] = -1
    fp8 = torch.float8_e4m3fn
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randint(0, 120, shape, dtype=torch.uint8).view(fp8) for _ in range(2))
    k_want, v_want = _store_both_ways(qkv, heads, kv_heads, head_dim, weights, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.uint8), k_want.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_want.view(torch.uint8))
    assert v_want.float().abs().max() == 448  # the saturating values were met


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("inter", [3072, 100])
def test_silu_and_mul_matches_silu_times_up(dtype, inter):
    torch.manual_seed(2)
    gate_up = (3 * torch.randn(5, 2 * inter)).to(dtype)
    gate, up = gate_up.split([inter, inter], dim=-1)
    got = fused_ops.silu_and_mul(gate_up)
    want = F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # exp's implementation may differ
    else:
        _close(got, want)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_engine_tokens_are_the_same_with_fused_ops_on_and_off(tmp_path, model_type):
    """Greedy tokens through the whole engine (prefill, decode, a cached prefix), fp32 on CPU; Llama has no
    q/k-norm, so its fused RoPE runs alone."""
    from engine_service import LLM, SamplingParams
    from tests.integration.tiny import VOCAB, make_family

    make_family(tmp_path, model_type, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32,
                tie=True)
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    tokens = {}
    # triton: the fused kernel also stores K and V (the backend takes them stored).
    for fused, backend in ((False, "torch"), (True, "torch"), (True, "triton")):
        with LLM(str(tmp_path), device="cpu", dtype="float32", attention_backend=backend, fused_ops=fused,
                 kvcache_block_size=8, num_kvcache_blocks=64, max_model_len=128) as llm:
            assert llm.runner.fused_ops is fused and llm.runner.backend.takes_stored_kv is (backend == "triton")
            model = llm.runner.model
            layer = model.layers[-1]
            assert {m.fused_ops is not None for m in (layer.mlp, layer.self_attn, layer.input_layernorm,
                                                      layer.post_attention_layernorm, model.norm)} == {fused}
            tokens[fused, backend] = [o["token_ids"] for o in llm.generate(prompts, [params] * len(prompts))]
    assert tokens[True, "torch"] == tokens[False, "torch"] == tokens[True, "triton"]
    assert all(len(t) == 8 for t in tokens[True, "triton"])


def test_fused_ops_choice_and_refusals():
    """Auto: on only for CUDA with compiled Triton and never in float64; True refuses float64 (the kernels
    compute in float32) and, on CPU, anything but the interpreter; inputs with strided columns are refused."""
    from engine_service.model_runner import resolve_fused_ops

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fused_ops(None, cpu, torch.float32) is False
    assert resolve_fused_ops(None, cuda, torch.bfloat16) is False  # TRITON_INTERPRET=1 in this process
    assert resolve_fused_ops(True, cpu, torch.float32) is True  # the interpreter: tests
    assert resolve_fused_ops(False, cpu, torch.float32) is False
    with pytest.raises(ValueError, match="float64"):
        resolve_fused_ops(True, cpu, torch.float64)
    with pytest.raises(ValueError, match="unset TRITON_INTERPRET"):
        resolve_fused_ops(True, cuda, torch.bfloat16)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="unit column strides"):
        fused_ops.add_rms_norm(x.t(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="even width"):
        fused_ops.silu_and_mul(torch.randn(2, 7))
