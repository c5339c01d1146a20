"""A Triton GEMM for decode batch sizes, picked per captured batch size at start-up where it beats torch's.

Why: a decode step's four GEMMs a layer (q/k/v, o, gate/up, down) have a few to 256 rows. On the H200 on
2026-11-29, torch's cuBLAS calls ran Qwen3-0.6B's at 6-8 us each at 216 rows, 0.93 ms of a 6.5 ms step, where
reading their 4-12 MB of weights takes 1-3 us: at these shapes a launch has few output tiles (16 of 128 x 64
for the o and down projections' 1,024 columns) on 132 SMs, so most of the GPU waits while a few SMs stream the
weights.

The kernel: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), accumulated in float32 and rounded once. With SPLIT_K > 1
the K range is split over SPLIT_K programs per output tile, so that a launch has enough programs to keep
every SM reading weights. Each writes its float32 partial tile to a workspace and counts itself in with an
atomic; the last to arrive adds the partials in split order, writes the tile and resets the counter for the
next launch. One launch, and the same bits whichever program arrives last (so a graph replay equals the eager
forward it was captured from, which cuda_graphs' self-check requires).

Selection (`tune_decode_gemms`): for each weight shape of the model and each captured batch size, torch and
every candidate tile run inside a CUDA graph over the model's own weights of that shape, layer after layer as a
decode step reads them (so no weight is still in L2 from the call before). A tile is picked only where it beats
torch by more than MARGIN, agrees with it to rounding and gives the same bits twice; the picks live on the linear
layers (`gemms`, batch size -> GemmPick), whose forward looks them up by the row count (model/layers.py):
any step of that many rows uses the pick (a prefill of exactly a captured size too: the same compiled variant, the
same result to rounding). Every other row count goes to torch.

It runs on CUDA in float16 and bfloat16, and under TRITON_INTERPRET=1 on CPU (tests; float32 there computes the
dot in IEEE float32). This module imports triton: import it only where the tuner runs.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from engine_service import pdl

log = logging.getLogger(__name__)

# A tile is picked only where it takes at most this fraction of torch's time (timing noise is a few percent).
MARGIN = 0.95
SPLITS = (1, 2, 4, 8, 16)
# Bytes of shared memory a candidate's pipeline may take: two programs fit on an SM (an H100/H200 SM has 228 KiB),
# so that one program's loads are in flight while the other computes, and a launch's last wave is half as coarse.
_SMEM_BUDGET = 110 * 1024


@dataclass(frozen=True, slots=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}/{self.split_k}"

    def fits(self, m: int, n: int, k: int) -> str | None:
        """None where this tile computes an [m, k] x [k, n] product, else why not."""
        if n % self.block_n:
            return f"N={n} is not a multiple of BLOCK_N={self.block_n}"
        if k % (self.split_k * self.block_k):
            return f"K={k} is not a multiple of SPLIT_K x BLOCK_K = {self.split_k * self.block_k}"
        return None

    def programs(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * (n // self.block_n) * self.split_k

    def workspace(self, m: int, n: int) -> tuple[int, int]:
        """(float32 partials, tile counters) a launch over m rows needs; (0, 0) without a split."""
        if self.split_k == 1:
            return 0, 0
        tiles = triton.cdiv(m, self.block_m) * (n // self.block_n)
        return tiles * self.split_k * self.block_m * self.block_n, tiles


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr,
    M, stride_x, stride_out,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (engine_service/pdl.py): nothing is read before the kernel ahead ends
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    K_SPLIT: tl.constexpr = K // SPLIT_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
    rows = rm[:, None] < M
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_SPLIT, BLOCK_K):
        a = tl.load(x_ptrs, mask=rows, other=0.0)
        b = tl.load(w_ptrs)
        if IEEE:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_out + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rows)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n  # N is not a constexpr: shapes of one K share a variant
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N) + offs  # this tile's SPLIT_K partials
        # Only the real rows' partials are written and read: at one row, 1/64 of the tile's bytes.
        tl.store(parts + pid_k * (BLOCK_M * BLOCK_N), acc, mask=rows)
        tl.debug_barrier()  # every thread's partial is written before the count says so
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last of the tile's programs: the others' partials are all written
            # Every split's partial from memory, this program's own too (released by the same atomic): acc is dead
            # here, so the sum holds one tile and one loaded partial in registers, in the load layout.
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order, whoever arrives last: the same bits every launch
                total += tl.load(parts + s * (BLOCK_M * BLOCK_N), mask=rows, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=rows)
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch


class Workspace:
    """Split-K float32 partials and tile counters (zero between launches), for launches on one stream, one at a
    time. The tuner makes one per model, sized for its picks, before graphs are captured: a graph keeps the
    addresses it was captured with."""

    def __init__(self, device: torch.device, parts: int, counts: int):
        self.parts = torch.empty(max(parts, 1), dtype=torch.float32, device=device)
        self.counts = torch.zeros(max(counts, 1), dtype=torch.int32, device=device)

    def holds(self, parts: int, counts: int) -> bool:
        return self.parts.numel() >= parts and self.counts.numel() >= counts


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: GemmTile,
         workspace: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype, with this tile (into `out`, contiguous, when
    given). A split tile uses `workspace` (a fresh one when None: an allocation, never inside a CUDA-graph
    capture)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemm needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("gemm needs x with unit column stride and a contiguous weight")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gemm runs float16, bfloat16 or float32 with x and weight alike, got {x.dtype} and "
                         f"{weight.dtype}")
    (m, k), n = x.shape, weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()
                             or bias.device != x.device):
        # The kernel reads N values at unit stride in x's dtype: anything else read past the tensor or misread it.
        raise ValueError(f"bias must be a contiguous [{n}] {x.dtype} tensor on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    why = tile.fits(m, n, k)
    if why is not None:
        raise ValueError(f"tile {tile} does not fit this GEMM: {why}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    if m == 0:
        return out
    parts, counts = tile.workspace(m, n)
    if not parts:
        part_buf = count_buf = out  # never read without a split
    else:
        if workspace is None:
            workspace = Workspace(x.device, parts, counts)
        elif not workspace.holds(parts, counts):
            raise ValueError(f"tile {tile} at {m} rows needs a workspace of {parts} partials and {counts} counters")
        part_buf, count_buf = workspace.parts, workspace.counts
    grid = (n // tile.block_n, -(-m // tile.block_m), tile.split_k)  # not triton.cdiv: ~4 us of host time
    _gemm_kernel[grid](
        x, weight, bias if bias is not None else out, out, part_buf, count_buf,
        m, x.stride(0), out.stride(0),
        K=k, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, SPLIT_K=tile.split_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl.launch_kwargs(x),
    )
    return out


@dataclass(frozen=True, slots=True)
class GemmPick:
    """A tile the tuner picked for one batch size of one layer group, with the model's workspace."""

    tile: GemmTile
    workspace: Workspace

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemm(x, weight, bias, self.tile, self.workspace)


def candidates(m: int, n: int, k: int, num_sms: int) -> list[GemmTile]:
    """The tiles worth timing for an [m, k] x [k, n] product on a GPU of num_sms SMs.

    Row tiles of 64 (Hopper's smallest warpgroup MMA) and of 128 above 64 rows; column tiles of 64 and 128; the
    K splits that give a launch between half and three times as many programs as SMs (each takes at most
    _SMEM_BUDGET of shared memory: two fit on an SM). Without a split where the output tiles alone fill the GPU.
    """
    found = []
    for bm in (64,) if m <= 64 else (64, 128):
        for bn in (64, 128):
            if n % bn:
                continue
            tiles = triton.cdiv(m, bm) * (n // bn)
            for split in SPLITS:
                if split > 1 and tiles >= num_sms:
                    break
                # BLOCK_K 128 where K and three pipeline stages allow it, else 64.
                bk = 128 if k % (split * 128) == 0 and (bm + bn) * 128 * 2 * 3 <= _SMEM_BUDGET else 64
                programs = tiles * split
                if k % (split * bk) or (split > 1 and programs > 3 * num_sms):
                    continue
                if programs * 2 < num_sms and split != SPLITS[-1] and k % (2 * split * 64) == 0:
                    continue  # a larger split still fits K and fills more of the GPU
                stages = 4 if (bm + bn) * bk * 2 * 4 <= _SMEM_BUDGET else 3
                found.append(GemmTile(bm, bn, bk, split, 8 if bm * bn >= 128 * 128 else 4, stages))
    return found


def _graph_timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    """timer(fn, calls) -> microseconds per call: fn (which makes `calls` GEMMs) captured in a CUDA graph, the
    median of 5 replays after one. Launched one by one from Python, a GEMM of a few microseconds would time
    the host's launches instead (the first H200 GEMM table read 14-26 us where the graphs ran 6-8)."""

    def timer(fn: Callable[[], None], calls: int) -> float:
        fn()  # compiles and loads outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)

    return timer


def _each(weights: Sequence[torch.Tensor], one: Callable[[torch.Tensor], object]) -> Callable[[], None]:
    """fn() calling one(w) for every weight in turn: a decode step's GEMMs of one shape, layer after layer."""

    def fn() -> None:
        for w in weights:
            one(w)

    return fn


@dataclass(slots=True)
class ShapeTuning:
    """What the tuner found for one weight shape, per batch size: torch's time, the fastest tile and its time
    (us), and the picks (the fastest where it beat torch by MARGIN)."""

    name: str
    n: int
    k: int
    torch_us: dict[int, float]
    best: dict[int, tuple[GemmTile, float]]
    picked: dict[int, tuple[GemmTile, float]]
    failed: dict[GemmTile, str]


def tune_decode_gemms(
    layers_by_shape: dict[str, Sequence[torch.nn.Module]],
    sizes: Sequence[int],
    *,
    num_sms: int | None = None,
    timer: Callable[[Callable[[], None], int], float] | None = None,
    seed: int = 0,
) -> list[ShapeTuning]:
    """Time torch against every candidate tile for each named group of linear layers (all of one weight shape,
    e.g. every layer's q/k/v projection) at each batch size; set each layer's `gemms` (rows -> GemmPick) to
    the picks, all sharing one workspace made here, before any graph is captured.

    A candidate must agree with torch to rounding (max |difference| within 2% of the output's largest value) and
    give the same bits on a second call before it is timed; one that fails to compile, launch or agree is
    dropped and reported in `failed`. timer(fn, calls) -> microseconds per call (default: a CUDA graph,
    _graph_timer).
    """
    results = []
    gen = torch.Generator().manual_seed(seed)
    picks: dict[str, dict[int, GemmTile]] = {}
    need_parts = need_counts = 0
    device = None
    for name, layers in layers_by_shape.items():
        weights = [layer.weight for layer in layers]
        n, k = weights[0].shape
        device, dtype = weights[0].device, weights[0].dtype
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        time_it = timer or _graph_timer(device)
        found = ShapeTuning(name, n, k, {}, {}, {}, {})
        tried = {m: candidates(m, n, k, num_sms) for m in sizes}
        most = [t.workspace(m, n) for m in sizes for t in tried[m]]
        scratch = Workspace(device, max((p for p, _ in most), default=0), max((c for _, c in most), default=0))
        picks[name] = {}
        for m in sizes:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            want = F.linear(x, weights[0]).float()
            found.torch_us[m] = time_it(_each(weights, lambda w, x=x: F.linear(x, w)), len(weights))
            best: tuple[GemmTile, float] | None = None
            for tile in tried[m]:
                if tile in found.failed:
                    continue
                try:
                    got = gemm(x, weights[0], None, tile, scratch)
                    err = float((got.float() - want).abs().max())
                    if not err <= 0.02 * float(want.abs().max()) + 1e-6:
                        found.failed[tile] = f"differs from torch by {err:.3g} at {m} rows"
                        continue
                    if not torch.equal(gemm(x, weights[0], None, tile, scratch), got):  # a split-K race shows here
                        found.failed[tile] = f"gave different bits on a second call at {m} rows"
                        continue
                    us = time_it(_each(weights, lambda w, x=x, t=tile, ws=scratch: gemm(x, w, None, t, ws)),
                                 len(weights))
                except Exception as exc:  # out of shared memory on this device, say: not a candidate
                    found.failed[tile] = f"{type(exc).__name__}: {exc}"
                    continue
                if best is None or us < best[1]:
                    best = (tile, us)
            if best is not None:
                found.best[m] = best
            if best is not None and best[1] <= MARGIN * found.torch_us[m]:
                found.picked[m] = best
                picks[name][m] = best[0]
                parts, counts = best[0].workspace(m, n)
                need_parts, need_counts = max(need_parts, parts), max(need_counts, counts)
        results.append(found)
    if device is not None:
        workspace = Workspace(device, need_parts, need_counts)
        for name, layers in layers_by_shape.items():
            for layer in layers:
                layer.gemms = {m: GemmPick(tile, workspace) for m, tile in picks[name].items()} or None
    return results


def describe(found: ShapeTuning) -> str:
    """One log line: where the picks beat torch, by how much, and where torch stays."""
    kept = [m for m in found.torch_us if m not in found.picked]
    gains = ", ".join(f"{m}: {tile} {us:.1f} vs {found.torch_us[m]:.1f} us"
                      for m, (tile, us) in found.picked.items())
    text = f"decode GEMM {found.name} (N {found.n}, K {found.k}): "
    text += f"ours at {len(found.picked)} sizes ({gains})" if found.picked else "torch at every size"
    if found.picked and kept:
        text += f"; torch at {kept}"
    if found.failed:
        text += "; dropped " + ", ".join(f"{tile} ({why})" for tile, why in found.failed.items())
    return text
