"""Every rule that refuses an engine request, stated once. Each raises ValueError naming the field."""

from __future__ import annotations

from typing import Any

from engine_service.sampling_params import MAX_LOGIT_BIAS_TOKENS, MAX_STOP_TOKEN_IDS, SamplingParams

# proto field name -> SamplingParams field name (the same today; kept explicit so a rename is one line).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "ignore_eos",
                   "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_logprobs",
                   "priority")
MAX_REQUEST_ID_LEN = 256
# ResponseFormat's numbers (engine.proto) -> SamplingParams.response_format.
RESPONSE_FORMATS_BY_NUMBER = {1: "json_object", 2: "json_schema"}


def _from_float32(value: float) -> float:
    """A float that arrived as float32, as the client wrote it: 0.7 stays 0.7, not 0.699999988."""
    return float(f"{value:.7g}")


def sampling_params_from_proto(proto: Any, defaults: dict[str, object]) -> SamplingParams:
    """Set proto fields win, then generation_config.json defaults, then SamplingParams' own defaults."""
    values: dict[str, object] = {k: v for k, v in defaults.items() if k in SAMPLING_FIELDS}
    for name in SAMPLING_FIELDS:
        if proto.HasField(name):
            values[name] = getattr(proto, name)
    if proto.stop_token_ids:
        if len(proto.stop_token_ids) > 16 * MAX_STOP_TOKEN_IDS:  # refused before it is copied out
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids, got "
                             f"{len(proto.stop_token_ids)}")
        values["stop_token_ids"] = tuple(proto.stop_token_ids)
    if proto.logit_bias:
        if len(proto.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(proto.logit_bias)}")
        values["logit_bias"] = {t: _from_float32(b) for t, b in proto.logit_bias.items()}
    if proto.response_format:
        if proto.response_format not in RESPONSE_FORMATS_BY_NUMBER:
            raise ValueError(f"response_format {proto.response_format} is not one this engine knows: 0 (text), 1 "
                             "(json_object) or 2 (json_schema)")
        values["response_format"] = RESPONSE_FORMATS_BY_NUMBER[proto.response_format]
    if proto.json_schema:
        values["json_schema"] = proto.json_schema
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in values and isinstance(values[name], float):
            values[name] = _from_float32(values[name])
    try:
        return SamplingParams(**values)  # type: ignore[arg-type]
    except TypeError as exc:  # a generation_config value of the wrong type
        raise ValueError(f"sampling_params: {exc}") from exc


def check_request_id(request_id: str) -> None:
    if not request_id:
        raise ValueError("request_id must not be empty")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")


def check_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The prompt must be non-empty, shorter than max_model_len, and inside the vocabulary."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt_token_ids must not be empty")
    if n >= max_model_len:
        raise ValueError(
            f"prompt_token_ids has {n} tokens, but max_model_len is {max_model_len}: "
            f"at most {max_model_len - 1} prompt tokens leave room to generate one"
        )
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:  # C loops; find the index only on failure
        i, t = next((i, t) for i, t in enumerate(prompt_token_ids) if not 0 <= t < vocab_size)
        raise ValueError(f"prompt_token_ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")


def check_deadline_ms(deadline_ms: int) -> float | None:
    """Seconds until the deadline, or None for no deadline."""
    return deadline_ms / 1000.0 if deadline_ms > 0 else None
