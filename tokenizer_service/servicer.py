"""The TextGeneration servicer: text in, tokens to the engines, text deltas back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from clients.cpus import available_cpus
from clients.requests import OPTIONS_HEADER
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
from tokenizer_service.engine_pool import FORWARDED_FEATURES, EnginePool, RequestFailed, RequestHandle
from tokenizer_service.metrics import (
    REQUEST_ID_HEADER,
    RequestTrace,
    TextMetrics,
    multi_request_id,
    request_id_from,
)
from tokenizer_service.text_stream import TextStream
from tokenizer_service.validation import (
    PreparedRequest,
    TextLimits,
    check_request,
    tokenize_input,
    tokenize_request,
    validate_detokenize_ids,
)

log = logging.getLogger(__name__)
STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
FINISH = {engine_pb.FINISH_REASON_STOP: pb.FINISH_REASON_STOP, engine_pb.FINISH_REASON_LENGTH: pb.FINISH_REASON_LENGTH,
          engine_pb.FINISH_REASON_ABORT: pb.FINISH_REASON_ABORT}
# A GenerateMulti request_id's bound (the engine's for its own ids): the id is echoed in every response. Not
# metrics.MAX_REQUEST_ID_CHARS, the log lines' cut.
MAX_MULTI_REQUEST_ID_CHARS = 256
MAX_ATTEMPTS = 3  # a request that never got a token may move to another engine this many times in all
# The request options this service applies itself, whatever its engines; ModelInfo.features lists them beside the
# engines' (a service that predates one drops it without a word).
OWN_FEATURES = ("n", "tools", "template_kwargs", "enable_thinking", "add_special_tokens", "continue_final_message")
# Every option it honours, itself or through its engines (refused with FAILED_PRECONDITION where no engine
# applies it), in OPTIONS_HEADER with its responses: the clients check their requests' options against it.
OPTIONS = ((OPTIONS_HEADER, ",".join((*OWN_FEATURES, *FORWARDED_FEATURES))),)
# Generate inputs larger than this are tokenized off the event loop: inline, 8 KiB of prompt holds every stream of
# the replica about 3.5 ms (16 KiB 6.7 ms, 64 KiB 24 ms on the 2-core dev machine), the hop to a worker thread about
# 0.1 ms. Tokenize and Detokenize calls leave it past OFFLOAD_API_BYTES: they share one worker slot (API_SLOTS), where
# one of 10 KiB would wait behind an 8 MiB call's 5 s.
OFFLOAD_TOKENIZE_BYTES = 8 * 1024
OFFLOAD_API_BYTES = 64 * 1024
# Chats with more messages than this are rendered off the event loop too: a template's cost is per message
# (4,096 one-word turns are 59 KB on the wire and took 147 ms to render).
OFFLOAD_CHAT_MESSAGES = 64
# Stop strings longer than this in all get their matcher built off the event loop (linear, but Python).
OFFLOAD_STOP_CHARS = 4096
# Prompt logprobs (entries, alternatives included) past which their messages are built off the event loop.
OFFLOAD_PROMPT_LOGPROBS = 8192
# Prompt logprobs in one message: clients with gRPC's default 4 MB receive limit read any prompt's.
PROMPT_LOGPROBS_PER_MESSAGE = 1024
# Heavy work on worker threads at once; the others wait for a slot. Two pools, so that neither kind waits behind
# the other: a Tokenize or Detokenize of 8 MiB (no max_model_len bounds it) runs 5 s and holds about 1.4 GB, so
# one at a time keeps the service's memory at that of one such call; preparing a Generate is bounded by
# max_model_len (a longer prompt is refused from a head of it), so a few may run together.
# No more than the CPUs the process may use (its affinity, capped by a pod's CPU limit): they share them and the GIL.
PREPARE_SLOTS = max(1, min(4, available_cpus()))
API_SLOTS = 1
# A cancel this close to the request's deadline is the deadline: the client's timer fires a few milliseconds
# before this service's, and the request counts as an error (DEADLINE_EXCEEDED), not as cancelled.
DEADLINE_SLACK_S = 0.05
# Responses a GenerateMulti call queues for its reader; past it, its requests wait to queue theirs (backpressure).
MULTI_QUEUED_RESPONSES = 1024


def internal_error(exc: BaseException) -> str:
    """The message of an INTERNAL status for an unexpected failure: its type and text, for the caller and the log."""
    return f"internal error: {type(exc).__name__}: {exc}"


def _heavy(request, max_bytes: int = OFFLOAD_TOKENIZE_BYTES) -> bool:
    """Whether preparing this request (or running Tokenize / Detokenize on it, with max_bytes OFFLOAD_API_BYTES)
    should leave the event loop."""
    if request.ByteSize() > max_bytes:
        return True
    chat = getattr(request, "chat", None)
    return chat is not None and request.HasField("chat") and len(chat.messages) > OFFLOAD_CHAT_MESSAGES


def _choice_request(prep: PreparedRequest, index: int) -> engine_pb.NewRequest:
    """Completion `index`'s engine request: with a seed, seed + index (modulo 2**63: engines take seeds in
    [0, 2**63)), so that each completion equals a request with that seed; prompt logprobs asked of the first only
    (they are the same). A negative seed is left for the engine to refuse, naming it."""
    request = engine_pb.NewRequest()
    request.CopyFrom(prep.engine_request)
    params = request.sampling_params
    if index:
        if params.HasField("seed") and params.seed >= 0:
            params.seed = (params.seed + index) % 2**63
        params.ClearField("prompt_logprobs")
    return request


class _Placement:
    """Where an n > 1 request's completions go: the engine the first was sent to (or the one that took over from it
    when it was lost, or full, before the first token), and the lock under which they choose, one at a time."""

    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn = None
        self.lock = asyncio.Lock()


def take_held(trace: RequestTrace, index: int = 0) -> list[pb.GenerateResponse]:
    """The message --stream-interval still holds back for a completion (index: its index), with the text its
    TextStream still holds (an incomplete character, a possible stop-string prefix), if any, emptied from its trace:
    the caller ends the request early (an error, an abort) and sends it first."""
    tail = trace.text.finish() if trace.text is not None else ""
    trace.text = None
    if trace.held is None and not tail:
        return []
    (text, ids, logprobs), trace.held = trace.held or ("", [], []), None
    return [pb.GenerateResponse(text=text + tail, token_ids=ids, logprobs=logprobs, index=index)]


def _deadline_ended(trace: RequestTrace, deadline: float | None, message: str) -> None:
    """Count a request cancelled within DEADLINE_SLACK_S of its deadline (time.monotonic()) as that deadline's
    error, with `message`: the client's own timer fires a few milliseconds before this service's."""
    if trace.finish_reason == "cancelled" and deadline is not None \
            and time.monotonic() >= deadline - DEADLINE_SLACK_S:
        trace.finish_reason, trace.error = "error", f"DEADLINE_EXCEEDED: {message}"


def _after_attempts(exc: RequestFailed, sent_to: list[str]) -> RequestFailed:
    """The last engine's failure of a request that was sent again, saying so: the caller saw only the last one's
    words, which read as if one engine had failed it. sent_to: the engines it went to, in order."""
    return RequestFailed(exc.code, f"{exc.message} (from {sent_to[-1]}, the last of {len(sent_to)} attempts before "
                                   f"any token, on {', '.join(sent_to)})", retryable=exc.retryable)


def _sum_parts(trace: RequestTrace, parts: list[RequestTrace]) -> None:
    """A request's counts from its completions' (n > 1): the prompt once (its tokens, and the most any completion
    found cached), the generated tokens added up, its first token the earliest."""
    trace.completion_tokens = sum(part.completion_tokens for part in parts)
    trace.cached_tokens = max(part.cached_tokens for part in parts)  # of the one prompt, as prompt_tokens
    trace.detokenize_s = sum(part.detokenize_s for part in parts)
    trace.first_token = min((part.first_token for part in parts if part.first_token), default=0.0)
    trace.engine = ",".join(sorted({part.engine for part in parts if part.engine}))
    trace.retries = sum(part.retries for part in parts)


def _decide_from_parts(trace: RequestTrace, parts: list[RequestTrace]) -> None:
    """An n > 1 request's finish reason from its completions', unless an error or an abort decided it: cancelled,
    error or length where one of them ended so (in that order), else stop."""
    if trace.finish_reason == "cancelled":
        reasons = {part.finish_reason for part in parts}
        trace.finish_reason = next((r for r in ("cancelled", "error", "length") if r in reasons), "stop")
        trace.error = next((part.error for part in parts if part.error), "")


class TextServicer(pb_grpc.TextGenerationServicer):
    """Generate, GenerateMulti, Tokenize, Detokenize and GetModelInfo over an EnginePool."""

    def __init__(self, tokenizer: Any, pool: EnginePool, model_name: str, vocab_size: int,
                 eos_token_ids: set[int], generation_defaults: dict[str, object], max_inflight: int,
                 metrics: TextMetrics | None = None, refused_chat_texts: tuple[str, ...] = (),
                 max_message_bytes: int = 64 * 2**20, stream_interval: int = 1,
                 stream_max_wait_s: float = 0.5, refused_markup_texts: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.pool = tokenizer, pool
        self.stream_interval = stream_interval  # tokens a message after the first (TextServerConfig.stream_interval)
        self.stream_max_wait_s = stream_max_wait_s  # how long held text may wait (TextServerConfig), 0: no limit
        # An engine update's prompt logprobs may take a quarter of a message, as the engine's own rule says.
        self.limits = TextLimits(vocab_size=vocab_size, refused_chat_texts=refused_chat_texts,
                                 refused_markup_texts=refused_markup_texts,
                                 max_prompt_logprobs_bytes=max_message_bytes // 4)
        self.model_name, self.vocab_size, self.eos_token_ids = model_name, vocab_size, eos_token_ids
        self.defaults = generation_defaults
        self.max_inflight = max_inflight
        self.inflight = 0
        self.admitting = 0  # requests being tokenized on a worker thread: they count against max_inflight too
        self.draining = False
        self.num_calls = 0  # Generate / GenerateMulti calls in progress
        self._multi_wakes: set[asyncio.Event] = set()
        self._prepare_slots = asyncio.Semaphore(PREPARE_SLOTS)  # see _start_heavy
        self._api_slots = asyncio.Semaphore(API_SLOTS)
        self.metrics = metrics or TextMetrics(model_name)
        self._token_texts: dict[int, str] = {}  # id -> the token alone, decoded (for logprobs); at most the vocabulary

    def begin_drain(self) -> None:
        self.draining = True
        for wake in self._multi_wakes:
            wake.set()

    async def _admit_by_deadline(self, request: pb.GenerateRequest, trace: RequestTrace,
                                 call_timeout_s: float | None = None) -> tuple[PreparedRequest, float | None]:
        """_admit, within the request's deadline: the earlier of its deadline_ms (counted from now, tokenizing
        included) and call_timeout_s (Generate's call deadline, which gRPC itself enforces); with what is left
        of it once admitted (None: no deadline)."""
        arrived = time.monotonic()
        own = request.deadline_ms / 1000 if request.deadline_ms else None
        try:
            async with asyncio.timeout(own):
                prep = await self._admit(request, trace)
        except TimeoutError:
            trace.finish_reason = "error"
            message = f"the request's deadline_ms ({own:.3f}s) passed while it waited to be tokenized"
            trace.error = f"DEADLINE_EXCEEDED: {message}"
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None
        except asyncio.CancelledError:  # the client's, also one in the loop turn the deadline fired (it wins)
            if own is not None:
                _deadline_ended(trace, arrived + own,
                                f"the request's deadline_ms ({own:.3f}s) passed while it waited to be tokenized")
            raise
        left = [t for t in (own, call_timeout_s) if t is not None]
        return prep, (min(left) - (time.monotonic() - arrived) if left else None)

    async def _admit(self, request: pb.GenerateRequest, trace: RequestTrace) -> PreparedRequest:
        """Validate and tokenize a new request, or refuse it (RequestFailed), which counts and logs it as an error:
        overload and bad input are what an operator most needs to see."""
        try:
            return await self._prepare(request)
        except RequestFailed as exc:
            trace.finish_reason, trace.error = "error", f"{exc.code.name}: {exc.message}"
            self.metrics.finish(trace)
            raise

    async def _prepare(self, request: pb.GenerateRequest) -> PreparedRequest:
        """Refuse (RequestFailed) or validate and tokenize a new request.

        A large input is tokenized on a worker thread (_start_heavy), so that one big prompt does not stall every
        other stream this replica serves; small ones are cheaper inline than a thread hop.
        """
        if self.draining:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the tokenizer service is draining; retry elsewhere")
        # The fields' rules first, before the queue's: a request no load would let through (an n out of range, a
        # response_format without its schema) is INVALID_ARGUMENT, not "retry later". They read no text, so they
        # cost little next to tokenizing; the texts' rules run with the tokenizing (tokenize_request). Each of a
        # request's n completions takes a place once it is sent.
        try:
            places = check_request(request, self.limits)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if places > self.max_inflight:  # it would never be admitted: not a matter of retrying later
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"n: {places} completions take {places} places, more than this service's max_inflight "
                                f"{self.max_inflight}; ask for at most {self.max_inflight}")
        if self.inflight + self.admitting + places > self.max_inflight:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the tokenizer service's queue is full: {self.inflight + self.admitting} requests "
                                f"in flight (max_inflight {self.max_inflight}"
                                f"{f', and this one has n={places} completions' if places > 1 else ''}); retry later")
        self.admitting += places  # each completion's place, held from here until it is sent and counted in inflight
        held = False  # a worker thread left running by a cancelled call keeps its place until it returns
        try:
            args = (request, self.tokenizer, self.defaults, self.pool.max_model_len, self.limits)
            if _heavy(request):
                work = await self._start_heavy(self._prepare_slots, self._timed_prepare, *args)
                try:
                    prep = await asyncio.shield(work)
                except asyncio.CancelledError:
                    held = True
                    work.add_done_callback(functools.partial(self._release_admitting, places))
                    raise
            else:
                prep = self._timed_prepare(*args)
        except Exception as exc:  # a bug, or a chat template failing in Python: the request fails visibly
            log.exception("preparing a request failed")
            raise RequestFailed(grpc.StatusCode.INTERNAL, internal_error(exc)) from exc
        finally:
            if not held:
                self.admitting -= places
        if isinstance(prep, str):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, prep)
        return prep  # the caller's _generate counts it in `inflight` before it next awaits

    def _timed_prepare(self, *args) -> PreparedRequest | str:
        """tokenize_request(*args), or the message of its refusal; its time is observed as tokenize_time either way.

        A refusal comes back as text, not as the ValueError: that one's traceback holds the frames that hold the
        refused prompt's ids (millions for a long prompt), and whatever keeps the exception (a future keeps its
        traceback; grpc's abort makes a reference cycle) would keep them until a full garbage collection.
        """
        started = time.perf_counter()
        try:
            return tokenize_request(*args)
        except ValueError as exc:
            return str(exc)
        finally:
            self.metrics.tokenize_time.observe(time.perf_counter() - started)

    async def _start_heavy(self, slots: asyncio.Semaphore, fn, *args, **kwargs) -> asyncio.Future:
        """fn(*args, **kwargs) started on a worker thread once one of `slots` is free; its future.

        The slot is held until the thread returns, also when its caller stops waiting (a thread cannot be
        stopped); a caller cancelled while it waits for a slot starts nothing.
        """
        await slots.acquire()
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))

        def release(done: asyncio.Future) -> None:
            slots.release()
            if not done.cancelled():
                done.exception()  # retrieved: a failure whose caller has gone is not an error to log

        work.add_done_callback(release)
        return work

    def _release_admitting(self, places: int, work: asyncio.Future) -> None:
        self.admitting -= places

    def _generate(self, prep: PreparedRequest, timeout_s: float | None,
                  trace: RequestTrace) -> AsyncIterator[pb.GenerateResponse]:
        """The responses of one request (of its n completions, each message with its index); raises RequestFailed."""
        if prep.n == 1:
            return self._generate_one(prep, prep.engine_request, timeout_s, trace)
        return self._generate_n(prep, timeout_s, trace)

    async def _generate_n(self, prep: PreparedRequest, timeout_s: float | None,
                          trace: RequestTrace) -> AsyncIterator[pb.GenerateResponse]:
        """n completions of one prompt, each an engine request of its own streamed by a task into one bounded queue
        (a slow reader fills it, then the engines' per-request buffers, which fail the request as for n = 1).

        The first to be sent picks the engine and the others follow it there, so that they find the prompt in its
        prefix cache. The first error ends them all; `trace` sums their counts, kept current for an abort's usage.
        A GenerateMulti abort takes what they produced that was not yielded yet from trace.unsent.
        """
        n = prep.n
        self.inflight += n  # before the next await, as _generate_one does; each task gives its place back when done
        trace.prompt_tokens = prep.num_prompt_tokens  # kept current: an abort reports them at once
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        # Each completion keeps its own counts; they are added up into `trace`, the request's one log line (the
        # completions' traces are never logged: finish() skips a trace already marked logged).
        parts = [RequestTrace(trace.request_id, start=trace.start, logged=True) for _ in range(n)]
        placement = _Placement()  # the engine the first completion was sent to
        queue: asyncio.Queue = asyncio.Queue(maxsize=16 * n)  # responses; an int i: completion i's stream ended
        putting: list[pb.GenerateResponse | None] = [None] * n  # each completion's response waiting for room in it
        taken: collections.deque[pb.GenerateResponse] = collections.deque()  # out of the completions, not yielded

        async def pump(i: int) -> None:
            try:
                async with contextlib.aclosing(self._generate_one(prep, _choice_request(prep, i), timeout_s, parts[i],
                                                                  placement, counted=True)) as responses:
                    async for response in responses:
                        response.index = i
                        putting[i] = response  # until it is in the queue: stop() takes it if the task stops first
                        await queue.put(response)
                        putting[i] = None
                await queue.put(i)
            except RequestFailed as exc:
                await queue.put(exc)
            except Exception as exc:  # a bug must fail the request, not leave the reader waiting for this one
                log.exception("completion %d of request %s failed", i, trace.request_id)
                await queue.put(RequestFailed(grpc.StatusCode.INTERNAL, internal_error(exc)))

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        held = set(tasks)  # tasks whose place in `inflight` is not yet given back

        def release(task: asyncio.Task) -> None:
            if task in held:
                held.discard(task)
                self.inflight -= 1

        for task in tasks:  # a task cancelled before it ran never reaches its own finally: this runs either way
            task.add_done_callback(release)
        open_ = set(range(n))  # completions whose last message has not been yielded, nor their stream ended

        def halt() -> None:
            for task in tasks:
                task.cancel()  # each one's _generate_one closes its engine request
                # ... a loop turn or two from now: its place is given back at once, so that a request admitted in
                # the meantime (GenerateMulti: an abort, then a new request) does not find it still taken
                release(task)

        def stop() -> None:
            """Stop the completions and move into `taken` what they produced that was not yielded, each one's in
            the order it came: its queued responses, the one its task waited to queue, then what --stream-interval
            held back (once their tasks are cancelled, none of it moves). If that holds the last message of every
            open completion, the request has ended: its finish reason is decided."""
            halt()
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, pb.GenerateResponse):
                    taken.append(item)
            taken.extend(response for response in putting if response is not None)
            putting[:] = [None] * n
            for i, part in enumerate(parts):
                taken.extend(take_held(part, i))
            _sum_parts(trace, parts)
            if not open_ - {response.index for response in taken if response.finish_reason}:
                _decide_from_parts(trace, parts)

        def unsent() -> list[pb.GenerateResponse]:
            stop()
            responses = list(taken)
            taken.clear()
            return responses

        trace.unsent = unsent
        try:
            while open_:
                item = await queue.get()
                if isinstance(item, int):
                    open_.discard(item)
                    continue
                if isinstance(item, RequestFailed):
                    # What the others generated before it still reaches the caller, as with one completion.
                    stop()
                    while taken:
                        yield taken.popleft()
                    raise item
                _sum_parts(trace, parts)
                if item.finish_reason:
                    # Its last message. The request ends with the last of these, in the same loop turn, not when
                    # that completion's task next runs (a full queue can hold it): GenerateMulti keeps the id live
                    # until then, and an abort of it in between finds it ended (no ABORT after the last message).
                    open_.discard(item.index)
                    if not open_:
                        _decide_from_parts(trace, parts)
                yield item
        except RequestFailed as exc:
            trace.finish_reason, trace.error = "error", f"{exc.code.name}: {exc.message}"
            raise
        finally:
            trace.unsent = None
            halt()
            _sum_parts(trace, parts)
            _decide_from_parts(trace, parts)
            _deadline_ended(trace, deadline, "the request's deadline passed")

    async def _generate_one(self, prep: PreparedRequest, engine_request: engine_pb.NewRequest,
                            timeout_s: float | None, trace: RequestTrace, placement: _Placement | None = None,
                            counted: bool = False) -> AsyncIterator[pb.GenerateResponse]:
        """The responses of one engine request; raises RequestFailed. Retries elsewhere only before the first token.

        The deadline is fixed once, here: each attempt sends the engine what is left of it (deadline_ms, set by
        pool.submit), and the engine fails the request with DEADLINE_EXCEEDED; so does a retry once it has passed.
        placement (n > 1): with no engine yet, this request's first engine is put in it; else the engine to prefer
        (moved to this one's new engine when it was lost under it). counted: its place in `inflight` is the caller's.
        """
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        text: TextStream | None = None
        handle: RequestHandle | None = None
        sent_tokens, cached = False, 0
        # After the first tokens' message, text waits in trace.held until stream_interval tokens have come, an update
        # comes stream_max_wait_s or more after its oldest token (max_wait 0: no limit), or the request ends; interval
        # 1 sends every update as it comes.
        interval, max_wait, sent_first = self.stream_interval, self.stream_max_wait_s, False
        held_since = 0.0  # when the oldest token in trace.held came
        retry_reason = ""  # why the last engine did not serve it, until it is sent again
        tried: set = set()  # engines this request was sent to: a retry prefers the others
        sent_to: list[str] = []  # their addresses, one per attempt in order (an engine may take it twice)

        def sent_again(exc: RequestFailed) -> bool:  # nothing reached the caller yet, and attempts are left
            return exc.retryable and not sent_tokens and len(sent_to) < MAX_ATTEMPTS

        wants_logprobs = engine_request.sampling_params.HasField("logprobs")
        owed_prompt_logprobs = engine_request.sampling_params.HasField("prompt_logprobs")
        if not counted:
            self.inflight += 1  # before the next await: admitting and inflight together bound max_inflight
        try:
            text_args = (self.tokenizer, prep.stop, prep.skip_special_tokens, prep.include_stop_str_in_output,
                         prep.engine_request.sampling_params.min_tokens, prep.prompt_tail)
            trace.prompt_tokens = prep.num_prompt_tokens  # kept current: an in-band abort reports them at once
            if sum(map(len, prep.stop)) > OFFLOAD_STOP_CHARS:
                text = await asyncio.to_thread(TextStream, *text_args)
            else:
                text = TextStream(*text_args)
            trace.text = text
            while True:
                request = engine_pb.NewRequest()
                request.CopyFrom(engine_request)
                request.trace_id = trace.request_id
                # n > 1: the completions choose one at a time, each once the one before it was placed. The engine to
                # follow was read before submit waited for a ready one: completions sent while no engine was ready
                # (start-up, every engine reconnecting) spread over the engines that came back.
                async with placement.lock if placement is not None else contextlib.nullcontext():
                    left = None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, (
                                f"the request's deadline ({timeout_s:.3f}s) passed after {len(sent_to)} attempt(s) "
                                "on engines that were lost before the first token") if sent_to else
                                "the request's deadline passed before it was sent to an engine")
                    prefer = placement.conn if placement is not None else None
                    handle = await self.pool.submit(request, left, avoid=tried, prefer=prefer)  # sets deadline_ms
                    if placement is not None:  # the first engine, or the one taking over from a lost or full one
                        placement.conn = handle.conn
                if retry_reason:  # counted once sent again (a retry that found no engine is the request's error)
                    self.metrics.retried(trace, retry_reason)
                    retry_reason = ""
                tried.add(handle.conn)
                sent_to.append(handle.conn.address)
                # Kept current, as its counts are: an n > 1 request stopped early (an abort, a cancel, a deadline)
                # sums its completions' before their tasks reach the finally below.
                trace.engine = handle.conn.address
                try:
                    async for update in handle:
                        failed = None
                        if update.finish_reason == engine_pb.FINISH_REASON_ERROR:
                            code = STATUS_BY_CODE.get(update.status.code, grpc.StatusCode.INTERNAL)
                            # UNAVAILABLE: draining or failed (the pool no longer sends it requests); before any
                            # token, RESOURCE_EXHAUSTED: its queue is full (another engine may have room).
                            failed = RequestFailed(code, update.status.message, retryable=code == grpc.StatusCode.UNAVAILABLE
                                                   or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and not handle.got_tokens))
                            # Tokens the engine made before the failure can come in the failing update itself (its
                            # step failed before the update was sent): they are relayed first, as held text is, unless
                            # the request is to be sent again (nothing reached the caller yet).
                            if not update.new_token_ids or sent_again(failed):
                                raise failed
                        trace.cached_tokens = cached = update.num_cached_tokens or cached
                        ids = list(update.new_token_ids)
                        logprobs = self._logprobs(update, handle) if wants_logprobs else ()
                        if owed_prompt_logprobs and ids:  # they come with the first token
                            owed_prompt_logprobs, sent_tokens = False, True
                            for response in await self._prompt_logprobs(prep, update, handle):
                                yield response
                        fed = time.monotonic()
                        delta = text.feed(ids, hide_last=self._ends_on_stop_id(prep, update, ids))
                        if text.stop_ids is not None:  # ids past the stop string's: neither sent nor counted
                            ids, logprobs = ids[: text.stop_ids], logprobs[: text.stop_ids]
                        trace.detokenize_s += time.monotonic() - fed
                        trace.completion_tokens = text.num_generated
                        trace.first_token = trace.first_token or (fed if ids else 0.0)
                        if trace.held is not None:
                            (held_text, held_ids, held_logprobs), trace.held = trace.held, None
                            delta, ids, logprobs = held_text + delta, held_ids + ids, [*held_logprobs, *logprobs]
                        else:
                            held_since = fed  # what this update brings is the oldest, if it is held
                        if text.stopped is not None:
                            handle.close(stopped=True)  # in-band abort: the engine frees the blocks at once
                            trace.finish_reason = "stop"
                            yield self._last(prep, text, delta, ids, logprobs, pb.FINISH_REASON_STOP, cached)
                            return
                        if failed is not None:  # after its tokens: take_held sends them on the way out
                            trace.held = (delta, ids, logprobs)
                            raise failed
                        if update.finish_reason:
                            reason = FINISH.get(update.finish_reason, pb.FINISH_REASON_STOP)
                            delta += text.finish()  # held-back bytes can complete a stop string even now
                            if text.stopped is not None:
                                reason = pb.FINISH_REASON_STOP
                            trace.finish_reason = pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
                            yield self._last(prep, text, delta, ids, logprobs, reason, cached)
                            return
                        if ids or delta:
                            sent_tokens = True
                            if interval > 1 and sent_first and len(ids) < interval \
                                    and (not max_wait or fed - held_since < max_wait):  # wait for more
                                trace.held = (delta, ids, logprobs)
                                continue
                            sent_first = True
                            yield pb.GenerateResponse(text=delta, token_ids=ids, logprobs=logprobs)
                    raise RequestFailed(grpc.StatusCode.INTERNAL, "the engine ended the request without a finish")
                except RequestFailed as exc:
                    if not sent_again(exc):
                        for response in take_held(trace):  # what came before the failure still reaches the caller
                            yield response
                        if exc.retryable and not sent_tokens and len(sent_to) > 1:
                            raise _after_attempts(exc, sent_to) from None
                        raise
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not self.pool.can_try_another(
                            tried, engine_request.sampling_params):
                        # every engine that could take it was tried: full everywhere
                        raise (_after_attempts(exc, sent_to) if len(sent_to) > 1 else exc) from None
                    handle.close()  # a no-op for the pool's handles, which ended with the failure
                    retry_reason = exc.code.name.lower()
        except RequestFailed as exc:
            trace.finish_reason, trace.error = "error", f"{exc.code.name}: {exc.message}"
            raise
        finally:
            if not counted:
                self.inflight -= 1
            if handle is not None:
                handle.close()
            trace.engine = handle.conn.address if handle is not None else ""  # its token counts are kept current
            # gRPC's cancellation of a call past its deadline can come before the engine's DEADLINE_EXCEEDED
            _deadline_ended(trace, deadline, "the request's deadline passed")
            self.metrics.finish(trace)

    def _ends_on_stop_id(self, prep: PreparedRequest, update: engine_pb.RequestUpdate, ids: list[int]) -> bool:
        """Whether the update's last id is the EOS or stop token id that finished the request: its text (</s> with
        skip_special_tokens off, a stop token's word) is left out, as a stop string's is, unless
        include_stop_str_in_output."""
        if update.finish_reason != engine_pb.FINISH_REASON_STOP or not ids or prep.include_stop_str_in_output:
            return False
        params = prep.engine_request.sampling_params
        return ids[-1] in params.stop_token_ids or (not params.ignore_eos and ids[-1] in self.eos_token_ids)

    def _last(self, prep: PreparedRequest, text: TextStream, delta: str, ids: list[int], logprobs, reason: int,
              cached: int) -> pb.GenerateResponse:
        usage = pb.Usage(prompt_tokens=prep.num_prompt_tokens, completion_tokens=text.num_generated,
                         cached_tokens=cached)
        return pb.GenerateResponse(text=delta, token_ids=ids, logprobs=logprobs, finish_reason=reason, usage=usage,
                                   stop_reason=text.stopped or "")

    def _logprobs(self, update: engine_pb.RequestUpdate, handle: RequestHandle) -> list[pb.TokenLogprobs]:
        """The text API's logprobs of an engine update, one per token id; RequestFailed when the engine sent none
        (one that predates them ignores the field)."""
        if len(update.logprobs) != len(update.new_token_ids):
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the engine at {handle.conn.address} returned {len(update.logprobs)} logprobs for "
                                f"{len(update.new_token_ids)} tokens: it predates logprobs; upgrade it, or send the "
                                "request without logprobs")
        return self._text_logprobs(update.new_token_ids, update.logprobs)

    def _text_logprobs(self, token_ids, engine_logprobs) -> list[pb.TokenLogprobs]:
        """The text API's TokenLogprobs of the engine's, one per token id, with each token's text."""
        text = self._token_text
        return [pb.TokenLogprobs(token_id=t, token=text(t), logprob=lp.logprob,
                                 top=[pb.TopLogprob(token_id=i, token=text(i), logprob=v)
                                      for i, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)])
                for t, lp in zip(token_ids, engine_logprobs, strict=True)]

    async def _prompt_logprobs(self, prep: PreparedRequest, update: engine_pb.RequestUpdate,
                               handle: RequestHandle) -> list[pb.GenerateResponse]:
        """The messages carrying an engine update's prompt logprobs (PROMPT_LOGPROBS_PER_MESSAGE in each), built on a
        worker thread when large; RequestFailed when the engine sent too few (one that predates them)."""
        prompt = prep.engine_request.prompt_token_ids
        got = update.prompt_logprobs
        if len(got) != len(prompt) - 1:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the engine at {handle.conn.address} returned {len(got)} prompt logprobs for a "
                                f"{len(prompt)}-token prompt: it predates prompt logprobs; upgrade it, or send the "
                                "request without prompt_logprobs")

        def build() -> list[pb.GenerateResponse]:
            entries = self._text_logprobs(prompt[1:], got)
            step = PROMPT_LOGPROBS_PER_MESSAGE
            return [pb.GenerateResponse(prompt_logprobs=entries[i : i + step]) for i in range(0, len(entries), step)]

        if len(got) * (1 + prep.engine_request.sampling_params.prompt_logprobs) > OFFLOAD_PROMPT_LOGPROBS:
            return await asyncio.to_thread(build)
        return build()

    def _token_text(self, token_id: int) -> str:
        """A token alone, decoded with its special tokens' text; cached (ids are the engine's, in the vocabulary)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    async def Generate(self, request, context):
        self.num_calls += 1
        trace = RequestTrace(request_id_from(context.invocation_metadata(), request.request_id))
        id_header = ((REQUEST_ID_HEADER, trace.request_id),)
        context.set_trailing_metadata(id_header)  # for a call that fails before any response (it sends no headers)
        headers = (*id_header, *OPTIONS)
        try:
            prep, timeout_s = await self._admit_by_deadline(request, trace, context.time_remaining())
            # No await from here until _generate counts the request in inflight (admission's check relies on it).
            headers_sent = False
            async for response in self._generate(prep, timeout_s, trace):
                if not headers_sent:
                    # In the headers too, with the first response, so that a client reads the id before it reads
                    # the stream. Not sooner: headers commit a call, and a failure before any response (refused
                    # at admission, no engine, every engine full) must stay retryable by a client's retry policy.
                    headers_sent = True
                    await context.send_initial_metadata(headers)
                yield response
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)
        except Exception as exc:  # a bug: INTERNAL naming it, logged and counted, as GenerateMulti fails a request
            log.exception("request %s failed", trace.request_id)
            message = internal_error(exc)
            trace.finish_reason, trace.error = "error", f"INTERNAL: {message}"
            await context.abort(grpc.StatusCode.INTERNAL, message)
        finally:
            self.num_calls -= 1
            if trace.finish_reason == "cancelled" and context.time_remaining() is not None \
                    and context.time_remaining() <= DEADLINE_SLACK_S:  # the client's deadline, not the client, ended it
                trace.finish_reason, trace.error = "error", "DEADLINE_EXCEEDED: the call's deadline passed"
            self.metrics.finish(trace)  # once per trace: counts a call cancelled while it was being tokenized

    async def GenerateMulti(self, request_iterator, context):
        out: asyncio.Queue[pb.GenerateResponse] = asyncio.Queue(maxsize=MULTI_QUEUED_RESPONSES)  # bounded: backpressure
        tasks: dict[str, tuple[asyncio.Task, RequestTrace]] = {}  # live requests by the client's id
        waiting: dict[asyncio.Task, pb.GenerateResponse] = {}  # the response a request's task waits to queue
        wake = asyncio.Event()
        input_done = False
        reader_queueing = 0  # the reader's responses (an abort's last messages, a refusal) waiting for room
        call_id = request_id_from(context.invocation_metadata(), uuid.uuid4().hex[:16])
        read_error, read_code = "", grpc.StatusCode.INVALID_ARGUMENT

        async def emit(response: pb.GenerateResponse, task: asyncio.Task | None = None) -> None:
            """Queue a response for the call, waiting while the queue is full (backpressure). task: the request's
            own, whose abort meanwhile cancels the wait and sends the response itself; None: the reader's."""
            nonlocal reader_queueing
            if task is not None:
                waiting[task] = response
            else:
                reader_queueing += 1
            try:
                await out.put(response)
            finally:
                if task is None:
                    reader_queueing -= 1
            waiting.pop(task, None)
            wake.set()

        def usage_so_far(trace: RequestTrace, completion_tokens: int) -> pb.Usage:
            """The usage a request's last message carries when an abort or an error ends it: what this call carried."""
            return pb.Usage(prompt_tokens=trace.prompt_tokens, cached_tokens=trace.cached_tokens,
                            completion_tokens=completion_tokens)

        async def run_one(rid: str, request: pb.GenerateRequest, trace: RequestTrace) -> None:
            me = asyncio.current_task()
            try:
                prep, timeout = await self._admit_by_deadline(request, trace)
                # Closed by this task as a cancel unwinds it, not later by the loop's finalizer: the engine request
                # ends, its place comes back and its line is logged before the task is done.
                async with contextlib.aclosing(self._generate(prep, timeout, trace)) as responses:
                    async for response in responses:
                        response.request_id = rid
                        await emit(response, me)
                        trace.streamed_tokens += len(response.token_ids)  # once it is on the call (an abort's usage)
            except RequestFailed as exc:  # its last message: with the usage of what this call carried for it
                await emit(pb.GenerateResponse(request_id=rid, finish_reason=pb.FINISH_REASON_ERROR,
                                                  status=pb.Status(code=exc.code.value[0], message=exc.message),
                                                  usage=usage_so_far(trace, trace.streamed_tokens)), me)
            except Exception as exc:  # a bug must fail this request visibly, not drop it from the stream
                log.exception("request %s/%s failed", call_id, rid)
                message = internal_error(exc)
                trace.finish_reason, trace.error = "error", f"INTERNAL: {message}"
                await emit(pb.GenerateResponse(request_id=rid, finish_reason=pb.FINISH_REASON_ERROR, status=pb.Status(
                    code=grpc.StatusCode.INTERNAL.value[0], message=message),
                    usage=usage_so_far(trace, trace.streamed_tokens)), me)
            finally:
                waiting.pop(me, None)
                if tasks.get(rid, (None,))[0] is me:  # an aborted id may run a new request
                    del tasks[rid]
                wake.set()

        def aborted(rid: str, task: asyncio.Task, trace: RequestTrace) -> list[pb.GenerateResponse]:
            """An aborted request's last messages (its task just cancelled, so that none of them moves). First what
            it produced that the call does not carry yet, in the order it would have gone out without backpressure
            or --stream-interval: the response its task waited to queue, then what its completions queued or held
            back. Then its ABORT, with the usage of all the call carried for it; none where those already end it
            (it had finished, or failed: the abort came too late, as one after its last message does)."""
            responses = [waiting.pop(task)] if task in waiting else []
            if trace.finish_reason == "cancelled":  # not ended: its last message would have decided the reason
                responses += trace.unsent() if trace.unsent is not None else take_held(trace)
            for response in responses:
                response.request_id = rid
            if trace.finish_reason != "cancelled":
                return responses
            trace.finish_reason = "abort"  # logged and counted as the client asked, not "cancelled"
            streamed = trace.streamed_tokens + sum(len(response.token_ids) for response in responses)
            return [*responses, pb.GenerateResponse(request_id=rid, usage=usage_so_far(trace, streamed),
                                                    finish_reason=pb.FINISH_REASON_ABORT)]

        async def frames():  # the client's messages, until one cannot be read: that one ends the call
            nonlocal read_error
            try:
                async for frame in request_iterator:
                    yield frame
            except Exception as exc:  # noqa: BLE001 -- not a MultiRequest (DecodeError), or the transport failed
                read_error = f"a message on this stream is not a valid MultiRequest ({exc}); its requests were cancelled"

        async def read() -> None:
            nonlocal input_done
            try:
                async for frame in frames():
                    if frame.WhichOneof("kind") == "generate":
                        rid = frame.generate.request_id
                        if not rid or rid in tasks or len(rid) > MAX_MULTI_REQUEST_ID_CHARS:
                            shown = repr(rid) if len(rid) <= MAX_MULTI_REQUEST_ID_CHARS else \
                                f"{rid[:64]!r}... ({len(rid)} characters)"
                            message = (f"request_id {shown} must be non-empty, at most {MAX_MULTI_REQUEST_ID_CHARS} "
                                       "characters and not live")
                            self.metrics.finish(RequestTrace(multi_request_id(call_id, rid or "-"), finish_reason="error",
                                                             error=f"INVALID_ARGUMENT: {message}"))
                            status = pb.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message)
                            await emit(pb.GenerateResponse(request_id=rid, finish_reason=pb.FINISH_REASON_ERROR,
                                                              status=status))
                        else:
                            trace = RequestTrace(multi_request_id(call_id, rid))
                            task = asyncio.create_task(run_one(rid, frame.generate, trace))
                            # An abort in the same loop turn cancels the task before it runs: it still gets
                            # its line and count (finish() is once per trace).
                            task.add_done_callback(lambda _, t=trace: self.metrics.finish(t))
                            tasks[rid] = (task, trace)
                    elif frame.WhichOneof("kind") == "abort_request_id":
                        task, trace = tasks.pop(frame.abort_request_id, (None, None))
                        if task is not None:
                            task.cancel()  # it queues nothing more; closing its generator ends the engine request
                            for response in aborted(frame.abort_request_id, task, trace):
                                await emit(response)
            except Exception as exc:  # a bug applying a message: the call fails visibly, its requests are cancelled
                nonlocal read_error, read_code
                log.exception("call %s: applying a message failed", call_id)
                read_error = f"{internal_error(exc)}; the call's requests were cancelled"
                read_code = grpc.StatusCode.INTERNAL
            finally:
                input_done = True
                wake.set()

        self.num_calls += 1
        self._multi_wakes.add(wake)
        reader = asyncio.create_task(read())
        try:
            # Every producer sets `wake` after it queues a response or ends, so one event wait serves:
            # no task per response.
            headers_sent = False
            while True:
                while not out.empty():
                    if not headers_sent:  # with the first response, as grpc would send empty ones
                        headers_sent = True
                        await context.send_initial_metadata(OPTIONS)
                    yield out.get_nowait()
                # Draining ends the call once no request is live and the reader has queued what it holds: an
                # aborted request is not live, yet its last messages may still wait for room in the reader's hand.
                if read_error or (not tasks and (input_done or (self.draining and not reader_queueing))):
                    break
                wake.clear()
                if out.empty():  # nothing was queued since the check above (no await in between)
                    await wake.wait()
            if read_error:  # later messages are lost: say so rather than end the call OK
                await context.abort(read_code, read_error)
        finally:
            reader.cancel()
            for task, _ in list(tasks.values()):
                task.cancel()
            self._multi_wakes.discard(wake)
            self.num_calls -= 1

    async def _off_loop(self, request, fn, *args, **kwargs):
        """fn(*args, **kwargs), on a worker thread (_start_heavy) when the request is heavy: tokenizing megabytes,
        or rendering thousands of chat turns, inline would stall every stream of this replica (the tokenizer
        releases the GIL while it splits the text, though not while transformers turns millions of ids into a
        list); small requests are cheaper inline than a thread hop."""
        if _heavy(request, OFFLOAD_API_BYTES):
            return await asyncio.shield(await self._start_heavy(self._api_slots, fn, *args, **kwargs))
        return fn(*args, **kwargs)

    async def Tokenize(self, request, context):
        try:
            ids = await self._off_loop(request, tokenize_input, request, self.tokenizer, limits=self.limits)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # as in Generate: INTERNAL naming the failure, not grpc's bare UNKNOWN
            log.exception("Tokenize failed")
            await context.abort(grpc.StatusCode.INTERNAL, internal_error(exc))
        await context.send_initial_metadata(OPTIONS)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request, context):
        limits = self.limits
        if len(request.token_ids) > limits.max_detokenize_ids:  # before copying them out of the message
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: must be at most {limits.max_detokenize_ids} ids; got "
                                f"{len(request.token_ids)}: split the call")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True

        def detokenize() -> str:
            ids = list(request.token_ids)
            validate_detokenize_ids(ids, limits)
            return self.tokenizer.decode(ids, skip_special_tokens=skip)

        try:
            text = await self._off_loop(request, detokenize)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_name=self.model_name, vocab_size=self.vocab_size,
                            eos_token_ids=sorted(self.eos_token_ids), max_model_len=self.pool.max_model_len,
                            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
                            num_engines=len(self.pool.ready), features=[*self.pool.features, *OWN_FEATURES])
