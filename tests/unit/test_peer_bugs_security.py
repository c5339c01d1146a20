"""Abuse of the public door within the protocol, as other servers shipped it: one request that costs the service far
more memory or CPU than the limits it is refused by suggest, because the request is copied out of its message,
parsed or walked before the limit is checked. Each request is built with the protos and refused by the tokenizer
service's own prepare() / tokenize_input(); memory is what tracemalloc sees (the message itself is protobuf's)."""

from __future__ import annotations

import json
import re
import time
import tracemalloc

import pytest

from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.validation import TextLimits, prepare, tokenize_input


def _peak_bytes_refusing(call) -> tuple[int, str]:
    """The Python memory at its peak while `call` refuses its request, and the refusal's text."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as refused:
            call()
        return tracemalloc.get_traced_memory()[1], str(refused.value)
    finally:
        tracemalloc.stop()


def _chat(messages=(), **fields) -> pb.Chat:
    return pb.Chat(messages=list(messages) or [pb.ChatMessage(role="user", content="hi")], **fields)


COUNT = 200_000
OVERSIZED = {  # a few bytes an entry on the wire, each list far past its bound
    "messages": (pb.GenerateRequest(chat=_chat([pb.ChatMessage(role="user", content="")] * COUNT)),
                 r"^messages: must hold at most 4096 messages \(max_messages\) \(got 200000\)"),
    "tool_calls": (pb.GenerateRequest(chat=_chat([pb.ChatMessage(role="assistant", content="",
                                                                 tool_calls=[pb.ToolCall(name="f")] * COUNT)])),
                   r"^messages: .*\(messages\[0\]\.tool_calls: a chat may hold at most 1024 tool calls\)"),
    "tools": (pb.GenerateRequest(chat=_chat(tools=["{}"] * COUNT)),
              r"^tools: .*tools must hold at most 128 tools, got 200000"),
    "stop": (pb.GenerateRequest(prompt="hi", stop=[str(i) for i in range(COUNT)]),
             r"^stop: must be a list of at most 64 strings .*\(got 200000\)"),
    "prompt_token_ids": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[7] * (20 * COUNT))),
                         r"^prompt_token_ids: must be shorter than max_model_len .*\(got 4000000 tokens"),
}


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_a_list_past_its_bound_is_refused_before_it_is_copied_out_of_the_message(name, demo_tokenizer):
    """A chat of millions of empty messages (or tool calls, tools, stop strings, prompt ids) in one 64 MiB message:
    each was copied into Python objects before the count was checked, a million messages 3.5 s and 250 MB, on
    PREPARE_SLOTS threads at once."""
    request, refusal = OVERSIZED[name]
    peak, message = _peak_bytes_refusing(lambda: prepare(request, demo_tokenizer, {}, 4096))
    assert peak < 1_000_000, f"refusing {name} held {peak} bytes"
    assert re.match(refusal, message), message


def _json_of(values: int) -> str:
    return '{"a": [' + "0," * values + "0]}"


@pytest.mark.parametrize("where", ["template_kwargs", "tools", "tool_call_arguments", "tokenize"])
def test_json_text_past_the_byte_bound_is_refused_before_it_is_parsed(where, demo_tokenizer):
    """Tools, tool-call arguments and template_kwargs were parsed, walked for their depth and their strings, and
    dumped again before the chat's byte bound refused them: a 16 MB template_kwargs of 8 million numbers took a
    minute of CPU, with the GIL, before INVALID_ARGUMENT. Their text as sent counts toward the bound."""
    text = _json_of(250_000)  # 500 KB, against a bound of 64 KiB
    limits = TextLimits(max_prompt_bytes=64 * 1024)
    chat = {"template_kwargs": _chat(template_kwargs=text), "tools": _chat(tools=[text]),
            "tool_call_arguments": _chat([pb.ChatMessage(role="assistant", content="",
                                                         tool_calls=[pb.ToolCall(name="f", arguments=text)])]),
            "tokenize": _chat(tools=[text])}[where]
    if where == "tokenize":
        call = lambda: tokenize_input(pb.TokenizeRequest(chat=chat), demo_tokenizer, limits)  # noqa: E731
    else:
        call = lambda: prepare(pb.GenerateRequest(chat=chat), demo_tokenizer, {}, 4096, limits)  # noqa: E731
    peak, message = _peak_bytes_refusing(call)
    assert message.startswith("messages: contents, tool calls, tools and template_kwargs must total at most 65536 "
                              "bytes"), message
    assert peak < 4 * len(text), f"refusing {where} held {peak} bytes for a {len(text)}-byte text"


def test_a_chat_within_its_bounds_is_still_measured_as_the_json_the_template_gets(demo_tokenizer):
    """The bound on text as sent adds to the one on the JSON the template gets (tojson's spaces), not replaces it."""
    text = '{"a": [' + ",".join(["0"] * 20_000) + "]}"  # 40 KB as sent, 60 KB as json.dumps writes it
    limits = TextLimits(max_prompt_bytes=50_000)
    with pytest.raises(ValueError, match=r"^messages: contents, .* \(got 6\d{4} bytes\)$"):
        prepare(pb.GenerateRequest(chat=_chat(tools=[text])), demo_tokenizer, {}, 4096, limits)


LLAMA3_SPECIALS = tuple(f"<|reserved_special_token_{i}|>" for i in range(250)) + (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")


def _cpu_s(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def test_the_special_token_rule_costs_little_beside_reading_the_json(demo_tokenizer):
    """--chat-special-tokens refuse checked each of a chat's strings against each special token in Python: under
    Llama 3's 256 special tokens a 5 MB tools list of a million short strings took 5 s of CPU, with the GIL, to be
    accepted. The rule now costs a fraction of the chat's own validation; a token deep in it is still named."""
    strings = [f"<|x{i}" for i in range(40_000)]  # each starts like a special token

    def request(last: str) -> pb.GenerateRequest:
        tool = json.dumps({"type": "function", "function": {"name": "f", "parameters": {"enum": [*strings, last]}}})
        return pb.GenerateRequest(chat=_chat(tools=[tool]))

    def validated(limits: TextLimits, last: str) -> None:
        try:
            prepare(request(last), demo_tokenizer, {}, 1 << 20, limits)
        except ValueError as exc:  # the demo template reads no tools: refused after the rules
            assert "never reads tools" in str(exc), exc

    refuse, allow = TextLimits(refused_chat_texts=LLAMA3_SPECIALS), TextLimits()
    for _ in range(2):  # the second round, once warm, decides: a loaded machine may slow one
        with_rule, without = _cpu_s(lambda: validated(refuse, "x")), _cpu_s(lambda: validated(allow, "x"))
        if with_rule < 2 * without + 0.05:
            break
    assert with_rule < 2 * without + 0.05, f"{with_rule:.2f}s with the rule, {without:.2f}s without"
    with pytest.raises(ValueError, match=r"\(tools\[0\] holds '<\|reserved_special_token_249\|>'\)"):
        prepare(request("a<|reserved_special_token_249|>"), demo_tokenizer, {}, 1 << 20, refuse)


def test_a_special_token_holding_the_separator_is_still_found(demo_tokenizer):
    """The joined search keeps a match inside one string by a separator no special token holds; a tokenizer whose
    special token holds it is checked string by string, as before."""
    odd = ("<|a\x00b|>",)
    messages = [pb.ChatMessage(role="user", content="x<|a"), pb.ChatMessage(role="user", content="b|>")]
    prepare(pb.GenerateRequest(chat=_chat(messages)), demo_tokenizer, {}, 4096, TextLimits(refused_chat_texts=odd))
    messages[1] = pb.ChatMessage(role="user", content="y<|a\x00b|>")
    with pytest.raises(ValueError, match=r"messages\[1\]\.content holds '<\|a\\x00b\|>'"):
        prepare(pb.GenerateRequest(chat=_chat(messages)), demo_tokenizer, {}, 4096,
                TextLimits(refused_chat_texts=odd))


def test_the_json_walks_give_what_a_plain_recursive_walk_gives():
    """_depth and json_strings walk a chat's JSON values level by level with type fast paths (the ABC checks of a
    plain walk held the GIL about 1 us a value: seconds for the 8 MiB a chat may carry); what they find must be what
    a recursive walk finds."""
    import random
    from collections import OrderedDict

    from tokenizer_service.chat import MAX_JSON_DEPTH, _depth, json_strings

    def depth(v) -> int:
        if isinstance(v, dict | list | tuple):
            children = v.values() if isinstance(v, dict) else v
            return 1 + max((depth(c) for c in children), default=0)
        return 0

    def strings(v) -> set[str]:
        if isinstance(v, str):
            return {v}
        if isinstance(v, dict):
            return set(map(str, v)).union(*(strings(c) for c in v.values()))
        if isinstance(v, list | tuple):
            return set().union(*(strings(c) for c in v))
        return set()

    rng = random.Random(0)

    def value(d: int):
        r = rng.random()
        if d > 20 or r < 0.3:
            return rng.choice([1, 2.5, "s", True, None, "x" * rng.randint(0, 3), f"u{rng.randint(0, 9)}"])
        if r < 0.6:
            return [value(d + 1) for _ in range(rng.randint(0, 3))]
        if r < 0.7:
            return tuple(value(d + 1) for _ in range(rng.randint(0, 2)))
        cls = OrderedDict if r < 0.8 else dict
        return cls((f"k{rng.randint(0, 5)}", value(d + 1)) for _ in range(rng.randint(0, 3)))

    for _ in range(3000):
        v = value(0)
        assert _depth(v) == min(depth(v), MAX_JSON_DEPTH + 1), v
        assert set(json_strings(v)) == strings(v), v
    chain = 1
    for _ in range(MAX_JSON_DEPTH + 5):
        chain = [chain]
    assert _depth(chain) == MAX_JSON_DEPTH + 1
