"""Runs the model for one scheduled batch: builds flat inputs, owns the KV cache, samples on the device.

Per step: token ids, positions, slot mapping, cumulative query lengths, context lengths and block tables
are built on the host in one pass over the batch and copied to the device without waiting for it
(host_copy.py). launch() enqueues the forward pass and sampling and returns at once; collect() is the step's
one wait, for the sampled tokens. On CUDA, pure-decode steps replay captured graphs (cuda_graphs.py).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine_service import pdl
from engine_service.attention import (
    AttentionMetadata,
    check_triton_usable,
    compiled_triton,
    kv_cache_torch_dtype,
    longest_first,
    make_backend,
    resolve_backend_name,
    triton_interpreted,
)
from engine_service.config import EngineConfig
from engine_service.host_copy import on_device, rows_to_device, to_device
from engine_service.model.config import ModelConfig
from engine_service.model.decoder import DecoderForCausalLM, kv_heads_per_rank
from engine_service.model.layers import TPInfo
from engine_service.model.loader import load_weights
from engine_service.outputs import TokenLogprobs
from engine_service.penalties import Penalties
from engine_service.sampler import LogprobRows, Sampler, SamplingRow, top_logprobs
from engine_service.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One step's flat inputs as plain lists, built on the host."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]
    num_decode: int
    # ids are rows of the previous step's sampled tokens, still on the device (a batch scheduled ahead).
    ids_from_previous: bool = False
    # A batch scheduled ahead with prompt chunks: ids[gather_rows[i]] is row gather_src[i] of the previous step's
    # sampled tokens (its decode rows' inputs); the other ids are token ids.
    gather_rows: list[int] = field(default_factory=list)
    gather_src: list[int] = field(default_factory=list)
    # Rows whose logits give prompt logprobs (Sequence.prompt_logprob_positions), in batch order: the prompt token
    # each predicts, and how many most likely tokens its request asked for.
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_k: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Launched:
    """A step whose forward pass and sampling are enqueued; ModelRunner.collect waits for its tokens."""

    sampled: torch.Tensor | None  # [2, N] int64 on the device: token ids, 1 where the logits were finite
    host: torch.Tensor | None  # the same, copied to (pinned) host memory asynchronously
    done: torch.cuda.Event | None  # recorded after that copy (CUDA only)
    logprobs: LogprobRows | None = None  # of the rows that asked, in host memory once `done` (CUDA: pinned)
    prompt_logprobs: LogprobRows | None = None  # of StepInputs.prompt_rows, the same way


@dataclass(slots=True)
class Collected:
    """A step's results, in host memory."""

    tokens: list[int]  # one per sampled row
    finite: list[bool]  # whether each sampled row's logits were finite
    logprobs: list[TokenLogprobs | None] | None  # per sampled row (None where it did not ask); None if none asked
    prompt_logprobs: LogprobRows | None  # of StepInputs.prompt_rows (rows 0, 1, ...), in host memory


DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _add_prompt_rows(x: StepInputs, seq, start: int, n: int, first_row: int) -> None:
    """Add to x the rows of seq's chunk [start, start + n) (hidden rows from first_row on) that give prompt logprobs."""
    where = seq.prompt_logprob_positions(start, start + n)
    if where:
        x.prompt_rows.extend(range(first_row + where.start - start, first_row + where.stop - start))
        x.prompt_targets.extend(seq.token_ids[where.start + 1 : where.stop + 1])
        x.prompt_k.extend([seq.params.prompt_logprobs] * len(where))


def _round_up(x: float, digits: int = 3) -> float:
    """x rounded up to `digits` significant digits, for a setting an error message says to raise to."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device, model_cfg: ModelConfig) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # half precision is slow on CPU, and float32 is what tests compare against
    # On GPU: the checkpoint's half-precision type, bf16 for anything wider.
    return torch.float16 if model_cfg.torch_dtype == "float16" else torch.bfloat16


# torch's default dtype is process-wide: engines built from two threads at once take turns.
_DEFAULT_DTYPE_LOCK = threading.Lock()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in the model's dtype (no float32 copy first) while this is held."""
    with _DEFAULT_DTYPE_LOCK:
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def resolve_fused_ops(wanted: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the model runs fused_ops' Triton kernels (EngineConfig.fused_ops; None: where they compile, and
    never in float64, whose runs are for exactness while the kernels compute in float32)."""
    if wanted is None:
        return compiled_triton(device) and dtype != torch.float64
    if not wanted:
        return False
    if dtype == torch.float64:
        raise ValueError("fused_ops=True computes in float32, which would break float64's exactness; use "
                         "dtype float32/bfloat16/float16, or leave fused_ops None (off in float64)")
    check_triton_usable("fused_ops=True", device, "pass fused_ops=False")
    if device.type != "cuda" and not triton_interpreted():
        raise ValueError("fused_ops=True on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton is imported, or leave fused_ops None (off on CPU)")
    return True


# A container's memory limit: cgroup v2's memory.max ("max" when unlimited), then cgroup v1's limit_in_bytes (a
# number near 2**63 when unlimited), as Kubernetes nodes on either version set a pod's limits.memory.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _host_memory_bytes(limit_files: tuple[str, ...] = CGROUP_MEMORY_LIMITS) -> int | None:
    """This machine's memory as a process may use it: its physical RAM, or a cgroup memory limit below that; None
    where neither can be read."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        memory = None
    for path in limit_files:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = int(limit) if memory is None else min(memory, int(limit))
    return memory


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int, tp: TPInfo):
        self.config = config
        self.model_cfg = model_cfg
        self.tp = tp
        # True from the moment a step is sent to the tensor-parallel workers until rank 0 has issued every
        # collective of its forward pass: a failure in between leaves the ranks out of step; one after it (the
        # sampler, rank 0's alone) does not.
        self.ranks_in_step = False
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", tp.rank)
        self.dtype = resolve_dtype(config.dtype, self.device, model_cfg)
        self.block_size = config.kvcache_block_size
        self.max_model_len = max_model_len
        self.backend_name = resolve_backend_name(config.attention_backend, self.device, self.block_size,
                                                 config.kv_cache_dtype, self.dtype)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.backend = make_backend(self.backend_name, self.device)
        self.fused_ops = resolve_fused_ops(config.fused_ops, self.device, self.dtype)
        pdl.enable(self.device, config.pdl)  # before any kernel is compiled: PDL is one of their constexprs
        if tp.rank == 0:
            self._check_penalty_slots_fit()  # before the weights load: a setting no memory holds fails at once
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = DecoderForCausalLM(model_cfg, tp, self._rope_positions(), self.dtype, self.fused_ops)
        load_weights(self.model, config.model, model_cfg.tie_word_embeddings)
        self.model.eval()
        # Only rank 0 samples; its penalty counts are allocated before the warm-up measures the peak.
        penalties = Penalties(config.max_num_seqs, model_cfg.vocab_size, self.device) if tp.rank == 0 else None
        self.sampler = Sampler(self.device, config.seed, penalties=penalties)
        if self.device.type == "cuda" and self.backend_name == "triton" and self.dtype in (torch.float16,
                                                                                          torch.bfloat16):
            self._tune_prefill_attention()  # before the warm-up, which then compiles the picked tile's variants
        self._warmup_peak_bytes = self._warm_up() if self.device.type == "cuda" else 0
        self.num_blocks = tp.min_int(self._decide_num_blocks())  # every rank must agree on the pool
        servable = self.num_blocks * self.block_size + 1  # no sequence outgrows the pool (its last token takes no slot)
        if self.max_model_len > servable:
            # The RoPE table, the graphs' block tables and their plans need no more positions than that (the engine
            # lowers a model's default max_model_len to it, and refuses requests that could grow past it). Before
            # anything captures the table's address.
            self.max_model_len = servable
            self.model.rotary.keep_positions(servable)
        kv_heads = kv_heads_per_rank(model_cfg, tp)
        shape = (model_cfg.num_hidden_layers, self.num_blocks, self.block_size, kv_heads, model_cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(self.k_cache[i], self.v_cache[i]) for i in range(model_cfg.num_hidden_layers)]
        log.info(
            "model runner: device=%s dtype=%s backend=%s fused ops=%s kv blocks=%d x %d tokens (%s)",
            self.device,
            self.dtype,
            self.backend_name,
            self.fused_ops,
            self.num_blocks,
            self.block_size,
            self.kv_dtype,
        )
        if self.device.type == "cuda" and self.backend_name == "triton":
            self._tune_decode_attention()
        if (config.triton_gemm and self.device.type == "cuda" and not config.enforce_eager
                and self.backend_name == "triton" and tp.size == 1 and self.dtype in (torch.float16, torch.bfloat16)
                and compiled_triton(self.device)):
            self._tune_decode_gemms()
        # Pure-decode steps replay CUDA graphs captured here (see cuda_graphs.py); None runs them eagerly.
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from engine_service.cuda_graphs import build_decode_graphs

            self.graphs = build_decode_graphs(self)  # again without two-batch overlap where that failed
            if self.graphs is None and self._decode_gemm_picks():
                # The failed capture or self-check may be the Triton GEMMs' doing: graphs with torch's GEMMs beat
                # eager decode with ours by far, and eager decode should not run an unverified kernel either.
                log.warning("CUDA graphs failed with the decode GEMMs of our own; capturing again with torch's")
                self._drop_decode_gemms()
                self.graphs = build_decode_graphs(self, two_batch_overlap=False)
        if self.device.type == "cuda" and self.backend_name == "triton" and self.graphs is None:
            self._warm_up_eager_decode()

    def _tune_prefill_attention(self) -> None:
        """Pick the Triton prefill tile for this model on this device by timing the candidates on one full mixed
        step (max_num_batched_tokens, at most 8,192: up to half of max_num_seqs decode rows over 512 keys, and
        prompts of 512 tokens) over a scratch cache of just its blocks, before the warm-up. Start-up logs the
        timings."""
        from engine_service.attention.triton_kernels import (
            PREFILL_TILE_ENV,
            prefill_tuning_blocks,
            tune_prefill_tile,
        )

        start = time.perf_counter()
        heads = self.model_cfg.num_attention_heads // self.tp.size
        tokens = min(self.config.max_num_batched_tokens, 8192)
        prompt = max(1, min(512, self.max_model_len, tokens))
        decode_rows, decode_len = min(self.config.max_num_seqs // 2, tokens // 8), prompt
        blocks = prefill_tuning_blocks(tokens, prompt, decode_rows, decode_len, self.block_size)
        shape = (blocks, self.block_size, kv_heads_per_rank(self.model_cfg, self.tp), self.model_cfg.head_dim)
        try:
            with on_device(self.device):
                k, v = (torch.empty(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2))
                picked, timings = tune_prefill_tile(k, v, heads, tokens, prompt, decode_rows, decode_len, self.dtype)
                del k, v
        except Exception as exc:
            if isinstance(exc, ValueError) and os.environ.get(PREFILL_TILE_ENV):
                raise  # a malformed LLMSERVE_PREFILL_TILE: the operator asked for something that cannot be
            # An optimisation: serve with the default tile rather than not at all.
            log.exception("timing the prefill attention tiles failed; the default tile stays")
            return
        if not timings:
            log.info("prefill attention tile (BLOCK_M, BLOCK_N, stages, warps) %s, pinned by the environment", picked)
            return
        found = ", ".join(f"{t}: {us:.0f} us" if isinstance(us, float) else f"{t}: {us}" for t, us in timings.items())
        if picked is None:
            log.warning("no prefill attention tile passed (%s); the default stays", found)
            return
        log.info("prefill attention tile (BLOCK_M, BLOCK_N, stages, warps) %s, picked in %.1f s on a %d-token step "
                 "(%d decode rows over %d keys, prompts of %d): %s", picked, time.perf_counter() - start, tokens,
                 decode_rows, decode_len, prompt, found)

    def _tune_decode_attention(self) -> None:
        """Pick the Triton decode tile for this model on this device by timing the candidates on a full
        decode batch (max_num_seqs sequences of 1,024 keys on average, spread from 128 to 1,920, launched
        longest first) over the real KV cache, before any graph is captured. Start-up logs the timings."""
        from engine_service.attention.triton_kernels import (
            decode_order_pays,
            decode_order_timings,
            tune_decode_tile,
        )

        start = time.perf_counter()
        heads = self.model_cfg.num_attention_heads // self.tp.size
        context = max(1, min(self.max_model_len * 8 // 15, 1024))  # its spread reaches 15/8 of it
        try:
            with on_device(self.device):
                picked, timings = tune_decode_tile(
                    self.k_cache[0], self.v_cache[0], heads, self.config.max_num_seqs, context, self.dtype
                )
        except ValueError:
            raise  # a malformed LLMSERVE_DECODE_TILE: the operator asked for something that cannot be
        except Exception:  # tuning is an optimisation: serve with the default tile rather than not at all
            log.exception("timing the decode attention tiles failed; the default tile stays")
            return
        seconds = time.perf_counter() - start
        if not timings:
            log.info("decode attention tile (BLOCK_N, stages, warps, heads_first) %s, pinned by the environment", picked)
            return
        # K and V bytes one call reads: what the timings say about the memory rate the kernel reaches.
        kv_bytes = 2 * self.k_cache[0].element_size() * self.config.max_num_seqs * context * (
            self.k_cache.shape[-2] * self.k_cache.shape[-1])
        found = ", ".join(
            f"{t}: failed" if us is None else f"{t}: {us:.0f} us ({kv_bytes / us / 1e3:,.0f} GB/s)"
            for t, us in timings.items()
        )
        if picked is None:
            log.warning("no decode attention tile could be timed (%s); the default stays", found)
            return
        log.info(
            "decode attention tile (BLOCK_N, stages, warps, heads_first) %s, picked in %.1f s on %d "
            "sequences of %d keys on average: %s",
            picked, seconds, self.config.max_num_seqs, context, found,
        )
        q = torch.empty(1, heads, self.k_cache.shape[-1], dtype=self.dtype, device="meta")  # only its shape
        order = decode_order_timings(q, self.k_cache[0])
        if order is not None:
            log.info("decode attention launched longest first %.0f us, in batch order %.0f us: %s", *order,
                     "decode steps launch longest first" if decode_order_pays(q, self.k_cache[0]) else
                     "decode steps keep batch order")

    def _tune_decode_gemms(self) -> None:
        """Time Triton GEMM tiles against torch's for the four GEMMs of a layer at every batch size CUDA graphs
        capture, over the model's own weights, and use a tile where it is faster (model/gemm.py). Before
        capture, which records whichever GEMM each size uses. Start-up logs what was picked."""
        from engine_service.cuda_graphs import TWO_BATCH_MIN_SIZE, capture_sizes
        from engine_service.model.gemm import describe, tune_decode_gemms

        groups = self.decode_linear_groups()
        sizes = capture_sizes(self.config.max_num_seqs)
        if self.config.two_batch_overlap:  # the halved sizes run torch's GEMMs (cuda_graphs.gemm_picks_off)
            sizes = [s for s in sizes if s < TWO_BATCH_MIN_SIZE]
        start = time.perf_counter()
        try:
            with torch.inference_mode(), on_device(self.device):
                found = tune_decode_gemms(groups, sizes)
        except Exception:  # an optimisation: serve with torch's GEMMs rather than not at all
            log.exception("timing the decode GEMMs failed; torch's GEMMs stay")
            self._drop_decode_gemms()
            return
        log.info("decode GEMMs timed in %.1f s", time.perf_counter() - start)
        for shape in found:
            log.info("%s", describe(shape))

    def decode_linear_groups(self) -> dict[str, list]:
        """A layer's four GEMMs, each with every layer's linear of that shape."""
        layers = self.model.layers
        return {
            "qkv": [layer.self_attn.qkv_proj for layer in layers],
            "o": [layer.self_attn.o_proj for layer in layers],
            "gate_up": [layer.mlp.gate_up_proj for layer in layers],
            "down": [layer.mlp.down_proj for layer in layers],
        }

    def _decode_linears(self) -> list:
        return [linear for group in self.decode_linear_groups().values() for linear in group]

    def _decode_gemm_picks(self) -> bool:
        return any(linear.gemms for linear in self._decode_linears())

    def _drop_decode_gemms(self) -> None:
        for linear in self._decode_linears():
            linear.gemms = None

    def _warm_up_eager_decode(self) -> None:
        """Where decode runs eagerly (enforce_eager, tensor parallelism, graphs turned off by a failed capture
        or self-check), compile the decode attention for every split-KV count a batch of 1 to max_num_seqs
        sequences can pick, so that none compiles inside a step. Graph capture does this for its own sizes; eager batches meet more
        counts (on an H200 with 8 KV heads, batch 3 splits 11 ways, batch 5 seven).

        One forward per count, at the smallest batch that picks it: one key per sequence, read from block 0,
        and padding slots (-1), so the KV cache is read but never written.
        """
        from engine_service.attention.triton_kernels import default_num_kv_splits

        start = time.perf_counter()
        kv_heads = kv_heads_per_rank(self.model_cfg, self.tp)
        # Tensor-parallel ranks run these forwards (and their all-reduces) in step, so they must find the same
        # batches: the split counts depend on the device's SM count, so ranks must be the same GPU model.
        first_batch: dict[int, int] = {}
        for b in range(1, self.config.max_num_seqs + 1):
            first_batch.setdefault(default_num_kv_splits(b, kv_heads, 1, self.device), b)
        with torch.inference_mode(), on_device(self.device):
            for b in first_batch.values():
                ids = torch.zeros(b, dtype=torch.long, device=self.device)
                meta = self._metadata([1] * b, [1] * b, [[0]] * b, [-1] * b, b)
                self.model(ids, torch.zeros_like(ids), self.kv_caches, meta, self.backend)
            torch.cuda.synchronize(self.device)
        log.info("eager decode: attention compiled for split-KV counts %s (batches %s) in %.1f s",
                 sorted(first_batch), sorted(first_batch.values()), time.perf_counter() - start)

    # ---- KV-cache sizing -----------------------------------------------------------------------
    def _rope_positions(self) -> int:
        """Rows of the RoPE table to build: max_model_len, but no more than a pool could ever hold for one sequence
        (the given num_kvcache_blocks; the cpu_kvcache_gib cap; a GPU's whole memory) nor fewer than the warm-up's
        prompts. A long-context model's default (max_position_embeddings 1,010,000, say) built a table of every
        position, and a config's absurd one failed with a bare allocation error, before the pool was sized."""
        if self.config.num_kvcache_blocks is not None:
            blocks = self.config.num_kvcache_blocks
        elif self.device.type == "cuda":
            blocks = torch.cuda.get_device_properties(self.device).total_memory // self.block_bytes()
        else:
            blocks = int(self.config.cpu_kvcache_gib * 2**30) // self._host_block_bytes()
        bound = max(blocks * self.block_size + 1, self.config.max_num_batched_tokens)
        return min(self.max_model_len, bound)

    def block_bytes(self) -> int:
        """K and V bytes of one block on this rank."""
        cfg = self.model_cfg
        per_token = 2 * cfg.num_hidden_layers * kv_heads_per_rank(cfg, self.tp) * cfg.head_dim
        return per_token * self.block_size * torch.tensor([], dtype=self.kv_dtype).element_size()

    def _host_block_bytes(self) -> int:
        """K and V bytes of one block over every rank: on the CPU they all hold their pools in this machine's
        memory, so cpu_kvcache_gib and the memory check count this, not one rank's share."""
        return self.block_bytes() * self.tp.size

    def _decide_num_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            if self.device.type == "cuda":
                self._check_gpu_blocks_fit(self.config.num_kvcache_blocks)
            else:
                self._check_cpu_blocks_fit(self.config.num_kvcache_blocks)
            return self.config.num_kvcache_blocks
        if self.device.type == "cuda":
            return self._gpu_num_blocks()
        # CPU default: max_num_seqs full-length sequences, capped by cpu_kvcache_gib.
        want = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
        gib = self.config.cpu_kvcache_gib
        block = self._host_block_bytes()
        ranks = f" on {self.tp.size} ranks" if self.tp.size > 1 else ""
        cap = int(gib * 2**30) // block
        if cap < 1:  # one block anyway would break the cap, and serve sequences of block_size + 1 tokens at most
            raise ValueError(
                f"cpu_kvcache_gib={gib} holds no KV block: one block of {self.block_size} tokens takes "
                f"{block / 2**20:.3g} MiB{ranks}; raise cpu_kvcache_gib to at least "
                f"{_round_up(block / 2**30)} (one block), "
                f"{_round_up(self._one_sequence_bytes() * self.tp.size / 2**30)} to hold one sequence of max_model_len "
                f"{self.max_model_len} tokens, or set num_kvcache_blocks"
            )
        return min(want, cap)

    def _check_penalty_slots_fit(self) -> None:
        """max_num_seqs penalty slots (penalties.py: a vocabulary of int32 counts and bool marks each, allocated at
        start-up) that take more than the device's whole memory (a GPU's; on the CPU, _host_memory_bytes) are refused
        naming max_num_seqs: they failed with the allocator's bare "can't allocate memory", or past 2**63 bytes a
        TypeError from torch.zeros."""
        seqs, vocab = self.config.max_num_seqs, self.model_cfg.vocab_size
        memory = (torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda"
                  else _host_memory_bytes())
        need = seqs * vocab * 5
        if memory is not None and need > memory:
            gib, where = 2**30, "the GPU" if self.device.type == "cuda" else "this machine"
            raise ValueError(
                f"max_num_seqs={seqs} does not fit in {where}'s memory: the sampler's penalty slots (5 bytes per "
                f"vocabulary entry, {vocab} entries, per sequence) take {need / gib:.3g} GiB and {where} has "
                f"{memory / gib:.3g} GiB, which "
                f"{memory // (vocab * 5)} sequences would fill; lower max_num_seqs well below that (the default is "
                f"256)")

    def _check_cpu_blocks_fit(self, blocks: int) -> None:
        """An explicit num_kvcache_blocks on the CPU: refused when the pool of every rank on this machine takes more
        than its memory (the smaller of its RAM and a cgroup's limit). Allocating it failed with the allocator's bare
        "can't allocate memory" (or, past 2**63 bytes, a TypeError from torch.zeros); one that the kernel overcommits
        is killed by the out-of-memory killer as it is filled. A pool that fits but leaves too little for the
        weights is not caught here."""
        memory = _host_memory_bytes()
        need = blocks * self._host_block_bytes()
        if memory is not None and need > memory:
            fits = memory // self._host_block_bytes()
            gib = 2**30
            if fits < 1:  # "well below 0" was no advice: the block itself is too large
                raise ValueError(
                    f"kvcache_block_size={self.block_size} is too large for this machine: one block of K and V takes "
                    f"{self._host_block_bytes() / gib:.3g} GiB and the machine has {memory / gib:.3g} GiB; lower "
                    f"kvcache_block_size (the default is 16)")
            raise ValueError(
                f"num_kvcache_blocks={blocks} does not fit in this machine's memory: the KV cache takes "
                f"{need / gib:.3g} GiB (K and V{f' on {self.tp.size} ranks' if self.tp.size > 1 else ''}) and the "
                f"machine has {memory / gib:.3g} GiB, which {fits} blocks would fill; set num_kvcache_blocks well "
                f"below {fits}, or leave it unset to size the pool from cpu_kvcache_gib")

    def _one_sequence_bytes(self) -> int:
        """KV bytes of one max_model_len sequence (its last token, sampled, takes no slot)."""
        return max(1, -(-(self.max_model_len - 1) // self.block_size)) * self.block_bytes()

    def _gpu_budget(self, util: float) -> tuple[float, int, int]:
        """Bytes left for the KV cache in `util` of the device after other processes and the warm-up's peak
        (_warm_up: the weights and a full step's activations); with the device's total and other processes' use."""
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return total * util - used_by_others - self._warmup_peak_bytes, total, used_by_others

    def _check_gpu_blocks_fit(self, blocks: int) -> None:
        """An explicit num_kvcache_blocks on a GPU: refused when the pool and a full step's activations cannot
        both fit in the whole device. Allocating it would fail with torch's bare out-of-memory error, or, when the
        pool alone fits, the first full prefill step would fail mid-serving."""
        budget, total, used_by_others = self._gpu_budget(1.0)
        fits = max(0, int(budget) // self.block_bytes())
        if blocks > fits:
            gib = 2**30
            raise ValueError(
                f"num_kvcache_blocks={blocks} does not fit on the device: it takes "
                f"{blocks * self.block_bytes() / gib:.2f} GiB, and of the device's {total / gib:.2f} GiB other "
                f"processes use {used_by_others / gib:.2f} GiB and the model's weights with a full step's activations "
                f"(the warm-up's peak) {self._warmup_peak_bytes / gib:.2f} GiB, which leaves room for {fits} blocks; "
                f"set num_kvcache_blocks to at most {fits}, or leave it unset to size the pool from "
                f"gpu_memory_utilization")

    def _gpu_num_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the device, after the warm-up's peak (_warm_up)."""
        util = self.config.gpu_memory_utilization
        budget, total, used_by_others = self._gpu_budget(util)
        blocks = int(budget) // self.block_bytes()
        if blocks < 1:
            gib = 2**30
            need = (used_by_others + self._warmup_peak_bytes + self._one_sequence_bytes()) / total
            what = (f"no GPU memory left for the KV cache: gpu_memory_utilization={util} allows "
                    f"{total * util / gib:.2f} GiB of the device's {total / gib:.2f} GiB; other processes use "
                    f"{used_by_others / gib:.2f} GiB and the model's weights with the warm-up's peak (a "
                    f"{sum(self.warmup_prompts())}-token step: max_num_batched_tokens "
                    f"{self.config.max_num_batched_tokens}, max_num_seqs {self.config.max_num_seqs}) "
                    f"{self._warmup_peak_bytes / gib:.2f} GiB, which leaves {budget / gib:.2f} GiB, less than one "
                    f"KV block ({self.block_bytes() / 2**20:.3g} MiB). One sequence of max_model_len "
                    f"{self.max_model_len} tokens needs {self._one_sequence_bytes() / gib:.3g} GiB of KV cache")
            if need <= 1:
                raise ValueError(f"{what}: raise gpu_memory_utilization to at least {_round_up(need, 2)}")
            raise ValueError(f"{what}, more than the whole device leaves: lower max_num_batched_tokens or "
                             f"max_num_seqs (the warm-up's peak) or max_model_len, set kv_cache_dtype='fp8', raise "
                             f"tensor_parallel_size, or free the device")
        return blocks

    # Query lengths of the warm-up's short prefills: attention kernels choose their query tile by a step's
    # longest query (times the GQA ratio), so these reach every tile a step can pick.
    WARMUP_QUERY_LENS = (2, 3, 5, 9, 17, 33)

    def _warm_up(self) -> int:
        """Run, before serving, what a step would otherwise compile or allocate for the first time inside a
        timed step, on a throwaway cache; return the peak memory it allocated (it sizes the KV cache).

        - a forward at the full token budget: the largest activations. A step fills its budget with prompt chunks
          of up to max_model_len tokens each, so a budget above max_model_len is warmed up as several prompts
          (warmup_prompts): one prompt of max_model_len measured a fraction of a full step's peak, and the KV
          cache sized from it left a full step short of memory;
        - short prefills (WARMUP_QUERY_LENS): each query tile of the attention kernels is compiled;
        - the sampler on max_num_seqs rows of logits (Sampler.warm_up).
        """
        start = time.perf_counter()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        prompts = self.warmup_prompts()
        n, longest = sum(prompts), max(prompts)
        kv_heads = kv_heads_per_rank(self.model_cfg, self.tp)
        blocks = sum(-(-q // self.block_size) for q in prompts)
        shape = (blocks, self.block_size, kv_heads, self.model_cfg.head_dim)
        caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),) * 2
        ] * self.model_cfg.num_hidden_layers
        rows = self.config.max_num_seqs
        with torch.inference_mode(), on_device(self.device):
            for lens in (prompts, *([q] for q in self.WARMUP_QUERY_LENS if q < longest)):
                ids = torch.zeros(sum(lens), dtype=torch.long, device=self.device)
                pos = torch.cat([torch.arange(q, device=self.device) for q in lens])
                tables, slots, first = [], [], 0  # each prompt in blocks of its own
                for q in lens:
                    q_blocks = -(-q // self.block_size)
                    tables.append(list(range(first, first + q_blocks)))
                    slots.extend(range(first * self.block_size, first * self.block_size + q))
                    first += q_blocks
                meta = self._metadata(lens, lens, tables, slots, 0)
                hidden = self.model(ids, pos, caches, meta, self.backend)
            logits = self.model.compute_logits(hidden[-1:].expand(rows, -1).contiguous())
            self.sampler.warm_up(logits)
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del caches, hidden, logits
        log.info("warm-up: a %d-token forward (%d prompts), %d short prefills and the sampler on %d rows in %.1f s; "
                 "peak %.2f GiB", n, len(prompts), sum(q < longest for q in self.WARMUP_QUERY_LENS), rows,
                 time.perf_counter() - start, peak / 2**30)
        return peak

    def warmup_prompts(self) -> list[int]:
        """The prompt lengths of the warm-up's full step: the token budget (at most max_num_seqs sequences of
        max_model_len) in prompts of max_model_len, the last one the remainder."""
        n = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        return [min(self.max_model_len, n - start) for start in range(0, n, self.max_model_len)]

    # ---- one step --------------------------------------------------------------------------------
    def _metadata(self, q_lens, ctx_lens, tables, slots, num_decode_seqs) -> AttentionMetadata:
        dev = self.device
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        max_q = max(q_lens)
        order = None
        if max_q == 1 and self.backend_name == "triton":  # decode: launch the longest sequences first
            order = to_device(longest_first(ctx_lens), torch.int32, dev)
        return AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, dev),
            cu_seqlens_q=to_device(cu, torch.int32, dev),
            context_lens=to_device(ctx_lens, torch.int32, dev),
            # padded with 0, which keeps gathers in range; masked anyway
            block_tables=rows_to_device(tables, max(len(t) for t in tables), torch.int32, dev),
            num_decode_seqs=num_decode_seqs,
            max_seqlen_q=max_q,
            max_context_len=max(ctx_lens),
            block_size=self.block_size,
            q_lens=list(q_lens),
            ctx_lens=list(ctx_lens),
            seq_order=order,
        )

    @staticmethod
    def step_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
        """Flatten a scheduled batch into plain lists (what tensor-parallel workers are sent).

        A batch scheduled ahead (batch.input_rows set) is built before the previous step's tokens are
        appended: each sequence computes position len(seq), and `ids` holds the rows of the previous step's
        sampled tokens that are its inputs (ids_from_previous).
        """
        bs = block_size
        x = StepInputs([], [], [], [], [], [], [], 0)
        if batch.input_rows is not None and batch.starts is None:
            for seq in batch.seqs:
                pos = len(seq)
                table = seq.block_table
                x.positions.append(pos)
                x.slots.append(table[pos // bs] * bs + pos % bs)
                x.ctx_lens.append(pos + 1)
                x.tables.append(table)
            n = len(batch.seqs)
            x.ids = list(batch.input_rows)
            x.q_lens = [1] * n
            x.sample_rows = list(range(n))
            x.num_decode = n
            x.ids_from_previous = True
            return x
        starts, sources = batch.starts, batch.input_rows  # set on a batch scheduled ahead with prompt chunks
        for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True)):
            start = seq.num_computed_tokens if starts is None else starts[i]
            table = seq.block_table
            if n == 1:  # a decode row (most rows of most steps): no slices or ranges
                if sources is not None and sources[i] is not None:  # its token is being sampled on the device
                    x.gather_rows.append(len(x.ids))
                    x.gather_src.append(sources[i])
                    x.ids.append(0)
                else:
                    x.ids.append(seq.token_ids[start])
                x.positions.append(start)
                x.slots.append(table[start // bs] * bs + start % bs)
                x.q_lens.append(1)
                x.ctx_lens.append(start + 1)
                x.tables.append(table)
                x.num_decode += 1
                if sample:
                    x.sample_rows.append(len(x.ids) - 1)
                if seq.prompt_logprobs is not None:  # a one-token prompt chunk, or the prompt's last token
                    _add_prompt_rows(x, seq, start, 1, len(x.ids) - 1)
                continue
            end = start + n
            if seq.prompt_logprobs is not None:
                _add_prompt_rows(x, seq, start, n, len(x.ids))
            x.ids.extend(seq.token_ids[start:end])
            x.positions.extend(range(start, end))
            # A block's slots at a time (a chunk spans few blocks), less the first block's head and the last's tail.
            first = start // bs
            slots = []
            for block in table[first : (end - 1) // bs + 1]:
                slots.extend(range(block * bs, block * bs + bs))
            head = start - first * bs
            x.slots.extend(slots[head : head + n])
            x.q_lens.append(n)
            x.ctx_lens.append(end)
            x.tables.append(table)
            if sample:
                x.sample_rows.append(len(x.ids) - 1)
        return x

    @torch.inference_mode()
    def execute(
        self,
        x: StepInputs,
        on_launch: Callable[[], None] | None = None,
        previous_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, LogprobRows | None]:
        """Forward one step; returns the logits of the rows to sample ([N, vocab]) or None, and the logprobs of
        x.prompt_rows (rank 0; None where there are none).

        previous_tokens: the previous step's sampled tokens on the device ([M] int64), which x.ids index
        when x.ids_from_previous.
        """
        dev = self.device
        if x.ids_from_previous and previous_tokens is None:
            raise ValueError("a step scheduled ahead needs the previous step's sampled tokens")
        gather_from = previous_tokens if x.ids_from_previous else None
        # on_launch overlaps the caller's work with the model's. On CUDA the forward only enqueues kernels, so
        # it runs after them; on CPU the forward computes in place, so it runs just before (its kernels run
        # without the GIL).
        launched = on_launch or (lambda: None)
        if self.graphs is not None and self.graphs.can_run(x):  # CUDA only
            hidden = self.graphs.run(x, gather_from)  # [n, hidden]: the real rows of the replayed padded batch
            launched()
        else:
            meta = self._metadata(x.q_lens, x.ctx_lens, x.tables, x.slots, x.num_decode)
            ids = to_device(x.ids, torch.long, dev)
            if gather_from is not None:
                ids = gather_from[ids]
            elif x.gather_rows:
                if previous_tokens is None:
                    raise ValueError("a step scheduled ahead needs the previous step's sampled tokens")
                ids[to_device(x.gather_rows, torch.long, dev)] = previous_tokens[to_device(x.gather_src, torch.long, dev)]
            positions = to_device(x.positions, torch.long, dev)
            if dev.type == "cpu":
                launched()
            hidden = self.model(ids, positions, self.kv_caches, meta, self.backend)
            if dev.type != "cpu":
                launched()
        prompt = self._prompt_logprobs(hidden, x) if x.prompt_rows else None
        if not x.sample_rows:
            return None, prompt
        if len(x.sample_rows) < hidden.shape[0]:  # rows are distinct and ascending: fewer means a subset
            hidden = hidden[to_device(x.sample_rows, torch.long, dev)]
        return self.model.compute_logits(hidden), prompt

    def _prompt_logprobs(self, hidden: torch.Tensor, x: StepInputs) -> LogprobRows | None:
        """The logprobs of the prompt tokens x.prompt_rows predict, as LogprobRows (rows 0, 1, ...) on rank 0; the
        other ranks take part in the LM head's gather only. Logits are made max_num_seqs rows at a time, the most
        the start-up's warm-up measured, so that a long prompt never needs a prompt's worth of them at once."""
        dev, piece = self.device, self.config.max_num_seqs
        k = max(x.prompt_k)
        values, top_ids = [], []
        for i in range(0, len(x.prompt_rows), piece):
            logits = self.model.compute_logits(hidden[to_device(x.prompt_rows[i : i + piece], torch.long, dev)])
            if self.tp.rank != 0:
                continue
            logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            targets = to_device(x.prompt_targets[i : i + piece], torch.long, dev)
            top_lp, top = top_logprobs(logprobs, k)
            row = torch.cat([logprobs.gather(1, targets.unsqueeze(1)), top_lp], dim=1)
            # A row whose logits hold NaN or an infinity is NaN throughout, which fails its request (the engine's
            # _keep_prompt_logprobs), as a sampled row's does: not logprobs of NaN beside made-up top ids.
            values.append(torch.where(torch.isfinite(logits).all(dim=-1, keepdim=True), row, float("nan")))
            top_ids.append(top.to(torch.int32))  # held until the first token: half the bytes of int64
        if self.tp.rank != 0:
            return None
        return LogprobRows(list(range(len(x.prompt_rows))), x.prompt_k, torch.cat(values), torch.cat(top_ids))

    @torch.inference_mode()
    def launch(
        self,
        batch: ScheduledBatch,
        rows: list[SamplingRow],
        workers=None,
        on_launch: Callable[[], None] | None = None,
        previous: Launched | None = None,
    ) -> Launched:
        """Enqueue the batch's forward pass and sampling (on every rank) without waiting for them.

        previous: the launched step whose sampled tokens are this batch's inputs (a batch scheduled ahead).
        """
        with on_device(self.device):  # triton kernels launch on the thread's current device (host_copy)
            return self._launch(batch, rows, workers, on_launch, previous)

    def _launch(self, batch, rows, workers, on_launch, previous) -> Launched:
        x = self.step_inputs(batch, self.block_size)
        self.ranks_in_step = False  # whatever became of an earlier step
        if workers is not None:
            if x.ids_from_previous or x.gather_rows:
                raise ValueError("tensor-parallel workers cannot run a step scheduled ahead")
            self.ranks_in_step = True
            workers.send_step(x)
        previous_tokens = previous.sampled[0] if previous is not None and previous.sampled is not None else None
        caller_failed: list[Exception] = []

        def call_back() -> None:
            # The caller's failure waits for the forward pass: raised in the middle of it, under tensor
            # parallelism it left the workers in the step's collectives and the engine had to die. After it,
            # the step fails its requests as any other failed step does, and the ranks stay in step.
            try:
                on_launch()
            except Exception as exc:
                caller_failed.append(exc)

        logits, prompt = self.execute(x, call_back if on_launch is not None else None, previous_tokens)
        self.ranks_in_step = False
        if caller_failed:
            raise caller_failed[0]
        if logits is None and prompt is None:
            return Launched(None, None, None)
        sampled = logprobs = None
        if logits is not None:
            sampled, logprobs = self.sampler.sample_with_logprobs(logits, rows)  # [2, N] on the device
        if self.device.type != "cuda":
            return Launched(sampled, sampled, None, logprobs, prompt)
        host = None
        if sampled is not None:
            host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
        logprobs = logprobs.to_host() if logprobs is not None else None
        prompt = prompt.to_host() if prompt is not None else None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return Launched(sampled, host, done, logprobs, prompt)

    def collect(self, launched: Launched) -> Collected:
        """Wait for a launched step's tokens and logprobs. This is the step's one wait for the device."""
        if launched.done is not None:
            launched.done.synchronize()
        prompt = launched.prompt_logprobs  # sequences keep compact copies (LogprobRows.take)
        if launched.host is None:
            return Collected([], [], None, prompt)
        both = launched.host.tolist()
        logprobs = launched.logprobs.per_row(len(both[0])) if launched.logprobs is not None else None
        return Collected(both[0], [bool(v) for v in both[1]], logprobs, prompt)
