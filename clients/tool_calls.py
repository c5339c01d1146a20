"""Tool calls in a completion's text, in the format Qwen2.5's and Qwen3's chat templates ask the model for (the
Hermes format): one block per call, `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`.

The services pass a model's text through as it is (the format belongs to the model's template, not to the
protocol); a caller that offered tools (Chat.tools) reads the calls out of the finished text with this, and
sends each call's result back as a "tool" message after an assistant message carrying the calls.
"""

from __future__ import annotations

import json
import re

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text less its tool-call blocks, stripped; the calls as {"name": str, "arguments": dict}, in order),
    ready to be an assistant message's content and tool_calls. A block that is not a JSON object with a string
    name, or a block left open (the completion stopped inside it, at max_tokens), is a ValueError naming it:
    models do write malformed calls, and what to do then is the caller's choice."""
    calls = []
    for i, block in enumerate(_BLOCK.findall(text)):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call {i} is not JSON ({exc}): {block.strip()[:200]!r}") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"tool call {i} is not a JSON object with a string name: {block.strip()[:200]!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {i} ({call['name']}): arguments must be a JSON object, got {arguments!r}")
        calls.append({"name": call["name"], "arguments": arguments})
    rest = _BLOCK.sub("", text)
    if OPEN in rest:
        raise ValueError(f"a tool call is left open (no {CLOSE}): the completion stopped inside it; raise max_tokens")
    return rest.strip(), calls
