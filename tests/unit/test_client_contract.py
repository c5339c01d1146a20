"""The client library's contract as a user of another service calls it (clients/text_client.py,
clients/engine_client.py, clients/requests.py): what a wrong argument, a closed client or a bad GenerateMulti
request stream raises. Found by an audit probing each public call newcomer-style; each test names the bug it
catches. An in-process fake text service stands in for the real one where a call must reach a server."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from clients.engine_client import EngineClient
from clients.requests import generate_request
from clients.text_client import AsyncTextClient, TextClient
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
NOWHERE = "127.0.0.1:1"  # nothing listens: a call that validates its arguments never dials


class _Fake(pb_grpc.TextGenerationServicer):
    """Generate: the prompt's characters, one a response ("slow" prompts: endless, 0.2 s apart, until cancelled);
    GenerateMulti: one response per generate request, then ends; GetModelInfo."""

    def Generate(self, request, context):
        if request.prompt == "slow":
            while context.is_active():
                time.sleep(0.2)
                yield pb.GenerateResponse(text="x")
            return
        for i, char in enumerate(request.prompt):
            yield pb.GenerateResponse(text=char, finish_reason=pb.FINISH_REASON_STOP
                                      if i == len(request.prompt) - 1 else pb.FINISH_REASON_UNSPECIFIED)

    def GenerateMulti(self, request_iterator, context):
        for frame in request_iterator:
            if frame.HasField("generate"):
                yield pb.GenerateResponse(request_id=frame.generate.request_id, text="y",
                                          finish_reason=pb.FINISH_REASON_STOP)

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name="fake")


@pytest.fixture(scope="module")
def target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TextGenerationServicer_to_server(_Fake(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


# ---------------------------------------------------------------------------------------------------------
# Keywords: a typo is never dropped, a wrong type is named


def test_a_misspelt_keyword_set_to_none_is_refused_not_dropped():
    """`None` means unset, so a misspelt keyword holding None (an option forwarded from a config or flag left
    empty, `max_new_tokens=args.max_new_tokens`) was skipped before its name was checked: the request went out
    without the setting, and only once the value was set did the typo raise."""
    with pytest.raises(TypeError, match="unknown sampling parameter 'max_new_tokens'"):
        generate_request("x", max_new_tokens=None)
    with TextClient(NOWHERE, timeout=1) as client, pytest.raises(TypeError, match="'max_new_tokens'"):
        client.chat([{"role": "user", "content": "hi"}], max_new_tokens=None)
    with EngineClient(NOWHERE, timeout=1) as engine, pytest.raises(TypeError, match="'max_new_tokens'"):
        engine.generate([1, 2], "r", max_new_tokens=None)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(stop=5), "stop must be"),
    (dict(stop=["a", 1]), r"stop\[1\]"),
    (dict(stop=("a", None)), r"stop\[1\]"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output must be True, False"),
    (dict(skip_special_tokens="no"), "skip_special_tokens must be True, False or None"),
    (dict(add_special_tokens="no"), "add_special_tokens must be True, False or None"),
    (dict(skip_special_tokens=0), "skip_special_tokens must be True, False or None"),  # ints are not flags
    (dict(add_special_tokens=1), "add_special_tokens must be True, False or None"),
    (dict(include_stop_str_in_output=2), "include_stop_str_in_output must be True, False"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"),
    (dict(logit_bias=5), "logit_bias=5"),
    (dict(response_format=["json_object"]), "response_format"),
    (dict(response_format="json_schema", json_schema=5), "json_schema must be"),
    (dict(response_format="json_schema", json_schema={"enum": {1, 2}}), "json_schema must be"),
    (dict(temperature=True), "temperature=True"),
])
def test_a_keyword_of_the_wrong_type_is_refused_naming_it(kwargs, needle):
    """protobuf's own words ("bad argument type for built-in operation", "'int' object is not iterable", "'str'
    object cannot be interpreted as an integer") named neither the keyword nor what it takes; temperature=True
    was sent as 1.0 and json_schema=5 as the schema "5"."""
    with pytest.raises(ValueError, match=needle):
        generate_request("x", **kwargs)


def test_a_prompt_or_text_that_is_not_a_string_is_refused_naming_it():
    with pytest.raises(ValueError, match="prompt must be a string"):
        generate_request(123)
    with TextClient(NOWHERE, timeout=1) as client:
        with pytest.raises(ValueError, match="text must be a string"):
            client.tokenize(123)
        with pytest.raises(ValueError, match="add_special_tokens must be True, False or None"):
            client.tokenize("x", add_special_tokens="yes")


@pytest.mark.parametrize("token_ids, skip, needle", [
    ("abc", None, "token_ids must be a list"),
    (None, None, "token_ids must be a list"),
    ([1, 1.5], None, r"token_ids\[1\]=1.5"),
    ([2**40], None, r"token_ids\[0\]"),
    ([1], "no", "skip_special_tokens must be True, False or None"),
])
def test_detokenize_names_what_it_cannot_send(token_ids, skip, needle):
    """detokenize() passed its arguments to protobuf unchecked: "Value out of range: 1099511627776", "'str' object
    cannot be interpreted as an integer", "'NoneType' object is not iterable"."""
    with TextClient(NOWHERE, timeout=1) as client, pytest.raises(ValueError, match=needle):
        client.detokenize(token_ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages, needle", [
    ({"role": "user", "content": "hi"}, "messages must be a list of messages"),
    ("hi", "messages must be a list of messages"),
    (["hi"], r"messages\[0\] must be a message"),
    ([None], r"messages\[0\] must be a message"),
])
def test_messages_that_are_not_a_list_of_dicts_say_so(messages, needle):
    """One message passed bare (not in a list) was iterated key by key: "messages[0] has unknown keys ['e', 'l',
    'o', 'r']" (the letters of 'role'), which sent the reader looking for a misspelt key."""
    with pytest.raises(ValueError, match=needle):
        generate_request(messages=messages)
    with TextClient(NOWHERE, timeout=1) as client, pytest.raises(ValueError, match=needle):
        client.tokenize(messages=messages)


def test_engine_client_names_the_sampling_parameter_of_the_wrong_type():
    """EngineClient.generate handed its keywords to protobuf at once: "must be real number, not str" and "Value out
    of range: ..." named no field, an unknown one was a ValueError where TextClient's is a TypeError."""
    with EngineClient(NOWHERE, timeout=1) as engine:
        with pytest.raises(ValueError, match="temperature='0.5'"):
            engine.generate([1], "r", temperature="0.5")
        with pytest.raises(ValueError, match=f"seed={2**71}"):
            engine.generate([1], "r", seed=2**71)
        with pytest.raises(TypeError, match="unknown sampling parameter 'max_token'"):
            engine.generate([1], "r", max_token=3)
        with pytest.raises(ValueError, match="request_id must be a string"):
            engine.generate([1], 5)


# ---------------------------------------------------------------------------------------------------------
# Constructors


@pytest.mark.parametrize("make", [TextClient, AsyncTextClient, EngineClient])
@pytest.mark.parametrize("target, tls, needle", [
    (None, None, "target must be the service's address"),
    (50052, None, "target must be the service's address"),
    ("", None, "target must be the service's address"),
    ("127.0.0.1:65537", None, r"names port 65537: ports are 1\.\.65535"),  # gRPC dialled port 1
    ("localhost:0", None, r"names port 0: ports are 1\.\.65535"),
    (NOWHERE, "ca.crt", r"tls must be a ClientTls.*got 'ca.crt'"),
    (NOWHERE, True, "tls must be a ClientTls"),
])
def test_a_target_or_tls_of_the_wrong_kind_is_refused_naming_it(make, target, tls, needle):
    """tls="ca.crt" (a path where ClientTls(ca_file=...) belongs) raised AttributeError "'str' object has no
    attribute 'stamp'", target=None "'NoneType' object has no attribute 'encode'", and target="" made a client
    whose every call failed UNKNOWN "the target uri is not valid"."""
    with pytest.raises(ValueError, match=needle):
        make(target, timeout=1, tls=tls)


# ---------------------------------------------------------------------------------------------------------
# A closed client


def test_a_call_on_a_closed_client_says_the_client_was_closed(target):
    """After close() a blocking client raised gRPC's "Cannot invoke RPC: Channel closed!" (naming no client) and an
    asyncio one grpc's internal cygrpc.UsageError "Channel is closed."; both now say which client was closed."""
    client = TextClient(target, timeout=5)
    assert client.model_info().model_name == "fake"
    client.close()
    client.close()  # twice is fine
    for call in (client.model_info, lambda: client.generate("hi"), lambda: client.tokenize("hi")):
        with pytest.raises(ValueError, match=f"closed channel: the client of {re.escape(target)} was closed"):
            call()
    engine = EngineClient(target, timeout=5)
    engine.close()
    with pytest.raises(ValueError, match=f"the client of {re.escape(target)} was closed"):
        engine.generate([1], "r")

    async def use() -> None:
        aclient = AsyncTextClient(target, timeout=5)
        assert (await aclient.model_info()).model_name == "fake"
        await aclient.close()
        await aclient.close()
        with pytest.raises(ValueError, match=f"the client of {re.escape(target)} was closed"):
            await aclient.model_info()
        with pytest.raises(ValueError, match=f"the client of {re.escape(target)} was closed"):
            aclient.generate("hi")

    asyncio.run(use())


def test_a_blocking_client_may_be_shared_by_threads(target):
    """docs/SERVICES.md says a blocking client may be shared by threads: streams from many threads at once each get
    their own text, none another's."""
    errors: list[BaseException] = []
    with TextClient(target, timeout=10) as client:
        def work(k: int) -> None:
            try:
                for j in range(10):
                    prompt = f"t{k}-{j}"
                    assert client.generate(prompt).text() == prompt
            except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a thread's streams did not end in 30 s"
    assert not errors, errors[:3]


def test_a_read_timed_out_by_asyncio_says_it_ended_the_call(target):
    """asyncio.wait_for around one read (a per-token timeout) cancels the whole call (grpc.aio's rule), and the next
    read said "the stream was cancelled by cancel(), or its client was closed" -- neither of which the caller did."""

    async def use() -> grpc.RpcError:
        async with AsyncTextClient(target, timeout=10) as client:
            stream = client.generate("slow")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.__anext__(), 0.05)
            with pytest.raises(grpc.RpcError) as info:
                await stream.__anext__()
            return info.value

    error = asyncio.run(use())
    assert error.code() == grpc.StatusCode.CANCELLED
    assert "an earlier read of the stream was cancelled" in error.details(), error.details()


# ---------------------------------------------------------------------------------------------------------
# GenerateMulti's request stream


@pytest.mark.parametrize("requests, needle", [
    ([pb.MultiRequest(generate=generate_request("a", request_id="a")), generate_request("b", request_id="b")],
     r"requests\[1\] is a GenerateRequest.*MultiRequest\(generate="),
    ([{"generate": {"prompt": "x"}}], r"requests\[0\] is a dict"),
])
def test_generate_multi_names_a_request_that_is_not_a_multi_request(target, requests, needle):
    """A GenerateRequest (or a dict) among GenerateMulti's requests failed in gRPC's sending thread: the reader saw
    only UNKNOWN "Exception iterating requests!", naming neither the request nor the type it needs."""
    with TextClient(target, timeout=5) as client, pytest.raises(ValueError, match=needle):
        client.generate_multi(requests).texts()


def test_generate_multi_refuses_one_bare_request_at_once(target):
    with TextClient(target, timeout=5) as client, pytest.raises(ValueError, match="an iterable of MultiRequest"):
        client.generate_multi(pb.MultiRequest(generate=generate_request("a")))


def test_generate_multi_passes_on_what_its_request_iterator_raised(target):
    """An exception in the caller's own request generator was lost in gRPC's sending thread (logged there): the
    reader saw UNKNOWN "Exception iterating requests!" instead of it."""

    class Mine(Exception):
        pass

    def frames():
        yield pb.MultiRequest(generate=generate_request("a", request_id="a"))
        raise Mine("the caller's own failure")

    with TextClient(target, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(Mine, match="the caller's own failure"):
            client.generate_multi(frames()).texts()
    assert time.monotonic() - started < 15  # raised at once, not when the call's 30 s deadline ended it


# ---------------------------------------------------------------------------------------------------------
# numpy numbers


def test_numpy_integers_are_taken_where_every_sampling_field_takes_them():
    """max_tokens=np.int64(5) and seed=np.uint64(3) were sent, but n=np.int64(2), deadline_ms=np.int64(500) and
    timeout=np.int64(5) were refused as "must be an int ... got np.int64(2)" (a value read from an array or a
    DataFrame)."""
    request = generate_request("x", n=np.int64(2), deadline_ms=np.int64(500), max_tokens=np.int64(5))
    assert (request.n, request.deadline_ms, request.sampling_params.max_tokens) == (2, 500, 5)
    with TextClient(NOWHERE, timeout=np.int64(5)) as client:
        assert client.timeout == 5.0 and type(client.timeout) is float
    with pytest.raises(ValueError, match="n must be an int from 1 to 16"):
        generate_request("x", n=np.float64(2.0))
