"""A model of workload A's time on one GPU, from its lengths and a few measured rates.

Decode step k (k = 1 .. 1,023) runs every request whose max_tokens exceeds k, and its attention reads each such
request's prompt + k keys in every layer. With the rates the GPU check measures (attention's memory rate, the
rest of a decode step, the prefill's seconds), this gives the time each part of the run takes, and so which
part stands between a figure and the target.

    python scripts/workload_a_model.py                                   # the 2026-11-29 H200 run's rates
    python scripts/workload_a_model.py --attention-tb-s 4.1 --step-ms 1.4
"""

from __future__ import annotations

import argparse

from engine_service import bench

KV_BYTES_PER_KEY_LAYER = 8 * 128 * 2 * 2  # Qwen3-0.6B: 8 KV heads x head_dim 128 x (K, V) x bf16
LAYERS = 28


def live_contexts(workload: bench.Workload, step: int) -> list[int]:
    """The context lengths decode step `step` attends over: each request still running then (max_tokens above
    `step`), in request order, with its prompt and `step` generated tokens."""
    return [len(p) + step for p, m in zip(workload.prompts, workload.max_tokens, strict=True) if m > step]


def decode_steps(spec=bench.WORKLOAD_A) -> list[tuple[int, int]]:
    """(running requests, keys read per layer) for each decode step of the workload."""
    w = bench.make_workload(spec)
    steps = []
    for k in range(1, max(w.max_tokens)):
        live = live_contexts(w, k)
        steps.append((len(live), sum(live)))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention-tb-s", type=float, default=3.77, help="decode attention's memory rate")
    ap.add_argument("--step-ms", type=float, default=1.57,
                    help="the rest of a decode step: GEMMs, elementwise kernels, sampling, gaps")
    ap.add_argument("--prefill-s", type=float, default=0.5, help="all prefill steps together")
    args = ap.parse_args()
    steps = decode_steps()
    attention = sum(keys for _, keys in steps) * KV_BYTES_PER_KEY_LAYER * LAYERS / (args.attention_tb_s * 1e12)
    rest = len(steps) * args.step_ms / 1e3
    total = attention + rest + args.prefill_s
    tokens = bench.make_workload(bench.WORKLOAD_A).num_output_tokens
    print(f"{len(steps)} decode steps; attention {attention:.2f} s at {args.attention_tb_s} TB/s, the rest of "
          f"the decode steps {rest:.2f} s at {args.step_ms} ms, prefill {args.prefill_s:.2f} s")
    print(f"total {total:.2f} s, {tokens / total:,.0f} tok/s (target 28,000: {tokens / 28_000:.2f} s)")


if __name__ == "__main__":
    main()
