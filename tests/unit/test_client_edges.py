"""Edge cases of the client library (clients/) and chat templating (tokenizer_service/chat.py) that a mutation
audit found untested: each test names the bug it catches. An in-process fake text service stands in for the real
one where a call's wire behaviour (metadata, cancellation, deadlines, what was sent) is what matters."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

from clients.requests import generate_request, options_used
from clients.text_client import TextClient, _tokenize_request
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

OPTIONS_HEADER = "x-llmserve-options"


class _FakeText(pb_grpc.TextGenerationServicer):
    """Records what arrives; answers with the options header `listed` (None: no header)."""

    def __init__(self) -> None:
        self.listed: str | None = None
        self.detokenize_requests: list[pb.DetokenizeRequest] = []
        self.cancelled = threading.Event()
        self.first_sent = threading.Event()

    def _headers(self, context) -> None:
        if self.listed is not None:
            context.send_initial_metadata(((OPTIONS_HEADER, self.listed),))

    def Generate(self, request, context):
        self._headers(context)
        context.add_callback(self.cancelled.set)
        while context.is_active():  # a long generation, until the client ends the call
            yield pb.GenerateResponse(text="x")
            time.sleep(0.01)

    def GenerateMulti(self, request_iterator, context):
        self._headers(context)
        context.add_callback(self.cancelled.set)
        for frame in request_iterator:
            if frame.HasField("generate"):
                yield pb.GenerateResponse(request_id=frame.generate.request_id, text="x",
                                          finish_reason=pb.FINISH_REASON_STOP)
                self.first_sent.set()
        while context.is_active():
            time.sleep(0.01)

    def Detokenize(self, request, context):
        self.detokenize_requests.append(request)
        return pb.DetokenizeResponse(text="t")


@pytest.fixture(scope="module")
def fake_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = _FakeText()
    pb_grpc.add_TextGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def fake(fake_server):
    servicer, target = fake_server
    servicer.listed = None
    servicer.cancelled.clear()
    servicer.first_sent.clear()
    servicer.detokenize_requests.clear()
    return servicer, target


# ---------------------------------------------------------------- clients/requests.py


def test_n_takes_its_whole_documented_range():
    """n from 1 to 16: an off-by-one bound refused n=16 (or took 17)."""
    assert generate_request("x", n=16).n == 16
    assert generate_request("x", n=1).n == 1
    for bad in (0, 17):
        with pytest.raises(ValueError, match="n must be"):
            generate_request("x", n=bad)


def test_n_of_one_is_no_option_an_old_service_must_honour():
    """n=1 is the default: counting it as the "n" option refused it on every service whose list lacks n."""
    assert options_used(generate_request("x", n=1)) == set()
    assert options_used(generate_request("x", n=2)) == {"n"}


def test_penalties_at_their_neutral_values_need_no_feature():
    """repetition_penalty 1.0 and presence/frequency 0.0 change nothing: they must not count as "penalties"."""
    assert options_used(generate_request("x", repetition_penalty=1.0, presence_penalty=0.0,
                                         frequency_penalty=0.0)) == set()
    assert options_used(generate_request("x", repetition_penalty=0.5)) == {"penalties"}
    assert options_used(generate_request("x", presence_penalty=0.5)) == {"penalties"}


def test_enable_thinking_false_is_sent_and_checked():
    """enable_thinking=False must travel as set-to-false (a template's default may be True) and count as the
    enable_thinking option: a truthiness check dropped it silently."""
    messages = [{"role": "user", "content": "hi"}]
    request = generate_request(messages=messages, enable_thinking=False)
    assert request.chat.HasField("enable_thinking") and request.chat.enable_thinking is False
    assert options_used(request) == {"enable_thinking"}
    assert not generate_request(messages=messages).chat.HasField("enable_thinking")


def test_special_token_flags_set_false_are_sent_not_dropped():
    """skip_special_tokens=False and add_special_tokens=False must travel as set-to-false: the service's default for
    both is True, so a truthiness check would strip special tokens or add a BOS against the caller's word."""
    from clients.text_client import _detokenize_request

    request = generate_request("x", skip_special_tokens=False, add_special_tokens=False)
    assert request.HasField("skip_special_tokens") and request.skip_special_tokens is False
    assert request.HasField("add_special_tokens") and request.add_special_tokens is False
    assert not generate_request("x").HasField("skip_special_tokens")
    tokenize = _tokenize_request("x", None, False, None)
    assert tokenize.HasField("add_special_tokens") and tokenize.add_special_tokens is False
    detokenize = _detokenize_request([1], False)
    assert detokenize.HasField("skip_special_tokens") and detokenize.skip_special_tokens is False
    with pytest.raises(ValueError, match="add_special_tokens must be True, False or None"):
        _tokenize_request("x", None, 2, None)
    with pytest.raises(ValueError, match="skip_special_tokens must be True, False or None"):
        _detokenize_request([1], 2)


def test_an_assistant_message_that_only_calls_tools_may_have_no_content():
    """OpenAI's assistant message with content None and tool_calls: refused before, as content was not a string."""
    request = generate_request(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}])
    assistant = request.chat.messages[1]
    assert assistant.content == "" and assistant.tool_calls[0].name == "get"
    assert assistant.tool_calls[0].id == "c1"
    assert request.chat.messages[2].tool_call_id == "c1"


def test_chat_only_options_on_a_prompt_are_refused():
    """continue_final_message (like tools, template_kwargs, enable_thinking) applies to a chat only: on a prompt
    it was dropped without a word."""
    for option in ({"continue_final_message": True}, {"enable_thinking": False}, {"tools": [{"name": "f"}]},
                   {"template_kwargs": {"a": 1}}):
        with pytest.raises(ValueError, match="chat messages only"):
            generate_request("x", **option)


def test_a_huge_deadline_is_clamped_to_the_field():
    """deadline_ms past uint64 is clamped (no deadline), not a protobuf ValueError."""
    assert generate_request("x", deadline_ms=2**70).deadline_ms == 2**64 - 1
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="deadline_ms"):
            generate_request("x", deadline_ms=bad)


# ---------------------------------------------------------------- clients/text_client.py


def test_request_metadata_cuts_a_long_id_to_what_metadata_carries():
    """generate_multi sends request_id as metadata: an id past MAX_METADATA_ID_CHARS must be cut, or gRPC fails
    the call RESOURCE_EXHAUSTED (its metadata limit)."""
    from clients.text_client import MAX_METADATA_ID_CHARS, request_metadata

    [(name, value)] = request_metadata("a" * 50_000)
    assert name == "x-request-id" and value == "a" * MAX_METADATA_ID_CHARS
    assert request_metadata("a b~") == (("x-request-id", "a b~"),)  # a space is printable ASCII
    assert request_metadata("") is None and request_metadata(None) is None


def test_a_refused_option_cancels_the_call(fake):
    """OptionsNotHonoured must cancel the call: otherwise the old service kept generating (without the option)
    for a reader that is gone."""
    from clients.requests import OptionsNotHonoured

    servicer, target = fake
    servicer.listed = "logprobs"
    with TextClient(target, timeout=10) as client:
        stream = client.generate("hi", n=2)
        with pytest.raises(OptionsNotHonoured, match="predates n"):
            next(stream)
        assert servicer.cancelled.wait(5), "the service's call was left running"
        del stream


def test_generate_multi_checks_options_of_requests_sent_after_the_first_check(fake):
    """A GenerateMulti's options grow as requests go out: a request using an option the service lacks, sent after
    an earlier one passed the check, must still be refused (not checked once and then trusted)."""
    from clients.requests import OptionsNotHonoured

    servicer, target = fake
    servicer.listed = "logprobs"

    def frames():
        yield pb.MultiRequest(generate=generate_request("a", request_id="a", logprobs=1))
        servicer.first_sent.wait(5)
        time.sleep(0.1)
        yield pb.MultiRequest(generate=generate_request("b", request_id="b", n=2))

    with TextClient(target, timeout=10) as client:
        stream = client.generate_multi(frames())
        first = next(stream)
        assert first.request_id == "a"
        with pytest.raises(OptionsNotHonoured, match="predates n"):
            next(stream)
        stream.cancel()


def test_generate_multi_keeps_the_clients_timeout(fake):
    """The client's timeout is every call's deadline, GenerateMulti's too: without it a stalled stream hung."""
    _, target = fake
    with TextClient(target, timeout=0.5) as client:
        stream = client.generate_multi(iter([]))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_deadline_ms_is_milliseconds_and_the_shorter_of_it_and_the_timeout(fake):
    """Generate's deadline_ms becomes the call's deadline in seconds (ms / 1000), and never lengthens the
    client's own timeout."""
    _, target = fake
    for timeout, deadline_ms, within in ((0.3, 60_000, (0.2, 3.0)), (30, 300, (0.2, 2.5))):
        with TextClient(target, timeout=timeout) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.generate("hi", deadline_ms=deadline_ms).text()
            took = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert within[0] < took < within[1], (timeout, deadline_ms, took)


def test_detokenize_sends_skip_special_tokens_false(fake):
    """skip_special_tokens=False must be sent (the service's default is True): a truthiness check dropped it."""
    servicer, target = fake
    with TextClient(target, timeout=10) as client:
        client.detokenize([1, 2], skip_special_tokens=False)
        client.detokenize([1, 2])
    sent_false, sent_default = servicer.detokenize_requests
    assert sent_false.HasField("skip_special_tokens") and sent_false.skip_special_tokens is False
    assert not sent_default.HasField("skip_special_tokens")


def test_multi_stream_cancels_the_call_at_a_failed_request(fake):
    """completions() raising for a failed request must cancel the call: the other requests kept generating."""
    from clients.text_client import MultiStream

    class Call:
        cancelled = False

        def __init__(self):
            self._it = iter([pb.GenerateResponse(request_id="a", text="x"),
                             pb.GenerateResponse(request_id="a", finish_reason=pb.FINISH_REASON_ERROR,
                                                 status=pb.Status(code=8, message="no room"))])

        def __next__(self):
            return next(self._it)

        def cancel(self):
            self.cancelled = True

        def done(self):
            return True

    call = Call()
    with pytest.raises(ValueError, match="no room"):
        MultiStream(call).completions()
    assert call.cancelled


# ---------------------------------------------------------------- clients/channel.py


def test_channel_options_defaults():
    """The documented channel settings: 64 MiB both ways, a 30 s keepalive timed out in 10 s, pings without data
    unlimited (0); a setting given replaces the default rather than being sent twice."""
    from clients.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options

    assert DEFAULT_MAX_MESSAGE_BYTES == 64 << 20
    options = channel_options()
    names = [name for name, _ in options]
    assert len(names) == len(set(names))
    got = dict(options)
    assert got["grpc.max_send_message_length"] == got["grpc.max_receive_message_length"] == 64 << 20
    assert got["grpc.keepalive_time_ms"] == 30_000
    assert got["grpc.keepalive_timeout_ms"] == got["grpc.http2.ping_timeout_ms"] == 10_000
    assert got["grpc.http2.max_pings_without_data"] == 0
    got = dict(channel_options(max_message_bytes=5 << 20))
    assert got["grpc.max_send_message_length"] == got["grpc.max_receive_message_length"] == 5 << 20
    replaced = channel_options(extra_options=[("grpc.keepalive_time_ms", 1234)])
    assert [v for n, v in replaced if n == "grpc.keepalive_time_ms"] == [1234]
    with pytest.raises(ValueError, match="more than once"):
        channel_options(extra_options=[("grpc.x", 1), ("grpc.x", 2)])


def test_client_timeout_bounds():
    """A timeout is a positive number of seconds; zero, negative and NaN are refused, very long ones mean none."""
    from clients.channel import MAX_TIMEOUT_S, client_timeout

    for bad in (0, -1, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="timeout"):
            client_timeout(bad)
    assert client_timeout(2) == 2.0
    assert client_timeout(float("inf")) is None and client_timeout(MAX_TIMEOUT_S) is None


@dataclass(frozen=True)
class _Tls:
    """A stand-in for ClientTls: its files, and credentials() that fail while `bad` holds their text."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def stamp(self):
        from clients.tls import files_stamp

        return files_stamp(self.ca_file)

    def credentials(self, warn: bool = True):
        from pathlib import Path

        if Path(self.ca_file).read_text() == "bad":
            raise ValueError("does not load")
        return object()


def _channels(tmp_path):
    from clients.channel import Channels

    ca = tmp_path / "ca.pem"
    ca.write_text("A")
    made = []

    def open_channel(target, tls, **kwargs):
        made.append(object())
        return made[-1]

    return Channels(open_channel, "t", _Tls(str(ca)), lambda channel: ("stub", channel)), ca, made


def _rewrite(path, text):
    """A new file at path (a new inode, as a Secret's rotation makes, so the stamp moves)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def test_rotating_the_tls_files_back_to_earlier_contents_makes_a_new_channel(tmp_path):
    """A -> B -> A: the contents compared must be the current channel's, not the first's, or the rotation back
    to A counted as a touch and new calls stayed on B's channel (its certificate expired)."""
    channels, ca, made = _channels(tmp_path)
    assert channels.stub() == ("stub", made[0])
    _rewrite(ca, "B")
    assert channels.stub() == ("stub", made[1])
    _rewrite(ca, "A")
    assert channels.stub() == ("stub", made[2])
    _rewrite(ca, "A")  # a touch: same contents, same channel
    assert channels.stub() == ("stub", made[2]) and len(made) == 3


def test_every_channel_made_is_closed_with_the_client(tmp_path):
    """The channels retired by a rotation (calls in flight finish on them) are closed with the client, not leaked."""
    channels, ca, made = _channels(tmp_path)
    _rewrite(ca, "B")
    channels.stub()
    assert channels.close() == made == [made[0], made[1]]


def test_unknown_client_settings_are_refused():
    """A misspelt channel setting (max_message_size) must be a TypeError, not silently ignored."""
    with pytest.raises(TypeError, match="unknown client setting"):
        TextClient("127.0.0.1:1", max_message_size=1 << 20)


# ---------------------------------------------------------------- clients/engine_client.py


def test_engine_client_abort_says_whether_the_request_was_found():
    """EngineClient.abort returns the engine's `found`, not True for every id."""
    from clients.engine_client import EngineClient
    from protos.llmserve.engine.v1 import engine_pb2 as epb
    from protos.llmserve.engine.v1 import engine_pb2_grpc as epb_grpc

    class Engine(epb_grpc.EngineServicer):
        def Abort(self, request, context):
            return epb.AbortResponse(found=request.request_id == "live")

        def GenerateStream(self, request, context):
            while context.is_active():
                time.sleep(0.01)
            yield from ()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    epb_grpc.add_EngineServicer_to_server(Engine(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with EngineClient(f"127.0.0.1:{port}", timeout=0.5) as client:
            assert client.abort("live") is True
            assert client.abort("gone") is False
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:  # the client's timeout bounds GenerateStream too
                list(client.generate([1, 2], request_id="r"))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
    finally:
        server.stop(0)


# ---------------------------------------------------------------- clients/flags.py


@dataclass
class _Settings:
    port: int = 50051
    verbose: bool = False
    name: str = "n"


def test_flags_and_environment_parse_each_fields_type():
    """Booleans take on/off, yes/no, 1/0, true/false (padded too, never blank) from flags and the environment; a
    flag of 0 wins over the environment (a truthiness check fell through to it); a bad value names the variable."""
    from clients.flags import parse_settings

    def parse(argv, env):
        return parse_settings(_Settings, "X_", "p", "d", argv, env)

    assert parse([], {}) == _Settings()
    assert parse([], {"X_VERBOSE": " on "}).verbose is True
    assert parse([], {"X_VERBOSE": "off"}).verbose is False
    with pytest.raises(ValueError, match="X_VERBOSE=''"):  # blank is refused, not false (an empty ConfigMap key)
        parse([], {"X_VERBOSE": ""})
    assert parse(["--verbose", "false"], {"X_VERBOSE": "true"}).verbose is False
    assert parse(["--port", "0"], {"X_PORT": "9"}).port == 0
    assert parse(["--name", ""], {"X_NAME": "env"}).name == ""
    with pytest.raises(ValueError, match="X_VERBOSE"):
        parse([], {"X_VERBOSE": "maybe"})


# ---------------------------------------------------------------- tokenizer_service/chat.py


class _Recorder:
    """A tokenizer whose chat template (source only: what the checks read) reads `reads`; it records the keyword
    arguments apply_chat_template is given."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append({"messages": messages, **kwargs})
        return "rendered"

    def encode(self, text, add_special_tokens=True):
        return [1] if add_special_tokens else []


def test_continue_final_message_renders_the_reply_open():
    """Continuing the assistant's message renders it open: no generation prompt, continue_final_message passed."""
    from tokenizer_service.chat import render_chat

    tokenizer = _Recorder("{{ messages }}")
    render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
                continue_final_message=True)
    render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    continued, new_turn = tokenizer.calls
    assert continued["add_generation_prompt"] is False and continued["continue_final_message"] is True
    assert new_turn["add_generation_prompt"] is True and "continue_final_message" not in new_turn


def test_continue_final_message_refuses_what_it_cannot_continue():
    """The last message must be an assistant's without tool calls, with text; and enable_thinking does nothing
    there: each was dropped or mangled silently."""
    from tokenizer_service.chat import render_chat

    tokenizer = _Recorder("{{ messages }} {{ tool_calls }} {{ enable_thinking }}")
    user = {"role": "user", "content": "hi"}
    for last, kwargs, needle in (
            ({"role": "assistant", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}, {}, "tool calls"),
            ({"role": "assistant", "content": "  "}, {}, "empty or blank"),
            ({"role": "assistant", "content": "Hel"}, {"enable_thinking": False}, "continued reply")):
        with pytest.raises(ValueError, match=needle):
            render_chat(tokenizer, [user, last], continue_final_message=True, **kwargs)
    assert tokenizer.calls == []


def test_template_kwargs_must_be_variables_the_template_reads_not_substrings():
    """A template variable must be one the template looks up, not any text its source contains: 'date' passed
    for a template reading only date_string, and changed nothing."""
    from tokenizer_service.chat import render_chat

    tokenizer = _Recorder("{{ date_string }}{% for m in messages %}{{ m.content }}{% endfor %}")
    user = [{"role": "user", "content": "hi"}]
    render_chat(tokenizer, user, template_kwargs={"date_string": "today"})
    assert tokenizer.calls[-1]["date_string"] == "today"
    with pytest.raises(ValueError, match="never reads it"):
        render_chat(tokenizer, user, template_kwargs={"date": "today"})


def test_enable_thinking_for_a_template_without_the_switch_is_refused():
    from tokenizer_service.chat import render_chat

    with pytest.raises(ValueError, match="no thinking switch"):
        render_chat(_Recorder("{{ messages }}"), [{"role": "user", "content": "hi"}], enable_thinking=True)


def test_the_tool_use_template_is_used_only_with_tools():
    """Of named templates, "tool_use" is the one rendered (and checked) when tools are given, "default" otherwise:
    a chat without tools was checked against the tool_use template (enable_thinking accepted for a default template
    without the switch)."""
    from tokenizer_service.chat import render_chat

    tokenizer = _Recorder({"default": "{{ messages }}", "tool_use": "{{ tools }} {{ enable_thinking }}"})
    with pytest.raises(ValueError, match="no thinking switch"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], enable_thinking=True)
    render_chat(tokenizer, [{"role": "user", "content": "hi"}], enable_thinking=True, tools=[{"name": "f"}])
    assert tokenizer.calls[-1]["tools"] == [{"name": "f"}]


def test_tool_calls_and_tool_messages_keep_their_ids_and_rules():
    """A call's id reaches the template (templates pair calls and results by it); tool_calls only on assistant
    messages, tool_call_id only on tool messages, a call only with name/arguments/id, a tool role is valid."""
    from tokenizer_service.chat import validate_messages

    got = validate_messages([
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "", "id": "c1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert got[0]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {}}, "id": "c1"}]
    assert got[1] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    for bad, needle in (
            ({"role": "user", "content": "", "tool_calls": [{"name": "f"}]}, "only assistant"),
            ({"role": "user", "content": "", "tool_call_id": "c1"}, "on a 'tool' message"),
            ({"role": "assistant", "content": "", "tool_calls": [{"name": "f", "args": {}}]}, "optionally 'id'"),
            ({"role": "assistant", "content": "", "tool_calls": [{"name": ""}]}, "non-empty")):
        with pytest.raises(ValueError, match=needle):
            validate_messages([bad])


def test_bounds_on_tools_and_json_depth_are_exact():
    """MAX_TOOLS tools and JSON MAX_JSON_DEPTH deep are allowed, one more is refused (off-by-one bounds)."""
    from tokenizer_service.chat import MAX_JSON_DEPTH, MAX_TOOLS, validate_tools

    assert len(validate_tools([{"name": "f"}] * MAX_TOOLS)) == MAX_TOOLS
    with pytest.raises(ValueError, match="at most"):
        validate_tools([{"name": "f"}] * (MAX_TOOLS + 1))

    def nested(depth):
        value: dict = {}
        for _ in range(depth - 1):
            value = {"a": value}
        return value

    assert validate_tools([nested(MAX_JSON_DEPTH)])
    with pytest.raises(ValueError, match="deep"):
        validate_tools([nested(MAX_JSON_DEPTH + 1)])


def test_encode_chat_adds_no_special_tokens():
    """The template writes its own BOS/markers: encoding must not add the tokenizer's (a doubled BOS)."""
    from tokenizer_service.chat import encode_chat

    assert encode_chat(_Recorder("{{ messages }}"), [{"role": "user", "content": "hi"}]) == []


@pytest.mark.parametrize("build, where", [
    (lambda: generate_request("ok \udcff", max_tokens=3), "prompt (character 3"),
    (lambda: generate_request("hi", stop=["a", "\udcff"]), "stop[1] "),
    (lambda: generate_request(messages=[{"role": "user", "content": "x\ud800"}]), "messages[0]['content'] "),
    (lambda: generate_request("hi", json_schema='{"a\udcff": 1}'), "json_schema "),
    (lambda: generate_request(messages=[{"role": "user", "content": "x"}], template_kwargs={"k\udcff": 1}),
     "template_kwargs key 'k\\udcff' "),
    (lambda: _tokenize_request("t\udcff", None, None, None), "text "),
    (lambda: generate_request(b"ok \xff", max_tokens=3), "prompt (byte 3"),
    (lambda: _tokenize_request(b"\xfe", None, None, None), "text (byte 0"),
])
def test_text_that_is_not_utf8_is_refused_naming_the_argument(build, where):
    """A lone surrogate (a command-line argument with bytes that are not UTF-8) raised protobuf's UnicodeEncodeError,
    naming neither the argument nor the cause; llm-client printed it as it was."""
    with pytest.raises(ValueError) as err:
        build()
    assert type(err.value) is ValueError and str(err.value).startswith(where), err.value
    assert "is not valid UTF-8 text" in str(err.value)


@pytest.mark.parametrize("name, value, bits", [("seed", 2**63, 64), ("priority", 2**31, 32),
                                               ("max_tokens", -2**31 - 1, 32)])
def test_an_integer_past_the_protocols_range_says_the_range(name, value, bits):
    """protobuf's 'Value out of range: N' gave no range; the service's own ranges are checked once it fits."""
    with pytest.raises(ValueError, match=rf"{name}={value}: out of the range .* signed {bits}-bit integer in "
                                         rf"\[-2\*\*{bits - 1}, 2\*\*{bits - 1}\)"):
        generate_request("hi", **{name: value})
    generate_request("hi", **{name: 2**(bits - 1) - 1})  # the largest it carries goes to the service


def test_token_ids_are_refused_by_index_when_the_protocol_cannot_carry_them_and_a_prompt_needs_order():
    """prompt_token_ids and stop_token_ids past int32 failed with protobuf's bare 'Value out of range: N'; a set or
    dict as a prompt ran its ids in some order (a set's without repeats), through both clients."""
    from clients.engine_client import EngineClient

    with pytest.raises(ValueError, match=r"^prompt_token_ids\[1\]=1099511627776: .*signed 32-bit, in \[-2\*\*31, "):
        generate_request(prompt_token_ids=[1, 2**40])
    with pytest.raises(ValueError, match=r"^stop_token_ids\[0\]=2147483648: "):
        generate_request("x", stop_token_ids=[2**31])
    for unordered in ({30, 10, 20}, {5: "a", 3: "b"}):
        with pytest.raises(ValueError, match=f"prompt_token_ids must be a list .*not a {type(unordered).__name__}"):
            generate_request(prompt_token_ids=unordered)
        with pytest.raises(ValueError, match="not a"), EngineClient("127.0.0.1:1") as engine:
            engine.generate(unordered)
    assert sorted(generate_request("x", stop_token_ids={3, 1}).sampling_params.stop_token_ids) == [1, 3]
    assert list(generate_request(prompt_token_ids=(4, 5, 4)).prompt_token_ids.ids) == [4, 5, 4]


def test_continue_final_message_none_means_unset_as_every_keyword():
    """docs/SERVICES.md: None for any keyword means unset; continue_final_message=None was refused ("must be True
    or False") on a chat and on a tokenize of messages, while a prompt took it."""
    messages = [{"role": "user", "content": "hi"}]
    assert generate_request(messages=messages, continue_final_message=None).chat.continue_final_message is False
    assert _tokenize_request(None, messages, None, None, None, None, None).chat.continue_final_message is False
    with pytest.raises(ValueError, match="continue_final_message must be True, False or None"):
        generate_request(messages=messages, continue_final_message="yes")


@pytest.mark.parametrize("build, where", [
    (lambda: generate_request(messages=[{"role": "user", "content": "hi"}], tools=5), "tools must be a list"),
    (lambda: generate_request(messages=[{"role": "user", "content": "hi"}], tools=True), "tools must be a list"),
    (lambda: generate_request(messages=[{"role": "assistant", "content": "", "tool_calls": 5}]),
     "messages[0].tool_calls must be a list"),
    (lambda: generate_request("hi", request_id=[1]), "request_id must be a string"),
    (lambda: generate_request(messages=[{"role": "user", "content": "hi"}], template_kwargs=0),
     "template_kwargs must be a JSON object"),  # dropped unseen, as a falsy value
])
def test_arguments_of_a_wrong_type_are_named(build, where):
    """A number where a list of tools or calls goes raised "'int' object is not iterable", and a request id that
    is not a string protobuf's "bad argument type for built-in operation": neither named the argument."""
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value).startswith(where), err.value


def test_an_integer_request_id_is_taken_as_its_text_and_the_engine_clients_abort_names_a_wrong_one():
    from clients.engine_client import EngineClient

    assert generate_request("hi", request_id=5).request_id == "5"  # as TextClient.generate's request_id= takes it
    with EngineClient("127.0.0.1:1", timeout=1) as client, pytest.raises(ValueError, match="request_id must be a"):
        client.abort(5)


def test_numpy_numbers_are_taken_for_the_channel_settings():
    """docs/SERVICES.md: numpy numbers are taken where Python's are; max_message_bytes=np.int64(...) and
    keepalive_time_s=np.float32(...) were refused as not positive."""
    import numpy as np

    from clients.channel import channel_options

    options = dict(channel_options(max_message_bytes=np.int64(1 << 20), keepalive_time_s=np.float32(30)))
    assert options["grpc.max_send_message_length"] == 1 << 20 and type(options["grpc.max_send_message_length"]) is int
    assert options["grpc.keepalive_time_ms"] == 30_000 and type(options["grpc.keepalive_time_ms"]) is int
    with TextClient("127.0.0.1:1", max_message_bytes=np.int64(1 << 20), keepalive_time_s=np.float32(30)) as client:
        assert client is not None


@pytest.mark.parametrize("kwargs, words", [
    # An integer for a True/False field went out as True (3, -1) or False (numpy 0); the engine refuses 3.
    ({"ignore_eos": 3}, "ignore_eos=3: must be True or False"),
    ({"ignore_eos": 2**70}, "ignore_eos=1180591620717411303424: must be True or False"),
    # An integer past a float's range raised a bare OverflowError.
    ({"temperature": 10**400}, "temperature=1000"),
    # A finite number the protocol's float32 cannot hold went out as inf or 0, and the service answered for a value
    # the caller never wrote ("temperature must be finite and >= 0, got inf"; "top_p ... got 0").
    ({"temperature": 1e40}, r"temperature=1e\+40: too large for the protocol's 32-bit float"),
    ({"top_p": 1e-50}, "top_p=1e-50: too small for the protocol's 32-bit float"),
    ({"logit_bias": {3: -1e40}}, r"logit_bias=\{3: -1e\+40\}: too large for the protocol's 32-bit float"),
    ({"logit_bias": {3: 10**400}}, "logit_bias=.*: too large for a number the protocol carries"),
    # A dict of stop ids sent its keys alone, silently.
    ({"stop_token_ids": {7: 1.0, 9: -1.0}}, "stop_token_ids must be a list of integer token ids .* not a dict "
                                            r"\(logit_bias is the field"),
    ({"stop_token_ids": bytearray(b"ab")}, "stop_token_ids must be a list .* not a bytearray"),
])
def test_sampling_keywords_of_the_wrong_kind_are_refused_by_name(kwargs, words):
    from clients.requests import sampling_params

    with pytest.raises(ValueError, match=words):
        sampling_params(**kwargs)


def test_float32_extremes_and_what_the_service_judges_still_go_out():
    """The client's float32 check refuses only what the protocol would change: the largest and smallest float32s
    go out as written, and inf and nan are left for the service's own rule."""
    import math

    from clients.requests import sampling_params

    big, tiny = 3.4028234663852886e38, 1.401298464324817e-45
    params = sampling_params(temperature=big, top_p=tiny, logit_bias={3: -big})
    assert (params.temperature, params.top_p, params.logit_bias[3]) == (big, tiny, -big)
    assert math.isinf(sampling_params(temperature=math.inf).temperature)
    assert math.isnan(sampling_params(temperature=math.nan).temperature)


def test_a_zero_dimensional_array_of_text_is_refused_as_stop_by_name():
    """stop=np.array("x") raised numpy's bare "TypeError: iteration over a 0-d array"."""
    import numpy as np

    from clients.requests import generate_request

    with pytest.raises(ValueError, match="stop must be a string or a list of strings, got a ndarray that cannot be "
                                         "iterated"):
        generate_request(prompt="hi", stop=np.array("x"))
    assert list(generate_request(prompt="hi", stop=np.array(["a", "b"])).stop) == ["a", "b"]


def test_a_zero_dimensional_array_is_one_id_not_a_list_of_them():
    import numpy as np

    from clients.requests import put_token_ids
    from protos.llmserve.text.v1 import text_pb2 as pb

    with pytest.raises(ValueError, match="prompt_token_ids must be a list of integer token ids .* not a ndarray"):
        put_token_ids(pb.GenerateRequest().prompt_token_ids.ids, np.array(5), "prompt_token_ids")


@pytest.mark.parametrize("kwargs, words", [
    # Past a C int, grpc raised a bare OverflowError while the client was made.
    ({"max_message_bytes": 2**31}, "max_message_bytes must be a positive number of bytes, at most 2,147,483,647"),
    # None or a bare value: "'NoneType' object is not iterable".
    ({"extra_options": None}, "extra_options must be \\(name, value\\) pairs of gRPC channel arguments, got None"),
    ({"extra_options": 5}, "extra_options must be \\(name, value\\) pairs of gRPC channel arguments, got 5"),
])
def test_channel_settings_past_what_grpc_holds_are_refused_by_name(kwargs, words):
    from clients.channel import channel_options

    with pytest.raises(ValueError, match=words):
        channel_options(**kwargs)


def test_very_long_keepalives_and_timeouts_mean_no_limit_rather_than_overflowing():
    """keepalive_time_s=1e308 raised "cannot convert float infinity to integer", timeout=10**400 OverflowError."""
    from clients.channel import channel_options, client_timeout
    from clients.tls import UNLIMITED_MS

    assert dict(channel_options(keepalive_time_s=1e308))["grpc.keepalive_time_ms"] == UNLIMITED_MS
    assert client_timeout(10**400) is None
