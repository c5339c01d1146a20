"""Every rule that refuses a text request, stated once as a table; each raises ValueError naming the field.

Each row of RULES names the field, states the rule in words, and checks it. A broken rule raises
ValueError("<field>: <rule> (<what was sent>)"), which the servicer maps to INVALID_ARGUMENT. A rule's text
names each limit with its value ("at most 8388608 bytes of UTF-8 (max_prompt_bytes)").

The rules run in three stages:
- "request": on the request as received, before any tokenization (cheap, so garbage is refused early);
- "prompt_tokens": on the prompt's token ids, once tokenized (needs the engine's `max_model_len`); a prompt that
  part of its text already shows too long is refused without tokenizing the rest (see tokens_at_least);
- "detokenize": on the ids of a Detokenize call (needs the vocabulary size).

Numeric sampling parameters (temperature, top_p, max_tokens, ...) are NOT checked here. Their single source
of truth is `engine_service/sampling_params.py`, which this service must not import; the engine refuses an
invalid value with INVALID_ARGUMENT naming the field, and that status comes back to the client unchanged.
One copy means the two services can never disagree about what is valid.

Below the table: turning a protocol request into a `TextRequest`, tokenizing it, and building the engine
request, all through the table. The servicer runs `check_request` before its queue check and
`tokenize_request` once admitted; `prepare` runs both in one call for tests and scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.chat import (
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    json_strings,
    render_validated,
    validate_messages,
    validate_template_kwargs,
    validate_tools,
)
from tokenizer_service.text_stream import special_ids_of
from tokenizer_service.token_bounds import encode, tokens_at_least

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024  # distinct ids; the engine's own bound (engine_service/sampling_params.py)
MAX_STOP_TOKEN_ENTRIES = 16 * MAX_STOP_TOKEN_IDS  # repeats included; the engine's own bound too
MAX_JSON_SCHEMA_BYTES = 64 * 1024  # the engine's bound on a json_schema (engine_service/json_schema.py)
MAX_LOGPROBS = 20  # the engine's bound on logprobs and prompt_logprobs (engine_service/sampling_params.py)
MAX_LOGIT_BIAS_TOKENS = 1024  # the engine's bound (engine_service/sampling_params.py)
# Wire bytes of one prompt logprob at most, and of each alternative: the engine's rule (engine_service/streams.py).
LOGPROB_BYTES, LOGPROB_BYTES_PER_ALTERNATIVE = 17, 9
MAX_N = 16  # completions of one prompt (GenerateRequest.n)
# A continued reply's last prompt ids handed to its detokenizer (PreparedRequest.prompt_tail), special tokens the
# output's decode skips left out (their text is ""): the detokenizer keeps its context_tokens (4) of them, from one
# whose text starts a whole character.
PROMPT_TAIL_TOKENS = 8
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "ignore_eos",
                   "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_logprobs",
                   "priority")
# generation_config.json keys that are sampling parameters here.
RESPONSE_FORMATS = {pb.RESPONSE_FORMAT_TEXT: engine_pb.RESPONSE_FORMAT_TEXT,
                    pb.RESPONSE_FORMAT_JSON_OBJECT: engine_pb.RESPONSE_FORMAT_JSON_OBJECT,
                    pb.RESPONSE_FORMAT_JSON_SCHEMA: engine_pb.RESPONSE_FORMAT_JSON_SCHEMA}
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                          "frequency_penalty")


@dataclass(slots=True, frozen=True)
class TextLimits:
    """Limits on request text. `max_model_len` and `vocab_size` come from the engine's model info."""

    max_prompt_bytes: int = 8 * 1024 * 1024
    max_messages: int = 4096
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_string_chars: int = MAX_STOP_STRING_CHARS
    max_model_len: int | None = None
    vocab_size: int | None = None
    max_detokenize_ids: int = 1 << 20  # a Detokenize call's ids (about 4 MB of text); larger: split the call
    # Texts refused in a chat (--chat-special-tokens refuse): special tokens' anywhere (chat.special_token_texts),
    # the template's markup tokens' outside assistant contents (chat.markup_token_texts).
    refused_chat_texts: tuple[str, ...] = ()
    refused_markup_texts: tuple[str, ...] = ()
    # An engine update's prompt logprobs, at most (a quarter of max_message_bytes): a larger one would end the call
    # to the engine that every request on it shares.
    max_prompt_logprobs_bytes: int = 16 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class TextRequest:
    """The text-side fields of a request, independent of the protocol. Unset `prompt` / `messages` are None."""

    prompt: str | None = None
    messages: Sequence[Mapping[str, object]] | None = None
    enable_thinking: bool | None = None  # chat only: the template's thinking switch; None: its default
    tools: Sequence[object] = ()  # chat only: the tools the model may call (JSON objects or their texts)
    template_kwargs: object = None  # chat only: further template variables, a JSON object or its text
    continue_final_message: bool = False  # chat only: the last (assistant) message is continued, not closed
    stop: Sequence[str] = field(default_factory=tuple)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    add_special_tokens: bool | None = None  # None: True for a prompt, False for a chat (its template writes them)
    # The chat validated and normalised, filled once by the rules and the rendering that read it (a chat's JSON can
    # be megabytes): "messages", "tools", "template_kwargs", "texts".
    normalised: dict = field(default_factory=dict, init=False, compare=False, repr=False)


# A check returns None when the rule holds, else a short description of what was sent.
Check = Callable[[Any, TextLimits], str | None]


@dataclass(slots=True, frozen=True)
class Rule:
    stage: str
    field: str
    rule: str
    check: Check


def _one_input(r: TextRequest, _: TextLimits) -> str | None:
    given = [name for name in ("prompt", "messages") if getattr(r, name) is not None]
    return None if len(given) == 1 else f"got {' and '.join(given) or 'neither'}"


def _prompt_is_text(r: TextRequest, _: TextLimits) -> str | None:
    return None if r.prompt is None or isinstance(r.prompt, str) else f"got {type(r.prompt).__name__}"


def _prompt_not_empty(r: TextRequest, _: TextLimits) -> str | None:
    return "got an empty string" if r.prompt == "" else None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _prompt_bytes(r: TextRequest, lim: TextLimits) -> str | None:
    if not isinstance(r.prompt, str):
        return None
    n = _utf8_len(r.prompt)
    return f"got {n} bytes" if n > lim.max_prompt_bytes else None


def _messages_count(r: TextRequest, lim: TextLimits) -> str | None:
    if isinstance(r.messages, Sequence) and len(r.messages) > lim.max_messages:
        return f"got {len(r.messages)}"
    return None


def _messages(r: TextRequest) -> list[dict]:
    if "messages" not in r.normalised:
        r.normalised["messages"] = validate_messages(r.messages)
    return r.normalised["messages"]


def _tools(r: TextRequest) -> list[dict]:
    if "tools" not in r.normalised:
        r.normalised["tools"] = validate_tools(r.tools) if r.tools else []
    return r.normalised["tools"]


def _template_kwargs(r: TextRequest) -> dict:
    if "template_kwargs" not in r.normalised:
        r.normalised["template_kwargs"] = validate_template_kwargs(r.template_kwargs) if r.template_kwargs else {}
    return r.normalised["template_kwargs"]


def _well_formed(normalise: Callable[[TextRequest], object]) -> Check:
    """A rule that holds when normalise(r) raises no ValueError; the error says what was wrong."""
    def check(r: TextRequest, _: TextLimits) -> str | None:
        try:
            normalise(r)
        except ValueError as e:
            return str(e)
        return None

    return check


_messages_well_formed = _well_formed(lambda r: r.messages is None or _messages(r))
_tools_well_formed = _well_formed(_tools)


def _chat_texts(r: TextRequest) -> list[tuple[str, str, list[str]]]:
    """(where, the text it adds to the prompt, the strings in it) for everything a chat puts into the prompt besides
    the template: contents, tool calls and tools. A call or a tool counts as its JSON (overhead included); its
    strings are each key and value, unescaped, as a template's tojson writes them ("\u003c|im_end|\u003e" in the
    JSON text is "<|im_end|>" in the prompt)."""
    if "texts" in r.normalised:
        return r.normalised["texts"]

    def dumped(value: object) -> str:
        return json.dumps(value, ensure_ascii=False)

    texts = []
    for i, message in enumerate(_messages(r)):
        texts.append((f"messages[{i}].content", message["content"], [message["content"]]))
        for j, call in enumerate(message.get("tool_calls", ())):
            texts.append((f"messages[{i}].tool_calls[{j}]", dumped(call), json_strings(call)))
        if "tool_call_id" in message:
            texts.append((f"messages[{i}].tool_call_id", message["tool_call_id"], [message["tool_call_id"]]))
    texts.extend((f"tools[{i}]", dumped(tool), json_strings(tool)) for i, tool in enumerate(_tools(r)))
    kwargs = _template_kwargs(r)
    if kwargs:
        texts.append(("template_kwargs", dumped(kwargs), json_strings(kwargs)))
    r.normalised["texts"] = texts
    return texts


def _messages_bytes(r: TextRequest, lim: TextLimits) -> str | None:
    if r.messages is None:
        return None
    n = sum(_utf8_len(text) for _, text, _ in _chat_texts(r))
    return f"got {n} bytes" if n > lim.max_prompt_bytes else None


_SEPARATOR = "\x00"  # between a chat's strings, joined for the special-token rule


def _messages_no_special_text(r: TextRequest, lim: TextLimits) -> str | None:
    if r.messages is None or not (lim.refused_chat_texts or lim.refused_markup_texts):
        return None
    texts, refused = _chat_texts(r), (*lim.refused_chat_texts, *lim.refused_markup_texts)
    # The template's markup tokens may stand in assistant contents, the model's own words: a prefilled reply begins
    # with its thinking or a tool call.
    markup = frozenset(lim.refused_markup_texts)
    replies = {f"messages[{i}].content" for i, m in enumerate(_messages(r)) if m["role"] == "assistant"} \
        if markup else set()
    # One search per special token over every string joined, at C speed: a string by token in Python took 5 s for a
    # 5 MB tools list of a million strings under Llama 3's 256 special tokens. A separator no special token holds
    # keeps a match inside one string; where it is found, the loop below names it.
    if not any(_SEPARATOR in text for text in refused):
        joined = _SEPARATOR.join(string for _, _, strings in texts for string in strings)
        refused = tuple(text for text in refused if text in joined)
        if markup.intersection(refused):  # found; perhaps only where it may stand
            joined = _SEPARATOR.join(string for where, _, strings in texts if where not in replies
                                     for string in strings)
            refused = tuple(text for text in refused if text not in markup or text in joined)
        if not refused:
            return None
    for where, _, strings in texts:
        for string in strings:
            for text in refused:
                if text in string and not (text in markup and where in replies):
                    return f"{where} holds {text!r}" + (", the chat template's markup" if text in markup else "")
    return None


def _stop_count(r: TextRequest, lim: TextLimits) -> str | None:
    if isinstance(r.stop, str) or not isinstance(r.stop, Sequence):
        return f"got {type(r.stop).__name__}, not a list of strings"
    return f"got {len(r.stop)}" if len(r.stop) > lim.max_stop_strings else None


def _stop_each(r: TextRequest, lim: TextLimits) -> str | None:
    for i, s in enumerate(r.stop):
        if not isinstance(s, str) or not s or len(s) > lim.max_stop_string_chars:
            shown = f"{len(s)} characters" if isinstance(s, str) and s else repr(s)
            return f"stop[{i}] is {shown}"
    return None


def _is_bool(name: str) -> Check:
    def check(r: TextRequest, _: TextLimits) -> str | None:
        value = getattr(r, name)
        return None if isinstance(value, bool) else f"got {value!r}"

    return check


@dataclass(slots=True, frozen=True)
class AtLeast:
    """A prompt's token count known only from below: part of its text showed it cannot fit max_model_len, so the
    rest was never tokenized (tokens_at_least)."""

    tokens: int

    def __len__(self) -> int:
        return self.tokens


def _tokens_not_empty(ids: Sequence[int] | AtLeast, _: TextLimits) -> str | None:
    return "got 0 tokens" if len(ids) == 0 else None


def _tokens_fit(ids: Sequence[int] | AtLeast, lim: TextLimits) -> str | None:
    # The engine must have room for at least one generated token.
    if lim.max_model_len and len(ids) >= lim.max_model_len:
        got = f"at least {len(ids)}" if isinstance(ids, AtLeast) else len(ids)
        return f"got {got} tokens, max_model_len is {lim.max_model_len}"
    return None


def _ids_count(ids: Sequence[int], lim: TextLimits) -> str | None:
    return f"got {len(ids)} ids" if len(ids) > lim.max_detokenize_ids else None


def _ids_in_vocab(ids: Sequence[int], lim: TextLimits) -> str | None:
    # At C speed when every id is a plain int in range (the protocol's ids always are ints): a Python loop over
    # a million ids holds the GIL, and so every stream of the replica, for a good part of a second.
    if ids and set(map(type, ids)) == {int} and min(ids) >= 0 and (
            lim.vocab_size is None or max(ids) < lim.vocab_size):
        return None
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            return f"token_ids[{i}] is {t!r}"
        if lim.vocab_size is not None and t >= lim.vocab_size:
            return f"token_ids[{i}] is {t}, vocabulary size is {lim.vocab_size}"
    return None


# fmt: off
RULES: tuple[Rule, ...] = (
    Rule("request", "input", "exactly one of a prompt and chat messages must be set", _one_input),
    Rule("request", "prompt", "must be a string", _prompt_is_text),
    Rule("request", "prompt", "must not be empty", _prompt_not_empty),
    Rule("request", "prompt", "must be at most {max_prompt_bytes} bytes of UTF-8 (max_prompt_bytes)", _prompt_bytes),
    Rule("request", "messages", "must hold at most {max_messages} messages (max_messages)", _messages_count),
    Rule("request", "messages", "must be a non-empty list of {{role, content}} with a valid role and text content "
         "(and assistant messages' tool_calls, each a name and a JSON object of arguments, at most "
         f"{MAX_TOOL_CALLS} in a chat)", _messages_well_formed),
    Rule("request", "tools", f"must be a list of at most {MAX_TOOLS} JSON objects", _tools_well_formed),
    Rule("request", "template_kwargs", f"must be a JSON object of at most {MAX_TEMPLATE_KWARGS} template variables, "
         "none of those the service sets", _well_formed(_template_kwargs)),
    Rule("request", "messages", "contents, tool calls, tools and template_kwargs must total at most "
         "{max_prompt_bytes} bytes of UTF-8 (max_prompt_bytes)", _messages_bytes),
    Rule("request", "messages", "contents, tool calls, tools and template_kwargs must not hold a special token's "
         "text, nor, outside assistant contents, the text of a markup token the chat template writes (this service "
         "runs with --chat-special-tokens refuse)", _messages_no_special_text),
    Rule("request", "stop", "must be a list of at most {max_stop_strings} strings (max_stop_strings)", _stop_count),
    Rule("request", "stop", "each must be non-empty and at most {max_stop_string_chars} characters "
         "(max_stop_string_chars)", _stop_each),
    Rule("request", "skip_special_tokens", "must be a boolean", _is_bool("skip_special_tokens")),
    Rule("request", "include_stop_str_in_output", "must be a boolean", _is_bool("include_stop_str_in_output")),
    Rule("prompt_tokens", "prompt", "must encode to at least one token", _tokens_not_empty),
    Rule("prompt_tokens", "prompt", "must be shorter than max_model_len tokens, leaving room to generate one",
         _tokens_fit),
    Rule("detokenize", "token_ids", "must be at most {max_detokenize_ids} ids (max_detokenize_ids)", _ids_count),
    Rule("detokenize", "token_ids", "must be integers in [0, vocabulary size)", _ids_in_vocab),
)
# fmt: on


def _rule_text(rule: Rule, limits: TextLimits) -> str:
    """The rule in words, each limit it names given with its value."""
    return rule.rule.format_map({f.name: getattr(limits, f.name) for f in fields(limits)})


def _run(
    stage: str, subject: object, limits: TextLimits, only: set[str] | None = None, rename: str | None = None
) -> None:
    for rule in RULES:
        if rule.stage != stage or (only is not None and rule.field not in only):
            continue
        detail = rule.check(subject, limits)
        if detail is not None:
            _broken(rule, limits, detail, rename)


def _broken(rule: Rule, limits: TextLimits, detail: str, rename: str | None = None) -> NoReturn:
    name = rename if rename and rule.field == "prompt" else rule.field
    raise ValueError(f"{name}: {_rule_text(rule, limits)} ({detail})")


def _rule(check: Check) -> Rule:
    return next(rule for rule in RULES if rule.check is check)


def _refuse_overcounted(request: pb.GenerateRequest | pb.TokenizeRequest, limits: TextLimits) -> None:
    """The count rules of _refuse_oversized that read only the lengths of repeated fields: a few microseconds
    whatever the request holds, so they may run on the event loop (check_request). The rest reads every chat message
    (about 1 us each: 4,096 turns took 4.7 ms), so it runs where the request is tokenized, on a worker thread for a
    large one."""
    stop = request.stop if isinstance(request, pb.GenerateRequest) else ()
    if len(stop) > limits.max_stop_strings:
        _broken(_rule(_stop_count), limits, f"got {len(stop)}")
    if request.WhichOneof("input") != "chat":
        return
    chat = request.chat
    if len(chat.messages) > limits.max_messages:
        _broken(_rule(_messages_count), limits, f"got {len(chat.messages)}")
    if len(chat.tools) > MAX_TOOLS:  # validate_tools' words
        _broken(_rule(_tools_well_formed), limits, f"tools must hold at most {MAX_TOOLS} tools, got {len(chat.tools)}")


def _refuse_oversized(request: pb.GenerateRequest | pb.TokenizeRequest, limits: TextLimits) -> None:
    """The table's count and size rules, read off the protocol message before any of it is copied into Python
    objects, let alone parsed: a 64 MiB message holds 8 million empty chat messages (a million took 3.5 s and
    250 MB to copy before the count rule refused them), as many stop strings or tool calls, or a JSON text of tens
    of millions of values (8 million took a minute to parse and walk before the bytes rule refused them).
    A chat's texts count as sent here (tool-call arguments, tools and template_kwargs as their JSON text), and
    later as the JSON the template gets."""
    _refuse_overcounted(request, limits)
    if request.WhichOneof("input") != "chat":
        return
    chat = request.chat
    calls = 0
    for i, message in enumerate(chat.messages):
        calls += len(message.tool_calls)
        if calls > MAX_TOOL_CALLS:  # validate_messages' words
            _broken(_rule(_messages_well_formed), limits,
                    f"messages[{i}].tool_calls: a chat may hold at most {MAX_TOOL_CALLS} tool calls")
    if chat.ByteSize() > limits.max_prompt_bytes:  # the texts below, and a few bytes a field
        texts = [chat.template_kwargs, *chat.tools]
        for message in chat.messages:
            texts += (message.content, message.tool_call_id)
            texts += (text for call in message.tool_calls for text in (call.name, call.arguments, call.id))
        size = sum(map(_utf8_len, texts))
        if size > limits.max_prompt_bytes:
            _broken(_rule(_messages_bytes), limits, f"got {size} bytes as sent: JSON texts count as written, their "
                    "escapes and whitespace included; send them compact, as UTF-8")


def validate_request(request: TextRequest, limits: TextLimits | None = None) -> None:
    """Raise ValueError naming the field of the first "request" rule that `request` breaks. For tests and
    scripts: the service runs the rules through check_request and tokenize_request."""
    _run("request", request, limits or TextLimits())


def validate_prompt_tokens(token_ids: Sequence[int] | AtLeast, limits: TextLimits | None = None) -> None:
    """Raise ValueError if the tokenized prompt is empty or too long for the engine's max_model_len."""
    _run("prompt_tokens", token_ids, limits or TextLimits())


def validate_detokenize_ids(token_ids: Sequence[int], limits: TextLimits | None = None) -> None:
    """Raise ValueError if a Detokenize call's ids are not integers inside the vocabulary."""
    _run("detokenize", token_ids, limits or TextLimits())


def describe_rules(limits: TextLimits | None = None) -> str:
    """The table as text, one rule per line, under `limits` (default: the defaults), for docs and error help."""
    limits = limits or TextLimits()
    return "\n".join(f"[{r.stage}] {r.field}: {_rule_text(r, limits)}" for r in RULES)


# ---- The protocol side: requests in, engine requests out, every check through the table above. ----


@dataclass(slots=True, frozen=True)
class PreparedRequest:
    """A validated text request: the engine request to send and the text options to apply to its output."""

    engine_request: engine_pb.NewRequest
    stop: tuple[str, ...]
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    num_prompt_tokens: int
    n: int = 1  # completions of the prompt, each its own engine request
    # The prompt's last ids where the output continues its text (chat.continue_final_message): the detokenizer's
    # first context, so the reply's first word keeps the space a SentencePiece decode would strip.
    prompt_tail: tuple[int, ...] = ()


def read_json(path: Path) -> dict:
    """The file's JSON object, {} when there is no such file; a ValueError naming the file otherwise."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_generation_defaults(model_dir: str) -> dict[str, object]:
    """Sampling defaults from the model's generation_config.json (do_sample false means greedy)."""
    path = Path(model_dir) / "generation_config.json"
    config = read_json(path)
    defaults = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
    for key, value in defaults.items():  # checked here, once: else every request leaving it unset would fail
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "top_k":
            if not number or (isinstance(value, float) and not value.is_integer()) or not -2**31 <= value < 2**31:
                # inf and nan are no integer; the proto field holds 32 bits (ranges are the engine's to check:
                # it refuses to start on a default out of range)
                raise ValueError(f"{path}: top_k must be an integer, got {value!r}")
            defaults[key] = int(value)  # 50.0, as some writers put it
        elif not number:
            raise ValueError(f"{path}: {key} must be a number, got {value!r}")
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    if defaults.get("top_k") == 0:
        defaults["top_k"] = -1  # transformers' "disabled", as the engine reads it
    return defaults


def read_eos_token_ids(model_dir: str, tokenizer: Any, vocab_size: int) -> set[int]:
    """EOS ids of the tokenizer, generation_config.json and config.json together, as the engine counts them
    (the engines' ids are checked against these on first contact): ids outside the model's vocabulary, which it
    can never produce, are left out, as the engine leaves them out."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        eos = read_json(Path(model_dir) / name).get("eos_token_id")
        values = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if any(isinstance(e, bool) or not isinstance(e, int) for e in values):  # the engine refuses them alike
            raise ValueError(f"{name}'s eos_token_id should be a token id or a list of them (integers), not {eos!r}")
        ids.update(values)
    return {e for e in ids if 0 <= e < vocab_size}


def _message(m: pb.ChatMessage) -> dict[str, object]:
    message: dict[str, object] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [{"name": c.name, "arguments": c.arguments, **({"id": c.id} if c.id else {})}
                                 for c in m.tool_calls]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def text_request_from_proto(request: pb.GenerateRequest | pb.TokenizeRequest) -> TextRequest:
    """The text-side fields of a protocol request (a Tokenize request's `text` is its prompt)."""
    kind = request.WhichOneof("input")
    if kind is None:  # named by the request's own fields (the text-side rule says prompt and messages)
        fields = [f.name for f in request.DESCRIPTOR.oneofs_by_name["input"].fields]
        raise ValueError(f"input: exactly one of {', '.join(fields[:-1])} or {fields[-1]} must be set; got none")
    prompt = getattr(request, kind) if kind not in ("chat", "prompt_token_ids") else None
    messages = [_message(m) for m in request.chat.messages] if kind == "chat" else None
    thinking = request.chat.enable_thinking if kind == "chat" and request.chat.HasField("enable_thinking") else None
    tools = tuple(request.chat.tools) if kind == "chat" else ()
    template_kwargs = request.chat.template_kwargs if kind == "chat" else None
    continued = kind == "chat" and request.chat.continue_final_message
    special = request.add_special_tokens if request.HasField("add_special_tokens") else None
    if not isinstance(request, pb.GenerateRequest):
        return TextRequest(prompt=prompt, messages=messages, enable_thinking=thinking, tools=tools,
                           template_kwargs=template_kwargs, continue_final_message=continued,
                           add_special_tokens=special)
    skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
    return TextRequest(
        prompt=prompt,
        messages=messages,
        enable_thinking=thinking,
        tools=tools,
        template_kwargs=template_kwargs,
        continue_final_message=continued,
        stop=tuple(request.stop),
        skip_special_tokens=skip,
        include_stop_str_in_output=request.include_stop_str_in_output,
        add_special_tokens=special,
    )


def _encode(text_request: TextRequest, tokenizer: Any, max_model_len: int | None = None) -> list[int] | AtLeast:
    """The prompt's or the rendered chat's token ids; AtLeast instead when part of the text shows that they are
    max_model_len or more (then the rest of it is never tokenized). The tokenizer's special tokens (Llama's BOS)
    are added to a prompt and not to a chat, whose template writes any it wants, unless the request says."""
    text = text_request.prompt
    special = text_request.add_special_tokens
    if text_request.messages is not None:
        text = render_validated(tokenizer, _messages(text_request), text_request.enable_thinking,
                                _tools(text_request), _template_kwargs(text_request),
                                text_request.continue_final_message)
    if special is None:
        special = text_request.messages is None
    # The bound counts the text's tokens alone, which special tokens only add to.
    if max_model_len and (n := tokens_at_least(tokenizer, text, max_model_len)) >= max_model_len:
        return AtLeast(n)
    return encode(tokenizer, text, special)


def tokenize_input(
    request: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Any, limits: TextLimits | None = None
) -> list[int]:
    """Token ids of a prompt or chat messages (through the chat template), after the input rules, as Generate
    would send them (add_special_tokens included)."""
    _refuse_oversized(request, limits or TextLimits())
    text_request = text_request_from_proto(request)
    kind = request.WhichOneof("input")
    _run("request", text_request, limits or TextLimits(), only={"input", "prompt", "messages", "tools",
                                                                 "template_kwargs"}, rename=kind)
    return _encode(text_request, tokenizer)


def check_stop_strings(stop: Sequence[str], limits: TextLimits | None = None) -> tuple[str, ...]:
    """The stop strings as a tuple, after the stop rules."""
    _run("request", TextRequest(stop=stop), limits or TextLimits(), only={"stop"})
    return tuple(stop)


def completions_of(request: pb.GenerateRequest) -> int:
    """The request's n (unset: 1), or a ValueError when it is out of range."""
    choices = request.n if request.HasField("n") else 1
    if not 1 <= choices <= MAX_N:
        raise ValueError(f"n: the number of completions must be 1 to {MAX_N}, got {choices}")
    return choices


def check_request(request: pb.GenerateRequest, limits: TextLimits | None = None) -> int:
    """The rules that read a request's fields but not its texts or ids: cheap and bounded (nothing of the prompt or
    chat is copied), so the servicer runs them before its queue check, and a request that no load would let through
    is INVALID_ARGUMENT, not "retry later". Returns the request's n; raises ValueError naming the field."""
    limits = limits or TextLimits()
    _refuse_overcounted(request, limits)
    # Each stop string too (non-empty, at most max_stop_string_chars): at most 64 of at most 1,024 characters once
    # the count rule passed, a few microseconds; checked only while tokenizing, an empty one was "queue is full,
    # retry later" under load, which no retry cures.
    check_stop_strings(tuple(request.stop), limits)
    kind = request.WhichOneof("input")
    if kind is None:  # text_request_from_proto's words
        text_request_from_proto(request)
    choices = completions_of(request)
    source = request.sampling_params
    if kind == "chat" and request.chat.continue_final_message and source.response_format in (
            pb.RESPONSE_FORMAT_JSON_OBJECT, pb.RESPONSE_FORMAT_JSON_SCHEMA):
        raise ValueError("response_format JSON with chat.continue_final_message: the JSON grammar starts at the "
                         "reply's first character, so it cannot continue a prefix (the output would be a new JSON "
                         "value after it); send the chat without the prefix, or without response_format")
    if kind == "prompt_token_ids":
        if request.HasField("add_special_tokens"):
            raise ValueError("add_special_tokens: applies to a prompt or a chat, which the service tokenizes; "
                             "prompt_token_ids are sent as they are (add any BOS to the ids), so leave it unset")
        if not request.prompt_token_ids.ids:  # the text rule says "must encode to at least one token"
            raise ValueError("prompt_token_ids: must hold at least one token id (got none)")
    n = len(source.stop_token_ids)  # the engine's bounds, said before sending it on, in the engine's words
    if n > MAX_STOP_TOKEN_ENTRIES:
        raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_ENTRIES} entries (and at most "
                         f"{MAX_STOP_TOKEN_IDS} distinct ids), got {n} entries")
    if n > MAX_STOP_TOKEN_IDS and (distinct := len(set(source.stop_token_ids))) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids, got {distinct}")
    if len(source.logit_bias) > MAX_LOGIT_BIAS_TOKENS:  # the engine's bound, said before sending it on
        raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(source.logit_bias)}")
    if source.response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format {source.response_format} is not one this service knows: "
                         "RESPONSE_FORMAT_TEXT (0), RESPONSE_FORMAT_JSON_OBJECT (1) or RESPONSE_FORMAT_JSON_SCHEMA (2)")
    if (source.response_format == pb.RESPONSE_FORMAT_JSON_SCHEMA) != bool(source.json_schema):
        raise ValueError("json_schema (a JSON Schema as JSON text) goes with response_format "
                         "RESPONSE_FORMAT_JSON_SCHEMA, and that format needs one")
    if len(source.json_schema) > MAX_JSON_SCHEMA_BYTES or len(source.json_schema.encode()) > MAX_JSON_SCHEMA_BYTES:
        raise ValueError(f"json_schema must be at most {MAX_JSON_SCHEMA_BYTES} bytes, got "
                         f"{len(source.json_schema.encode())}")  # the engine's bound, said before sending it on
    return choices


def prepare(
    request: pb.GenerateRequest,
    tokenizer: Any,
    defaults: dict[str, object],
    max_model_len: int,
    limits: TextLimits | None = None,
) -> PreparedRequest:
    """Validate a GenerateRequest and build the engine request for it: check_request, then tokenize_request."""
    check_request(request, limits)
    return tokenize_request(request, tokenizer, defaults, max_model_len, limits)


def tokenize_request(
    request: pb.GenerateRequest,
    tokenizer: Any,
    defaults: dict[str, object],
    max_model_len: int,
    limits: TextLimits | None = None,
) -> PreparedRequest:
    """The rest of prepare() once check_request has passed: the text rules, tokenizing, the id rules, and the
    engine request."""
    limits = replace(limits or TextLimits(), max_model_len=max_model_len or None)
    _refuse_oversized(request, limits)
    text_request = text_request_from_proto(request)
    choices = completions_of(request)
    if request.WhichOneof("input") == "prompt_token_ids":
        # Already tokenized: the text-option rules, then the id rules under the field's own name.
        _run("request", text_request, limits, only={"stop", "skip_special_tokens", "include_stop_str_in_output"})
        ids = request.prompt_token_ids.ids
        try:
            # The length first, before the ids are copied out of the message (a 64 MiB one holds 64 million ids,
            # 512 MB as a list): it bounds the copy and the ids' check.
            validate_prompt_tokens(ids, limits)
            prompt = list(ids)
            validate_detokenize_ids(prompt, limits)
        except ValueError as exc:
            # The id rule names a Detokenize call's field (token_ids[i]): name the request's own.
            detail = str(exc).split(": ", 1)[1].replace("(token_ids[", "(prompt_token_ids[")
            raise ValueError(f"prompt_token_ids: {detail}") from None
    else:
        _run("request", text_request, limits, rename=request.WhichOneof("input"))
        prompt = _encode(text_request, tokenizer, max_model_len=limits.max_model_len)
        # "chat: ..." for a chat; an AtLeast never passes (it is only returned when it does not fit).
        _run("prompt_tokens", prompt, limits, rename=request.WhichOneof("input"))
    params = engine_pb.SamplingParams()
    source = request.sampling_params
    for name in SAMPLING_FIELDS:
        if source.HasField(name):
            setattr(params, name, getattr(source, name))
        elif name in defaults:
            setattr(params, name, defaults[name])
    params.stop_token_ids.extend(source.stop_token_ids)
    params.logit_bias.update(source.logit_bias)
    params.response_format = RESPONSE_FORMATS[source.response_format]
    params.json_schema = source.json_schema
    if params.HasField("prompt_logprobs") and 0 <= params.prompt_logprobs <= MAX_LOGPROBS:  # else the engine names it
        size = len(prompt) * (LOGPROB_BYTES + LOGPROB_BYTES_PER_ALTERNATIVE * params.prompt_logprobs)
        if size > limits.max_prompt_logprobs_bytes:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs} for a {len(prompt)}-token prompt would take up to "
                             f"{size} bytes in one message from the engine, over the {limits.max_prompt_logprobs_bytes} "
                             "this service allows (a quarter of max_message_bytes): ask for fewer alternatives, score a "
                             "shorter prompt, or raise --max-message-bytes")
    return PreparedRequest(
        engine_request=engine_pb.NewRequest(prompt_token_ids=prompt, sampling_params=params),
        stop=tuple(text_request.stop),
        skip_special_tokens=text_request.skip_special_tokens,
        include_stop_str_in_output=text_request.include_stop_str_in_output,
        num_prompt_tokens=len(prompt),
        n=choices,
        prompt_tail=_prompt_tail(prompt, tokenizer, text_request.skip_special_tokens)
        if text_request.continue_final_message else (),
    )


def _prompt_tail(prompt: Sequence[int], tokenizer: Any, skip_special_tokens: bool) -> tuple[int, ...]:
    """The prompt's last PROMPT_TAIL_TOKENS ids whose text the output's decode shows. Its last ids as they were, a
    reply prefix ending in 8 skipped special tokens left the detokenizer no context, and a SentencePiece decode
    stripped the space of the reply's first word ("thelighthouse")."""
    if not skip_special_tokens:
        return tuple(prompt[-PROMPT_TAIL_TOKENS:])
    special = special_ids_of(tokenizer)
    tail: list[int] = []
    for token in reversed(prompt):
        if token not in special:
            tail.append(token)
            if len(tail) == PROMPT_TAIL_TOKENS:
                break
    return tuple(reversed(tail))
