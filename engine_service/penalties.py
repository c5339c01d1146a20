"""Repetition, presence and frequency penalties, from token counts kept on the model's device.

A request with a penalty holds a slot: a row of `output_counts` (how often it generated each token) and of
`seen` (which tokens its prompt or output holds). The row is built from the request's tokens when it first samples,
then advanced on the device by each step's sampled tokens, so no step uploads a request's history or waits for
the device (overlap scheduling included: a step scheduled ahead reads counts its predecessor has advanced).
A slot lives until its request ends; a preempted request keeps its slot while one is free, and rebuilds it from
its tokens when it samples again. Slots: max_num_seqs, since only running requests sample.

Memory: max_num_seqs x vocabulary x 5 bytes (195 MB for 256 sequences of Qwen3's 151,936 tokens), allocated at
start-up, before the KV cache is sized.
"""

from __future__ import annotations

import torch

from engine_service.host_copy import to_device
from engine_service.sequence import Sequence, Status


class Penalties:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device):
        self.device = device
        self.output_counts = torch.zeros((num_slots, vocab_size), dtype=torch.int32, device=device)
        self.seen = torch.zeros((num_slots, vocab_size), dtype=torch.bool, device=device)
        self._free = list(range(num_slots - 1, -1, -1))
        self._owners: dict[str, tuple[int, Sequence]] = {}  # request id -> (slot, its sequence)

    def slot(self, seq: Sequence) -> int:
        """The sequence's slot, built from its tokens if it has none. Called when its step is launched: its
        token_ids are then complete (a step scheduled ahead only samples sequences that already hold a slot)."""
        owned = self._owners.get(seq.request_id)
        if owned is not None:
            return owned[0]
        slot = self._take()
        self._owners[seq.request_id] = (slot, seq)
        tokens = to_device(seq.token_ids, torch.long, self.device)
        self.seen[slot].zero_().index_fill_(0, tokens, True)
        counts = self.output_counts[slot].zero_()
        if seq.num_output_tokens:  # rebuilt after preemption took its slot
            output = tokens[seq.num_prompt_tokens :]
            counts.index_put_((output,), torch.ones_like(output, dtype=torch.int32), accumulate=True)
        return slot

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        # Every slot is held: at least one holder is not running (preempted), since running sequences number
        # at most max_num_seqs. It rebuilds its slot when it samples again.
        for request_id, (slot, seq) in self._owners.items():
            if seq.status is not Status.RUNNING:
                del self._owners[request_id]
                return slot
        raise RuntimeError("penalty slots: every slot is held by a running sequence (more than max_num_seqs)")

    def release(self, request_id: str) -> None:
        """The request ended: its slot is free (rebuilt, zeroed first, by its next holder)."""
        owned = self._owners.pop(request_id, None)
        if owned is not None:
            self._free.append(owned[0])

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, params: torch.Tensor,
              repetition: bool = True, counted: bool = True) -> None:
        """Penalise logits[rows] in place. rows, slots: [p] int64; params: [p, 3] = repetition, presence,
        frequency penalty, in float32 or the logits' wider dtype. Computed in that dtype (as transformers does in
        float32; a bf16 1.05 would be 1.0547), and written back clamped to the logits' dtype (an extreme penalty
        saturates fp16 rather than making inf). repetition / counted: whether any row has a repetition penalty /
        a presence or frequency penalty; the passes over the vocabulary of the other are skipped."""
        x = logits[rows].to(params.dtype)  # [p, V]
        if repetition:
            # transformers' rule: a seen token's positive logit is divided by the penalty, a negative one multiplied.
            rep = params[:, 0:1]
            x = torch.where(self.seen[slots], torch.where(x > 0, x / rep, x * rep), x)
        if counted:
            counts = self.output_counts[slots]  # [p, V] int32
            x -= params[:, 1:2] * (counts > 0) + params[:, 2:3] * counts
        limit = torch.finfo(logits.dtype).max
        logits[rows] = x.clamp_(-limit, limit).to(logits.dtype)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's sampled token in its slot. slots, tokens: [p] int64 on the device; slots distinct."""
        self.output_counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
