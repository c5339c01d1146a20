"""Host-side edges of the GPU path that CPU tests reach: the launch planning around the Triton kernels (argument
checks, strides, grid and split choices, tuner helpers), the fused ops' and GEMM's wrappers, the PDL switch and
the host copies. Each test names the bug it would catch; kernels run under the interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA) on small shapes, against the float64 / torch references.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.support import require_triton_interpreter

require_triton_interpreter()

from engine_service import host_copy, pdl  # noqa: E402
from engine_service.attention import triton_kernels as tk  # noqa: E402
from engine_service.attention.triton_ref import make_paged_batch, ref_paged_attention, ref_store_kvcache  # noqa: E402
from engine_service.model import fused_ops  # noqa: E402
from engine_service.model import gemm as G  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _args(b, scale=0.2, max_q=None):
    return (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, scale,
            b.max_seqlen_q if max_q is None else max_q)


def _check(out, ref, atol=2e-5):
    assert not out.isnan().any(), "some output elements were not written"
    err = (out.double() - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3e} > {atol}"


# ---- store_kvcache ----------------------------------------------------------------------------------------------
def test_store_reads_v_and_the_v_cache_through_their_own_strides():
    """k and v (and k_cache and v_cache) laid out differently: a plan that passed k's strides for v, or k_cache's
    for v_cache, writes the wrong values or the wrong slots."""
    g = torch.Generator().manual_seed(0)
    nt, kvh, hd, nb, bs = 9, 2, 16, 4, 4
    k = torch.randn(nt, kvh, hd, generator=g)
    v = torch.randn(nt, kvh, 3 * hd, generator=g)[:, :, hd:2 * hd]  # its own row and head strides
    slots = torch.randperm(nb * bs, generator=g)[:nt]
    slots[3] = -1
    k_cache = torch.randn(nb, bs, kvh, hd, generator=g)
    v_cache = torch.randn(nb, kvh, bs, hd, generator=g).transpose(1, 2)  # same shape, other strides
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    ref_store_kvcache(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_refuses_mismatched_caches_and_slot_counts():
    """A v_cache of another shape, or a slot_mapping longer than the tokens, is refused rather than written
    past (a check that only compared k_cache, or only caught too few slots, lets them through)."""
    k = v = torch.zeros(3, 2, 16)
    kc = torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match="does not match"):
        tk.store_kvcache(k, v, kc, torch.zeros(2, 8, 2, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entries for 3 tokens"):
        tk.store_kvcache(k, v, kc, kc.clone(), torch.zeros(4, dtype=torch.long))


# ---- paged attention planning -------------------------------------------------------------------------------------
def test_attention_refuses_block_tables_of_another_batch():
    """block_tables with a row count other than the sequences' is refused (the kernel would read rows that are
    not there)."""
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 8)
    with pytest.raises(ValueError, match="block_tables num_seqs rows"):
        tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables[:1], 0.1, 1)


def test_no_sequences_launch_nothing():
    """Rows but no sequences (num_seqs 0): nothing is launched (a launch would binary-search an empty batch and
    read context_lens[0] past its end)."""
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 8)
    out = torch.empty_like(b.q)
    plan = tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q[:1], b.context_lens[:0],
                                    b.block_tables[:0], 0.1, 1, out, None)
    assert plan == []


def test_more_query_heads_per_kv_head_than_a_prefill_tile_has_rows():
    """GQA 128 (one KV head's heads alone need more rows than the 64-row tile): the tile grows to hold one token's
    heads instead of holding zero tokens (a division by zero)."""
    g = torch.Generator().manual_seed(1)
    b = make_paged_batch([1, 2], [7, 2], 128, 1, 16, 8, generator=g)
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(*_args(b), out=out)
    _check(out, ref_paged_attention(*_args(b)[:7]))


def test_zero_kv_splits_means_one():
    """num_kv_splits=0 is taken as 1 (a grid with no split axis writes nothing)."""
    b = make_paged_batch([1, 3], [20, 9], 4, 2, 16, 8, generator=torch.Generator().manual_seed(2))
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(*_args(b), out=out, num_kv_splits=0)
    _check(out, ref_paged_attention(*_args(b)[:7]))


def test_split_partials_of_a_head_dim_that_is_not_a_power_of_two():
    """head_dim 48 (padded to 64 in the kernel) with KV splits: the partials are d_pad wide, as the kernels index
    them; a head_dim-wide buffer mixes one split's values into the next."""
    g = torch.Generator().manual_seed(3)
    b = make_paged_batch([1, 1, 4], [70, 33, 40], 4, 2, 48, 8, generator=g)
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(*_args(b), out=out, num_kv_splits=3)
    _check(out, ref_paged_attention(*_args(b)[:7]))


def test_block_tables_as_a_column_slice_of_a_wider_table():
    """block_tables as a view of a wider buffer (row stride > width): rows are found through its row stride, not
    its width."""
    g = torch.Generator().manual_seed(4)
    b = make_paged_batch([1, 2, 1], [30, 17, 9], 4, 2, 16, 8, generator=g)
    wide = torch.zeros((b.block_tables.shape[0], b.block_tables.shape[1] + 3), dtype=torch.int32)  # valid blocks
    wide[:, : b.block_tables.shape[1]] = b.block_tables
    b.block_tables = wide[:, : b.block_tables.shape[1]]
    assert b.block_tables.stride(0) != b.block_tables.shape[1]
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(*_args(b), out=out)
    _check(out, ref_paged_attention(*_args(b)[:7]))


def test_out_of_another_shape_is_refused():
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 8)
    with pytest.raises(ValueError, match="does not match q"):
        tk.paged_attention(*_args(b), out=torch.empty(2, 2, 16))


def test_plan_pads_small_head_dims_for_the_dot_and_keeps_float32_in_ieee():
    """Host choices the interpreter cannot show: the head_dim pad is at least 16 (NVIDIA's tl.dot minimum) and
    float32 queries compute their dots in IEEE float32, not TF32."""
    b = make_paged_batch([1, 3], [5, 9], 4, 2, 8, 8)
    for max_q in (1, 3):
        launch = tk._plan_paged_attention(*_args(b, max_q=max_q), torch.empty_like(b.q), 2)[0]
        assert launch.constexprs["D_PAD"] == 16 and launch.constexprs["DOT_PREC"] == "ieee"
    merge = tk._plan_paged_attention(*_args(b, max_q=1), torch.empty_like(b.q), 2)[1]
    assert merge.constexprs["D_PAD"] == 16


def test_grid_limit_applies_to_the_second_axis_only():
    """CUDA caps a grid's second axis at 65,535: with the KV heads first the tiles sit there and too many are
    refused; with the tiles first (an axis of 2^31) the same batch plans."""
    n = 70_000
    q = torch.empty(n, 2, 16)
    cache = torch.empty(1, 8, 1, 16)
    cu = torch.arange(n + 1, dtype=torch.int32)
    ctx = torch.ones(n, dtype=torch.int32)
    tables = torch.zeros(n, 1, dtype=torch.int32)
    args = (q, cache, cache, cu, ctx, tables, 0.1, 1, torch.empty_like(q), 1)
    with pytest.raises(ValueError, match="second axis"):
        tk._plan_paged_attention(*args, (64, 2, 4, 1))
    (launch,) = tk._plan_paged_attention(*args, (64, 2, 4, 0))
    assert launch.grid[0] > 65_535


def test_default_split_heuristic_on_a_gpu(monkeypatch):
    """Decode on a 132-SM GPU: splits = ceil(2 * SMs / programs), at most 16, at least 1; prefill never splits."""
    monkeypatch.setattr(tk, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert tk.default_num_kv_splits(5, 8, 1, cuda) == 7  # 264 / 40 = 6.6: rounded up
    assert tk.default_num_kv_splits(1, 8, 1, cuda) == 16  # 33 capped
    assert tk.default_num_kv_splits(256, 8, 1, cuda) == 1
    assert tk.default_num_kv_splits(1, 8, 2, cuda) == 1  # a prefill or mixed step


def test_equal_timings_keep_the_launch_order(monkeypatch):
    """Where the tuner timed longest-first and batch order alike, decode keeps the order (ties go to it)."""
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 8)
    monkeypatch.setattr(tk, "_decode_order_timings", {tk._tile_key(b.q, b.k_cache): (2.0, 2.0)})
    assert tk.decode_order_pays(b.q, b.k_cache)


def test_decode_tuner_keeps_its_ordered_pick_when_batch_order_only_ties(monkeypatch):
    """Batch order replaces the ordered pick only where strictly faster; at a tie the ordered pick stays."""
    monkeypatch.setattr(tk, "_decode_tiles", {})
    monkeypatch.setattr(tk, "_decode_order_timings", {})
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    b = make_paged_batch([1, 1], [12, 9], 4, 2, 16, 8)
    calls = []

    def timer(fn, iters):
        calls.append(1)
        # The heads-first candidate (64, 2, 4, 1) is fastest launched in order; batch order only ties with it.
        return 2.0 if len(calls) == 6 or len(calls) > len(tk.DECODE_TILES) else 3.0

    assert tk.DECODE_TILES[5] == (64, 2, 4, 1)
    picked, _ = tk.tune_decode_tile(b.k_cache, b.v_cache, 4, batch=2, context_len=10, timer=timer)
    assert picked == tk.DECODE_TILES[5]
    assert tk._decode_tiles[tk._tile_key(b.q, b.k_cache)] == tk.DECODE_TILES[5]
    assert tk.decode_order_pays(b.q, b.k_cache)


def test_prefill_tuning_step_shapes_and_blocks():
    """The prefill tuner's step: decode rows leave room for one prompt token, whole prompts fill the rest, and its
    blocks round each context up (rounding down leaves the last partial block out of the scratch cache)."""
    assert tk._prefill_tuning_step(8, 3, 2, 5) == ([1, 1, 3, 3], [5, 5, 3, 3])
    assert tk._prefill_tuning_step(9, 3, 2, 5) == ([1, 1, 3, 3], [5, 5, 3, 3])  # whole prompts only
    assert tk._prefill_tuning_step(4, 10, 9, 5) == ([1, 1, 1, 1], [5, 5, 5, 1])
    assert tk.prefill_tuning_blocks(8, 3, 2, 5, 4) == 2 + 2 + 1 + 1
    assert tk.prefill_tuning_blocks(16, 16, 0, 1, 16) == 1


def test_parse_tiles_reject_and_default():
    """A BLOCK_M that is no power of two is refused; a three-field decode tile means heads second."""
    with pytest.raises(ValueError, match="power of two"):
        tk.parse_prefill_tile("48,64,2,4")
    assert tk.parse_tile("64,2,4") == (64, 2, 4, 0)


# ---- fused ops ------------------------------------------------------------------------------------------------------
def test_add_rms_norm_reads_the_residual_through_its_own_row_stride():
    """x and residual with different row strides (views of wider buffers): each row is read through its own."""
    torch.manual_seed(0)
    h = 64
    x = torch.randn(5, 2 * h)[:, :h]
    residual = torch.randn(5, 3 * h)[:, h:2 * h]
    w = torch.rand(h) + 0.5
    out, total = fused_ops.add_rms_norm(x, w, 1e-6, residual)
    s = residual + x
    assert torch.equal(total, s)
    want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def test_qk_norm_rope_reads_cos_and_sin_through_their_own_strides_and_stores_v_by_its_cache_strides():
    """cos and sin of different row strides, and a v_cache laid out unlike k_cache: each is read or written through
    its own strides (no norm, so the reference is plain rotary)."""
    torch.manual_seed(1)
    t, heads, kv, hd, nb, bs = 4, 4, 2, 16, 3, 4
    qkv = torch.randn(t, (heads + 2 * kv) * hd)
    ang = torch.rand(t, hd // 2) * 3
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin_buf = torch.zeros(t, 3 * hd)
    sin_buf[:, hd:2 * hd] = torch.cat([ang.sin(), ang.sin()], -1)
    sin = sin_buf[:, hd:2 * hd]
    q, k = fused_ops.qk_norm_rope(qkv, heads, kv, hd, None, None, 0.0, cos, sin)
    q_ref, k_ref, v_ref = qkv.split([heads * hd, kv * hd, kv * hd], -1)
    torch.testing.assert_close(q, _rope(q_ref.view(t, heads, hd), cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, _rope(k_ref.view(t, kv, hd), cos, sin), rtol=1e-5, atol=1e-5)

    k_cache = torch.zeros(nb, bs, kv, hd)
    v_cache = torch.zeros(nb, kv, bs, hd).transpose(1, 2)
    slots = torch.tensor([5, -1, 0, 11])
    fused_ops.qk_norm_rope(qkv, heads, kv, hd, None, None, 0.0, cos, sin, cache=(k_cache, v_cache, slots))
    k_want, v_want = torch.zeros(nb, bs, kv, hd), torch.zeros(nb, bs, kv, hd)
    ref_store_kvcache(k, v_ref.reshape(t, kv, hd), k_want, v_want, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_qk_norm_rope_refuses_caches_of_two_dtypes():
    qkv = torch.randn(2, 4 * 16)
    cos = sin = torch.ones(2, 16)
    kc = torch.zeros(2, 4, 1, 16)
    with pytest.raises(ValueError, match="do not take"):
        fused_ops.qk_norm_rope(qkv, 2, 1, 16, None, None, 0.0, cos, sin,
                               cache=(kc, kc.to(torch.float8_e4m3fn), torch.tensor([0, 1])))


# ---- GEMM -----------------------------------------------------------------------------------------------------------
def test_gemm_workspace_sizes_and_checks():
    """A split tile's workspace holds split_k partial tiles per output tile; a workspace with too few counters is
    refused; out must be contiguous and of x's dtype."""
    tile = G.GemmTile(64, 64, 64, 4, 4, 3)
    assert tile.workspace(70, 128) == (2 * 2 * 4 * 64 * 64, 4)
    x, w = torch.randn(3, 256), torch.randn(128, 256)
    with pytest.raises(ValueError, match="needs a workspace"):
        G.gemm(x, w, None, tile, G.Workspace(x.device, 10**6, 1))
    plain = G.GemmTile(64, 64, 64, 1, 4, 3)
    with pytest.raises(ValueError, match="out must be"):
        G.gemm(x, w, None, plain, out=torch.empty(3, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        G.gemm(x, w, None, plain, out=torch.empty(128, 3).T)


def test_gemm_split_must_divide_k_in_whole_blocks():
    """K must split into SPLIT_K x BLOCK_K: 192 = 3 blocks of 64 cannot go in 2 splits."""
    assert G.GemmTile(64, 64, 64, 2, 4, 3).fits(1, 64, 192) is not None


def test_candidates_split_boundaries():
    """No split once the output tiles alone reach the SM count (exactly as many included)."""
    found = G.candidates(64, 128 * 64, 1024, 128)  # 128 tiles of 64 x 64 on 128 SMs
    assert all(t.split_k == 1 for t in found if t.block_n == 64)


def _tuner_layer(gen: torch.Generator) -> torch.nn.Module:
    """A linear layer as tune_decode_gemms sees one: a [128, 256] weight and no picks yet."""
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(128, 256, generator=gen), requires_grad=False)
    layer.gemms = None
    return layer


def _timer(ms) -> object:
    """A tuner timer that runs the candidate and reports ms(tiles it ran): torch's own matmul runs none."""
    real = G.gemm

    def timer(fn, calls):
        ran = []
        G.gemm = lambda x, w, b, tile, ws=None: ran.append(tile) or real(x, w, b, tile, ws)
        try:
            fn()
        finally:
            G.gemm = real
        return ms(ran)

    return timer


def test_tuner_sizes_the_shared_workspace_for_its_largest_pick():
    """Picks at several sizes share one workspace sized for the largest; one sized for the last pick only is too
    small for an earlier, larger one."""
    gen = torch.Generator().manual_seed(0)
    layers = [_tuner_layer(gen)]
    timer = _timer(lambda ran: 10.0 if not ran else (5.0 if ran[0].split_k > 1 else 20.0))
    G.tune_decode_gemms({"up": layers}, [128, 1], num_sms=132, timer=timer)
    picks = layers[0].gemms
    assert picks and set(picks) == {128, 1}
    assert picks[128].tile.workspace(128, 128)[0] > picks[1].tile.workspace(1, 128)[0]
    x = torch.randn(128, 256, generator=gen)
    torch.testing.assert_close(picks[128].run(x, layers[0].weight, None), x @ layers[0].weight.T, rtol=1e-4, atol=1e-4)


def test_tuner_needs_the_margin_to_pick():
    """A tile only 2% faster than torch (within timing noise) is not picked."""
    layers = [_tuner_layer(torch.Generator().manual_seed(0))]
    (shape,) = G.tune_decode_gemms({"up": layers}, [4], num_sms=132, timer=_timer(lambda ran: 9.8 if ran else 10.0))
    assert not shape.picked and layers[0].gemms is None


# ---- PDL, host copies ------------------------------------------------------------------------------------------------
def test_pdl_enable_needs_hopper_and_turns_off(monkeypatch):
    """A stand-in CUDA device: compute capability 8.x is refused, 9.0 turns PDL on, and off turns it off again."""
    monkeypatch.setattr(pdl, "_devices", set())
    cap = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: cap[i])
    with pytest.raises(ValueError, match="compute capability 9.0"):
        pdl.enable(torch.device("cuda", 0), True)
    pdl.enable(torch.device("cuda", 1), True)
    assert pdl.launch_kwargs(SimpleNamespace(device=torch.device("cuda", 1)))
    pdl.enable(torch.device("cuda", 1), False)
    assert pdl.launch_kwargs(SimpleNamespace(device=torch.device("cuda", 1))) == {}


def test_host_copies_keep_the_dtype_and_zero_the_padding():
    """to_device keeps int32 (a table read as int64 doubles its stride); rows_to_device pads with zeros even where
    the allocator hands back memory that held other values."""
    assert host_copy.to_device([1, 2], torch.int32, torch.device("cpu")).dtype == torch.int32
    assert host_copy.to_device([[1], [2]], torch.int64, torch.device("cpu")).dtype == torch.int64
    rows = [[5, 6, 7], [8], [9, 10]]
    want = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 0, 0]], dtype=torch.int32)
    for _ in range(20):
        junk = torch.full((3, 4), 123, dtype=torch.int32)
        del junk
        got = host_copy.rows_to_device(rows, 4, torch.int32, torch.device("cpu"))
        assert torch.equal(got, want)


def test_graph_runner_takes_only_pure_decode_steps():
    """A step with a prompt chunk (fewer decode rows than rows) never goes to a captured decode graph."""
    from engine_service.cuda_graphs import DecodeGraphRunner

    runner = SimpleNamespace(sizes=[1, 2, 4], graphs={1: None, 2: None, 4: None})
    step = SimpleNamespace(q_lens=[1, 5], num_decode=1, gather_rows=None)
    assert not DecodeGraphRunner.can_run(runner, step)
    assert DecodeGraphRunner.can_run(runner, SimpleNamespace(q_lens=[1, 1], num_decode=2, gather_rows=None))


def test_packed_tables_are_at_least_one_wide():
    """pack_decode_inputs' table width is at least 1 (its contract), even when no row has a block yet."""
    from engine_service.cuda_graphs import pack_decode_inputs

    flat, width = pack_decode_inputs([3], [0], [-1], [0], [[]], 2)
    assert width == 1 and flat[10:] == [0]


def test_triton_backend_passes_the_steps_order_and_splits_to_attention(monkeypatch):
    """The backend hands attention the step's seq_order (longest first: a launch's short tail) and the split count
    fixed for the captured batch size; dropping either changes no output on CPU, only the GPU's launch."""
    from engine_service.attention.base import AttentionMetadata
    from engine_service.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(torch.device("cpu"))
    seen = {}
    monkeypatch.setattr(backend, "kernels", SimpleNamespace(
        store_kvcache=lambda *a: None, paged_attention=lambda *a, **k: seen.update(k)))
    order = torch.tensor([1, 0], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor([-1, -1]), torch.tensor([0, 1, 2], dtype=torch.int32),
                             torch.tensor([3, 5], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32), 2, 1, 5, 8,
                             seq_order=order, cache={"num_kv_splits": 3})
    backend.forward(torch.empty(2, 4, 16), None, None, None, None, meta, 0.1)
    assert seen["seq_order"] is order and seen["num_kv_splits"] == 3


def test_silu_and_mul_covers_a_width_past_one_block():
    """An intermediate size over SILU_BLOCK and not a multiple of it: the grid rounds its column blocks up (rounded
    down, the last 76 columns are never written)."""
    torch.manual_seed(3)
    inter = fused_ops.SILU_BLOCK + 76
    gate_up = torch.randn(2, 2 * inter)
    gate, up = gate_up.split([inter, inter], dim=-1)
    torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               rtol=1e-6, atol=1e-6)


def test_tuned_tiles_are_kept_per_query_head_count():
    """A decode or prefill tile tuned for one query-head count (GQA ratio) is not reused for another over the same
    cache: the key holds the query heads."""
    cache = torch.empty(4, 8, 2, 16)
    assert tk._tile_key(torch.empty(1, 4, 16), cache) != tk._tile_key(torch.empty(1, 8, 16), cache)
