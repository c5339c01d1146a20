"""Offline throughput benchmark: the engine beside transformers on workloads A and B (docs/PERFORMANCE.md).

    python -m engine_service.bench                                   # workload A on random Qwen3-0.6B, bf16
    python -m engine_service.bench --preset cpu-small --peers all    # workload B on the CPU model, with peers

Throughput is requested output tokens over wall seconds, after one warm-up request per contender; every
contender runs in this process on the same weights and dtype. With --repeats N each figure is the median.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The workloads (docs/PERFORMANCE.md): every request samples at this temperature and ignores EOS.
TEMPERATURE = 0.6
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "llm-grpc-serve" / "presets"
PEER_CHOICES = {"none": (), "hf-static": ("hf_static",), "hf-continuous": ("hf_continuous",)}
PEER_CHOICES["all"] = ("hf_static", "hf_continuous")


# ----------------------------------------------------------------------------------------------------------------
# Workloads


@dataclass(slots=True, frozen=True)
class WorkloadSpec:
    """A workload's generator (docs/PERFORMANCE.md): request count and inclusive randint bounds."""

    name: str
    num_seqs: int
    input_len: tuple[int, int]
    token_max: int
    output_len: tuple[int, int]


WORKLOAD_A = WorkloadSpec("A", 256, (100, 1024), 10000, (100, 1024))
WORKLOAD_B = WorkloadSpec("B", 64, (32, 256), 8000, (32, 256))


@dataclass(slots=True)
class Workload:
    """Token-id prompts and each request's max_tokens, in request order."""

    name: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(
    spec: WorkloadSpec,
    num_seqs: int | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> Workload:
    """The spec's requests, drawn exactly as the team's design notes say (docs/PERFORMANCE.md); overrides replace
    the count and upper bounds.

    An upper bound below the spec's lower bound lowers that too, so that small development runs stay legal.
    """
    n = spec.num_seqs if num_seqs is None else num_seqs
    in_hi = spec.input_len[1] if max_input_len is None else max_input_len
    out_hi = spec.output_len[1] if max_output_len is None else max_output_len
    in_lo, out_lo = min(spec.input_len[0], in_hi), min(spec.output_len[0], out_hi)
    # random.Random(0) draws the same stream as random.seed(0) followed by the module-level functions.
    rng = random.Random(0)
    # Prompts for every request first, then the output lengths: the order fixes the totals.
    prompts = [[rng.randint(0, spec.token_max) for _ in range(rng.randint(in_lo, in_hi))] for _ in range(n)]
    max_tokens = [rng.randint(out_lo, out_hi) for _ in range(n)]
    return Workload(spec.name, prompts, max_tokens)


def fit_vocab(prompts: list[list[int]], vocab_size: int) -> list[list[int]]:
    """Token ids folded into [0, vocab_size): a model smaller than the generator's range still gets the
    same lengths, which is all the work depends on."""
    return [[t % vocab_size for t in p] for p in prompts]


def salted(prompts: list[list[int]], salt: int, vocab_size: int) -> list[list[int]]:
    """The prompts with their first token shifted by `salt`.

    Each repeat and the warm-up get a different salt, so no prompt block of one run is in the prefix cache of
    another (block hashes chain from the first token) while every length, and so all the work, stays the same.
    """
    if salt == 0:
        return prompts
    return [[(p[0] + salt) % vocab_size, *p[1:]] for p in prompts]


def warmup_request(workload: Workload, salt: int, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The one warm-up request: the start of the first prompt, salted, with a short output."""
    prompt = salted([workload.prompts[0][:64]], salt, vocab_size)
    return prompt, [min(16, max(workload.max_tokens))]


# ----------------------------------------------------------------------------------------------------------------
# Models: presets with random weights, or a real checkpoint


@dataclass(slots=True, frozen=True)
class Preset:
    """A random-weight Qwen3 of a fixed shape, its dtype, and the workload it is benchmarked on."""

    config: dict[str, Any]
    dtype: str
    workload: WorkloadSpec
    seed: int = 0


PRESETS = {
    "qwen3-0.6b": Preset(
        config=dict(
            num_hidden_layers=28,
            hidden_size=1024,
            intermediate_size=3072,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
        ),
        dtype="bfloat16",
        workload=WORKLOAD_A,
    ),
    "cpu-small": Preset(
        config=dict(
            num_hidden_layers=4,
            hidden_size=256,
            intermediate_size=768,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            vocab_size=8192,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
        ),
        dtype="float32",
        workload=WORKLOAD_B,
    ),
}


PRESET_STAMP = "preset.json"  # in a built preset's directory: the definition it was built from


def _preset_stamp(preset: Preset) -> dict[str, Any]:
    return {"config": preset.config, "dtype": preset.dtype, "seed": preset.seed}


def preset_built_from(target: Path) -> dict[str, Any] | None:
    """The definition a cached preset directory was built from, or None (none there, or unreadable)."""
    try:
        with open(target / PRESET_STAMP) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_preset(name: str, cache_dir: Path) -> Path:
    """The preset's checkpoint directory, built with transformers and save_pretrained unless cached.

    A cached directory is used only when its stamp matches the preset's definition (shape, dtype, seed): one
    built from an older definition, or with no stamp, is rebuilt in place rather than benchmarked as the new one.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    stamp = json.loads(json.dumps(_preset_stamp(preset)))  # as it reads back: tuples become lists
    target = cache_dir / name
    if (target / "config.json").is_file() and preset_built_from(target) == stamp:
        return target
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(preset.seed)
    config = Qwen3Config(**preset.config, dtype=preset.dtype)
    model = Qwen3ForCausalLM(config).to(getattr(torch, preset.dtype))
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        (staging / PRESET_STAMP).write_text(json.dumps(stamp, indent=1))
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install_dir(staging, target, lambda: preset_built_from(target) == stamp)
    return target


def install_dir(staging: Path, target: Path, current: Callable[[], bool]) -> None:
    """Rename a directory built at `staging` (beside `target`) into place, so an interrupted build is never
    mistaken for a cache hit. A stale `target` is moved aside first (a rename cannot replace a full directory)
    and removed; a concurrent build that won the rename is fine when `current()` says its result is this one."""
    stale = None
    try:
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
            os.replace(target, stale / target.name)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not current():
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    with open(model_dir / "config.json") as f:
        return json.load(f)


def default_dtype(config: dict[str, Any], device: str) -> str:
    """The checkpoint's own dtype (transformers 5 writes `dtype`, 4 wrote `torch_dtype`), else a device default."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(dtype, str):
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


# ----------------------------------------------------------------------------------------------------------------
# Contenders


@dataclass(slots=True)
class Result:
    """A contender's runs and their median; error is set when it could not finish."""

    runs_s: list[float] = field(default_factory=list)
    requested_tokens: int = 0
    generated_tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def withdraw(self, why: str) -> None:
        """No figure: the runs did not do the work they would be credited with (tok/s counts requested tokens)."""
        self.error = why
        self.runs_s.clear()

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.runs_s) if self.runs_s else None

    @property
    def tok_s(self) -> float | None:
        return self.requested_tokens / self.seconds if self.runs_s else None

    def to_json(self) -> dict[str, Any]:
        out = {"tok_s": self.tok_s, "seconds": self.seconds, **asdict(self)}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(slots=True)
class Plan:
    """What every contender runs: the warm-up request and one batch of requests per repeat."""

    warmup: tuple[list[list[int]], list[int]]
    batches: list[tuple[list[list[int]], list[int]]]
    model_dir: Path
    device: str
    dtype: str


def make_plan(spec: WorkloadSpec, model_dir: Path, device: str, dtype: str, vocab_size: int, repeats: int,
              num_seqs: int | None = None, max_input_len: int | None = None,
              max_output_len: int | None = None) -> tuple[Workload, Plan]:
    """The workload drawn by `spec`'s generator (prompt tokens folded into the vocabulary where it is
    smaller), and what each contender runs of it."""
    workload = make_workload(spec, num_seqs, max_input_len, max_output_len)
    if spec.token_max >= vocab_size:
        workload.prompts = fit_vocab(workload.prompts, vocab_size)
    # Salt 0 is the workload itself; the warm-up and later repeats each get their own (see salted()).
    plan = Plan(
        warmup=warmup_request(workload, repeats, vocab_size),
        batches=[(salted(workload.prompts, r, vocab_size), workload.max_tokens) for r in range(repeats)],
        model_dir=model_dir,
        device=device,
        dtype=dtype,
    )
    return workload, plan


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM keyword arguments given on the command line; the rest keep the engine's defaults."""
    names = (
        "attention_backend",
        "kv_cache_dtype",
        "max_num_seqs",
        "max_num_batched_tokens",
        "num_kvcache_blocks",
        "kvcache_block_size",
        "max_model_len",
    )
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.overlap_scheduling != "auto":
        kwargs["overlap_scheduling"] = args.overlap_scheduling == "on"
    if args.fused_ops != "auto":
        kwargs["fused_ops"] = args.fused_ops == "on"
    kwargs["triton_gemm"] = args.triton_gemm == "on"
    kwargs["pdl"] = args.pdl == "on"
    kwargs["two_batch_overlap"] = args.two_batch_overlap == "on"
    return kwargs


def run_engine(plan: Plan, kwargs: dict[str, Any]) -> Result:
    """The engine: LLM construction, then time_engine."""
    from engine_service import LLM, bench_peers

    llm = LLM(str(plan.model_dir), device=plan.device, dtype=plan.dtype, **kwargs)
    try:
        return time_engine(llm, plan, Result(info={"engine_kwargs": kwargs}))
    finally:
        llm.close()
        del llm
        bench_peers.release()


def engine_params(max_tokens: list[int]) -> list[Any]:
    """The engine's SamplingParams for a workload's requests: TEMPERATURE, each request's max_tokens, EOS
    ignored."""
    from engine_service import SamplingParams

    return [SamplingParams(temperature=TEMPERATURE, max_tokens=n, ignore_eos=True) for n in max_tokens]


def time_engine(llm: Any, plan: Plan, result: Result) -> Result:
    """One warm-up request on a constructed engine, then each batch of the plan timed through generate().

    generate() decodes every output to text once its batch is done, where the model has a tokenizer (a --model
    checkpoint; the presets have none): the peers make token ids only, so the timed runs do too, with the tokenizer
    set aside."""
    llm.generate(plan.warmup[0], engine_params(plan.warmup[1]))
    tokenizer = getattr(llm, "tokenizer", None)
    for prompts, max_tokens in plan.batches:
        params = engine_params(max_tokens)
        llm.tokenizer = None
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            result.runs_s.append(time.perf_counter() - start)
        finally:
            llm.tokenizer = tokenizer
        result.requested_tokens = sum(max_tokens)
        result.generated_tokens = sum(len(o["token_ids"]) for o in outs)
        wrong = sum(len(o["token_ids"]) != n for o, n in zip(outs, max_tokens, strict=True))
        result.info["requests_with_wrong_length"] = wrong
        if wrong:  # e.g. max_model_len cut them short: crediting the requested tokens would inflate tok/s
            result.withdraw(f"{wrong} requests generated fewer tokens than requested ({result.generated_tokens} of "
                            f"{result.requested_tokens}); raise --max-model-len or lower --max-output-len")
            return result
    return result


def run_hf_static(plan: Plan) -> Result:
    """transformers `generate` on one left-padded batch, warmed up on the warm-up request."""
    import torch

    from engine_service import bench_peers

    model = bench_peers.load_hf_model(str(plan.model_dir), getattr(torch, plan.dtype), plan.device, "sdpa")
    result = Result(info={"attn_implementation": "sdpa"})
    try:
        bench_peers.hf_static_once(model, *plan.warmup, TEMPERATURE)
        for prompts, max_tokens in plan.batches:
            run = bench_peers.hf_static_once(model, prompts, max_tokens, TEMPERATURE, progress=True)
            result.runs_s.append(run.seconds)
            result.requested_tokens, result.generated_tokens = run.requested_tokens, run.generated_tokens
            result.info.update(run.info)
            if run.info["new_tokens_per_row"] < max(max_tokens):  # as in time_engine: no credit for tokens not made
                result.withdraw(f"generate() made {run.info['new_tokens_per_row']} tokens a row, fewer tokens than "
                                f"the longest request's {max(max_tokens)}")
                break
    finally:
        del model
        bench_peers.release()
    return result


def run_hf_continuous(plan: Plan, timeout_s: float) -> Result:
    """transformers' continuous batching manager; a run past `timeout_s` is recorded as an error."""
    import torch

    from engine_service import bench_peers

    model, requested, effective = bench_peers.load_cb_model(
        str(plan.model_dir), getattr(torch, plan.dtype), plan.device
    )
    result = Result(info={"attn_implementation": {"requested": requested, "effective": effective}})
    try:
        runs = bench_peers.hf_continuous_runs(model, plan.warmup, plan.batches, TEMPERATURE, timeout_s)
    except bench_peers.PeerTimeout as exc:
        runs = exc.runs
        if runs:
            # Repeats that finished are measured figures: their median stands (the one cut short is left out),
            # where a bound from the sliver of time the late repeat had would replace a figure with a guess.
            result.info["cut_short"] = (f"repeat {len(runs) + 1} of {len(plan.batches)} ran past the deadline "
                                        f"({exc}): the figure is of the {len(runs)} that finished")
        else:
            # ../shared/design/BENCHMARKS.md quotes a peer that cannot finish as "below requested / time
            # allowed": the time the timed batch had, not the whole deadline (set-up and the warm-up used part
            # of it). A deadline that passed before the timed batch began bounds nothing.
            requested_tokens = sum(plan.batches[0][1])
            result.error, result.info["timed_out"] = str(exc), True
            if exc.timed_seconds is not None and exc.timed_seconds > 0:
                result.info["timed_seconds"] = exc.timed_seconds
                result.info["tok_s_upper_bound"] = requested_tokens / exc.timed_seconds
            else:
                result.error += " (before the timed batch began: no bound)"
            return result
    finally:
        del model
        bench_peers.release()
    for run in runs:
        result.runs_s.append(run.seconds)
        result.requested_tokens, result.generated_tokens = run.requested_tokens, run.generated_tokens
        result.info.update(run.info)
        wrong = run.info["requests_with_wrong_length"]
        if wrong:  # as in time_engine: crediting the requested tokens would inflate tok/s
            result.withdraw(f"{wrong} requests generated fewer tokens than requested ({run.generated_tokens} of "
                            f"{run.requested_tokens})")
            break
    return result


def peer_error(exc: Exception) -> str:
    """A peer's crash as its report entry, with the versions it ran on (transformers' API moves between them)."""
    import torch
    import transformers

    return f"{type(exc).__name__}: {exc} (transformers {transformers.__version__}, torch {torch.__version__})"


# ----------------------------------------------------------------------------------------------------------------
# Reporting


LABELS = {"engine": "engine", "hf_static": "transformers static", "hf_continuous": "transformers continuous"}


COLORS = {"engine": "#2b6cb0", "hf_static": "#a0aec0", "hf_continuous": "#718096"}


def contenders(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, figures) for the engine, when it ran, then each peer."""
    rows = [("engine", report["engine"])] if report.get("engine") else []
    return rows + list(report["peers"].items())


def format_table(report: dict[str, Any]) -> str:
    """Seconds, tok/s, each contender's ratio to the engine and the engine's ratio to it."""
    engine_tok_s = (report.get("engine") or {}).get("tok_s")
    lines = [f"{'contender':<26}{'seconds':>10}{'tok/s':>12}{'vs engine':>12}{'engine is':>12}"]
    for key, figures in contenders(report):
        tok_s = figures.get("tok_s")
        if tok_s is None:
            bound = figures.get("info", {}).get("tok_s_upper_bound")
            note = f"< {bound:,.0f} tok/s: " if bound else ""
            lines.append(f"{LABELS[key]:<26}{note}{figures.get('error', 'no result')}")
            continue
        vs, engine_is = "", ""
        if engine_tok_s:
            vs, engine_is = f"{tok_s / engine_tok_s:.2f}x", f"{engine_tok_s / tok_s:.2f}x"
        lines.append(f"{LABELS[key]:<26}{figures['seconds']:>10.2f}{tok_s:>12,.0f}{vs:>12}{engine_is:>12}")
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """A PNG bar chart of tok/s per contender."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = [(k, f["tok_s"]) for k, f in contenders(report) if f.get("tok_s") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar([LABELS[k] for k, _ in rows], [v for _, v in rows], color=[COLORS[k] for k, _ in rows])
    ax.bar_label(bars, labels=[f"{r[1]:,.0f}" for r in rows])
    w = report["workload"]
    ax.set_title(f"workload {w['name']}: {w['num_seqs']} requests, {w['output_tokens']:,} output tokens")
    ax.set_ylabel("output tokens / s")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine_service.bench", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--preset", choices=sorted(PRESETS), help="random weights of that shape (default qwen3-0.6b)"
    )
    model.add_argument("--model", type=Path, help="a Hugging Face checkpoint directory (real weights)")
    p.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where presets are built and reused"
    )
    p.add_argument("--workload", choices=["A", "B"], help="default: the preset's (A for --model)")
    p.add_argument("--num-seqs", type=positive_int, help="number of requests")
    p.add_argument("--max-input-len", type=positive_int, help="upper bound of a prompt's length")
    p.add_argument("--max-output-len", type=positive_int, help="upper bound of a request's max_tokens")
    p.add_argument("--peers", choices=list(PEER_CHOICES), default="none", help="transformers runs to compare")
    p.add_argument("--no-engine", action="store_true", help="measure the peers alone")
    p.add_argument("--repeats", type=positive_int, help="timed runs per contender (default 1 for A, 3 for B)")
    p.add_argument(
        "--peer-timeout", type=positive_float, default=3600.0,
        help="seconds for continuous batching; past them, the repeats that finished give its figure, or with none a "
             "bound (requested tokens over the seconds the timed batch had)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads for every contender alike (default: torch's own choice)",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="engine logs to stderr (INFO shows start-up: graphs captured, decode tile picked)")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart of tok/s here")
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", help="default cuda when available, else cpu")
    engine.add_argument(
        "--dtype", choices=["float64", "float32", "bfloat16", "float16"], help="default: the model's"
    )
    engine.add_argument("--attention-backend")
    engine.add_argument("--kv-cache-dtype", choices=["auto", "fp8"],
                        help="the KV cache's element type (default auto: the model's dtype; fp8: float8 e4m3)")
    engine.add_argument("--max-num-seqs", type=positive_int)
    engine.add_argument("--max-num-batched-tokens", type=positive_int)
    engine.add_argument("--num-kvcache-blocks", type=positive_int)
    engine.add_argument("--kvcache-block-size", type=positive_int)
    engine.add_argument("--max-model-len", type=positive_int)
    engine.add_argument("--enforce-eager", action="store_true")
    engine.add_argument(
        "--overlap-scheduling", choices=["auto", "on", "off"], default="auto",
        help="schedule the next decode step while the current one computes (auto: on for CUDA)",
    )
    engine.add_argument(
        "--fused-ops", choices=["auto", "on", "off"], default="auto",
        help="fused Triton kernels for the norms, RoPE and SiLU (auto: on for CUDA, except in float64)",
    )
    engine.add_argument(
        "--triton-gemm", choices=["on", "off"], default="on",
        help="time Triton GEMM tiles against torch's at start-up and use them at the decode sizes where faster",
    )
    engine.add_argument(
        "--pdl", choices=["on", "off"], default="off",
        help="launch the engine's Triton kernels with programmatic dependent launch (CUDA, Hopper and later)",
    )
    engine.add_argument(
        "--two-batch-overlap", choices=["on", "off"], default="off",
        help="run CUDA-graph decode batches of 32+ as two halves on two streams, one's GEMMs beside the other's "
             "attention",
    )
    args = p.parse_args(argv)
    # Recorded in the report: a figure counts only with the command that reproduces it.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.no_engine and args.peers == "none":
        p.error("--no-engine with --peers none leaves nothing to measure")
    if args.model is not None and not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and workload, run every contender, and return the report."""
    import torch

    preset_name = None if args.model is not None else (args.preset or "qwen3-0.6b")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preset_name is not None:
        preset = PRESETS[preset_name]
        model_dir, dtype, spec = build_preset(preset_name, args.cache_dir), preset.dtype, preset.workload
        config = read_model_config(model_dir)
    else:
        model_dir, config, spec = args.model, read_model_config(args.model), WORKLOAD_A
        dtype = default_dtype(config, device)
    if args.workload is not None:
        spec = {"A": WORKLOAD_A, "B": WORKLOAD_B}[args.workload]
    dtype = args.dtype or dtype
    repeats = args.repeats or (1 if spec is WORKLOAD_A else 3)
    vocab_size = int(config["vocab_size"])

    workload, plan = make_plan(spec, model_dir, device, dtype, vocab_size, repeats,
                               args.num_seqs, args.max_input_len, args.max_output_len)
    report: dict[str, Any] = {
        "workload": {
            "name": workload.name,
            "num_seqs": len(workload.prompts),
            "prompt_tokens": workload.num_prompt_tokens,
            "output_tokens": workload.num_output_tokens,
            "repeats": repeats,
            "seed": 0,  # make_workload's random.Random(0)
        },
        "model": {"preset": preset_name, "dir": str(model_dir), "dtype": dtype, "device": device},
        "command": " ".join(["python -m engine_service.bench", *args.argv]),
        "environment": environment(),
    }
    w = report["workload"]
    print(
        f"workload {w['name']}: {w['num_seqs']} requests, {w['prompt_tokens']:,} prompt tokens, "
        f"{w['output_tokens']:,} output tokens; {preset_name or model_dir} ({dtype}, {device}"
        f"{', fp8 KV cache' if args.kv_cache_dtype == 'fp8' else ''}); "
        f"{repeats} timed run(s) each after a warm-up",
        flush=True,
    )

    report["engine"] = None
    if not args.no_engine:
        report["engine"] = run_engine(plan, engine_kwargs(args)).to_json()
        _progress("engine", report["engine"])
    report["peers"] = {}
    for peer in PEER_CHOICES[args.peers]:
        try:
            result = run_hf_static(plan) if peer == "hf_static" else run_hf_continuous(plan, args.peer_timeout)
        except Exception as exc:  # recorded, so that the figures measured before and after it are still reported
            logging.getLogger(__name__).exception("%s failed", LABELS[peer])
            result = Result(error=peer_error(exc))
        if result.error:  # the traceback held the failed run's tensors until now: free them for the next peer
            from engine_service import bench_peers

            bench_peers.release()
        report["peers"][peer] = result.to_json()
        _progress(peer, report["peers"][peer])

    engine_tok_s = (report["engine"] or {}).get("tok_s")
    report["ratios"] = {
        f"engine_vs_{k}": engine_tok_s / f["tok_s"]
        for k, f in report["peers"].items()
        if engine_tok_s and f.get("tok_s")
    }
    return report


def _progress(key: str, figures: dict[str, Any]) -> None:
    if figures.get("tok_s") is not None:
        print(f"  {LABELS[key]}: {figures['seconds']:.2f} s, {figures['tok_s']:,.0f} tok/s", flush=True)
    else:
        print(f"  {LABELS[key]}: {figures.get('error')}", flush=True)


def environment() -> dict[str, Any]:
    """What a figure depends on besides its command: serving_bench's record (Python and package versions, the commit,
    the machine), with torch's own version string, its CUDA, its CPU threads and the GPU, where there is one."""
    import torch

    from clients.serving_bench import environment as versions_and_commit

    return {
        **versions_and_commit(),
        "torch": torch.__version__,  # with its build ("+cpu", "+cu130"), which the package metadata lacks
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def failed_contenders(report: dict[str, Any]) -> list[str]:
    """The contenders, the engine included, that crashed or made the wrong tokens (a continuous-batching run past
    its time is a bound, not a failure): the command's exit status says so, after the report is written. An engine
    whose figure was withdrawn (requests cut short) exited 0 with no engine figure in the report."""
    contenders = {"engine": report.get("engine") or {}, **report["peers"]}
    return [LABELS[k] for k, f in contenders.items() if f.get("error") and not f.get("info", {}).get("timed_out")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot is not None:
        write_plot(report, args.plot)
    return report


if __name__ == "__main__":
    try:
        failed = failed_contenders(main())
    except ValueError as exc:  # the engine's own checks (a model it cannot load, a setting the device lacks)
        sys.exit(f"bench: {exc}")
    if failed:
        sys.exit(f"bench: {', '.join(failed)} failed (the report says why)")
