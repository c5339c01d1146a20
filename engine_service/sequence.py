"""A request's state inside the engine: its tokens, phase, block table and sampling parameters.

Pure Python: no torch, no grpc.
"""

from __future__ import annotations

from enum import Enum, auto

from engine_service.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()  # queued, or preempted and requeued; holds no blocks
    RUNNING = auto()  # admitted: prefilling in chunks or decoding; holds blocks
    FINISHED = auto()


class Sequence:
    """One request. `token_ids` is the prompt followed by the generated tokens.

    KV for token_ids[:num_computed_tokens] is in the cache. A running sequence whose
    num_computed_tokens == len(token_ids) - 1 is decoding (its last sampled token is the next input);
    fewer computed tokens than that means it is still prefilling (the prompt, or a recompute after
    preemption).
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "params",
        "max_len",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "block_hashes",
        "hash_chain",
        "finish_reason",
        "admit_order",
        "prompt_logprobs",
        "num_prompt_logprobs",
    )

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, max_model_len: int):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.params = params
        # The sequence may never hold more tokens than this: max_tokens or max_model_len, whichever first.
        self.max_len = min(len(prompt) + params.max_tokens, max_model_len)
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Hashes of this sequence's full blocks, in order, as far as they have been computed.
        self.block_hashes: list[int] = []
        # Hashes of token_ids' full blocks, from the first, as far as they have been asked for (BlockManager.
        # chain_hash). token_ids only grow, so they stay valid: a request waiting at the head is not re-hashed
        # every step.
        self.hash_chain: list[int] = []
        self.finish_reason: str | None = None
        self.admit_order = -1  # set at each admission by the scheduler; -1: never admitted yet
        # Logprobs of prompt tokens 1, 2, ... as far as computed (num_prompt_logprobs of them), in host tensors a
        # chunk each (sampler.LogprobRows: a TokenLogprobs takes 7 times the memory), when the request asked for
        # them; None once handed out with the first generated token, and when it did not ask.
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None
        self.num_prompt_logprobs = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.status is Status.RUNNING and self.num_uncomputed_tokens == 1

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """The positions in [start, end) whose logits give a prompt token's logprob not yet computed (position p's
        logits predict token p + 1). Only while prompt_logprobs is a list."""
        return range(max(start, self.num_prompt_logprobs), min(end, self.num_prompt_tokens - 1))

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, len={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
