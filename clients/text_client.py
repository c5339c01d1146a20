"""Python clients of the text API (the tokenizer service): synchronous and asyncio.

    with TextClient("localhost:50052") as client:
        for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="")

Streaming calls return an iterator of GenerateResponse messages (`text`, `token_ids`, and on the last one
`finish_reason` and `usage`) with `cancel()`, which aborts the request in the engine at once. Failures raise
grpc.RpcError with the service's status code. `request_id=` (optional) is sent as `x-request-id` metadata (an
id that is not printable ASCII, which metadata cannot carry, goes in the request's own field); both services log
it on the request's line (docs/OBSERVABILITY.md), and the service generates one when absent.
`tls=ClientTls(ca_file=...)` dials a service that serves TLS (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping

import grpc

from clients.channel import aio_channel, sync_channel
from clients.requests import generate_request
from clients.tls import ClientTls
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc

Messages = Iterable[Mapping[str, str]]
REQUEST_ID_HEADER = "x-request-id"


def request_metadata(request_id: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying the request id, if one was given (gRPC metadata takes printable ASCII only)."""
    if request_id and not _metadata_safe(request_id):
        raise ValueError(f"request_id {request_id!r} must be printable ASCII to travel as call metadata "
                         "(x-request-id); generate() and chat() take any id")
    return ((REQUEST_ID_HEADER, request_id),) if request_id else None


def _metadata_safe(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


class CompletionStream:
    """An iterator over one streaming call's responses; cancel() ends it and frees the request."""

    def __init__(self, call: grpc.Call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        return self._call  # type: ignore[return-value]

    def __next__(self) -> pb.GenerateResponse:
        return next(self._call)  # type: ignore[call-overload]

    def cancel(self) -> None:
        self._call.cancel()

    def text(self) -> str:
        """Consume the rest of the stream and return its text."""
        return "".join(chunk.text for chunk in self)


class _GenerateCalls:
    """The streaming calls both clients share; each subclass names its channel and its stream wrapper."""

    _stream_type: type
    _stub: pb_grpc.TextGenerationStub
    timeout: float | None

    def _stream(self, request: pb.GenerateRequest, request_id: str | None):
        if request_id and not _metadata_safe(request_id):
            # gRPC metadata takes printable ASCII only: such an id goes in the request's own field, which the
            # service percent-encodes (docs/OBSERVABILITY.md).
            request.request_id, request_id = request_id, None
        timeout = self.timeout
        if request.deadline_ms:  # Generate's deadline is the call's own; the field is for GenerateMulti
            timeout = min(request.deadline_ms / 1000, timeout if timeout is not None else float("inf"))
            request.ClearField("deadline_ms")
        return self._stream_type(
            self._stub.Generate(request, timeout=timeout, metadata=request_metadata(request_id))
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


def _detokenize_request(token_ids: Iterable[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    request = pb.DetokenizeRequest(token_ids=list(token_ids))
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    return request


class TextClient(_GenerateCalls):
    """Blocking client; `timeout` (seconds) is each call's deadline. Streams are CompletionStreams."""

    _stream_type = CompletionStream

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None,
                 **channel_kwargs: int | float) -> None:
        self._channel = sync_channel(target, tls, **channel_kwargs)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self.timeout = timeout

    def generate_multi(self, requests: Iterable[pb.MultiRequest], *, request_id: str | None = None
                       ) -> CompletionStream:
        """The multiplexed variant: many requests (and aborts) on one stream; each logs as request_id/its id."""
        return CompletionStream(self._stub.GenerateMulti(iter(requests), timeout=self.timeout,
                                                         metadata=request_metadata(request_id)))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        reply = self._stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                    timeout=self.timeout)
        return list(reply.token_ids)

    def detokenize(self, token_ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        return self._stub.Detokenize(_detokenize_request(token_ids, skip_special_tokens), timeout=self.timeout).text

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TextClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCompletionStream:
    """An async iterator over one streaming call's responses; cancel() ends it and frees the request."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            if not self._cancelled:
                raise  # the caller's own task was cancelled: that must propagate
            response = None
        if self._cancelled:  # as the blocking stream does: a cancelled call raises RpcError(CANCELLED)
            raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "the stream was cancelled by cancel()")
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def text(self) -> str:
        return "".join([chunk.text async for chunk in self])


class AsyncTextClient(_GenerateCalls):
    """asyncio client; the same calls as TextClient, with AsyncCompletionStreams."""

    _stream_type = AsyncCompletionStream

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None,
                 **channel_kwargs: int | float) -> None:
        self._channel = aio_channel(target, tls, **channel_kwargs)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self.timeout = timeout

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        reply = await self._stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                          timeout=self.timeout)
        return list(reply.token_ids)

    async def detokenize(self, token_ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        request = _detokenize_request(token_ids, skip_special_tokens)
        return (await self._stub.Detokenize(request, timeout=self.timeout)).text

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTextClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
