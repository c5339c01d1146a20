"""Python clients of the text API (the tokenizer service): synchronous and asyncio.

    with TextClient("localhost:50052") as client:
        for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="")

Streaming calls return an iterator of GenerateResponse messages (`text`, `token_ids`, and on the last one
`finish_reason` and `usage`; with `n=` completions, each message's `index` says whose, and each completion
ends with its own last message: `ends` holds them by index, `finish_reason`/`usage` the last one's) with
`cancel()`, which aborts the request in the engine at once; a stream also cancels its call when it is closed (`with stream:` / `async with stream:`, `close()` / `aclose()`) or dropped
unfinished, so breaking out of the loop never leaves the request generating. After the stream ends,
`finish_reason`, `usage` and `stop_reason` hold the last message's fields; `request_id()` gives the id the
service logged once the first response has come (from the call's headers; else the trailers). Failures raise grpc.RpcError with the service's status code. `request_id=` (optional) is sent as `x-request-id` metadata (an
id that is not printable ASCII, which metadata cannot carry, goes in the request's own field); both services log
it on the request's line (docs/OBSERVABILITY.md), and the service generates one when absent.
`tls=ClientTls(ca_file=...)` dials a service that serves TLS (docs/SECURITY.md). A call using options the
service's x-llmserve-options header does not list (an older one, mid rolling upgrade, would ignore them) is
cancelled at its first response with clients.requests.OptionsNotHonoured naming them; a service that sends no
such header predates the check and is trusted (docs/SERVICES.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc

from clients.channel import MAX_TIMEOUT_S, Channels, aio_channel, client_timeout, sync_channel
from clients.requests import (
    OptionsNotHonoured,
    chat,
    check_options,
    flag,
    generate_request,
    names_bad_text,
    options_used,
    put_token_ids,
)
from clients.tls import ClientTls
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc

Messages = Iterable[Mapping[str, object]]
REQUEST_ID_HEADER = "x-request-id"
# gRPC refuses call metadata past 8-16 KiB (RESOURCE_EXHAUSTED); the services keep an id's first 128 characters.
MAX_METADATA_ID_CHARS = 1024


def request_metadata(request_id: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying the request id, if one was given (gRPC metadata takes printable ASCII only)."""
    request_id = _id_text(request_id)
    if request_id and not _metadata_safe(request_id):
        raise ValueError(f"request_id {request_id!r} must be printable ASCII to travel as call metadata "
                         "(x-request-id); generate() and chat() take any id")
    # Past what the services keep, an id is cut rather than sent whole into gRPC's metadata limit.
    return ((REQUEST_ID_HEADER, request_id[:MAX_METADATA_ID_CHARS]),) if request_id else None


def _metadata_safe(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def _id_text(request_id: object) -> str | None:
    """A request id as text: an int or a UUID is taken as str() of it; None and "" mean none."""
    return None if request_id is None or request_id == "" else str(request_id)


class _StreamEnd:
    """What the last message of a generation stream said (None until it arrived); with n completions, the last
    to end, and `ends` each one's last message by index."""

    _last: pb.GenerateResponse | None = None
    _ends: dict[int, pb.GenerateResponse] | None = None
    _texts_read: dict[int, list[str]] | None = None

    @property
    def _texts(self) -> dict[int, list[str]]:
        """The texts texts() has read so far, by index."""
        if self._texts_read is None:
            self._texts_read = {}
        return self._texts_read

    def _seen(self, response: pb.GenerateResponse) -> pb.GenerateResponse:
        if response.finish_reason:
            self._last = response
            if self._ends is None:
                self._ends = {}
            self._ends[response.index] = response
        return response

    @property
    def ends(self) -> dict[int, pb.GenerateResponse]:
        """Each completion's last message (finish_reason, usage, stop_reason) by index, as they arrive."""
        return dict(self._ends or {})

    @property
    def finish_reason(self) -> int | None:
        """The FinishReason of the request (pb.FINISH_REASON_STOP, _LENGTH, ...), once the stream has ended."""
        return self._last.finish_reason if self._last is not None else None

    @property
    def usage(self) -> pb.Usage | None:
        return self._last.usage if self._last is not None else None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the request, "" if none did, None before the end."""
        return self._last.stop_reason if self._last is not None else None


def _add_texts(texts: dict[int, list[str]], chunk: pb.GenerateResponse) -> None:
    texts.setdefault(chunk.index, []).append(chunk.text)


def _by_index(texts: dict[int, list[str]]) -> list[str]:
    """Each completion's text, by index."""
    return ["".join(texts.get(i, ())) for i in range(max(texts, default=-1) + 1)]


def _one_text(texts: list[str]) -> str:
    if len(texts) > 1:
        raise ValueError(f"the request has {len(texts)} completions (n > 1): read them with texts()")
    return texts[0] if texts else ""


class _CallStream:
    """An iterator over one blocking streaming call's responses; cancel() ends the call and frees its requests,
    as leaving a `with stream:` block or dropping an unfinished stream does."""

    # (the options the call's requests use, growing as a GenerateMulti sends more; the target), and those checked
    _options: tuple[set[str], str] | None = None
    _passed: frozenset[str] = frozenset()

    def __init__(self, call: grpc.Call, options: tuple[set[str], str] | None = None) -> None:
        self._call = call
        self._options = options

    def _checked(self, response):
        """response, once the call's headers show that the service honours the options its requests use; else
        the call is cancelled and OptionsNotHonoured raised (clients.requests.check_options)."""
        if self._options is not None and not self._options[0] <= self._passed:
            used = frozenset(self._options[0])  # a GenerateMulti's grows as its requests go out: what is checked
            try:
                check_options(used, self._call.initial_metadata(), self._options[1])
            except OptionsNotHonoured:
                self._call.cancel()
                raise
            self._passed = used
        return response

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        return self

    def __next__(self) -> pb.GenerateResponse:
        return self._checked(next(self._call))  # type: ignore[call-overload]

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel  # a finished call ignores it

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()


class CompletionStream(_StreamEnd, _CallStream):
    """One request's responses (Generate)."""

    def __next__(self) -> pb.GenerateResponse:
        return self._seen(super().__next__())

    def text(self) -> str:
        """Consume the rest of the stream and return its text (of a request with one completion; see texts())."""
        return _one_text(self.texts())

    def texts(self) -> list[str]:
        """Consume the rest of the stream and return each completion's text, by index (what an earlier text() or
        texts() read included: text() refusing n > 1 completions loses nothing)."""
        for chunk in self:
            _add_texts(self._texts, chunk)
        return _by_index(self._texts)

    def request_id(self) -> str:
        """The id both services logged the request under (generated by the service when none was given), from the
        call's headers: readable before the stream is (a service that sends it only at the end: waits for that)."""
        got = dict(self._call.initial_metadata() or ()).get(REQUEST_ID_HEADER)
        return got if got is not None else dict(self._call.trailing_metadata() or ()).get(REQUEST_ID_HEADER, "")


class MultiStream(_CallStream):
    """GenerateMulti's responses, many requests interleaved (each response names its request_id); a failed
    request ends with FINISH_REASON_ERROR and a status instead of failing the call. cancel() ends them all. What
    iterating the requests raised (a frame that is no MultiRequest, the caller's generator failing) is raised by
    the read that finds the call ended by it."""

    def __init__(self, call: grpc.Call, options: tuple[set[str], str] | None = None,
                 failed: list[Exception] | None = None) -> None:
        super().__init__(call, options)
        self._failed = failed if failed is not None else []

    def __next__(self) -> pb.GenerateResponse:
        try:
            return super().__next__()
        except grpc.RpcError as exc:
            if self._failed:
                raise self._failed[0] from exc
            raise

    def texts(self) -> dict[str, str]:
        """Consume the stream and return each request's text by request_id; a failed request raises ValueError
        with its status. Requests with n > 1 completions: see completions()."""
        texts = self.completions()
        if any(index for _, index in texts):
            raise ValueError("a request has n > 1 completions: read them with completions()")
        return {rid: text for (rid, _), text in texts.items()}

    _read: dict[tuple[str, int], list[str]] | None = None

    def completions(self) -> dict[tuple[str, int], str]:
        """Consume the stream and return each completion's text by (request_id, index) (what an earlier texts() or
        completions() read included); a failed request raises ValueError with its status."""
        if self._read is None:
            self._read = {}
        texts = self._read  # each completion's chunks, joined once at the end: `text + chunk` per message copied
        for response in self:  # all of the text each time (quadratic in a long completion's messages)
            texts.setdefault((response.request_id, response.index), []).append(response.text)
            if response.finish_reason == pb.FINISH_REASON_ERROR:
                self.cancel()
                raise ValueError(f"request {response.request_id!r} failed: {response.status.message} "
                                 f"(status code {response.status.code})")
        return {key: "".join(chunks) for key, chunks in texts.items()}


class _GenerateCalls:
    """The streaming calls both clients share; each subclass names its channel and its stream wrapper."""

    _stream_type: type
    _channels: Channels
    timeout: float | None

    @property
    def _stub(self) -> pb_grpc.TextGenerationStub:
        return self._channels.stub()  # on a new channel once the TLS files were rotated

    @property
    def _channel(self) -> grpc.Channel | grpc.aio.Channel:
        return self._channels.current

    def _stream(self, request: pb.GenerateRequest, request_id: str | None):
        request_id = _id_text(request_id)
        if request_id and (not _metadata_safe(request_id) or len(request_id) > MAX_METADATA_ID_CHARS):
            # gRPC metadata takes printable ASCII only, and a few KiB: such an id goes in the request's own field,
            # which the service percent-encodes and cuts to what it keeps (docs/OBSERVABILITY.md).
            request.request_id, request_id = request_id, None
        timeout = self.timeout
        if request.deadline_ms:  # made the call's deadline, which gRPC enforces on both sides (older services read
            # deadline_ms on GenerateMulti only)
            deadline_s = request.deadline_ms / 1000
            if deadline_s < MAX_TIMEOUT_S:
                timeout = min(deadline_s, timeout if timeout is not None else float("inf"))
            request.ClearField("deadline_ms")
        return self._stream_type(
            self._stub.Generate(request, timeout=timeout, metadata=request_metadata(request_id)),
            (options_used(request), self._channels.target)
        )

    def generate(self, prompt: str, *, request_id: str | None = None, **kwargs: object):
        """Stream a completion of prompt; kwargs are sampling parameters and text options."""
        return self._stream(generate_request(prompt, **kwargs), request_id)

    def generate_tokens(self, prompt_token_ids: list[int], *, request_id: str | None = None, **kwargs: object):
        """Stream a completion of an already tokenized prompt."""
        return self._stream(generate_request(prompt_token_ids=prompt_token_ids, **kwargs), request_id)

    def chat(self, messages: Messages, *, request_id: str | None = None, **kwargs: object):
        """Stream the assistant's reply to chat messages."""
        return self._stream(generate_request(messages=messages, **kwargs), request_id)


def _noting_options(requests: Iterable[pb.MultiRequest], used: set[str],
                    failed: list[Exception]) -> Iterator[pb.MultiRequest]:
    """The requests, each one's options (clients.requests.options_used) added to `used` as it is sent. gRPC iterates
    them in a thread of its own, and of an exception there (a frame that is no MultiRequest, the caller's own
    generator failing) the reader saw only UNKNOWN "Exception iterating requests!": it is kept in `failed`, for
    MultiStream to raise in its place."""
    try:
        for i, frame in enumerate(requests):
            if not isinstance(frame, pb.MultiRequest):
                hint = (": send pb.MultiRequest(generate=request)" if isinstance(frame, pb.GenerateRequest)
                        else " (pb.MultiRequest(generate=a GenerateRequest, or abort_request_id=an id))")
                raise ValueError(f"generate_multi's requests[{i}] is a {type(frame).__name__}, not a "
                                 f"MultiRequest{hint}")
            if frame.HasField("generate"):
                used |= options_used(frame.generate)
            yield frame
    except Exception as exc:
        failed.append(exc)
        raise


@names_bad_text
def _tokenize_request(text: str | None, messages: Messages | None, add_special_tokens: bool | None,
                      enable_thinking: bool | None, tools: Iterable[object] | None = None,
                      template_kwargs: Mapping[str, object] | str | None = None,
                      continue_final_message: bool = False) -> pb.TokenizeRequest:
    """add_special_tokens None: the service's default, as for Generate (True for text, False for messages)."""
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text and messages")
    if messages is None:
        if enable_thinking is not None or tools or template_kwargs or continue_final_message:
            raise ValueError("enable_thinking, tools, template_kwargs and continue_final_message apply to chat "
                             "messages only")
        if not isinstance(text, str | bytes):  # protobuf's "bad argument type for built-in operation" named nothing
            raise ValueError(f"text must be a string (text), got {type(text).__name__}")
        request = pb.TokenizeRequest(text=text)
    else:
        request = pb.TokenizeRequest(chat=chat(messages, enable_thinking, tools, template_kwargs,
                                               continue_final_message))
    if flag("add_special_tokens", add_special_tokens) is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _detokenize_request(token_ids: Iterable[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    """token_ids and skip_special_tokens named when the protocol cannot carry them (protobuf said "Value out of
    range: 1099511627776" or "'str' object cannot be interpreted as an integer")."""
    request = pb.DetokenizeRequest()
    put_token_ids(request.token_ids, token_ids, "token_ids")
    if flag("skip_special_tokens", skip_special_tokens) is not None:
        request.skip_special_tokens = skip_special_tokens
    return request


class TextClient(_GenerateCalls):
    """Blocking client; `timeout` (seconds) is each call's deadline. Streams are CompletionStreams. channel_kwargs:
    max_message_bytes, keepalive_time_s, extra_options (further gRPC channel arguments: clients.channel)."""

    _stream_type = CompletionStream

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None,
                 **channel_kwargs: Any) -> None:
        self.timeout = client_timeout(timeout)
        self._channels = Channels(sync_channel, target, tls, pb_grpc.TextGenerationStub, **channel_kwargs)

    def generate_multi(self, requests: Iterable[pb.MultiRequest], *, request_id: str | None = None
                       ) -> MultiStream:
        """The multiplexed variant: many requests (and aborts) on one stream; each logs as request_id/its id.
        requests: an iterable of pb.MultiRequest (a list, or a generator that sends them as it goes)."""
        if not isinstance(requests, Iterable):  # one MultiRequest, bare: it failed later in gRPC's sending thread
            raise ValueError(f"generate_multi takes an iterable of MultiRequest messages (a list, or a generator), "
                             f"got a {type(requests).__name__}")
        used: set[str] = set()
        failed: list[Exception] = []
        return MultiStream(self._stub.GenerateMulti(_noting_options(requests, used, failed), timeout=self.timeout,
                                                    metadata=request_metadata(request_id)),
                           (used, self._channels.target), failed)

    def tokenize(self, text: str | None = None, add_special_tokens: bool | None = None, *,
                 messages: Messages | None = None, enable_thinking: bool | None = None,
                 tools: Iterable[object] | None = None,
                 template_kwargs: Mapping[str, object] | str | None = None,
                 continue_final_message: bool = False) -> list[int]:
        """The token ids of text, or of chat messages rendered as chat() would send them: what generate() and chat()
        send the engine (add_special_tokens None: with the tokenizer's special tokens for text, none for a chat)."""
        request = _tokenize_request(text, messages, add_special_tokens, enable_thinking, tools, template_kwargs,
                                    continue_final_message)
        response, call = self._stub.Tokenize.with_call(request, timeout=self.timeout)
        check_options(options_used(request), call.initial_metadata(), self._channels.target)
        return list(response.token_ids)

    def detokenize(self, token_ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        return self._stub.Detokenize(_detokenize_request(token_ids, skip_special_tokens), timeout=self.timeout).text

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        for channel in self._channels.close():
            channel.close()

    def __enter__(self) -> TextClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCompletionStream(_StreamEnd):
    """An async iterator over one streaming call's responses; cancel() ends it and frees the request, as leaving
    an `async with stream:` block, aclose() or dropping an unfinished stream do (grpc.aio keeps a call alive
    while it runs: without that, breaking out of `async for` would leave the request generating)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, options: tuple[set[str], str] | None = None) -> None:
        self._call = call
        self._cancelled = False
        self._read_cancelled = False  # a read was cancelled with its task (wait_for's timeout), and the call with it
        self._options = options if options and options[0] else None  # (used, target) until checked

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._read_cancelled = True  # grpc.aio cancels the whole call with the read
                raise  # the caller's own task was cancelled: that must propagate
            response = None  # the call was cancelled under us: by cancel(), or by the client's close()
        if self._cancelled or response is None:  # as the blocking stream does: RpcError(CANCELLED)
            why = ("an earlier read of the stream was cancelled (asyncio.wait_for or asyncio.timeout around a read "
                   "ends the whole call, grpc.aio's rule: bound the stream with the client's timeout or deadline_ms "
                   "instead)" if self._read_cancelled and not self._cancelled
                   else "the stream was cancelled by cancel(), or its client was closed")
            raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), why)
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        if self._options is not None:  # the service honours the request's options (see _CallStream._checked)
            used, target = self._options
            try:
                check_options(used, await self._call.initial_metadata(), target)
            except OptionsNotHonoured:
                self.cancel()
                raise
            self._options = None
        return self._seen(response)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def aclose(self) -> None:
        if not self._call.done():
            self.cancel()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            try:
                call.cancel()
            except Exception:  # its event loop is already closed (the call went with it), or shutting down
                pass

    async def text(self) -> str:
        return _one_text(await self.texts())

    async def texts(self) -> list[str]:
        async for chunk in self:
            _add_texts(self._texts, chunk)
        return _by_index(self._texts)

    async def request_id(self) -> str:
        """The id both services logged the request under, from the call's headers (see CompletionStream's)."""
        got = dict(await self._call.initial_metadata() or ()).get(REQUEST_ID_HEADER)
        return got if got is not None else dict(await self._call.trailing_metadata() or ()).get(REQUEST_ID_HEADER, "")


class AsyncTextClient(_GenerateCalls):
    """asyncio client; the same calls as TextClient, with AsyncCompletionStreams.

    Its channel belongs to one event loop (grpc.aio's rule): the loop running when it is made, or, when made
    outside any (at import, before asyncio.run), the loop of its first call. A call from another loop (a second
    asyncio.run) raises RuntimeError saying so: make one client per loop."""

    _stream_type = AsyncCompletionStream

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None,
                 **channel_kwargs: Any) -> None:
        self.timeout = client_timeout(timeout)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # made outside any loop: a channel made now would belong to none that runs its calls
            self._loop = None
        self._channels = Channels(aio_channel, target, tls, pb_grpc.TextGenerationStub, defer=self._loop is None,
                                  **channel_kwargs)

    def _own_loop(self, what: str) -> asyncio.AbstractEventLoop:
        """The running loop, once it is the one this client's channel belongs to (or will: the first call's)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(f"AsyncTextClient {what} needs a running event loop: call it from async code, or use "
                               "TextClient from blocking code") from None
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(f"AsyncTextClient {what} in another event loop than the one its channel belongs to "
                               f"(the loop it was made in{', now closed' if self._loop.is_closed() else ''}; a "
                               "grpc.aio channel cannot move between loops, e.g. from one asyncio.run() to the "
                               "next): make one AsyncTextClient per event loop")
        return loop

    @property
    def _stub(self) -> pb_grpc.TextGenerationStub:
        self._own_loop("called")
        return self._channels.stub()

    async def tokenize(self, text: str | None = None, add_special_tokens: bool | None = None, *,
                       messages: Messages | None = None, enable_thinking: bool | None = None,
                       tools: Iterable[object] | None = None,
                       template_kwargs: Mapping[str, object] | str | None = None,
                       continue_final_message: bool = False) -> list[int]:
        request = _tokenize_request(text, messages, add_special_tokens, enable_thinking, tools, template_kwargs,
                                    continue_final_message)
        call = self._stub.Tokenize(request, timeout=self.timeout)
        response = await call
        check_options(options_used(request), await call.initial_metadata(), self._channels.target)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        request = _detokenize_request(token_ids, skip_special_tokens)
        return (await self._stub.Detokenize(request, timeout=self.timeout)).text

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    async def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._own_loop("closed")  # from another loop: refused before the channels are given up, not after
        channels = self._channels.close()
        if channels and self._loop is not None and self._loop.is_closed():
            return  # its channels went with their loop (asyncio.run closed it); none can be awaited from this one
        if channels:
            self._own_loop("closed")
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncTextClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
