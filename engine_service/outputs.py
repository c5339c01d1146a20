"""What one engine step reports per request."""

from __future__ import annotations

from dataclasses import dataclass, field

# Finish reasons, as the services report them.
FINISH_STOP = "stop"  # an EOS id or a stop token id was sampled
FINISH_LENGTH = "length"  # max_tokens, or max_model_len reached
FINISH_ABORT = "abort"  # abort_request() was called
FINISH_ERROR = "error"  # the step failed for this request (NaN logits, exception); see `error`


@dataclass(slots=True)
class TokenLogprobs:
    """One generated token's log-probability and the most likely tokens' (SamplingParams.logprobs of them)."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class StepOutput:
    """New tokens of one request from one step(); finish_reason is set on its last output."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked for them
    # One per prompt token after the first (its logprob given the tokens before it), on the request's first output
    # with a token, when it asked for them (SamplingParams.prompt_logprobs).
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
