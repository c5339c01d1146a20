"""Check the Triton attention kernels (engine_service/attention/triton_kernels.py).

On CUDA (default mode):
  * store_kvcache against an index-copy reference (bitwise), padding slots (-1) untouched;
  * paged_attention in bf16 on fresh random inputs, every output poisoned with NaN first, against a
    float32 reference built from the same bf16 inputs. Acceptance per case:
        err(triton) <= 2 * err(torch bf16 SDPA) + 1e-3     (max abs error vs the fp32 reference)
  * a CUDA-graph capture/replay of split-KV decode, bitwise equal to eager;
  * the fused q/k-norm + RoPE kernel storing K and V itself, bitwise as the separate KV store;
  * the sampling kernel (engine_service/sampling_kernels.py) draws the inverse-CDF token on Qwen3-sized
    bf16 logits, and its time per call against the torch path at batch 256;
  * decode timing at Qwen3-0.6B shapes (16 q heads, 8 KV heads, head_dim 128), batch 256, contexts
    600-2000, block sizes 16 and 256, printing achieved GB/s of K/V traffic; and each decode tile on the
    batch workload A decodes mid-run, launched in batch order and longest first (the engine's order);
  * Qwen3-0.6B's decode GEMMs at 64 and 224 rows: cuBLAS, cuBLASLt and a plain Triton GEMM (information only).
  Exit status 1 if any check fails.

--compile-only (no GPU needed): compile the kernels for sm_90 (H200) with triton's real NVIDIA
pipeline, ptxas included, for the shapes the engine uses, specialised exactly as triton's JIT would
specialise them. Catches what the interpreter lets through (tl.dot sizes, non-constexpr shapes, ...).
It also checks that steps differing only in batch size and block-table width share one compiled variant:
triton specialises integer arguments equal to 1 or divisible by 16, and a variant first met while serving
compiles inside a timed step.

Usage:  python scripts/gpu_kernel_check.py [--compile-only [--shard I/N]] [--no-timing] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script checks the compiled kernels")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from engine_service.attention import FP8_KV_DTYPE, to_kv_cache  # noqa: E402
from engine_service.attention import triton_kernels as tk  # noqa: E402
from engine_service.attention.base import longest_first  # noqa: E402
from engine_service.attention.triton_ref import (  # noqa: E402
    make_paged_batch,
    ref_paged_attention,
    ref_store_kvcache,
)

# (name, q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, num_kv_splits); names ending in
# "longest first" launch decode in the engine's order (attention.base.longest_first).
_QWEN = (16, 8, 128)
_ORDERED = "longest first"


def _order(ctx: list[int], dev="cpu") -> torch.Tensor:
    """The engine's decode launch order for these context lengths, as paged_attention takes it."""
    return torch.tensor(longest_first(ctx), dtype=torch.int32, device=dev)


def _order_for(name: str, ctx: list[int], dev) -> torch.Tensor | None:
    return _order(ctx, dev) if name.endswith(_ORDERED) else None


def _accuracy_cases(rng: torch.Generator) -> list[tuple]:
    def ints(n, lo, hi):
        return torch.randint(lo, hi + 1, (n,), generator=rng).tolist()

    dec = ints(64, 1, 2000)
    cases = [
        ("decode b64 blk16", [1] * 64, dec, *_QWEN, 16, None),
        (f"decode b64 {_ORDERED}", [1] * 64, dec, *_QWEN, 16, None),
        ("decode b64 blk256 split4", [1] * 64, dec, *_QWEN, 256, 4),
        ("decode b4 default split", [1] * 4, ints(4, 500, 3000), *_QWEN, 16, None),
        ("decode gqa3 hd64", [1] * 16, ints(16, 1, 900), 12, 4, 64, 32, None),
        ("decode gqa5 split3", [1] * 16, ints(16, 1, 900), 10, 2, 128, 16, 3),
        (f"decode gqa5 split3 {_ORDERED}", [1] * 16, ints(16, 1, 900), 10, 2, 128, 16, 3),
        ("prefill no prefix", [300, 17, 1], [300, 17, 1], *_QWEN, 16, None),
        ("prefill cached prefix", [100, 64], [612, 64 + 256], *_QWEN, 256, None),
        ("chunk mid-prompt gqa3", [128, 40], [384, 1000], 24, 8, 128, 16, None),
    ]
    mixed_q = [1] * 30 + [200, 0, 57] + [1] * 3
    mixed_ctx = ints(30, 1, 1500) + [200, 300, 800] + [0, 0, 0]  # last three: padding lanes
    cases.append(("mixed + padding lanes", mixed_q, mixed_ctx, *_QWEN, 16, None))
    cases.append(("mixed split2", mixed_q, mixed_ctx, *_QWEN, 16, 2))
    cases = [(*c, None) for c in cases]  # + the prefill tile (None: the tuned or default one)
    # Every other prefill tile the start-up tuner may pick: a prompt beside a decode row, and a chunk over a
    # cached prefix with GQA 3 (128 rows are not a whole number of its tokens).
    for t in tk.PREFILL_TILES[1:]:
        tag = ",".join(map(str, t))
        cases.append((f"prefill tile {tag}", [300, 17, 1], [300, 17, 90], *_QWEN, 16, None, t))
        cases.append((f"chunk gqa3 tile {tag}", [128, 40], [384, 1000], 24, 8, 128, 16, None, t))
    return cases


def check_store(dev: torch.device) -> bool:
    nt, kvh, hd, bs, nb = 300, 8, 128, 16, 64
    qkv = torch.randn(nt, 3 * kvh * hd, device=dev, dtype=torch.bfloat16)
    k = qkv[:, kvh * hd:2 * kvh * hd].view(nt, kvh, hd)  # non-contiguous views, as from a packed qkv
    v = qkv[:, 2 * kvh * hd:].view(nt, kvh, hd)
    slots = torch.randperm(nb * bs, device=dev)[:nt]
    slots[::7] = -1
    kc = torch.randn(nb, bs, kvh, hd, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    kr, vr = kc.clone(), vc.clone()
    tk.store_kvcache(k, v, kc, vc, slots)
    ref_store_kvcache(k, v, kr, vr, slots)
    ok = torch.equal(kc, kr) and torch.equal(vc, vr)
    print(f"store_kvcache bf16 (300 tokens, 1/7 padding slots): {'bitwise equal' if ok else 'MISMATCH'}")
    return ok


_ATTENTION_HEADER = f"{'case':32s} {'err triton':>11s} {'err torch-bf16':>15s} {'bound':>9s}  result"


def _check_attention_case(name: str, b, ctx: list[int], splits: int | None, dev: torch.device,
                          prefill_tile=None) -> bool:
    """One case: paged_attention into a NaN-poisoned output against a float32 reference of the same inputs (the
    caches' values, bf16 or fp8), within 2x torch-bf16's error + 1e-3; prints its line."""
    hd = b.q.shape[-1]
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5)
    ref = ref_paged_attention(*args, compute_dtype=torch.float32)
    base = ref_paged_attention(*args, compute_dtype=torch.bfloat16, use_sdpa=True).float()
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(*args, b.max_seqlen_q, out=out, num_kv_splits=splits, seq_order=_order_for(name, ctx, dev),
                       prefill_tile=prefill_tile)
    torch.cuda.synchronize(dev)
    nan = bool(out.isnan().any())
    err = (out.float() - ref).abs().max().item()
    err_base = (base - ref).abs().max().item()
    bound = 2 * err_base + 1e-3
    ok = not nan and err <= bound
    print(f"{name:32s} {err:11.2e} {err_base:15.2e} {bound:9.2e}  {'ok' if ok else 'FAIL'}"
          f"{' (NaN left in output)' if nan else ''}")
    return ok


def check_attention(dev: torch.device, rng: torch.Generator) -> bool:
    all_ok = True
    print(_ATTENTION_HEADER)
    for name, q_lens, ctx, nh, nkv, hd, bs, splits, prefill_tile in _accuracy_cases(rng):
        b = make_paged_batch(q_lens, ctx, nh, nkv, hd, bs, dtype=torch.bfloat16, device=dev, generator=rng)
        all_ok &= _check_attention_case(name, b, ctx, splits, dev, prefill_tile)
    return all_ok


def check_graph(dev: torch.device, rng: torch.Generator) -> bool:
    # Split-KV decode captured in a CUDA graph (partials allocated inside the capture) == eager, in batch
    # order and launched longest first (the engine's decode steps), which must also equal each other.
    ctx = torch.randint(0, 1500, (32,), generator=rng).tolist()
    b = make_paged_batch([1] * 32, ctx, *_QWEN, 16, dtype=torch.bfloat16, device=dev, generator=rng)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, 128 ** -0.5, 1)
    eager = tk.paged_attention(*args, num_kv_splits=4)
    all_ok = True
    for order in (None, _order(ctx, dev)):
        out = torch.full_like(b.q, float("nan"))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tk.paged_attention(*args, out=out, num_kv_splits=4, seq_order=order)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            tk.paged_attention(*args, out=out, num_kv_splits=4, seq_order=order)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ok = torch.equal(out, eager)
        all_ok &= ok
        what = "in batch order" if order is None else "launched longest first"
        print(f"CUDA graph replay of split-KV decode {what}: {'bitwise equal to eager' if ok else 'MISMATCH'}")
    return all_ok


def time_decode(dev: torch.device, rng: torch.Generator) -> None:
    batch = 256
    nh, nkv, hd = _QWEN
    ctx = torch.randint(600, 2001, (batch,), generator=rng).tolist()
    print(f"\ndecode timing: batch {batch}, {nh} q heads / {nkv} KV heads, head_dim {hd}, "
          f"contexts 600-2000 (mean {sum(ctx) / batch:.0f}), bf16")
    print(f"{'block':>5s} {'splits':>6s} {'us/call':>9s} {'GB/s':>8s}")
    for bs in (16, 256):
        b = make_paged_batch([1] * batch, ctx, nh, nkv, hd, bs, dtype=torch.bfloat16, device=dev, generator=rng)
        args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5, 1)
        out = torch.empty_like(b.q)
        # Bytes that must move: every visible K and V row, plus q, out and the block tables.
        kv_bytes = sum(ctx) * nkv * hd * 2 * b.k_cache.element_size()
        other = 2 * b.q.numel() * b.q.element_size() + b.block_tables.numel() * 4
        default = tk.default_num_kv_splits(batch, nkv, 1, dev)
        for splits in sorted({1, 2, 4, default}):
            us = _time(lambda: tk.paged_attention(*args, out=out, num_kv_splits=splits))  # noqa: B023
            tag = " (default)" if splits == default else ""
            print(f"{bs:5d} {splits:6d} {us:9.1f} {(kv_bytes + other) / us / 1e3:8.0f}{tag}")
        del b
    # Decode tiles (BLOCK_N, num_stages, num_warps, heads_first) at block size 16 and the default split count.
    b = make_paged_batch([1] * batch, ctx, nh, nkv, hd, 16, dtype=torch.bfloat16, device=dev, generator=rng)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5, 1)
    out = torch.empty_like(b.q)
    kv_bytes = sum(ctx) * nkv * hd * 2 * b.k_cache.element_size()
    print(f"\n{'BLOCK_N':>7s} {'stages':>6s} {'warps':>5s} {'heads1st':>8s} {'us/call':>9s} {'GB/s':>8s}"
          "   (block 16, default splits)")
    for tile in tk.DECODE_TILES:
        try:
            us = _time(lambda: tk.paged_attention(*args, out=out, tile=tile))  # noqa: B023
        except Exception as exc:  # a tile that does not fit this device is not a candidate
            print(f"{tile[0]:7d} {tile[1]:6d} {tile[2]:5d} {tile[3]:8d}   failed: {type(exc).__name__}: {exc}")
            continue
        print(f"{tile[0]:7d} {tile[1]:6d} {tile[2]:5d} {tile[3]:8d} {us:9.1f} {kv_bytes / us / 1e3:8.0f}")
    # What the engine's start-up tuner picks (its own batch: 256 spread lengths averaging 1,024 keys).
    picked, timings = tk.tune_decode_tile(b.k_cache, b.v_cache, nh, batch, 1024)
    print("start-up tuner (batch 256, 128-1920 keys, mean 1024, longest first): picks "
          f"{picked}; " + ", ".join(f"{t}: {'failed' if us is None else f'{us:.1f} us'}" for t, us in timings.items()))
    del b
    time_launch_order(dev, rng)
    time_fp8_decode(dev, rng)
    time_split_counts(dev, rng)


def time_launch_order(dev: torch.device, rng: torch.Generator, step: int = 212) -> None:
    """Each decode tile on the batch workload A decodes at `step` (its requests still running, in request
    order, each with its prompt + step keys), launched in batch order and longest first (the engine's order).
    On 2026-11-29's H200 run the engine's decode attention at step ~212 took 183 us in batch order."""
    from engine_service import bench
    from scripts.workload_a_model import live_contexts

    nh, nkv, hd = _QWEN
    lens = live_contexts(bench.make_workload(bench.WORKLOAD_A), step)
    b = make_paged_batch([1] * len(lens), lens, nh, nkv, hd, 16, dtype=torch.bfloat16, device=dev, generator=rng)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5, 1)
    out = torch.empty_like(b.q)
    kv_bytes = sum(lens) * nkv * hd * 2 * b.k_cache.element_size()
    order = _order(lens, dev)
    print(f"\nlaunch order: workload A's decode step {step}, {len(lens)} sequences of {min(lens)}-{max(lens)} keys "
          f"(mean {sum(lens) / len(lens):.0f}), block 16, default splits")
    print(f"{'tile':>16s} {'batch order':>20s} {'longest first':>20s} {'gain':>6s}")
    for tile in tk.DECODE_TILES:
        try:
            plain = _time(lambda: tk.paged_attention(*args, out=out, tile=tile))  # noqa: B023
            ordered = _time(lambda: tk.paged_attention(*args, out=out, tile=tile, seq_order=order))  # noqa: B023
        except Exception as exc:
            print(f"{','.join(map(str, tile)):>16s}   failed: {type(exc).__name__}: {exc}")
            continue
        print(f"{','.join(map(str, tile)):>16s} {plain:7.1f} us {kv_bytes / plain / 1e3:5.0f} GB/s "
              f"{ordered:7.1f} us {kv_bytes / ordered / 1e3:5.0f} GB/s {100 * (plain / ordered - 1):5.1f}%")


def time_split_counts(dev: torch.device, rng: torch.Generator, running=(8, 16, 32, 48, 64, 96, 160, 240),
                      splits=(1, 2, 3, 4, 5, 6, 8)) -> None:
    """Decode attention at each KV split count on batches of workload A's own decode steps (the first step with
    at most `running` requests still running: long contexts at small batches), launched longest first with the
    picked tile, as the engine's graphs run them. default_num_kv_splits aims at about two programs an SM; the
    2026-11-30 by-batch profile read about 3.5 TB/s of decode attention at 17-64 running (one split from 48 on)
    against 3.9-4.1 above 64, which this table is to explain."""
    from engine_service import bench
    from scripts.workload_a_model import live_contexts

    nh, nkv, hd = _QWEN
    workload = bench.make_workload(bench.WORKLOAD_A)
    # No tile is named, so these launch as the engine's would: longest first unless the tuner found batch order faster.
    probe_q = torch.empty(1, nh, hd, dtype=torch.bfloat16, device=dev)
    probe_cache = torch.empty(1, 16, nkv, hd, dtype=torch.bfloat16, device=dev)
    order_name = "longest first" if tk.decode_order_pays(probe_q, probe_cache) else "batch order (the tuner's verdict)"
    print(f"\nsplit counts: workload A's decode steps at these batch sizes, block 16, {order_name}, us (GB/s); "
          "* the default, + the fastest")
    print(f"{'running':>7s} {'step':>5s} {'keys':>6s} " + " ".join(f"{f'splits {n}':>16s}" for n in splits))
    for want in running:
        step = next(k for k in range(1, max(workload.max_tokens)) if len(live_contexts(workload, k)) <= want)
        lens = live_contexts(workload, step)
        b = make_paged_batch([1] * len(lens), lens, nh, nkv, hd, 16, dtype=torch.bfloat16, device=dev, generator=rng)
        args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5, 1)
        out, order = torch.empty_like(b.q), _order(lens, dev)
        kv_bytes = sum(lens) * nkv * hd * 2 * b.k_cache.element_size()
        default = tk.default_num_kv_splits(len(lens), nkv, 1, dev)
        timings = {}
        for n in sorted({*splits, default}):
            try:
                def call(n=n):
                    tk.paged_attention(*args, out=out, num_kv_splits=n, seq_order=order)  # noqa: B023

                timings[n] = _time(call)
            except Exception as exc:
                print(f"  {len(lens)} running, {n} splits: failed: {type(exc).__name__}: {exc}")
        best = min(timings, key=timings.get) if timings else None
        cells = [_split_cell(timings.get(n), kv_bytes, n == default, n == best) for n in (*splits, default)]
        extra = "" if default in splits else f"   default {default}: {cells[-1].strip()}"
        print(f"{len(lens):7d} {step:5d} {sum(lens) // len(lens):6d} " + " ".join(cells[:-1]) + extra)
        del b


def _split_cell(us: float | None, kv_bytes: int, default: bool, best: bool) -> str:
    """One cell of the split-count table, 16 wide: us (GB/s), * the default, + the fastest; '-' where it failed."""
    if us is None:
        return f"{'-':>16s}"
    return f"{us:7.1f} ({kv_bytes / us / 1e3:4.0f})" + ("*" if default else " ") + ("+" if best else " ")


def check_and_time_sampling(dev: torch.device, rng: torch.Generator, timing: bool) -> bool:
    """The sampling kernel on Qwen3-sized bf16 logits: each row's uniform at the middle of a chosen token's
    cdf interval must draw that token; then the kernel against the torch path at batch 256 (us per call)."""
    from engine_service import sampling_kernels as sk
    from engine_service.sampler import Sampler, SamplingRow
    from engine_service.sampling_params import SamplingParams

    n, vocab = 64, 151_936
    logits = (torch.randn(n, vocab, generator=rng) * 3).to(torch.bfloat16)
    inv_temp = torch.full((n,), 1 / 0.6)
    want, u = sk.midpoint_draws(logits, inv_temp, rng)
    got = sk.sample_rows(logits.to(dev), inv_temp.to(dev), u.to(dev)).tolist()
    ok = got == want
    wrong = sum(a != b for a, b in zip(got, want, strict=True))
    print(f"\nsampling kernel, {n} rows of {vocab} bf16 logits: "
          + ("every draw is the inverse-CDF token" if ok else f"MISMATCH in {wrong} rows"))
    if timing:
        batch = 256
        big = (torch.randn(batch, vocab, device=dev) * 3).to(torch.bfloat16)
        rows = [SamplingRow(SamplingParams(temperature=0.6), None)] * batch
        for label, fused in (("triton kernel", True), ("torch path", False)):
            sampler = Sampler(dev, 0, triton_sampling=fused)
            us = _time(lambda: sampler.sample(big, rows))  # noqa: B023
            print(f"  Sampler.sample, batch {batch}, temperature 0.6, {label}: {us:.0f} us per call (host included)")
        # The device's time alone, in a CUDA graph (ten draws a replay). The engine's profile before the chunked
        # kernels: 78.5 us for the one-program-a-row kernel at 216 rows, plus 28.5 us for the finite check's sum.
        from engine_service.model.gemm import _graph_timer

        timer = _graph_timer(dev)
        for rows_ in (1, 64, 256):
            part = big[:rows_]
            inv, uu = torch.full((rows_,), 1 / 0.6, device=dev), torch.rand(rows_, device=dev)
            us = timer(lambda: [sk.sample_rows(part, inv, uu, check_finite=True) for _ in range(10)], 10)  # noqa: B023
            ref = timer(lambda: [torch.isfinite(part.sum(-1, dtype=torch.float32)) for _ in range(10)], 10)  # noqa: B023
            print(f"  sampling kernels in a CUDA graph, batch {rows_}: {us:.1f} us ({part.numel() * 2 / us / 1e3:.0f} "
                  f"GB/s of logits), finite check included; torch's float32 sum for that check alone {ref:.1f} us")
    return ok


def _qwen3_layer_elementwise(t: int, dev: torch.device, dtype: torch.dtype, rng: torch.Generator):
    """One Qwen3-0.6B layer's elementwise work at t tokens on random inputs in `dtype`, three ways: torch's
    eager ops in `dtype` (what fused_ops replaces), the same ops in float64 on the same inputs upcast (the
    reference), and fused_ops' kernels. Each returns (q, k, silu*up, post-attention norm, residual)."""
    from engine_service.model import fused_ops
    from engine_service.model.layers import RMSNorm, RotaryEmbedding

    hidden, heads, kv_heads, d, inter, eps = 1024, 16, 8, 128, 3072, 1e-6

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng) * scale).to(dtype).to(dev)

    weights = [(torch.rand(n, generator=rng) + 0.5).to(dtype).to(dev) for n in (hidden, hidden, d, d)]
    table = RotaryEmbedding(d, 4096, 1_000_000.0, dtype).to(dev)
    cos, sin = table.lookup(torch.randint(0, 4096, (t,), generator=rng).to(dev))  # [T, 1, D]
    x, res, attn = rand(t, hidden), rand(t, hidden), rand(t, hidden)
    qkv, gate_up = rand(t, (heads + 2 * kv_heads) * d), rand(t, 2 * inter, scale=3.0)

    # The modules are built here, not in eager(): building one copies to the device, which a graph capture
    # (the timing below) refuses.
    norm_sets = {}
    for up in (False, True):
        norms = []
        for w in weights:
            norm = RMSNorm(w.numel(), eps).to(dev)
            norm.weight.data = w.double() if up else w
            norms.append(norm)
        norm_sets[up] = norms

    def eager(up: bool, qk_norm: bool = True):
        c = (lambda v: v.double()) if up else (lambda v: v)
        in_norm, post_norm, q_norm, k_norm = norm_sets[up]
        if not qk_norm:  # the families without q/k-norm (Llama, Mistral, Qwen2): RoPE alone
            q_norm = k_norm = lambda v: v  # noqa: E731
        total = c(res) + c(x)
        in_norm(total)
        q, k, _ = c(qkv).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = RotaryEmbedding.apply(q_norm(q.view(t, heads, d)), k_norm(k.view(t, kv_heads, d)), (c(cos), c(sin)))
        total2 = total + c(attn)
        gate, up_ = c(gate_up).split([inter, inter], dim=-1)
        return q, k, torch.nn.functional.silu(gate) * up_, post_norm(total2), total2

    def fused():
        _, total = fused_ops.add_rms_norm(x, weights[0], eps, res)
        q, k = fused_ops.qk_norm_rope(qkv, heads, kv_heads, d, weights[2], weights[3], eps, cos[:, 0], sin[:, 0])
        out, total2 = fused_ops.add_rms_norm(attn, weights[1], eps, total)
        return q, k, fused_ops.silu_and_mul(gate_up), out, total2

    def rope_alone():  # (eager, reference, fused) q and k without q/k-norm
        return (eager(False, qk_norm=False)[:2], eager(True, qk_norm=False)[:2],
                fused_ops.qk_norm_rope(qkv, heads, kv_heads, d, None, None, 0.0, cos[:, 0], sin[:, 0]))

    return (lambda: eager(False)), (lambda: eager(True)), fused, rope_alone


def check_and_time_fused_ops(dev: torch.device, rng: torch.Generator, timing: bool,
                             dtype: torch.dtype = torch.bfloat16, tokens: int = 256) -> bool:
    """fused_ops' kernels against a float64 reference from the same bf16 inputs, on a Qwen3-0.6B layer's
    shapes, with the allocator's free memory poisoned with NaN first. Acceptance as for attention: error
    <= 2 x torch's eager bf16 error + 1e-3, every element written. Then one layer's elementwise work in a
    CUDA graph, fused against eager, at decode batch 256 (us per layer; x28 per decode step)."""
    # Freed blocks go back to the caching allocator, so the kernels' outputs are likely carved from NaN. It
    # serves requests of at most 1 MiB (four of the five outputs here) from a pool of its own: poison both.
    small = [torch.full((2**18,), float("nan"), device=dev) for _ in range(256)]  # 256 x 1 MiB of float32
    large = torch.full((64 * 2**20,), float("nan"), device=dev)
    del small, large
    eager, reference, fused, rope_alone = _qwen3_layer_elementwise(tokens, dev, dtype, rng)
    ok = True
    print(f"\nfused elementwise ops, {dtype}, {tokens} tokens of a Qwen3-0.6B layer, max abs error against "
          "float64 from the same inputs:")
    plain_base, plain_want, plain_got = rope_alone()
    names = ("q-norm+rope q", "q-norm+rope k", "silu*up", "add+rmsnorm", "residual", "rope alone q", "rope alone k")
    for name, got, base, want in zip(names, (*fused(), *plain_got), (*eager(), *plain_base),
                                     (*reference(), *plain_want), strict=True):
        finite = bool(torch.isfinite(got).all())
        err = float((got.double() - want).abs().max())
        base_err = float((base.double() - want).abs().max())
        equal = float((got == base).float().mean())
        good = finite and err <= 2 * base_err + 1e-3
        ok &= good
        print(f"  {name:14s} {'ok' if good else 'FAIL'}: fused {err:.3g}, torch eager {base_err:.3g}; "
              f"{equal:.2%} of elements equal to eager" + ("" if finite else "; NaN/inf left in output"))
    if timing:
        for label, fn in (("eager torch ops", eager), ("fused kernels", fused)):
            fn()
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            us = _time(graph.replay, iters=200)
            print(f"  one layer's elementwise work in a CUDA graph, batch {tokens}, {label}: {us:.1f} us "
                  f"(x28 layers: {28 * us / 1000:.2f} ms per decode step)")
    return ok


def check_fused_kv_store(dev: torch.device, rng: torch.Generator) -> bool:
    """The fused q/k-norm + RoPE kernel storing K and V itself (the triton backend's path) writes the cache bit
    for bit as the unfused kernel followed by store_kvcache does, in bf16 on Qwen3-0.6B's shapes, padding slots
    (-1) untouched."""
    from engine_service.model import fused_ops as fo

    t, heads, kv_heads, d, block = 300, 16, 8, 128, 16
    bf16 = torch.bfloat16
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=rng).to(dev, bf16)
    w = [(torch.rand(d, generator=rng) + 0.5).to(dev, bf16) for _ in range(2)]
    angles = torch.rand(t, d, generator=rng).to(dev) * 6.0
    cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
    slots = torch.randperm(64 * block, generator=rng)[:t].to(dev)
    slots[::7] = -1
    k_cache = torch.randn(64, block, kv_heads, d, generator=rng).to(dev, bf16)
    v_cache = torch.randn(64, block, kv_heads, d, generator=rng).to(dev, bf16)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    _, k = fo.qk_norm_rope(qkv, heads, kv_heads, d, *w, 1e-6, cos, sin)
    tk.store_kvcache(k, qkv[:, (heads + kv_heads) * d:].view(t, kv_heads, d), k_want, v_want, slots)
    fo.qk_norm_rope(qkv, heads, kv_heads, d, *w, 1e-6, cos, sin, cache=(k_cache, v_cache, slots))
    torch.cuda.synchronize(dev)
    ok = torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    print(f"fused q/k-norm + RoPE storing K and V (bf16, 300 tokens, 1/7 padding slots): "
          f"{'bitwise equal to the separate store' if ok else 'MISMATCH'}")
    return ok


def check_fp8_kv(dev: torch.device, rng: torch.Generator) -> bool:
    """kv_cache_dtype="fp8" on the GPU: the KV store and the fused RoPE store round bf16 K/V into e4m3 bit for bit
    as torch's clamp + cast (attention.to_kv_cache), padding slots untouched; attention over fp8 caches (decode
    split and longest first, prefill over a prefix, mixed with padding lanes) within 2x torch-bf16's error + 1e-3
    of a float32 reference over the same fp8 values, NaN-poisoned outputs written."""
    from engine_service.model import fused_ops as fo

    fp8, bf16 = FP8_KV_DTYPE, torch.bfloat16
    t, heads, kv_heads, d, block, nb = 300, 16, 8, 128, 16, 64
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * d, generator=rng) * 60).to(dev, bf16)  # some past 448
    w = [(torch.rand(d, generator=rng) + 0.5).to(dev, bf16) for _ in range(2)]
    angles = torch.rand(t, d, generator=rng).to(dev) * 6.0
    cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
    slots = torch.randperm(nb * block, generator=rng)[:t].to(dev)
    slots[::7] = -1
    live = slots >= 0
    v = qkv[:, (heads + kv_heads) * d:].view(t, kv_heads, d)
    _, k = fo.qk_norm_rope(qkv, heads, kv_heads, d, *w, 1e-6, cos, sin)
    ok = True
    for how in ("store_kvcache", "fused RoPE store"):
        k_cache = torch.randint(0, 120, (nb, block, kv_heads, d), generator=rng, dtype=torch.uint8).to(dev).view(fp8)
        v_cache = k_cache.clone()
        untouched = k_cache.view(torch.uint8).clone()
        if how == "store_kvcache":
            tk.store_kvcache(k, v, k_cache, v_cache, slots)
        else:
            fo.qk_norm_rope(qkv, heads, kv_heads, d, *w, 1e-6, cos, sin, cache=(k_cache, v_cache, slots))
        torch.cuda.synchronize(dev)
        flat_k, flat_v = (c.view(torch.uint8).view(-1, kv_heads, d) for c in (k_cache, v_cache))
        good = (torch.equal(flat_k[slots[live]], to_kv_cache(k[live], fp8).view(torch.uint8))
                and torch.equal(flat_v[slots[live]], to_kv_cache(v[live], fp8).view(torch.uint8)))
        written = torch.zeros(nb * block, dtype=torch.bool, device=dev)
        written[slots[live]] = True
        good &= torch.equal(flat_k[~written], untouched.view(-1, kv_heads, d)[~written])
        ok &= good
        print(f"{how} into an fp8 cache (bf16, 300 tokens, 1/7 padding slots): "
              f"{'bitwise torch clamp + cast' if good else 'MISMATCH'}")

    # Every bf16 and fp16 value (each bit pattern but NaN's) through the store, against torch's rounding.
    for dtype in (torch.bfloat16, torch.float16):
        values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(dev)
        values = values[~values.isnan()]
        values = torch.cat([values, values.new_zeros(-values.numel() % (kv_heads * d // 2))]).view(-1, kv_heads, d // 2)
        n = values.shape[0]
        k_cache = torch.zeros(-(-n // block), block, kv_heads, d // 2, dtype=fp8, device=dev)
        tk.store_kvcache(values, values, k_cache, k_cache.clone(), torch.arange(n, device=dev))
        good = torch.equal(k_cache.view(torch.uint8).view(-1, kv_heads, d // 2)[:n],
                           to_kv_cache(values, fp8).view(torch.uint8))
        ok &= good
        print(f"store_kvcache of every finite {str(dtype)[6:]} value into fp8: "
              f"{'bitwise torch clamp + cast' if good else 'MISMATCH'}")

    def ints(n, lo, hi):
        return torch.randint(lo, hi + 1, (n,), generator=rng).tolist()

    dec = ints(64, 1, 2000)
    cases = [("fp8 decode b64", [1] * 64, dec, *_QWEN, 16, None),
             (f"fp8 decode b64 split4 {_ORDERED}", [1] * 64, dec, *_QWEN, 16, 4),
             ("fp8 prefill cached prefix", [100, 64], [612, 320], *_QWEN, 16, None),
             ("fp8 mixed + padding lanes", [1] * 6 + [200, 1], ints(6, 1, 1500) + [300, 0], *_QWEN, 16, None)]
    print(_ATTENTION_HEADER)
    for name, q_lens, ctx, nh, nkv, hd, bs, splits in cases:
        b = make_paged_batch(q_lens, ctx, nh, nkv, hd, bs, dtype=bf16, device=dev, generator=rng)
        b.k_cache, b.v_cache = to_kv_cache(b.k_cache * 8, fp8), to_kv_cache(b.v_cache, fp8)
        ok &= _check_attention_case(name, b, ctx, splits, dev)
    return ok


def time_fp8_decode(dev: torch.device, rng: torch.Generator, step: int = 212) -> None:
    """Decode attention on workload A's decode step `step` over a bf16 cache and over an fp8 one (half the
    bytes), launched longest first with the default split count, each decode tile: what kv_cache_dtype="fp8" does
    to the attention that is 78% of a decode step mid workload A."""
    from engine_service import bench
    from scripts.workload_a_model import live_contexts

    nh, nkv, hd = _QWEN
    lens = live_contexts(bench.make_workload(bench.WORKLOAD_A), step)
    b = make_paged_batch([1] * len(lens), lens, nh, nkv, hd, 16, dtype=torch.bfloat16, device=dev, generator=rng)
    caches = {"bf16": (b.k_cache, b.v_cache),
              "fp8": (to_kv_cache(b.k_cache, FP8_KV_DTYPE), to_kv_cache(b.v_cache, FP8_KV_DTYPE))}
    out, order = torch.empty_like(b.q), _order(lens, dev)
    print(f"\nfp8 KV cache: workload A's decode step {step}, {len(lens)} sequences (mean "
          f"{sum(lens) / len(lens):.0f} keys), block 16, longest first, us (GB/s of the cache read)")
    print(f"{'tile':>16s} {'bf16 cache':>20s} {'fp8 cache':>20s} {'fp8 gain':>9s}")
    for tile in tk.DECODE_TILES:
        row = []
        for k_cache, v_cache in caches.values():
            kv_bytes = sum(lens) * nkv * hd * 2 * k_cache.element_size()
            args = (b.q, k_cache, v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables, hd ** -0.5, 1)
            try:
                us = _time(lambda: tk.paged_attention(*args, out=out, tile=tile, seq_order=order))  # noqa: B023
            except Exception as exc:
                row.append(None)
                print(f"{','.join(map(str, tile)):>16s}   failed: {type(exc).__name__}: {exc}")
                break
            row.append((us, kv_bytes / us / 1e3))
        if len(row) == 2 and None not in row:
            (plain, plain_bw), (fp8, fp8_bw) = row
            print(f"{','.join(map(str, tile)):>16s} {plain:7.1f} us {plain_bw:5.0f} GB/s {fp8:7.1f} us {fp8_bw:5.0f} GB/s "
                  f"{100 * (plain / fp8 - 1):8.1f}%")


# Qwen3-0.6B's decode GEMMs, (name, N, K): out[M, N] = x[M, K] @ W[N, K]^T.
_DECODE_GEMMS = (("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072))
_GEMM_CHECK_ROWS = (1, 64, 224)
_GEMM_TABLE_ROWS = (1, 8, 32, 64, 128, 224, 256)


def check_gemms(dev: torch.device, rng: torch.Generator) -> bool:
    """The engine's decode GEMM (engine_service/model/gemm.py) in bf16: every candidate tile of Qwen3-0.6B's four
    shapes at 1, 64 and 224 rows, into a NaN-poisoned output, against a float32 reference of the same bf16 inputs;
    within 2x torch-bf16's error + 1e-3, every element written, and the same bits on a second launch over the same
    workspace."""
    from engine_service.model import gemm as G

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print("\ndecode GEMM tiles, bf16, max abs error against a float32 reference (NaN-poisoned outputs)")
    ok = True
    for name, n, k in _DECODE_GEMMS:
        w = (torch.randn(n, k, generator=rng) * 0.02).to(dev, torch.bfloat16)
        for m in _GEMM_CHECK_ROWS:
            x = torch.randn(m, k, generator=rng).to(dev, torch.bfloat16)
            ref = x.float() @ w.float().T
            base_err = float((torch.nn.functional.linear(x, w).float() - ref).abs().max())
            for tile in G.candidates(m, n, k, sms):
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
                try:
                    # One workspace for both launches, as the engine's: the second finds the counters the first
                    # left, and gives other bits unless they are back at zero.
                    workspace = G.Workspace(dev, *tile.workspace(m, n))
                    G.gemm(x, w, None, tile, workspace, out=out)
                    again = G.gemm(x, w, None, tile, workspace)
                    torch.cuda.synchronize(dev)
                except Exception as exc:
                    ok = False
                    print(f"  gemm {name:7s} {m:3d} rows {str(tile):16s} FAIL: {type(exc).__name__}: {exc}")
                    continue
                err = float((out.float() - ref).abs().max())
                same = torch.equal(out, again)
                good = bool(torch.isfinite(out).all()) and err <= 2 * base_err + 1e-3 and same
                ok &= good
                print(f"  gemm {name:7s} {m:3d} rows {str(tile):16s} {'ok' if good else 'FAIL'}: {err:.3g}, "
                      f"torch {base_err:.3g}" + ("" if same else ", NOT the same bits twice"))
    return ok


def time_decode_gemms(dev: torch.device, rng: torch.Generator) -> None:
    """Qwen3-0.6B's four decode GEMMs at decode batch sizes, timed as the engine's start-up tuner times them
    (model/gemm.py): inside a CUDA graph, over 28 weights of the shape one after another as a decode step reads
    them (so none is still in L2), torch against every candidate tile. On 2026-11-29's H200 run torch's took 6-8.4
    us each at ~216 rows in the engine's graphs, 0.93 ms of a 6.5 ms decode step."""
    from engine_service.model import gemm as G

    print("\ndecode GEMMs, bf16, us per call over 28 weights in a CUDA graph (weights' GB/s): torch, the fastest "
          "tile, the engine's pick")
    print(f"{'gemm':>8s} {'M':>4s} {'torch':>14s} {'fastest tile':>14s}  {'tile':16s} picked")

    class _Layer(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight, self.gemms = w, None

    for name, n, k in _DECODE_GEMMS:
        layers = [_Layer((torch.randn(n, k, generator=rng) * 0.02).to(dev, torch.bfloat16)) for _ in range(28)]
        (found,) = G.tune_decode_gemms({name: layers}, _GEMM_TABLE_ROWS)
        for m in _GEMM_TABLE_ROWS:
            def cell(us, kb=n * k * 2 / 1e3):
                return f"{'-':>14s}" if us is None else f"{us:5.1f} ({kb / us:5.0f})"

            best = found.best.get(m)
            print(f"{name:>8s} {m:4d} {cell(found.torch_us[m]):>14s} {cell(best and best[1]):>14s}  "
                  f"{str(best[0]) if best else '-':16s} {'yes' if m in found.picked else 'no'}")
        for tile, why in found.failed.items():
            print(f"  {name}: tile {tile} dropped: {why}")


def _time(fn, iters: int = 50) -> float:
    """Mean microseconds per call, after a warm-up that also compiles."""
    for _ in range(3):
        fn()
    return tk._cuda_event_timer(fn, iters)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90, no GPU needed
# ---------------------------------------------------------------------------------------------
def _bind(launch, backend) -> tuple:
    """triton's JIT binder on a planned launch: (bound args, specialisation, options), the specialisation
    being what selects a compiled variant (ints == 1 become constexprs, 16-divisible ints and pointers get
    divisibility)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    return binder(*launch.args, **launch.constexprs, **launch.options)


def _aot_compile(launch, target) -> object:
    """Compile one planned launch as triton's JIT would on the target: same binder, same
    specialisation (ints == 1 become constexprs, 16-divisible ints and pointers get divisibility)."""
    from triton.compiler.compiler import ASTSource, make_backend

    fn = launch.kernel
    backend = make_backend(target)
    kwargs = {**launch.constexprs, **launch.options}
    bound_args, specialization, options = _bind(launch, backend)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


_MAX_SHARED_SM90 = 227 * 1024  # bytes of shared memory one thread block may use on H100/H200


def _ptxas_usage(ptx: str) -> str:
    """'registers/spilled bytes' from ptxas -v on a kernel's PTX for sm_90a (what bounds occupancy, and spills
    that would eat into a memory-bound kernel's bandwidth); '?' where no ptxas answers."""
    import re
    import shutil
    import subprocess
    import tempfile


    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    exe = str(ptxas) if ptxas.exists() else shutil.which("ptxas")
    if exe is None:
        return "?"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        try:
            run = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spill = re.search(r"(\d+) bytes spill stores", run.stderr)
    return f"{regs.group(1)}/{spill.group(1)}" if regs and spill else "?"


def check_specialisation(target) -> bool:
    """Plan paged-attention launches for steps of 1 to 40 sequences with block tables 1 to 40 blocks wide,
    and count the variants triton's JIT would compile for each set of constexprs (the binder's key): the
    batch shape may choose constexprs (BLOCK_M, splits), never anything else."""
    import random

    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    rng = random.Random(0)
    found: dict[tuple, set[str]] = {}
    for n, q_range, blocks in [(1, (1, 1), 1), (2, (1, 1), 3), (16, (1, 1), 16), (17, (1, 1), 5),
                               (32, (1, 1), 32), (1, (40, 60), 1), (1, (40, 60), 4), (3, (40, 60), 16),
                               (16, (40, 60), 7), (32, (40, 60), 32), (40, (40, 60), 40)]:
        q_lens = [rng.randint(*q_range) for _ in range(n)]
        ctx = [max(q, rng.randint(1, 16 * blocks)) for q in q_lens]
        ctx[0] = max(ctx[0], 16 * blocks - 3)  # the widest table has exactly `blocks` entries
        b = make_paged_batch(q_lens, ctx, *_QWEN, 16, dtype=torch.bfloat16)
        tables = b.block_tables[:, :blocks].contiguous()  # stride(0) == blocks, as the engine packs them
        # Decode steps launch longest first (the engine's order), so plan them both ways.
        orders = [None] + ([_order(ctx)] if b.max_seqlen_q == 1 else [])
        for order in orders:
            for launch in tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens,
                                                   tables, 128 ** -0.5, b.max_seqlen_q, torch.empty_like(b.q), 1,
                                                   seq_order=order):
                _, spec, _ = _bind(launch, backend)
                found.setdefault((launch.kernel.__name__, *sorted(launch.constexprs.items())), set()).add(repr(spec))
    # The sampling kernels at every batch size a step may sample (Qwen3's vocabulary, bf16 logits), checked or
    # not: the rows drawn must choose nothing but the CHECK constexpr.
    from unittest import mock

    from engine_service import sampling_kernels as sk

    launches: list = []
    with mock.patch.object(sk, "_chunk_stats_kernel", _Recorder(sk._chunk_stats_kernel, launches)), \
            mock.patch.object(sk, "_chunk_pick_kernel", _Recorder(sk._chunk_pick_kernel, launches)):
        for n in (1, 2, 3, 16, 17, 32, 100, 256):
            for check in (False, True):
                sk.sample_rows(torch.empty(n, 151_936, dtype=torch.bfloat16), 1 / torch.rand(n), torch.rand(n),
                               check_finite=check)
    for launch in launches:
        _, spec, _ = _bind(launch, backend)
        found.setdefault((launch.kernel.__name__, *sorted(launch.constexprs.items())), set()).add(repr(spec))
    ok = all(len(v) == 1 for v in found.values())
    for key, specs in found.items():
        if len(specs) > 1:
            print(f"specialisation: {key[0]} with {dict(key[1:])} has {len(specs)} variants for the same "
                  f"constexprs (a runtime integer is specialised): {sorted(specs)}")
    print(f"specialisation: {len(found)} constexpr sets over 11 attention batch shapes and 8 sampled batch sizes, "
          + ("one compiled variant each" if ok else "FAILED: more than one variant for some"))
    return ok


def compile_only(shard: int = 0, shards: int = 1) -> bool:
    """shard of shards: this process compiles every shards-th attention configuration from the shard-th; the first
    shard also checks specialisation and compiles the sampling and fused kernels, the last the GEMMs and the PDL
    variants (the test suite runs two shards at once, one a core)."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    ok = check_specialisation(target) if shard == 0 else True
    cpu = torch.device("cpu")
    configs = [
        # (label, dtype, q_lens, ctx, nh, nkv, hd, block, splits)
        ("decode qwen3 blk16", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN, 16, 1),
        ("decode qwen3 blk256 split4", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN, 256, 4),
        ("decode batch1 (scalar args)", torch.bfloat16, [1], [70], *_QWEN, 16, 1),
        ("decode gqa5 fp16 split3", torch.float16, [1] * 4, [90] * 4, 10, 2, 128, 32, 3),
        ("decode gqa1 hd32", torch.float16, [1] * 4, [90] * 4, 4, 4, 32, 16, 1),
        ("prefill qwen3", torch.bfloat16, [300, 20], [300, 400], *_QWEN, 16, 1),
        ("prefill gqa3 hd64", torch.bfloat16, [300, 20], [300, 400], 12, 4, 64, 16, 1),
        ("prefill gqa32 (MQA) hd80", torch.bfloat16, [30, 20], [300, 400], 32, 1, 80, 16, 1),
        ("prefill fp32 (ieee dot)", torch.float32, [30, 20], [300, 400], 4, 2, 64, 16, 1),
        ("prefill qwen3 fp32", torch.float32, [300, 20], [300, 400], *_QWEN, 16, 1),  # the GPU tests' engines
    ]
    configs = [(*c, None, None) for c in configs]  # + (decode tile, prefill tile)
    # Every decode tile the start-up tuner may pick, on Qwen3-0.6B's shapes, launched longest first as the engine's
    # decode steps are (a label ending in _ORDERED), one split and four.
    configs += [(f"decode qwen3 tile {','.join(map(str, t))} {_ORDERED}", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN,
                 16, 1, t, None) for t in tk.DECODE_TILES]
    configs.append((f"decode qwen3 split4 {_ORDERED}", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN, 16, 4, None, None))
    # And every prefill tile, in bf16 and fp16 (the two dtypes the prefill tuner runs for).
    configs += [(f"prefill qwen3 tile {','.join(map(str, t))} {str(dt)[6:]}", dt, [300, 20], [300, 400], *_QWEN, 16, 1,
                 None, t) for t in tk.PREFILL_TILES for dt in (torch.bfloat16, torch.float16)]
    # Their short-query variants too (16 and 32 rows), which start-up's warm-up compiles outside any fallback.
    configs += [(f"prefill qwen3 tile {','.join(map(str, t))} q{q}", torch.bfloat16, [q, 1], [q, 400], *_QWEN, 16, 1,
                 None, t) for t in tk.PREFILL_TILES for q in (2, 9)]
    # An fp8 KV cache (kv_cache_dtype="fp8"): the caches in e4m3, the queries in the model's dtype.
    configs += [
        ("decode qwen3 fp8 kv", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN, 16, 1, None, None),
        (f"decode qwen3 fp8 kv split4 {_ORDERED}", torch.bfloat16, [1] * 8, [700] * 8, *_QWEN, 16, 4, None, None),
        ("prefill qwen3 fp8 kv", torch.bfloat16, [300, 20], [300, 400], *_QWEN, 16, 1, None, None),
        ("prefill gqa5 fp16 fp8 kv", torch.float16, [30, 20], [300, 400], 10, 2, 128, 32, 1, None, None),
    ]
    configs = configs[shard::shards]
    print(f"{'config':44s} {'kernel':26s} {'shared B':>9s} {'mma':>5s} {'cp.async':>8s} {'regs/spill B':>12s} "
          f"{'s':>5s}")
    for label, dtype, q_lens, ctx, nh, nkv, hd, bs, splits, tile, prefill_tile in configs:
        b = make_paged_batch(q_lens, ctx, nh, nkv, hd, bs, dtype=dtype, device=cpu)
        if "fp8 kv" in label:
            b.k_cache, b.v_cache = (to_kv_cache(c, FP8_KV_DTYPE) for c in (b.k_cache, b.v_cache))
        out = torch.empty_like(b.q)
        launches = tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens,
                                            b.block_tables, hd ** -0.5, b.max_seqlen_q, out, splits, tile,
                                            _order_for(label, ctx, cpu), prefill_tile)
        for launch in launches:
            # Planned on CPU tensors, bf16 would get the interpreter's fp32 upcast; compile what CUDA runs.
            if "UPCAST" in launch.constexprs:
                launch.constexprs["UPCAST"] = False
                launch.constexprs["DOT_PREC"] = "ieee" if dtype == torch.float32 else "tf32"
        k = torch.randn(len(q_lens), nkv, hd).to(dtype)
        launches += tk._plan_store_kvcache(k, k, b.k_cache, b.v_cache,
                                           torch.zeros(len(q_lens), dtype=torch.int64))
        for launch in launches:
            t0 = time.time()
            try:
                compiled = _aot_compile(launch, target)
            except Exception as e:  # report every failing variant, not just the first
                ok = False
                print(f"{label:44s} {launch.kernel.__name__:26s} FAILED: {type(e).__name__}: {e}")
                continue
            ptx = compiled.asm.get("ptx", "")
            if "cubin" not in compiled.asm:
                ok = False
                print(f"{label:44s} {launch.kernel.__name__:26s} no cubin produced")
                continue
            too_big = compiled.metadata.shared > _MAX_SHARED_SM90
            ok = ok and not too_big
            print(f"{label:44s} {launch.kernel.__name__:26s} {compiled.metadata.shared:9d} "
                  f"{ptx.count('mma'):5d} {ptx.count('cp.async'):8d} {_ptxas_usage(ptx):>12s} {time.time() - t0:5.1f}"
                  + ("  FAILED: more shared memory than an sm_90 block may have" if too_big else ""))
    if shard == 0:
        ok &= _compile_sampling_and_fused(target)
    if shard == shards - 1:
        ok &= _compile_gemms(target)
        ok &= _compile_pdl(target)
    done = "all kernels compiled for sm_90" if shards == 1 else f"shard {shard}/{shards} compiled for sm_90"
    print("compile-only:", done if ok else "FAILURES")
    return ok


def _compile_sampling_and_fused(target) -> bool:
    ok = True
    # The sampling kernel, on bf16 logits of Qwen3's vocabulary.
    from engine_service import sampling_kernels as sk

    n, vocab = 4, 151_936
    chunks = -(-vocab // sk.BLOCK_V)
    logits = torch.empty(n, vocab, dtype=torch.bfloat16)
    stats, bad, out = torch.empty(n, chunks), torch.empty(n, chunks), torch.empty(2, n).long()
    for check in (False, True):
        launch = tk._Launch(sk._chunk_stats_kernel, (n, chunks),
                            (logits, torch.empty(n), stats, stats, bad, vocab, logits.stride(0)),
                            dict(BLOCK=sk.BLOCK_V, CHECK=check), dict(num_warps=sk.NUM_WARPS))
        ok &= _compile_one(f"sampling chunk stats bf16{' checked' if check else ''}", launch, target)
        launch = tk._Launch(sk._chunk_pick_kernel, (n,),
                            (logits, torch.empty(n), torch.empty(n), stats, stats, bad, out, vocab, logits.stride(0),
                             chunks),
                            dict(BLOCK=sk.BLOCK_V, CHUNKS=32, CHECK=check), dict(num_warps=sk.NUM_WARPS))
        ok &= _compile_one(f"sampling chunk pick bf16{' checked' if check else ''}", launch, target)
    ok &= _compile_fused_ops(target)
    return ok


def _compile_gemms(target) -> bool:
    """Every tile the decode GEMM tuner may time on Qwen3-0.6B's four shapes at the sizes a 256-sequence engine
    captures, bf16, compiled for sm_90: each tile once, on the first shape that has it (the engine compiles a
    variant per tile and shape, 50 here, but a shape changes only the K loop's trip count and the tile index
    arithmetic; what can fail, shared memory and registers, is the tile's)."""
    from unittest import mock

    from engine_service.cuda_graphs import capture_sizes
    from engine_service.model import gemm as G

    launches: list = []
    labels: list[str] = []
    tiles = set()
    with mock.patch.object(G, "_gemm_kernel", _Recorder(G._gemm_kernel, launches)):
        for name, n, k in _DECODE_GEMMS:
            w = torch.empty(n, k, dtype=torch.bfloat16)
            for m in capture_sizes(256):
                for tile in G.candidates(m, n, k, 132):
                    if tile not in tiles:
                        tiles.add(tile)
                        labels.append(f"gemm {name} {tile} w{tile.num_warps} s{tile.num_stages}")
                        G.gemm(torch.empty(m, k, dtype=torch.bfloat16), w, None, tile)
    ok = True
    for launch, label in zip(launches, labels, strict=True):
        ok &= _compile_one(label, launch, target)
    print(f"decode GEMM: the {len(labels)} tiles of Qwen3-0.6B's four shapes")
    return ok


def _compile_pdl(target) -> bool:
    """Each kernel that takes part in programmatic dependent launch (engine_service/pdl.py), as the engine
    launches it with PDL on, compiled for sm_90: it must compile and its PTX must open with griddepcontrol.wait."""
    from unittest import mock

    from engine_service.model import fused_ops as fo
    from engine_service.model import gemm as G

    launches: list = []
    names = ("_add_rms_norm_kernel", "_qk_norm_rope_kernel", "_silu_and_mul_kernel")
    bf16 = torch.bfloat16
    with mock.patch.multiple(fo, **{n: _Recorder(getattr(fo, n), launches) for n in names}), \
            mock.patch.object(G, "_gemm_kernel", _Recorder(G._gemm_kernel, launches)):
        x, w = torch.empty(64, 1024, dtype=bf16), torch.empty(1024, dtype=bf16)
        fo.add_rms_norm(x, w, 1e-6, torch.empty_like(x))
        cos, cache = torch.empty(64, 128, dtype=bf16), torch.empty(64, 16, 8, 128, dtype=bf16)
        fo.qk_norm_rope(torch.empty(64, 4096, dtype=bf16), 16, 8, 128, torch.empty(128, dtype=bf16),
                        torch.empty(128, dtype=bf16), 1e-6, cos, cos,
                        cache=(cache, cache, torch.zeros(64, dtype=torch.long)))
        fo.silu_and_mul(torch.empty(64, 6144, dtype=bf16))
        tile = next(t for t in G.candidates(4, 1024, 2048, 132) if t.split_k > 1)
        G.gemm(torch.empty(4, 2048, dtype=bf16), torch.empty(1024, 2048, dtype=bf16), None, tile)
    b = make_paged_batch([1] * 8, [700] * 8, *_QWEN, 16, dtype=bf16)
    launches += tk._plan_paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables,
                                         128 ** -0.5, 1, torch.empty_like(b.q), 4, seq_order=_order([700] * 8))
    ok = len(launches) == 6
    for launch in launches:
        if "UPCAST" in launch.constexprs:
            launch.constexprs.update(UPCAST=False, DOT_PREC="tf32")
        launch.options.update(PDL=True, launch_pdl=True)
        compiled = _try_compile("pdl", launch, target)
        if compiled is None:
            ok = False
            continue
        ptx = compiled.asm.get("ptx", "")
        wait = ptx.find("griddepcontrol.wait")
        # The first global memory access of any kind (a load, an async copy, an atomic or a store) comes after it.
        first = min((i for i in (ptx.find(op) for op in ("ld.global", "cp.async", "atom.", "red.", "st.global"))
                     if i >= 0), default=len(ptx))
        fine = 0 <= wait < first and compiled.metadata.launch_pdl
        ok &= fine
        print(f"{'pdl':44s} {launch.kernel.__name__:26s} {compiled.metadata.shared:9d} "
              + ("griddepcontrol.wait before any global access" if fine else "FAILED: no wait before the first access"))
    print(f"programmatic dependent launch: {len(launches)} kernels", "ok" if ok else "FAILED")
    return ok


def _try_compile(label: str, launch, target):
    """Compile one launch for the target; None, having printed why, where it failed."""
    try:
        return _aot_compile(launch, target)
    except Exception as e:
        print(f"{label:44s} {launch.kernel.__name__:26s} FAILED: {type(e).__name__}: {e}")
        return None


def _compile_one(label: str, launch, target) -> bool:
    """Compile one launch for the target and print its shared memory, or why it failed."""
    compiled = _try_compile(label, launch, target)
    if compiled is not None:
        print(f"{label:44s} {launch.kernel.__name__:26s} {compiled.metadata.shared:9d}")
    return compiled is not None


class _Recorder:
    """Stands in for a triton kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, num_warps=4, num_stages=None, **constexprs):
            options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps,
                                                                                num_stages=num_stages)
            self.launches.append(tk._Launch(self.kernel, grid, args, constexprs, options))
        return record


def _compile_fused_ops(target) -> bool:
    """fused_ops' kernels as the model launches them on Qwen3-0.6B's shapes in bf16, compiled for sm_90."""
    from unittest import mock

    from engine_service.model import fused_ops as fo

    launches: list = []
    names = ("_add_rms_norm_kernel", "_qk_norm_rope_kernel", "_silu_and_mul_kernel")
    with mock.patch.multiple(fo, **{n: _Recorder(getattr(fo, n), launches) for n in names}):
        bf16 = torch.bfloat16
        x, w = torch.empty(256, 1024, dtype=bf16), torch.empty(1024, dtype=bf16)
        fo.add_rms_norm(x, w, 1e-6, torch.empty_like(x))
        fo.add_rms_norm(x, w, 1e-6, None)
        cos = torch.empty(256, 128, dtype=bf16)
        fo.qk_norm_rope(torch.empty(256, 4096, dtype=bf16), 16, 8, 128, torch.empty(128, dtype=bf16),
                        torch.empty(128, dtype=bf16), 1e-6, cos, cos)
        fo.qk_norm_rope(torch.empty(256, 4096, dtype=bf16), 16, 8, 128, None, None, 0.0, cos, cos)  # Llama's
        cache = torch.empty(64, 16, 8, 128, dtype=bf16)  # K and V stored too: the triton backend's path
        fo.qk_norm_rope(torch.empty(256, 4096, dtype=bf16), 16, 8, 128, torch.empty(128, dtype=bf16),
                        torch.empty(128, dtype=bf16), 1e-6, cos, cos,
                        cache=(cache, cache, torch.zeros(256, dtype=torch.long)))
        cache = torch.empty(64, 16, 8, 128, dtype=FP8_KV_DTYPE)  # into an fp8 KV cache
        fo.qk_norm_rope(torch.empty(256, 4096, dtype=bf16), 16, 8, 128, torch.empty(128, dtype=bf16),
                        torch.empty(128, dtype=bf16), 1e-6, cos, cos,
                        cache=(cache, cache, torch.zeros(256, dtype=torch.long)))
        fo.silu_and_mul(torch.empty(256, 6144, dtype=bf16))
    ok = True
    for launch in launches:
        label = f"fused qwen3 bf16 {'residual' if launch.constexprs.get('HAS_RES') else ''}".strip()
        if launch.constexprs.get("NORM") is False:
            label = "fused llama bf16 rope alone"
        if launch.constexprs.get("STORE"):
            fp8 = launch.args[7].dtype == FP8_KV_DTYPE  # the kernel's k_cache_ptr
            label = "fused qwen3 bf16 rope + KV store" + (" fp8" if fp8 else "")
        compiled = _try_compile(label, launch, target)
        if compiled is None:
            ok = False
            continue
        print(f"{label:44s} {launch.kernel.__name__:26s} {compiled.metadata.shared:9d} {'':5s} {'':8s} "
              f"{_ptxas_usage(compiled.asm.get('ptx', '')):>12s}")
    if len(launches) != 7:
        print(f"fused ops: {len(launches)} launches recorded, 7 expected")
        ok = False
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 without a GPU")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--shard", default="0/1", help="--compile-only: I/N, this process's share of the attention "
                                                     "configurations; shard 0 also checks specialisation and "
                                                     "compiles the sampling and fused kernels, the last the GEMMs "
                                                     "and PDL variants")
    a = ap.parse_args()
    if a.compile_only:
        shard, _, shards = a.shard.partition("/")
        if not (shard.isdigit() and shards.isdigit() and int(shard) < int(shards)):
            ap.error(f"--shard must be I/N with 0 <= I < N, e.g. 0/2; got {a.shard!r}")
        return 0 if compile_only(int(shard), int(shards)) else 1
    if not torch.cuda.is_available():
        print("no CUDA device (use --compile-only to check compilation for sm_90)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, seed {a.seed}")
    torch.manual_seed(a.seed)
    rng = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    ok = check_store(dev)
    ok &= check_attention(dev, rng)
    ok &= check_graph(dev, rng)
    ok &= check_and_time_sampling(dev, rng, not a.no_timing)
    ok &= check_and_time_fused_ops(dev, rng, not a.no_timing)
    ok &= check_fused_kv_store(dev, rng)
    ok &= check_fp8_kv(dev, rng)
    ok &= check_gemms(dev, rng)
    if not a.no_timing:
        time_decode(dev, rng)
        time_decode_gemms(dev, rng)
    print(f"\n{'PASS' if ok else 'FAIL'} in {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
