"""Chat messages: role and content validation, and rendering through the model's chat template."""

from __future__ import annotations

import copy

import pytest

from tokenizer_service.chat import VALID_ROLES, encode_chat, render_chat, validate_messages


def test_renders_chatml_with_the_generation_prompt(demo_tokenizer) -> None:
    text = render_chat(
        demo_tokenizer,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋 你好"}],
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 👋 你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encoded_chat_uses_special_token_ids(demo_tokenizer) -> None:
    ids = encode_chat(demo_tokenizer, [{"role": "user", "content": "Hello"}])
    im_start = demo_tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = demo_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == im_start
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert demo_tokenizer.decode(ids) == render_chat(demo_tokenizer, [{"role": "user", "content": "Hello"}])


@pytest.mark.parametrize("role", ["robot", "User", "", "developer", None])
def test_unknown_role_names_the_role_and_the_valid_ones(demo_tokenizer, role) -> None:
    with pytest.raises(ValueError) as e:
        render_chat(demo_tokenizer, [{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
    msg = str(e.value)
    assert "messages[1].role" in msg and repr(role) in msg
    for valid in VALID_ROLES:
        assert valid in msg


@pytest.mark.parametrize("role", VALID_ROLES)
def test_every_valid_role_renders(demo_tokenizer, role: str) -> None:
    assert f"<|im_start|>{role}\nx<|im_end|>" in render_chat(demo_tokenizer, [{"role": role, "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "at least one message"),
        ("hello", "must be a list"),
        (None, "must be a list"),
        (["hello"], "messages[0] must be a mapping"),
        ([{"content": "x"}], "messages[0].role is required"),
        ([{"role": "user"}], "messages[0].content is required"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unknown keys ['name']"),
    ],
)
def test_malformed_messages_are_refused(messages, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        validate_messages(messages)
    assert fragment in str(e.value)


def test_text_parts_are_joined_and_input_is_not_mutated() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    before = copy.deepcopy(messages)
    assert validate_messages(messages) == [{"role": "user", "content": "ab"}]
    assert messages == before


def test_tokenizer_without_chat_template_is_a_clear_error(demo_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "x"}])


def test_template_errors_become_value_errors(demo_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat(tok, [{"role": "user", "content": "x"}])


# Qwen3's thinking switch, in a small ChatML template of the same shape.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def test_enable_thinking_reaches_a_template_with_the_switch_and_is_refused_without_one(demo_model_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}]
    plain = AutoTokenizer.from_pretrained(demo_model_dir)  # the demo's ChatML template has no switch
    with pytest.raises(ValueError, match="chat.enable_thinking is set, but the model's chat template has no"):
        render_chat(plain, messages, enable_thinking=False)
    assert render_chat(plain, messages) == render_chat(plain, messages, enable_thinking=None)
    thinking = AutoTokenizer.from_pretrained(demo_model_dir)
    thinking.chat_template = THINKING_TEMPLATE
    off = render_chat(thinking, messages, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for setting in (None, True):
        assert render_chat(thinking, messages, enable_thinking=setting).endswith("<|im_start|>assistant\n")


def test_a_template_that_does_not_compile_is_refused_at_start_up(demo_model_dir, tmp_path) -> None:
    """A syntax error in the template made every chat request an INVALID_ARGUMENT blaming the client, while
    GetModelInfo said has_chat_template=true and the service started without a word."""
    import shutil

    from tokenizer_service.server import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match="chat template does not compile: .*line 1"):
        load_tokenizer(str(model))
    (model / "chat_template.jinja").write_text("{{ raise_exception('a system message must come first') }}")
    load_tokenizer(str(model))  # compiles: refusing a lone user message is the template's business


def test_special_token_texts_are_the_tokenizers_control_tokens(demo_tokenizer) -> None:
    from tokenizer_service.chat import special_token_texts

    texts = special_token_texts(demo_tokenizer)
    assert "<|im_start|>" in texts and "<|im_end|>" in texts
    ids = encode_chat(demo_tokenizer, [{"role": "user", "content": f"hi{texts[0]}"}])
    assert demo_tokenizer.convert_tokens_to_ids(texts[0]) in ids  # what the refusal is for: it is a control id


def test_chat_refusals_after_tokenizing_name_the_chat_not_a_prompt(demo_tokenizer) -> None:
    """A chat longer than max_model_len was refused as 'prompt: ...', a field the request never set."""
    from protos.llmserve.text.v1 import text_pb2 as pb
    from tokenizer_service.validation import TextLimits, prepare

    request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="word " * 100)]))
    with pytest.raises(ValueError, match=r"^chat: must be shorter than max_model_len tokens"):
        prepare(request, demo_tokenizer, {}, 32, TextLimits())


def test_client_chat_takes_text_parts_and_refuses_unknown_keys() -> None:
    from clients.requests import chat

    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chat(parts).messages[0].content == "ab"  # was: protobuf's "bad argument type for built-in operation"
    with pytest.raises(ValueError, match=r"messages\[0\] has unknown keys \['name'\]"):
        chat([{"role": "user", "content": "x", "name": "bob"}])  # was: silently dropped


# Llama 3.1's template reads date_string and tools_in_user_message; a small template of the same shape.
DATED_TEMPLATE = (
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "<|im_start|>system\nToday is {{ date_string }}.{%- if tools_in_user_message is defined and "
    "tools_in_user_message %} Tools follow the user.{%- endif %}<|im_end|>\n"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture
def dated(demo_tokenizer):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = DATED_TEMPLATE
    return tok


def test_template_kwargs_reach_the_template_as_transformers_passes_them(dated) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for kwargs in ({"date_string": "1 Jan 2030"}, {"date_string": "1 Jan 2030", "tools_in_user_message": True},
                   '{"tools_in_user_message": false}'):
        want = dated.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(kwargs if isinstance(kwargs, dict) else {"tools_in_user_message": False}))
        assert render_chat(dated, messages, template_kwargs=kwargs) == want
    assert "Today is 1 Jan 2030." in render_chat(dated, messages, template_kwargs={"date_string": "1 Jan 2030"})
    assert render_chat(dated, messages, template_kwargs={}) == render_chat(dated, messages)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"date_strng": "x"}, "sets 'date_strng', but the model's chat template never reads it"),
    # Read as the template's variables, not as text it contains ("date" and "e" are in "date_string").
    ({"date": "x"}, "sets 'date', but the model's chat template never reads it"),
    ({"e": 1}, "sets 'e', but the model's chat template never reads it"),
    # apply_chat_template's own parameters and the sandbox's globals used to fail as TypeErrors (INTERNAL).
    ({"self": 1}, "'self' is set by the service"),
    ({"namespace": 1}, "'namespace' is set by the service"),
    ({"range": 0}, "'range' is set by the service"),
    ({"messages": []}, "'messages' is set by the service, not by a request; set chat.messages instead"),
    ({"enable_thinking": False}, "'enable_thinking' is set by the service, not by a request; set chat.enable_thinking"),
    ({"add_generation_prompt": False}, "'add_generation_prompt' is set by the service"),
    ({"bos_token": "<s>"}, "'bos_token' is set by the service"),
    ({"not a name": 1}, "'not a name' is not a template variable's name"),
    ("[1, 2]", "template_kwargs must be a JSON object, got list"),
    ("{oops", "template_kwargs must be a JSON object, got text that is not JSON"),
    ({f"v{i}": i for i in range(65)}, "at most 64 variables, got 65"),
])
def test_bad_template_kwargs_are_refused_by_name(dated, kwargs, fragment) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        render_chat(dated, [{"role": "user", "content": "Hi"}], template_kwargs=kwargs)


def test_template_kwargs_through_the_protocol_count_toward_the_chat_rules(dated) -> None:
    """Through a TokenizeRequest the variables reach the template as given; their strings count toward the chat's
    bytes and, under --chat-special-tokens refuse, may not hold a control token's text."""
    from clients.requests import chat, generate_request
    from protos.llmserve.text.v1 import text_pb2 as pb
    from tokenizer_service.chat import special_token_texts
    from tokenizer_service.validation import TextLimits, tokenize_input

    messages = [{"role": "user", "content": "Hi"}]
    request = pb.TokenizeRequest(chat=chat(messages, template_kwargs={"date_string": "1 Jan 2030"}))
    want = dated.encode(render_chat(dated, messages, template_kwargs={"date_string": "1 Jan 2030"}),
                        add_special_tokens=False)
    assert tokenize_input(request, dated) == want
    refuse = TextLimits(refused_chat_texts=special_token_texts(dated))
    sneaky = pb.TokenizeRequest(chat=chat(messages, template_kwargs={"date_string": "x<|im_end|>"}))
    with pytest.raises(ValueError, match="template_kwargs holds '<|im_end|>'".replace("|", r"\|")):
        tokenize_input(sneaky, dated, refuse)
    big = pb.TokenizeRequest(chat=chat(messages, template_kwargs={"date_string": "x" * 2000}))
    with pytest.raises(ValueError, match="must total at most 1000 bytes"):
        tokenize_input(big, dated, TextLimits(max_prompt_bytes=1000))
    with pytest.raises(ValueError, match="enable_thinking, tools, template_kwargs and continue_final_message apply to chat"):
        generate_request("Hi", template_kwargs={"date_string": "x"})



def test_a_template_kwarg_of_a_type_the_template_cannot_use_is_bad_input(demo_tokenizer) -> None:
    """A template_kwargs value the template fails on with a TypeError (not jinja's own error type) was an INTERNAL
    error; a template that fails so on plain messages still is one."""
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = "{{ date_string + '!' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert render_chat(tok, [{"role": "user", "content": "Hi"}], template_kwargs={"date_string": "today"}) == "today!Hi"
    with pytest.raises(ValueError, match=r"the chat template failed with the request's template_kwargs \(a value of a type it cannot use\): TypeError"):
        render_chat(tok, [{"role": "user", "content": "Hi"}], template_kwargs={"date_string": 5})
    tok.chat_template = "{{ messages[0]['content'] + 1 }}"  # broken for any chat: the service's error, not bad input
    with pytest.raises(TypeError):
        render_chat(tok, [{"role": "user", "content": "Hi"}])


def test_tools_or_tool_calls_of_a_type_the_template_cannot_use_are_bad_input(demo_tokenizer) -> None:
    """A tool whose description was a number (Hermes' template adds it to text) or a tool call whose arguments held
    a list where the template wanted a mapping ended as INTERNAL with a traceback: the request's JSON, like
    template_kwargs, is the request's error. NaN and Infinity, which json.loads takes, are not JSON."""
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = (
        "{% for t in tools or [] %}{{ t['function']['description'] + '.' }}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}"
        "{% for c in m.get('tool_calls') or [] %}{% for k, v in c['function']['arguments']['opts'] | items %}"
        "{{ k }}{% endfor %}{% endfor %}{% endfor %}"
    )
    hi = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "f", "description": "finds", "parameters": {}}}
    assert render_chat(tok, hi, tools=[tool]) == "finds.Hi"
    tool["function"]["description"] = 5
    with pytest.raises(ValueError, match=r"failed with the request's tools \(a value of a type it cannot use\)"):
        render_chat(tok, hi, tools=[tool])
    called = hi + [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"opts": [1]}}]}]
    with pytest.raises(ValueError, match=r"failed with the request's tool calls \("):
        render_chat(tok, called)
    called[1]["tool_calls"][0]["arguments"] = {"opts": {"a": 1}}
    assert render_chat(tok, called) == "Hia"
    for bad in ('{"opts": NaN}', '{"opts": {"a": -Infinity}}'):
        called[1]["tool_calls"][0]["arguments"] = bad
        with pytest.raises(ValueError, match=r"arguments must be a JSON object, got text that is not JSON: .*NaN"):
            render_chat(tok, called)
    called[1]["tool_calls"][0]["arguments"] = {"opts": {"a": float("nan")}}  # from Python, not text
    with pytest.raises(ValueError, match=r"arguments must be a JSON object of UTF-8 text"):
        render_chat(tok, called)
    tok.chat_template = "{{ messages[0]['content'] + 1 }}"  # broken on plain messages: still the service's error
    with pytest.raises(TypeError):
        render_chat(tok, hi)


def test_continue_final_message_renders_the_last_assistant_message_open(demo_tokenizer) -> None:
    """chat.continue_final_message: the last message, an assistant's, is the start of the reply: rendered as
    transformers renders it with continue_final_message (no end of turn, no new turn), through the protocol too;
    another last role, an assistant's tool calls, or a template that does not keep the text are refused."""
    from clients.requests import chat, generate_request, options_used
    from protos.llmserve.text.v1 import text_pb2 as pb
    from tokenizer_service.validation import PROMPT_TAIL_TOKENS, prepare, tokenize_input

    messages = [{"role": "user", "content": "Give me JSON."}, {"role": "assistant", "content": 'Sure: {"a": '}]
    text = render_chat(demo_tokenizer, messages, continue_final_message=True)
    assert text == demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                      continue_final_message=True)
    assert text.endswith('<|im_start|>assistant\nSure: {"a": ') and text.count("<|im_start|>assistant") == 1
    request = pb.TokenizeRequest(chat=chat(messages, continue_final_message=True))
    assert tokenize_input(request, demo_tokenizer) == demo_tokenizer.encode(text, add_special_tokens=False)
    assert options_used(request) == {"continue_final_message"}
    closed = render_chat(demo_tokenizer, messages)  # without it: the turn is closed and a new one opened
    assert closed.endswith('Sure: {"a": <|im_end|>\n<|im_start|>assistant\n')

    for last, what in (({"role": "user", "content": "More."}, "ends with a 'user' message"),
                       ({"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
                        "ends with tool calls")):
        with pytest.raises(ValueError, match=f"continue_final_message is set, but the chat {what}"):
            render_chat(demo_tokenizer, [*messages[:1], last], continue_final_message=True)
    shouting = copy.deepcopy(demo_tokenizer)
    shouting.chat_template = ("{%- for m in messages %}{{- m['role'] + ': ' + (m['content'] | upper) + '\\n' }}"
                              "{%- endfor %}")
    with pytest.raises(ValueError, match="does not render the last message's content as written"):
        render_chat(shouting, messages, continue_final_message=True)
    with pytest.raises(ValueError, match="continue_final_message apply to chat messages only"):
        generate_request("Hi", continue_final_message=True)
    # Refused where it could only be dropped or wrong: nothing to continue; the thinking switch, which templates read
    # where they open a new turn; a JSON response format, whose grammar starts at the reply's first character.
    with pytest.raises(ValueError, match="content is empty or blank: there is nothing to continue"):
        render_chat(demo_tokenizer, [*messages[:1], {"role": "assistant", "content": " \n"}], continue_final_message=True)
    thinking = copy.deepcopy(demo_tokenizer)
    thinking.chat_template = THINKING_TEMPLATE
    with pytest.raises(ValueError, match="enable_thinking does nothing for a continued reply"):
        render_chat(thinking, messages, enable_thinking=False, continue_final_message=True)
    json_prefix = generate_request(messages=messages, continue_final_message=True, response_format="json_object")
    with pytest.raises(ValueError, match="JSON grammar starts at the reply's first character"):
        prepare(json_prefix, demo_tokenizer, {}, 4096)
    # The reply is read after the prompt's last ids (the detokenizer's first context) only where it continues it.

    continued = prepare(generate_request(messages=messages, continue_final_message=True), demo_tokenizer, {}, 4096)
    ids = list(continued.engine_request.prompt_token_ids)
    assert continued.prompt_tail == tuple(ids[-PROMPT_TAIL_TOKENS:]) and len(continued.prompt_tail) == 8
    assert prepare(generate_request(messages=messages), demo_tokenizer, {}, 4096).prompt_tail == ()
