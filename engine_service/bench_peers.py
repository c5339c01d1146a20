"""transformers as the benchmark's peers: static batching with `generate` and its continuous batching manager.

Both peers follow `../shared/design/BENCHMARKS.md` ("Peers to run in the same process or script"): the same
weights and dtype as the engine, sampling at the workload's temperature, EOS ignored, and only the requested
tokens counted.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# What we ask for, in order, for continuous batching. transformers 5.24 pages plain "sdpa" itself (its manager
# accepts "sdpa", "paged|eager" or a flash kernel) and strips the "paged|" of the benchmark design's name
# "paged|sdpa" with a deprecation warning; the later names are fallbacks for releases whose loader refuses
# the earlier ones. The name the model ends up with is recorded in the report.
CB_ATTN_CANDIDATES = ("sdpa", "paged|sdpa", "paged|eager")


@dataclass(slots=True)
class PeerRun:
    """One timed run of a peer: wall seconds and the tokens it produced."""

    seconds: float
    requested_tokens: int  # sum of the requests' max_tokens: what the throughput counts
    generated_tokens: int  # what the peer actually computed (static batching pads every row to the longest)
    info: dict[str, Any] = field(default_factory=dict)


class PeerTimeout(RuntimeError):
    """The continuous batching manager did not finish every request within its deadline.

    timed_seconds: how long the timed batch that was cut short had run (from its start to the deadline), or
    None when the deadline passed during set-up or the warm-up, before any timed batch began. runs: the timed
    batches that finished before it, measured figures.
    """

    def __init__(self, message: str, timed_seconds: float | None = None):
        super().__init__(message)
        self.timed_seconds = timed_seconds
        self.runs: list = []


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on CUDA: the clock must stop after the device is done, not after the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generation_config(temperature: float, max_new_tokens: int):
    from transformers import GenerationConfig

    # top_k=0 and top_p=1.0 spell out "no filter": left as None, transformers fills in its default top_k=50,
    # which would make the peer do work the engine is not asked to do.
    return GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )


def load_hf_model(model_dir: str, dtype: torch.dtype, device: str, attn_implementation: str):
    """The checkpoint as a transformers causal LM in eval mode on `device`.

    Its generation_config.json is dropped: generate() fills every field the peer leaves unset from it, so a
    checkpoint's repetition_penalty, no_repeat_ngram_size or EOS (masked until min_new_tokens) would add work the
    engine is not asked to do. _generation_config says everything the peers run with.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation
    )
    model.generation_config = GenerationConfig()
    if model.dtype != dtype:  # a transformers that predates from_pretrained's `dtype` (4.56) ignores it
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} loaded the peer in {model.dtype}, not {dtype}: "
                           "the peers need transformers 4.56 or later")
    return model.to(device).eval()


def release() -> None:
    """Return freed device memory after a contender's last reference is dropped, for the next contender."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Peer 1: static batching


def pad_left(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, max_len] with prompts right-aligned; padding is token 0, masked out."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), mask.to(device)


class _Progress:
    """A logits processor that changes nothing and prints how far generate() has got every `every` tokens
    ("  transformers static: token 256 of 1024 after 41.2 s"), so that a run stopped by a time limit still says
    how fast it went. It runs on the host between steps, which generate() already synchronises."""

    def __init__(self, total: int, start: float, every: int = 128):
        self.total, self.start, self.every, self.done = total, start, every, 0

    def __call__(self, input_ids, scores):
        self.done += 1
        if self.done % self.every == 0 and self.done < self.total:
            print(f"  transformers static: token {self.done} of {self.total} after "
                  f"{time.perf_counter() - self.start:.1f} s", flush=True)
        return scores


@torch.inference_mode()
def hf_static_once(model, prompts: list[list[int]], max_tokens: list[int], temperature: float,
                   progress: bool = False) -> PeerRun:
    """One `generate` over a single left-padded batch of every request, each row run to the longest max_tokens.
    progress: print how far it has got every 128 tokens (_Progress)."""
    from transformers import LogitsProcessorList

    device = model.device
    longest = max(max_tokens)
    config = _generation_config(temperature, longest)
    # min_new_tokens = max_new_tokens: with EOS gone every row runs the full length, as the benchmark specifies.
    config.min_new_tokens = longest
    input_ids, mask = pad_left(prompts, device)
    _sync(device)
    start = time.perf_counter()
    processors = LogitsProcessorList([_Progress(longest, start)] if progress else [])
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                         logits_processor=processors)
    _sync(device)
    seconds = time.perf_counter() - start
    new_tokens = out.shape[1] - input_ids.shape[1]
    return PeerRun(
        seconds=seconds,
        requested_tokens=sum(max_tokens),
        generated_tokens=new_tokens * out.shape[0],
        info={"new_tokens_per_row": new_tokens},
    )


# --------------------------------------------------------------------------------------------------------------
# Peer 2: continuous batching


def load_cb_model(model_dir: str, dtype: torch.dtype, device: str):
    """Load the model with the first continuous-batching attention this transformers accepts.

    Returns (model, requested name, name the model ended up with).
    """
    errors = []
    for name in CB_ATTN_CANDIDATES:
        try:
            model = load_hf_model(model_dir, dtype, device, name)
        except (ValueError, ImportError, KeyError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        return model, name, model.config._attn_implementation
    raise RuntimeError("no continuous-batching attention implementation loads: " + "; ".join(errors))


def _cb_wait(manager, prompts, max_tokens, tag: str, deadline: float) -> dict[str, int]:
    """Add every request to a started manager and wait for all; returns request id -> tokens generated."""
    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        # eos_token_id=-1 is the manager's "no EOS" value; None would fall back to the generation config.
        manager.add_request(prompt, request_id=f"{tag}-{i}", max_new_tokens=n, eos_token_id=-1)
    while len(done) + len(failed) < len(prompts):
        if time.perf_counter() > deadline:
            raise PeerTimeout(f"continuous batching finished {len(done)} of {len(prompts)} requests in time")
        # A short poll so that the deadline and a dead generation thread are both noticed promptly.
        result = manager.get_result(timeout=1.0)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("the continuous batching thread stopped before every request finished")
            continue
        if not result.is_finished():
            continue
        if result.error is not None:
            failed[result.request_id] = str(result.error)
        else:
            done[result.request_id] = len(result.generated_tokens)
    if failed:
        rid, error = next(iter(failed.items()))
        raise RuntimeError(f"continuous batching failed {len(failed)} requests, e.g. {rid}: {error}")
    return done


def cb_cache_config(model, batches: list[tuple[list[list[int]], list[int]]]):
    """The continuous batching manager's settings: its own defaults (None) on a GPU; on the CPU, a cache of
    twice the blocks the largest batch holds at once.

    transformers sizes the cache from the device's free memory, and on the CPU that is 60-90% of the machine's
    RAM, written in full: two benchmarks at once (the test suite's two workers) took 12-15 GB each on a 24 GiB
    machine and the kernel killed one. Twice the blocks every request of a batch needs (prompt and output
    together) leaves the manager's admission margin room: it never waits for a block the default would have had.
    """
    if model.device.type != "cpu":
        return None
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # a transformers before the setting: the manager sizes its cache as it always did
        return None

    page = ContinuousBatchingConfig().page_size
    needed = max(sum(-(-(len(p) + n) // page) for p, n in zip(prompts, max_tokens, strict=True))
                 for prompts, max_tokens in batches)
    return ContinuousBatchingConfig(num_blocks=2 * needed)


# Not under torch.inference_mode: the manager's cache tensors would become inference tensors here, and its
# generation thread (outside inference mode) updates them in place, which transformers 5.17 then refuses
# ("Inplace update to inference tensor outside InferenceMode"). The manager turns gradients off itself.
def hf_continuous_runs(
    model,
    warmup: tuple[list[list[int]], list[int]],
    batches: list[tuple[list[list[int]], list[int]]],
    temperature: float,
    timeout_s: float,
) -> list[PeerRun]:
    """One continuous batching manager: the warm-up requests, then each batch timed on its own.

    The manager's setup (cache allocation, warm-up, start of its thread) is outside the clock, as the engine's
    construction is. Raises PeerTimeout when everything is not done within `timeout_s` of the start; its
    timed_seconds says how long the batch it cut short had (the rest went to set-up and the warm-up).
    """
    longest = max(max(n) for _, n in [warmup, *batches])
    # Passed only where set: the GPU machine's transformers (5.17) may not take the keyword, and needs no cap.
    cache = cb_cache_config(model, [warmup, *batches])
    manager = model.init_continuous_batching(generation_config=_generation_config(temperature, longest),
                                             **({"continuous_batching_config": cache} if cache is not None else {}))
    deadline = time.perf_counter() + timeout_s
    runs = []
    try:
        # warmup() builds the paged cache and batch processor (and captures graphs on CUDA) that start() would
        # otherwise build inside the timed region; transformers' own generate_batch warms up the same way.
        manager.warmup()
        cb_config = manager.continuous_batching_config
        cache_info = {k: getattr(cb_config, k, None) for k in ("num_blocks", "page_size", "max_batch_tokens")}
        # The manager may switch attention (to flash, where installed) and restores it on stop(): record what ran.
        cache_info["attn_implementation_running"] = model.config._attn_implementation
        manager.start()
        _cb_wait(manager, *warmup, tag="warmup", deadline=deadline)
        for r, (prompts, max_tokens) in enumerate(batches):
            start = time.perf_counter()
            try:
                done = _cb_wait(manager, prompts, max_tokens, tag=f"run{r}", deadline=deadline)
            except PeerTimeout as exc:
                # A batch that began at or after the deadline (the warm-up's or the previous batch's last result
                # came late) had no time at all: it bounds nothing, where deadline - start would be negative.
                exc.timed_seconds = deadline - start if deadline > start else None
                exc.runs = list(runs)
                raise
            _sync(model.device)
            seconds = time.perf_counter() - start
            wrong = sum(done[f"run{r}-{i}"] != n for i, n in enumerate(max_tokens))
            runs.append(
                PeerRun(
                    seconds=seconds,
                    requested_tokens=sum(max_tokens),
                    generated_tokens=sum(done.values()),
                    info={"requests_with_wrong_length": wrong, **cache_info},
                )
            )
    finally:
        # On a timeout or a crash the thread must not outlive the benchmark: stop it hard, then free its cache.
        manager.stop(block=True, timeout=30, hard_stop=True)
        manager.destroy()
    return runs
