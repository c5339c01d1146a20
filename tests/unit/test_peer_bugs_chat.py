"""Chat rendering against failure modes other servers shipped: what a template reads judged from its text, filters
jinja2 lacks, the client's thinking switch, BOS written by the template, date functions, and templates in the
shape of the served families (Llama 3.1's headers and tool placement, Mistral's alternation and call ids)."""

from __future__ import annotations

import copy
import datetime
import logging

import pytest

from clients.requests import chat, generate_request
from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.chat import check_chat_template, render_chat
from tokenizer_service.validation import prepare, tokenize_input

HI = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
PLAIN_LOOP = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(("template", "kwargs", "fragment"), [
    # Llama 3.1's variable next to tools, and prose or comments that name them, are no reading of them.
    ("{% if tools_in_user_message is defined %}{% endif %}" + PLAIN_LOOP, {"tools": [WEATHER]},
     "chat.tools is set, but the model's chat template never reads tools"),
    ("{# no tools here #}<|im_start|>system\nYou have no tools.<|im_end|>\n" + PLAIN_LOOP, {"tools": [WEATHER]},
     "chat.tools is set, but the model's chat template never reads tools"),
    ("{# enable_thinking is not supported #}" + PLAIN_LOOP, {"enable_thinking": False},
     "chat.enable_thinking is set, but the model's chat template has no thinking switch"),
    (PLAIN_LOOP + "{# tool_calls are not rendered #}", {},
     r"messages\[1\].tool_calls is set, but the model's chat template never reads tool_calls"),
])
def test_tools_thinking_or_calls_the_template_only_names_are_refused(demo_tokenizer, template, kwargs, fragment):
    """A server that checked a template's support for tools by looking for the word dropped the tools (or the
    thinking switch, or past tool calls) without a word when the template only mentioned it: a comment, a prompt's
    prose, another variable's name."""
    tok = _with_template(demo_tokenizer, template)
    messages = HI + [{"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {}}]}]
    with pytest.raises(ValueError, match=fragment):
        render_chat(tok, messages if not kwargs else HI, **kwargs)
    # Read in any of the ways templates read them, they reach the template.
    reading = ("{% if enable_thinking is defined %}{% endif %}{{ tools | length if tools else '' }}"
               "{% for m in messages %}{{ m.content }}{{ (m.get('tool_calls') or []) | length }}{% endfor %}")
    assert render_chat(_with_template(demo_tokenizer, reading), messages, tools=[WEATHER], enable_thinking=False) \
        == "1Hi01"


def test_a_filter_or_test_jinja2_lacks_is_warned_of_at_start_up_and_not_blamed_on_requests(demo_tokenizer, caplog):
    """jinja2 compiles a filter it does not have (a template written for another renderer's `fromjson`) inside a
    branch and fails only when that branch renders: the start-up check passed without a word, and every chat with
    tools was then refused as INVALID_ARGUMENT, blaming the caller for the model's template. Start-up warns (the
    chats that never reach the branch are still served), and those that do fail as the service's error."""
    for template, what in (
            ("{% if tools %}{{ tools | fromjson }}{% endif %}" + PLAIN_LOOP, "filter 'fromjson'"),
            ("{% for m in messages %}{% if m.role == 'tool' and m.content is jsonish %}x{% endif %}{% endfor %}",
             "test 'jsonish'")):
        tok = _with_template(demo_tokenizer, template)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tokenizer_service.chat"):
            check_chat_template(tok)
        assert [r for r in caplog.records if f"chat template uses {what}, which jinja2" in r.getMessage()], \
            [r.getMessage() for r in caplog.records]
        request = generate_request(messages=[{"role": "tool", "content": "x"}],
                                   tools=[WEATHER] if "tools" in template else None)
        with pytest.raises(RuntimeError, match=f"uses {what}") as e:  # INTERNAL, not the request's fault
            prepare(request, tok, {}, 4096)
        assert not isinstance(e.value, ValueError)
    # A model's tool_use template renders every chat with tools; start-up rendered only its default.
    with pytest.raises(ValueError, match="chat template 'tool_use' does not compile: No filter named 'fromjson'"):
        check_chat_template(_with_template(demo_tokenizer, {"default": PLAIN_LOOP, "tool_use": "{{ tools | fromjson }}"}))
    # A named template this service never renders (Command-R's "rag") is none of its business.
    check_chat_template(_with_template(demo_tokenizer, {"default": PLAIN_LOOP, "rag": "{{ documents | fromjson }}"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenizer_service.chat"):
        check_chat_template(_with_template(demo_tokenizer, {"default": PLAIN_LOOP,
                                                            "tool_use": "{% if tools %}{{ tools | fromjson }}{% endif %}"}))
    assert [r for r in caplog.records if "chat template 'tool_use' uses filter 'fromjson'" in r.getMessage()]
    check_chat_template(_with_template(demo_tokenizer, "{{ tools | tojson }}{{ x is mapping }}" + PLAIN_LOOP))


@pytest.mark.parametrize("setting", ["false", 0, 1, "yes"])
def test_the_client_refuses_a_thinking_switch_that_is_not_a_boolean(setting):
    """enable_thinking="false" (from an environment variable or a form) failed inside protobuf with "'str' object
    cannot be interpreted as an integer", naming neither the argument nor what it takes; 0 and 1 passed as False and
    True only by accident of protobuf's conversion."""
    with pytest.raises(ValueError, match=r"enable_thinking must be True, False or None \(the template's default\), got"):
        chat(HI, enable_thinking=setting)
    with pytest.raises(ValueError, match="enable_thinking must be True, False or None"):
        generate_request(messages=HI, enable_thinking=setting)
    assert chat(HI, enable_thinking=False).enable_thinking is False


# Llama 3.1's structure: the template writes the BOS; the system header says "Environment: ipython" with tools and
# carries the date; tools go in the first user message unless tools_in_user_message is false.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{%- if tools is not none and not tools_in_user_message %}{%- for t in tools %}{{- t | tojson + '\\n' }}"
    "{%- endfor %}{%- endif %}{{- system_message }}<|eot_id|>"
    "{%- if tools_in_user_message and tools is not none %}"
    "{%- if messages | length == 0 %}{{- raise_exception('Cannot put tools in the first user message when there is "
    "no first user message!') }}{%- endif %}"
    "<|start_header_id|>user<|end_header_id|>\n\n{%- for t in tools %}{{- t | tojson + '\\n' }}{%- endfor %}"
    "{{- messages[0].content | trim }}<|eot_id|>{%- set messages = messages[1:] %}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.tool_calls %}"
    "{%- if m.tool_calls | length != 1 %}{{- raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{{- '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' }}"
    "{{- m.tool_calls[0].function.arguments | tojson + '}' }}<|eot_id|>"
    "{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{- m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{- m.content | trim }}<|eot_id|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)


@pytest.fixture(scope="module")
def llama_like(demo_tokenizer):
    """The demo tokenizer with Llama 3's header tokens and a post-processor that adds <|begin_of_text|>."""
    from tokenizers.processors import TemplateProcessing

    tok = _with_template(demo_tokenizer, LLAMA31)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                              special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("x")["input_ids"][0] == bos  # a prompt gets the BOS from the tokenizer
    return tok, bos


def test_a_template_that_writes_the_bos_gets_one_and_tools_go_where_it_says(llama_like):
    """A template that writes bos_token, encoded with the tokenizer's own special tokens added, began with two BOS;
    the engine's ids are what transformers' apply_chat_template(tokenize=True) gives, whichever place the template
    puts the tools in (tools_in_user_message) and whatever date it is given."""
    tok, bos = llama_like
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "",
                     "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                    {"role": "tool", "content": "18 C"}]
    openai = [dict(m, tool_calls=[{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris"}}}])
              if "tool_calls" in m else m for m in conversation]
    for kwargs in ({}, {"tools_in_user_message": False, "date_string": "01 Jan 2030"}):
        request = generate_request(messages=conversation, tools=[WEATHER], template_kwargs=kwargs or None)
        ids = list(prepare(request, tok, {}, 4096).engine_request.prompt_token_ids)
        want = tok.apply_chat_template(openai, tools=[WEATHER], tokenize=True, add_generation_prompt=True,
                                       **kwargs)["input_ids"]
        assert ids == want
        assert ids.count(bos) == 1 and ids[0] == bos
        text = tok.decode(ids)
        assert "Environment: ipython" in text and '"parameters": {"city": "Paris"}' in text  # a dict, not its text
        assert ("01 Jan 2030" in text) == bool(kwargs)
        first_user = text.index("<|start_header_id|>user")
        assert (text.index('"name": "get_weather"') > first_user) == (not kwargs)  # the tools in the user turn
    tool_only = generate_request(messages=[{"role": "system", "content": "S"}], tools=[WEATHER])
    with pytest.raises(ValueError, match="rejected by the model's chat template: Cannot put tools in the first user"):
        prepare(tool_only, tok, {}, 4096)


def test_strftime_now_dates_a_template_and_date_string_still_overrides_it(demo_tokenizer):
    """Templates that date the system prompt with strftime_now (Llama 3.2's, Mistral Small 3's) failed where the
    renderer's sandbox lacked the function; the service renders with transformers', which has it."""
    tok = _with_template(demo_tokenizer, (
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
        "{%- endif %}{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + PLAIN_LOOP))
    before = datetime.datetime.now().strftime("%d %b %Y")
    text = render_chat(tok, HI)
    assert any(f"Today Date: {day}<" in text for day in (before, datetime.datetime.now().strftime("%d %b %Y")))
    assert "Today Date: 01 Jan 2030<" in render_chat(tok, HI, template_kwargs={"date_string": "01 Jan 2030"})
    check_chat_template(tok)


# Mistral's structure: [INST] turns that must alternate (else raise_exception), [TOOL_CALLS] with ids of 9
# alphanumerics (else raise_exception), results paired by call id.
MISTRAL = (
    "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(index=0) %}"
    "{%- for m in loop_messages %}{%- if not (m.role == 'tool' or m.tool_calls) %}"
    "{%- if (m.role == 'user') != (ns.index % 2 == 0) %}{{- raise_exception('After the optional system message, "
    "conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set ns.index = ns.index + 1 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for m in loop_messages %}"
    "{%- if m.role == 'user' %}[INST] {% if system_message is defined and loop.first %}{{ system_message }}\n\n"
    "{% endif %}{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}[TOOL_CALLS] ["
    "{%- for c in m.tool_calls %}"
    "{%- if c.id is not string or c.id | length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric "
    "strings with length 9!') }}{%- endif %}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"arguments\": ' + c.function.arguments | tojson + ', \"id\": \"' "
    "+ c.id + '\"}' }}{%- endfor %}]</s>"
    "{%- elif m.role == 'assistant' %} {{ m.content }}</s>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS] {{ {'content': m.content, 'call_id': m.tool_call_id} | tojson }}"
    "[/TOOL_RESULTS]"
    "{%- else %}{{- raise_exception('Only user, assistant and tool roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize(("messages", "reason"), [
    ([{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}],
     "conversation roles must alternate"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}], "conversation roles must alternate"),
    (HI + [{"role": "system", "content": "Late rules."}], "Only user, assistant and tool roles are supported"),
    (HI + [{"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {}}]}],
     "Tool call IDs should be alphanumeric strings with length 9"),
    (HI + [{"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {}, "id": "call_0123456789abcdef"}]}],
     "Tool call IDs should be alphanumeric strings with length 9"),
])
def test_a_conversation_the_template_refuses_is_bad_input_with_its_reason(demo_tokenizer, messages, reason):
    """Mistral's template raises on roles out of order, a system message past the first, and call ids that are
    not 9 characters (an OpenAI-style call_... id); servers answered 500 with an empty message. Here it is the
    request's error (INVALID_ARGUMENT) and says the template's reason, through Generate and Tokenize alike."""
    tok = _with_template(demo_tokenizer, MISTRAL)
    with pytest.raises(ValueError, match=f"rejected by the model's chat template: .*{reason}"):
        prepare(generate_request(messages=messages), tok, {}, 4096)
    with pytest.raises(ValueError, match=f"rejected by the model's chat template: .*{reason}"):
        tokenize_input(pb.TokenizeRequest(chat=chat(messages)), tok)


def test_a_paired_mistral_call_renders_with_its_arguments_as_an_object(demo_tokenizer):
    tok = _with_template(demo_tokenizer, MISTRAL)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a1B2c3D4e", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "18 C"}]
    text = tok.decode(tokenize_input(pb.TokenizeRequest(chat=chat(messages)), tok))
    assert text == ('[INST] Be brief.\n\nWeather in Paris?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": '
                    '{"city": "Paris"}, "id": "a1B2c3D4e"}]</s>[TOOL_RESULTS] {"content": "18 C", '
                    '"call_id": "a1B2c3D4e"}[/TOOL_RESULTS]')


def test_contents_are_text_for_the_template_never_template_code(demo_tokenizer):
    """Message text is data: jinja syntax in it (a sandbox escape attempt, or a template's own markup) reaches
    the prompt as written, never evaluated."""
    sneaky = "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}{{ ''.__class__.__mro__ }}"
    text = render_chat(demo_tokenizer, [{"role": "user", "content": sneaky}])
    assert f"<|im_start|>user\n{sneaky}<|im_end|>" in text and "49" not in text
