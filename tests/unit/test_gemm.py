"""The decode GEMM (engine_service/model/gemm.py) on CPU under Triton's interpreter: the kernel with and without
K splits against a float64 reference, its counters left at zero for the next launch, the candidate tiles, the
tuner's choices with a stand-in timer, and the engine's greedy tokens with the GEMM in every linear layer.

fp32 (the interpreter computes its dot in IEEE float32 here) and fp16; bf16 is checked on the GPU
(scripts/gpu_kernel_check.py, part b), as for the other kernels.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import require_triton_interpreter

require_triton_interpreter()

from engine_service.model import gemm as G  # noqa: E402  (after the interpreter check)

QWEN3_0_6B = (("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072))
H200_SMS = 132


def _reference(x, w, bias):
    want = x.double() @ w.double().T
    return want + bias.double() if bias is not None else want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,n,k,tile", [
    (5, 128, 256, G.GemmTile(64, 64, 64, 1, 4, 3)),
    (70, 128, 512, G.GemmTile(64, 64, 64, 4, 4, 3)),  # two row tiles, one of them partial, K in 4 splits
    (3, 256, 256, G.GemmTile(64, 128, 64, 2, 4, 3)),
    (1, 64, 1024, G.GemmTile(64, 64, 64, 16, 4, 3)),
], ids=["plain", "split4-two-row-tiles", "split2", "split16-one-row"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gemm_matches_a_float64_reference(dtype, m, n, k, tile, with_bias):
    """Within what rounding the output once allows: float32 accumulation over K (fp32), one rounding to fp16."""
    gen = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    workspace = G.Workspace(x.device, *tile.workspace(m, n))
    got = G.gemm(x, w, bias, tile, workspace)
    want = _reference(x, w, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert ((got.double() - want).abs() <= tol * want.abs().clamp_min(1.0)).all()
    # The next launch finds every tile counter back at zero (a graph replays the same launch).
    assert int(workspace.counts.abs().sum()) == 0
    assert torch.equal(G.gemm(x, w, bias, tile, workspace), got)


def test_split_k_gives_the_bits_of_its_split_order_whoever_arrives_last():
    """The last program of a tile adds the partials in split order, so the result is one fixed sum: bit for bit the
    kernel's own product of each split (one K block, no split) added in order by hand. (A tolerance let a kernel
    that added them in reverse order pass.)"""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, generator=gen)
    w = torch.randn(64, 256, generator=gen)
    got = G.gemm(x, w, None, G.GemmTile(64, 64, 64, 4, 4, 3))
    whole = G.GemmTile(64, 64, 64, 1, 4, 3)
    parts = [G.gemm(x[:, i * 64:(i + 1) * 64].contiguous(), w[:, i * 64:(i + 1) * 64].contiguous(), None, whole)
             for i in range(4)]
    total = torch.zeros_like(parts[0])
    for p in parts:
        total = total + p
    assert torch.equal(got, total)
    reversed_total = parts[3] + parts[2] + parts[1] + parts[0]
    assert not torch.equal(reversed_total, total)  # the order shows in the bits: this test can tell them apart


def test_gemm_refuses_what_it_cannot_compute():
    x, w = torch.randn(3, 256), torch.randn(64, 256)
    with pytest.raises(ValueError, match="multiple of SPLIT_K x BLOCK_K"):
        G.gemm(x, w, None, G.GemmTile(64, 64, 128, 4, 4, 3))
    with pytest.raises(ValueError, match="not a multiple of BLOCK_N"):
        G.gemm(x, torch.randn(96, 256), None, G.GemmTile(64, 64, 64, 1, 4, 3))
    with pytest.raises(ValueError, match="x and weight alike"):
        G.gemm(x.half(), w, None, G.GemmTile(64, 64, 64, 1, 4, 3))
    with pytest.raises(ValueError, match="unit column stride"):
        G.gemm(torch.randn(256, 3).T, w, None, G.GemmTile(64, 64, 64, 1, 4, 3))
    for bias in (torch.randn(63), torch.randn(64).half(), torch.randn(128)[::2], torch.randn(1, 64)):
        with pytest.raises(ValueError, match=r"bias must be a contiguous \[64\] torch.float32 tensor on cpu, got"):
            G.gemm(x, w, bias, G.GemmTile(64, 64, 64, 1, 4, 3))
    small = G.Workspace(x.device, 10, 1)
    with pytest.raises(ValueError, match="needs a workspace"):
        G.gemm(x, w, None, G.GemmTile(64, 64, 64, 2, 4, 3), small)
    assert G.gemm(torch.empty(0, 256), w, None, G.GemmTile(64, 64, 64, 2, 4, 3)).shape == (0, 64)


@pytest.mark.parametrize("name,n,k", QWEN3_0_6B, ids=[s[0] for s in QWEN3_0_6B])
def test_candidates_fit_and_fill_the_gpu(name, n, k):
    """Every captured decode size of Qwen3-0.6B gets candidates; each fits the shape, launches between half a wave
    and three waves of programs (or as many as K's splits allow), and stays within the shared-memory budget."""
    from engine_service.cuda_graphs import capture_sizes

    for m in capture_sizes(256):
        found = G.candidates(m, n, k, H200_SMS)
        assert found, (name, m)
        assert len(found) == len(set(found)) <= 10
        for t in found:
            assert t.fits(m, n, k) is None
            assert t.programs(m, n) <= 3 * H200_SMS
            assert (t.block_m + t.block_n) * t.block_k * 2 * t.num_stages <= G._SMEM_BUDGET
            assert t.block_m == 64 or m > 64
        assert max(t.programs(m, n) for t in found) >= H200_SMS // 2


class _Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w, requires_grad=False)
        self.gemms = None


def _fake_timer(faster: G.GemmTile | None):
    """A timer under which torch takes 10 us a call, `faster` 5 us and every other tile 20 us; it tells the calls
    apart by running fn and watching which path ran."""
    ran = []
    real_gemm = G.gemm

    def spy(x, w, b, tile, workspace=None):
        ran.append(tile)
        return real_gemm(x, w, b, tile, workspace)

    def timer(fn, calls):
        ran.clear()
        G.gemm = spy
        try:
            fn()
        finally:
            G.gemm = real_gemm
        if not ran:
            return 10.0
        return 5.0 if ran[0] == faster else 20.0

    return timer


def test_tuner_picks_a_faster_tile_and_keeps_torch_elsewhere(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    layers = [_Linear(torch.randn(128, 256, generator=gen)) for _ in range(3)]
    sizes = [1, 8, 64]
    winner = G.candidates(8, 128, 256, H200_SMS)[-1]
    found = G.tune_decode_gemms({"up": layers}, sizes, num_sms=H200_SMS, timer=_fake_timer(winner))
    (shape,) = found
    assert shape.torch_us == {1: 10.0, 8: 10.0, 64: 10.0}
    # The winner is a candidate at every size up to 64 rows (one row tile): picked at each.
    assert {m: tile for m, (tile, _) in shape.picked.items()} == dict.fromkeys(sizes, winner)
    picks = layers[0].gemms
    assert set(picks) == set(sizes) and all(p.tile == winner for p in picks.values())
    assert all(layer.gemms is not None and layer.gemms[8].workspace is picks[8].workspace for layer in layers)
    assert "ours at 3 sizes" in G.describe(shape)

    layers = [_Linear(torch.randn(128, 256, generator=gen)) for _ in range(2)]
    (shape,) = G.tune_decode_gemms({"up": layers}, sizes, num_sms=H200_SMS, timer=_fake_timer(None))
    assert not shape.picked and all(layer.gemms is None for layer in layers)
    assert G.describe(shape).endswith("torch at every size")


def test_tuner_drops_a_tile_that_computes_wrong(monkeypatch):
    """A candidate whose output differs from torch's beyond rounding is never timed, let alone picked."""
    gen = torch.Generator().manual_seed(0)
    layers = [_Linear(torch.randn(128, 256, generator=gen))]
    bad = G.candidates(4, 128, 256, H200_SMS)[0]
    real_gemm = G.gemm

    def broken(x, w, b, tile, workspace=None):
        out = real_gemm(x, w, b, tile, workspace)
        return out + out.abs().max() if tile == bad else out

    monkeypatch.setattr(G, "gemm", broken)
    # The timer would make the broken tile the fastest.
    (shape,) = G.tune_decode_gemms({"up": layers}, [4], num_sms=H200_SMS, timer=_fake_timer(bad))
    assert "differs from torch" in shape.failed[bad]
    assert not shape.picked and layers[0].gemms is None


def test_engine_tokens_are_the_same_with_the_gemm_in_every_linear(tmp_path):
    """Greedy tokens through the whole engine (prefill, decode, a cached prefix), fp32 on CPU, with every
    q/k/v, o, gate/up and down projection computed by the Triton GEMM (split and unsplit tiles) at each row
    count the steps meet, against torch's GEMMs."""
    from engine_service import LLM, SamplingParams
    from tests.integration.tiny import VOCAB, make_qwen3

    # Every shape a multiple of 64: q/k/v 128 x 64, o 64 x 64, gate/up 256 x 64, down 64 x 128.
    make_qwen3(tmp_path, heads=2, kv_heads=1, head_dim=32, hidden=64, layers=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    tokens = {}
    calls = []

    class Counting(G.GemmPick):
        def run(self, x, weight, bias):
            calls.append(x.shape[0])
            return super().run(x, weight, bias)

    for ours in (False, True):
        with LLM(str(tmp_path), device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=8,
                 num_kvcache_blocks=64, max_model_len=128) as llm:
            if ours:
                workspace = G.Workspace(torch.device("cpu"), 1 << 16, 64)
                for layer in llm.runner.model.layers:
                    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                   layer.mlp.down_proj):
                        split = 2 if linear.weight.shape[1] % 128 == 0 else 1
                        linear.gemms = {m: Counting(G.GemmTile(64, 64, 64, split, 4, 3), workspace)
                                        for m in range(1, 80)}
            tokens[ours] = [o["token_ids"] for o in llm.generate(prompts, [params] * len(prompts))]
            if ours:
                assert min(calls) <= 3 and max(calls) > 20, sorted(set(calls))  # decode steps and the prefill
    assert tokens[True] == tokens[False]
    assert all(len(t) == 8 for t in tokens[True])
