"""Tool calls in a completion's text, in the format Qwen2.5's and Qwen3's chat templates ask the model for (the
Hermes format): one block per call, `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`.

The services pass a model's text through as it is (the format belongs to the model's template, not to the
protocol); a caller that offered tools (Chat.tools) reads the calls out of the finished text with this, and
sends each call's result back as a "tool" message after an assistant message carrying the calls.
"""

from __future__ import annotations

import json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
THINK_END = "</think>"
_DECODER = json.JSONDecoder()


def _thinking_end(text: str) -> int:
    """Where the thinking ends: the first "</think>" (the model closes its thinking once; a later one is text), or
    -1 for none. Without an opening "<think>" (thinking off, or a template that wrote it into the prompt, as
    Qwen3-Thinking-2507's do) a first "</think>" that lies inside a call's JSON is not the end of any thinking;
    one after a mere mention of "<tool_call>" in the thinking still is."""
    cut = text.find(THINK_END)
    if cut < 0 or text.lstrip().startswith("<think>"):
        return cut
    pos = 0
    while 0 <= (start := text.find(OPEN, pos)) < cut:
        at = start + len(OPEN)
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            _, end = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            pos = at
            continue
        if end > cut:
            return -1
        pos = end
    return cut


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text less its tool-call blocks, stripped; the calls as {"name": str, "arguments": dict}, in order),
    ready to be an assistant message's content and tool_calls.

    Calls are looked for after the thinking block only (a Qwen3 model's thinking may name the tag or quote a whole
    example call), and each block is read as one JSON value, so an argument holding "</tool_call>" does not end
    it. A block that is not a JSON object with a string name, or one left open (the completion stopped inside
    it, at max_tokens), is a ValueError naming it: models do write malformed calls, and what to do then is the
    caller's choice."""
    cut = _thinking_end(text)
    head, body = (text[: cut + len(THINK_END)], text[cut + len(THINK_END):]) if cut >= 0 else ("", text)
    calls, kept, pos = [], [head], 0
    while (start := body.find(OPEN, pos)) >= 0:
        kept.append(body[pos:start])
        i = len(calls)
        at = start + len(OPEN)
        while at < len(body) and body[at].isspace():
            at += 1
        try:
            call, at = _DECODER.raw_decode(body, at)
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
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"tool call {i} is not a JSON object with a string name: {body[start:start + 200]!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {i} ({call['name']}): arguments must be a JSON object, got {arguments!r}")
        calls.append({"name": call["name"], "arguments": arguments})
        pos = at + len(CLOSE)
    kept.append(body[pos:])
    return "".join(kept).strip(), calls
