"""The output side of one gRPC call: the requests it carries, coalesced into frames.

Each request's new tokens wait in `pending` until the writer takes them, so all the updates of one engine step
go out as one frame, and a slow client makes the updates grow rather than block the engine. A request whose
pending tokens exceed the per-request bound is failed and aborted: one slow consumer never stalls the others.
Two bounds per call keep a slow or absent reader from hurting the service:
- a frame holds at most `max_frame_bytes` of updates (the rest go in the next frames), so that a backlog never
  makes a message past gRPC's max_message_bytes, which would fail the whole call;
- past MAX_BUFFERED_UPDATES unsent updates, `room` clears and the servicer stops reading the call's frames until
  the writer has sent half of them: HTTP/2 flow control then holds the client back, instead of the engine
  buffering refusals and final updates without end.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from functools import partial

import grpc

from engine_service.outputs import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, StepOutput, TokenLogprobs
from protos.llmserve.engine.v1 import engine_pb2 as pb

MAX_BUFFERED_UPDATES = 8192  # unsent updates of one call before its requests stop being read
# A client's abort or cancel this close to the request's deadline is the deadline: the client's own timer (or its
# caller's) fires a few milliseconds before the engine's, and the request counts as DEADLINE_EXCEEDED, not abort.
DEADLINE_SLACK_S = 0.05
DEADLINE_PASSED = "the request's deadline passed"
DEADLINE_ERROR = f"DEADLINE_EXCEEDED: {DEADLINE_PASSED}"  # as fail() tells the engine

FRAME_OVERHEAD_BYTES = 16  # a repeated field's tag and length, per update in a ServerFrame
# Wire bytes of one buffered token at most: its id (server_config checks max_buffered_tokens of them fit a frame),
# and with logprobs its TokenLogprobs, which grows with the alternatives asked for.
TOKEN_BYTES = 5
LOGPROB_BYTES, LOGPROB_BYTES_PER_ALTERNATIVE = 17, 9


def check_prompt_logprobs_size(num_prompt_tokens: int, k: int, max_bytes: int) -> None:
    """ValueError when a request's prompt logprobs (all in its first update) would take more than max_bytes."""
    size = num_prompt_tokens * (LOGPROB_BYTES + LOGPROB_BYTES_PER_ALTERNATIVE * k)
    if size > max_bytes:
        raise ValueError(f"prompt_logprobs={k} for a {num_prompt_tokens}-token prompt would make one update of up to "
                         f"{size} bytes, over the {max_bytes} this engine allows (a quarter of max_message_bytes): "
                         "ask for fewer alternatives, score a shorter prompt, or raise --max-message-bytes")

def _put_logprobs(repeated, logprobs: list[TokenLogprobs]) -> None:
    """Append TokenLogprobs to an update's repeated TokenLogprobs field."""
    add = repeated.add
    for lp in logprobs:
        add(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)


FINISH_TO_PROTO = {
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_ABORT: pb.FINISH_REASON_ABORT,
}


_byte_size = pb.RequestUpdate.ByteSize


class RequestSink:
    """Routes one request's outputs from the engine loop to its stream."""

    __slots__ = ("stream", "client_id", "on_output")

    def __init__(self, stream: OutputStream, client_id: str) -> None:
        self.stream = stream
        self.client_id = client_id
        # on_output(output) is stream.on_output(client_id, output), without a Python frame of its own: it runs
        # for every request of every step.
        self.on_output: Callable[[StepOutput], None] = partial(stream.on_output, client_id)

    def on_failure(self, code: str, message: str) -> None:
        self.stream.fail(self.client_id, grpc.StatusCode[code], message, abort=False)


class OutputStream:
    """Live requests of one call (keyed by the client's id) and their not-yet-sent updates."""

    def __init__(self, abort_in_engine: Callable[..., None], max_buffered_tokens: int,
                 max_frame_bytes: int = 32 * 2**20) -> None:
        # Called with the engine's request id, and an error message when the service (not the client) ends it.
        self._abort_in_engine = abort_in_engine
        self._max_buffered = max_buffered_tokens
        self._limits: dict[int, int] = {}  # _max_buffered_with, by the number of logprob alternatives
        self._max_frame_bytes = max_frame_bytes
        self.room = asyncio.Event()  # clear while MAX_BUFFERED_UPDATES or more updates wait to be sent
        self.room.set()
        # client id -> (the engine's request id, deadline timer). The engine id is unique per admission, so a
        # client id reused right after an abort can never receive the old request's outputs.
        self.live: dict[str, tuple[str, asyncio.TimerHandle | None]] = {}
        self.pending: dict[str, pb.RequestUpdate] = {}  # live (or just ended) requests' updates, by client id
        # Final updates of ended requests whose client id a new request took before the writer sent them: they
        # go out first, apart, so that two requests' tokens never share one update.
        self.ended: list[pb.RequestUpdate] = []
        self.refused: list[pb.RequestUpdate] = []  # requests that never reached the engine
        self._refused_ids: Counter[str] = Counter()  # the ids in `refused`
        self.wake = asyncio.Event()
        self.input_done = False  # the client half-closed (or the call has a single request)
        self.read_error = ""  # a frame could not be read (not a valid ClientFrame), or applied: the call ends
        self.read_code = grpc.StatusCode.INVALID_ARGUMENT  # with it, and this code

    def register(self, client_id: str, engine_id: str, timeout_s: float | None) -> None:
        """A request now in the engine as engine_id; a passed deadline fails it with DEADLINE_EXCEEDED."""
        timer = None
        if timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._deadline_passed, client_id)
        self.live[client_id] = (engine_id, timer)
        previous = self.pending.pop(client_id, None)  # the id's previous request ended; its update is unsent
        if previous is not None:
            self.ended.append(previous)
            self._check_room()
        if self._refused_ids[client_id]:  # an earlier request of this id was refused, unsent: it goes out first
            self.ended.extend(u for u in self.refused if u.request_id == client_id)
            self.refused = [u for u in self.refused if u.request_id != client_id]
            del self._refused_ids[client_id]

    def _deadline_passed(self, client_id: str) -> None:
        self.fail(client_id, grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED, abort=True)

    def _update(self, client_id: str) -> pb.RequestUpdate:
        update = self.pending.get(client_id)
        if update is None:
            update = self.pending[client_id] = pb.RequestUpdate(request_id=client_id)
            self._check_room()
        self.wake.set()
        return update

    @property
    def num_buffered(self) -> int:
        """Updates waiting to be sent."""
        return len(self.ended) + len(self.pending) + len(self.refused)

    def _check_room(self) -> None:
        if self.num_buffered >= MAX_BUFFERED_UPDATES:
            self.room.clear()

    def _finish(self, client_id: str) -> str:
        """Forget a live request; returns its engine id."""
        engine_id, timer = self.live.pop(client_id)
        if timer is not None:
            timer.cancel()
        return engine_id

    def on_output(self, client_id: str, output: StepOutput) -> None:
        # Runs for every request of every step: each protobuf attribute read once.
        if client_id not in self.live:
            return
        update = self._update(client_id)
        token_ids = update.new_token_ids
        token_ids.extend(output.new_token_ids)
        update.num_prompt_tokens = output.num_prompt_tokens
        update.num_cached_tokens = output.num_cached_tokens
        if output.logprobs is not None:
            _put_logprobs(update.logprobs, output.logprobs)
        if output.prompt_logprobs is not None:
            _put_logprobs(update.prompt_logprobs, output.prompt_logprobs)
        if output.finish_reason is not None:  # output.finished
            update.finish_reason = FINISH_TO_PROTO.get(output.finish_reason, pb.FINISH_REASON_STOP)
            self._finish(client_id)
        elif len(token_ids) > (limit := self._max_buffered_with(len(output.logprobs[0].top_token_ids))
                               if output.logprobs else self._max_buffered):
            # With logprobs the bound is in bytes: an update past max_frame_bytes would fail the whole call.
            what = ("tokens with logprobs were buffered for this request (max_buffered_tokens, scaled by the bytes "
                    "logprobs add)" if output.logprobs else "tokens were buffered for this request (max_buffered_tokens)")
            self.fail(client_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the client read too slowly: more than {limit} {what}", abort=True)

    def _max_buffered_with(self, alternatives: int) -> int:
        """max_buffered_tokens of ids, in tokens that carry logprobs with this many alternatives: the same bytes at
        most (computed once per count: it is asked for every output that carries logprobs)."""
        limit = self._limits.get(alternatives)
        if limit is None:
            per_token = TOKEN_BYTES + LOGPROB_BYTES + LOGPROB_BYTES_PER_ALTERNATIVE * alternatives
            # At least one: a frame has 1,024 bytes to spare beyond max_buffered_tokens ids (server_config), more
            # than a token with 20 alternatives takes.
            limit = self._limits[alternatives] = max(1, self._max_buffered * TOKEN_BYTES // per_token)
        return limit

    def reject(self, client_id: str, code: grpc.StatusCode, message: str) -> None:
        """Refuse a request that never reached the engine. Its update is kept apart from `pending`: its id may be
        that of a live request (a duplicate), whose own update must stay as it is."""
        status = pb.Status(code=code.value[0], message=message)
        self.refused.append(pb.RequestUpdate(request_id=client_id, finish_reason=pb.FINISH_REASON_ERROR,
                                             status=status))
        self._refused_ids[client_id] += 1
        self._check_room()
        self.wake.set()

    def _set_error(self, client_id: str, code: grpc.StatusCode, message: str) -> None:
        update = self._update(client_id)
        update.finish_reason = pb.FINISH_REASON_ERROR
        update.status.code = code.value[0]
        update.status.message = message

    def fail(self, client_id: str, code: grpc.StatusCode, message: str, abort: bool) -> None:
        """End a live request with an error status; abort it in the engine unless the engine ended it."""
        if client_id not in self.live:
            return
        engine_id = self._finish(client_id)
        if abort:
            self._abort_in_engine(engine_id, f"{code.name}: {message}")
        self._set_error(client_id, code, message)

    def _at_deadline(self, client_id: str) -> bool:
        """Whether the live request's deadline is passed, or within DEADLINE_SLACK_S."""
        timer = self.live[client_id][1]
        return timer is not None and timer.when() - asyncio.get_running_loop().time() <= DEADLINE_SLACK_S

    def abort(self, client_id: str, stopped: bool = False) -> bool:
        """In-band abort: free the request now and report it finished with reason ABORT. stopped: the client
        ended it on a stop string (its metrics and log line say stop). An abort at the request's deadline is the
        deadline's: it fails with DEADLINE_EXCEEDED."""
        if client_id not in self.live:
            return False
        if not stopped and self._at_deadline(client_id):
            self._deadline_passed(client_id)
            return True
        engine_id = self._finish(client_id)
        if stopped:
            self._abort_in_engine(engine_id, stopped=True)
        else:
            self._abort_in_engine(engine_id)
        self._update(client_id).finish_reason = pb.FINISH_REASON_ABORT
        return True

    def abort_all(self, error: str | None = None) -> None:
        """The call ended (closed, cancelled): free every request it still holds. `error`: the service ended
        the call itself (the drain's grace period ran out), so the requests count as errors, not aborts; so do
        requests at their deadline."""
        for client_id in list(self.live):
            why = error or (DEADLINE_ERROR if self._at_deadline(client_id) else None)
            self._abort_in_engine(self._finish(client_id), why)

    @property
    def has_updates(self) -> bool:
        return bool(self.ended or self.pending or self.refused)

    def take(self) -> list[pb.RequestUpdate]:
        """The next frame's updates, in order (ended, then pending, then refused), at most max_frame_bytes of
        them (at least one); what is left stays for the next frame."""
        updates: list[pb.RequestUpdate] = []
        size = 0

        def fits(update: pb.RequestUpdate) -> bool:
            nonlocal size
            grown = size + update.ByteSize() + FRAME_OVERHEAD_BYTES
            if updates and grown > self._max_frame_bytes:
                return False
            size = grown
            updates.append(update)
            return True

        while self.ended and fits(self.ended[0]):
            self.ended.pop(0)
        if not self.ended and self.pending:
            pending = self.pending
            # Usually all of them fit: sizes summed in C, then taken at once. Sizes only grow along the frame,
            # so all fit exactly when their total does (or the frame is just one update).
            total = size + sum(map(_byte_size, pending.values())) + FRAME_OVERHEAD_BYTES * len(pending)
            if total <= self._max_frame_bytes or (not updates and len(pending) == 1):
                size = total
                updates.extend(pending.values())
                pending.clear()
            else:
                for client_id in list(pending):
                    if not fits(pending[client_id]):
                        break
                    del pending[client_id]
        if not self.ended and not self.pending:
            while self.refused and fits(self.refused[0]):
                client_id = self.refused.pop(0).request_id
                self._refused_ids[client_id] -= 1
                if not self._refused_ids[client_id]:
                    del self._refused_ids[client_id]  # a long-lived stream keeps no entry per id it ever refused
        if not self.has_updates:
            self.wake.clear()
        if self.num_buffered < MAX_BUFFERED_UPDATES // 2:
            self.room.set()
        return updates

    def done(self, draining: bool) -> bool:
        """Nothing left to send, and nothing more will come."""
        if self.read_error:
            return True
        return not self.has_updates and not self.live and (self.input_done or draining)
