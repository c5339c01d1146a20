"""Tool calls in a completion's text, in the formats the chat templates of the served families ask models for:
- **hermes** (Qwen2.5, Qwen3): one block per call, `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`;
- **llama3_json** (Llama 3.1, 3.2, 3.3): the whole reply is the call, `{"name": "...", "parameters": {...}}`
  (several separated by ";"), after `<|python_tag|>` when the template's built-in tools are on;
- **mistral** (Mistral 7B v0.3, Nemo, Small): `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`, or (newer
  tokenizers) `[TOOL_CALLS]name[ARGS]{...}` per call, with `[CALL_ID]id` before `[ARGS]` where the model numbers
  its calls. `[TOOL_CALLS]` is a special token: it reaches the text only with `skip_special_tokens=False` on the
  request.

The services pass a model's text through as it is (the format belongs to the model's template, not to the
protocol); a caller that offered tools (Chat.tools) reads the calls out of the finished text with this, and
sends each call's result back as a "tool" message after an assistant message carrying the calls.
"""

from __future__ import annotations

import json
import re
import secrets
import string

FORMATS = ("auto", "hermes", "llama3_json", "mistral")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_ID_CHARS = string.ascii_letters + string.digits
THINK_END = "</think>"
_UNREADABLE = "JSON that Python cannot read"
_NOT_JSON = "not JSON"


def _constant(name: str):
    raise ValueError(f"{_NOT_JSON}: {name} (JSON has no NaN or infinity)")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400: valid JSON, but a service refuses the infinity it reads as
        raise ValueError(f"{_UNREADABLE}: {text[:40]} is past a float's range")
    return value


# NaN, Infinity and numbers past a float's range parsed, and the service then refused the call fed back to it.
_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float)


def _decode(text: str, at: int = 0) -> tuple[object, int]:
    """The JSON value at text[at:] and where it ends; a JSONDecodeError for what json raises otherwise: an array
    nested some 1,000 deep (RecursionError, which escaped every format's handling) and an integer past Python's
    4,300 digits (a bare ValueError)."""
    try:
        return _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(f"{_UNREADABLE}: nested too deeply", text, at) from None
    except ValueError as exc:
        message = str(exc) if str(exc).startswith((_UNREADABLE, _NOT_JSON)) else f"{_UNREADABLE}: {exc}"
        raise json.JSONDecodeError(message, text, at) from None


def _thinking_end(text: str) -> int:
    """Where the thinking ends: the first "</think>" (the model closes its thinking once; a later one is text), or
    -1 for none. Without an opening "<think>" (thinking off, or a template that wrote it into the prompt, as
    Qwen3-Thinking-2507's do) a first "</think>" that lies inside a call's JSON is not the end of any thinking, in
    any format (_inside_json); one after a mere mention of "<tool_call>" or "[TOOL_CALLS]" still is. (Only hermes
    calls were looked into: a Llama 3 or Mistral call whose arguments held "</think>" was cut there, and dropped.)"""
    cut = text.find(THINK_END)
    if cut < 0 or text.lstrip().startswith("<think>"):
        return cut
    return -1 if _inside_json(text, cut) else cut


def _inside_json(text: str, cut: int) -> bool:
    """Whether text[cut] lies inside a JSON value where a call's JSON starts: the reply's run of JSON objects from its
    start (Llama 3, after any <|python_tag|>), a hermes block's, a JSON list after "[TOOL_CALLS]" or an object after
    "[ARGS]" (Mistral, from the first "[TOOL_CALLS]" on)."""
    def skip(at: int, chars: str = "") -> int:
        while at < len(text) and (text[at].isspace() or text[at] in chars):
            at += 1
        return at

    def spans(at: int) -> int | None:
        """Where the JSON value at text[at] ends; None where none parses there."""
        try:
            return _decode(text, at)[1]
        except json.JSONDecodeError:
            return None

    at = skip(0)
    if text.startswith(PYTHON_TAG, at):
        at = skip(at + len(PYTHON_TAG))
    while at < cut and text.startswith("{", at) and (end := spans(at)) is not None:
        if end > cut:
            return True
        at = skip(end, ";")
    first = text.find(MISTRAL_CALLS)
    for marker, opener, pos in ((OPEN, "{", 0), (MISTRAL_CALLS, "[", first), (MISTRAL_ARGS, "{", first)):
        while 0 <= pos and 0 <= (found := text.find(marker, pos)) < cut:
            at = skip(found + len(marker))
            end = spans(at) if text.startswith(opener, at) else None
            if end is not None and end > cut:
                return True
            pos = end if end is not None else at
    return False


def parse_tool_calls(text: str, fmt: str = "auto", thinking_open: bool = False) -> tuple[str, list[dict]]:
    """(the text less its tool calls, stripped; the calls as {"name": str, "arguments": dict}, in order, with an
    "id" where the format needs one), ready to be an assistant message's content and tool_calls.

    fmt: one of FORMATS. "auto" reads llama3_json where the whole text (past any thinking) is JSON objects with a
    string "name" and "parameters" or "arguments"; otherwise hermes blocks or mistral calls by whichever of
    "<tool_call>" and "[TOOL_CALLS]" comes first; otherwise the text has no calls.

    Calls are looked for after the thinking block only (a Qwen3 model's thinking may name the tag or quote a whole
    example call; a thinking block never closed, the completion stopped inside it, holds no calls), and each call is
    read as one JSON value, so an argument holding "</tool_call>" does not end it. A call that is not a JSON object
    with a string name, or one left open (the completion stopped inside it, at max_tokens; for llama3_json where
    the format was named or the reply starts with <|python_tag|>), is a ValueError naming it: models do write
    malformed calls, and what to do then is the caller's choice.

    thinking_open: the prompt ended inside a thinking block (a template that writes "<think>" into the prompt, as
    Qwen3-Thinking-2507's do), so a reply with no "</think>" is all thinking, cut short, and has no calls; without
    it such a reply cannot be told from one with thinking off."""
    if fmt not in FORMATS:
        raise ValueError(f"tool-call format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cut = _thinking_end(text)
    if cut < 0 and (thinking_open or text.lstrip().startswith("<think>")):
        # Thinking never closed (the completion stopped inside it, at max_tokens): all of it is thinking, and a call
        # drafted there is no call.
        return text.strip(), []
    head, body = (text[: cut + len(THINK_END)], text[cut + len(THINK_END):]) if cut >= 0 else ("", text)
    strict = fmt == "llama3_json" or body.lstrip().startswith(PYTHON_TAG)  # JSON there is meant as calls
    if fmt == "auto":
        # A reply that is Llama 3's calls whole is read as them, whatever its arguments mention; otherwise the
        # marker that comes first names the format (an argument may mention the other one's).
        if (calls := _llama3_calls(body, strict)) is not None:
            return head.strip(), calls
        hermes, mistral = body.find(OPEN), body.find(MISTRAL_CALLS)
        if hermes < 0 and mistral < 0:
            return text.strip(), []
        fmt = "hermes" if mistral < 0 or 0 <= hermes < mistral else "mistral"
    if fmt == "hermes":
        return _hermes(head, body)
    if fmt == "mistral":
        return _mistral(head, body)
    calls = _llama3_calls(body, strict)  # None: the text is not Llama 3's calls, so it has none
    return (text.strip(), []) if calls is None else (head.strip(), calls)


def _call(value: object, i: int, where: str) -> dict:
    """One call as {"name", "arguments": dict}, from a parsed JSON value, or a ValueError naming call i. The
    arguments are read from "arguments" or, where it is absent, "parameters": Llama 3's key, which models of every
    format write at times (read as no arguments, the call ran without them)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise ValueError(f"tool call {i} is not a JSON object with a string name (a non-empty one): {where[:200]!r}")
    arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        inner = arguments.strip()
        try:
            parsed, end = _decode(inner)
        except json.JSONDecodeError as exc:  # not JSON: named below as not an object, unless it says more
            if exc.msg.startswith((_UNREADABLE, _NOT_JSON)):
                raise ValueError(f"tool call {i} ({value['name']}): its arguments, a JSON text, are {exc.msg}") from None
        else:
            if end == len(inner):
                arguments = parsed
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {i} ({value['name']}): arguments must be a JSON object, got {arguments!r}")
    try:  # what the call's next trip to a service writes (a lone surrogate, "\ud800", cannot be)
        json.dumps([value["name"], arguments], ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise ValueError(f"tool call {i} ({value['name'][:80]!r}) holds text that is not valid Unicode: {exc}") from None
    return {"name": value["name"], "arguments": arguments}


def _llama3_calls(body: str, strict: bool) -> list[dict] | None:
    """Llama 3's JSON calls when the whole body is such calls (separated by ";" or whitespace), else None: a reply
    that is prose, or JSON of another shape, has no calls. strict (the caller named the format, or the body starts
    with <|python_tag|>): JSON that does not parse, a call cut short at max_tokens, is a ValueError instead."""
    rest = body.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith("{"):
        return None  # prose, or (after <|python_tag|>) a built-in tool's Python call
    calls, at = [], 0
    while at < len(rest):
        try:
            value, at = _decode(rest, at)
        except json.JSONDecodeError as exc:
            if strict and rest[at] == "{" and _cut_short(rest, exc):
                raise ValueError(f"tool call {len(calls)} was cut short (raise max_tokens): {rest[at:at + 200]!r}"
                                 ) from None
            if strict and rest[at] == "{" and exc.msg.startswith((_UNREADABLE, _NOT_JSON)):
                raise ValueError(f"tool call {len(calls)} is {exc.msg}: {rest[at:at + 200]!r}") from None
            return None  # not JSON: prose, or a built-in tool's Python; or a call followed by prose
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                and ("parameters" in value or "arguments" in value)):
            return None
        try:
            calls.append(_call(value, len(calls), rest[:200]))
        except ValueError:
            if strict:  # a call of Llama 3's shape, malformed (an empty name, arguments not an object, NaN): named
                raise
            return None
        while at < len(rest) and (rest[at].isspace() or rest[at] == ";"):
            at += 1
    return calls


def _cut_short(text: str, exc: json.JSONDecodeError) -> bool:
    """Whether JSON failed only because the text ended inside it: at its end, inside a string, or inside a literal
    (`tru`, `nul`, a lone `-`), which the decoder reports at the literal's start; inside a number's fraction or
    exponent (`1.`, `2.5e-`), which it reports as a missing delimiter after the digits; or inside a \\u escape
    (`\\u00`)."""
    left = text[exc.pos:].rstrip()
    if exc.msg.startswith("Invalid \\uXXXX escape"):  # reported at the "u"
        return len(left) < 5 and all(c in string.hexdigits for c in left[1:])
    return (not left or exc.msg.startswith("Unterminated string")
            or any(word.startswith(left) and word != left for word in ("true", "false", "null", "-0"))
            or (re.fullmatch(r"\.|[eE][+-]?", left) is not None and text[exc.pos - 1].isdigit()))


def _mistral(head: str, body: str) -> tuple[str, list[dict]]:
    """Mistral's calls: the text before "[TOOL_CALLS]" is the content; after it, a JSON list of calls, or
    name[ARGS]{...} per call (each after its own "[TOOL_CALLS]", or one after another), or name[CALL_ID]id[ARGS]{...}
    (v11 tokenizers that number the calls); another "[TOOL_CALLS]" may follow with more. Text after the last call
    that is not another call (no "[TOOL_CALLS]" or "[ARGS]" in it) is content too. Each call keeps the id the model
    gave it when that is the 9-character alphanumeric id Mistral's templates require of the calls an assistant
    message carries, and gets a new one otherwise."""
    start = body.find(MISTRAL_CALLS)
    if start < 0:
        return (head + body).strip(), []
    content, rest = head + body[:start], body[start + len(MISTRAL_CALLS):]
    calls: list[dict] = []
    ids: list[object] = []
    listed = rest.lstrip().startswith("[")  # v0.3's layout, else name[ARGS]{...}: one layout for the whole reply
    while True:
        stripped = rest.lstrip()
        if not stripped:  # the reply ended at a [TOOL_CALLS]: a marker with no call read as "no calls"
            raise ValueError(f"the reply ends at {MISTRAL_CALLS}, before its tool call {len(calls)}: cut short "
                             "(raise max_tokens)")
        if listed:  # v0.3: a JSON list
            try:
                value, end = _decode(stripped)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the tool calls are not a JSON list ({exc}), or were cut short (raise max_tokens): "
                                 f"{stripped[:200]!r}") from None
            if not isinstance(value, list):
                raise ValueError(f"the tool calls are not a JSON list: {stripped[:200]!r}")
            calls += [_call(item, len(calls) + i, stripped[:200]) for i, item in enumerate(value)]
            ids += [item.get("id") for item in value]
            rest = stripped[end:]
        else:  # name[ARGS]{...} or name[CALL_ID]id[ARGS]{...}
            name, sep, after = stripped.partition(MISTRAL_ARGS)
            name, has_id, call_id = name.partition(MISTRAL_CALL_ID)
            if not sep and MISTRAL_CALLS not in stripped:  # the reply ended before [ARGS]
                raise ValueError(f"tool call {len(calls)} ends before its {MISTRAL_ARGS}: cut short (raise "
                                 f"max_tokens), or not name{MISTRAL_ARGS}{{...}}: {stripped[:200]!r}")
            if not sep or not name.strip() or MISTRAL_CALLS in name:
                raise ValueError(f"tool call {len(calls)} is not name{MISTRAL_ARGS}{{...}}: {stripped[:200]!r}")
            after = after.lstrip()
            try:
                arguments, end = _decode(after)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tool call {len(calls)} ({name.strip()}): its arguments are not JSON ({exc}), or "
                                 f"were cut short (raise max_tokens): {after[:200]!r}") from None
            calls.append(_call({"name": name.strip(), "arguments": arguments}, len(calls), stripped[:200]))
            ids.append(call_id.strip() if has_id else None)
            rest = after[end:]
        following = rest.lstrip()
        if following.startswith(MISTRAL_CALLS):
            rest = following[len(MISTRAL_CALLS):]
        elif not following or MISTRAL_ARGS not in following or listed:
            content += rest  # prose after the calls (Devstral writes some)
            break
    for call, given in zip(calls, ids, strict=True):
        valid = isinstance(given, str) and len(given) == 9 and all(c in _ID_CHARS for c in given)
        call["id"] = given if valid else "".join(secrets.choice(_ID_CHARS) for _ in range(9))
    return content.strip(), calls


def _hermes(head: str, body: str) -> tuple[str, list[dict]]:
    """Hermes blocks in the body (the text after any thinking, which is kept as it is in head)."""
    calls, kept, pos = [], [head], 0
    while (start := body.find(OPEN, pos)) >= 0:
        kept.append(body[pos:start])
        i = len(calls)
        at = start + len(OPEN)
        while at < len(body) and body[at].isspace():
            at += 1
        try:
            call, at = _decode(body, at)
        except json.JSONDecodeError as exc:
            if CLOSE not in body[start:]:
                raise ValueError(f"tool call {i} is left open (no {CLOSE}): the completion stopped inside it; "
                                 "raise max_tokens") from None
            raise ValueError(f"tool call {i} is not JSON ({exc}): {body[start:start + 200]!r}") from None
        while at < len(body) and body[at].isspace():
            at += 1
        if not body.startswith(CLOSE, at):
            what = "left open (no " + CLOSE + ")" if CLOSE not in body[at:] else "followed by more than " + CLOSE
            raise ValueError(f"tool call {i} is {what}: {body[start:start + 200]!r}")
        calls.append(_call(call, i, body[start:start + 200]))
        pos = at + len(CLOSE)
    kept.append(body[pos:])
    return "".join(kept).strip(), calls
