"""Client-library regressions (found by an audit), against the tokenizer service over a fake engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from clients.requests import generate_request
from clients.text_client import AsyncTextClient, TextClient
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.unit.test_text_service_regressions import TextServer, demo_engine, wait_ready

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def stack(demo_model_dir, demo_tokenizer):
    """(the tokenizer service's target, the fake engine's target)."""
    engine = demo_engine(demo_model_dir, demo_tokenizer)
    server = TextServer(demo_model_dir, engines=engine.target)
    with grpc.insecure_channel(server.target) as channel:
        from protos.llmserve.text.v1 import text_pb2_grpc

        wait_ready(text_pb2_grpc.TextGenerationStub(channel))
    yield server.target, engine.target
    server.stop()
    assert engine.stop() == 0


@pytest.fixture
def service(stack):
    return stack[0]


def engine_idle(engine_target: str, within_s: float = 5.0) -> bool:
    """Whether the engine holds no live request, polled for up to within_s."""
    from clients.engine_client import EngineClient

    with EngineClient(engine_target, timeout=5) as engine:
        deadline = time.monotonic() + within_s
        while engine.load().num_live_requests:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    return True


def test_one_stop_string_is_one_stop_string():
    assert list(generate_request("x", stop="END").stop) == ["END"]  # not ['E', 'N', 'D']
    assert list(generate_request("x", stop=["a", "b"]).stop) == ["a", "b"]


def test_deadline_ms_on_generate_is_the_calls_deadline(service):
    """The field is GenerateMulti's; on Generate it was silently dropped and the request ran to its end."""
    with TextClient(service, timeout=10) as client:
        started = time.monotonic()
        stream = client.generate("hi", max_tokens=100_000, ignore_eos=True, deadline_ms=300)
        with pytest.raises(grpc.RpcError) as info:
            stream.text()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5, "the client's own 10 s timeout ended it, not deadline_ms"


def test_async_stream_is_an_async_iterator_and_cancel_raises_rpc_error(service):
    async def main() -> tuple[str, object]:
        async with AsyncTextClient(service, timeout=30) as client:
            stream = client.generate("hi", max_tokens=100_000, ignore_eos=True)
            first = await anext(stream)  # was: TypeError, not an async iterator
            stream.cancel()
            try:
                await anext(stream)
                outcome: object = "no error"
            except grpc.RpcError as exc:  # was: asyncio.CancelledError, which looks like the caller's own
                outcome = exc.code()
            done = await client.generate("hi", max_tokens=3).text()  # the client still works
            return first.text + done, outcome

    text, outcome = asyncio.run(main())
    assert text and outcome == grpc.StatusCode.CANCELLED


def test_a_cancelled_caller_task_still_propagates(service):
    """Only cancel() turns into RpcError(CANCELLED); cancelling the task that reads must still cancel it."""
    async def main() -> bool:
        async with AsyncTextClient(service, timeout=30) as client:
            stream = client.generate("hi", max_tokens=100_000, ignore_eos=True)

            async def read_all() -> None:
                async for _ in stream:
                    pass

            reader = asyncio.create_task(read_all())
            await asyncio.sleep(0.2)
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                return True
            return False

    assert asyncio.run(main())


def test_cli_usage_names_the_finish_reason(service, capsys):
    from clients.cli import main

    assert main(["hi", "--target", service, "--max-tokens", "3", "--usage"]) == 0
    err = capsys.readouterr().err
    assert "[finish=LENGTH prompt_tokens=" in err and "completion_tokens=3" in err, err


def test_add_special_tokens_is_sent_only_when_given():
    """Unset leaves the service's default (true for a prompt, false for a chat); prompt_token_ids take none."""
    from clients.text_client import _tokenize_request

    assert not generate_request("x").HasField("add_special_tokens")
    assert generate_request("x", add_special_tokens=False).add_special_tokens is False
    chat = generate_request(messages=[{"role": "user", "content": "Hi"}], add_special_tokens=True)
    assert chat.HasField("add_special_tokens") and chat.add_special_tokens is True
    with pytest.raises(ValueError, match="prompt_token_ids are sent as they are"):
        generate_request(prompt_token_ids=[1, 2], add_special_tokens=True)
    assert not _tokenize_request("x", None, None, None).HasField("add_special_tokens")
    assert _tokenize_request("x", None, False, None).HasField("add_special_tokens")


def _server_with_template(demo_model_dir, tmp_path, template: str) -> TextServer:
    """A tokenizer service over a copy of the demo model whose chat template is `template`; no engine (Tokenize
    needs none)."""
    import shutil

    model = tmp_path / "templated-model"
    shutil.copytree(demo_model_dir, model)
    (model / "chat_template.jinja").write_text(template)
    return TextServer(model, engines="127.0.0.1:9")


def test_enable_thinking_travels_from_the_client_to_the_chat_template(demo_model_dir, tmp_path, service):
    """chat.enable_thinking: set through the client, rendered by a template with Qwen3's switch, refused by
    one without it (the demo model's), and refused for a plain prompt by the client library."""
    from tests.unit.test_chat import THINKING_TEMPLATE

    with pytest.raises(ValueError, match="chat messages only"):
        generate_request("a prompt", enable_thinking=False)
    assert generate_request(messages=[{"role": "user", "content": "Hi"}], enable_thinking=False).chat.enable_thinking \
        is False
    server = _server_with_template(demo_model_dir, tmp_path, THINKING_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}]
    try:
        with TextClient(server.target, timeout=30) as client:
            def tokenize(**chat: object) -> list[int]:
                request = pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in messages], **chat))
                return list(client._stub.Tokenize(request, timeout=10).token_ids)

            default, off = tokenize(), tokenize(enable_thinking=False)
            assert client.detokenize(off, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
            assert off[: len(default)] == default and len(off) > len(default)
    finally:
        server.stop()
    with TextClient(service, timeout=30) as demo:  # the demo model's template has no switch
        with pytest.raises(grpc.RpcError) as info:
            demo.chat(messages, enable_thinking=False, max_tokens=2).text()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no thinking switch" in info.value.details()


def test_cli_pointed_at_an_engine_says_so(capsys):
    """The engine serves another API: the client got only 'UNIMPLEMENTED: Method not found!'."""
    from clients.cli import main
    from tests.fake_engine import FakeEngine
    from tests.unit.test_engine_service_fake import Running

    engine = Running(FakeEngine())
    try:
        assert main(["--target", engine.target, "--timeout", "10", "Hi"]) == 1
    finally:
        engine.stop()
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err and "is it an engine service?" in err and "tokenizer service" in err, err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--concurrency", "0"], "--concurrency must be at least 1"),  # hung forever on Semaphore(0)
    (["--num-requests", "0"], "--num-requests must be at least 1"),  # a table of nan, exit 0
    (["--rate", "-1"], "--rate must be positive"),
    (["--pairs", "0"], "--pairs must be at least 1"),  # statistics.StatisticsError
    (["--json", "/nonexistent-dir/report.json"], "--json /nonexistent-dir/report.json: cannot write"),  # after the runs
])
def test_serving_bench_refuses_settings_that_cannot_run(flags, needle, capsys):
    from clients.serving_bench import main

    with pytest.raises(SystemExit) as exited:
        main(["--target", "127.0.0.1:1", *flags])
    assert exited.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--chat", "--thinking-open"], "--thinking-open applies to --tools"),  # ignored without a word
    (["--chat", "--tool-format", "hermes"], "--tool-format hermes applies to --tools"),  # ignored without a word
    (["--chat", "--reply-prefix", ""], "--reply-prefix must not be empty"),  # the service named no flag
    (["--timeout", "0"], "--timeout must be a positive"),  # was a bare DEADLINE_EXCEEDED
    (["--target", "127.0.0.1"], "--target must be HOST:PORT"),  # dialled port 443, with a TLS hint
    (["--target", "127.0.0.1:65537"], "--target must be HOST:PORT with a port in 1..65535"),  # dialled port 1
])
def test_cli_refuses_flags_that_cannot_work(flags, needle, capsys):
    from clients.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*flags, "Hi"])
    assert exited.value.code == 2 and needle in capsys.readouterr().err


def test_cli_output_the_terminal_cannot_encode_is_replaced_not_a_crash(service, tmp_path):
    """With a cp1252 stdout (Windows, output redirected) a character it lacks ended the reply in a
    UnicodeEncodeError traceback, exit 1, the rest lost."""
    import os
    import subprocess
    import sys

    from clients.cli import main as _  # noqa: F401 -- the module the subprocess runs

    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    run = subprocess.run([sys.executable, "-m", "clients.cli", "hi", "--target", service, "--max-tokens", "60",
                          "--temperature", "0"], capture_output=True, env=env, timeout=60)
    assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    assert b"?" in run.stdout  # the fake engine's ids past ASCII: characters cp1252 lacks, each shown as "?"
    # Called in-process (a library user, a test), main() leaves the process's streams as it found them.
    import io

    from clients.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", out)
        assert main(["hi", "--target", service, "--max-tokens", "20", "--temperature", "0"]) == 0
    assert out.errors == "strict"


def test_extra_channel_options_reach_the_channel_and_a_retry_policy_works(service):
    """Clients took only max_message_bytes and keepalive_time_s, so the gRPC retry policy SERVICES.md mentions
    (a service config) could not be set."""
    import json

    from clients.channel import channel_options

    retry = json.dumps({"methodConfig": [{"name": [{"service": "llmserve.text.v1.TextGeneration"}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}]})
    options = channel_options(extra_options=[("grpc.service_config", retry), ("grpc.enable_retries", 1)])
    assert options[-2:] == [("grpc.service_config", retry), ("grpc.enable_retries", 1)]
    replaced = channel_options(extra_options=[("grpc.keepalive_timeout_ms", 2000)])  # one the client sets: replaced
    assert [v for n, v in replaced if n == "grpc.keepalive_timeout_ms"] == [2000]
    with pytest.raises(ValueError, match=r"name \['grpc.enable_retries'\] more than once"):
        channel_options(extra_options=[("grpc.enable_retries", 1), ("grpc.enable_retries", 0)])
    with pytest.raises(ValueError, match=r"\(name, value\) pairs"):
        channel_options(extra_options=["grpc.enable_retries"])
    with pytest.raises(TypeError, match=r"unknown client setting\(s\) \['extra_option'\].*'extra_options'"):
        TextClient(service, extra_option=[])  # a misspelt one named the internal channel_options()
    with TextClient(service, timeout=30, extra_options=[("grpc.service_config", retry)]) as client:
        assert "".join(c.text for c in client.generate("hi", max_tokens=3))


def test_a_chat_continuing_the_assistants_message_through_the_service(service, demo_tokenizer):
    """continue_final_message through the tokenizer service: Tokenize gives the open turn's ids as the chat template
    renders them, Generate continues it (the client's options check passes: the service lists the option), and a
    chat ending with a user's message is INVALID_ARGUMENT."""
    messages = [{"role": "user", "content": "Give me JSON."}, {"role": "assistant", "content": 'Sure: {"a": '}]
    want = demo_tokenizer.encode(demo_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True), add_special_tokens=False)
    from tokenizer_service import servicer
    from tokenizer_service.text_stream import TextStream

    tails = []

    class Recording(TextStream):  # what each reply's detokenizer is told it continues
        def __init__(self, *args, **kwargs):
            tails.append(tuple(args[5]) if len(args) > 5 else tuple(kwargs.get("prompt_tail", ())))
            super().__init__(*args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(servicer, "TextStream", Recording)  # the service runs in this process
    try:
        with TextClient(service, timeout=30) as client:
            assert client.tokenize(messages=messages, continue_final_message=True) == want
            assert "continue_final_message" in client.model_info().features
            stream = client.chat(messages, continue_final_message=True, max_tokens=4, ignore_eos=True)
            assert sum(1 for _ in stream) and stream.usage.prompt_tokens == len(want)
            list(client.chat(messages[:1], max_tokens=2))
    finally:
        patch.undo()
    assert tails == [tuple(want[-8:]), ()]  # the continued reply's, then a new reply's
    with TextClient(service, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as refused:
            list(client.chat(messages[:1], continue_final_message=True, max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ends with a 'user' message" in refused.value.details()


def test_a_timeout_keyword_on_a_call_names_deadline_ms():
    with pytest.raises(TypeError, match="unknown sampling parameter 'timeout'; a call's deadline is deadline_ms"):
        generate_request("hi", timeout=5)


def test_a_non_ascii_request_id_travels_in_the_request_field(service):
    """gRPC metadata takes printable ASCII only: generate(request_id="café-1") failed in the client with
    'Invalid metadata' before reaching the service. It now goes in the request's own field, which the service
    percent-encodes; generate_multi, whose id is the call's metadata only, refuses it with a clear message."""
    with TextClient(service, timeout=30) as client:
        stream = client.generate("hi", max_tokens=2, request_id="café-1")
        chunks = list(stream)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert dict(stream._call.trailing_metadata())["x-request-id"] == "caf%C3%A9-1"
        with pytest.raises(ValueError, match="printable ASCII"):
            client.generate_multi(iter(()), request_id="café-1")


def test_breaking_out_of_an_async_stream_frees_the_engine_request(stack):
    """grpc.aio keeps a running call alive: `break` out of `async for` (or an exception in its body) left the
    request generating to max_tokens while the client stayed open. Dropping the stream now cancels it, as
    leaving `async with stream:` does."""
    target, engine_target = stack

    async def main() -> tuple[bool, bool]:
        async with AsyncTextClient(target, timeout=60) as client:
            async for _ in client.generate("hi", max_tokens=100_000, ignore_eos=True):
                break
            freed_by_break = await asyncio.to_thread(engine_idle, engine_target)
            stream = client.generate("hi", max_tokens=100_000, ignore_eos=True)
            async with stream:
                await anext(stream)
            freed_by_with = await asyncio.to_thread(engine_idle, engine_target)
            return freed_by_break, freed_by_with

    assert asyncio.run(main()) == (True, True)


def test_closing_the_async_client_mid_stream_raises_rpc_error_not_cancelled_error(service):
    """A reader whose client was closed under it got asyncio.CancelledError although nobody cancelled its task;
    gather() and TaskGroup take that for the caller's own cancellation. It is RpcError(CANCELLED) now."""
    async def main() -> tuple[object, bool]:
        client = AsyncTextClient(service, timeout=60)
        stream = client.generate("hi", max_tokens=100_000, ignore_eos=True)

        async def read_all() -> object:
            try:
                async for _ in stream:
                    pass
            except grpc.RpcError as exc:
                return exc.code()
            return "no error"

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0.3)
        await client.close()
        outcome = await reader
        return outcome, reader.cancelled()

    assert asyncio.run(main()) == (grpc.StatusCode.CANCELLED, False)


@pytest.mark.parametrize("timeout", [float("inf"), 1e12])
def test_a_timeout_too_long_for_grpc_means_no_deadline(service, timeout):
    """gRPC turns a deadline decades away into DEADLINE_EXCEEDED at once; inf and deadline_ms=2**64-1 failed."""
    with TextClient(service, timeout=timeout) as client:
        assert client.generate("hi", max_tokens=2).text()
        stream = client.generate("hi", max_tokens=2, deadline_ms=2**64 - 1)
        stream.text()
        assert stream.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "5"])
def test_a_timeout_that_cannot_work_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        TextClient("127.0.0.1:1", timeout=timeout)


def test_streams_tell_the_finish_reason_usage_and_request_id(service):
    """text() said nothing of why a reply ended; the generated request id was reachable only via _call."""
    with TextClient(service, timeout=30) as client:
        stream = client.generate("hi", max_tokens=3)
        assert stream.finish_reason is None and stream.usage is None
        text = stream.text()
        assert text and stream.finish_reason == pb.FINISH_REASON_LENGTH and stream.usage.completion_tokens == 3
        assert stream.stop_reason == "" and len(stream.request_id()) >= 16
        assert client.generate("hi", max_tokens=2, request_id=42).request_id() == "42"  # an int id is its str()
        # The id comes in the call's headers: an unread stream gives it at once (it waited for the deadline).
        unread = client.generate("hi", max_tokens=2)
        started = time.monotonic()
        assert len(unread.request_id()) >= 16 and time.monotonic() - started < 10
        assert unread.text()  # and the stream reads as before

    async def main() -> tuple[object, int, str]:
        async with AsyncTextClient(service, timeout=30) as client:
            stream = client.generate("hi", max_tokens=2, request_id="job-7")
            started = time.monotonic()
            got = await stream.request_id()  # before the stream is read
            assert time.monotonic() - started < 10
            await stream.text()
            return stream.finish_reason, stream.usage.completion_tokens, got

    assert asyncio.run(main()) == (pb.FINISH_REASON_LENGTH, 2, "job-7")


def test_generate_multi_texts_raise_on_a_failed_request(service):
    """text() on a GenerateMulti stream joined every request's text and hid the failed ones."""
    good = pb.MultiRequest(generate=generate_request("hi", request_id="a", max_tokens=2))
    bad = pb.MultiRequest(generate=generate_request("hi", request_id="b", temperature=-1.0))
    with TextClient(service, timeout=30) as client:
        assert set(client.generate_multi([good]).texts()) == {"a"}
        with pytest.raises(ValueError, match="request 'b' failed: .*temperature"):
            client.generate_multi([good, bad]).texts()
        assert not hasattr(client.generate_multi([good]), "text")


def test_none_means_unset_for_every_keyword(service):
    request = generate_request("x", stop=None, seed=None)
    assert list(request.stop) == [] and not request.sampling_params.HasField("seed")


def test_tokenize_takes_chat_messages(service, demo_tokenizer):
    messages = [{"role": "user", "content": "hello there"}]
    want = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with TextClient(service, timeout=30) as client:
        assert client.tokenize(messages=messages) == client.tokenize(want)
        with pytest.raises(ValueError, match="exactly one of text and messages"):
            client.tokenize("a", messages=messages)


def test_cli_refuses_a_value_the_protocol_cannot_carry(service, capsys):
    from clients.cli import main

    assert main(["hi", "--target", service, "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err
    assert "seed=18446744073709551616" in err and "Traceback" not in err


def test_cli_piped_into_head_stops_quietly(service):
    """`llm-client ... | head -c 1` ended in a BrokenPipeError traceback and exit 1."""
    import subprocess
    import sys

    cli = subprocess.Popen([sys.executable, "-m", "clients.cli", "hi", "--target", service, "--max-tokens", "5000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout.read(1)
    cli.stdout.close()
    err = cli.stderr.read().decode()
    assert cli.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_a_burst_of_2000_streams_loses_no_call(service):
    """grpc-core queues at most 1,000 calls grpc.aio has not taken yet by default, and drops new calls at random
    past that: 5-10% of a 2,000-stream burst ended in a bare CANCELLED that no handler or limit of ours saw."""
    from collections import Counter

    async def main() -> Counter:
        outcomes: Counter = Counter()
        async with AsyncTextClient(service, timeout=120) as client:
            async def one() -> None:
                try:
                    await client.generate_tokens([5, 6, 7], max_tokens=2).text()
                    outcomes["ok"] += 1
                except grpc.RpcError as exc:
                    outcomes[f"{exc.code().name}: {exc.details()}"] += 1

            await asyncio.gather(*(one() for _ in range(2000)))
        return outcomes

    outcomes = asyncio.run(main())
    # Every call answered in words: done, or refused by a limit of the services (the fake engine runs 4 at once,
    # so its queue bound may refuse a few) -- never a bare CANCELLED or INTERNAL.
    refused = {k: v for k, v in outcomes.items() if k != "ok"}
    assert all(k.startswith("RESOURCE_EXHAUSTED") and "queue is full" in k for k in refused), outcomes
    assert outcomes["ok"] >= 1500, outcomes


def test_serving_bench_says_why_requests_failed():
    """It counted failed requests but kept no cause: a run printed 'failed 208' and nothing else."""
    from clients.serving_bench import NO_LIMIT, Timing, format_table, summarize

    timings = [Timing(start=0.0, chunks=[(0.1, 1), (0.2, 1)]), Timing(start=0.0, error="CANCELLED: CANCELLED"),
               Timing(start=0.0, error="CANCELLED: CANCELLED"), Timing(start=0.0)]
    row = summarize(timings, 1.0)
    assert row["failed"] == 3 and row["errors"] == {"CANCELLED: CANCELLED": 2, "no response": 1}
    table = format_table([{"mode": "grpc", "rate": 1.0, "concurrency": 4, **row}])
    assert "2 failed with CANCELLED: CANCELLED" in table
    # Without --concurrency the limit is none, not the 1000000 that stands for it.
    unlimited = format_table([{"mode": "grpc", "rate": 1.0, "concurrency": NO_LIMIT, **row}])
    assert unlimited.splitlines()[2].split(" | ")[2] == "none" and "1000000" not in unlimited
    assert "concurrency none: 2 failed with CANCELLED" in unlimited


@pytest.mark.parametrize("deadline_ms", [0, -1, float("nan"), 1.5])
def test_a_deadline_that_cannot_work_is_refused_like_a_timeout(deadline_ms):
    """deadline_ms=0 silently meant no deadline; -1 and NaN failed in protobuf's words, not the client's."""
    with pytest.raises(ValueError, match="deadline_ms must be a positive number of milliseconds"):
        generate_request("x", deadline_ms=deadline_ms)


def test_a_token_biased_twice_is_refused_on_the_client():
    """Pairs naming one id twice kept the last silently (a map takes the last write), where the engine's own
    SamplingParams refuses them; so did llm-client --logit-bias 5=1 --logit-bias 5=-100."""
    from clients.cli import main

    with pytest.raises(ValueError, match="a token id given twice"):
        generate_request("hi", logit_bias=[(7, 100.0), (7, -100.0)])
    assert dict(generate_request("hi", logit_bias=[(7, 100.0), (8, -1.0)]).sampling_params.logit_bias) == \
        {7: 100.0, 8: -1.0}
    with pytest.raises(SystemExit) as exit_:
        main(["hi", "--logit-bias", "5=1", "--logit-bias", "5=-100"])
    assert exit_.value.code == 2


def test_biases_of_zero_need_no_engine_feature():
    from tokenizer_service.engine_pool import required_features

    assert required_features(pb.SamplingParams(logit_bias={5: 0.0})) == set()
    assert required_features(pb.SamplingParams(logit_bias={5: 0.0, 6: -1.0})) == {"logit_bias"}


def test_response_format_shapes():
    import json as _json

    from clients.requests import sampling_params
    from protos.llmserve.text.v1 import text_pb2

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shapes = [dict(response_format="json_schema", json_schema=schema),
              dict(response_format={"type": "json_schema"}, json_schema=_json.dumps(schema)),
              dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})]
    for kwargs in shapes:
        params = sampling_params(**kwargs)
        assert params.response_format == text_pb2.RESPONSE_FORMAT_JSON_SCHEMA
        assert _json.loads(params.json_schema) == schema
    assert sampling_params(response_format={"type": "json_object"}).response_format == \
        text_pb2.RESPONSE_FORMAT_JSON_OBJECT
    with pytest.raises(ValueError, match="must be one of"):
        sampling_params(response_format="yaml")
    with pytest.raises(ValueError, match="'json_schema' must be"):
        sampling_params(response_format={"type": "json_schema", "json_schema": "not a mapping"})


def test_texts_keep_what_a_refusing_text_read():
    """text() on a request with n > 1 completions refuses after reading the stream, and MultiStream.texts() after
    reading the call: texts() and completions() then return everything, not what was left (nothing)."""
    from clients.text_client import CompletionStream, MultiStream

    class Call:
        def __init__(self, responses):
            self._it = iter(responses)

        def __next__(self):
            return next(self._it)

        def cancel(self):
            pass

        def done(self):
            return True

    chunks = [pb.GenerateResponse(text="A", index=0), pb.GenerateResponse(text="B", index=1),
              pb.GenerateResponse(text="b", index=1, finish_reason=pb.FINISH_REASON_STOP),
              pb.GenerateResponse(text="a", index=0, finish_reason=pb.FINISH_REASON_LENGTH)]
    stream = CompletionStream(Call(chunks))
    with pytest.raises(ValueError, match="2 completions"):
        stream.text()
    assert stream.texts() == ["Aa", "Bb"]
    assert {i: end.finish_reason for i, end in stream.ends.items()} == {0: pb.FINISH_REASON_LENGTH,
                                                                         1: pb.FINISH_REASON_STOP}
    for chunk in chunks:
        chunk.request_id = "r"
    multi = MultiStream(Call(chunks))
    with pytest.raises(ValueError, match="completions()"):
        multi.texts()
    assert multi.completions() == {("r", 0): "Aa", ("r", 1): "Bb"}
    assert CompletionStream(Call([pb.GenerateResponse(text="x"), pb.GenerateResponse(text="y")])).text() == "xy"


def test_cli_reads_mistral_tool_calls_with_special_tokens_kept(monkeypatch, tmp_path, capsys):
    """--keep-special-tokens asks for skip_special_tokens false (Mistral's [TOOL_CALLS] is a special token) and
    --tool-format picks the parser; the calls go to stderr as JSON."""
    import json

    sent = {}
    reply = 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    cli = _fake_client(monkeypatch, _Stream([pb.GenerateResponse(text=reply[:10]), pb.GenerateResponse(
        text=reply[10:], finish_reason=pb.FINISH_REASON_STOP)]), sent)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather"}}]))
    argv = ["Weather?", "--chat", "--tools", str(tools), "--target", "localhost:1"]
    assert cli.main(argv + ["--tool-format", "mistral"]) == 0  # which keeps the special tokens
    out, err = capsys.readouterr()
    assert sent["skip_special_tokens"] is False and out.strip() == reply
    [line] = [line for line in err.splitlines() if line.startswith("[tool call]")]
    call = json.loads(line.removeprefix("[tool call] "))
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"} and len(call["id"]) == 9
    assert cli.main(argv + ["--tool-format", "hermes"]) == 0  # the wrong format finds no calls
    assert sent["skip_special_tokens"] is None and "[tool call]" not in capsys.readouterr().err


def test_cli_exits_1_on_a_tool_call_it_cannot_read(monkeypatch, tmp_path, capsys):
    """A malformed call was printed as "[tool call] <error>" and llm-client exited 0, so a script reading the calls
    took it for a reply with none; the reply and usage are still printed."""
    import json

    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    cli = _fake_client(monkeypatch, _Stream([pb.GenerateResponse(text=reply, finish_reason=pb.FINISH_REASON_STOP)]),
                       {})
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather"}}]))
    assert cli.main(["Weather?", "--chat", "--tools", str(tools), "--usage", "--target", "localhost:1"]) == 1
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if line.startswith("[tool call]")]
    assert out.strip() == reply and "finish=STOP" in err and not line.startswith("[tool call] {"), err


class _Stream:
    """A finished stream of two completions, as TextClient's (iterable, with ends by index)."""

    def __init__(self, responses):
        self.responses, self.ends = responses, {r.index: r for r in responses if r.finish_reason}

    def __iter__(self):
        return iter(self.responses)

    def cancel(self):
        pass


def _fake_client(monkeypatch, stream, sent):
    import clients.cli as cli

    class Client:
        def __init__(self, target, timeout=None, tls=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate(self, prompt, **kwargs):
            sent.update(kwargs)
            return stream

        chat = generate

    monkeypatch.setattr(cli, "TextClient", Client)
    return cli


def test_cli_n_completions_piped_into_head_stop_quietly(monkeypatch, tmp_path):
    """With --n the completions are printed once all have ended, outside the streaming loop's BrokenPipeError
    handling: `llm-client --n 16 ... | head -1` ended in a traceback and exit 1."""
    import sys

    ends = [pb.GenerateResponse(index=i, text="text", finish_reason=pb.FINISH_REASON_LENGTH) for i in range(2)]
    cli = _fake_client(monkeypatch, _Stream(ends), {})
    sink = open(tmp_path / "out", "w")  # noqa: SIM115 - its descriptor stands in for the closed pipe's

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert cli.main(["hi", "--n", "2", "--usage", "--target", "localhost:1"]) == 141
    finally:
        sink.close()


def test_cli_system_without_chat_is_refused_not_dropped(monkeypatch, capsys):
    """--system without --chat was silently left out of a plain prompt."""
    sent = {}
    cli = _fake_client(monkeypatch, _Stream([]), sent)
    for flag in ("--system", "--reply-prefix"):
        assert cli.main(["hi", flag, "Be brief.", "--target", "localhost:1"]) == 2
        assert "--system, --reply-prefix, --thinking, --tools and --template-kwargs apply to --chat only" in \
            capsys.readouterr().err and not sent


def test_cli_reads_a_tool_call_its_reply_prefix_began(capsys):
    """--tools with --reply-prefix: the model finished a call the prefix began, and the CLI, reading the
    continuation alone, reported none."""
    import types

    from clients import cli

    args = types.SimpleNamespace(reply_prefix='<tool_call>\n{"name": "get_weather", ', tool_format="auto",
                                 prompt_logprobs=None, usage=False, thinking_open=False)
    cli._print_results(args, False, None, {0: ['"arguments": {"city": "Paris"}}\n</tool_call>']}, [{}], [], [], None)
    assert '[tool call] {"name": "get_weather", "arguments": {"city": "Paris"}}' in capsys.readouterr().err
    # --thinking-open: a reply cut inside thinking the template opened in the prompt holds no calls.
    args.thinking_open = True
    cli._print_results(args, False, None, {0: ['"arguments": {}}\n</tool_call> then more thinking']}, [{}], [], [],
                       None)
    assert "[tool call]" not in capsys.readouterr().err


def test_cli_reply_prefix_is_an_assistant_message_the_model_continues(service, demo_tokenizer, capsys):
    from clients import cli

    assert cli.main(["Give me JSON.", "--chat", "--reply-prefix", '{"a": ', "--target", service, "--max-tokens",
                     "3", "--usage"]) == 0
    messages = [{"role": "user", "content": "Give me JSON."}, {"role": "assistant", "content": '{"a": '}]
    want = demo_tokenizer.encode(demo_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True), add_special_tokens=False)
    assert f"prompt_tokens={len(want)}" in capsys.readouterr().err


def test_a_long_request_id_travels_in_the_request_not_the_metadata(service):
    """An ASCII id went into x-request-id metadata whatever its length: past gRPC's 8-16 KiB metadata limit the
    call failed with RESOURCE_EXHAUSTED. It now goes in the request's field; the service keeps its head."""
    from clients.text_client import request_metadata

    with TextClient(service, timeout=30) as client:
        stream = client.generate("hi", max_tokens=2, request_id="a" * 20000)
        assert stream.text() is not None
        assert stream.request_id() and set(stream.request_id()) == {"a"}
    assert request_metadata("b" * 20000) == (("x-request-id", "b" * 1024),)


def test_template_kwargs_travel_from_the_client_to_the_chat_template(demo_model_dir, tmp_path, service):
    """chat.template_kwargs: through TextClient.tokenize and chat, rendered by a template that reads them, refused
    (INVALID_ARGUMENT, naming the variable) by one that does not."""
    from tests.unit.test_chat import DATED_TEMPLATE

    server = _server_with_template(demo_model_dir, tmp_path, DATED_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}]
    try:
        with TextClient(server.target, timeout=30) as client:
            dated = client.tokenize(messages=messages, template_kwargs={"date_string": "1 Jan 2030"})
            assert "Today is 1 Jan 2030." in client.detokenize(dated, skip_special_tokens=False)
            assert client.tokenize(messages=messages, template_kwargs='{"date_string": "1 Jan 2030"}') == dated
    finally:
        server.stop()
    with TextClient(service, timeout=30) as demo:  # the demo model's template reads no date
        with pytest.raises(grpc.RpcError) as info:
            demo.chat(messages, template_kwargs={"date_string": "x"}, max_tokens=2).text()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "template_kwargs sets 'date_string', but the model's chat template never reads it" in info.value.details()


def test_every_option_the_clients_check_is_one_the_service_lists():
    """The names clients.requests.options_used gives are the ones the service's options header and
    ModelInfo.features use: a name out of step would refuse every request using it."""
    from clients.requests import OPTIONS_HEADER, options_used
    from tokenizer_service.servicer import OPTIONS

    request = generate_request(messages=[{"role": "user", "content": "hi"}], n=2, enable_thinking=False,
                               tools=[{"type": "function", "function": {"name": "f"}}],
                               template_kwargs={"date_string": "today"}, logprobs=1, prompt_logprobs=0,
                               repetition_penalty=1.1, logit_bias={5: 1.0}, response_format="json_object")
    used = options_used(request)
    assert used == {"n", "enable_thinking", "tools", "template_kwargs", "logprobs", "prompt_logprobs", "penalties",
                    "logit_bias", "json_object"}
    [(name, listed)] = OPTIONS
    assert name == OPTIONS_HEADER and used | {"json_schema"} <= set(listed.split(","))
    assert options_used(generate_request("hi", max_tokens=3, temperature=0.5, stop=["x"], seed=1)) == set()
    # Listed, not checked: the first release with the header honoured it without listing it.
    assert options_used(generate_request("hi", add_special_tokens=False)) == set()
    assert "add_special_tokens" in listed.split(",")


def _dated_model(demo_model_dir, tmp_path):
    """The demo model with a chat template that reads a template variable (date_string)."""
    import shutil

    model = tmp_path / "dated"
    shutil.copytree(demo_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{{- date_string | default('') }}" + template)
    return model


def test_a_service_that_predates_an_option_is_refused_by_the_clients_not_silently_obeyed(demo_model_dir,
                                                                                        demo_tokenizer, monkeypatch,
                                                                                        tmp_path, capsys):
    """A rolling upgrade: an older tokenizer service drops options it predates without a word (n=2 gave one
    completion; template_kwargs a different prompt). It is stood in for by this one with a list lacking n and
    template_kwargs: the clients (llm-client too) raise OptionsNotHonoured naming the option, cancel the call, and
    serve requests that use none of them. A service that sends no list predates the header, not the options
    (services before it honoured n): it is trusted."""
    from clients.cli import main as llm_client
    from clients.requests import OptionsNotHonoured
    from tokenizer_service import servicer as servicer_module

    engine = demo_engine(demo_model_dir, demo_tokenizer)
    messages = [{"role": "user", "content": "hi"}]
    try:
        monkeypatch.setattr(servicer_module, "OPTIONS", ())
        server = TextServer(demo_model_dir, engines=engine.target)
        try:
            with TextClient(server.target, timeout=20) as client:
                assert len(client.generate("hi", max_tokens=2, n=2).texts()) == 2
        finally:
            server.stop()
        for options, missing in (((("x-llmserve-options", "logprobs,tools"),), "honours only"),):
            monkeypatch.setattr(servicer_module, "OPTIONS", options)
            server = TextServer(_dated_model(demo_model_dir, tmp_path / missing.replace(" ", "_")),
                                engines=engine.target)
            try:
                with TextClient(server.target, timeout=20) as client:
                    assert client.generate("hi", max_tokens=2).text() is not None  # no option used: served
                    with pytest.raises(OptionsNotHonoured, match=f"{missing}.*predates n and would ignore it"):
                        client.generate("hi", max_tokens=2, n=2).texts()
                    with pytest.raises(OptionsNotHonoured, match="predates template_kwargs"):
                        client.tokenize(messages=messages, template_kwargs={"date_string": "today"})
                    frames = [pb.MultiRequest(generate=generate_request("hi", request_id="a", max_tokens=2)),
                              pb.MultiRequest(generate=generate_request("hi", request_id="b", max_tokens=2, n=2))]
                    with pytest.raises(OptionsNotHonoured, match="predates n"):
                        client.generate_multi(frames).completions()

                async def main(target: str) -> None:
                    async with AsyncTextClient(target, timeout=20) as client:
                        with pytest.raises(OptionsNotHonoured, match="predates n"):
                            await client.generate("hi", max_tokens=2, n=2).texts()
                        with pytest.raises(OptionsNotHonoured, match="predates template_kwargs"):
                            await client.tokenize(messages=messages, template_kwargs={"date_string": "today"})
                        assert await client.generate("hi", max_tokens=2).text() is not None

                asyncio.run(main(server.target))
                capsys.readouterr()
                assert llm_client(["hi", "--target", server.target, "--n", "2", "--max-tokens", "2"]) == 1
                assert "llm-client: the tokenizer service at" in capsys.readouterr().err
            finally:
                server.stop()
        assert engine_idle(engine.target)  # the refused calls were cancelled
    finally:
        assert engine.stop() == 0


def test_the_current_service_honours_every_option_the_clients_check(demo_model_dir, demo_tokenizer, tmp_path):
    """The same calls against this version of the service go through; its ModelInfo lists its own options."""
    engine = demo_engine(demo_model_dir, demo_tokenizer)
    server = TextServer(_dated_model(demo_model_dir, tmp_path), engines=engine.target)
    messages = [{"role": "user", "content": "hi"}]
    try:
        with TextClient(server.target, timeout=20) as client:
            assert len(client.generate("hi", max_tokens=2, n=2).texts()) == 2
            dated = client.tokenize(messages=messages, template_kwargs={"date_string": "26 Jul 2024"})
            assert len(dated) > len(client.tokenize(messages=messages))
            frames = [pb.MultiRequest(generate=generate_request("hi", request_id="b", max_tokens=2, n=2))]
            assert len(client.generate_multi(frames).completions()) == 2
            assert {"n", "tools", "template_kwargs", "enable_thinking"} <= set(client.model_info().features)
    finally:
        server.stop()
        assert engine.stop() == 0


@pytest.mark.parametrize("scheme", ["unix-abstract", "unix"])
def test_cli_dials_grpc_targets_that_are_not_host_port(scheme, tmp_path, capsys):
    """docs/SERVICES.md: a target is HOST:PORT or any gRPC target URI; `unix-abstract:name` and `unix:relative.sock`
    were refused as "must be HOST:PORT" (exit 2). Dialled, a server without the text API answers UNIMPLEMENTED."""
    import os
    import uuid
    from concurrent import futures

    import grpc

    from clients.cli import main

    name = f"llm-cli-{uuid.uuid4().hex[:8]}" if scheme == "unix-abstract" else "cli.sock"
    server = grpc.server(futures.ThreadPoolExecutor(1))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a relative socket path
    try:
        assert server.add_insecure_port(f"{scheme}:{name}")
        server.start()
        code = main(["--target", f"{scheme}:{name}", "--timeout", "5", "Hi"])
    finally:
        os.chdir(cwd)
        server.stop(0)
    assert code == 1 and "UNIMPLEMENTED" in capsys.readouterr().err
