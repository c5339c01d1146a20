"""A tiny stand-in with LLMEngine's step API (docs/ENGINE_API.md), for testing the service layer alone.

Each request's next token is (previous token + 1) % vocab_size; it holds ceil(tokens / block_size) blocks.
"""

from __future__ import annotations

import math
import time

from engine_service.outputs import StepOutput
from engine_service.sampling_params import SamplingParams


class FakeEngine:
    def __init__(
        self,
        vocab_size: int = 100,
        max_model_len: int = 64,
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 4,
        eos: int = 99,
        step_s: float = 0.002,
        script: list[int] | None = None,
    ) -> None:
        self.step_s = step_s  # a step takes time, as a real one does
        self.script = script  # the tokens every request generates, in order; default: the last token + 1
        self.model_info = dict(
            model_name="fake",
            vocab_size=vocab_size,
            eos_token_ids=[eos],
            max_model_len=max_model_len,
            block_size=block_size,
        )
        self.generation_defaults: dict[str, object] = {}
        self.num_blocks, self.max_num_seqs = num_blocks, max_num_seqs
        self.waiting: list[str] = []
        self.running: list[str] = []
        self.reqs: dict[str, tuple[list[int], SamplingParams, int]] = {}  # tokens, params, prompt length
        self.aborted: list[str] = []
        self.closed = False

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        if request_id in self.reqs:
            raise ValueError(f"request_id {request_id!r} is already live")
        if len(prompt_token_ids) >= self.model_info["max_model_len"]:
            raise ValueError("prompt too long")
        self.reqs[request_id] = (list(prompt_token_ids), sampling_params, len(prompt_token_ids))
        self.waiting.append(request_id)

    def abort_request(self, request_id: str) -> bool:
        if request_id not in self.reqs:
            return False
        del self.reqs[request_id]
        for q in (self.waiting, self.running):
            if request_id in q:
                q.remove(request_id)
        self.aborted.append(request_id)
        return True

    def displaceable(self, priority: int) -> tuple[str, int] | None:
        """As LLMEngine.displaceable: the newest waiting request of the highest priority value above `priority` (a
        waiting request here has produced nothing; this fake's queue is in arrival order, the scheduler's in
        priority order)."""
        highest = max((self.reqs[rid][1].priority for rid in self.waiting), default=priority)
        if highest <= priority:
            return None
        return next((rid, highest) for rid in reversed(self.waiting) if self.reqs[rid][1].priority == highest)

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs) or bool(self.aborted)

    def step(self, on_launch=None) -> list[StepOutput]:
        if on_launch is not None:
            on_launch()  # as the real engine does, just before its forward pass
        time.sleep(self.step_s)
        outputs = [StepOutput(rid, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        for rid in list(self.running):
            tokens, params, n_prompt = self.reqs[rid]
            if self.script:
                token = self.script[(len(tokens) - n_prompt) % len(self.script)]
            else:
                token = (tokens[-1] + 1) % self.model_info["vocab_size"]
            tokens.append(token)
            done = len(tokens) - n_prompt
            reason = None
            if (
                (token in self.model_info["eos_token_ids"] and not params.ignore_eos or token in params.stop_token_ids)
                and done >= params.min_tokens
            ):
                reason = "stop"
            elif done >= params.max_tokens or len(tokens) >= self.model_info["max_model_len"]:
                reason = "length"
            outputs.append(StepOutput(rid, [token], reason, num_prompt_tokens=n_prompt))
            if reason:
                self.running.remove(rid)
                del self.reqs[rid]
        return outputs

    def stats(self) -> dict[str, int]:
        bs = self.model_info["block_size"]
        used = sum(math.ceil(len(self.reqs[r][0]) / bs) for r in self.running)
        return dict(
            num_blocks=self.num_blocks,
            num_free_blocks=max(0, self.num_blocks - used),  # the fake holds no real blocks: never below 0
            num_cached_blocks=0,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
        )

    def close(self) -> None:
        self.closed = True
