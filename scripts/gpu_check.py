"""The Python parts of scripts/gpu_check.sh (the one-shot H200 check of issue 3); see docs/GPU.md.

    python scripts/gpu_check.py env     --out DIR    # device and versions; exit 2 without CUDA
    python scripts/gpu_check.py preset  --out DIR    # build (or reuse) the random-weight Qwen3-0.6B
    python scripts/gpu_check.py graphs  --out DIR    # the engine's parts: (d) workload A, (c) graph replay
                                                     # == eager, (e) 64 requests of workload A, (f) decode
                                                     # ITL with and without graphs
    python scripts/gpu_check.py second  --out DIR    # a second engine: PDL on, then workload A at 16,384
                                                     # tokens a step, then with two-batch overlap (reads
                                                     # graphs' graphs.json)
    python scripts/gpu_check.py served  --out DIR    # workload A through both services (real processes)
                                                     # against the engine in-process, one GPU shared
    python scripts/gpu_check.py summary --out DIR    # the table gpu_check.sh prints last

`graphs` runs one engine (bf16, triton backend, CUDA graphs, the engine's defaults as in workload A): one
start-up for all of the engine's figures. It writes DIR/graphs.json after each part, so a timeout still leaves
what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "qwen3-0.6b"
TARGET_TOK_S = 28_000  # issue 3's acceptance figure for workload A
# The wider token budget a step part p compares with the default (on its PDL engine, against PDL at the default).
WIDE_BUDGET = 16_384
P_REPEATS = 2  # timed runs of workload A a row in part p
# The warm-up prompts' token (_warm): each is this one repeated after a first token of its own, so
# that none finds an earlier one in the prefix cache (a cached warm-up computes nothing) nor shares a block with a
# timed run.
WARM_TOKEN = 7
_warm_calls = itertools.count()


def _versions() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sms"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def cmd_env(out: Path) -> int:
    import torch

    info = _versions()
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    if not torch.cuda.is_available():
        print("no CUDA: torch.cuda.is_available() is False on this machine; the GPU check needs one GPU")
        return 2
    return 0


def cmd_preset(cache_dir: Path) -> int:
    from engine_service import bench

    t = time.perf_counter()
    path = bench.build_preset(PRESET, cache_dir)
    print(f"preset {PRESET} at {path} ({time.perf_counter() - t:.1f} s)")
    return 0


def _graph_check(graphs, report: dict) -> None:
    """(c) replay vs eager of the same padded batch, every captured size, fresh random inputs."""
    report["capture_s"] = graphs.capture_seconds
    report["capture_mib"] = graphs.capture_bytes / 2**20
    report["num_kv_splits"] = graphs.num_kv_splits
    seed = int(time.time()) % 100_000
    results = graphs.self_check(seed=seed)
    report["graph_check"] = {
        "seed": seed,
        "ok": all(r.ok for r in results),
        "sizes": [asdict(r) for r in results],
    }
    print(f"(c) graph replay vs eager, seed {seed}, capture {graphs.capture_seconds:.1f} s:")
    for r in results:
        print(
            f"  size {r.size:4d} ({r.real:3d} real): hidden {'equal' if r.hidden_equal else 'DIFFER'}, "
            f"logits {'equal' if r.logits_equal else 'DIFFER'}, finite {r.finite}, max diff {r.max_abs_diff:.3g}"
        )


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """These environment variables set for the block, each put back as it was after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _setup(cpu_dry_run: bool) -> tuple:
    """(preset, LLM keywords, the 64-request slice's arguments, ITL batch sizes, ITL arguments, workload A's
    make_plan arguments): workload A's engine defaults on the GPU; toy sizes for the CPU dry run."""
    if cpu_dry_run:
        engine = dict(device="cpu", dtype="float32", attention_backend="torch", max_num_seqs=8, max_model_len=512,
                      overlap_scheduling=True)
        return "cpu-small", engine, (8, 64, 16), (1, 8), dict(prompt_len=32, max_tokens=8), (8, 64, 16)
    # GPU_CHECK_TRITON_GEMM=0: torch's GEMMs at every decode size (the tuner off), for a rerun after ours failed.
    engine = dict(device="cuda", dtype="bfloat16", attention_backend="triton",
                  triton_gemm=os.environ.get("GPU_CHECK_TRITON_GEMM", "1") != "0")
    return PRESET, engine, (64, None, None), (1, 64), {}, ()


class _Report(dict):
    """A part's figures, written as JSON to `path` at each save(): a part cut short keeps what it measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        # Written aside, then renamed over: the publisher copying it every 15 s, or a kill mid-write, never meets a
        # truncated file (which the table reads as no figures at all).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self, indent=2) + "\n")
        os.replace(tmp, self.path)


def _begin(out: Path, name: str, cache_dir: Path, cpu_dry_run: bool):
    """Where the parts that start an engine begin: None without CUDA (said), else their report (out/name),
    _setup's values and the preset's model directory."""
    import torch

    if not torch.cuda.is_available() and not cpu_dry_run:
        print("no CUDA")
        return None
    from engine_service import bench

    setup = _setup(cpu_dry_run)
    return _Report(out / name), setup, bench.build_preset(setup[0], cache_dir)


def _gemm_picks(llm) -> dict:
    """Where the decode GEMM tuner picked a Triton tile over torch's, by layer group (the timings are in the log)."""
    from engine_service.cuda_graphs import capture_sizes

    return {"sizes": len(capture_sizes(llm.config.max_num_seqs)),
            "ours": {name: sorted(group[0].gemms or {}) for name, group in llm.runner.decode_linear_groups().items()}}


def cmd_graphs(out: Path, cache_dir: Path, cpu_dry_run: bool = False) -> int:
    """The engine's parts, on one engine: (d)'s engine figure, (c), (e)'s engine figure and (f).

    cpu_dry_run: the same flow on CPU at toy sizes (cpu-small preset, torch backend, graphs replayed by
    re-running the forward), to test this script without a GPU."""
    begun = _begin(out, "graphs.json", cache_dir, cpu_dry_run)
    if begun is None:
        return 2
    report, (_, engine, slice_args, itl_batches, itl_args, workload_a_args), model_dir = begun
    save = report.save

    from engine_service import LLM, bench
    from engine_service.cuda_graphs import DecodeGraphRunner, capture_sizes
    from scripts import step_profile

    t = time.perf_counter()
    llm = LLM(str(model_dir), **engine)
    runner = llm.runner
    report["engine_init_s"] = time.perf_counter() - t
    report["startup_graphs_on"] = runner.graphs is not None or cpu_dry_run
    report["decode_gemms"] = _gemm_picks(llm)
    save()

    # (d) the headline first, so that nothing slow before it can leave it without time: workload A through
    # bench's own plan and timing (its warm-up request, then one timed generate), on this engine as started.
    # Part d times transformers' static batching on the same plan in its own process.
    vocab = llm.model_cfg.vocab_size
    _, plan = bench.make_plan(bench.WORKLOAD_A, model_dir, engine["device"], engine["dtype"], vocab, 1,
                              *workload_a_args)
    hits = llm.stats()["prefix_cache_hits"]
    try:
        result = bench.time_engine(llm, plan, bench.Result(info={"engine_kwargs": engine}))
    except Exception as e:  # say why, and still check the graphs (an acceptance point of its own)
        traceback.print_exc()
        report["workload_A"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"(d) engine, workload A failed: {report['workload_A']['error']}")
    else:
        report["workload_A"] = {"num_seqs": len(plan.batches[0][0]), **result.to_json(),
                                "prefix_cache_hit_tokens": llm.stats()["prefix_cache_hits"] - hits}
        if result.tok_s is None:  # a run that came back wrong (a request short of its tokens) has no figure
            print(f"(d) engine, workload A failed: {result.error}")
        else:
            print(f"(d) engine, workload A ({len(plan.batches[0][0])} requests): {result.seconds:.2f} s, "
                  f"{result.tok_s:,.0f} tok/s")
    save()
    graphs = runner.graphs
    if graphs is None:
        # Start-up turned graphs off (its log says why); capture again to show which sizes differ, and
        # time with them anyway so the figures exist (flagged by startup_graphs_on = false).
        try:
            graphs = DecodeGraphRunner(runner, capture_sizes(llm.config.max_num_seqs), not cpu_dry_run)
            graphs.capture()
        except Exception as e:  # capture itself fails: say so, and still measure (e) and (f) eagerly
            report["graph_check"] = {"ok": False, "sizes": [], "error": f"capture failed: {type(e).__name__}: {e}"}
            save()
            print(f"(c) {report['graph_check']['error']}; (e) and (f) run without graphs")
            graphs = None
        runner.graphs = graphs
    if runner.backend_name == "triton":
        from engine_service.attention import triton_kernels as tk

        # The attention tiles the start-up tuners picked for this model (their timings are in the log).
        report["decode_tile"] = {str(k): list(v) for k, v in tk._decode_tiles.items()}
        report["prefill_tile"] = {str(k): list(v) for k, v in tk._prefill_tiles.items()}
        # Its tuner batch launched longest first and in batch order (us): which order decode steps use.
        report["decode_order_us"] = {str(k): list(v) for k, v in tk._decode_order_timings.items()}
        print(f"decode attention tile picked at start-up: {report['decode_tile']}")
    if graphs is not None:
        _graph_check(graphs, report)
        save()

    # (e) the engine on the 64-request slice of workload A (bench's generator), with overlap scheduling (the
    # default on CUDA) and without it. The slice's prompts are workload A's first 64, so every run here is
    # salted apart from (d)'s (salts 0 and 1) and from each other: none finds another's prefix in the cache.
    prompts, params = step_profile.workload_slice(*slice_args[:1], vocab, *slice_args[1:])
    tokens = sum(p.max_tokens for p in params)
    overlap_default = llm.overlap
    for key, overlap, salt in (("slice64", overlap_default, 2), ("slice64_no_overlap", False, 5)):
        llm.overlap = overlap
        run_prompts = bench.salted(prompts, salt, vocab)
        hits = llm.stats()["prefix_cache_hits"]
        t = time.perf_counter()
        llm.generate(run_prompts, params)
        seconds = time.perf_counter() - t
        report[key] = {"seconds": seconds, "tok_s": tokens / seconds, "output_tokens": tokens, "overlap": overlap,
                       "prefix_cache_hit_tokens": llm.stats()["prefix_cache_hits"] - hits}
        save()
        print(f"(e) engine, {len(prompts)} requests of workload A, overlap {overlap}: {seconds:.2f} s, "
              f"{tokens / seconds:,.0f} tok/s")
    llm.overlap = overlap_default

    # The per-step split on the same slice (salted: nothing of the timed runs in the prefix cache).
    summary, _ = step_profile.profile_generate(llm, bench.salted(prompts, 3, vocab), params)
    report["slice64_profile"] = summary
    save()
    print(step_profile.format_summary(
        summary, f"step split, {len(prompts)} requests of workload A, graphs {graphs is not None}, "
                 f"overlap {overlap_default}"
    ))

    # (f) decode inter-token latency at batch 1 and 64, with and without graphs (the same engine), and at
    # the largest batch with graphs but without overlap scheduling.
    report["itl"] = []
    cases = [(True, overlap_default, b) for b in itl_batches] + [(False, overlap_default, b) for b in itl_batches]
    cases.append((True, False, itl_batches[-1]))
    if graphs is None:  # nothing captured: only the eager cases mean what they say
        cases = [c for c in cases if not c[0]]
    for use_graphs, overlap, batch in cases:
        runner.graphs = graphs if use_graphs else None
        llm.overlap = overlap
        r = step_profile.decode_latency(llm, batch, **itl_args)
        report["itl"].append({"graphs": use_graphs, "overlap": overlap, **r})
        save()
        print(step_profile.format_summary(
            {"decode": r["decode"]},
            f"(f) batch {batch}, graphs {use_graphs}, overlap {overlap}: ITL "
            + (f"{r['itl_ms']:.2f} ms" if r["itl_ms"] is not None else "? (no decode step measured)"),
        ))
    runner.graphs = graphs
    llm.overlap = overlap_default

    # Where the device's time goes in workload A's decode steps: the kernels of `active` steps from step
    # `skip` on, under torch.profiler (its overhead is off the clock: nothing here is timed end to end).
    # The same prompts (salted apart), each request's output capped a little past the window: the batch in
    # the window is the one workload A has there.
    skip, active = (3, 5) if cpu_dry_run else (200, 20)
    prompts_a, max_tokens_a = plan.batches[0]
    try:
        kernels = step_profile.kernel_breakdown(
            llm, bench.salted(prompts_a, 9, vocab),
            bench.engine_params([min(n, skip + active + 10) for n in max_tokens_a]), skip, active)
    except Exception as e:  # the figures above stand without it
        kernels = {"error": f"{type(e).__name__}: {e}"}
    report["kernels"] = kernels
    save()
    print(f"kernels in workload A's decode steps {skip + 2}-{skip + 1 + active}:\n"
          + (kernels["error"] if "error" in kernels else step_profile.format_kernels(kernels)))
    # The same for its prefill: steps 2 to 11 (chunks of up to max_num_batched_tokens prompt tokens, with the
    # decode rows of the requests already started), salted apart, outputs capped. Device kernels only: the
    # host ops' records slowed these eager steps' launches enough to show as idle device time.
    active = 3 if cpu_dry_run else 10
    try:
        prefill = step_profile.kernel_breakdown(
            llm, bench.salted(prompts_a, 11, vocab), bench.engine_params([min(n, 16) for n in max_tokens_a]),
            0, active, host_ops=False)
    except Exception as e:
        prefill = {"error": f"{type(e).__name__}: {e}"}
    report["prefill_kernels"] = prefill
    save()
    print(f"kernels in workload A's prefill steps 2-{active + 1}:\n"
          + (prefill["error"] if "error" in prefill else step_profile.format_kernels(prefill)))
    # Where workload A's seconds go: the whole workload again (salted apart) under the step profiler, its
    # steps grouped by batch size (the mixed ones apart).
    try:
        with step_profile.StepProfiler(llm) as prof:
            llm.generate(bench.salted(prompts_a, 13, vocab), bench.engine_params(max_tokens_a))
        by_batch = prof.by_batch()
    except Exception as e:
        by_batch = {"error": f"{type(e).__name__}: {e}"}
    report["workload_A_by_batch"] = by_batch
    save()
    print("workload A again under the step profiler, its steps by batch size:\n"
          + (by_batch["error"] if "error" in by_batch else step_profile.format_by_batch(by_batch)))
    llm.close()
    return 0 if report["graph_check"]["ok"] and report["startup_graphs_on"] else 1


def _pins(graphs_report: dict) -> dict[str, str]:
    """LLMSERVE_*_TILE values that give a second engine the first engine's attention tiles (from part g's
    graphs.json), so that a comparison between the two is not one between two tuners' picks. The decode tile is
    pinned only where the first engine launched decode longest first (a pinned tile is launched so)."""
    from engine_service.attention import triton_kernels as tk

    pins = {}
    prefill = list(graphs_report.get("prefill_tile", {}).values())
    if len(prefill) == 1:
        pins[tk.PREFILL_TILE_ENV] = ",".join(map(str, prefill[0]))
    decode = list(graphs_report.get("decode_tile", {}).values())
    orders = list(graphs_report.get("decode_order_us", {}).values())
    if len(decode) == 1 and all(ordered <= plain for ordered, plain in orders):
        pins[tk.DECODE_TILE_ENV] = ",".join(map(str, decode[0]))
    return pins


def cmd_second(out: Path, cache_dir: Path, cpu_dry_run: bool = False) -> int:
    """Part p: a second engine, beside part g's, in a process of its own (second.json):
    - programmatic dependent launch (engine_service/pdl.py, off by default) on where the GPU has it: workload A
      and decode ITL at batch 1 and 64 at the default token budget. Its graphs must still replay bitwise
      (start-up's self-check keeps them only then). The attention tiles are pinned to part g's picks; the decode
      GEMM tuner runs again (PDL changes its timings), and both engines' picks are reported;
    - a wider token budget a step, WIDE_BUDGET: workload A again (salted apart) on the same engine, so with PDL
      as above. Mixed steps are host-bound at 8,192 tokens (each launches the same kernels whatever its size):
      half as many, twice as large, should leave the GPU less idle. The engine starts with the wide budget (its
      warm-up sizes activations for it) and runs the PDL figures at the default one;
    - two-batch overlap (_two_batch_overlap): its decode graphs captured again with it, workload A at the wide
      budget and ITL, then with the halves at the attention stream's priority.
    Exit 1 when a workload A figure of PDL, the wide budget or two-batch overlap is missing, or PDL or two-batch
    overlap lost the graphs (the same-priority run and the ITL figures are reported, not required)."""
    begun = _begin(out, "second.json", cache_dir, cpu_dry_run)
    if begun is None:
        return 2
    report, (_, engine, _, itl_batches, itl_args, workload_a_args), model_dir = begun
    save = report.save
    import torch

    from engine_service import LLM, bench
    from engine_service.config import EngineConfig
    from scripts import step_profile

    pins = _pins(_load(out / "graphs.json"))
    report["pins"] = pins
    pdl_on = not cpu_dry_run and torch.cuda.get_device_capability()[0] >= 9
    if not pdl_on:
        report["pdl"] = {"skipped": "needs CUDA" if cpu_dry_run else "needs compute capability 9.0"}
    default_budget = next(f.default for f in fields(EngineConfig) if f.name == "max_num_batched_tokens")

    def start(pdl: bool):
        """The second engine, or None where its start-up failed (said in the report)."""
        try:
            with _environ(pins):  # read by the tuners at start-up only
                return LLM(str(model_dir), **engine, pdl=pdl, max_num_batched_tokens=WIDE_BUDGET)
        except Exception as e:
            traceback.print_exc()
            report["pdl" if pdl else "wide_budget"] = {"error": f"engine start-up: {type(e).__name__}: {e}"}
            save()
            return None

    on = start(pdl_on)
    if pdl_on and (on is None or on.runner.graphs is None):
        # PDL broke the start-up or its graphs: that is its row's verdict, and the rows after it are measured
        # without it rather than not at all (eager decode would say nothing about them).
        if on is not None:
            report["pdl"] = {"graphs_on": False, "error": "start-up kept no CUDA graphs with PDL (its log says why)"}
            on.close()
            del on
            gc.collect()
            torch.cuda.empty_cache()
        save()
        pdl_on = False
        on = start(False)
    if on is None:
        return 1
    with on:
        # Two timed runs a row (their median, the mean of the two): part p's predicted effects (PDL at most 0.1 s
        # of 5.3, the wide budget 0.1-0.2 s) are within one run's noise on this machine.
        _, plan = bench.make_plan(bench.WORKLOAD_A, model_dir, engine["device"], engine["dtype"],
                                  on.model_cfg.vocab_size, P_REPEATS, *workload_a_args)
        if pdl_on:
            on.scheduler.max_num_batched_tokens = default_budget
            try:
                _warm(on)
                result = bench.time_engine(on, plan, bench.Result(info={"engine_kwargs": {**engine, "pdl": True}}))
                report["pdl"] = {"graphs_on": on.runner.graphs is not None, "workload_A": result.to_json(),
                                 "decode_gemms": _gemm_picks(on)}
            except Exception as e:
                traceback.print_exc()
                report["pdl"] = {"error": f"{type(e).__name__}: {e}"}
            try:  # apart: an ITL failure keeps the workload A figure measured before it
                report["pdl"]["itl"] = {b: step_profile.decode_latency(on, b, **itl_args)["itl_ms"]
                                        for b in itl_batches}
            except Exception as e:
                traceback.print_exc()
                report["pdl"]["itl_error"] = f"{type(e).__name__}: {e}"
            save()
            print(f"programmatic dependent launch: {report['pdl']}")
        on.scheduler.max_num_batched_tokens = WIDE_BUDGET
        try:
            _warm(on)
            wide = bench.time_engine(on, _salted_plan(plan, 15, on), bench.Result())
            report["wide_budget"] = {"max_num_batched_tokens": WIDE_BUDGET, "pdl": pdl_on,
                                     "workload_A": wide.to_json()}
        except Exception as e:
            traceback.print_exc()
            report["wide_budget"] = {"error": f"{type(e).__name__}: {e}"}
        save()
        print(f"workload A at {WIDE_BUDGET:,} tokens a step: {report['wide_budget']}")
        # Last, two-batch overlap (cuda_graphs.py, off by default): the same engine's decode graphs captured again
        # with it, workload A (salted apart) at the wide budget and decode ITL, beside the figures above.
        report["two_batch_overlap"] = _two_batch_overlap(on, _salted_plan(plan, 17, on), itl_batches, itl_args,
                                                         cpu_dry_run, pdl_on)
        report["two_batch_overlap"].setdefault("pdl", pdl_on)
        save()
        print(f"two-batch overlap: {report['two_batch_overlap']}")
    return 0 if _second_ok(report) else 1


def _salted_plan(plan, salt: int, llm):
    """plan with its timed batch's prompts salted apart (bench.salted), so that no run finds another's prompts in
    llm's prefix cache."""
    from engine_service import bench

    vocab = llm.model_cfg.vocab_size
    return replace(plan, batches=[(bench.salted(prompts, salt, vocab), max_tokens) for prompts, max_tokens in plan.batches])


def _warm(llm) -> None:
    """One prefill step as large as the engine's token budget, before a timed run: a capture empties the caching
    allocator (cuda_graphs), and the timed run's first mixed steps would pay its cudaMalloc calls, which the
    run before it (on a warm allocator) did not."""
    from engine_service.sampling_params import SamplingParams

    # The engine's max_model_len: config.max_model_len is None where it is the model's (as on the GPU).
    size = min(llm.scheduler.max_num_batched_tokens, llm.max_model_len - 2)
    prompt = [WARM_TOKEN] * size
    prompt[0] = (WARM_TOKEN + 1 + next(_warm_calls)) % llm.model_cfg.vocab_size
    llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))


def _halved_graphs(llm, cpu_dry_run: bool, **options):
    """The engine's decode graphs captured again with two-batch overlap (on the CPU dry run the stand-in replay,
    every size from 2 on in halves), in place of its graphs; None where they failed (the log says why; the engine
    then keeps the graphs of one batch that build_decode_graphs fell back to)."""
    import torch

    from engine_service import cuda_graphs

    runner = llm.runner
    runner.graphs = None  # the previous graphs' pool goes before the new capture
    gc.collect()
    if cpu_dry_run:
        graphs = cuda_graphs.DecodeGraphRunner(runner, cuda_graphs.capture_sizes(llm.config.max_num_seqs),
                                               use_cuda_graphs=False, two_batch_overlap=True, halved_from=2,
                                               **options)
        graphs.capture()
        graphs = graphs if all(r.ok for r in graphs.self_check()) else None
    else:
        torch.cuda.empty_cache()
        graphs = cuda_graphs.build_decode_graphs(runner, two_batch_overlap=True, **options)
    runner.graphs = graphs
    return graphs if graphs is not None and graphs.halves else None  # without halves: its fallback, not a figure


def _two_batch_overlap(llm, plan, itl_batches, itl_args, cpu_dry_run: bool, pdl_on: bool) -> dict:
    """Part p's last figures: the engine's decode graphs captured again with two-batch overlap, then workload A and
    decode ITL; then captured once more with the halves' streams at the capture stream's priority, and workload A
    (salted apart) again: whether the priority the halves' GEMMs get over the other half's attention matters."""
    from engine_service import bench, pdl
    from scripts import step_profile

    runner = llm.runner
    try:
        found = {}
        graphs = _halved_graphs(llm, cpu_dry_run)
        if graphs is None and pdl_on:
            # Never run together on a GPU before: PDL's launches captured across the halves' streams. A figure
            # without PDL beats none (the row says which it is; its baseline, the wide budget's, had PDL).
            print("two-batch overlap: the capture with PDL failed; capturing it again without PDL")
            pdl.enable(runner.device, False)
            found["pdl"], found["pdl_dropped"] = False, "the capture with PDL failed its capture or self-check"
            graphs = _halved_graphs(llm, cpu_dry_run)
        if graphs is None:
            return {**found, "error": "the graphs with two-batch overlap failed their capture or self-check (see "
                                      "the log)", "graphs_on": False}
        halves = sorted(graphs.halves)
        del graphs  # the runner holds them; nothing here may keep them past the next capture
        _warm(llm)
        result = bench.time_engine(llm, plan, bench.Result())
        # Inside the halves torch's GEMMs run: where the plain graphs used ours at those sizes, the comparison
        # holds that change too.
        given_up = {name: [m for m in sorted(group[0].gemms or {}) if m >= halves[0]]
                    for name, group in runner.decode_linear_groups().items()}
        found.update({"graphs_on": True, "halves": halves, "workload_A": result.to_json(),
                      "our_gemms_given_up": {name: sizes for name, sizes in given_up.items() if sizes}})
        try:
            found["itl"] = {b: step_profile.decode_latency(llm, b, **itl_args)["itl_ms"] for b in itl_batches}
        except Exception as e:
            traceback.print_exc()
            found["itl_error"] = f"{type(e).__name__}: {e}"
        try:
            if _halved_graphs(llm, cpu_dry_run, halves_priority=0) is None:
                found["same_priority"] = {"error": "capture or self-check failed"}
            else:
                again = _salted_plan(plan, 19, llm)
                _warm(llm)
                found["same_priority"] = {"workload_A": bench.time_engine(llm, again, bench.Result()).to_json()}
        except Exception as e:
            traceback.print_exc()
            found["same_priority"] = {"error": f"{type(e).__name__}: {e}"}
        return found
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


# Part s: the engine service takes this share of the GPU and the in-process engine the rest of SERVED_SHARES[1] (the
# KV-cache sizing counts memory other processes hold against a share). Workload A needs about 33 GB of bf16 KV cache
# for Qwen3-0.6B at its longest moment (60 GB were every request at its longest at once): 45% of an H200 holds it.
SERVED_SHARES = (0.45, 0.9)
# How long part s waits for each service to say SERVING (the engine loads, tunes and captures its graphs first):
# within gpu_check.sh's limit for the part (up to 300 s), so that a start that hangs is reported, not cut.
SERVED_START_S = {"engine": 200, "tokenizer": 60}


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on loopback (held open together while chosen, so never the same one twice)."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _served_model(preset_dir: Path, cache_dir: Path) -> Path:
    """The preset's checkpoint with a tokenizer beside it, for the tokenizer service (the preset has none): its
    files linked (relative links, so the cache may move), and the demo model's byte-level BPE. Its 2,048 ids are far
    fewer than the model's: prompts go as token ids, and most generated ids detokenize to nothing, so the messages
    carry almost no text and the tokenizer service's cost measured with it is a lower bound. Rebuilt when the
    preset's files change (a marker lists them)."""
    import shutil

    from scripts.demo_model import _recipe_fingerprint, _train_tokenizer

    served = cache_dir / f"{preset_dir.name}-served"
    files = sorted((f.name, f.stat().st_size) for f in preset_dir.iterdir() if f.is_file())
    marker = json.dumps({"preset": files, "tokenizer": _recipe_fingerprint()})
    if (served / "served.json").exists() and (served / "served.json").read_text() == marker:
        return served
    staging = cache_dir / f".{served.name}.{os.getpid()}"  # built aside, then renamed: never seen half made
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, _ in files:
        (staging / name).symlink_to(os.path.relpath(preset_dir / name, served))
    _train_tokenizer().save_pretrained(staging)
    (staging / "served.json").write_text(marker)
    shutil.rmtree(served, ignore_errors=True)  # an older or half-made one
    os.rename(staging, served)
    return served


def _stop_services(procs: dict) -> dict[str, int | None]:
    """SIGTERM to every service (the tokenizer service first: it drains onto the engine), then wait for each, killing
    one that has not exited in 60 s; their exit codes."""
    import signal
    import subprocess

    for name in ("tokenizer", "engine"):
        if name in procs and procs[name].poll() is None:
            procs[name].send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return {name: proc.returncode for name, proc in procs.items()}


def cmd_served(out: Path, cache_dir: Path, cpu_dry_run: bool = False) -> int:
    """Part s: workload A (on the CPU dry run, 4 requests of workload B) through the tokenizer and engine services as
    processes on loopback, against the same requests driven through an engine in this process
    (clients.serving_bench); out/served.json holds its report. What the services cost at the engine's pace, with the
    engine service's GIL switch interval as configured and its metrics off. Both engines get the same attention tiles
    (part g's picks where its graphs.json is beside, else the defaults), so the ratio is not two tuners' picks."""
    import signal

    # gpu_check.sh's timeout sends SIGTERM: end through `finally`, so the report says where it was cut.
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        return _served(out, cache_dir, cpu_dry_run)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _served(out: Path, cache_dir: Path, cpu_dry_run: bool) -> int:
    """cmd_served's body."""
    import subprocess

    from scripts.demo import wait_serving

    begun = _begin(out, "served.json", cache_dir, cpu_dry_run)
    if begun is None:
        return 2
    report, _, preset_dir = begun
    model = _served_model(preset_dir, cache_dir)
    if cpu_dry_run:
        engine = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch", "--max-num-seqs", "8",
                  "--max-model-len", "512", "--torch-threads", "1"]
        inprocess = [*engine, "--enforce-eager"]
        engine += ["--enforce-eager", "true"]
        load, pins = ["--workload", "B", "--num-requests", "4"], {}
    else:
        from engine_service.attention import triton_kernels as tk

        engine = ["--device", "cuda", "--dtype", "bfloat16", "--attention-backend", "triton",
                  "--gpu-memory-utilization", str(SERVED_SHARES[0])]
        inprocess = [*engine[:-1], str(SERVED_SHARES[1])]
        load = ["--workload", "A"]
        pins = {tk.DECODE_TILE_ENV: ",".join(map(str, tk.DECODE_TILES[0])),
                tk.PREFILL_TILE_ENV: ",".join(map(str, tk.PREFILL_TILES[0])), **_pins(_load(out / "graphs.json"))}
    engine_port, text_port = _free_ports(2)
    quiet = ["--host", "127.0.0.1", "--metrics-port", "0", "--log-level", "WARNING"]
    commands = {
        "engine": ["engine_service.server", "--model", str(model), "--port", str(engine_port), *quiet,
                   "--canary-interval-s", "0", *engine],
        "tokenizer": ["tokenizer_service.server", "--model", str(model), "--port", str(text_port), *quiet,
                      "--engines", f"127.0.0.1:{engine_port}"],
    }
    report.update(model=str(model), engine_flags=engine, inprocess_flags=inprocess, workload_flags=load, pins=pins,
                  stage="starting the services")
    report.save()
    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    with _environ(pins):  # the services inherit them, and the in-process engine reads them
        try:
            for name, args in commands.items():
                log = out / f"s_{name}.log"
                with open(log, "wb") as f:
                    procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT)
                port = engine_port if name == "engine" else text_port
                wait_serving(f"127.0.0.1:{port}", procs[name], log, SERVED_START_S[name], "SERVED_START_S")
            report.update(services_up_s=round(time.monotonic() - started, 1), stage="serving_bench")
            report.save()
            from clients import serving_bench

            bench_report = serving_bench.main(["--target", f"127.0.0.1:{text_port}", *load, "--rate", "inf",
                                               "--inprocess-model", str(model), *inprocess,
                                               "--json", str(out / "s_bench.json")])
            runs = {row["mode"]: row for row in bench_report["runs"]}
            ratio = next((v for k, v in bench_report.items() if k.startswith("grpc_over")), {})
            report.update(workload=bench_report["workload"], num_requests=bench_report["num_requests"],
                          grpc=runs.get("grpc"), inprocess=runs.get("inprocess"), ratio=ratio.get("median"),
                          stage="done")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the report says what failed and where; the row shows it
            traceback.print_exc()
            report["error"] = f"{report.get('stage')}: {type(exc).__name__}: {exc}"[:2000]
        finally:
            report["exit_codes"] = _stop_services(procs)
            report.save()
    print(json.dumps({k: report.get(k) for k in ("ratio", "exit_codes", "error")}))
    return 1 if report.get("error") or any(report["exit_codes"].values()) else 0


def _second_ok(report: dict) -> bool:
    """Part p's figures all there: PDL's (where it ran) and two-batch overlap's with the graphs kept, and the wide
    budget's."""
    p, w, t = report.get("pdl", {}), report.get("wide_budget", {}), report.get("two_batch_overlap", {})
    return ("error" not in p and ("skipped" in p or p.get("graphs_on") is True)
            and "tok_s" in w.get("workload_A", {}) and t.get("graphs_on") is True and "error" not in t)


# ---- the table ------------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    """A part's JSON report; {} where it is missing, unreadable or not an object."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _fmt(x: float | None, unit: str = "") -> str:
    return "?" if x is None else f"{x:,.0f}{unit}"


def _ms(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def _hf_static_progress(log: Path) -> tuple[float | None, str]:
    """transformers' static batching from part d's log, for a part d stopped before it wrote its JSON: (tok/s,
    "") from the line bench prints when the run ends ("  transformers static: 119.30 s, 1,123 tok/s"); else, from
    its progress lines ("  transformers static: token 768 of 1024 after 160.2 s"), an upper bound and how it was
    found. Each step reads a longer cache, so the steps left take at least as long as the steps between the first
    and the last progress line did (prefill excluded: the seconds before the first line count it, and a bound
    scaled from them could come out under the real rate): the run needs at least the seconds so far plus that, and
    the requested tokens over that is a bound. With one progress line, the seconds so far alone bound it."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, ""
    m = re.search(r"^  transformers static: [\d.]+ s, ([\d,]+) tok/s", text, re.M)
    if m:
        return float(m.group(1).replace(",", "")), ""
    steps = re.findall(r"^  transformers static: token (\d+) of (\d+) after ([\d.]+) s$", text, re.M)
    requested = re.search(r"^workload A: .*?([\d,]+) output tokens", text, re.M)
    if not steps or not requested:
        return None, ""
    done, total, seconds = int(steps[-1][0]), int(steps[-1][1]), float(steps[-1][2])
    first_done, first_seconds = int(steps[0][0]), float(steps[0][2])
    needs = seconds
    if done > first_done and seconds >= first_seconds:
        needs += (total - done) * (seconds - first_seconds) / (done - first_done)
    bound = float(requested.group(1).replace(",", "")) / needs
    return bound, f"token {done} of {total} after {seconds:.0f} s"


def _picked_tile(log: Path) -> str:
    """The decode tile the engine's start-up tuner picked, with its memory rate, from an INFO log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    m = re.search(r"decode attention tile \(BLOCK_N, stages, warps, heads_first\) (\([\d, ]+\)), picked in "
                  r"[\d.]+ s on (\d+) sequences of (\d+) keys(?: on average)?: (.*)$", text, re.M)
    if not m:
        return ""
    tile, seqs, keys, timings = m.groups()
    rate = re.search(re.escape(tile) + r": [\d,]+ us \(([\d,]+) GB/s\)", timings)
    order = re.search(r"decode attention launched longest first (\d+) us, in batch order (\d+) us", text)
    return (f"tile {tile}" + (f" at {rate.group(1)} GB/s ({seqs} sequences x {keys} keys on average)" if rate else "")
            + (f", {order[1]} us launched longest first against {order[2]} in batch order" if order else ""))


def _pytest_result(log: Path) -> str:
    """pytest's closing line; for a run cut short (no closing line), what `-v` had reported by then."""
    last = _tail(log)
    if re.fullmatch(r"=+ .+ in [\d.]+s\b.*=+", last):  # "=== 12 passed, 1 skipped in 95.31s (0:01:35) ==="
        return last
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return last
    # `-v` reports each test as "path::id[params] PASSED [ 8%]"; ids may hold spaces.
    outcomes = re.findall(r"^\S.*::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text, re.M)
    if not outcomes:
        return last
    done = ", ".join(f"{outcomes.count(word)} {word.lower()}" for word in ("PASSED", "FAILED", "ERROR", "SKIPPED",
                                                                          "XFAIL", "XPASS") if word in outcomes)
    return f"cut short: {done} before it stopped (last: {last[:80]})"


def _part_results(out: Path) -> dict[str, str]:
    res: dict[str, str] = {}
    res["a"] = _pytest_result(out / "a.log")
    log = (out / "b.log").read_text(errors="replace") if (out / "b.log").exists() else ""
    cases = re.findall(r"\s(ok|FAIL)(?: \(NaN left in output\))?$", log, re.M)
    verdict = re.search(r"^(PASS|FAIL) in", log, re.M)
    # Every verdict check_and_time_fused_ops prints (the names listed here once missed its "rope alone" lines, so a
    # failure there left the count at 5/5).
    fused = re.findall(r"^  \S.*? (ok|FAIL): fused ", log, re.M)
    gemms = re.findall(r"^  gemm \S+ +\d+ rows \S+ +(ok|FAIL)", log, re.M)
    layer_us = re.findall(r"elementwise work in a CUDA graph, batch \d+, (eager torch ops|fused kernels): "
                          r"([\d.]+) us", log)
    # gpu_kernel_check's launch-order table: the default decode tile (its first row) in batch order and longest first.
    order = re.search(r"^launch order: workload A's decode step (\d+).*\n.*\n +[\d,]+ +([\d.]+) us +\d+ GB/s +"
                      r"([\d.]+) us +(\d+) GB/s +(-?[\d.]+)%", log, re.M)
    # Its fp8-cache table: the default tile's row, the same step over a bf16 and an fp8 KV cache.
    fp8 = re.search(r"^fp8 KV cache: workload A's decode step (\d+).*\n.*\n +[\d,]+ +([\d.]+) us +\d+ GB/s +"
                    r"([\d.]+) us +(\d+) GB/s", log, re.M)
    if cases or verdict:
        res["b"] = (
            f"{cases.count('ok')}/{len(cases)} attention cases within 2x torch-bf16 + 1e-3"
            + (f"; fused ops {fused.count('ok')}/{len(fused)}" if fused else "")
            + ("" if len(layer_us) < 2 else
               f" (a layer's elementwise work {layer_us[0][1]} us eager, {layer_us[1][1]} us fused)")
            + (f"; decode GEMM tiles {gemms.count('ok')}/{len(gemms)} (2x torch-bf16 + 1e-3, the same bits twice)"
               if gemms else "")
            + ("" if not order else f"; decode step {order[1]} of workload A launched longest first "
                                    f"{order[3]} us ({order[4]} GB/s), in batch order {order[2]} us")
            + ("" if not fp8 else f"; over an fp8 KV cache {fp8[3]} us ({fp8[4]} GB/s of it) against {fp8[2]} us")
            + ("" if not verdict else f"; overall {verdict.group(1)}")
        )
    g = _load(out / "graphs.json")
    check = g.get("graph_check")
    if check and check.get("error"):
        res["c"] = f"{check['error']}; start-up kept graphs: {g.get('startup_graphs_on')}"
    elif check:
        n_ok = sum(1 for s in check["sizes"] if s["hidden_equal"] and s["logits_equal"] and s["finite"])
        res["c"] = (
            f"{n_ok}/{len(check['sizes'])} sizes bitwise equal (hidden + logits); "
            f"capture {g.get('capture_s', 0):.1f} s, {g.get('capture_mib', 0):,.0f} MiB; "
            f"start-up kept graphs: {g.get('startup_graphs_on')}"
        )
    # (d): the engine's figure from g's process, transformers' static batching from bench in part d.
    eng = g.get("workload_A", {}).get("tok_s")
    static = _load(out / "d_bench_A.json").get("peers", {}).get("hf_static") or {}
    hf, cut = static.get("tok_s"), ""
    if not hf and not static.get("error"):  # no report: part d was cut short (a crash's progress bounds nothing)
        hf, cut = _hf_static_progress(out / "d.log")
    if eng or hf or g.get("workload_A") or static.get("error"):
        ratio = f" ({'> ' if cut else ''}{eng / hf:.1f}x)" if eng and hf else ""
        peer = f"< {_fmt(hf)} tok/s (cut short at {cut})" if cut else f"{_fmt(hf)} tok/s"
        if not hf and static.get("error"):
            peer = f"failed ({static['error'][:200]})"
        met = "MET" if eng and eng >= TARGET_TOK_S else "NOT MET"
        res["d"] = f"engine {_fmt(eng)} tok/s, transformers static {peer}{ratio}; >= 28,000: {met}"
        if not g:  # part d in a call of its own: the engine's figure is in the earlier call's graphs.json
            res["d"] = (f"transformers static {peer}; the engine's figure is in the call that ran part g (its "
                        "graphs.json): merge the two calls' outputs as docs/GPU.md says (append the second status.tsv, copy its d* and "
                        "e* files) and run summary there")
        if g.get("workload_A", {}).get("error"):
            res["d"] += f"; the engine's run failed: {g['workload_A']['error']}"
        tile = _picked_tile(out / "g.log")
        if tile:
            res["d"] += f"; decode attention {tile}"
        gemms = g.get("decode_gemms")
        if gemms:
            res["d"] += "; decode GEMMs ours at " + ", ".join(
                f"{name} {len(sizes)}/{gemms['sizes']}" for name, sizes in gemms["ours"].items()) + " sizes"
    s64 = g.get("slice64", {}).get("tok_s")
    s64_plain = g.get("slice64_no_overlap", {}).get("tok_s")
    e = _load(out / "e_bench_64.json")
    peer = (e.get("peers", {}) or {}).get("hf_continuous") or {}
    if s64 or peer:
        if peer.get("tok_s"):
            hf = f"{_fmt(peer['tok_s'])} tok/s"
        elif peer.get("info", {}).get("tok_s_upper_bound"):
            hf = f"< {_fmt(peer['info']['tok_s_upper_bound'])} tok/s (timed out)"
        elif peer.get("error"):
            hf = f"failed ({peer['error'][:200]})"
        else:
            hf = "?"
        res["e"] = (
            f"engine {_fmt(s64)} tok/s ({_fmt(s64_plain)} without overlap), transformers continuous {hf}"
        )
    default_overlap = g.get("slice64", {}).get("overlap", True)
    itl = {(r["graphs"], r.get("overlap", default_overlap), r["batch"]): r.get("itl_ms") for r in g.get("itl", [])}
    if itl:
        def ms(graphs_on, batch, overlap=default_overlap):
            return _ms(itl.get((graphs_on, overlap, batch)))

        lo, hi = min(k[2] for k in itl), max(k[2] for k in itl)  # 1 and 64 on the GPU
        res["f"] = (
            f"ITL ms, graphs/eager: batch {lo} {ms(True, lo)}/{ms(False, lo)}, "
            f"batch {hi} {ms(True, hi)}/{ms(False, hi)}; batch {hi} graphs without overlap {ms(True, hi, False)}"
        )
    for key, what in (("kernels", "decode steps mid workload A"), ("prefill_kernels", "prefill steps of workload A")):
        k = g.get(key, {})
        if k.get("error"):
            res[key] = f"profile failed: {k['error']}"
        elif k.get("busy_ms"):
            groups = ", ".join(f"{name} {v['ms']:.2f}" for name, v in list(k["groups"].items())[:5])
            res[key] = (
                f"{k['steps']} {what}, {k['mean_running']:.0f} running: device busy "
                f"{k['busy_ms']:.2f} of {k['span_ms']:.2f} ms a step ({k['busy_share']:.0%}), "
                f"{k['kernels_per_step']:.0f} kernels; ms: {groups}"
            )
        elif "steps" in k:
            res[key] = f"no device kernels recorded over {k['steps']} steps (is CUPTI available?)"
    by_batch = g.get("workload_A_by_batch")
    if isinstance(by_batch, dict):
        res["by_batch"] = f"profile failed: {by_batch.get('error')}"
    elif by_batch:
        res["by_batch"] = "; ".join(f"{r['group']}: {r['steps']} steps, {r['seconds']:.2f} s ({r['wall_ms']:.2f} ms)"
                                    for r in by_batch)
    second = _load(out / "second.json")
    p = second.get("pdl", {})
    if "error" in p or "skipped" in p:
        res["pdl"] = p.get("error") or f"skipped: {p['skipped']}"
    elif p:
        # Beside the plain engine's ITL with graphs and its default overlap (part f's figures).
        pairs = ", ".join(f"batch {b} {_ms(v)}/{_ms(itl.get((True, default_overlap, int(b))))}"
                          for b, v in p.get("itl", {}).items())
        same = "the same" if p.get("decode_gemms") == g.get("decode_gemms") else "other"
        res["pdl"] = (f"workload A {_fmt(p['workload_A'].get('tok_s'))} tok/s with PDL, "
                      f"{_fmt(g.get('workload_A', {}).get('tok_s'))} without; ITL ms with/without: {pairs}; "
                      f"graphs kept: {p.get('graphs_on')}; attention tiles pinned to g's: "
                      f"{', '.join(second.get('pins', {})) or 'none'}; {same} decode GEMM picks")
        if p.get("itl_error"):
            res["pdl"] += f"; ITL failed: {p['itl_error']}"
    w = second.get("wide_budget", {})
    if "error" in w:
        res["wide"] = f"failed: {w['error']}"
    elif w:
        # Beside the same engine's figure at the narrower budget where PDL ran, else the first engine's.
        narrow = (p if w.get("pdl") else g).get("workload_A", {}).get("tok_s")
        res["wide"] = (f"workload A {_fmt(w['workload_A'].get('tok_s'))} tok/s at {w['max_num_batched_tokens']:,} "
                       f"tokens a step, {_fmt(narrow)} at the default (PDL {'on' if w.get('pdl') else 'off'} in both)")
    t = second.get("two_batch_overlap", {})
    if "error" in t:
        res["tbo"] = f"failed: {t['error']}"
    elif t:
        pairs = ", ".join(f"batch {b} {_ms(v)}" for b, v in t.get("itl", {}).items())
        given_up = "; ".join(f"{name} at {sizes}" for name, sizes in t.get("our_gemms_given_up", {}).items())
        same = t.get("same_priority", {})
        same = same.get("error") or f"{_fmt(same.get('workload_A', {}).get('tok_s'))} tok/s"
        res["tbo"] = (f"workload A {_fmt(t['workload_A'].get('tok_s'))} tok/s with two-batch overlap (sizes "
                      f"{min(t['halves'], default='?')}+ in halves, PDL {'on' if t.get('pdl') else 'off'}), "
                      f"{_fmt(w.get('workload_A', {}).get('tok_s'))} without (the row "
                      f"above), {same} with the halves at the attention's stream priority; ITL ms {pairs}; our GEMMs "
                      f"given up for torch's in the halves: {given_up or 'none'}")
        if t.get("pdl_dropped"):
            res["tbo"] += f"; PDL dropped for it ({t['pdl_dropped']}), the row above had it"
        if t.get("itl_error"):
            res["tbo"] += f"; ITL failed: {t['itl_error']}"
    served = _load(out / "served.json")
    if served.get("error"):
        res["s"] = f"failed: {served['error'][:300]}"
    elif served.get("grpc") and served.get("inprocess"):
        rpc, local, ratio = served["grpc"], served["inprocess"], served.get("ratio")
        res["s"] = (f"workload {served.get('workload')} ({served.get('num_requests')} requests) through both "
                    f"services {_fmt(rpc['output_throughput'])} tok/s, in-process {_fmt(local['output_throughput'])} "
                    f"(ratio {'?' if ratio is None else f'{ratio:.3f}'}); gRPC TTFT p50/p99 {_ms(rpc['ttft_ms_p50'])}/"
                    f"{_ms(rpc['ttft_ms_p99'])} ms, ITL p50/p99 {_ms(rpc['itl_ms_p50'])}/{_ms(rpc['itl_ms_p99'])} ms "
                    f"(in-process ITL p50 {_ms(local['itl_ms_p50'])} ms); failed {rpc.get('failed', 0)}")
    dec = g.get("slice64_profile", {}).get("decode")
    if dec and dec.get("gpu_ms") is not None:
        res["split"] = (
            f"decode step {dec['wall_ms']:.2f} ms: GPU {dec['gpu_ms']:.2f}, exposed host "
            f"{dec['exposed_host_ms']:.2f} (schedule {dec['schedule_ms']:.2f}, prepare {dec['prepare_ms']:.2f}, "
            f"launch {dec['launch_ms']:.2f}, sample {dec['sample_ms']:.2f}, wait {dec['wait_ms']:.2f}, "
            f"other {dec['other_ms']:.2f})"
        )
    return res


LABELS = {
    "env": "env + CUDA",
    "preset": "build Qwen3-0.6B preset",
    "a": "(a) pytest tests/gpu",
    "b": "(b) kernels vs fp32 ref",
    "c": "(c) graph replay == eager",
    "d": "(d) workload A vs hf static",
    "e": "(e) 64 requests of A",
    "f": "(f) decode ITL",
    "split": "    step split (64 req)",
    "kernels": "    device time by kernel",
    "prefill_kernels": "    the same, prefill",
    "by_batch": "    workload A by batch",
    "pdl": "    with PDL (p)",
    "wide": f"    {WIDE_BUDGET:,} tokens a step",
    "tbo": "    two-batch overlap",
    "s": "(s) served workload A",
}


SUMMARY_TARGET_MISSED = 3  # cmd_summary's exit code when the table is whole but an acceptance figure missed


def cmd_summary(out: Path, shown_as: str = "") -> int:
    """Print the table (and write performance.md); SUMMARY_TARGET_MISSED if workload A is under the target.
    shown_as: where the table says the logs are (default: `out`)."""
    env = _load(out / "env.json")
    rows = []
    status: dict[str, tuple[str, str]] = {}
    try:
        for line in (out / "status.tsv").read_text().splitlines():
            name, st, secs, *_ = line.split("\t") + [""] * 3
            status[name] = (st, secs)
    except OSError:
        pass
    try:
        res = _part_results(out)
    except Exception as e:  # noqa: BLE001 -- an output this table does not know: the statuses still print
        traceback.print_exc()
        res, broken = {}, f"{type(e).__name__}: {e}"
    else:
        broken = ""
    # The engine's figures (c, d, e, f) come from one process, part "g"; the table shows them on their own
    # rows. Row d also holds part d (transformers' static batching): without the engine's figure, it shows
    # the status of part g, which should have measured it.
    order = ["env", "preset", "a", "b", "c", "d", "e", "f", "split", "kernels", "prefill_kernels", "by_batch",
             "pdl", "wide", "tbo", "s"]
    owner = {key: "g" for key in ("c", "f", "split", "kernels", "prefill_kernels", "by_batch")}
    owner.update(pdl="p", wide="p", tbo="p")
    engine_a = (_load(out / "graphs.json").get("workload_A") or {}).get("tok_s")
    for key in order:
        st, secs = status.get(owner.get(key, key), ("-", ""))
        if key == "d" and st == "PASS" and not engine_a and "g" in status:
            st = status["g"][0]
            st = "FAIL" if st == "PASS" else st
        elif key == "d" and st == "PASS" and engine_a is not None and engine_a < TARGET_TOK_S:
            st = "MISSED"  # both runs went through, and the engine's figure is under the acceptance target
        rows.append((LABELS[key], st, secs, res.get(key, "")))
    print()
    print(
        f"GPU check: {env.get('device', '?')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}; logs and JSON in {shown_as or out}"
    )
    print(f"{'part':<30}{'status':<9}{'s':>5}  result")
    for label, st, secs, text in rows:
        print(f"{label:<30}{st:<9}{secs:>5}  {text}")
    if broken:
        print(f"the figures could not be read from the parts' outputs ({broken}): see the logs and JSON")
    staged = out / f".performance.{os.getpid()}.md"  # renamed over: the publisher may be writing it too
    staged.write_text(_markdown(env, rows))
    os.replace(staged, out / "performance.md")
    print("\n(the same as Markdown for docs/PERFORMANCE.md: performance.md, beside the logs)")
    if broken:
        return 1
    return SUMMARY_TARGET_MISSED if any(st == "MISSED" for _, st, _, _ in rows) else 0


def _markdown(env: dict, rows: list[tuple[str, str, str, str]]) -> str:
    """The table as a docs/PERFORMANCE.md section: versions, the command, one row per part."""
    lines = [
        "## GPU check (issue 3)",
        "",
        f"{env.get('device', '?')} ({env.get('sms', '?')} SMs, {env.get('memory_gib', '?')} GiB), torch "
        f"{env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, transformers "
        f"{env.get('transformers')}, Python {env.get('python')}. Command: `scripts/gpu_check.sh` "
        "(docs/GPU.md; each part's command is in its log).",
        "",
        "| part | status | seconds | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label.strip()} | {st} | {secs} | {text.replace('|', '/')} |" for label, st, secs, text in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["env", "preset", "graphs", "second", "served", "summary"])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--cache-dir", type=Path, default=None, help="preset cache (default: bench's)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="graphs, second, served: the same flow on CPU at toy sizes")
    p.add_argument("--shown-as", default="", help="summary: where the table says the logs are (default: --out)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.command == "summary":
        return cmd_summary(a.out, a.shown_as)
    if a.command == "env":
        return cmd_env(a.out)
    from engine_service import bench

    cache_dir = a.cache_dir or bench.DEFAULT_CACHE_DIR
    if a.command == "preset":
        return cmd_preset(cache_dir)
    if a.command == "second":
        return cmd_second(a.out, cache_dir, a.cpu_dry_run)
    if a.command == "served":
        return cmd_served(a.out, cache_dir, a.cpu_dry_run)
    return cmd_graphs(a.out, cache_dir, a.cpu_dry_run)


if __name__ == "__main__":
    sys.exit(main())
