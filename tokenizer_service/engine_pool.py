"""A small pool of long-lived bidirectional streams to engines, one per engine address.

Each EngineConnection keeps one Engine.Generate stream open and multiplexes this service's requests on it
(request ids are scoped to the stream). It checks on first contact that the engine serves our model (vocabulary
size and EOS ids), reconnects with exponential backoff, and fails its in-flight requests with UNAVAILABLE when
the stream is lost, marking those that never got a token as retryable. The pool spreads new requests to the
ready connection with the fewest in flight, and re-resolves a DNS name (a headless Service) periodically.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Collection

import grpc

from clients.requests import sampling_options
from clients.tls import ClientTls
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc
from tokenizer_service.config import TextServerConfig
from tokenizer_service.metrics import TextMetrics

log = logging.getLogger(__name__)
MAX_DEADLINE_MS = 10 * 365 * 86_400_000  # ten years: longer deadlines are sent as this
# A Generate stream that sent a frame or stayed open this long was taken by the engine: a refusal of the call
# itself (draining, or its generation-call limit reached) ends it within a round trip.
STREAM_PROVEN_S = 1.0
MODEL_INFO_TIMEOUT_S = 5.0  # a connection's first call: an engine that took the connection answers it at once
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
# A request whose deadline passed this long ago without the engine ending it (the engine's own timer ends it at
# the deadline) fails here with DEADLINE_EXCEEDED and is aborted: a frozen or stalled engine never answers.
DEADLINE_GRACE_S = 1.0
HEARTBEATS_OF_SILENCE = 4  # engine_silence_s is at least this many of an engine's heartbeat periods


class RequestFailed(Exception):
    """A request ended with a gRPC status; `retryable` when no token had arrived from a lost engine."""

    def __init__(self, code: grpc.StatusCode, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


class RequestHandle:
    """One request on one engine stream; `async for update in handle` yields its RequestUpdates. Updates that
    queued while the reader was busy (its caller's writes backed up) come as one, their tokens joined (a failure,
    the pool's or an engine's error update, comes on its own after them): each response then carries them all,
    so a service behind its engine writes fewer, larger messages instead of falling further behind (one GenerateMulti call relayed at most ~7,000 tokens/s when each carried one)."""

    def __init__(self, conn: EngineConnection, request_id: str, max_buffered: int,
                 timeout_s: float | None = None) -> None:
        self.conn, self.request_id, self._max = conn, request_id, max_buffered
        self._items: deque[pb.RequestUpdate | RequestFailed] = deque()
        self._arrived = asyncio.Event()
        self.got_tokens = False
        self.done = False
        self._timer: asyncio.TimerHandle | None = None
        if timeout_s is not None:  # what is left of the request's deadline, sent to the engine as deadline_ms
            self._timer = asyncio.get_running_loop().call_later(timeout_s + DEADLINE_GRACE_S, self._expired,
                                                                timeout_s)

    def _expired(self, timeout_s: float) -> None:
        """The deadline passed DEADLINE_GRACE_S ago and the engine has not ended the request (its timer would have
        at the deadline): the engine is stalled or unreachable while the stream stays open."""
        self._timer = None
        if not self.done:
            self.close()
            self.fail(RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the request's deadline ({timeout_s:.3f}s when sent) passed and the engine at "
                                    f"{self.conn.address} did not end the request within {DEADLINE_GRACE_S:.0f}s "
                                    "of it (stalled or unreachable)"))

    def _ended(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def push(self, update: pb.RequestUpdate) -> None:
        if self.done:
            return
        self.got_tokens = self.got_tokens or bool(update.new_token_ids)
        if update.finish_reason:
            self._ended()
            self.conn.inflight.pop(self.request_id, None)
        elif len(self._items) >= self._max:  # a slow consumer: fail it rather than grow without bound
            self.close()
            self.fail(RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"the client read too slowly: more than {self._max} updates were buffered "
                                    "for this request (max_buffered_updates)"))
            return
        self._items.append(update)
        self._arrived.set()

    def fail(self, error: RequestFailed) -> None:
        self._ended()
        self.conn.inflight.pop(self.request_id, None)
        self._items.append(error)
        self._arrived.set()

    def close(self, stopped: bool = False) -> None:
        """Stop the request: aborts it in the engine (in-band) unless it already finished. stopped: because a
        stop string matched (the engine then counts it as finished by stop)."""
        if not self.done:
            self._ended()
            self.conn.abort(self.request_id, stopped)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> pb.RequestUpdate:
        items = self._items
        while not items:
            if self.done:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        item = items.popleft()
        if isinstance(item, RequestFailed):
            raise item
        if item.finish_reason or not items or not _joinable(items[0]):
            return item
        merged = pb.RequestUpdate()
        merged.CopyFrom(item)  # its prompt logprobs, if any, come with the first
        while items and not merged.finish_reason and _joinable(items[0]):
            later = items.popleft()
            merged.new_token_ids.extend(later.new_token_ids)
            merged.logprobs.extend(later.logprobs)
            merged.prompt_logprobs.extend(later.prompt_logprobs)
            merged.num_prompt_tokens = later.num_prompt_tokens or merged.num_prompt_tokens
            merged.num_cached_tokens = later.num_cached_tokens or merged.num_cached_tokens
            if later.finish_reason:
                merged.finish_reason = later.finish_reason
                if later.HasField("status"):
                    merged.status.CopyFrom(later.status)
        return merged


def _joinable(item: pb.RequestUpdate | RequestFailed) -> bool:
    """Whether a queued item may join the tokens before it: not a failure, the pool's or the engine's (the reader
    relays an error update's own tokens, then raises; a retried request drops them: the tokens queued before it,
    or a stop string they complete, must reach the caller either way)."""
    return not isinstance(item, RequestFailed) and item.finish_reason != pb.FINISH_REASON_ERROR


def tls_hint(details: str, tls: ClientTls | None) -> str:
    """What to check when an engine was not reached, from gRPC's words for a TLS mismatch (docs/SECURITY.md)."""
    if "errors resolving" in details or "DNS resolution failed" in details:  # its words hold "hostname lookup"
        return (" (the engine's address did not resolve: check the host in --engines or --engine-dns, and that "
                "this pod's DNS can see it)")
    if "WRONG_VERSION_NUMBER" in details:
        return " (the engine serves plaintext: drop --engine-tls-ca, or give the engine --tls-cert and --tls-key)"
    if "Hostname Verification" in details or "No match found for server name" in details:
        name = tls.server_name if tls is not None and tls.server_name else "the address's host"
        return (f" (the engine's certificate does not name {name}: set --engine-tls-server-name to a name it "
                "holds, or reissue it)")
    if "CERTIFICATE_VERIFY_FAILED" in details:  # the engine's certificate, not ours; gRPC's words say why
        return (" (the engine's certificate did not verify against --engine-tls-ca: expired, not valid yet, or "
                "signed by another CA, as the error says; renew it, or give the CA that signed it)")
    # An engine that asks for a client certificate and gets none it trusts just closes the connection (TLS 1.3).
    if "Socket closed" in details:
        if tls is None:
            return " (does the engine serve TLS? then set --engine-tls-ca to the CA that signed its certificate)"
        if not tls.cert_file:
            return (" (if the engine asks for a client certificate, give --engine-tls-cert and --engine-tls-key "
                    "from the CA in its --tls-client-ca)")
        return (" (if the engine refused our certificate: --engine-tls-cert must be signed by the CA in its "
                "--tls-client-ca, and valid now)")
    if "handshake" in details.lower():
        return (" (the TLS handshake with the engine failed: check --engine-tls-ca, --engine-tls-cert and "
                "--engine-tls-key against the engine's --tls-cert and --tls-client-ca)")
    return ""


class _Outbox:
    """Frames waiting to go out on one Generate call."""

    __slots__ = ("new", "unsent", "dropped", "aborts", "stopped", "wake", "closed")

    def __init__(self) -> None:
        self.new: list[pb.NewRequest] = []
        # The ids in `new`, and those of them aborted before they went out (left out of the frame): an abort finds
        # an unsent request without a scan of `new`, which made a mass disconnect quadratic in the requests queued.
        self.unsent: set[str] = set()
        self.dropped: set[str] = set()
        self.aborts: list[str] = []
        self.stopped: list[str] = []  # of aborts, those ended by a stop string
        self.wake = asyncio.Event()
        self.closed = False


def jittered(backoff: float) -> float:
    """backoff, give or take a fifth at random (as gRPC's own reconnect backoff): the tokenizer replicas that lost
    an engine together (it restarted) would otherwise redial it in lockstep, all at the same instants."""
    return backoff * random.uniform(0.8, 1.2)


class EngineConnection:
    """One engine address: a channel and one long-lived Generate stream, reconnected with backoff."""

    def __init__(self, address: str, pool: EnginePool) -> None:
        self.address, self._pool = address, pool
        self.inflight: dict[str, RequestHandle] = {}
        self.ready = False
        self.retiring = False  # the address left DNS: no new requests, close when idle
        # The engine refused a request with UNAVAILABLE (draining, failed): its stream stays open while its
        # requests finish, but it takes no new ones; cleared when the stream is made again.
        self.refusing = False
        self.failure = ""  # why its last attempt ended, for the error of a request that found no engine
        self.info: pb.ModelInfo | None = None
        self._heard = 0  # frames read on the current stream (heartbeats included)
        self._silent = ""  # why the silence watcher ended the current stream
        self._ids = itertools.count()
        self._outbox = _Outbox()  # one per stream attempt, so a dead call's writer can never take new frames
        self._task = asyncio.create_task(self._run(), name=f"engine {address}")

    def send(self, request: pb.NewRequest, max_buffered: int, timeout_s: float | None = None) -> RequestHandle:
        request.request_id = str(next(self._ids))
        handle = self.inflight[request.request_id] = RequestHandle(self, request.request_id, max_buffered, timeout_s)
        self._outbox.new.append(request)
        self._outbox.unsent.add(request.request_id)
        self._outbox.wake.set()
        return handle

    def abort(self, request_id: str, stopped: bool = False) -> None:
        if self.inflight.pop(request_id, None) is None or not self.ready:
            return
        if request_id in self._outbox.unsent:  # never sent: drop it (the engine applies a frame's aborts first)
            self._outbox.unsent.discard(request_id)
            self._outbox.dropped.add(request_id)
            return
        self._outbox.aborts.append(request_id)
        if stopped:
            self._outbox.stopped.append(request_id)
        self._outbox.wake.set()

    @staticmethod
    async def _frames(outbox: _Outbox, max_frame_bytes: int):
        """The request side of one Generate call: whatever was queued since the last frame, in frames of at
        most max_frame_bytes, so that a burst of long prompts never makes one message over the limit (which
        would fail the whole stream and every request on it)."""
        while not outbox.closed:
            await outbox.wake.wait()
            outbox.wake.clear()
            new, outbox.new = outbox.new, []
            dropped, outbox.dropped, outbox.unsent = outbox.dropped, set(), set()
            aborts, outbox.aborts = outbox.aborts, []
            stopped, outbox.stopped = outbox.stopped, []
            frame = pb.ClientFrame(abort_request_ids=aborts, stopped_request_ids=stopped)
            size = frame.ByteSize()
            for request in new:
                if dropped and request.request_id in dropped:
                    continue
                grows = request.ByteSize() + 8  # the field's tag and length prefix
                if frame.requests and size + grows > max_frame_bytes:
                    yield frame
                    frame, size = pb.ClientFrame(), 0
                frame.requests.append(request)
                size += grows
            if frame.requests or frame.abort_request_ids:
                yield frame

    async def _run(self) -> None:
        cfg = self._pool.config
        backoff = cfg.reconnect_min_s
        # The last stream ended before it proved itself (STREAM_PROVEN_S): the next takes requests only once it
        # has, so that an engine refusing the call itself never gets requests only to lose them at once.
        on_probation = False
        while not (self.retiring and not self.inflight):
            try:
                channel = self._pool.channel(self.address)
            except (ValueError, OSError) as exc:  # TLS files mid-rotation or gone: try again after the backoff
                wait = jittered(backoff)
                log.error("engine %s: cannot dial: %s; retrying in %.2fs", self.address, exc, wait)
                self.failure = f"cannot dial: {exc}"
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, cfg.reconnect_max_s)
                continue
            reason = "the engine ended the stream (draining)"
            outcome = "not reached"  # then "refused" once it answered, "lost" once its stream proved itself
            opened: float | None = None  # when the Generate call was made
            proven = False
            watcher: asyncio.Task | None = None
            try:
                stub = pb_grpc.EngineStub(channel)
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=MODEL_INFO_TIMEOUT_S)
                outcome = "refused"
                problem = self._pool.check_model(info)
                if problem is not None:
                    reason = problem
                    log.error("engine %s refused: %s", self.address, problem)
                    backoff = cfg.reconnect_max_s
                else:
                    # GetModelInfo answers only while the engine takes requests, but the engine can still refuse
                    # the Generate call (its generation-call limit reached, or it began draining since): the
                    # backoff is reset only once the stream has proved itself.
                    self._outbox = _Outbox()
                    call = stub.Generate(self._frames(self._outbox, self._pool.max_frame_bytes))
                    opened = time.monotonic()
                    if on_probation:
                        await _ends_within(call, STREAM_PROVEN_S)
                    # Watched from when the reader starts: the probation wait reads nothing.
                    limit = silence_limit(cfg.engine_silence_s, info.heartbeat_ms)
                    if limit:
                        watcher = asyncio.create_task(self._watch_silence(call, limit))
                    if not call.done():
                        self.info, self.ready, self.refusing = info, True, False
                        self._pool.changed()
                        log.info("engine %s connected (%s)", self.address, info.model_name)
                    async for frame in call:
                        proven = True
                        self._heard += 1
                        for update in frame.updates:
                            if update.finish_reason == pb.FINISH_REASON_ERROR and update.status.code == UNAVAILABLE:
                                # Draining or failed: marked here, on the stream that said it (a caller reading
                                # the update later could mark a new stream to a restarted engine, for good).
                                self.mark_refusing()
                            elif (update.finish_reason == pb.FINISH_REASON_ERROR and update.status.code == INTERNAL
                                  and update.status.message.startswith("engine failure:")):
                                # The engine failed (not one step of some requests): it fails every live request
                                # so, then ends the stream OK, which alone would read as a drain.
                                reason = f"the engine failed, then ended the stream ({update.status.message})"
                            handle = self.inflight.get(update.request_id)
                            if handle is not None:
                                handle.push(update)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    reason += (" (it does not serve the engine API, llmserve.engine.v1.Engine: is it a tokenizer "
                               "service? --engines and --engine-dns name engine services)")
                    outcome, backoff = "refused", cfg.reconnect_max_s
                elif outcome == "not reached" and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # Read as the request's own deadline, it said nothing of a connection that hangs or an engine
                    # that took it but did not answer (stopped, or its process stalled).
                    reason = (f"GetModelInfo got no answer within {MODEL_INFO_TIMEOUT_S:g}s: a connection that "
                              "hangs (a firewall dropping it, a node gone), or an engine that took it and did not "
                              "answer (stopped, stalled or overloaded)")
                elif outcome == "not reached":
                    reason += tls_hint(exc.details() or "", self._pool.tls)
            except asyncio.CancelledError:
                if not self._silent or asyncio.current_task().cancelling():
                    raise  # this connection is being closed
                reason = self._silent  # the watcher cancelled the call
            finally:
                if watcher is not None:
                    watcher.cancel()
                self._silent = ""
                self.ready = False
                if opened is not None:
                    proven = proven or time.monotonic() - opened >= STREAM_PROVEN_S
                    on_probation = not proven
                    outcome = "lost" if proven else "refused the stream"
                self._lose_inflight(reason)
                await channel.close()
            self.failure = f"{outcome} ({reason})"
            if self.retiring:  # it left DNS: this connection ends (DNS makes a new one if it comes back)
                log.info("engine %s %s (%s); it left DNS: not reconnecting", self.address, outcome, reason)
                return
            if proven:  # a healthy engine's stream dropped: reconnect fast
                backoff = cfg.reconnect_min_s
            wait = jittered(backoff)
            log.warning("engine %s %s (%s); reconnecting in %.2fs", self.address, outcome, reason, wait)
            if self._pool.metrics is not None:
                self._pool.metrics.reconnects.inc()
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, cfg.reconnect_max_s)

    async def _watch_silence(self, call: grpc.aio.Call, limit_s: float) -> None:
        """Cancel the Generate call once the engine has sent nothing for limit_s: its service stopped answering
        (the reader then fails the requests over). Counted in this loop's own ticks, not wall time, so that a stall
        of this service's event loop, which holds back the reader too, never counts as the engine's silence."""
        tick = min(1.0, limit_s / 8)
        heard, quiet = -1, 0.0
        while not call.done():
            await asyncio.sleep(tick)
            if self._heard != heard:
                heard, quiet = self._heard, 0.0
                continue
            quiet += tick
            if quiet >= limit_s:
                self._silent = (f"it sent nothing for {limit_s:g}s, not even its heartbeat: its service stopped "
                                "answering (event loop blocked, or the process frozen) while the connection stayed "
                                "up (--engine-silence-s)")
                log.error("engine %s %s", self.address, self._silent)
                call.cancel()
                return

    def _lose_inflight(self, reason: str) -> None:
        handles, self.inflight = self.inflight, {}
        self._outbox.closed = True
        self._outbox.wake.set()
        self._outbox = _Outbox()
        for handle in handles.values():
            handle.fail(RequestFailed(grpc.StatusCode.UNAVAILABLE, f"lost the engine {self.address}: {reason}",
                                      retryable=not handle.got_tokens))

    def mark_refusing(self) -> None:
        """The engine refused a request with UNAVAILABLE on the current stream: send it nothing new until the stream
        is made again."""
        if not self.refusing:
            self.refusing = True
            log.warning("engine %s refuses new requests (draining or failed); sending them elsewhere", self.address)
            self._pool.changed()

    @property
    def finished(self) -> bool:
        """Its task has ended (retired and idle, or closed): it will never connect again."""
        return self._task.done()

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def silence_limit(engine_silence_s: float, heartbeat_ms: int) -> float:
    """How long an engine's stream may be silent before it is dropped (0: not watched): engine_silence_s, but never
    under HEARTBEATS_OF_SILENCE of its heartbeat periods; an engine without heartbeats (heartbeat_ms 0) is not
    watched, since its idle streams are silent by design."""
    if not engine_silence_s or not heartbeat_ms:
        return 0.0
    return max(engine_silence_s, HEARTBEATS_OF_SILENCE * heartbeat_ms / 1000)


async def _ends_within(call: grpc.aio.Call, timeout_s: float) -> None:
    """Wait until call ends or timeout_s passes, without reading it (its responses stay for the reader)."""
    ended = asyncio.get_running_loop().create_future()
    call.add_done_callback(lambda _: ended.done() or ended.set_result(None))
    try:
        await asyncio.wait_for(ended, timeout_s)
    except TimeoutError:
        pass


# The engine features (ModelInfo.features) this service forwards requests for, as the text API lists them.
# "priority" is listed, never required: an engine that predates it serves the request in arrival order.
FORWARDED_FEATURES = ("logprobs", "prompt_logprobs", "penalties", "logit_bias", "json_object", "json_schema",
                      "priority")


def required_features(params: pb.SamplingParams) -> set[str]:
    """The engine features (ModelInfo.features) a request's sampling parameters use."""
    return sampling_options(params)


def _applies(conn: EngineConnection, needs: set[str]) -> bool:
    """Whether a connected engine applies every feature a request uses (its ModelInfo.features)."""
    return not needs or (conn.info is not None and needs <= set(conn.info.features))


def least_loaded(conns: list[EngineConnection]) -> EngineConnection:
    """The connection with the fewest requests in flight from this replica, ties broken at random. Each replica
    sees only its own load, and every replica lists the engines in the same order: "the first of the least
    loaded" sent a fleet of lightly loaded replicas all to one engine while the others idled."""
    fewest = min(len(c.inflight) for c in conns)
    return random.choice([c for c in conns if len(c.inflight) == fewest])


class EnginePool:
    """The engine connections of this service; see the module docstring."""

    def __init__(self, config: TextServerConfig, vocab_size: int, eos_token_ids: set[int],
                 channel_options: list[tuple[str, int]]) -> None:
        self.config, self.channel_options = config, channel_options
        self.tls = config.engine_tls
        self.max_frame_bytes = config.max_message_bytes // 2  # room for gRPC's own framing
        self._vocab, self._eos = vocab_size, eos_token_ids
        self.conns: dict[str, EngineConnection] = {}
        self._changed = asyncio.Event()
        self._dns_task: asyncio.Task | None = None
        self.dns_failure = ""  # why the last lookup of engine_dns failed ("" once one succeeds)
        self.dns_answered = False  # a lookup of engine_dns has succeeded
        self.metrics: TextMetrics | None = None  # counts reconnects when set

    def start(self) -> None:
        for address in self.config.engine_addresses:
            self.conns[address] = EngineConnection(address, self)
        if self.config.engine_dns:
            self._dns_task = asyncio.create_task(self._resolve_forever())

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to one engine: plaintext, or TLS from the files as they are now (ValueError: unusable)."""
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=self.channel_options)
        return grpc.aio.secure_channel(address, self.tls.credentials(),
                                       options=[*self.channel_options, *self.tls.options()])

    def check_model(self, info: pb.ModelInfo) -> str | None:
        """Why this engine does not serve our model, or None when vocabulary size and EOS ids match."""
        if info.vocab_size != self._vocab:
            return f"vocab_size {info.vocab_size} differs from this tokenizer's model ({self._vocab})"
        if set(info.eos_token_ids) != self._eos:
            return f"eos_token_ids {sorted(info.eos_token_ids)} differ from this model's {sorted(self._eos)}"
        return None

    def changed(self) -> None:
        self._changed.set()

    @property
    def ready(self) -> list[EngineConnection]:
        return [c for c in self.conns.values() if c.ready and not c.retiring and not c.refusing]

    def can_try_another(self, tried: Collection[EngineConnection], params: pb.SamplingParams) -> bool:
        """Whether an engine ready now, and applying what the request uses, is not among `tried`."""
        needs = required_features(params)
        return any(c not in tried and _applies(c, needs) for c in self.ready)

    @property
    def features(self) -> list[str]:
        """The request options (ModelInfo.features) of FORWARDED_FEATURES that a ready engine applies."""
        applied = set().union(*(c.info.features for c in self.ready if c.info))
        return [f for f in FORWARDED_FEATURES if f in applied]

    @property
    def max_model_len(self) -> int:
        return min((c.info.max_model_len for c in self.ready if c.info), default=0)

    async def submit(self, request: pb.NewRequest, timeout_s: float | None,
                     avoid: Collection[EngineConnection] = (),
                     prefer: EngineConnection | None = None) -> RequestHandle:
        """Send request to the least-loaded ready engine (`prefer` where it is ready, able and not avoided: the
        engine a request's other completions went to), waiting up to engine_wait_s for one.

        timeout_s is what is left of the request's deadline: the request carries what remains of it when sent
        (deadline_ms); when it ends the wait, the request fails with DEADLINE_EXCEEDED; when engine_wait_s does,
        with UNAVAILABLE.
        """
        if request.ByteSize() > self.max_frame_bytes:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is {request.ByteSize()} bytes on the wire; at most "
                                f"{self.max_frame_bytes} (half of max_message_bytes) go to an engine")
        needs = required_features(request.sampling_params)
        started = time.monotonic()
        deadline_binds = timeout_s is not None and timeout_s < self.config.engine_wait_s
        limit = timeout_s if deadline_binds else self.config.engine_wait_s
        deadline = started + limit
        while True:
            ready, incapable = self.ready, []
            if ready and needs:  # an older engine ignores the fields: it would serve the request without them
                incapable = [c for c in ready if not _applies(c, needs)]
                ready = [c for c in ready if c not in incapable]
                if not ready and not any(self._may_become_able(c, needs) for c in self.conns.values()):
                    raise self._unable(needs, incapable)  # no other engine worth waiting for
            if ready:
                if prefer is not None and prefer in ready and prefer not in avoid:
                    conn = prefer
                else:
                    conn = least_loaded([c for c in ready if c not in avoid] or ready)
                left_s = None
                if timeout_s is not None:  # capped: "no deadline" sent as a huge value must still fit a uint64
                    left_ms = int((started + timeout_s - time.monotonic()) * 1000)
                    request.deadline_ms = min(max(1, left_ms), MAX_DEADLINE_MS)
                    left_s = request.deadline_ms / 1000
                return conn.send(request, self.config.max_buffered_updates, left_s)
            left = deadline - time.monotonic()
            if left <= 0 and deadline_binds:
                raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the request's deadline passed while waiting {limit:.1f}s for an engine to "
                                    f"take it; engines: {self._engines_state()}")
            if left <= 0 and incapable:
                raise self._unable(needs, incapable)
            if left <= 0:
                refusing = any(c.ready and c.refusing and not c.retiring for c in self.conns.values())
                none = ("every connected engine refuses new requests (draining or failed)" if refusing
                        else "no engine is connected")
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                    f"{none} (waited {limit:.1f}s); engines: {self._engines_state()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    @staticmethod
    def _may_become_able(conn: EngineConnection, needs: set[str]) -> bool:
        """Whether an engine not taking requests now may take this one later: connecting or draining (it comes
        back), and not known to lack what the request needs."""
        if conn.retiring or (conn.ready and not conn.refusing):
            return False
        return conn.info is None or needs <= set(conn.info.features)

    @staticmethod
    def _unable(needs: set[str], incapable: list[EngineConnection]) -> RequestFailed:
        lacking = set().union(*(needs - set(c.info.features if c.info else ()) for c in incapable)) or needs
        return RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the request uses {' and '.join(sorted(lacking))}, which no connected engine applies "
                             f"({', '.join(sorted(c.address for c in incapable))} predate them, or, for json_object and json_schema, "
                             "serve a model whose tokenizer is neither byte-level BPE nor SentencePiece): upgrade the engines, or send the "
                             "request without them")

    def _engines_state(self) -> str:
        """Each engine and why it takes no request now, for the error of a request that found none."""
        def state(conn: EngineConnection) -> str:
            if conn.retiring:
                return "left DNS"
            if conn.ready:
                return "refuses new requests (draining or failed)" if conn.refusing else "connected"
            return conn.failure or "connecting"

        listed = "; ".join(f"{address}: {state(conn)}" for address, conn in sorted(self.conns.items()))
        if listed or not self.config.engine_dns:
            return listed or "none"
        # Only a DNS name leaves the pool empty. A headless Service's name does not resolve (NXDOMAIN) while none
        # of its pods is ready: "none" alone left the caller to guess between that and a wrong name.
        dns = self.config.engine_dns
        if self.dns_failure:
            return (f"none: resolving {dns} (--engine-dns) failed ({self.dns_failure}): a headless Service's name "
                    "resolves only while one of its engine pods is ready; else check the name, and that this pod's "
                    "DNS can see it")
        if not self.dns_answered:
            return f"none: {dns} (--engine-dns) has not been resolved yet"
        return (f"none: {dns} (--engine-dns) resolved to no address: a headless Service lists only its ready "
                "engine pods")

    async def _resolve_forever(self) -> None:
        """Re-resolve engine_dns every dns_refresh_s for good: a failed round keeps the engines found before."""
        logged = ""  # the last unexpected error, logged with its traceback once rather than every round
        while True:
            try:
                await self._resolve_once()
            except Exception as exc:  # a bug, or a name getaddrinfo refuses (UnicodeError): never stop refreshing
                error = f"{type(exc).__name__}: {exc}"
                log.error("resolving %s (engine_dns) failed: %s; keeping the engines found before, retrying in "
                          "%.1fs", self.config.engine_dns, error, self.config.dns_refresh_s, exc_info=error != logged)
                logged = self.dns_failure = error
            await asyncio.sleep(self.config.dns_refresh_s)

    async def _resolve_once(self) -> None:
        """One round: connect to new addresses, retire those gone, close the retired ones that are idle."""
        host, _, port = self.config.engine_dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            found = {(f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}") for i in infos}
            self.dns_failure, self.dns_answered = "", True
        except OSError as exc:
            log.warning("resolving %s failed: %s", self.config.engine_dns, exc)
            self.dns_failure = str(exc)
            # Keep the engines we have; those that had left DNS stay retired (a failed lookup is not their return).
            found = {address for address, conn in self.conns.items() if not conn.retiring}
        for address in found - set(self.conns):
            self.conns[address] = EngineConnection(address, self)
        for address in set(self.conns) - found:
            self.conns[address].retiring = True  # its task ends once its requests are done
        for address in found & set(self.conns):  # back in DNS (again) before its connection was closed
            if self.conns[address].finished:
                self.conns[address] = EngineConnection(address, self)
            self.conns[address].retiring = False
        for address, conn in list(self.conns.items()):
            if conn.retiring and not conn.inflight:
                await self.conns.pop(address).close()

    def cut_all(self, message: str) -> int:
        """End every request in flight with UNAVAILABLE `message`, aborting it in its engine: the end of a drain's
        grace, so that callers read why (gRPC's own cancellation says only 'Cancelling all calls')."""
        cut = 0
        for conn in self.conns.values():
            for handle in list(conn.inflight.values()):
                handle.close()
                handle.fail(RequestFailed(grpc.StatusCode.UNAVAILABLE, message))
                cut += 1
        return cut

    async def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
        for conn in list(self.conns.values()):
            await conn.close()
