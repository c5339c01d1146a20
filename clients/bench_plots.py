"""PNG plots of a serving benchmark's runs (matplotlib, Agg backend): what docs/PERFORMANCE.md shows.

- `latency_vs_rate.png`: time to first token and inter-token latency (p50, p90, p99) against request rate;
- `throughput_vs_concurrency.png`: output tokens per second against the concurrency limit, one line per rate.

Only the gRPC runs are plotted; pairs of the same (rate, concurrency) are reduced to their median. matplotlib is
imported here only, so the client library itself never needs it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

UNBOUNDED = 10**6  # serving_bench's default concurrency: no limit
PERCENTILES = (50, 90, 99)


def _label(value: float) -> str:
    if math.isinf(value) or value >= UNBOUNDED:
        return "inf"
    return f"{value:g}"


def _medians(rows: list[dict], key: str) -> dict[tuple[float, int], float]:
    """(rate, concurrency) -> the median of `key` over that point's gRPC runs."""
    groups: dict[tuple[float, int], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("mode", "grpc") == "grpc" and isinstance(row.get(key), int | float):
            groups[(float(row["rate"]), int(row["concurrency"]))].append(float(row[key]))
    return {point: statistics.median(values) for point, values in groups.items()}


def write_plots(rows: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write the two PNGs into out_dir (created if needed); return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    throughput = _medians(rows, "output_throughput")
    points = sorted(throughput)
    if not points:
        raise ValueError("no gRPC runs to plot")
    rates = sorted({r for r, _ in points})
    concurrencies = sorted({c for _, c in points})

    # Latency against rate, at the largest concurrency limit that was run.
    top = concurrencies[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, name in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "itl_ms", "inter-token latency")):
        for q in PERCENTILES:
            values = _medians(rows, f"{metric}_p{q}")
            ys = [values.get((r, top), float("nan")) for r in rates]
            ax.plot(range(len(rates)), ys, marker="o", label=f"p{q}")
        ax.set_xticks(range(len(rates)), [_label(r) for r in rates])
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title} latency against request rate (concurrency {_label(top)})".strip())
    fig.tight_layout()
    paths = [out / "latency_vs_rate.png"]
    fig.savefig(paths[-1], format="png", dpi=80)
    plt.close(fig)

    # Throughput against concurrency, one line per rate.
    fig, ax = plt.subplots(figsize=(6, 4))
    for rate in rates:
        xs = [c for c in concurrencies if (rate, c) in throughput]
        ax.plot([concurrencies.index(c) for c in xs], [throughput[(rate, c)] for c in xs], marker="o",
                label=f"rate {_label(rate)}")
    ax.set_xticks(range(len(concurrencies)), [_label(c) for c in concurrencies])
    ax.set_xlabel("concurrency limit (requests in flight)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{title} throughput against concurrency".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "throughput_vs_concurrency.png")
    fig.savefig(paths[-1], format="png", dpi=80)
    plt.close(fig)
    return paths
