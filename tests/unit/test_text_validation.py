"""The text-side request rules: each broken rule is a ValueError that names its field."""

from __future__ import annotations

import pytest

from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.chat import encode_chat
from tokenizer_service.validation import (
    RULES,
    TextLimits,
    TextRequest,
    describe_rules,
    prepare,
    read_eos_token_ids,
    tokenize_input,
    validate_detokenize_ids,
    validate_prompt_tokens,
    validate_request,
)

OK_MESSAGES = [{"role": "user", "content": "hi"}]
LIMITS = TextLimits(max_prompt_bytes=16, max_messages=3, max_stop_strings=2, max_stop_string_chars=4)


@pytest.mark.parametrize(
    "request_",
    [
        TextRequest(prompt="hello"),
        TextRequest(messages=OK_MESSAGES, stop=["ab", "😀"], include_stop_str_in_output=True),
        TextRequest(prompt="x" * 16, stop=("abcd",), skip_special_tokens=False),
    ],
)
def test_valid_requests_pass(request_: TextRequest) -> None:
    validate_request(request_, LIMITS)


@pytest.mark.parametrize(
    ("request_", "field", "fragment"),
    [
        (TextRequest(), "input", "neither"),
        (TextRequest(prompt="a", messages=OK_MESSAGES), "input", "prompt and messages"),
        (TextRequest(prompt=b"bytes"), "prompt", "must be a string"),
        (TextRequest(prompt=""), "prompt", "must not be empty"),
        (TextRequest(prompt="é" * 9), "prompt", "18 bytes"),
        (TextRequest(messages=[]), "messages", "at least one message"),
        (TextRequest(messages=OK_MESSAGES * 4), "messages", "got 4"),
        (TextRequest(messages=[{"role": "wizard", "content": "x"}]), "messages", "'wizard'"),
        (TextRequest(messages=[{"role": "user", "content": "x" * 17}]), "messages", "17 bytes"),
        (TextRequest(messages=[{"role": "user", "content": "é" * 9}]), "messages", "18 bytes"),  # bytes, not chars
        (TextRequest(prompt="a", stop=["a", "b", "c"]), "stop", "got 3"),
        (TextRequest(prompt="a", stop="abc"), "stop", "not a list"),
        (TextRequest(prompt="a", stop=[""]), "stop", "stop[0]"),
        (TextRequest(prompt="a", stop=["ok", "abcde"]), "stop", "stop[1] is 5 characters"),
        (TextRequest(prompt="a", stop=["ok", 7]), "stop", "stop[1] is 7"),
        (TextRequest(prompt="a", skip_special_tokens="yes"), "skip_special_tokens", "'yes'"),
        (TextRequest(prompt="a", include_stop_str_in_output=1), "include_stop_str_in_output", "got 1"),
    ],
)
def test_each_broken_rule_names_its_field(request_: TextRequest, field: str, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        validate_request(request_, LIMITS)
    assert str(e.value).startswith(f"{field}: ")
    assert fragment in str(e.value)


def test_prompt_token_rules() -> None:
    limits = TextLimits(max_model_len=8)
    validate_prompt_tokens([1] * 7, limits)
    with pytest.raises(ValueError, match=r"^prompt: must be shorter than max_model_len.*got 8 tokens"):
        validate_prompt_tokens([1] * 8, limits)
    with pytest.raises(ValueError, match="at least one token"):
        validate_prompt_tokens([], limits)
    validate_prompt_tokens([1] * 10_000)  # max_model_len unknown: the engine decides


@pytest.mark.parametrize(
    ("ids", "fragment"), [([0, 5, 10], "token_ids[2] is 10"), ([-1], "token_ids[0] is -1"), ([True], "True")]
)
def test_detokenize_ids_must_be_in_the_vocabulary(ids: list, fragment: str) -> None:
    validate_detokenize_ids([0, 9], TextLimits(vocab_size=10))
    with pytest.raises(ValueError) as e:
        validate_detokenize_ids(ids, TextLimits(vocab_size=10))
    assert str(e.value).startswith("token_ids: ") and fragment in str(e.value)


def test_the_table_reads_as_text() -> None:
    text = describe_rules()
    assert len(text.splitlines()) == len(RULES)
    assert "[request] prompt: must not be empty" in text


# ---- The protocol side, through the same table. ----


def _generate_request(**kwargs):
    return pb.GenerateRequest(**kwargs)


def test_prepare_tokenizes_a_prompt_and_applies_defaults(demo_tokenizer) -> None:
    request = _generate_request(
        prompt="Hello 👋", stop=["END"], sampling_params=pb.SamplingParams(max_tokens=5)
    )
    prepared = prepare(request, demo_tokenizer, {"temperature": 0.7, "max_tokens": 99}, max_model_len=64)
    ids = list(prepared.engine_request.prompt_token_ids)
    assert ids == demo_tokenizer.encode("Hello 👋", add_special_tokens=False)
    assert prepared.num_prompt_tokens == len(ids)
    assert prepared.stop == ("END",) and prepared.skip_special_tokens is True
    params = prepared.engine_request.sampling_params
    assert params.max_tokens == 5  # the request wins over the model's default
    assert params.temperature == pytest.approx(0.7)


def test_prepare_renders_chat_messages(demo_tokenizer) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="你好")])
    prepared = prepare(_generate_request(chat=chat), demo_tokenizer, {}, max_model_len=64)
    assert list(prepared.engine_request.prompt_token_ids) == encode_chat(
        demo_tokenizer, [{"role": "user", "content": "你好"}]
    )


@pytest.mark.parametrize(
    ("kwargs", "start"),
    [
        ({}, "input: "),
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"prompt": "word " * 100}, "prompt: must be shorter than max_model_len"),
        ({"prompt": "ok", "stop": [""]}, "stop: "),
        ({"prompt": "ok", "stop": ["x"] * 65}, "stop: "),
    ],
)
def test_prepare_refuses_bad_input_naming_the_field(demo_tokenizer, kwargs: dict, start: str) -> None:
    with pytest.raises(ValueError) as e:
        prepare(_generate_request(**kwargs), demo_tokenizer, {}, max_model_len=16)
    assert str(e.value).startswith(start)


def test_prepare_refuses_unknown_chat_roles(demo_tokenizer) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="narrator", content="x")])
    with pytest.raises(ValueError, match=r"^messages: .*'narrator'.*system, user, assistant, tool"):
        prepare(_generate_request(chat=chat), demo_tokenizer, {}, max_model_len=64)


def test_tokenize_input_names_the_text_field(demo_tokenizer) -> None:
    assert tokenize_input(pb.TokenizeRequest(text="hi 🙂"), demo_tokenizer) == demo_tokenizer.encode(
        "hi 🙂", add_special_tokens=False
    )
    with pytest.raises(ValueError, match="^text: must not be empty"):
        tokenize_input(pb.TokenizeRequest(text=""), demo_tokenizer)


def test_eos_ids_outside_the_vocabulary_are_left_out_as_the_engine_leaves_them(tmp_path):
    """The engine ignores an EOS id its model cannot produce; the tokenizer service's set must match it, or the
    pool would refuse every engine on first contact."""
    import json
    from types import SimpleNamespace

    from tokenizer_service.validation import read_eos_token_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 600]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "vocab_size": 512}))
    assert read_eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=8), 512) == {7, 8, 9}
    assert read_eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=700), 512) == {7, 9}


def test_stop_token_ids_are_bounded_at_the_door(demo_tokenizer):
    from tokenizer_service.validation import MAX_STOP_TOKEN_IDS, TextLimits, prepare

    request = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(
        stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))))
    with pytest.raises(ValueError, match=f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids"):
        prepare(request, demo_tokenizer, {}, 1000, TextLimits())
    request.sampling_params.ClearField("stop_token_ids")
    request.sampling_params.stop_token_ids.extend([7] * 5000)  # repeats of one id are one id
    assert list(prepare(request, demo_tokenizer, {}, 1000, TextLimits()).engine_request.sampling_params.stop_token_ids)


@pytest.mark.parametrize("ids, words", [
    # 1,025 distinct ids and 1,000 repeats: the count is of the distinct ids (it said 2,025, the engine 1,025).
    (list(range(1025)) + [0] * 1000, "at most 1024 distinct ids, got 1025"),
    # One id, 16,385 times: the bound that fails is on the entries, not the distinct ids (it said "distinct").
    ([5] * 16385, "at most 16384 entries (and at most 1024 distinct ids), got 16385 entries"),
])
def test_stop_token_ids_refusals_count_what_they_bound_in_the_engines_words(demo_tokenizer, ids, words):
    from engine_service.sampling_params import SamplingParams
    from tokenizer_service.validation import TextLimits, prepare

    request = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(stop_token_ids=ids))
    with pytest.raises(ValueError) as at_door:
        prepare(request, demo_tokenizer, {}, 1000, TextLimits())
    with pytest.raises(ValueError) as at_engine:
        SamplingParams(stop_token_ids=ids)
    assert str(at_door.value) == str(at_engine.value) == f"stop_token_ids must hold {words}"


@pytest.fixture(scope="module")
def bos_tokenizer(demo_tokenizer):
    """The demo tokenizer with a post-processor that puts a BOS (<|endoftext|>) before the text, as Llama's does."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(demo_tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                              special_tokens=[("<|endoftext|>", bos)])
    return tok, bos


def _prompt_ids(tok, **kwargs) -> list[int]:
    return list(prepare(_generate_request(**kwargs), tok, {}, max_model_len=256).engine_request.prompt_token_ids)


def test_add_special_tokens_defaults_to_true_for_a_prompt_and_false_for_a_chat(bos_tokenizer) -> None:
    """As transformers' tokenizer(text) and vLLM's completions: a prompt gets the tokenizer's BOS, a chat gets what
    its template writes; the request can say otherwise, and Tokenize gives what Generate sends."""
    tok, bos = bos_tokenizer
    text = tok.encode("the sea is deep", add_special_tokens=False)
    assert _prompt_ids(tok, prompt="the sea is deep") == [bos, *text]
    assert _prompt_ids(tok, prompt="the sea is deep", add_special_tokens=False) == text
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    rendered = encode_chat(tok, [{"role": "user", "content": "hi"}])
    assert rendered[0] != bos
    assert _prompt_ids(tok, chat=chat) == rendered
    assert _prompt_ids(tok, chat=chat, add_special_tokens=True) == [bos, *rendered]
    assert tokenize_input(pb.TokenizeRequest(text="the sea is deep"), tok) == [bos, *text]
    assert tokenize_input(pb.TokenizeRequest(text="the sea is deep", add_special_tokens=False), tok) == text
    assert tokenize_input(pb.TokenizeRequest(chat=chat), tok) == rendered


@pytest.mark.parametrize("bad", [10**6, "vocab", -1])
def test_prompt_token_ids_outside_the_vocabulary_are_refused_by_the_service(demo_tokenizer, bad) -> None:
    """The service checks prompt_token_ids against the vocabulary itself, naming the field, rather than handing
    them to an engine: tests through a service still saw INVALID_ARGUMENT with the check gone, as the engine refuses
    them too, so only a check at this level notices."""
    vocab_size = len(demo_tokenizer)
    bad = vocab_size if bad == "vocab" else bad
    limits = TextLimits(vocab_size=vocab_size)
    ok = prepare(_generate_request(prompt_token_ids=pb.TokenIds(ids=[5, vocab_size - 1])), demo_tokenizer, {}, 64,
                 limits)
    assert list(ok.engine_request.prompt_token_ids) == [5, vocab_size - 1]
    with pytest.raises(ValueError) as e:
        prepare(_generate_request(prompt_token_ids=pb.TokenIds(ids=[5, bad])), demo_tokenizer, {}, 64, limits)
    assert str(e.value).startswith("prompt_token_ids: ") and f"token_ids[1] is {bad}" in str(e.value)


def test_add_special_tokens_is_refused_with_prompt_token_ids(demo_tokenizer) -> None:
    request = _generate_request(prompt_token_ids=pb.TokenIds(ids=[1, 2]), add_special_tokens=True)
    with pytest.raises(ValueError, match=r"^add_special_tokens: applies to a prompt or a chat"):
        prepare(request, demo_tokenizer, {}, max_model_len=64)


@pytest.mark.parametrize("n,ok", [(None, True), (1, True), (16, True), (0, False), (17, False)])
def test_n_is_1_to_16(demo_tokenizer, n, ok) -> None:
    request = _generate_request(prompt="hi", **({} if n is None else {"n": n}))
    if ok:
        assert prepare(request, demo_tokenizer, {}, max_model_len=64).n == (n or 1)
    else:
        with pytest.raises(ValueError, match=rf"^n: the number of completions must be 1 to 16, got {n}$"):
            prepare(request, demo_tokenizer, {}, max_model_len=64)


@pytest.mark.parametrize("file", ["generation_config.json", "config.json"])
@pytest.mark.parametrize("eos", [[2, None], "</s>", 2.5, True])
def test_an_eos_token_id_that_is_not_token_ids_stops_the_service_naming_the_file(tmp_path, file, eos):
    """As the engine refuses it: int() read true as id 1 and 2.5 as 2, and a null in a list or a token's text
    raised a bare TypeError or ValueError at start-up."""
    import json
    import types

    (tmp_path / file).write_text(json.dumps({"eos_token_id": eos}))
    tokenizer = types.SimpleNamespace(eos_token_id=None)
    with pytest.raises(ValueError, match=rf"{file}'s eos_token_id should be a token id or a list of them"):
        read_eos_token_ids(str(tmp_path), tokenizer, 100)
    (tmp_path / file).write_text(json.dumps({"eos_token_id": [3, 200]}))
    assert read_eos_token_ids(str(tmp_path), tokenizer, 100) == {3}  # past the vocabulary: left out


def test_a_request_without_input_is_refused_naming_its_own_fields():
    """Tokenize{} was told 'exactly one of a prompt and chat messages must be set' (its field is `text`), and
    Generate{} the same, leaving out prompt_token_ids."""
    from protos.llmserve.text.v1 import text_pb2 as pb
    from tokenizer_service.validation import text_request_from_proto

    for request, fields in ((pb.GenerateRequest(), "prompt, chat or prompt_token_ids"),
                            (pb.TokenizeRequest(), "text or chat")):
        with pytest.raises(ValueError, match=f"^input: exactly one of {fields} must be set; got none$"):
            text_request_from_proto(request)
