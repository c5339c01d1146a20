"""CUDA graphs for pure-decode steps: every sequence computes one token.

At 28,000 tok/s a decode step has about 4.7 ms in all (`../shared/design/BENCHMARKS.md`), and an eager
forward of Qwen3-0.6B launches dozens of small kernels per layer, 28 layers deep; a captured graph replays
them in one call.

How it works (the same plan as vLLM's and nano-vLLM's decode graphs, written for this engine):
- At start-up, the forward pass is captured once per batch size of a ladder (capture_sizes), largest
  first, all graphs sharing ONE memory pool: graphs replay one at a time, so a smaller graph reuses the
  largest one's activation memory.
- A graph reads its inputs from static buffers of max_bs lanes (input ids, positions, slot mapping,
  context lengths, the lanes longest first for attention's dispatch, block tables of width
  ceil(max_model_len / block_size)) and writes the final hidden states into a static [max_bs, hidden]
  buffer. cu_seqlens_q is arange: one query row per lane.
- A step of n sequences replays the smallest captured size >= n. Lanes n.. are padding: slot -1 (the
  KV store writes nothing) and context length 0 (attention writes zeros, never NaN). Only the real rows
  go on to the LM head and the sampler, which stay outside the graph.
- The split-KV count of paged attention is a function of the batch shape only, so it is fixed per
  captured size (meta.cache["num_kv_splits"]); eager steps use the same heuristic.
- After capture, a self-check replays every size on random inputs and compares with an eager forward
  of the same padded batch; anything but bitwise-equal hidden states and logits turns graphs off
  (decode runs eagerly) rather than risk serving different tokens.

Capture never reads device memory on the host: the metadata's host lists (q_lens, ctx_lens) are fixed
per size, and the model's forward (embedding, RMSNorm, RoPE table lookup, linears, the Triton kernels)
issues no host sync. Only the `triton` backend is captured:
- `torch` stores K/V through a boolean mask when a batch has padding lanes (a host sync) and plans
  its gathers from the host context lengths;
- `flash_attn` shares that store.
Tensor parallelism > 1 runs eagerly too (its all-reduces are not captured here).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine_service.attention import to_kv_cache
from engine_service.attention.base import AttentionBackend, AttentionMetadata, longest_first
from engine_service.host_copy import on_device
from engine_service.model.decoder import kv_heads_per_rank
from engine_service.model.layers import gemm_picks_off

if TYPE_CHECKING:
    from engine_service.model_runner import ModelRunner, StepInputs

log = logging.getLogger(__name__)

# Batch sizes captured: every small size a few requests produce, then one graph every CAPTURE_STEP
# sequences. Padding a step up to the next size costs little: padding lanes read no KV cache, and decode
# GEMMs at these batch sizes are bound by reading the weights, not by the rows.
SMALL_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32)
CAPTURE_STEP = 16
# Two-batch overlap (EngineConfig.two_batch_overlap): captured sizes from this one on run as two halves.
TWO_BATCH_MIN_SIZE = 32

# The self-check reads and writes the KV cache only in blocks [0, SELF_CHECK_BLOCKS) (at least one per
# lane of the largest graph), with contexts of up to SELF_CHECK_MAX_CONTEXT tokens: long enough to use
# several KV splits, short enough that the check takes milliseconds.
SELF_CHECK_BLOCKS = 256
SELF_CHECK_MAX_CONTEXT = 2048


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The ladder of batch sizes to capture: 1, 2, 4, 8, 16, 24, 32, then every 16, then max_num_seqs."""
    sizes = [s for s in SMALL_CAPTURE_SIZES if s <= max_num_seqs]
    s = SMALL_CAPTURE_SIZES[-1] + CAPTURE_STEP
    while s <= max_num_seqs:
        sizes.append(s)
        s += CAPTURE_STEP
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def pick_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size that holds n sequences (sizes sorted), or None when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def pack_decode_inputs(
    ids: list[int],
    positions: list[int],
    slots: list[int],
    ctx_lens: list[int],
    tables: list[list[int]],
    size: int,
    half: int | None = None,
) -> tuple[list[int], int]:
    """One flat int list for one host->device copy of a decode step padded to `size` lanes.

    Layout: [ids | positions | slots | context lens | order], `size` entries each, lanes n.. padded with
    token 0, position 0, slot -1 and context 0, and the order the real lanes longest first (longest_first),
    then the padding lanes; then the n real block tables, each padded to w = the longest table (w >= 1),
    row after row. Returns (flat, w). Padding lanes' table rows are not sent: with context 0 no kernel
    reads them.

    With `half` (a size captured as two halves, lanes [0, half) and [half, size)): rows [0, a), a = ceil(n / 2),
    go to the first half's lanes and rows [a, n) to the second's, each half padded after its real lanes; the
    order is each half's, in lanes of that half ([0, half) and [0, size - half)); then [row lanes], the lane of
    each row (the real rows, then the padding lanes), by which the graph puts its output back in row order;
    then all `size` lanes' tables, padding lanes' zero.
    """
    n = len(ids)
    width = max(1, max(map(len, tables)))
    if half is None:
        pad = size - n
        zeros = [0] * max(pad, width)
        flat = ids + zeros[:pad] + positions + zeros[:pad] + slots + [-1] * pad + ctx_lens + zeros[:pad]
        flat += longest_first(ctx_lens)
        flat += range(n, size)
        rows = tables
    else:
        a = -(-n // 2)
        b = n - a
        if a > half or b > size - half:
            raise ValueError(f"{n} rows do not fit halves of {half} and {size - half} lanes")

        def lanes(values: list[int], fill: int) -> list[int]:
            return values[:a] + [fill] * (half - a) + values[a:] + [fill] * (size - half - b)

        flat = lanes(ids, 0) + lanes(positions, 0) + lanes(slots, -1) + lanes(ctx_lens, 0)
        flat += longest_first(ctx_lens[:a]) + list(range(a, half))
        flat += longest_first(ctx_lens[a:]) + list(range(b, size - half))
        flat += [*range(a), *range(half, half + b), *range(a, half), *range(half + b, size)]
        empty: list[int] = []
        rows = tables[:a] + [empty] * (half - a) + tables[a:] + [empty] * (size - half - b)
    zeros = [0] * width
    for t in rows:
        flat += t
        flat += zeros[: width - len(t)]
    return flat, width


@dataclass(slots=True)
class CheckResult:
    """Replay against eager for one captured size, on one random padded batch."""

    size: int
    real: int  # real lanes; the rest are padding
    hidden_equal: bool  # all `size` rows, padding lanes included
    logits_equal: bool  # all `size` rows
    finite: bool  # no NaN or inf anywhere in the replayed hidden states
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.hidden_equal and self.logits_equal and self.finite


class _EagerReplay:
    """Stands in for a torch.cuda.CUDAGraph where graphs cannot be captured (CPU tests): replay() re-runs
    the same forward on the same static buffers, which is what a graph replay computes."""

    def __init__(self, owner: DecodeGraphRunner, size: int):
        self.owner, self.size = owner, size

    def replay(self) -> None:
        self.owner.hidden[: self.size].copy_(self.owner.forward(self.size))


class _AttentionOn(AttentionBackend):
    """The triton backend with its attention on `stream` (two-batch overlap): it waits there for what the calling
    stream has issued (q, and K/V stored), and the calling stream waits for it before the output is used.

    Every tensor involved is made on the calling stream (the output too, before the switch), and that stream waits
    for the attention before going on: when one is freed, its memory is reused only after the attention is done,
    with no record_stream (which, during a capture, holds each block until the capture ends)."""

    def __init__(self, inner: AttentionBackend, stream: torch.cuda.Stream):
        self.inner, self.stream = inner, stream
        self.name, self.takes_stored_kv = inner.name, inner.takes_stored_kv

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        caller = torch.cuda.current_stream(q.device)
        out = torch.empty_like(q)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            self.inner.forward(q, k, v, k_cache, v_cache, meta, scale, out=out)
        caller.wait_stream(self.stream)
        return out


class DecodeGraphRunner:
    """Captured decode forwards for a ladder of batch sizes, over static input and output buffers.

    use_cuda_graphs=False keeps every buffer and step the same but replays by re-running the forward,
    so the padding and buffer logic can be tested on CPU.
    """

    def __init__(self, runner: ModelRunner, sizes: list[int], use_cuda_graphs: bool = True,
                 two_batch_overlap: bool | None = None, halved_from: int = TWO_BATCH_MIN_SIZE,
                 halves_priority: int = -1):
        """two_batch_overlap: None takes the engine's setting (EngineConfig.two_batch_overlap); with it, sizes from
        halved_from on run as two halves, their streams at halves_priority (-1: above the capture stream's 0, where
        attention runs; gpu_check also times 0)."""
        self.model, self.backend, self.kv_caches = runner.model, runner.backend, runner.kv_caches
        self.device = runner.device
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.sizes = sorted(set(sizes))
        self.use_cuda_graphs = use_cuda_graphs
        self.width = -(-runner.max_model_len // runner.block_size)  # every table a sequence can have
        max_bs = self.sizes[-1]
        dev = self.device
        # Plain tensors (not inference tensors), so that steps may update them in place in any mode.
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)  # [max_bs]
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)  # [max_bs]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=dev)  # [max_bs]
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)  # [max_bs]
        self.seq_order = torch.arange(max_bs, dtype=torch.int32, device=dev)  # [max_bs]: a permutation of lanes
        self.block_tables = torch.zeros(max_bs, self.width, dtype=torch.int32, device=dev)  # [max_bs, W]
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)  # never changes
        # Two-batch overlap: the sizes run as two halves (size -> the first half's lanes), and for each the lane
        # of every output row (pack_decode_inputs), by which the graph puts the halves' rows back in row order.
        if two_batch_overlap is None:
            two_batch_overlap = runner.config.two_batch_overlap
        self.halves = {s: -(-s // 2) for s in self.sizes if two_batch_overlap and s >= max(2, halved_from)}
        self.row_lanes = torch.arange(max_bs, dtype=torch.long, device=dev)  # [max_bs]
        # Each half's kernels on a stream of its own, above the default priority: its GEMMs and elementwise
        # kernels get SMs ahead of the other half's attention, which runs on the forward's current stream
        # (the capture stream), so that the two overlap instead of queueing behind each other.
        self.streams = None
        if self.halves and dev.type == "cuda":
            self.streams = tuple(torch.cuda.Stream(dev, priority=halves_priority) for _ in range(2))
        hidden_size = runner.model_cfg.hidden_size
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=runner.dtype, device=dev)  # graph output
        # Staging for pack_decode_inputs: pinned on CUDA, so the copy is a true asynchronous DMA.
        cap = 6 * max_bs + max_bs * self.width
        # Two host buffers, used in turn: with overlap scheduling the host fills one for the next step while
        # the device may still be copying the other. Each has an event recorded after its copy; a buffer is
        # refilled only once its event has passed (so far it always has: the step two launches back has been
        # read back by then), so filling one never waits for the device.
        pin = dev.type == "cuda"
        self._stages = [torch.empty(cap, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._stages_np = [stage.numpy() for stage in self._stages]  # numpy fills from a list in one C loop
        self._copied = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0
        self._stage_dev = torch.empty(cap, dtype=torch.long, device=dev)
        # Split-KV count per batch of lanes (each size, and each half by its lanes), fixed at capture (only the
        # triton backend reads it).
        lanes = sorted({*self.sizes, *self.halves.values(), *(s - h for s, h in self.halves.items())})
        self.num_kv_splits = dict.fromkeys(lanes, 1)
        if runner.backend_name == "triton":
            from engine_service.attention.triton_kernels import default_num_kv_splits

            kv_heads = kv_heads_per_rank(runner.model_cfg, runner.tp)
            self.num_kv_splits = {n: default_num_kv_splits(n, kv_heads, 1, dev) for n in lanes}
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # device memory reserved by capture (the graphs' pool and eager warm-ups)
        self.num_replays = 0  # steps served by a graph, for tests and profiling

    # ---- the forward a graph holds -----------------------------------------------------------------
    def metadata(self, size: int, lo: int = 0) -> AttentionMetadata:
        """Attention metadata over lanes [lo, size) of the static buffers.

        The host lists are placeholders fixed per size (the triton backend plans from shapes only);
        max_context_len is the bound every lane stays under.
        """
        n = size - lo
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[lo:size],
            cu_seqlens_q=self.cu_seqlens_q[: n + 1],
            context_lens=self.context_lens[lo:size],
            block_tables=self.block_tables[lo:size],
            num_decode_seqs=n,
            max_seqlen_q=1,
            max_context_len=self.max_model_len,
            block_size=self.block_size,
            has_padding=True,
            seq_order=self.seq_order[lo:size],
            q_lens=[1] * n,
            ctx_lens=[self.max_model_len] * n,
            cache={"num_kv_splits": self.num_kv_splits[n]},
        )

    def forward(self, size: int) -> torch.Tensor:
        """The model over the first `size` lanes of the static inputs: [size, hidden] in row order (eager)."""
        half = self.halves.get(size)
        if half is None:
            return self.model(
                self.input_ids[:size], self.positions[:size], self.kv_caches, self.metadata(size), self.backend
            )
        return self._forward_halves(size, half)

    def _forward_halves(self, size: int, half: int) -> torch.Tensor:
        """Two-batch overlap: lanes [0, half) and [half, size) through the model as two batches, layer by layer
        in turn. On CUDA each half's kernels go on its own high-priority stream and both halves' attention on the
        current stream, so one half's GEMMs run while the other's attention does (they wait on each other only
        where data flows); on CPU all run in order on one stream, with the same results."""
        spans = ((0, half), (half, size))
        metas = [self.metadata(hi, lo) for lo, hi in spans]
        if self.streams is None:
            backends, streams = (self.backend, self.backend), None
        else:
            main = torch.cuda.current_stream(self.device)
            for stream in self.streams:
                stream.wait_stream(main)  # the static inputs are written (and, capturing, the fork)
            backends, streams = (_AttentionOn(self.backend, main), _AttentionOn(self.backend, main)), self.streams
        halves = [(self.input_ids[lo:hi], self.positions[lo:hi], meta, backend)
                  for (lo, hi), meta, backend in zip(spans, metas, backends, strict=True)]
        with gemm_picks_off():  # our split-K GEMMs share one workspace: two at once would race
            out = self.model.forward_batches(halves, self.kv_caches, streams)
        if streams is not None:
            for stream, hidden in zip(streams, out, strict=True):
                main.wait_stream(stream)  # the join
                hidden.record_stream(main)
        return torch.cat(out).index_select(0, self.row_lanes[:size])

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size, largest first into one pool; returns the seconds it took."""
        start = time.perf_counter()
        # Every lane a padding lane: the warm-ups and captures write nothing into the KV cache.
        self.slot_mapping.fill_(-1)
        self.context_lens.zero_()
        with on_device(self.device):
            if self.use_cuda_graphs:
                # Both readings with nothing idle in the cache: torch.cuda.graph empties it at every capture,
                # which released the warm-up's cached activations (~1 GiB) and made the figure negative.
                torch.cuda.empty_cache()
                reserved_before = torch.cuda.memory_reserved(self.device)
                self.pool = torch.cuda.graph_pool_handle()
            for size in reversed(self.sizes):
                # The launch order, in each half's own lanes where the size has halves (a replay loads its own).
                half = self.halves.get(size, size)
                self.seq_order[:half].copy_(torch.arange(half))
                self.seq_order[half:size].copy_(torch.arange(size - half))
                # Eager warm-up: Triton compiles and loads this size's kernels (its split count, its
                # specialisations) here, since nothing may compile or allocate outside the pool in a capture.
                self.forward(size)
                if not self.use_cuda_graphs:
                    self.graphs[size] = _EagerReplay(self, size)
                    continue
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.hidden[:size].copy_(self.forward(size))  # [size, hidden]
                self.graphs[size] = graph
            if self.use_cuda_graphs:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()  # what stays reserved now is the graphs' pool, which they hold
                self.capture_bytes = torch.cuda.memory_reserved(self.device) - reserved_before
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    # ---- one step ----------------------------------------------------------------------------------
    def can_run(self, x: StepInputs) -> bool:
        """A pure-decode step whose batch fits a captured size."""
        n = len(x.q_lens)
        # Not a batch scheduled ahead beside prompt chunks: part of its ids are gathered on the device (eager).
        return 0 < n <= self.sizes[-1] and x.num_decode == n and bool(self.graphs) and not x.gather_rows

    def run(self, x: StepInputs, gather_from: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the graph for x (a pure-decode step); returns the real rows' hidden states [n, hidden].

        gather_from: when set, x.ids are rows of this device tensor (the previous step's sampled tokens),
        and the input ids are gathered from it on the device. The result is a view of the static output
        buffer: use it before the next run().
        """
        n = len(x.q_lens)
        size = pick_size(self.sizes, n)
        self._load(x.ids, x.positions, x.slots, x.ctx_lens, x.tables, size)
        if gather_from is not None:  # padding lanes (anywhere, with halves) hold row 0: any token will do there
            self.input_ids[:size].copy_(gather_from[self.input_ids[:size]])
        self.graphs[size].replay()
        self.num_replays += 1
        return self.hidden[:n]

    def _load(self, ids, positions, slots, ctx_lens, tables, size: int) -> None:
        """Copy one step's inputs, padded to `size` lanes, into the static buffers (one host->device copy)."""
        half = self.halves.get(size)
        flat, width = pack_decode_inputs(ids, positions, slots, ctx_lens, tables, size, half)
        n, total = len(ids), len(flat)
        i, self._turn = self._turn, self._turn ^ 1
        if self._copied is not None and not self._copied[i].query():
            self._copied[i].synchronize()  # this buffer's last copy has not run yet: wait for it
        self._stages_np[i][:total] = flat
        buf = self._stage_dev[:total]
        buf.copy_(self._stages[i][:total], non_blocking=True)
        if self._copied is not None:
            self._copied[i].record(torch.cuda.current_stream(self.device))
        s = size
        self.input_ids[:s].copy_(buf[:s])
        self.positions[:s].copy_(buf[s : 2 * s])
        self.slot_mapping[:s].copy_(buf[2 * s : 3 * s])
        self.context_lens[:s].copy_(buf[3 * s : 4 * s])
        self.seq_order[:s].copy_(buf[4 * s : 5 * s])
        rows, at = n, 5 * s
        if half is not None:  # the row lanes, and every lane's table
            self.row_lanes[:s].copy_(buf[5 * s : 6 * s])
            rows, at = s, 6 * s
        # Entries past a table's end stay stale: a kernel reads only ceil(context / block_size) of them.
        self.block_tables[:rows, :width].copy_(buf[at:].view(rows, width))

    # ---- the self-check ----------------------------------------------------------------------------
    @torch.inference_mode()
    def self_check(self, seed: int = 0) -> list[CheckResult]:
        """For each captured size: replay vs an eager forward of the same random padded batch.

        Uses KV blocks [0, SELF_CHECK_BLOCKS), filled with random values and restored afterwards, so it
        may run on an idle engine (never during a step).
        """
        with on_device(self.device):
            return self._self_check(seed)

    def _self_check(self, seed: int) -> list[CheckResult]:
        num_blocks = self.kv_caches[0][0].shape[0]  # each layer's cache: [num_blocks, block_size, Hkv, D]
        pool = min(num_blocks, max(SELF_CHECK_BLOCKS, self.sizes[-1]))
        # [layers, pool, block_size, kv_heads, head_dim], for the restore
        saved = [(k[:pool].clone(), v[:pool].clone()) for k, v in self.kv_caches]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for cache in itertools.chain.from_iterable(self.kv_caches):
            # Drawn in float32 and rounded as stored: torch has no normal_ for an fp8 cache (kv_cache_dtype="fp8").
            draw = torch.randn(cache[:pool].shape, generator=gen, device=self.device, dtype=torch.float32)
            cache[:pool].copy_(to_kv_cache(draw, cache.dtype))
        rng = random.Random(seed)
        vocab = self.model.cfg.vocab_size
        max_ctx = min(self.max_model_len, SELF_CHECK_MAX_CONTEXT, pool * self.block_size)
        results = []
        try:
            for size in self.sizes:
                # A quarter of the lanes (at least one, from size 2) are padding; each real lane writes
                # its new K/V into a block of its own, so no two lanes race for a slot.
                padding = max(1, size // 4) if size > 1 else 0
                real = min(pool, size - padding)
                last_blocks = rng.sample(range(pool), real)
                # The blocks before a lane's last are read-only, as in serving (a block being written is no other
                # sequence's): read while another lane writes it, the result would depend on which of the two a
                # step computes first, and two halves of a batch (two-batch overlap) compute in turn.
                written = set(last_blocks)
                readable = [b for b in range(pool) if b not in written]
                ids, positions, slots, ctx_lens, tables = [], [], [], [], []
                for lane in range(real):
                    ctx = rng.randint(1, max_ctx if readable else self.block_size)  # no other block: one of its own
                    nblk = -(-ctx // self.block_size)
                    table = [rng.choice(readable) for _ in range(nblk - 1)] + [last_blocks[lane]]
                    pos = ctx - 1
                    ids.append(rng.randrange(vocab))
                    positions.append(pos)
                    slots.append(table[-1] * self.block_size + pos % self.block_size)
                    ctx_lens.append(ctx)
                    tables.append(table)
                self._load(ids, positions, slots, ctx_lens, tables, size)
                self.graphs[size].replay()
                replayed = self.hidden[:size].clone()
                # Eager over the same static inputs; it rewrites the same K/V at the same slots first.
                eager = self.forward(size)
                logits_r = self.model.compute_logits(replayed)  # [size, vocab]
                logits_e = self.model.compute_logits(eager)
                diff = (replayed.float() - eager.float()).abs().max()
                results.append(
                    CheckResult(
                        size=size,
                        real=real,
                        hidden_equal=torch.equal(replayed, eager),
                        logits_equal=torch.equal(logits_r, logits_e),
                        finite=bool(torch.isfinite(replayed).all()),
                        max_abs_diff=float(diff),
                    )
                )
        finally:
            for (k, v), (k0, v0) in zip(self.kv_caches, saved, strict=True):
                k[:pool].copy_(k0)
                v[:pool].copy_(v0)
        return results


def build_decode_graphs(runner: ModelRunner, two_batch_overlap: bool | None = None,
                        **options) -> DecodeGraphRunner | None:
    """Capture and self-check decode graphs for a CUDA model runner; None (eager decode) when they
    cannot be used, with the reason logged. two_batch_overlap: None takes the engine's setting; options go to
    DecodeGraphRunner. Graphs with sizes in two halves that fail are captured again without them (graphs of one
    batch a step beat eager decode by far: two-batch overlap is an optimisation); the result's `halves` says
    which it is."""
    if runner.backend_name != "triton":
        log.info(
            "CUDA graphs off: the %s attention backend is not capturable (only triton is)", runner.backend_name
        )
        return None
    if runner.tp.size > 1:
        log.info("CUDA graphs off: tensor_parallel_size > 1 runs eagerly")
        return None
    sizes = capture_sizes(runner.config.max_num_seqs)
    graphs = DecodeGraphRunner(runner, sizes, two_batch_overlap=two_batch_overlap, **options)
    halved = bool(graphs.halves)
    graphs = _captured(graphs)
    if graphs is None and halved:
        log.warning("CUDA graphs failed with two-batch overlap; capturing again without it")
        graphs = _captured(DecodeGraphRunner(runner, sizes, two_batch_overlap=False, **options))
    return graphs


def _captured(graphs: DecodeGraphRunner) -> DecodeGraphRunner | None:
    """graphs captured and self-checked, or None (said in the log) where either failed."""
    try:
        seconds = graphs.capture()
        results = graphs.self_check()
    except Exception:  # e.g. out of memory: serving eagerly beats not serving
        log.exception("CUDA graph capture failed; decode steps run eagerly")
        return None
    bad = [r for r in results if not r.ok]
    if bad:
        log.error(
            "CUDA graphs off: replay differs from eager for batch sizes %s (%s); decode steps run eagerly",
            [r.size for r in bad],
            "; ".join(
                f"size {r.size}: hidden equal {r.hidden_equal}, logits equal {r.logits_equal}, "
                f"finite {r.finite}, max diff {r.max_abs_diff:.3g}"
                for r in bad
            ),
        )
        return None
    log.info(
        "captured %d CUDA graphs for decode batch sizes %s in %.1f s (%.0f MiB of device memory); replay == "
        "eager bitwise for each%s",
        len(graphs.sizes),
        graphs.sizes,
        seconds,
        graphs.capture_bytes / 2**20,
        f"; sizes from {min(graphs.halves)} on run as two halves (two-batch overlap)" if graphs.halves else "",
    )
    return graphs
