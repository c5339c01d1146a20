"""Where an engine step's time goes: host work (scheduling, building inputs, launching, bookkeeping) vs GPU.

    python scripts/step_profile.py --num-seqs 64                       # a 64-request slice of workload A
    python scripts/step_profile.py --batch 64 --prompt-len 256 --max-tokens 128   # uniform decode batch
    python scripts/step_profile.py --batch 1 --enforce-eager           # without CUDA graphs
    python scripts/step_profile.py --preset cpu-small --num-seqs 8     # anywhere (host phases only on CPU)

The model is a bench preset (random weights; default qwen3-0.6b, built and cached as engine_service.bench
does) or --model DIR. The profiler wraps a live engine's methods as instance attributes (the engine's code
is unchanged) and times every step():

  schedule  Scheduler.schedule and Scheduler.schedule_ahead
  prepare   ModelRunner.step_inputs: flattening the batch into lists
  launch    ModelRunner.execute: device inputs, then enqueueing the forward and the LM head. On CUDA it
            returns before the GPU is done; for an eager step it is mostly kernel-launch time.
  sample    Sampler.sample_with_logprobs: enqueueing sampling, penalties and logprobs (nothing waits)
  wait      ModelRunner.collect: the step's one sync, waiting for the sampled tokens
  other     the rest of step(): postprocess and outputs

On CUDA, gpu is device time from the start of the step's first execute to the end of its last sampling,
read from CUDA events (launch gaps inside the forward count as GPU time), and exposed host = wall - gpu is
the time in which the GPU has nothing to do. With overlap scheduling (the default on CUDA), a step() launches
the next batch before it waits for the current one, so the host's work hides behind the GPU's and `wait`
grows instead. Steps are grouped by kind: decode (every sequence computes one token) and mixed (any
prefill). The inter-token latency of a uniform batch is the median wall time of its decode steps.

kernel_breakdown (used by scripts/gpu_check.py) is the device side: the kernels a window of steps ran,
under torch.profiler, by group and by name.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("schedule", "prepare", "launch", "sample", "wait")


@dataclass(slots=True)
class StepRecord:
    """One step()'s host phases (seconds) and its CUDA events."""

    kind: str = ""  # "decode" or "mixed"; empty when the step ran no batch
    batch: int = 0
    wall: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    start: object = None  # torch.cuda.Event before execute
    end: object = None  # torch.cuda.Event after sampling (or after execute when nothing was sampled)
    gpu: float | None = None  # seconds between the two events


class StepProfiler:
    """Times the steps of one engine until close(); use as a context manager."""

    def __init__(self, llm):
        import torch

        self.torch = torch
        self.llm = llm
        self.cuda = llm.runner.device.type == "cuda"
        self.records: list[StepRecord] = []
        self._rec: StepRecord | None = None
        self._saved: list[tuple[object, str, object]] = []
        self._wrap(llm.scheduler, "schedule", "schedule")
        self._wrap(llm.scheduler, "schedule_ahead", "schedule")
        self._wrap(llm.runner, "step_inputs", "prepare", after=self._classify)
        self._wrap(llm.runner, "execute", "launch", before=self._start_event, after=self._end_event)
        self._wrap(llm.runner.sampler, "sample_with_logprobs", "sample", after=self._end_event)
        self._wrap(llm.runner, "collect", "wait")
        original_step = llm.step

        def step():
            rec = self._rec = StepRecord()
            t = time.perf_counter()
            try:
                return original_step()
            finally:
                rec.wall = time.perf_counter() - t
                self._rec = None
                if not rec.kind and rec.phases["wait"] > 0:
                    rec.kind = "decode"  # only read back a batch scheduled ahead, which is always decode
                if rec.kind:
                    self.records.append(rec)

        self._saved.append((llm, "step", llm.__dict__.get("step")))
        llm.step = step

    def _wrap(self, obj, name: str, phase: str, before=None, after=None) -> None:
        fn = getattr(obj, name)
        self._saved.append((obj, name, obj.__dict__.get(name)))

        def wrapper(*args, **kwargs):
            rec = self._rec
            if rec is not None and before is not None:
                before(rec)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if rec is not None:
                rec.phases[phase] += time.perf_counter() - t
                if after is not None:
                    after(rec, out)
            return out

        setattr(obj, name, wrapper)

    @staticmethod
    def _classify(rec: StepRecord, x) -> None:
        """A step() may launch two batches (overlap scheduling's first step after a full schedule): the
        step counts as mixed if either had a prefill, and its batch is the larger."""
        kind = "decode" if x.num_decode == len(x.q_lens) else "mixed"
        rec.kind = "mixed" if "mixed" in (rec.kind, kind) else kind
        rec.batch = max(rec.batch, len(x.q_lens))

    def _start_event(self, rec: StepRecord) -> None:
        if self.cuda and rec.start is None:
            rec.start = self.torch.cuda.Event(enable_timing=True)
            rec.start.record()

    def _end_event(self, rec: StepRecord, _out) -> None:
        if self.cuda:
            rec.end = self.torch.cuda.Event(enable_timing=True)
            rec.end.record()

    def close(self) -> None:
        """Restore the engine's methods and read the events (one sync, after the run)."""
        for obj, name, value in reversed(self._saved):
            if value is None:
                delattr(obj, name)  # the instance attribute goes; the class's method shows again
            else:
                setattr(obj, name, value)
        self._saved.clear()
        if self.cuda:
            self.torch.cuda.synchronize()
            for rec in self.records:
                if rec.start is not None and rec.end is not None:
                    rec.gpu = rec.start.elapsed_time(rec.end) / 1e3
                elif rec.start is None:
                    rec.gpu = 0.0  # a step() that only read back a batch launched by the one before it
                rec.start = rec.end = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per step kind: step count, mean batch, wall (mean and median), each phase, gpu and exposed host,
        all in milliseconds."""
        out = {}
        for kind in ("decode", "mixed"):
            recs = [r for r in self.records if r.kind == kind]
            if not recs:
                continue
            ms = 1e3 / len(recs)
            row = {
                "steps": len(recs),
                # over the steps that launched something (a step() may only read back the one before it)
                "mean_batch": sum(r.batch for r in recs) / max(1, sum(1 for r in recs if r.batch)),
                "wall_ms": sum(r.wall for r in recs) * ms,
                "median_wall_ms": statistics.median(r.wall for r in recs) * 1e3,
            }
            for p in PHASES:
                row[f"{p}_ms"] = sum(r.phases[p] for r in recs) * ms
            row["other_ms"] = row["wall_ms"] - sum(row[f"{p}_ms"] for p in PHASES)
            if all(r.gpu is not None for r in recs):
                row["gpu_ms"] = sum(r.gpu for r in recs) * ms
                row["exposed_host_ms"] = sum(max(0.0, r.wall - r.gpu) for r in recs) * ms
            out[kind] = row
        return out

    def by_batch(self, edges: tuple[int, ...] = (16, 64, 128, 192)) -> list[dict]:
        """Where a run's wall time went: its mixed steps, then its decode steps grouped by batch size (up to
        each edge, and above the last). Per group: steps, mean batch, seconds in all, and ms a step of wall
        and of GPU time (the GPU's where every step has its events)."""
        groups: list[tuple[str, list[StepRecord]]] = [("mixed", [r for r in self.records if r.kind == "mixed"])]
        decode = [r for r in self.records if r.kind == "decode"]
        low = 0
        for high in (*edges, None):
            label = f"decode {low + 1}-{high}" if high is not None else f"decode >{low}"
            groups.append((label, [r for r in decode if max(r.batch, 1) > low and (high is None or r.batch <= high)]))
            low = high if high is not None else low
        out = []
        for label, recs in groups:
            if not recs:
                continue
            wall = sum(r.wall for r in recs)
            row = {"group": label, "steps": len(recs), "mean_batch": sum(r.batch for r in recs) / len(recs),
                   "seconds": wall, "wall_ms": 1e3 * wall / len(recs)}
            if all(r.gpu is not None for r in recs):
                row["gpu_ms"] = 1e3 * sum(r.gpu for r in recs) / len(recs)
            out.append(row)
        return out


def format_by_batch(rows: list[dict]) -> str:
    lines = [f"{'steps':<14}{'count':>7}{'batch':>8}{'seconds':>9}{'wall ms':>9}{'gpu ms':>9}"]
    for r in rows:
        gpu = f"{r['gpu_ms']:>9.2f}" if "gpu_ms" in r else f"{'-':>9}"
        lines.append(f"{r['group']:<14}{r['steps']:>7}{r['mean_batch']:>8.1f}{r['seconds']:>9.3f}{r['wall_ms']:>9.2f}"
                     + gpu)
    return "\n".join(lines)


def format_summary(summary: dict[str, dict[str, float]], title: str = "") -> str:
    cols = ["steps", "mean_batch", "wall_ms", "median_wall_ms", *(f"{p}_ms" for p in PHASES), "other_ms"]
    cols += ["gpu_ms", "exposed_host_ms"]
    heads = ["steps", "batch", "wall", "median", *PHASES, "other", "gpu", "exposed"]
    lines = [title] if title else []
    lines.append(f"{'kind':<7}" + "".join(f"{h:>9}" for h in heads) + "   (ms per step)")
    for kind, row in summary.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-':>9}" if v is None else f"{v:>9.0f}" if c == "steps" else f"{v:>9.2f}")
        lines.append(f"{kind:<7}" + "".join(cells))
    return "\n".join(lines)


# ---- requests ---------------------------------------------------------------------------------------
def uniform_requests(batch: int, prompt_len: int, max_tokens: int, vocab: int, seed: int = 0,
                     extra: dict | None = None):
    """`batch` random prompts of `prompt_len` tokens, each asking for exactly `max_tokens` (EOS ignored), with
    `extra` SamplingParams fields (logprobs, penalties) when given."""
    from engine_service import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = [SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True, **(extra or {}))] * batch
    return prompts, params


def workload_slice(num_seqs: int, vocab: int, max_input_len: int | None = None,
                   max_output_len: int | None = None):
    """`num_seqs` requests drawn by workload A's generator (bench.make_workload), as prompts and params."""
    from engine_service import SamplingParams, bench

    w = bench.make_workload(bench.WORKLOAD_A, num_seqs, max_input_len, max_output_len)
    prompts = bench.fit_vocab(w.prompts, vocab) if bench.WORKLOAD_A.token_max >= vocab else w.prompts
    params = [SamplingParams(temperature=bench.TEMPERATURE, max_tokens=n, ignore_eos=True) for n in w.max_tokens]
    return prompts, params


def warm_up(llm, prompts) -> None:
    """bench's one warm-up request: the first prompt's start, salted so it caches no prefix of the run."""
    from engine_service import SamplingParams, bench

    vocab = llm.model_cfg.vocab_size
    w = bench.Workload("A", prompts, [16] * len(prompts))
    warm, max_tokens = bench.warmup_request(w, 7, vocab)
    llm.generate(warm, [SamplingParams(temperature=0.6, max_tokens=max_tokens[0], ignore_eos=True)])


def profile_generate(llm, prompts, params) -> tuple[dict, float]:
    """Run one generate() under the profiler; returns (summary, wall seconds)."""
    with StepProfiler(llm) as prof:
        t = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - t
    return prof.summary(), seconds


_LATENCY_CALLS = itertools.count()  # each call's prompts are new: a repeat found the last call's in the prefix cache


def decode_latency(llm, batch: int, prompt_len: int = 256, max_tokens: int = 64, extra: dict | None = None) -> dict:
    """Inter-token latency of a uniform batch: the median decode step, after a warm-up of the same shape. Each
    call draws prompts of its own (the same engine measured twice, say with graphs and without, found the first
    call's in its prefix cache, which shortened the second's prefill and so its seconds)."""
    vocab = llm.model_cfg.vocab_size
    call = next(_LATENCY_CALLS)
    llm.generate(*uniform_requests(batch, prompt_len, 4, vocab, seed=2 * call + 1, extra=extra))  # compiles the shape
    summary, seconds = profile_generate(llm, *uniform_requests(batch, prompt_len, max_tokens, vocab, seed=2 * call + 2,
                                                               extra=extra))
    decode = summary.get("decode", {})
    return {"batch": batch, "itl_ms": decode.get("median_wall_ms"), "decode": decode, "seconds": seconds}


# ---- device kernels -----------------------------------------------------------------------------------
# Kernel name fragments (lower case) -> the group a kernel counts in; the first match wins, the rest is
# "other". On the CPU (no device kernels) aten ops, each with its own time, stand in for kernels.
KERNEL_GROUPS = (
    ("attention", ("paged_attention", "merge_splits", "scaled_dot_product", "flash")),
    ("kv store", ("store_kvcache",)),
    ("fused elementwise", ("add_rms_norm", "qk_norm_rope", "silu_and_mul")),
    ("sampling", ("sample_kernel", "chunk_stats", "chunk_pick")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "aten::mm", "aten::addmm",
                "aten::bmm")),
    ("copy", ("memcpy", "memset", "aten::copy_")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def summarize_kernels(kernels: list[tuple[str, float, float]], steps: int, top: int = 12) -> dict:
    """Device time per engine step, by group and by kernel. kernels: (name, start_us, duration_us) on one
    device's timeline over `steps` steps. span is first start to last end: busy_share below 1 is time the
    device had nothing to run (launch gaps, waiting for the host). The profiler's own step ranges
    ("ProfilerStep#N", which torch 2.11 also lists on the device's timeline) are not kernels and are left out:
    counted, they doubled the busy time of the H200 run (194%)."""
    kernels = [k for k in kernels if not k[0].startswith("ProfilerStep")]
    out: dict = {"steps": steps, "kernels_per_step": len(kernels) / steps if steps else 0.0}
    if not kernels or steps < 1:
        return out
    busy = sum(d for _, _, d in kernels)
    span = max(s + d for _, s, d in kernels) - min(s for _, s, _ in kernels)
    groups: dict[str, float] = {}
    names: dict[str, tuple[int, float]] = {}
    for name, _, d in kernels:
        group = kernel_group(name)
        groups[group] = groups.get(group, 0.0) + d
        count, total = names.get(name, (0, 0.0))
        names[name] = (count + 1, total + d)
    per_step_ms = 1e3 * steps  # microseconds over all steps -> milliseconds per step
    out.update(
        span_ms=span / per_step_ms,
        busy_ms=busy / per_step_ms,
        busy_share=busy / span if span > 0 else 1.0,
        groups={g: {"ms": t / per_step_ms, "share": t / busy}
                for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
        top=[{"name": n[:120], "group": kernel_group(n), "per_step": c / steps, "mean_us": t / c,
              "ms": t / per_step_ms}
             for n, (c, t) in sorted(names.items(), key=lambda kv: -kv[1][1])[:top]],
    )
    return out


def kernel_breakdown(llm, prompts, params, skip_steps: int, active_steps: int, host_ops: bool = True) -> dict:
    """generate() under torch.profiler, recording engine steps skip_steps + 2 to skip_steps + 1 +
    active_steps (one step of profiler warm-up between): what the device ran in them, by kernel
    (summarize_kernels), and the mean number of running sequences. host_ops=False (CUDA only): record the
    device's kernels alone; recording every host op slows an eager step's launches, which shows as device idle
    time (the H200's prefill steps read 77% busy with them recorded)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = llm.runner.device.type == "cuda"
    activities = ([ProfilerActivity.CPU] if host_ops or not cuda else []) + ([ProfilerActivity.CUDA] if cuda else [])
    first = skip_steps + 1  # steps are counted from 0; the profiler warms up on step skip_steps
    running: list[int] = []
    step, saved = llm.step, llm.__dict__.get("step")
    with profile(activities=activities, schedule=schedule(wait=skip_steps, warmup=1, active=active_steps,
                                                          repeat=1)) as prof:
        def profiled_step():
            if first <= prof.step_num < first + active_steps:
                running.append(len(llm.scheduler.running))
            out = step()
            prof.step()
            return out

        llm.step = profiled_step
        try:
            llm.generate(prompts, params)
        finally:
            if saved is None:
                del llm.step  # the instance attribute goes; the class's method shows again
            else:
                llm.step = saved
    if cuda:
        kernels = [(e.name, e.time_range.start, e.time_range.elapsed_us())
                   for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:  # each aten op's own time, without the ops it called: a partition of the CPU's compute
        kernels = [(e.name, e.time_range.start, e.self_cpu_time_total)
                   for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    summary = summarize_kernels(kernels, len(running))
    summary["mean_running"] = sum(running) / len(running) if running else 0.0
    summary["device"] = "cuda" if cuda else "cpu (aten ops, self time)"
    return summary


def format_kernels(summary: dict) -> str:
    if not summary.get("busy_ms"):
        return f"no kernels recorded over {summary.get('steps', 0)} steps"
    lines = [f"{summary['steps']} steps, {summary['mean_running']:.0f} sequences running, "
             f"{summary['kernels_per_step']:.0f} kernels a step: device busy {summary['busy_ms']:.2f} of "
             f"{summary['span_ms']:.2f} ms a step ({summary['busy_share']:.0%})"]
    lines += [f"  {g:<18}{v['ms']:8.3f} ms {v['share']:6.1%}" for g, v in summary["groups"].items()]
    lines += [f"  {k['ms']:8.3f} ms {k['per_step']:6.1f}x {k['mean_us']:8.1f} us  {k['name']}" for k in summary["top"]]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from engine_service import bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(bench.PRESETS), default="qwen3-0.6b")
    p.add_argument("--model", type=Path, help="a checkpoint directory instead of a preset")
    p.add_argument("--cache-dir", type=Path, default=bench.DEFAULT_CACHE_DIR)
    p.add_argument("--num-seqs", type=int, help="profile this many requests of workload A")
    p.add_argument("--batch", type=int, help="profile a uniform batch of this many requests instead")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--overlap-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="schedule the next decode step while the current one computes (auto: on for CUDA)")
    p.add_argument("--logprobs", type=int, help="with --batch: every request asks for this many logprobs")
    p.add_argument("--repetition-penalty", type=float, help="with --batch: every request has this penalty")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    extra = {k: v for k, v in (("logprobs", a.logprobs), ("repetition_penalty", a.repetition_penalty))
             if v is not None}
    if extra and not a.batch:
        p.error("--logprobs and --repetition-penalty apply to a uniform batch (--batch)")
    import torch

    from engine_service import LLM

    model_dir = a.model or bench.build_preset(a.preset, a.cache_dir)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or bench.default_dtype(bench.read_model_config(model_dir), device)
    overlap = None if a.overlap_scheduling == "auto" else a.overlap_scheduling == "on"
    with LLM(str(model_dir), device=device, dtype=dtype, attention_backend=a.attention_backend,
             enforce_eager=a.enforce_eager, overlap_scheduling=overlap) as llm:
        graphs = llm.runner.graphs is not None
        title = (f"{model_dir.name} {dtype} on {device}, backend {llm.runner.backend_name}, graphs {graphs}, "
                 f"overlap {llm.overlap}")
        if a.batch:
            result = decode_latency(llm, a.batch, a.prompt_len, a.max_tokens, extra)
            summary = {"decode": result["decode"]} if result["decode"] else {}
            title += f"; uniform batch {a.batch}, ITL {result['itl_ms']:.2f} ms" if result["itl_ms"] else ""
        else:
            prompts, params = workload_slice(a.num_seqs or 64, llm.model_cfg.vocab_size)
            warm_up(llm, prompts)
            summary, seconds = profile_generate(llm, prompts, params)
            tokens = sum(q.max_tokens for q in params)
            result = {"seconds": seconds, "tok_s": tokens / seconds, "summary": summary}
            title += f"; {len(prompts)} requests of workload A, {tokens / seconds:,.0f} tok/s (profiled)"
    print(format_summary(summary, title))
    if a.json:
        a.json.write_text(json.dumps({"title": title, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
