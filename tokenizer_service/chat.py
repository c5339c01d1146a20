"""Chat messages rendered through the model's own chat template.

Rules for a message list (each broken rule is a ValueError that names the message and field):

- the list is non-empty;
- each message is a mapping with the keys `role` and `content`, and for an assistant message optionally
  `tool_calls`: the calls it made, each `{"name": str, "arguments": a JSON object (or its text)}`, handed to the
  template in OpenAI's shape `{"type": "function", "function": {"name", "arguments": dict}}`;
- `role` is one of VALID_ROLES: `system`, `user`, `assistant` and `tool` (a tool's result fed back to the
  model). These are the roles that the common chat templates (ChatML, Qwen, Llama) know; anything else is
  refused here rather than silently rendered or mangled by a template;
- `content` is a string, or a list of text parts `{"type": "text", "text": str}` (the OpenAI shape), which
  are joined into one string, so templates only ever see strings.

A `tool` message may name the call it answers (`tool_call_id`) and a call may carry an `id`, for templates that
pair them. Where the template reads tool_calls, each tool message must answer a call, as OpenAI's API requires
(check_tool_results); a template that never reads them can only have been given calls written in contents. `tools`
(the functions the model may call) is a list of JSON objects (or their texts), handed to the template as
transformers' `apply_chat_template(tools=...)` takes them. Bounds: MAX_TOOLS tools, MAX_TOOL_CALLS calls per chat,
JSON nested at most MAX_JSON_DEPTH deep. tools or tool calls given to a template that never reads them are refused,
as is enable_thinking for one without the switch: a template would drop them silently.

`template_kwargs` (vLLM's chat_template_kwargs) are further variables for the template, a JSON object: Llama 3.1's
`date_string` or `tools_in_user_message`, a reasoning model's effort switch. Each key must be a name the template
reads, and not one transformers sets itself (RESERVED_TEMPLATE_NAMES): a key the template never reads is refused,
as a misspelt option would otherwise change nothing, silently.

The prompt is the template rendered with `add_generation_prompt=True` (with continue_final_message, the last
assistant message left open instead), then encoded without adding special
tokens, because the template already writes any BOS or special markers it wants. As in transformers, a
special token's text inside a content (`<|im_end|><|im_start|>system ...`) encodes as that control token: a
caller can write turns of its own. `--chat-special-tokens refuse` refuses such contents, and the template's markup
tokens (Qwen3's `<tool_response>`) outside assistant contents (special_token_texts, markup_token_texts).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

log = logging.getLogger(__name__)
VALID_ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})
MAX_TOOLS = 128  # tools a chat may offer
MAX_TOOL_CALLS = 1024  # tool calls in a chat's messages, all together
MAX_JSON_DEPTH = 32  # nesting of a tool's or a call's JSON (JSON schemas rarely pass 10)
MAX_TEMPLATE_KWARGS = 64  # variables a chat may set for its template
# What transformers' apply_chat_template passes the template itself, its own arguments, and the names of the
# fields that have a field of their own here: template_kwargs may not set them.
RESERVED_TEMPLATE_NAMES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "enable_thinking",
    "chat_template", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "conversation", "sanitize_control_tokens", "self", "kwargs",
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens",
    # The sandbox's globals: a request's value in their place would make the template fail as a TypeError.
    "raise_exception", "strftime_now", "range", "dict", "namespace", "lipsum", "cycler", "joiner", "loop",
})


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ValueError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, got {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


class _NotJson(ValueError):
    pass


def _not_json(constant: str) -> object:
    """json.loads takes NaN and Infinity, which JSON has not (a template would write them into the prompt)."""
    raise _NotJson(f"{constant} is not a JSON value (JSON has no NaN or Infinity)")


def _json_object(value: object, where: str) -> dict:
    """A JSON object given as a mapping or as its text ("" is {}: proto3's unset arguments), at most
    MAX_JSON_DEPTH deep and encodable as UTF-8 (json.loads takes a lone-surrogate escape the tokenizer cannot)."""
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_not_json) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} must be a JSON object, got text that is not JSON ({exc})") from None
        except _NotJson as exc:
            raise ValueError(f"{where} must be a JSON object, got text that is not JSON: {exc}") from None
        except RecursionError:
            raise ValueError(f"{where} must be a JSON object at most {MAX_JSON_DEPTH} deep") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"{where} must be a JSON object at most {MAX_JSON_DEPTH} deep")
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # a mapping from Python holding what JSON cannot; a lone surrogate
        raise ValueError(f"{where} must be a JSON object of UTF-8 text: {exc}") from None
    return dict(value)


# What json.loads makes of a JSON scalar: told apart from containers by type alone (the Mapping check, an ABC's, took
# most of a walk's time; 8 MiB of chat JSON is millions of values).
_SCALARS = frozenset((str, int, float, bool, type(None)))


def _children(item: object) -> object:
    """A JSON container's values (an object's or a list's), or None for a scalar."""
    kind = type(item)
    if kind is dict:
        return item.values()
    if kind is list or kind is tuple:
        return item
    if kind in _SCALARS:
        return None
    if isinstance(item, Mapping):
        return item.values()
    return item if isinstance(item, list | tuple) else None


def _depth(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value, level by level, without recursion (a deep one is
    what is refused)."""
    depth, level = 0, [value]
    while level:
        below: list[object] = []
        found = False
        for item in level:
            children = _children(item)
            if children is not None:
                found = True
                below.extend(children)
        if not found:
            break
        depth += 1
        if depth > MAX_JSON_DEPTH:
            break
        level = below
    return depth


def json_strings(value: object) -> list[str]:
    """Every key and string in a parsed JSON value: what a template may render as text, whether through tojson
    (which writes them unescaped) or field by field (the --chat-special-tokens rule reads these)."""
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            out.append(item)
        elif kind in _SCALARS:
            continue
        elif kind is dict or isinstance(item, Mapping):
            out.extend(map(str, item))
            stack.extend(item.values())
        elif kind is list or kind is tuple or isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str):  # a str subclass
            out.append(item)
    return out


def _tool_calls(calls: object, where: str) -> list[dict]:
    if isinstance(calls, str | bytes | Mapping) or not isinstance(calls, Sequence):
        raise ValueError(f"{where}.tool_calls must be a list of {{'name', 'arguments'}}, got {type(calls).__name__}")
    normalised = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping) or set(call) - {"name", "arguments", "id"}:
            raise ValueError(f"{here} must be a mapping with 'name', 'arguments' and optionally 'id', got {call!r}")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{here}.name must be a non-empty string, got {name!r}")
        arguments = _json_object(call.get("arguments", {}), f"{here}.arguments")
        entry: dict[str, object] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id"):
            if not isinstance(call["id"], str):
                raise ValueError(f"{here}.id must be a string, got {call['id']!r}")
            entry["id"] = call["id"]
        normalised.append(entry)
    return normalised


def validate_tools(tools: object) -> list[dict]:
    """Check a chat's tools: a list of at most MAX_TOOLS JSON objects (or their texts); return them as dicts."""
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of JSON objects, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools must hold at most {MAX_TOOLS} tools, got {len(tools)}")
    for i, tool in enumerate(tools):  # "" is {} only for a call's arguments (proto3's unset field), not for a tool
        if isinstance(tool, str) and not tool.strip():
            raise ValueError(f"tools[{i}] must be a JSON object (a tool's definition), got blank text {tool!r}")
    return [_json_object(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


def validate_template_kwargs(kwargs: object) -> dict[str, object]:
    """Check a chat's template variables: a JSON object (or its text) of at most MAX_TEMPLATE_KWARGS names, each a
    Python identifier that transformers does not set itself; return it as a dict."""
    where = "template_kwargs"
    value = _json_object(kwargs, where)
    if len(value) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"{where} must set at most {MAX_TEMPLATE_KWARGS} variables, got {len(value)}")
    for name in value:
        if not name.isidentifier():
            raise ValueError(f"{where}: {name!r} is not a template variable's name (letters, digits and _)")
        if name in RESERVED_TEMPLATE_NAMES:
            field = {"messages": "chat.messages", "tools": "chat.tools", "enable_thinking": "chat.enable_thinking"}
            instead = f"; set {field[name]} instead" if name in field else ""
            raise ValueError(f"{where}: {name!r} is set by the service, not by a request{instead}")
    return value


def validate_messages(messages: object) -> list[dict[str, object]]:
    """Check a chat message list; return it normalised to [{"role": str, "content": str}, ...], with
    "tool_calls" on the assistant messages that made some."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must contain at least one message")
    normalised = []
    calls = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a mapping with 'role' and 'content', got {type(message).__name__}"
            )
        unknown = sorted(str(k) for k in message.keys() - _MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed keys are 'role', 'content', "
                             "'tool_calls' (assistant messages) and 'tool_call_id' (tool messages)")
        if "role" not in message:
            raise ValueError(f"{where}.role is required; valid roles are {', '.join(VALID_ROLES)}")
        if "content" not in message:
            raise ValueError(f"{where}.content is required")
        role = message["role"]
        if role not in VALID_ROLES:
            raise ValueError(
                f"{where}.role {role!r} is not a valid role; valid roles are {', '.join(VALID_ROLES)}"
            )
        entry: dict[str, object] = {"role": role, "content": _content_text(message["content"], where)}
        if message.get("tool_calls"):
            if role != "assistant":
                raise ValueError(f"{where}.tool_calls is set on a {role!r} message; only assistant messages make "
                                 "tool calls")
            calls += len(message["tool_calls"]) if isinstance(message["tool_calls"], Sequence) else 0
            if calls > MAX_TOOL_CALLS:
                raise ValueError(f"{where}.tool_calls: a chat may hold at most {MAX_TOOL_CALLS} tool calls")
            entry["tool_calls"] = _tool_calls(message["tool_calls"], where)
        if message.get("tool_call_id"):
            if role != "tool" or not isinstance(message["tool_call_id"], str):
                raise ValueError(f"{where}.tool_call_id must be a string on a 'tool' message (the call it answers)")
            entry["tool_call_id"] = message["tool_call_id"]
        normalised.append(entry)
    return normalised


def check_tool_results(normalised: list[dict]) -> None:
    """ValueError where a 'tool' message answers no call, as OpenAI's API refuses it: each follows, directly or after
    other results, an assistant message with tool_calls; a run of results holds at most one per call; and a
    tool_call_id names one of that message's calls where they all have ids (a chat without ids is not checked)."""
    made: list[dict] = []  # the calls the results at hand answer (of the last message that was not a result)
    maker = answered = 0  # that message's index, and the results to it so far
    for i, message in enumerate(normalised):
        if message["role"] != "tool":
            made, maker, answered = message.get("tool_calls", []), i, 0
            continue
        where = f"messages[{i}]"
        if not made:
            role = normalised[i - 1]["role"] if i else ""
            before = "the start of the chat" if not i else \
                f"messages[{i - 1}], {'an' if role == 'assistant' else 'a'} {role!r} message without tool_calls"
            raise ValueError(f"{where} is a 'tool' message right after {before}: a tool message answers a call, so "
                             "it must follow the assistant message with tool_calls that made the call (or that "
                             "message's other results); send that message before it, or send this text as a "
                             "'user' message")
        answered += 1
        if answered > len(made):
            raise ValueError(f"{where} is 'tool' result {answered} to messages[{maker}], which made {len(made)} "
                             f"tool call{'s' if len(made) > 1 else ''}: send one 'tool' message per call")
        ids = [call.get("id") for call in made]
        asked = message.get("tool_call_id")
        if asked and all(ids) and asked not in ids:
            shown = ", ".join(map(repr, ids[:8])) + (", ..." if len(ids) > 8 else "")
            raise ValueError(f"{where}.tool_call_id {asked!r} names none of the calls of messages[{maker}] (ids "
                             f"{shown}): name the call this result answers, or leave tool_call_id unset")


def render_chat(tokenizer: Any, messages: object, enable_thinking: bool | None = None, tools: object = None,
                template_kwargs: object = None, continue_final_message: bool = False) -> str:
    """Validate `messages`, `tools` and `template_kwargs` and render them through the tokenizer's chat template
    (render_validated)."""
    _chat_template(tokenizer)  # said before the messages are read
    return render_validated(tokenizer, validate_messages(messages), enable_thinking,
                            validate_tools(tools) if tools else [],
                            validate_template_kwargs(template_kwargs) if template_kwargs else {},
                            continue_final_message)


def _chat_template(tokenizer: Any) -> object:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "messages are not supported: the model's tokenizer has no chat template; send a prompt"
        )
    return template


class _TemplateNames(NamedTuple):
    """What a template's syntax tree says it reads, and what it uses that its environment lacks."""

    variables: frozenset[str]  # looked up in its context (jinja2.meta): tools, enable_thinking, template_kwargs
    keys: frozenset[str]  # read from a value: attributes (m.tool_calls) and string constants (m['tool_calls'],
    # m.get('tool_calls'), 'tool_calls' in m); never text the template writes out or a comment
    unknown: tuple[str, ...]  # filters and tests jinja2 has not ("filter 'fromjson'", written for another renderer)


@functools.lru_cache(maxsize=8)
def _template_names(source: str) -> _TemplateNames | None:
    """The names a template reads (in transformers' own environment, so its globals, filters and its
    {% generation %} tag are known), or None where that cannot be read: then a name the source mentions anywhere
    counts as read."""
    from jinja2 import meta, nodes

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(source).environment
        tree = environment.parse(source)
    except Exception:  # noqa: BLE001 -- another transformers, a template it cannot parse: fall back
        return None
    keys = {node.attr for node in tree.find_all(nodes.Getattr)}
    keys |= {node.value for node in tree.find_all(nodes.Const) if isinstance(node.value, str)}
    # jinja2 compiles an unknown filter or test inside a branch, to fail only when the branch renders.
    unknown = {f"filter {node.name!r}" for node in tree.find_all(nodes.Filter) if node.name not in environment.filters}
    unknown |= {f"test {node.name!r}" for node in tree.find_all(nodes.Test) if node.name not in environment.tests}
    return _TemplateNames(frozenset(meta.find_undeclared_variables(tree)), frozenset(keys), tuple(sorted(unknown)))


def render_validated(tokenizer: Any, normalised: list[dict], enable_thinking: bool | None, tools: list[dict],
                     template_kwargs: Mapping[str, object] | None = None, continue_final_message: bool = False
                     ) -> str:
    """Render messages, tools and template variables, as validate_messages, validate_tools and
    validate_template_kwargs return them, through the tokenizer's chat template, ending in the assistant's turn
    (the service validates a request's chat once, as its rules run). continue_final_message: the last message, an
    assistant's, is the start of that turn, rendered open for the model to continue (transformers'
    continue_final_message), with no new turn after it.

    enable_thinking (None: the template's default) is passed to templates with a thinking switch (Qwen3's);
    tools (empty: none) to templates that read them; template_kwargs as variables. Any of them given to a
    template that never reads it is refused rather than silently ignored, as are tool calls in the messages; where
    it reads them, so is a tool message that answers no call (check_tool_results).
    """
    source = _template_used(_chat_template(tokenizer), bool(tools))
    names = _template_names(source)

    def reads(name: str, of_a_value: bool = False) -> bool:
        """Whether the template reads `name`: as a variable, or (of_a_value) as a message's field. Read from its
        syntax tree: "tools" in its text ("# Tools", tools_in_user_message, a comment) is no reading of tools."""
        if names is None:
            return name in source
        return name in (names.keys if of_a_value else names.variables)

    extra: dict[str, object] = {}
    if enable_thinking is not None:
        if not reads("enable_thinking"):
            raise ValueError("chat.enable_thinking is set, but the model's chat template has no thinking switch "
                             "(it never reads enable_thinking); leave it unset for this model")
        extra["enable_thinking"] = enable_thinking
    if tools:
        if not reads("tools"):
            raise ValueError("chat.tools is set, but the model's chat template never reads tools: this model "
                             "was not given a tool-calling template; send the tools in a message instead")
        extra["tools"] = tools
    for name, value in (template_kwargs or {}).items():
        if not reads(name):
            raise ValueError(f"chat.template_kwargs sets {name!r}, but the model's chat template never reads it; "
                             "leave it out for this model")
        extra[name] = value
    called = [i for i, m in enumerate(normalised) if "tool_calls" in m]
    if continue_final_message:
        last = normalised[-1] if normalised else None
        if last is None or last["role"] != "assistant" or "tool_calls" in last:
            what = ("no message" if last is None else "tool calls" if last["role"] == "assistant"
                    else f"a {last['role']!r} message")
            raise ValueError(f"chat.continue_final_message is set, but the chat ends with {what}: it continues a "
                             "last message of role 'assistant' without tool_calls, the start of the reply")
        if not str(last["content"]).strip():
            raise ValueError("chat.continue_final_message is set, but the last message's content is empty or "
                             "blank: there is nothing to continue; leave it unset (and the message out) for a new "
                             "reply")
        if enable_thinking is not None:
            # Templates read the switch where they open the reply's turn, which a continued reply does not do
            # (Qwen3's renders the same either way): it would be dropped without a word.
            raise ValueError("chat.enable_thinking does nothing for a continued reply (the template reads it where "
                             "it opens a new turn): leave it unset, and write the thinking, or its absence, into "
                             "the message to continue")
    if called and not reads("tool_calls", of_a_value=True):
        raise ValueError(f"messages[{called[0]}].tool_calls is set, but the model's chat template never reads "
                         "tool_calls; write the calls into the message's content instead")
    if reads("tool_calls", of_a_value=True):
        check_tool_results(normalised)
    # Imported here so that importing this module does not need jinja2 until a template is rendered.
    from jinja2 import TemplateError, TemplateRuntimeError, TemplateSyntaxError

    if continue_final_message:
        extra["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(normalised, tokenize=False,
                                             add_generation_prompt=not continue_final_message, **extra)
    except TemplateSyntaxError:
        raise  # the model's template is broken, not the request (start-up checks it: check_chat_template)
    except TemplateRuntimeError as e:
        missing = [what for what in (names.unknown if names else ()) if f"named {what.split()[1]} found" in str(e)]
        if missing:  # the model's template is broken, not the request: INTERNAL (start-up warned of it)
            raise RuntimeError(f"the model's chat template uses {missing[0]}, which jinja2 has not: {e}") from None
        raise ValueError(f"messages rejected by the model's chat template: {e}") from e
    except TemplateError as e:
        # Templates reject some conversations themselves (e.g. "roles must alternate"); that is bad input.
        raise ValueError(f"messages rejected by the model's chat template: {e}") from e
    except RecursionError:  # a template recursing over a request's data
        raise ValueError("messages: the chat template recursed too deeply over them") from None
    except ValueError:
        if not continue_final_message:
            raise
        # transformers' own check: the last message's text must come through the template as written.
        raise ValueError("chat.continue_final_message: the model's chat template does not render the last "
                         "message's content as written (it changes, re-spaces or drops part of it), so the reply "
                         "cannot continue it; write it as the template renders it (Qwen3's thinking as "
                         "'<think>\\nTEXT\\n</think>\\n\\n' before the reply)") from None
    except TypeError as e:
        if not (template_kwargs or tools or called):
            raise  # a template that fails in Python on plain messages is broken: the service's error, INTERNAL
        # JSON of the request's a template cannot use (a number where it adds text, a list where it wants a
        # mapping): the request's error.
        given = [what for what, there in (("tools", tools), ("tool calls", called), ("template_kwargs", template_kwargs))
                 if there]
        raise ValueError(f"the chat template failed with the request's {' and '.join(given)} (a value of a type "
                         f"it cannot use): TypeError: {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _template_used(template: object, with_tools: bool) -> str:
    """The template transformers renders with: of named ones (a dict), "tool_use" when tools are given and it
    exists, else "default"; what the thinking and tool checks read."""
    if not isinstance(template, Mapping):
        return str(template)
    if with_tools and "tool_use" in template:
        return str(template["tool_use"])
    return str(template.get("default", ""))


def check_chat_template(tokenizer: Any) -> None:
    """ValueError when the tokenizer's chat template (of named ones, default and tool_use: tool_use renders every
    chat with tools) does not compile (a broken tokenizer_config.json or chat_template.jinja): said at start-up, not as chat
    requests' errors. A warning where one uses a filter or test jinja2 has not (`fromjson`, from a template written
    for another renderer: jinja2 compiles it inside a branch and fails only where that renders, often just with
    tools): the chats that reach it fail with INTERNAL naming it, the others are served."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return
    from jinja2 import TemplateSyntaxError

    fix = "fix the chat_template in tokenizer_config.json or chat_template.jinja"
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the tokenizer's chat template does not compile: {exc} (line {exc.lineno}); {fix}") from None
    except Exception:  # noqa: S110 -- it compiles; what it makes of a lone user message is the requests' business
        pass
    # Of named templates, those this service renders (_template_used): another (Command-R's "rag") is never used.
    used = [(name, template[name]) for name in ("default", "tool_use") if name in template] \
        if isinstance(template, Mapping) else [("", template)]
    for name, source in used:
        which = f"chat template {name!r}" if name else "chat template"
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            _compile_jinja_template(str(source))
        except TemplateSyntaxError as exc:
            raise ValueError(f"the tokenizer's {which} does not compile: {exc} (line {exc.lineno}); {fix}") from None
        except Exception:  # noqa: S110 -- another transformers: the default's check above is what there is
            pass
        names = _template_names(str(source))
        if names is not None and names.unknown:
            log.warning("the tokenizer's %s uses %s, which jinja2 (as transformers renders templates) has not: the "
                        "chats whose rendering reaches it fail with INTERNAL; %s", which, ", ".join(names.unknown), fix)


def special_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens: --chat-special-tokens refuse refuses them anywhere in a chat."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {token.content for token in decoder.values() if getattr(token, "special", False)}
    return tuple(sorted(t for t in texts if t))


def markup_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts of the chat template's markup tokens: --chat-special-tokens refuse refuses them in a chat outside
    assistant contents.

    A markup token is an added token that is not special (Qwen3's `<think>`, `<tool_call>`, `<tool_response>`),
    whose text the chat template holds (the template gives it a meaning: Qwen3's reads a user message wrapped in
    `<tool_response>` as a tool's result), and which holds a character other than a letter, digit or space: an
    added token that is a word or a run of spaces (Gemma's) is ordinary text even where the template writes it, and
    one the template never writes (Qwen's `<|fim_prefix|>`) marks no turn. Assistant contents may hold them: a
    prefilled reply begins with its thinking (`<think>...</think>`) or a tool call, and an earlier reply is sent
    back as the model wrote it."""
    special = set(special_token_texts(tokenizer))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    template = getattr(tokenizer, "chat_template", None) or ""
    sources = [str(t) for t in template.values()] if isinstance(template, Mapping) else [str(template)]
    return tuple(sorted({token.content for token in decoder.values()
                         if token.content and token.content not in special and any(token.content in s for s in sources)
                         and not all(c.isalnum() or c.isspace() for c in token.content)}))


def encode_chat(tokenizer: Any, messages: object, enable_thinking: bool | None = None, tools: object = None,
                template_kwargs: object = None, continue_final_message: bool = False) -> list[int]:
    """Render `messages` (see render_chat) and return the prompt's token ids. For tests and scripts: the service
    tokenizes through validation.tokenize_request."""
    text = render_chat(tokenizer, messages, enable_thinking, tools, template_kwargs, continue_final_message)
    return list(tokenizer.encode(text, add_special_tokens=False))
