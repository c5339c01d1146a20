"""The Engine gRPC servicer: a thin layer over the engine loop. It never blocks on the model."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from engine_service.engine_loop import EngineLoop, EngineUnavailable
from engine_service.streams import OutputStream, RequestSink, check_prompt_logprobs_size
from engine_service.validation import (
    check_deadline_ms,
    check_prompt,
    check_request_id,
    sampling_params_from_proto,
)
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc

log = logging.getLogger("engine_service")

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
UNARY_PREFIX = "u:"  # engine request ids of GenerateStream calls; bidi streams use "s<n>:"
# An engine request id is "<prefix><admission number>:<client id>": unique per admission, so that a client id
# reused right after an abort can never be confused with the aborted request still queued in the engine.
REQUEST_ID_HEADER = "x-request-id"  # GenerateStream: the trace id when the request carries none
MAX_TRACE_ID_CHARS = 128  # a trace id is a log field: a client cannot write megabytes of log per request
# Request options this engine applies beyond the first protocol (ModelInfo.features): clients route requests that
# use them only to engines that list them, since an older engine ignores the fields. "json_object" and "json_schema"
# are listed only by an engine whose model's tokenizer serves them (model_info["json_object"]).
ENGINE_FEATURES = ("logprobs", "penalties", "prompt_logprobs", "logit_bias", "priority")
# A Generate stream that sent nothing for a whole period of this gets an empty frame: a client that hears nothing
# for several periods knows the service stopped answering (its event loop blocked or the process frozen), which
# HTTP/2 keepalive cannot tell it, as gRPC's transport answers pings without this loop.
HEARTBEAT_S = 1.0


class EngineServicer(pb_grpc.EngineServicer):
    """Generate (bidi), GenerateStream, Abort, GetModelInfo and GetLoad over one EngineLoop."""

    def __init__(self, max_waiting: int, max_buffered_tokens: int, max_frame_bytes: int = 32 * 2**20,
                 max_calls: int = 4096, max_running: int = 256) -> None:
        self.loop: EngineLoop | None = None  # set once the engine has loaded
        self.model_info: dict[str, Any] = {}
        self.generation_defaults: dict[str, object] = {}
        self.draining = False
        # Requests are taken only once the start-up canary has passed (serve() sets it with health SERVING), so
        # that clients that treat an answered GetModelInfo as ready never reach an engine that may yet fail it.
        self.started = False
        # Set by serve() when the drain's grace period ends with calls left: they are cut as errors.
        self.shutdown_error: str | None = None
        self._max_waiting = max_waiting
        self._max_running = max_running  # the engine's max_num_seqs: live requests past it must wait
        self._max_buffered = max_buffered_tokens
        self._max_frame_bytes = max_frame_bytes  # half of max_message_bytes: a frame never nears the limit
        # Generate and GenerateStream calls open at once (max_concurrent_rpcs). Counted here rather than by
        # gRPC's own limit, which counts every call alike: idle streams would lock out GetLoad and health.
        self._max_calls = max_calls
        self._stream_ids = itertools.count(1)
        self._admissions = itertools.count(1)
        self._streams: set[OutputStream] = set()
        self._unary: dict[str, OutputStream] = {}

    def attach(self, loop: EngineLoop, model_info: dict[str, Any], generation_defaults: dict[str, object]) -> None:
        self.loop, self.model_info, self.generation_defaults = loop, model_info, generation_defaults

    @property
    def num_calls(self) -> int:
        """Generate and GenerateStream calls in progress."""
        return len(self._streams)

    def begin_drain(self) -> None:
        """Refuse new requests; bidi streams end once their requests are done."""
        self.draining = True
        for stream in self._streams:
            stream.wake.set()

    def cut_all(self, message: str) -> int:
        """The drain's grace period ended: fail every live request with UNAVAILABLE and `message` (each aborted
        in the engine), so that its call sends that status instead of being cancelled by the server's stop.
        Returns how many requests were cut."""
        cut = 0
        for stream in self._streams:
            for client_id in list(stream.live):
                stream.fail(client_id, grpc.StatusCode.UNAVAILABLE, message, abort=True)
                cut += 1
            stream.wake.set()
        return cut

    # ---- admission ----------------------------------------------------------------------------------------

    def _unavailable(self) -> str | None:
        """Why this engine takes no requests at all now (loading, draining, failed), if so.

        GetModelInfo and the start of every call refuse with UNAVAILABLE then, so that a client's connection
        pool never picks a draining or failed engine as a target.
        """
        if self.loop is not None and self.loop.failure is not None:
            return f"the engine has failed: {self.loop.failure}"
        if self.draining:
            return "the engine service is draining (shutting down); retry elsewhere"
        if self.loop is None:
            return "the engine service is still loading the model"
        if not self.started:
            return "the engine service is still starting (its start-up canary has not passed)"
        return None

    def _call_refusal(self) -> tuple[grpc.StatusCode, str] | None:
        """Why a new generation call (Generate, GenerateStream) is refused now, if so."""
        unavailable = self._unavailable()
        if unavailable is not None:
            return grpc.StatusCode.UNAVAILABLE, unavailable
        if len(self._streams) >= self._max_calls:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the engine service has {len(self._streams)} generation calls open (max_concurrent_rpcs "
                    f"{self._max_calls}): close idle streams, multiplex requests on fewer, or raise "
                    "--max-concurrent-rpcs")
        return None

    def _queue_full(self) -> str | None:
        """Why the queue takes no more requests now (RESOURCE_EXHAUSTED), if so."""
        # Live requests that cannot be running. While the scheduler had none waiting at the last step, slots were
        # free: up to max_num_seqs may run (live minus the last step's running count would also count a burst
        # that arrived during the step). Once some wait (the KV cache, not the slots, bounds the batch), only
        # the running ones are.
        stats = self.loop.stats
        running_cap = self._max_running if not stats.get("num_waiting", 0) else int(stats.get("num_running", 0))
        queued = self.loop.num_live - running_cap
        if queued >= self._max_waiting:
            return (f"the engine's queue is full: {queued} requests past the {running_cap} that can run now "
                    f"(max_waiting {self._max_waiting}); retry later")
        return None

    def _start(self, stream: OutputStream, prefix: str, req: pb.NewRequest, timeout_s: float | None) -> None:
        """Admit one request into the engine, or put its refusal on the stream."""
        cid = req.request_id
        trace_id = (req.trace_id or prefix + cid)[:MAX_TRACE_ID_CHARS]  # the client's; only a log field
        try:
            check_request_id(cid)
            if cid in stream.live:
                raise ValueError(f"request_id {cid!r} is already live on this stream")
            unavailable = self._unavailable()
            if unavailable is not None:
                self._refuse(stream, cid, trace_id, grpc.StatusCode.UNAVAILABLE, unavailable,
                             prompt_tokens=len(req.prompt_token_ids))
                return
            ids, max_model_len = req.prompt_token_ids, self.model_info["max_model_len"]
            if len(ids) >= max_model_len:  # refused before a copy of what may be millions of ids (64 MiB frames)
                check_prompt(ids, self.model_info["vocab_size"], max_model_len)
            prompt = list(ids)
            check_prompt(prompt, self.model_info["vocab_size"], max_model_len)
            params = sampling_params_from_proto(req.sampling_params, self.generation_defaults)
            if params.prompt_logprobs is not None:  # they go out in one update, within a frame
                check_prompt_logprobs_size(len(prompt), params.prompt_logprobs, self._max_frame_bytes // 2)
        except ValueError as exc:
            self._refuse(stream, cid, trace_id, grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                         prompt_tokens=len(req.prompt_token_ids))
            return
        # Checked after the request itself: one that can never be served is INVALID_ARGUMENT whatever the load, not
        # a RESOURCE_EXHAUSTED that tells its client to retry it. A full queue still takes a request that outranks a
        # live one: it displaces the newest waiting request of a higher priority value that has produced nothing, if
        # any (decided on the engine thread, which owns the queue; else it is refused there with this message).
        full, if_full = self._queue_full(), None
        if full is not None:
            if not self.loop.outranks(params.priority):
                self._refuse(stream, cid, trace_id, grpc.StatusCode.RESOURCE_EXHAUSTED, full,
                             prompt_tokens=len(prompt))
                return
            if_full = (full, self._max_waiting)
        engine_id = f"{prefix}{next(self._admissions)}:{cid}"
        try:
            self.loop.add(engine_id, prompt, params, RequestSink(stream, cid), trace_id=trace_id, if_full=if_full)
        except EngineUnavailable as exc:
            self._refuse(stream, cid, trace_id, grpc.StatusCode.UNAVAILABLE, f"the engine has failed: {exc}",
                         prompt_tokens=len(prompt), engine_id=engine_id)
            return
        stream.register(cid, engine_id, timeout_s)

    def _refuse(self, stream: OutputStream, cid: str, trace_id: str, code: grpc.StatusCode, message: str,
                prompt_tokens: int = 0, engine_id: str | None = None) -> None:
        """Put a refusal on the stream, and count and log it as an error (overload and bad input must show)."""
        stream.reject(cid, code, message)
        metrics = self.loop.metrics if self.loop is not None else None
        if metrics is not None:
            metrics.refused(trace_id, f"{code.name}: {message}", prompt_tokens=prompt_tokens,
                            engine_request_id=engine_id)

    def _new_stream(self) -> OutputStream:
        def abort_in_engine(engine_id: str, error: str | None = None, stopped: bool = False) -> None:
            if self.loop is not None:
                self.loop.abort(engine_id, error, stopped)

        stream = OutputStream(abort_in_engine, self._max_buffered, self._max_frame_bytes)
        self._streams.add(stream)
        return stream

    async def _frames(self, stream: OutputStream, heartbeat_s: float | None = None
                      ) -> AsyncIterator[list[pb.RequestUpdate]]:
        """The stream's updates, one batch per wake-up (one engine step when the client keeps up); with heartbeat_s,
        an empty batch when a whole period of it passed with none (a timer per period, nothing per frame)."""
        sent, beat, timer = 0, False, None  # batches yielded; a heartbeat is due

        def tick(sent_before: int) -> None:
            nonlocal beat, timer
            due = sent == sent_before
            if due:
                beat = True
                stream.wake.set()
            # The heartbeat queued now is a frame of this period, not the next: counted, so that an idle stream gets
            # one every period rather than every other.
            timer = asyncio.get_running_loop().call_later(heartbeat_s, tick, sent + due)

        if heartbeat_s is not None:
            tick(-1)
        try:
            while not stream.done(self.draining):
                if stream.has_updates or beat:
                    beat = False
                    sent += 1
                    yield stream.take() if stream.has_updates else []
                    continue
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    # ---- RPCs ---------------------------------------------------------------------------------------------

    async def Generate(self, request_iterator, context):
        refusal = self._call_refusal()
        if refusal is not None:
            await context.abort(*refusal)
        prefix = f"s{next(self._stream_ids)}:"
        stream = self._new_stream()
        reader = asyncio.create_task(self._read_frames(request_iterator, stream, prefix))
        try:
            async with aclosing(self._frames(stream, HEARTBEAT_S)) as frames:  # its heartbeat timer ends with the call
                async for updates in frames:
                    yield pb.ServerFrame(updates=updates)
            if stream.read_error:  # frames after it are lost: say so rather than end the call OK
                await context.abort(stream.read_code, stream.read_error)
        finally:
            reader.cancel()
            # A closed or cancelled stream frees its requests' blocks at once.
            stream.abort_all(self.shutdown_error)
            self._streams.discard(stream)

    async def _read_frames(self, request_iterator, stream: OutputStream, prefix: str) -> None:
        async def frames():  # the client's frames, until one cannot be read: that one ends the call
            try:
                async for frame in request_iterator:
                    yield frame
            except Exception as exc:  # noqa: BLE001 -- not a ClientFrame (DecodeError), or the transport failed
                stream.read_error = (f"a frame on this stream is not a valid ClientFrame ({exc}); its requests were "
                                     "aborted")

        try:
            async for frame in frames():
                # Aborts first: a frame that aborts an id and sends a new request under it means exactly that.
                stopped = set(frame.stopped_request_ids)
                for cid in frame.abort_request_ids:
                    stream.abort(cid, stopped=cid in stopped)
                for req in frame.requests:
                    self._start(stream, prefix, req, check_deadline_ms(req.deadline_ms))
                await stream.room.wait()  # a client that does not read its updates is not read either
        except Exception as exc:  # a bug applying a frame: the call fails visibly, its requests are aborted
            log.exception("applying a frame failed")
            stream.read_error = f"internal error: {type(exc).__name__}: {exc}; the call's requests were aborted"
            stream.read_code = grpc.StatusCode.INTERNAL
        finally:
            stream.input_done = True
            stream.wake.set()

    async def GenerateStream(self, request, context):
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        cid = request.request_id
        if not request.trace_id:
            request.trace_id = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_HEADER), cid)
        request.trace_id = request.trace_id[:MAX_TRACE_ID_CHARS]
        refusal = self._call_refusal()
        if refusal is None and cid in self._unary:
            refusal = grpc.StatusCode.INVALID_ARGUMENT, f"request_id {cid!r} is already live"
        if refusal is not None:  # a request refused like any other: counted and logged as an error
            if self.loop is not None and self.loop.metrics is not None:
                self.loop.metrics.refused(request.trace_id, f"{refusal[0].name}: {refusal[1]}")
            await context.abort(*refusal)
        stream = self._new_stream()
        stream.input_done = True
        timeouts = [t for t in (check_deadline_ms(request.deadline_ms), context.time_remaining()) if t is not None]
        self._unary[cid] = stream
        try:
            self._start(stream, UNARY_PREFIX, request, min(timeouts) if timeouts else None)
            async for updates in self._frames(stream):
                for update in updates:
                    if update.finish_reason == pb.FINISH_REASON_ERROR:
                        await context.abort(STATUS_BY_CODE[update.status.code], update.status.message)
                    yield update
        finally:
            stream.abort_all(self.shutdown_error)
            self._streams.discard(stream)
            self._unary.pop(cid, None)

    async def Abort(self, request, context):
        stream = self._unary.get(request.request_id)
        return pb.AbortResponse(found=stream is not None and stream.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        unavailable = self._unavailable()
        if unavailable is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, unavailable)
        info = self.model_info
        return pb.ModelInfo(model_name=str(info["model_name"]), vocab_size=info["vocab_size"],
                            eos_token_ids=list(info["eos_token_ids"]), max_model_len=info["max_model_len"],
                            block_size=info["block_size"], heartbeat_ms=round(HEARTBEAT_S * 1000),
                            features=ENGINE_FEATURES + (("json_object", "json_schema") if info.get("json_object") else ()))

    async def GetLoad(self, request, context):
        if self.loop is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine service is still loading the model")
        return load_from_stats(self.loop.stats, self.loop.num_live)


def load_from_stats(stats: dict[str, int], num_live: int) -> pb.Load:
    """The Load message from engine.stats(): free blocks include the cached ones, used are the rest."""
    total = int(stats.get("num_blocks", 0))
    free = int(stats.get("num_free_blocks", 0))
    cached = int(stats.get("num_cached_blocks", 0))
    queries = int(stats.get("prefix_cache_queries", 0))
    return pb.Load(
        num_running=int(stats.get("num_running", 0)), num_waiting=int(stats.get("num_waiting", 0)),
        num_kv_blocks_total=total, num_kv_blocks_used=max(0, total - free), num_kv_blocks_free=free,
        num_kv_blocks_cached=cached,
        prefix_cache_hit_rate=int(stats.get("prefix_cache_hits", 0)) / queries if queries else 0.0,
        num_preemptions=int(stats.get("num_preemptions", 0)), num_live_requests=num_live,
    )
