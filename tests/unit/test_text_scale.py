"""The tokenizer service's per-token cost on long outputs and many concurrent streams, counted (never timed) at two
sizes: a cost per token that grows with the output (re-decoding, re-scanning or copying the whole text or id list
at each token) makes a 32,000-token completion quadratic, and one that grows with the streams in flight makes a mass
disconnect stall every stream of the replica.

The measurements behind these, before and after the fixes, are in docs/PERFORMANCE.md ("Per-token cost of the text
path").
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import types

import pytest

from clients.text_client import MultiStream
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service import text_stream
from tokenizer_service.engine_pool import EngineConnection, RequestFailed, _Outbox

TEXT = 'The lighthouse keeper 🌊 watched the sea 中文。 {"a": [1, 2]} naïve 👨‍👩‍👧 don\'t '


class _CountingDecoder:
    """The detokenizer's decoder, counting the ids it is asked to decode."""

    def __init__(self, decoder) -> None:
        self.decoder, self.ids = decoder, 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.ids += len(ids)
        return self.decoder.decode(ids, skip_special_tokens=skip_special_tokens)


class _Conn:
    address = "engine:1"


class _ScriptedHandle:
    """An engine request that streams `ids`, `chunk` ids an update (with `top` logprobs each when the request asks
    for logprobs), the last update finishing it by length."""

    got_tokens = True
    conn = _Conn()

    def __init__(self, request: engine_pb.NewRequest, ids: list[int], chunk: int, top: int) -> None:
        self.request, self.ids, self.chunk, self.top = request, ids, chunk, top

    async def _updates(self):
        ids, chunk, top = self.ids, self.chunk, self.top
        for i in range(0, len(ids), chunk):
            update = engine_pb.RequestUpdate(new_token_ids=ids[i : i + chunk])
            if i + chunk >= len(ids):
                update.finish_reason = engine_pb.FINISH_REASON_LENGTH
            if self.request.sampling_params.HasField("logprobs"):
                for _ in update.new_token_ids:
                    update.logprobs.add(
                        logprob=-1.0, top_token_ids=list(range(top)), top_logprobs=[-1.0] * top
                    )
            yield update

    def __aiter__(self):
        return self._updates()

    def close(self, stopped: bool = False) -> None:
        pass


class _ScriptedPool:
    """One engine, streaming the same ids to every request."""

    max_model_len = 10**6

    def __init__(self, ids: list[int], chunk: int, top: int) -> None:
        self.ids, self.chunk, self.top = ids, chunk, top

    def can_try_another(self, tried, params) -> bool:
        return False

    async def submit(self, request, timeout_s, avoid=(), prefer=None) -> _ScriptedHandle:
        return _ScriptedHandle(request, self.ids, self.chunk, self.top)


async def _no_wait(*args: object) -> None:
    pass


def _context():
    async def abort(code, message):
        raise RequestFailed(code, message)

    return types.SimpleNamespace(
        invocation_metadata=lambda: (),
        set_trailing_metadata=lambda metadata: None,
        send_initial_metadata=_no_wait,
        time_remaining=lambda: None,
        abort=abort,
    )


def _stream_cost(
    tokenizer,
    monkeypatch,
    num_tokens: int,
    request: pb.GenerateRequest,
    chunk: int = 1,
    top: int = 0,
    **servicer_kwargs,
) -> tuple[float, float, list[pb.GenerateResponse], list[int]]:
    """(ids decoded a token, Python and C function calls a token, the responses, the ids generated) of one Generate
    call streaming num_tokens ids through the real TextServicer."""
    from tokenizer_service.servicer import TextServicer

    base = tokenizer.encode(TEXT, add_special_tokens=False)
    ids = (base * (num_tokens // len(base) + 1))[:num_tokens]
    decoders: list[_CountingDecoder] = []
    real_decoder_of = text_stream.decoder_of

    def counting_decoder_of(tok):
        decoders.append(_CountingDecoder(real_decoder_of(tok)))
        return decoders[-1]

    monkeypatch.setattr(text_stream, "decoder_of", counting_decoder_of)
    servicer = TextServicer(
        tokenizer,
        _ScriptedPool(ids, chunk, top),
        "demo",
        len(tokenizer),
        set(tokenizer.all_special_ids),
        {},
        100,
        **servicer_kwargs,
    )
    servicer.metrics._log_requests = False
    steps = 0  # Python lines run, and C functions called

    def profile(frame, event, arg) -> None:
        nonlocal steps
        if event == "c_call":
            steps += 1

    def trace(frame, event, arg):
        nonlocal steps
        if event == "line":
            steps += 1
        return trace

    async def main() -> list[pb.GenerateResponse]:
        got = []
        before = sys.gettrace(), sys.getprofile()  # a coverage tracer or debugger: handed back, not dropped
        sys.setprofile(profile)
        sys.settrace(trace)
        try:
            async for response in servicer.Generate(request, _context()):
                got.append(response)
        finally:
            sys.settrace(before[0])
            sys.setprofile(before[1])
        return got

    got = asyncio.run(main())
    n = request.n or 1
    return sum(d.ids for d in decoders) / (n * num_tokens), steps / (n * num_tokens), got, ids


REQUESTS = {
    "one id a message": (pb.GenerateRequest(prompt="hi"), {}),
    "64 ids a message": (pb.GenerateRequest(prompt="hi"), {"chunk": 64}),
    "64 stop strings of 1,024 characters": (
        pb.GenerateRequest(
            prompt="hi",
            include_stop_str_in_output=True,
            stop=[(TEXT * 20)[i : i + 1023] + "#" for i in range(64)],
        ),
        {},
    ),  # each holds back up to 1,023 characters
    "logprobs with 5 top": (
        pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(logprobs=5)),
        {"top": 5},
    ),
    "n=2, special tokens kept, min_tokens": (
        pb.GenerateRequest(
            prompt="hi",
            n=2,
            skip_special_tokens=False,
            stop=["never"],
            sampling_params=pb.SamplingParams(min_tokens=10**6),
        ),
        {},
    ),
    "JSON mode, stream_interval 8": (
        pb.GenerateRequest(
            prompt="hi", sampling_params=pb.SamplingParams(response_format=pb.RESPONSE_FORMAT_JSON_OBJECT)
        ),
        {"stream_interval": 8, "stream_max_wait_s": 0},
    ),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_streamed_text_costs_the_same_per_token_at_any_length(demo_tokenizer, monkeypatch, case):
    """The whole streamed path of the tokenizer service (engine update -> detokenize -> stop strings -> logprobs
    text -> response -> usage) at 500 and 2,000 tokens: the ids decoded and the function calls made per token do not
    grow with the output. The text is the full decode of the ids (the stop strings never match)."""
    request, kwargs = REQUESTS[case]
    short = _stream_cost(demo_tokenizer, monkeypatch, 500, request, **kwargs)
    long = _stream_cost(demo_tokenizer, monkeypatch, 2000, request, **kwargs)
    for _, _, got, ids in (short, long):
        for index in range(request.n or 1):
            mine = [r for r in got if r.index == index]
            assert [t for r in mine for t in r.token_ids] == ids
            assert "".join(r.text for r in mine) == demo_tokenizer.decode(ids, skip_special_tokens=False)
            assert mine[-1].usage.completion_tokens == len(ids)
    assert long[0] <= 1.05 * short[0] + 0.1, (short[0], long[0])  # ids decoded a token
    # Function calls a token: the constant per-call and per-message costs are spread over more tokens in the long
    # stream, so it may be cheaper; a cost that grows with the output makes it 4 times as expensive.
    assert long[1] <= 1.1 * short[1], (short[1], long[1])


class _Request:
    """A NewRequest stand-in that counts how often its request_id is read."""

    reads = 0

    def __init__(self) -> None:
        self._id = ""

    @property
    def request_id(self) -> str:
        _Request.reads += 1
        return self._id

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._id = value

    def ByteSize(self) -> int:  # noqa: N802 -- protobuf's name
        return 10


def _queued_aborts(count: int) -> tuple[int, list[str], list[str]]:
    """Send `count` requests on a connection whose writer has not run, abort every other one (the newest first, the
    far end of a front-to-back scan), then write: (request_id reads by the aborts, ids written, aborts written)."""

    async def main():
        conn = object.__new__(EngineConnection)  # its fields only: no stream task
        conn.address, conn.inflight, conn.ready, conn._ids, conn._outbox = (
            "fake:1",
            {},
            True,
            itertools.count(),
            _Outbox(),
        )
        handles = [conn.send(_Request(), max_buffered=4) for _ in range(count)]
        _Request.reads = 0
        for handle in reversed(handles[::2]):
            handle.close()
        reads = _Request.reads
        sent_later = conn.send(_Request(), max_buffered=4)
        outbox = conn._outbox
        frames = EngineConnection._frames(outbox, 10**9)
        written = [r.request_id for r in (await anext(frames)).requests]
        sent_later.close()  # written already: aborted in the next frame
        frame = await anext(frames)
        return reads, written, list(frame.abort_request_ids)

    return asyncio.run(main())


@pytest.mark.parametrize("count", [500, 2000])
def test_aborting_requests_not_yet_written_does_not_scan_the_outbox(count, monkeypatch):
    """A request aborted before the engine stream's writer sent it is dropped from the outbox. That scanned (and
    copied) every request waiting there: a mass disconnect while the engine's flow control held the writer back cost
    ~0.25 s of the event loop at 2,048 queued requests (max_inflight), 8.5 s at 16,000."""
    monkeypatch.setattr(engine_pb, "ClientFrame", _Frame)
    reads, written, aborted = _queued_aborts(count)
    assert reads <= count, reads  # one scan per abort read ~count**2 / 4 ids
    assert written == [str(i) for i in range(1, count, 2)] + [
        str(count)
    ]  # the others, in order, and the later one
    assert aborted == [str(count)]


class _Frame:
    """engine_pb.ClientFrame for the stand-in requests (a real one takes only NewRequests)."""

    def __init__(self, abort_request_ids=(), stopped_request_ids=()) -> None:
        self.requests: list[_Request] = []
        self.abort_request_ids, self.stopped_request_ids = list(abort_request_ids), list(stopped_request_ids)

    def ByteSize(self) -> int:  # noqa: N802 -- protobuf's name
        return 0


class _Counted(str):
    """A text chunk that counts the characters concatenations with it copy."""

    copied = 0

    def __add__(self, other):
        _Counted.copied += len(self) + len(other)
        return _Counted(str.__add__(self, other))

    def __radd__(self, other):
        _Counted.copied += len(self) + len(other)
        return _Counted(str.__add__(other, self))


class _Call:
    """A finished blocking call's responses, as MultiStream reads them."""

    def __init__(self, responses) -> None:
        self._responses = iter(responses)

    def __next__(self):
        return next(self._responses)

    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("num_tokens", [1000, 8000])
def test_multistream_completions_copy_each_text_once(num_tokens):
    """MultiStream.completions() built each completion's text by `text + chunk` per message, copying all of it every
    time: a 32,000-token completion streamed one token a message copied ~4 GB (characters x messages / 2)."""
    chunks = [f"{i % 10}é🌊 " for i in range(num_tokens)]
    responses = [pb.GenerateResponse(request_id=f"r{i % 2}", index=(i // 2) % 2) for i in range(num_tokens)]
    fakes = [
        types.SimpleNamespace(request_id=r.request_id, index=r.index, text=_Counted(c), finish_reason=0)
        for r, c in zip(responses, chunks, strict=True)
    ]
    parts: dict[tuple[str, int], list[str]] = {}
    for response, chunk in zip(
        responses, chunks, strict=True
    ):  # the reference: each completion's chunks in order
        parts.setdefault((response.request_id, response.index), []).append(chunk)
    _Counted.copied = 0
    texts = MultiStream(_Call(fakes)).completions()
    assert texts == {key: "".join(pieces) for key, pieces in parts.items()}
    assert _Counted.copied <= 2 * sum(map(len, chunks)), _Counted.copied
