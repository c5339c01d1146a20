"""Token sampling on the model's device: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Sampling inverts the cumulative distribution at one uniform draw per row: one random number instead of a
vocabulary's worth of noise. A seeded request draws from its own generator, so its draws do not depend on
which other requests share the batch (its tokens neither, where the forward is batch-invariant: float64, and
float32 but for rare flips; docs/ENGINE.md, Sampling). Rows with NaN or infinite logits are reported, not sampled.
Rows that ask for logprobs get log_softmax of their raw logits (before penalties, temperature, filters and
bans), the sampled token's entry and the most likely tokens', computed on the device beside the draw.
Rows with a logit_bias have it added first; rows with penalties then have their logits penalised (penalties.py);
then banned; then rows with a response_format keep only the tokens it allows (structured_output.py); then drawn.
On CUDA, rows without top-k, top-p or min-p filters are drawn by Triton kernels (sampling_kernels.py) that
read the logits about 1.1 times instead of materialising float32 copies of them; where nothing (bias, penalty,
ban, mask, a greedy row) changed the logits first, they also do the finite check as they read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.attention import check_triton_usable, compiled_triton
from engine_service.host_copy import to_device
from engine_service.outputs import TokenLogprobs
from engine_service.penalties import Penalties
from engine_service.sampling_params import MAX_LOGPROBS, SamplingParams
from engine_service.structured_output import TokenMask


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one request this step."""

    params: SamplingParams
    generator: torch.Generator | None  # the request's own generator when it has a seed
    banned_token_ids: tuple[int, ...] = ()  # EOS/stop ids, while min_tokens is not reached
    penalty_slot: int = -1  # the request's Penalties slot when it has a penalty, else -1
    # params.logit_bias on the logits' device (Sampler.bias_tensors), made once per request by its owner; the
    # sampler makes it each step where it is None.
    bias: LogitBias | None = None
    # The tokens allowed next for a request with a response_format: every other token's logit becomes -inf, after
    # biases, penalties and bans (structured_output.py).
    allowed: TokenMask | None = None


@dataclass(slots=True, frozen=True)
class LogitBias:
    """One request's logit_bias on the device: token ids (int64) and biases (float64: exact in a float64 engine)."""

    ids: torch.Tensor
    values: torch.Tensor


@dataclass(slots=True)
class LogprobRows:
    """The log-probabilities of a step's rows that asked for them.

    rows: their indices among the step's sampled rows; values: [m, 1 + K] in float32 or wider, the sampled
    token's log-probability then the K most likely tokens'; top_ids: [m, K] int64 (int32 for prompt logprobs). K is
    the largest request's.
    """

    rows: list[int]
    wanted: list[int]  # each row's own number of most likely tokens (at most K)
    values: torch.Tensor
    top_ids: torch.Tensor

    def to_host(self) -> LogprobRows:
        """The same in pinned host memory, copied without waiting for the device (CUDA only)."""
        values = torch.empty(self.values.shape, dtype=self.values.dtype, pin_memory=True)
        top_ids = torch.empty(self.top_ids.shape, dtype=self.top_ids.dtype, pin_memory=True)
        values.copy_(self.values, non_blocking=True)
        top_ids.copy_(self.top_ids, non_blocking=True)
        return LogprobRows(self.rows, self.wanted, values, top_ids)

    def take(self, start: int, stop: int, k: int) -> LogprobRows:
        """Rows [start, stop) of a LogprobRows whose rows are 0, 1, ... (prompt logprobs) as rows 0, 1, ..., with k
        alternatives each: a compact copy in pageable host memory, for keeping (not a view holding the whole step's
        rows at its widest request's K, nor page-locked memory)."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype).copy_(t)

        return LogprobRows(list(range(stop - start)), [k] * (stop - start), copy(self.values[start:stop, : 1 + k]),
                           copy(self.top_ids[start:stop, :k]))

    def per_row(self, num_rows: int) -> list[TokenLogprobs | None]:
        """One entry per sampled row of the step (None where the row did not ask); reads host tensors."""
        out: list[TokenLogprobs | None] = [None] * num_rows
        for row, k, values, ids in zip(self.rows, self.wanted, self.values.tolist(), self.top_ids.tolist(),
                                       strict=True):
            out[row] = TokenLogprobs(values[0], ids[:k], values[1 : 1 + k])
        return out


class Sampler:
    def __init__(self, device: torch.device, seed: int, triton_sampling: bool | None = None,
                 penalties: Penalties | None = None):
        """triton_sampling: draw rows without top-k/top-p/min-p filters with sampling_kernels (about 1.1
        passes over the logits instead of several float32 copies). None: on CUDA where triton imports and its
        kernels are compiled (not TRITON_INTERPRET=1). penalties: the token counts of rows with a
        penalty_slot (rows with penalties need it)."""
        self.penalties = penalties
        if triton_sampling is None:
            triton_sampling = compiled_triton(device)
        elif triton_sampling:
            check_triton_usable("triton_sampling", device, "pass triton_sampling=False")
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.kernels = None
        if triton_sampling:
            from engine_service import sampling_kernels

            self.kernels = sampling_kernels

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[bool]]:
        """logits: [N, V] -> (token ids, whether each row's logits were finite). One device sync.

        For tests and scripts: the model runner calls sample_with_logprobs() and reads it back with its step."""
        both = self.sample(logits, rows).tolist()
        return both[0], [bool(x) for x in both[1]]

    def warm_up(self, logits: torch.Tensor) -> None:
        """Sample each row of `logits` ([rows, V]) the costliest way, with a logit bias, penalties (where this sampler
        has them: on the rank that samples), a JSON mode's mask, top-k/top-p and the most logprobs, then the cheapest (the sampling
        kernels, with their finite check and, after a bias, without), so that a start-up measuring peak memory sees the
        sampler's largest workspace and the kernels' variants are compiled. Its generator is
        restored: the warm-up draws no one's tokens. The counts it leaves in penalty slots are zeroed when a request
        takes one."""
        state = self.generator.get_state()
        costly = SamplingParams(temperature=0.6, top_k=50, top_p=0.9, logprobs=MAX_LOGPROBS, repetition_penalty=1.1,
                                presence_penalty=0.5, frequency_penalty=0.5, logit_bias={0: 0.5})
        slots = range(logits.shape[0]) if self.penalties is not None else [-1] * logits.shape[0]
        bias = self.bias_tensors(costly)
        half = torch.arange(0, logits.shape[1], 2, dtype=torch.int32, device=self.device)
        allowed = TokenMask(half, True, half.shape[0])  # a JSON mode's mask, of the largest kind
        self.sample_with_logprobs(logits.clone(), [SamplingRow(costly, None, penalty_slot=s, bias=bias, allowed=allowed)
                                                   for s in slots])
        self.sample(logits.clone(), [SamplingRow(SamplingParams(temperature=0.6), None)] * logits.shape[0])
        # The kernels' other variant: drawing logits something changed first (a bias), the finite check apart.
        biased = SamplingParams(temperature=0.6, logit_bias={0: 0.5})
        self.sample(logits.clone(), [SamplingRow(biased, None, bias=bias)] * logits.shape[0])
        self.generator.set_state(state)

    def bias_tensors(self, params: SamplingParams) -> LogitBias:
        """A request's logit_bias on the device, for its SamplingRows: made once, a step uploads nothing for it."""
        ids = to_device([t for t, _ in params.logit_bias], torch.long, self.device)
        values = to_device([b for _, b in params.logit_bias], torch.float64, self.device)
        return LogitBias(ids, values)

    def sample_with_logprobs(self, logits: torch.Tensor, rows: list[SamplingRow]
                             ) -> tuple[torch.Tensor, LogprobRows | None]:
        """sample(), and the log-probabilities of the rows whose requests asked for them (None when none did)."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return self.sample(logits, rows), None
        idx = to_device(want, torch.long, logits.device)
        # Of the raw logits, before sample() bans min_tokens' stop ids in place; float32 at least.
        wide = torch.promote_types(logits.dtype, torch.float32)
        logprobs = torch.log_softmax(logits[idx].to(wide), dim=-1)  # [m, V]
        sampled = self.sample(logits, rows)
        wanted = [rows[i].params.logprobs for i in want]
        top_lp, top_ids = top_logprobs(logprobs, max(wanted))  # [m, K], most likely first
        chosen = logprobs.gather(1, sampled[0, idx].unsqueeze(1))  # [m, 1]
        return sampled, LogprobRows(want, wanted, torch.cat([chosen, top_lp], dim=1), top_ids)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits: [N, V] -> [2, N] int64 on the device: the sampled token ids, and 1 where the row's logits
        were finite. Enqueues work only: nothing here waits for the device (see host_copy)."""
        dev = logits.device
        plain = not any(r.params.logit_bias or r.penalty_slot >= 0 or r.banned_token_ids or r.allowed is not None
                        for r in rows)
        if plain and self.kernels is not None and all(not r.params.greedy for r in rows):
            drawn = self._sample(logits, rows, check_finite=True)  # the kernels check the logits as they read them
            if drawn is not None:
                return drawn
        # Entry by entry: a float32 sum of the row (the check before) overflowed on large finite logits.
        finite = torch.isfinite(logits).all(dim=-1)
        wide = torch.promote_types(logits.dtype, torch.float32)  # what biases and penalties are computed in
        biased = [(i, r.bias or self.bias_tensors(r.params)) for i, r in enumerate(rows) if r.params.logit_bias]
        if biased:  # before penalties, as transformers' sequence_bias
            counts = [b.ids.shape[0] for _, b in biased]
            rows_ = torch.repeat_interleave(to_device([i for i, _ in biased], torch.long, dev),
                                            to_device(counts, torch.long, dev), output_size=sum(counts))
            at = (rows_, torch.cat([b.ids for _, b in biased]))  # distinct (row, token) pairs
            # Added in float32 or wider and written back clamped, as penalties are: +100 on a large fp16 logit must
            # not become inf. Only the biased rows change (in bf16 a bias under half the step at its logit, 0.0625
            # near 20, rounds away): other rows' tokens never depend on a biased row sharing their step.
            limit = torch.finfo(logits.dtype).max
            add = torch.cat([b.values for _, b in biased]).to(wide)
            logits.index_put_(at, (logits[at].to(wide) + add).clamp_(-limit, limit).to(logits.dtype))
        penalized = [i for i, r in enumerate(rows) if r.penalty_slot >= 0]
        if penalized:
            if self.penalties is None:
                raise ValueError("rows with a penalty_slot need a Sampler made with penalties")
            pairs = to_device([[i, rows[i].penalty_slot] for i in penalized], torch.long, dev)  # [p, 2]
            pen_rows, pen_slots = pairs[:, 0], pairs[:, 1]
            p = [rows[i].params for i in penalized]
            table = [[q.repetition_penalty, q.presence_penalty, q.frequency_penalty] for q in p]
            self.penalties.apply(logits, pen_rows, pen_slots, to_device(table, wide, dev),
                                 repetition=any(t[0] != 1.0 for t in table),
                                 counted=any(t[1] != 0.0 or t[2] != 0.0 for t in table))
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids]
        if banned:
            where = to_device(banned, torch.long, dev)  # [K, 2]: (row, token id)
            logits.index_put_((where[:, 0], where[:, 1]), logits.new_full((), float("-inf")))
        banning = [(i, r.allowed) for i, r in enumerate(rows) if r.allowed is not None and not r.allowed.allowed]
        if banning:  # masks listing the banned tokens: -inf there
            logits.index_put_(_row_pairs(banning, dev), logits.new_full((), float("-inf")))
        keeping = [(i, r.allowed) for i, r in enumerate(rows) if r.allowed is not None and r.allowed.allowed]
        if keeping:  # masks listing the allowed tokens: keep their logits, -inf elsewhere in the row
            at = _row_pairs(keeping, dev)
            kept = logits[at]
            logits.index_fill_(0, to_device([i for i, _ in keeping], torch.long, dev), float("-inf"))
            logits.index_put_(at, kept)
        sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled_rows) == len(rows):
            tokens = self._sample(logits, rows)
        else:
            tokens = logits.argmax(dim=-1)
            if sampled_rows:
                idx = to_device(sampled_rows, torch.long, dev)
                tokens[idx] = self._sample(logits[idx], [rows[i] for i in sampled_rows])
        if penalized:
            self.penalties.record(pen_slots, tokens[pen_rows])
        return torch.stack([tokens, finite.long()])

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], check_finite: bool = False
                ) -> torch.Tensor | None:
        """logits [n, V] in the model's dtype -> [n] tokens drawn at one uniform per row.

        check_finite: only through the sampling kernels, which then also say which rows were finite ([2, n], as
        sample() returns); None, having drawn nothing, where the rows' filters need the torch path."""
        n, vocab = logits.shape
        dev = logits.device
        # One upload for every row's parameters: [n, 4] = temperature, top_k (vocab when off), top_p, min_p.
        table = [
            # A temperature past float32's range would be inf here, its inverse 0, and -inf logits times 0 NaN:
            # 1e30 already makes every finite logit equally likely.
            [min(r.params.temperature, 1e30), vocab if r.params.top_k == -1 else min(r.params.top_k, vocab),
             r.params.top_p, r.params.min_p]
            for r in rows
        ]
        top_k_top_p = any(row[1] < vocab or row[2] < 1.0 for row in table)
        min_p = any(row[3] > 0.0 for row in table)
        kernel = self.kernels is not None and not top_k_top_p and not min_p
        if check_finite and not kernel:
            return None  # before any uniform is drawn: the caller draws them again on the torch path
        params = to_device(table, torch.float32, dev)
        u = torch.empty(n, 1, device=dev)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if len(seeded) < n:
            u.uniform_(generator=self.generator)
        for i in seeded:
            u[i].uniform_(generator=rows[i].generator)
        if kernel:
            return self.kernels.sample_rows(logits, 1.0 / params[:, 0], u[:, 0], check_finite=check_finite)
        # Shifted by the row's largest logit before the division (softmax does not see the shift): a large finite
        # logit (a repetition penalty near 0 divides it; writes clamp to the dtype's range) over a low temperature
        # overflowed to inf here, the probabilities became NaN and the draw took the vocabulary's last token.
        logits = logits.float()
        logits = (logits - logits.amax(dim=-1, keepdim=True)).div_(params[:, 0:1])
        if top_k_top_p:
            logits = _top_k_top_p(logits, params[:, 1:2], params[:, 2:3])
        probs = torch.softmax(logits, dim=-1)
        if min_p:
            floor = params[:, 3:4] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        cdf = probs.cumsum(dim=-1)  # [n, V]
        # Token i is drawn when cdf[i-1] <= u * total < cdf[i]: zero-probability tokens have empty intervals.
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return tokens.squeeze(1).clamp_(max=vocab - 1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, V] -> the k largest values of each row and their ids, [m, k] each, most likely first, ties by id as the
    greedy draw breaks them: of equal values the lower id comes first, and is the one kept at the k-th place.
    torch.topk orders ties as it likes (a greedy token's tied twin listed first, its logprob list disagreeing with
    the draw). A few elementwise passes and a second top-k over the rows; enqueues work only (no nonzero(), which
    would wait for the device)."""
    if k == 0:
        return logprobs[:, :0], torch.zeros(logprobs.shape[0], 0, dtype=torch.long, device=logprobs.device)
    vocab = logprobs.shape[1]
    kth = logprobs.topk(k, dim=-1).values[:, -1:]  # [m, 1]
    # What is above the k-th value scores above everything, then the values equal to it by id, the lowest highest
    # (exact in float32 up to 2**24 ids); the rest 0. Its top k: all that is above, then the lowest tied ids.
    ids_down = torch.arange(vocab, 0, -1, dtype=torch.float32, device=logprobs.device)
    score = torch.where(logprobs == kth, ids_down, 0.0).masked_fill_(logprobs > kth, 2.0 * vocab)
    ids = score.topk(k, dim=-1).indices.sort(dim=-1).values  # ascending, so that the stable sort below keeps it
    values = logprobs.gather(1, ids)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, order), ids.gather(1, order)


def _row_pairs(masks: list[tuple[int, TokenMask]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) index tensors for each row's mask ids, joined on the device."""
    counts = [m.ids.shape[0] for _, m in masks]
    rows = torch.repeat_interleave(to_device([i for i, _ in masks], torch.long, dev), to_device(counts, torch.long, dev),
                                   output_size=sum(counts))
    return rows, torch.cat([m.ids for _, m in masks]).long()


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (one sort for both).

    top_k, top_p: [n, 1] float32 on the logits' device; top_k is the vocabulary size where it is off.
    """
    vocab = logits.shape[1]
    # Stable: tied tokens in id order, so that a top-p cut among them keeps the lowest ids (as greedy takes the first
    # maximum) on every device; the default sort leaves the order of ties to the implementation (on the CPU, from 17
    # entries, not the ids').
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    # Top-k by value, not by rank: every token tied with the k-th largest logit stays, as in transformers
    # (a rank cut would keep an arbitrary few of the tied tokens; bf16 logits tie often).
    kth = sorted_logits.gather(1, top_k.long().clamp(1, vocab) - 1)
    drop = sorted_logits < kth
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token if the mass before it is below top_p; the first token is always kept.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop |= (mass_before >= top_p) & (top_p < 1.0)  # top_p 1.0 keeps every token, even beside filtering rows
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
