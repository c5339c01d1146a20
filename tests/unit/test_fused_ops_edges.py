"""Host wrappers of the fused ops (engine_service/model/fused_ops.py): the argument checks that keep a kernel from
reading the wrong memory, the strides it is given, and what it leaves alone. Kernels run under the interpreter on
tiny shapes, against plain torch."""

from __future__ import annotations

import pytest
import torch

from tests.support import require_triton_interpreter

require_triton_interpreter()

from engine_service.model import fused_ops  # noqa: E402  (after the interpreter check)


def _rms(s: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def _cos_sin(t: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(t, hd // 2) * 3
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


def test_add_rms_norm_uses_its_eps():
    """eps reaches the kernel: a large one changes the result as it changes torch's."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 32) * 0.1, torch.rand(32) + 0.5
    out, _ = fused_ops.add_rms_norm(x, w, 1.0)
    torch.testing.assert_close(out, _rms(x, w, 1.0), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_without_a_residual_leaves_x_as_it_was():
    """The first layer (no residual yet): x is the residual stream returned, so the kernel must not write it."""
    torch.manual_seed(1)
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    before = x.clone()
    out, total = fused_ops.add_rms_norm(x, w, 1e-6)
    assert total is x and torch.equal(x, before)
    torch.testing.assert_close(out, _rms(before, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_add_rms_norm_refuses_a_residual_with_strided_columns():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unit column strides"):
        fused_ops.add_rms_norm(x, torch.ones(8), 1e-6, torch.randn(8, 4).t())


def test_qk_norm_rope_reads_qkv_rows_through_their_stride():
    """qkv a view of a wider buffer (row stride past its width): each token's row is read where it is."""
    torch.manual_seed(2)
    t, heads, kv, hd = 3, 2, 1, 16
    width = (heads + 2 * kv) * hd
    qkv = torch.randn(t, width + 24)[:, :width]
    cos, sin = _cos_sin(t, hd)
    q, k = fused_ops.qk_norm_rope(qkv, heads, kv, hd, None, None, 0.0, cos, sin)
    q_ref, k_ref, _ = qkv.split([heads * hd, kv * hd, kv * hd], -1)
    torch.testing.assert_close(q, _rope(q_ref.reshape(t, heads, hd), cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, _rope(k_ref.reshape(t, kv, hd), cos, sin), rtol=1e-5, atol=1e-5)


def _qk_args(t=2, heads=2, kv=1, hd=16):
    qkv = torch.randn(t, (heads + 2 * kv) * hd)
    cos, sin = _cos_sin(t, hd)
    return qkv, heads, kv, hd, cos, sin


def test_qk_norm_rope_refuses_one_norm_weight_without_the_other():
    qkv, heads, kv, hd, cos, sin = _qk_args()
    for weights in ((torch.ones(hd), None), (None, torch.ones(hd))):
        with pytest.raises(ValueError, match="both norm weights or neither"):
            fused_ops.qk_norm_rope(qkv, heads, kv, hd, *weights, 1e-6, cos, sin)


def test_qk_norm_rope_refuses_strided_columns_in_each_input():
    qkv, heads, kv, hd, cos, sin = _qk_args()
    strided = {"qkv": torch.randn(qkv.shape[1], 2).t(), "cos": torch.randn(hd, 2).t(), "sin": torch.randn(hd, 2).t()}
    for name, bad in strided.items():
        args = {"qkv": qkv, "cos": cos, "sin": sin, name: bad}
        with pytest.raises(ValueError, match="unit column strides"):
            fused_ops.qk_norm_rope(args["qkv"], heads, kv, hd, None, None, 0.0, args["cos"], args["sin"])


def test_qk_norm_rope_refuses_an_odd_head_dim():
    torch.manual_seed(3)
    t, heads, kv, hd = 2, 2, 1, 15
    qkv, cos, sin = torch.randn(t, (heads + 2 * kv) * hd), torch.randn(t, hd), torch.randn(t, hd)
    with pytest.raises(ValueError, match="even head_dim, got 15"):
        fused_ops.qk_norm_rope(qkv, heads, kv, hd, None, None, 0.0, cos, sin)


@pytest.mark.parametrize("case", ["qkv-narrow", "qkv-3d", "cos-short", "sin-narrow", "weight-short"])
def test_qk_norm_rope_refuses_inputs_smaller_than_it_reads(case):
    """qkv narrower than its heads, cos/sin with fewer rows or columns than qkv's tokens and head_dim, or a norm
    weight shorter than head_dim: the kernel read past each one's end (on a GPU, whatever memory followed)."""
    qkv, heads, kv, hd, cos, sin = _qk_args()
    weights = (torch.ones(hd), torch.ones(hd))
    if case == "qkv-narrow":
        qkv = qkv[:, :-hd].contiguous()
    elif case == "qkv-3d":
        qkv = qkv.view(qkv.shape[0], 1, -1)
    elif case == "cos-short":
        cos = cos[:-1]
    elif case == "sin-narrow":
        sin = sin[:, : hd // 2].contiguous()
    else:
        weights = (torch.ones(hd), torch.ones(hd // 2))
    with pytest.raises(ValueError, match=r"qk_norm_rope takes qkv \[T, "):
        fused_ops.qk_norm_rope(qkv, heads, kv, hd, *weights, 1e-6, cos, sin)


@pytest.mark.parametrize("case", ["weight-short", "residual-short", "x-1d"])
def test_add_rms_norm_refuses_inputs_smaller_than_it_reads(case):
    """A weight shorter than x's rows, or a residual with fewer rows or columns: read past their ends before."""
    x, w, residual = torch.randn(3, 32), torch.ones(32), torch.randn(3, 32)
    if case == "weight-short":
        w = torch.ones(16)
    elif case == "residual-short":
        residual = torch.randn(2, 32)
    else:
        x = torch.randn(32)
    with pytest.raises(ValueError, match=r"add_rms_norm takes x \[T, H\]"):
        fused_ops.add_rms_norm(x, w, 1e-6, residual)


@pytest.mark.parametrize("case", ["shapes-differ", "wrong-heads", "wrong-head-dim", "k-strided", "v-strided",
                                  "foreign-dtype"])
def test_qk_norm_rope_refuses_caches_that_do_not_fit(case):
    """Each cache check on its own: a cache the kernel would index wrongly (or cast into) is refused."""
    qkv, heads, kv, hd, cos, sin = _qk_args()
    shape = (3, 4, kv, hd)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    if case == "shapes-differ":
        v_cache = torch.zeros(4, 4, kv, hd)
    elif case == "wrong-heads":
        k_cache = v_cache = torch.zeros(3, 4, kv + 1, hd)
    elif case == "wrong-head-dim":
        k_cache = v_cache = torch.zeros(3, 4, kv, hd * 2)
    elif case == "k-strided":
        k_cache = torch.zeros(hd, 3, 4, kv).permute(1, 2, 3, 0)
    elif case == "v-strided":
        v_cache = torch.zeros(hd, 3, 4, kv).permute(1, 2, 3, 0)
    else:  # both the same, but neither qkv's dtype nor float8 e4m3
        k_cache, v_cache = k_cache.half(), v_cache.half()
    with pytest.raises(ValueError, match="do not take"):
        fused_ops.qk_norm_rope(qkv, heads, kv, hd, None, None, 0.0, cos, sin,
                               cache=(k_cache, v_cache, torch.tensor([0, 1])))


def test_silu_and_mul_reads_rows_through_their_stride_and_refuses_strided_columns():
    torch.manual_seed(4)
    inter = 24
    gate_up = torch.randn(3, 2 * inter + 8)[:, :2 * inter]
    gate, up = gate_up.split([inter, inter], dim=-1)
    torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unit column stride"):
        fused_ops.silu_and_mul(torch.randn(2 * inter, 3).t())
