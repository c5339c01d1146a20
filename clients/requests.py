"""Build text-API requests from plain Python values (no protobuf knowledge needed by callers)."""

from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import struct
from collections.abc import Callable, Iterable, Mapping, Set
from typing import Any, TypeVar

from protos.llmserve.text.v1 import text_pb2 as pb

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "ignore_eos",
                   "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_logprobs",
                   "priority")

RESPONSE_FORMATS = {"text": pb.RESPONSE_FORMAT_TEXT, "json_object": pb.RESPONSE_FORMAT_JSON_OBJECT,
                    "json_schema": pb.RESPONSE_FORMAT_JSON_SCHEMA}


_Builder = TypeVar("_Builder", bound=Callable)


def put_token_ids(field: object, values: object, where: str, ordered: bool = True) -> None:
    """Extend a repeated int32 field with token ids. ordered (a prompt): a set or dict has no order (and a set no
    repeats), so it is refused. An id the protocol cannot carry is named with its index, where protobuf said only
    "Value out of range". What is not a collection of ids at all (a bare id, None) is named too, where protobuf said
    "'int' object is not iterable". A mapping is refused either way (iterated, its keys alone were taken), and so
    are bytes in any form (iterated, they were their byte values) and a 0-d array or tensor (one id, not a list)."""
    if (isinstance(values, str | bytes | bytearray | memoryview | Mapping) or not isinstance(values, Iterable)
            or getattr(values, "ndim", None) == 0 or (ordered and isinstance(values, Set))):
        hint = " (logit_bias is the field that maps token ids to values)" if isinstance(values, Mapping) else ""
        raise ValueError(f"{where} must be a list of integer token ids (a list, tuple, array or tensor), not a "
                         f"{type(values).__name__}{hint}")
    try:
        field.extend(values)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        for i, t in enumerate(values):  # type: ignore[arg-type]
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not -2**31 <= t < 2**31:
                raise ValueError(f"{where}[{i}]={t!r}: token ids are integers the protocol carries as signed 32-bit, "
                                 "in [-2**31, 2**31)") from None
        raise ValueError(f"{where}: {exc}") from None


def _not_utf8(where: str, value: object) -> str | None:
    """Where in value (a string or bytes, or dicts, lists and tuples of them) text that is not valid UTF-8 is, else
    None."""
    if isinstance(value, str | bytes):
        try:
            value.encode("utf-8") if isinstance(value, str) else value.decode("utf-8")
        except UnicodeError as exc:
            unit = "character" if isinstance(value, str) else "byte"
            return f"{where} ({unit} {exc.start}, {value[exc.start:exc.end]!r})"  # type: ignore[attr-defined]
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _not_utf8(f"{where} key {key!r}", key) or _not_utf8(f"{where}[{key!r}]", item)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _not_utf8(f"{where}[{i}]", item)
            if found:
                return found
    return None


def names_bad_text(build: _Builder) -> _Builder:
    """The request builder, refusing text that protobuf cannot carry by name: a lone surrogate (Python's stand-in
    for bytes that are not UTF-8, as a command-line argument can hold) raised protobuf's UnicodeEncodeError, and
    bytes that are not UTF-8 its UnicodeDecodeError, which named neither the argument nor the cause."""
    signature = inspect.signature(build)

    @functools.wraps(build)
    def checked(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except (UnicodeEncodeError, UnicodeDecodeError) as exc:
            bound = signature.bind_partial(*args, **kwargs).arguments
            for name, value in bound.items():
                kind = signature.parameters[name].kind
                values = value.items() if kind is inspect.Parameter.VAR_KEYWORD else [(name, value)]
                found = next(filter(None, (_not_utf8(n, v) for n, v in values)), None)
                if found:
                    raise ValueError(f"{found} is not valid UTF-8 text: bytes that are not UTF-8, or a lone "
                                     "surrogate, Python's stand-in for them (from a command-line argument, or a "
                                     "file read with errors='surrogateescape'); requests carry UTF-8 text only"
                                     ) from None
            raise ValueError(f"a text field is not valid UTF-8: {exc}") from None
    return checked  # type: ignore[return-value]


def flag(name: str, value: object) -> bool | None:
    """A True/False keyword, or None (the service's default), refused by name otherwise: protobuf took 2 as True
    and said of "no" only "'str' object cannot be interpreted as an integer"."""
    if isinstance(value, bool) or value is None:
        return value
    raise ValueError(f"{name} must be True, False or None (the default), got {value!r}")


def _schema_text(value: object, where: str) -> str:
    """A JSON Schema's text, from a dict or its text (the engine parses and checks the rest)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON Schema (a dict or its JSON text), got {type(value).__name__}")
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:  # a set, bytes or an object json cannot write
        raise ValueError(f"{where} must be a JSON Schema (a dict or its JSON text): {exc}") from None


SAMPLING_KEYWORDS = SAMPLING_FIELDS + ("stop_token_ids", "logit_bias", "response_format", "json_schema")


def _check_float32(value: object) -> None:
    """A number the protocol's 32-bit float cannot carry as written is refused (ValueError, the caller names the
    field): an integer past a float's range (10**400: protobuf's bare OverflowError named no field), and a finite
    number it carries as inf (1e40) or 0 (1e-50), for which the service answered about a value the caller never
    wrote ("temperature must be finite ..., got inf"). inf and nan as written pass, for the service's own rule."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return  # protobuf names the wrong type
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("too large for a number the protocol carries") from None
    if not math.isfinite(number):
        return
    carried = struct.unpack("f", struct.pack("f", number))[0]
    if math.isinf(carried):
        raise ValueError("too large for the protocol's 32-bit float (|x| <= 3.4e38)")
    if carried == 0.0 and number != 0.0:
        raise ValueError("too small for the protocol's 32-bit float, which would carry it as 0 (|x| >= 1.4e-45, "
                         "or 0)")


def set_sampling_field(params: Any, name: str, value: object) -> None:
    """params.name = value, for either protocol's SamplingParams (a repeated or map field from an iterable), refused
    with a ValueError naming the field where protobuf's own words named none: a bool for a number (protobuf took
    temperature=True as 1.0), an integer past the field's protobuf type (before the service checks its own range),
    a value of the wrong type."""
    field = params.DESCRIPTOR.fields_by_name[name]
    try:
        if isinstance(value, bool) and field.type != field.TYPE_BOOL:
            raise TypeError("a number, not a bool")
        if field.type == field.TYPE_BOOL and not isinstance(value, bool):  # protobuf took 3 (and -1) as True
            raise TypeError("must be True or False")
        if field.type == field.TYPE_FLOAT:
            _check_float32(value)
        params.MergeFrom(type(params)(**{name: value}))  # an optional field set to its zero stays set
    except (TypeError, ValueError) as exc:
        bits = {field.TYPE_INT32: 32, field.TYPE_INT64: 64}.get(field.type)
        if bits and isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"sampling parameter {name}={value!r}: out of the range the protocol carries, a "
                             f"signed {bits}-bit integer in [-2**{bits - 1}, 2**{bits - 1})") from None
        raise ValueError(f"sampling parameter {name}={value!r}: {exc}") from None


@names_bad_text
def sampling_params(**kwargs: object) -> pb.SamplingParams:
    """SamplingParams with only the given fields set; the rest stay unset (the model's defaults). A name that is no
    sampling parameter is refused whatever its value: checked only past the None skip, a typo holding None (an
    option forwarded unset) went out without a word."""
    params = pb.SamplingParams()
    for name, value in kwargs.items():
        if name not in SAMPLING_KEYWORDS:
            hint = ("; a call's deadline is deadline_ms (milliseconds), or the client's timeout"
                    if name in ("timeout", "deadline") else "")
            raise TypeError(f"unknown sampling parameter {name!r}{hint}; known: {SAMPLING_KEYWORDS}")
        if value is None:
            continue
        if name == "stop_token_ids":
            put_token_ids(params.stop_token_ids, value, "stop_token_ids", ordered=False)  # a set is fine
        elif name == "logit_bias":  # {token id: bias}, or (id, bias) pairs
            try:
                pairs = list(value.items() if isinstance(value, Mapping) else value)  # type: ignore[union-attr]
                for token, bias in pairs:
                    _check_float32(bias)  # before protobuf takes it: 10**400 raised its bare OverflowError
                    params.logit_bias[token] = bias
            except (TypeError, ValueError) as exc:
                raise ValueError(f"sampling parameter logit_bias={value!r}: {exc}") from None
            if len(params.logit_bias) < len(pairs):
                raise ValueError(f"sampling parameter logit_bias={value!r}: a token id given twice")
        elif name == "response_format":  # "text", "json_object", "json_schema", or OpenAI's {"type": ...}
            kind = value.get("type") if isinstance(value, Mapping) else value
            if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:  # a list: "unhashable type"
                raise ValueError(f"sampling parameter response_format={value!r}: must be one of "
                                 f"{sorted(RESPONSE_FORMATS)} (or {{'type': one of them}})")
            params.response_format = RESPONSE_FORMATS[kind]  # type: ignore[index]
            if kind == "json_schema" and isinstance(value, Mapping) and "json_schema" in value:
                inner = value["json_schema"]  # OpenAI's {"json_schema": {"name": ..., "schema": {...}}}
                schema = inner.get("schema") if isinstance(inner, Mapping) else None
                if schema is None:
                    raise ValueError("sampling parameter response_format: 'json_schema' must be {'schema': {...}, "
                                     "...}")
                params.json_schema = _schema_text(schema, "sampling parameter response_format's json_schema.schema")
        elif name == "json_schema":  # a dict, or JSON text
            params.json_schema = _schema_text(value, "sampling parameter json_schema")
        else:
            set_sampling_field(params, name, value)
    return params


def _json_text(value: object, where: str) -> str:
    """A JSON object's text, from the object or its text (sent as is: the service parses and checks it)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object (a dict or its text), got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a JSON object: {exc}") from None


def _tool_call(where: str, call: object) -> pb.ToolCall:
    """{"name": ..., "arguments": {...}, "id"?}, or OpenAI's {"id"?, "type": "function", "function": {"name",
    "arguments"}}."""
    call_id = call.get("id") if isinstance(call, Mapping) else None
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        call = call["function"]
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
        raise ValueError(f"{where} must be {{'name': str, 'arguments': a JSON object}}, got {call!r}")
    if call_id is not None and not isinstance(call_id, str):
        raise ValueError(f"{where}.id must be a string, got {call_id!r}")
    return pb.ToolCall(name=call["name"], arguments=_json_text(call.get("arguments", {}), f"{where}.arguments"),
                       id=call_id or "")


def _message(i: int, m: Mapping[str, object]) -> pb.ChatMessage:
    """One message; content is a string or OpenAI-style text parts [{"type": "text", "text": ...}], joined; an
    assistant message may carry its tool_calls."""
    if not isinstance(m, Mapping):  # a string's letters were taken for keys: "unknown keys ['h', 'i']"
        raise ValueError(f"messages[{i}] must be a message, a dict {{'role': ..., 'content': ...}}, got "
                         f"{type(m).__name__}")
    unknown = sorted(set(m) - {"role", "content", "tool_calls", "tool_call_id"})
    if unknown:
        raise ValueError(f"messages[{i}] has unknown keys {unknown}; a message is {{'role', 'content'}}, with "
                         "'tool_calls' on an assistant message and 'tool_call_id' on a tool message")
    content = m.get("content")
    if content is None and m.get("tool_calls"):  # OpenAI's assistant message that only calls tools
        content = ""
    if isinstance(content, list | tuple):
        if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"messages[{i}].content: a list must hold text parts {{'type': 'text', 'text': str}}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not isinstance(m.get("role"), str):
        raise ValueError(f"messages[{i}] needs a string 'role' and 'content' (text, or a list of text parts); "
                         f"got {m!r}")
    calls = m.get("tool_calls") or ()
    if isinstance(calls, str | bytes | Mapping) or not isinstance(calls, Iterable):
        raise ValueError(f"messages[{i}].tool_calls must be a list of calls, got {type(calls).__name__}")
    call_id = m.get("tool_call_id") or ""
    if not isinstance(call_id, str):
        raise ValueError(f"messages[{i}].tool_call_id must be a string, got {call_id!r}")
    return pb.ChatMessage(role=m["role"], content=content, tool_call_id=call_id,
                          tool_calls=[_tool_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(calls)])


@names_bad_text
def chat(messages: Iterable[Mapping[str, object]], enable_thinking: bool | None = None,
         tools: Iterable[object] | None = None, template_kwargs: Mapping[str, object] | str | None = None,
         continue_final_message: bool = False) -> pb.Chat:
    """A Chat from messages ({"role": ..., "content": ...}), the template's thinking switch, if given, the tools
    the model may call (JSON objects, as dicts or text; OpenAI's {"type": "function", "function": {...}} shape),
    further template variables (a dict or its JSON text, e.g. {"date_string": "26 Jul 2024"}), and whether the
    last message, an assistant's, is the start of the reply for the model to continue."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable):  # one message, bare, was
        # iterated key by key: "messages[0] has unknown keys ['e', 'l', 'o', 'r']", the letters of 'role'
        raise ValueError(f"messages must be a list of messages ({{'role': ..., 'content': ...}} dicts), got a "
                         f"{type(messages).__name__}")
    if isinstance(tools, str | bytes | Mapping) or (tools is not None and not isinstance(tools, Iterable)):
        raise ValueError(f"tools must be a list of JSON objects, got {type(tools).__name__}")
    result = pb.Chat(messages=[_message(i, m) for i, m in enumerate(messages)],
                     tools=[_json_text(t, f"tools[{j}]") for j, t in enumerate(tools or ())])
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool):  # protobuf's own words: "'str' object cannot be interpreted..."
            raise ValueError(f"enable_thinking must be True, False or None (the template's default), got "
                             f"{enable_thinking!r}")
        result.enable_thinking = enable_thinking
    if template_kwargs is not None and not (isinstance(template_kwargs, str | Mapping) and not template_kwargs):
        result.template_kwargs = _json_text(template_kwargs, "template_kwargs")  # 0 or [] named, not dropped
    result.continue_final_message = bool(flag("continue_final_message", continue_final_message))  # None: unset
    return result


def _stop_strings(stop: object) -> list[str]:
    """`stop`: one stop string or several (None: none)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, bytes | Mapping) or not isinstance(stop, Iterable):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    try:
        strings = list(stop)
    except TypeError:  # a 0-d array is Iterable by type yet cannot be iterated
        raise ValueError(f"stop must be a string or a list of strings, got a {type(stop).__name__} that cannot be "
                         "iterated") from None
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise ValueError(f"stop[{i}] must be a string, got {s!r} (stop is a string or a list of strings)")
    return strings


@names_bad_text
def generate_request(prompt: str | None = None, messages: Iterable[Mapping[str, str]] | None = None, *,
                     prompt_token_ids: Iterable[int] | None = None,
                     request_id: str = "", stop: str | Iterable[str] | None = (), skip_special_tokens: bool | None = None,
                     include_stop_str_in_output: bool = False, deadline_ms: int | None = None,
                     enable_thinking: bool | None = None, tools: Iterable[object] | None = None,
                     template_kwargs: Mapping[str, object] | str | None = None,
                     continue_final_message: bool = False,
                     add_special_tokens: bool | None = None, n: int | None = None,
                     **sampling: object) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt, chat messages ({"role": ..., "content": ...}) or token ids, and sampling
    kwargs. `stop` is one stop string or several; `enable_thinking` (chat only) sets the chat template's thinking
    switch (Qwen3's); `tools` and `template_kwargs` (chat only) the tools the model may call and further template
    variables (see chat); `continue_final_message` (chat only) continues the last message, an assistant's, the
    start of the reply, instead of opening a new turn; `add_special_tokens`
    (None: the service's default, True for a prompt and False for a chat) whether the tokenizer adds its special
    tokens, such as Llama's BOS; `n` (None: 1) the completions of the prompt, each streamed on its own index."""
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages and prompt_token_ids")
    # Wrong types are named here: protobuf's "bad argument type for built-in operation" named nothing.
    if prompt is not None and not isinstance(prompt, str | bytes):
        raise ValueError(f"prompt must be a string (text), got {type(prompt).__name__}")
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        request_id = str(request_id)  # as TextClient.generate's request_id= takes one
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {request_id!r}")
    request = pb.GenerateRequest(request_id=request_id, sampling_params=sampling_params(**sampling),
                                 stop=_stop_strings(stop),
                                 include_stop_str_in_output=bool(flag("include_stop_str_in_output",
                                                                      include_stop_str_in_output)))
    skip_special_tokens = flag("skip_special_tokens", skip_special_tokens)
    add_special_tokens = flag("add_special_tokens", add_special_tokens)
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        put_token_ids(request.prompt_token_ids.ids, prompt_token_ids, "prompt_token_ids")
    else:
        request.chat.CopyFrom(chat(messages, enable_thinking, tools, template_kwargs, continue_final_message))
    if (enable_thinking is not None or tools or template_kwargs or continue_final_message) and messages is None:
        raise ValueError("enable_thinking, tools, template_kwargs and continue_final_message apply to chat messages "
                         "only")
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    if add_special_tokens is not None:
        if prompt_token_ids is not None:
            raise ValueError("add_special_tokens applies to a prompt or messages; prompt_token_ids are sent as they are")
        request.add_special_tokens = add_special_tokens
    if n is not None:
        # numbers.Integral: a numpy integer, as every sampling field takes it
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 16:
            raise ValueError(f"n must be an int from 1 to 16 (completions of the prompt), got {n!r}")
        request.n = int(n)
    if deadline_ms is not None:
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Integral) or deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be a positive number of milliseconds, or None for no deadline; got "
                             f"{deadline_ms!r}")
        request.deadline_ms = min(int(deadline_ms), 2**64 - 1)
    return request


# A tokenizer service lists in this header of its responses the request options it honours (applies, or refuses
# with FAILED_PRECONDITION where no engine can): one that predates an option drops it without a word, so the
# clients check a request's options against the header and raise OptionsNotHonoured rather than hand back text
# made without them (a rolling upgrade that reached the clients before the services).
OPTIONS_HEADER = "x-llmserve-options"


class OptionsNotHonoured(RuntimeError):
    """The tokenizer service that answered predates options the request used: it would ignore them."""


def options_used(request: pb.GenerateRequest | pb.TokenizeRequest) -> set[str]:
    """The options of a request that a service predating them would drop silently, by their OPTIONS_HEADER names.
    Every service that sends the header honours these (add_special_tokens too, which it lists but which is not
    checked: the first release with the header left it out of the list); the check is for options added since."""
    used = set()
    if request.HasField("chat"):
        chat_ = request.chat
        used.update(name for name, on in (("tools", chat_.tools), ("template_kwargs", chat_.template_kwargs),
                                          ("enable_thinking", chat_.HasField("enable_thinking")),
                                          ("continue_final_message", chat_.continue_final_message)) if on)
    if isinstance(request, pb.GenerateRequest):
        if request.n > 1:
            used.add("n")
        used |= sampling_options(request.sampling_params)
    return used


_FORMATS = {pb.RESPONSE_FORMAT_JSON_OBJECT: "json_object", pb.RESPONSE_FORMAT_JSON_SCHEMA: "json_schema"}


def sampling_options(params) -> set[str]:
    """The options among a SamplingParams' that need an engine (or a service) that applies them, by their feature
    names (ModelInfo.features): of the text API's SamplingParams or the engine API's, which share the fields and
    the response_format numbers."""
    used = {name for name in ("logprobs", "prompt_logprobs") if params.HasField(name)}
    if any(params.logit_bias.values()):  # biases of 0 change nothing
        used.add("logit_bias")
    off = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if any(params.HasField(name) and getattr(params, name) != value for name, value in off.items()):
        used.add("penalties")
    if params.response_format in _FORMATS:
        used.add(_FORMATS[params.response_format])
    return used


def check_options(used: frozenset[str] | set[str], headers: Iterable[tuple[str, str]] | None, target: str) -> None:
    """OptionsNotHonoured when the service's OPTIONS_HEADER (in a response's headers) lacks one of `used`. A service
    that sends no such header predates the header itself, not necessarily the options (services before it honoured
    n, tools, logprobs...): it is trusted, as clients always did."""
    listed = dict(headers or ()).get(OPTIONS_HEADER)
    if not used or listed is None:
        return
    missing = sorted(used - set(listed.split(",")))
    if missing:
        raise OptionsNotHonoured(
            f"the tokenizer service at {target} honours only {listed}: it predates {', '.join(missing)} and would "
            f"ignore {'it' if len(missing) == 1 else 'them'} without a word; upgrade it (a rolling upgrade: wait "
            "until it is done), or send the request without them")
