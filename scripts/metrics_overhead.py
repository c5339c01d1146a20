"""What the engine's metrics cost: `python -m scripts.metrics_overhead [--pairs 5]` (docs/PERFORMANCE.md).

Drives workload B through LLMEngine's step API in this process, the way the engine loop does, in interleaved
pairs of runs: one with EngineMetrics fed exactly as the engine loop feeds it (on_add per request, on_step per
step, a request log line per finished request formatted as JSON into /dev/null, and a Prometheus scrape of the
registry every --scrape-s seconds from another thread), one without. It reports
- the time spent in on_step against the time spent in step(), summed over the runs with metrics;
- the median, min and max over the pairs of output throughput with metrics / without.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from clients.serving_bench import workload_b


def run_once(engine, prompts, max_tokens, temperature: float, metrics) -> dict[str, float]:
    """All requests at once; returns wall seconds, output tokens, step seconds and on_step seconds."""
    from engine_service import SamplingParams

    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True))
        if metrics is not None:
            metrics.on_add(f"r{i}", f"r{i}", time.monotonic())
    tokens, step_s, metric_s = 0, 0.0, 0.0
    while engine.has_unfinished_requests():
        started = time.monotonic()
        outputs = engine.step()
        ended = time.monotonic()
        step_s += ended - started
        if metrics is not None:
            metrics.on_step(outputs, started, ended, engine)
            metric_s += time.monotonic() - ended
        tokens += sum(len(o.new_token_ids) for o in outputs)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "step_s": step_s, "metrics_s": metric_s}


def scrape_until(stop: threading.Event, registry, period_s: float) -> None:
    """What Prometheus does to the engine: render the whole registry every period_s."""
    from prometheus_client import generate_latest

    while not stop.wait(period_s):
        generate_latest(registry)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m scripts.metrics_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="default: the cpu-small preset of engine_service.bench")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-kvcache-blocks", type=int, default=2048)
    p.add_argument("--scrape-s", type=float, default=1.0, help="Prometheus scrape period (it scrapes every 15 s)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)

    from clients.logs import JsonFormatter
    from engine_service import LLMEngine
    from engine_service.bench import DEFAULT_CACHE_DIR, build_preset
    from engine_service.metrics import EngineMetrics

    model = args.model or build_preset("cpu-small", DEFAULT_CACHE_DIR)
    engine = LLMEngine(model, device=args.device, num_kvcache_blocks=args.num_kvcache_blocks)
    w = workload_b(int(engine.model_info["vocab_size"]), args.num_requests)
    devnull = open(os.devnull, "w")  # lives as long as the process
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(JsonFormatter())
    request_log = logging.getLogger("llmserve.request")
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False

    run_once(engine, w.prompts[:2], [4, 4], w.temperature, None)  # warm-up
    rows: list[dict[str, object]] = []
    for pair in range(args.pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)  # alternate which goes first
        for with_metrics in order:
            metrics = EngineMetrics(Path(model).name, engine.stats, lambda: 0) if with_metrics else None
            stop = threading.Event()
            scraper = None
            if metrics is not None:
                scraper = threading.Thread(target=scrape_until, args=(stop, metrics.registry, args.scrape_s))
                scraper.start()
            row = run_once(engine, w.prompts, w.max_tokens, w.temperature, metrics)
            stop.set()
            if scraper is not None:
                scraper.join()
            rows.append({"pair": pair, "metrics": with_metrics, **row})
            print(f"pair {pair} metrics={'on ' if with_metrics else 'off'} {row['tok_s']:8.1f} tok/s "
                  f"wall {row['wall_s']:.2f}s on_step {row['metrics_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    on = [r for r in rows if r["metrics"]]
    off = [r for r in rows if not r["metrics"]]
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(on, off, strict=True)]
    steps = sum(r["step_s"] for r in on)
    report = {
        "model": str(model), "device": args.device, "num_requests": len(w.prompts), "pairs": args.pairs,
        "on_step_over_step_time": sum(r["metrics_s"] for r in on) / steps,
        "throughput_ratio_on_over_off": {"median": statistics.median(ratios), "min": min(ratios),
                                         "max": max(ratios), "pairs": ratios},
        "runs": rows,
    }
    print(f"metric updates / step time: {report['on_step_over_step_time'] * 100:.3f}%")
    print(f"throughput with / without metrics: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {len(ratios)} pairs")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
