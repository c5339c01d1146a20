"""Build text-API requests from plain Python values (no protobuf knowledge needed by callers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from protos.llmserve.text.v1 import text_pb2 as pb

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "ignore_eos",
                   "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_logprobs")


def sampling_params(**kwargs: object) -> pb.SamplingParams:
    """SamplingParams with only the given fields set; the rest stay unset (the model's defaults)."""
    params = pb.SamplingParams()
    for name, value in kwargs.items():
        if value is None:
            continue
        if name == "stop_token_ids":
            params.stop_token_ids.extend(value)  # type: ignore[arg-type]
        elif name == "logit_bias":  # {token id: bias}, or (id, bias) pairs
            pairs = list(value.items() if isinstance(value, Mapping) else value)  # type: ignore[union-attr]
            try:
                params.logit_bias.update(pairs)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"sampling parameter logit_bias={value!r}: {exc}") from None
            if len(params.logit_bias) < len(pairs):
                raise ValueError(f"sampling parameter logit_bias={value!r}: a token id given twice")
        elif name in SAMPLING_FIELDS:
            try:
                setattr(params, name, value)
            except (TypeError, ValueError) as exc:  # protobuf's own words name no field
                raise ValueError(f"sampling parameter {name}={value!r}: {exc}") from None
        else:
            raise TypeError(f"unknown sampling parameter {name!r}; known: "
                            f"{SAMPLING_FIELDS + ('stop_token_ids', 'logit_bias')}")
    return params


def _message(i: int, m: Mapping[str, object]) -> pb.ChatMessage:
    """One message; content is a string or OpenAI-style text parts [{"type": "text", "text": ...}], joined."""
    unknown = sorted(set(m) - {"role", "content"})
    if unknown:
        raise ValueError(f"messages[{i}] has unknown keys {unknown}; a message is {{'role', 'content'}} only")
    content = m.get("content")
    if isinstance(content, list | tuple):
        if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"messages[{i}].content: a list must hold text parts {{'type': 'text', 'text': str}}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not isinstance(m.get("role"), str):
        raise ValueError(f"messages[{i}] needs a string 'role' and 'content' (text, or a list of text parts); "
                         f"got {m!r}")
    return pb.ChatMessage(role=m["role"], content=content)


def chat(messages: Iterable[Mapping[str, object]], enable_thinking: bool | None = None) -> pb.Chat:
    """A Chat from messages ({"role": ..., "content": ...}) and the template's thinking switch, if given."""
    result = pb.Chat(messages=[_message(i, m) for i, m in enumerate(messages)])
    if enable_thinking is not None:
        result.enable_thinking = enable_thinking
    return result


def generate_request(prompt: str | None = None, messages: Iterable[Mapping[str, str]] | None = None, *,
                     prompt_token_ids: Iterable[int] | None = None,
                     request_id: str = "", stop: str | Iterable[str] | None = (), skip_special_tokens: bool | None = None,
                     include_stop_str_in_output: bool = False, deadline_ms: int | None = None,
                     enable_thinking: bool | None = None, **sampling: object) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt, chat messages ({"role": ..., "content": ...}) or token ids, and sampling
    kwargs. `stop` is one stop string or several; `enable_thinking` (chat only) sets the chat template's thinking
    switch (Qwen3's)."""
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages and prompt_token_ids")
    request = pb.GenerateRequest(request_id=request_id, sampling_params=sampling_params(**sampling),
                                 stop=[stop] if isinstance(stop, str) else list(stop or ()),
                                 include_stop_str_in_output=include_stop_str_in_output)
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    else:
        request.chat.CopyFrom(chat(messages, enable_thinking))
    if enable_thinking is not None and messages is None:
        raise ValueError("enable_thinking applies to chat messages only")
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    if deadline_ms is not None:
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int) or deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be a positive number of milliseconds, or None for no deadline; got "
                             f"{deadline_ms!r}")
        request.deadline_ms = min(deadline_ms, 2**64 - 1)
    return request
