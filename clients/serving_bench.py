"""Serving benchmark: the gRPC path (client -> tokenizer service -> engine service) against the engine in-process.

    python -m clients.serving_bench --target localhost:50052 --rate inf            # all requests outstanding
    python -m clients.serving_bench --target localhost:50052 --concurrency 8 --rate 2 --rate 4
    python -m clients.serving_bench --target localhost:50052 --rate 2 --rate inf --concurrency 4 --concurrency 16 \
        --plot-dir plots/                                # latency against rate, throughput against concurrency
    python -m clients.serving_bench --target localhost:50052 --inprocess-model DIR --pairs 5 --json out.json \
        --torch-threads 1 --num-kvcache-blocks 2048      # the engine service's settings, for a fair pair

Workload B (docs/PERFORMANCE.md; random.seed(0); 64 requests; prompts of randint(32, 256) ids in [0, 8000], drawn
first; then max_tokens randint(32, 256); ignore_eos; temperature 0.6), or with --workload A its workload A (256
requests; prompts of randint(100, 1024) ids in [0, 10000]; max_tokens randint(100, 1024)), sent as token ids. Reports time to first
token, inter-token latency and end-to-end latency at p50/p90/p99, request and output-token throughput. With
--inprocess-model, each run is paired with the same workload driven through LLMEngine add_request/step in this
process (engine_service is imported only then), alternating, and the median throughput ratio is reported.
The in-process engine must be built with the engine service's settings (the engine flags here mirror its
flags) and the same torch thread count; its requests leave unset what the gRPC requests leave unset, and so take
the model's generation_config.json defaults (top_k, top_p, penalties), as the services fill them in. Each run's
prompts are salted (first token shifted, by a salt that starts at a random base for each invocation) so that no run
is served from the prefix cache of an earlier one, this invocation's or an earlier one's against the same
services; each run reports the prompt tokens the engines did serve from their prefix cache. The client's own CPU
time is reported per gRPC run, to show that the client is not the bottleneck. The JSON report records the command,
the salt base and the versions and commit it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from clients.text_client import AsyncTextClient
from clients.tls import ClientTls, add_tls_arguments, tls_from_arguments


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float = 0.6


# The workloads' generators (docs/PERFORMANCE.md): (requests, prompt length range, largest token id, max_tokens range).
WORKLOADS = {"A": (256, (100, 1024), 10_000, (100, 1024)), "B": (64, (32, 256), 8000, (32, 256))}


def workload(name: str, vocab_size: int, num_requests: int | None = None) -> Workload:
    """Workload A or B (docs/PERFORMANCE.md; random.seed(0); every prompt drawn first, then the output lengths); ids are
    taken modulo the model's vocabulary so a smaller model can run it too. num_requests: how many requests the
    generator draws (default: the workload's own count; the prompts of a smaller count are the first of the full
    run's, its output lengths are not, as with engine_service.bench.make_workload)."""
    count, (lo, hi), top, (out_lo, out_hi) = WORKLOADS[name]
    n = num_requests or count
    random.seed(0)
    prompts = [[random.randint(0, top) % vocab_size for _ in range(random.randint(lo, hi))] for _ in range(n)]
    return Workload(prompts, [random.randint(out_lo, out_hi) for _ in range(n)])


def workload_b(vocab_size: int, num_requests: int = 64) -> Workload:
    """Workload B (see workload)."""
    return workload("B", vocab_size, num_requests)


def salted(w: Workload, salt: int, vocab_size: int) -> Workload:
    """The workload with every prompt's first token shifted by `salt`: the same work, no prefix-cache reuse
    across runs (block hashes chain from the first token)."""
    prompts = [[(p[0] + salt) % vocab_size, *p[1:]] for p in w.prompts]
    return Workload(prompts, w.max_tokens, w.temperature)


def salt_of(base: int, run: int, vocab_size: int) -> int:
    """The salt of an invocation's run-th timed run (from 0): never 0, the warm-up's (for fewer than vocab_size - 1
    runs), and counted from `base`, drawn at random for each invocation, so that a second invocation against the same
    services does not send the first one's prompts again, which their prefix cache may still hold."""
    return 1 + (base + run) % max(vocab_size - 1, 1)


def environment() -> dict[str, object]:
    """What a figure depends on besides its command: Python and package versions, the commit ("-dirty" when the
    working tree had changes; None outside a git checkout) and the machine."""
    from importlib import metadata

    versions: dict[str, object] = {"python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                                   text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = described.stdout.strip() if described.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {**versions, "commit": commit or None, "machine": platform.machine(), "cpus": os.cpu_count()}


def arrivals(n: int, rate: float) -> list[float]:
    """Poisson arrival offsets in seconds (all at 0 for an infinite rate)."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(1), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


@dataclass(slots=True)
class Timing:
    """One request: send time, each chunk's arrival (seconds, token count), any error, and its cached prompt
    tokens."""

    start: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache (the last message's usage)


async def run_grpc(target: str, w: Workload, concurrency: int, rate: float,
                   tls: ClientTls | None = None) -> tuple[list[Timing], float]:
    """Drive the tokenizer service; returns timings and wall seconds."""
    timings = [Timing() for _ in w.prompts]
    limit = asyncio.Semaphore(concurrency)
    async with AsyncTextClient(target, timeout=600, tls=tls) as client:
        await client.model_info()  # connect first: the in-process side has no connection to set up
        t0 = time.perf_counter()

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            async with limit:
                timings[i].start = time.perf_counter()
                try:
                    stream = client.generate_tokens(w.prompts[i], max_tokens=w.max_tokens[i], ignore_eos=True,
                                                    temperature=w.temperature)
                    async for chunk in stream:
                        timings[i].chunks.append((time.perf_counter(), len(chunk.token_ids)))
                        usage = getattr(chunk, "usage", None)
                        if usage is not None and usage.cached_tokens:
                            timings[i].cached_tokens = usage.cached_tokens
                except Exception as exc:  # report, do not abort the run
                    timings[i].error = (f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError)
                                        else repr(exc))

        await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals(len(w.prompts), rate))))
        return timings, time.perf_counter() - t0


def run_inprocess(engine, w: Workload, concurrency: int, rate: float) -> tuple[list[Timing], float]:
    """The same workload through LLMEngine add_request/step on this thread. Each request takes the model's
    generation_config.json defaults for what it leaves unset, as the services fill them into a gRPC request (given
    SamplingParams, the engine applies none: the in-process side would skip a top_k, top_p or penalty the gRPC side
    pays for)."""
    from engine_service import SamplingParams

    defaults = dict(getattr(engine, "generation_defaults", None) or {})
    timings = [Timing() for _ in w.prompts]
    due, nxt, live, done = arrivals(len(w.prompts), rate), 0, set(), 0
    t0 = time.perf_counter()
    freed = t0  # when the concurrency limit last let a request in (a step's end that finished one)
    while done < len(w.prompts):
        now = time.perf_counter()
        while nxt < len(w.prompts) and due[nxt] <= now - t0 and len(live) < concurrency:
            params = SamplingParams(**{**defaults, "temperature": w.temperature, "max_tokens": w.max_tokens[nxt],
                                       "ignore_eos": True})
            # The clock starts when the request arrived (or its slot freed), as the gRPC client's does: a request
            # due while a step ran waited for that step, and the gRPC path counts that wait.
            timings[nxt].start = max(t0 + due[nxt], freed)
            engine.add_request(f"bench-{nxt}", w.prompts[nxt], params)
            live.add(nxt)
            nxt += 1
        if not engine.has_unfinished_requests():
            if nxt < len(w.prompts):  # idle until the next arrival
                time.sleep(max(0.0, min(0.01, due[nxt] - (now - t0))))
            continue
        for out in engine.step():
            i = int(out.request_id.split("-")[1])
            now = time.perf_counter()
            timings[i].chunks.append((now, len(out.new_token_ids)))
            if out.finished:
                if len(live) >= concurrency:
                    freed = now
                live.discard(i)
                done += 1
                timings[i].error = out.error
                timings[i].cached_tokens = getattr(out, "num_cached_tokens", 0)
    return timings, time.perf_counter() - t0


def ratio_report(rows: list[dict], concurrencies: list[int], rates: list[float]) -> dict[str, dict]:
    """gRPC over in-process output throughput, paired run by run, one entry per (rate, concurrency) point (never
    pooled across points); a pair whose in-process run produced nothing is NaN."""
    report = {}
    for concurrency, rate in itertools.product(concurrencies, rates):
        point = [r for r in rows if r["rate"] == rate and r["concurrency"] == concurrency]
        ratios = [g["output_throughput"] / i["output_throughput"] if i["output_throughput"] else float("nan")
                  for g, i in zip([r for r in point if r["mode"] == "grpc"],
                                  [r for r in point if r["mode"] == "inprocess"], strict=True)]
        key = f"grpc_over_inprocess_rate_{rate}" + (f"_concurrency_{concurrency}" if len(concurrencies) > 1 else "")
        # NaN pairs are left out of the summary (with one among them, median, min and max depended on its place)
        real = [r for r in ratios if not math.isnan(r)]
        nan = float("nan")
        report[key] = {"median": statistics.median(real) if real else nan, "min": min(real, default=nan),
                       "max": max(real, default=nan), "pairs": ratios, "pairs_left_out": len(ratios) - len(real)}
    return report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarize(timings: list[Timing], wall: float) -> dict[str, float]:
    """TTFT, ITL and E2E percentiles (ms) and throughputs of one run.

    Only messages that carry tokens are token arrivals: one without (prompt logprobs, or a last message with only
    the finish and usage) neither ends the TTFT nor adds an ITL gap, and a request that never got a token failed."""
    arrivals_of = {id(t): [(at, n) for at, n in t.chunks if n > 0] for t in timings}
    ok = [t for t in timings if t.error is None and arrivals_of[id(t)]]
    ttft = [(arrivals_of[id(t)][0][0] - t.start) * 1e3 for t in ok]
    e2e = [(t.chunks[-1][0] - t.start) * 1e3 for t in ok]
    itl: list[float] = []
    for t in ok:  # a chunk of n tokens after a gap g counts as n gaps of g/n
        chunks = arrivals_of[id(t)]
        for (prev, _), (cur, n) in zip(chunks, chunks[1:], strict=False):
            itl += [(cur - prev) * 1e3 / n] * n
    tokens = sum(n for t in ok for _, n in t.chunks)
    errors = Counter(t.error or "no response" for t in timings if t.error is not None or not arrivals_of[id(t)])
    out = {"requests": len(timings), "failed": len(timings) - len(ok), "wall_s": wall, "output_tokens": tokens,
           "request_throughput": len(ok) / wall, "output_throughput": tokens / wall,
           # prompt tokens served from a prefix cache: above 0, the run did less prefill than the workload asks
           "cached_prompt_tokens": sum(t.cached_tokens for t in ok),
           "errors": dict(errors.most_common(5))}  # the most frequent, so that a failed count has a cause
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = pct(values, q)
    return out


NO_LIMIT = 10**6  # the concurrency without --concurrency: every request may be in flight (the JSON report's figure)


def format_table(rows: list[dict[str, object]]) -> str:
    cols = ["mode", "rate", "concurrency", "wall_s", "request_throughput", "output_throughput", "ttft_ms_p50",
            "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p99", "failed", "client_cpu_s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    def shown(r: dict[str, object], c: str) -> str:
        if c == "concurrency" and r.get(c) == NO_LIMIT:
            return "none"
        return f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))

    for r in rows:
        lines.append(" | ".join(shown(r, c) for c in cols))
    for r in rows:
        for error, count in (r.get("errors") or {}).items():
            lines.append(f"  {r['mode']} rate {r['rate']} concurrency {shown(r, 'concurrency')}: {count} failed with "
                         f"{error}")
    return "\n".join(lines)


def strict_json(value: object) -> object:
    """value with what strict JSON readers (jq, JavaScript) refuse spelled as JSON: an infinity as the string
    "inf" or "-inf" (the default --rate; float() reads it back), NaN (a percentile of no values) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def inprocess_engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The in-process engine's settings from the flags given, read as the engine service reads its own (0 for
    --num-kvcache-blocks or --max-model-len: sized by the engine, not a pool of none)."""
    names = ("dtype", "attention_backend", "max_num_seqs", "max_num_batched_tokens", "num_kvcache_blocks",
             "kvcache_block_size", "max_model_len", "gpu_memory_utilization")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    for name in ("num_kvcache_blocks", "max_model_len"):
        if kwargs.get(name) == 0:
            del kwargs[name]
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def inprocess_torch_threads(args: argparse.Namespace, cuda_available: bool, torch_default: int) -> int | None:
    """The in-process engine's torch threads, read as the engine service reads its --torch-threads (0: one on a
    CPU of at most 4 cores): 0 left torch's default here (2 on a 2-core machine) against the service's one, and the
    ratio compared unequal engines."""
    from clients.cpus import available_cpus
    from engine_service.server import torch_threads

    settings = argparse.Namespace(torch_threads=args.torch_threads, device=args.device)
    return torch_threads(settings, cuda_available, available_cpus(), torch_default)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m clients.serving_bench", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50052", help="the tokenizer service")
    p.add_argument("--rate", type=float, action="append", help="Poisson requests/s (repeatable; inf: all at once)")
    p.add_argument("--concurrency", type=int, action="append",
                   help="requests in flight at most (repeatable: a sweep; default no limit, which the table shows as "
                        "none and the JSON report as 1000000)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="B",
                   help="workload A (256 requests, prompts and outputs of 100-1024 tokens: a GPU's) or B (64 requests "
                        "of 32-256, the default), drawn as engine_service.bench draws them")
    p.add_argument("--num-requests", type=int, default=None, help="default: the workload's (A 256, B 64)")
    p.add_argument("--vocab-size", type=int, default=0, help="default: the tokenizer service's model info")
    p.add_argument("--inprocess-model", default=None, help="also run the engine in-process on this model")
    p.add_argument("--device", default="auto")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads of the in-process engine (the engine service's --torch-threads)")
    for flag in ("--dtype", "--attention-backend"):
        p.add_argument(flag, default=None, help="in-process engine: as the engine service's flag")
    for flag in ("--max-num-seqs", "--max-num-batched-tokens", "--num-kvcache-blocks", "--kvcache-block-size",
                 "--max-model-len"):
        p.add_argument(flag, type=int, default=None, help="in-process engine: as the engine service's flag")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="in-process engine: as the engine service's flag; on a GPU the engine service shares, the "
                        "device's share both may fill (memory the service holds counts against it)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="in-process engine: CUDA graphs off (the engine service's --enforce-eager true; this flag takes "
                        "no value)")
    p.add_argument("--pairs", type=int, default=1, help="interleaved gRPC/in-process pairs per rate")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot-dir", default=None, help="write PNG plots here (clients/bench_plots.py)")
    add_tls_arguments(p)
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "clients.serving_bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        tls = tls_from_arguments(args)
    except ValueError as exc:
        p.error(f"TLS: {exc}")
    for name, value in (("--num-requests", [1 if args.num_requests is None else args.num_requests]), ("--concurrency", args.concurrency or []),
                        ("--pairs", [args.pairs])):
        if any(v < 1 for v in value):
            p.error(f"{name} must be at least 1, got {value if len(value) > 1 else value[0]}")
    if any(not r > 0 for r in args.rate or []):
        p.error(f"--rate must be positive (inf: all at once), got {args.rate}")
    if args.plot_dir:
        try:
            import matplotlib  # noqa: F401 -- checked before the runs, not after them
        except ImportError:
            p.error("--plot-dir needs matplotlib: pip install matplotlib (the test extra has it)")
    if args.json:  # checked before the runs too: a report lost at the end costs the whole benchmark
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(args.json):
            p.error(f"--json {args.json}: cannot write a file there (is {folder} a writable folder?)")
    rates = args.rate or [math.inf]
    concurrencies = args.concurrency or [NO_LIMIT]

    vocab = args.vocab_size
    if not vocab:
        from clients.text_client import TextClient

        with TextClient(args.target, timeout=30, tls=tls) as c:
            vocab = c.model_info().vocab_size
    w = workload(args.workload, vocab, args.num_requests)
    salt_base = random.SystemRandom().randrange(max(vocab - 1, 1))
    engine, inprocess = None, None
    if args.inprocess_model:
        import torch

        from engine_service import LLMEngine  # only in this mode: the client library needs no torch

        threads = inprocess_torch_threads(args, torch.cuda.is_available(), torch.get_num_threads())
        if threads:
            torch.set_num_threads(threads)
        kwargs = inprocess_engine_kwargs(args)
        engine = LLMEngine(args.inprocess_model, device=args.device, **kwargs)
        inprocess = {"model": args.inprocess_model, "device": args.device, "engine_kwargs": kwargs,
                     "torch_threads": torch.get_num_threads()}
        print(f"in-process engine: {kwargs}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    rows: list[dict[str, object]] = []
    for concurrency, rate in itertools.product(concurrencies, rates):
        warm = Workload(w.prompts[:1], [4], w.temperature)
        asyncio.run(run_grpc(args.target, warm, 1, math.inf, tls))
        if engine is not None:
            run_inprocess(engine, warm, 1, math.inf)
        for pair in range(args.pairs):
            run = salted(w, salt_of(salt_base, len(rows), vocab), vocab)
            cpu0 = time.process_time()
            grpc_row = summarize(*asyncio.run(run_grpc(args.target, run, concurrency, rate, tls)))
            grpc_row["client_cpu_s"] = time.process_time() - cpu0
            rows.append({"mode": "grpc", "rate": rate, "concurrency": concurrency, "pair": pair, **grpc_row})
            if engine is not None:
                rows.append({"mode": "inprocess", "rate": rate, "concurrency": concurrency, "pair": pair,
                             **summarize(*run_inprocess(engine, run, concurrency, rate))})
            print(format_table(rows[-2 if engine is not None else -1:]), file=sys.stderr, flush=True)
            for row in rows[-2 if engine is not None else -1:]:
                if row["cached_prompt_tokens"]:
                    print(f"warning: the {row['mode']} run was served {row['cached_prompt_tokens']} prompt tokens from "
                          "a prefix cache (prompts an earlier run sent?): its TTFT and throughput are not the "
                          "workload's; restart the services to empty their cache", file=sys.stderr, flush=True)
    report: dict[str, object] = {"command": command, "environment": environment(), "workload": args.workload,
                                 "num_requests": len(w.prompts), "salt_base": salt_base, "inprocess": inprocess,
                                 "runs": rows}
    if engine is not None:
        report.update(ratio_report(rows, concurrencies, rates))
    print(format_table(rows))
    for key, value in report.items():
        if key.startswith("grpc_over"):
            print(f"{key}: median {value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(strict_json(report), f, indent=2, default=str, allow_nan=False)
    if args.plot_dir:
        from clients.bench_plots import write_plots  # matplotlib only when plotting

        for path in write_plots(rows, args.plot_dir, title=f"workload {args.workload}:"):
            print(f"wrote {path}", file=sys.stderr)
    return report


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except grpc.RpcError as exc:  # a service not up, or not the tokenizer service: one line, not a traceback
        sys.exit(f"serving_bench: {exc.code().name}: {exc.details()} (is the tokenizer service up at --target?)")
    except ValueError as exc:  # the in-process engine's own checks (a bad model directory, a bad setting)
        sys.exit(f"serving_bench: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
