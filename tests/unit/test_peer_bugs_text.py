"""Failure modes other servers shipped in their text path, checked against ours: streamed text with stop strings
and min_tokens, a chat template's BOS, and tool calls written in the shapes models really use."""

from __future__ import annotations

import copy
import random

import pytest

from clients.tool_calls import parse_tool_calls
from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.text_stream import TextStream
from tokenizer_service.validation import prepare, tokenize_input

REPLACEMENT_CHAR = "\ufffd"
FRAGMENTS = ["Hello", " world", ",", " the", " sea", ".", "\n", "  ", "😀", "中文", "今天", "café", " 🎉", "ab", " a",
             "\n\n", "日本語"]


@pytest.fixture(scope="module")
def sentencepiece():
    from tests.integration.tiny import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


def _feed(stream: TextStream, ids: list[int], rng: random.Random) -> str:
    """The stream's text for ids coming in updates of 1 to 4, to the stop or the end."""
    out, i = "", 0
    while i < len(ids) and stream.stopped is None:
        k = rng.randint(1, 4)
        out += stream.feed(ids[i : i + k])
        i += k
    return out if stream.stopped is not None else out + stream.finish()


def _cut_at_first_stop(text: str, stops: list[str], include: bool, exempt: int) -> tuple[str, str | None]:
    """The reference: decode everything, then cut at the stop string that ends first (the longer at a tie) among
    those ending past the first `exempt` characters (the text of the first min_tokens tokens)."""
    best = None
    for stop in stops:
        at = text.find(stop)
        while at >= 0 and at + len(stop) <= exempt:
            at = text.find(stop, at + 1)
        if at >= 0 and (best is None or (at + len(stop), -len(stop)) < (best[0], -len(best[1]))):
            best = (at + len(stop), stop)
    if best is None:
        return text, None
    end, stop = best
    return (text[:end] if include else text[: end - len(stop)]), stop


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_text_is_decode_cut_at_the_first_stop_string_past_min_tokens(demo_tokenizer, sentencepiece, kind):
    """Peers streamed text after a stop string before they saw it, missed one spanning tokens, or let one end
    inside min_tokens. Here a request's stream must equal decoding all its ids and cutting at the first stop string
    that ends in the text of a token past min_tokens. It did not where the last exempt token ended inside a
    character: its complete characters (" " of " \\xf0") came out with the next token's text and counted as
    past min_tokens (9 of 1,500 fuzzed cases)."""
    tokenizer = {"byte-level": demo_tokenizer, "sentencepiece": sentencepiece}[kind]
    rng = random.Random(kind)
    for _ in range(300):
        ids = tokenizer.encode("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))),
                               add_special_tokens=False)
        text = tokenizer.decode(ids)
        min_tokens = rng.choice([0, rng.randint(0, len(ids))])
        exempt = len(tokenizer.decode(ids[:min_tokens]).rstrip(REPLACEMENT_CHAR))
        if not text.startswith(tokenizer.decode(ids[:min_tokens]).rstrip(REPLACEMENT_CHAR)):
            continue  # a byte-fallback run cut inside a character: its whole characters are U+FFFDs too
        stops = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text))
            stops.append(text[at : at + rng.randint(1, 4)])
        if exempt and rng.random() < 0.5:  # one ending on the last exempt character, where the bug was
            stops.append(text[max(0, exempt - rng.randint(1, 3)) : exempt])
        include = rng.random() < 0.5
        want, stop = _cut_at_first_stop(text, stops, include, exempt)
        stream = TextStream(tokenizer, tuple(stops), True, include, min_tokens=min_tokens)
        assert (_feed(stream, ids, rng), stream.stopped) == (want, stop), (ids, stops, min_tokens, include)


@pytest.mark.parametrize("split", [1, 2, 100], ids=["token by token", "two at a time", "all at once"])
def test_whole_characters_of_the_last_exempt_token_stay_exempt(demo_tokenizer, split):
    """Stop string plus min_tokens: the min_tokens-th token's text is " \\xf0" (a space and the first byte of an
    emoji), held back whole until the emoji completes; the space then reached the matcher with the next token's
    text and a stop string ending on it stopped the request though it ends inside min_tokens."""
    ids = demo_tokenizer.encode("the sea 🎉 is deep", add_special_tokens=False)
    pieces = [demo_tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    m = next(k for k in range(1, len(ids)) if pieces[k].endswith(REPLACEMENT_CHAR)
             and len(pieces[k].rstrip(REPLACEMENT_CHAR)) > len(pieces[k - 1].rstrip(REPLACEMENT_CHAR)))
    stop = pieces[m].rstrip(REPLACEMENT_CHAR)[-3:]  # "ea " ends in the text of token m, the last exempt one
    assert pieces[-1].count(stop) == 1
    stream = TextStream(demo_tokenizer, (stop,), True, False, min_tokens=m)
    out = ""
    for i in range(0, len(ids), split):
        out += stream.feed(ids[i : i + split])
    assert stream.stopped is None and out + stream.finish() == pieces[-1]
    stream = TextStream(demo_tokenizer, (stop,), True, False, min_tokens=m - 1)  # one token earlier it stops
    assert _feed(stream, ids, random.Random(0)) == pieces[-1][: pieces[-1].index(stop)] and stream.stopped == stop


def test_a_chat_template_that_writes_the_bos_gets_one_bos(demo_tokenizer):
    """Double BOS: a template that writes {{ bos_token }} rendered, then encoded with the tokenizer's special
    tokens, starts the prompt with two BOS (Llama 3, Mistral and Gemma templates write theirs). A chat is encoded
    without them unless the request asks, through Generate and Tokenize alike."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(demo_tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                              special_tokens=[("<|endoftext|>", bos)])
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    assert tok.encode("hi")[:1] == [bos]  # the tokenizer adds a BOS of its own
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    ids = list(prepare(pb.GenerateRequest(chat=chat), tok, {}, max_model_len=256).engine_request.prompt_token_ids)
    assert ids == tokenize_input(pb.TokenizeRequest(chat=chat), tok)
    assert ids[0] == bos and ids.count(bos) == 1, ids
    assert tok.decode(ids) == "<|endoftext|>user: hi\nassistant:"


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "write_file", "parameters": {"path": "a.txt", "text": "}{"}}\n</tool_call>',
    '[TOOL_CALLS][{"name": "write_file", "parameters": {"path": "a.txt", "text": "}{"}}]',
    '{"name": "write_file", "parameters": {"path": "a.txt", "text": "}{"}}',
])
def test_a_call_written_with_parameters_keeps_its_arguments(text):
    """A Hermes or Mistral call whose model wrote "parameters" (Llama 3's key, which models of other families write
    at times) was read with no arguments at all, and ran so, without an error."""
    _, calls = parse_tool_calls(text)
    assert [(c["name"], c["arguments"]) for c in calls] == [("write_file", {"path": "a.txt", "text": "}{"})]


def test_mistral_calls_with_call_ids_keep_their_names_and_ids():
    """Mistral's v11 tokenizers that number calls write [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}: the name was read
    as "get_weather[CALL_ID]abc123XYZ", and the model's id dropped (so were ids in a v0.3 JSON list)."""
    text = ('Checking.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}'
            '[TOOL_CALLS]get_time[CALL_ID]q9W8e7R6t[ARGS]{}')
    content, calls = parse_tool_calls(text, "mistral")
    assert content == "Checking."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"},
                     {"name": "get_time", "arguments": {}, "id": "q9W8e7R6t"}]
    listed = '[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "Zz0Yy1Xx2"}, {"name": "g", "arguments": {}, "id": 7}]'
    first, second = parse_tool_calls(listed)[1]
    assert first["id"] == "Zz0Yy1Xx2"
    # An id Mistral's templates would refuse (not 9 letters and digits) is replaced by one they take.
    assert len(second["id"]) == 9 and second["id"].isalnum() and second["id"].isascii()
    _, calls = parse_tool_calls('[TOOL_CALLS]f[CALL_ID]call_1[ARGS]{"x": 1}')
    assert calls[0]["name"] == "f" and calls[0]["arguments"] == {"x": 1} and len(calls[0]["id"]) == 9
    assert calls[0]["id"].isalnum()
