"""A randomized chaos run of both services over a fake engine that fails requests, fails steps and stalls, checked
against invariants for every request: one final message (or a call status that says why), nothing after it, the
token ids a gap- and duplicate-free prefix of what the engine generated, usage and text that match the ids, and a
finish reason that fits what happened; then nothing left in flight on either service, and the services' request
counters equal to what the clients saw. Each seed fixes the clients' choices (timing stays the machine's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from clients.logs import REQUEST_LOGGER
from engine_service import engine_loop as engine_loop_module
from engine_service import server as engine_server
from engine_service.engine import EngineStepError
from engine_service.outputs import FINISH_ERROR, StepOutput
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
from tests.fake_engine import FakeEngine
from tests.unit.test_engine_service_fake import Running
from tests.unit.test_text_service_regressions import TextServer, wait_ready
from tokenizer_service import server as text_server
from tokenizer_service.metrics import multi_request_id

pytestmark = pytest.mark.timeout(120)

COVERAGE: Counter[str] = Counter()  # the failures the checks met, by status and message (for a scratch run's report)
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort",
          pb.FINISH_REASON_ERROR: "error"}
INJECTED = "injected"  # in the error of every request the chaos engine fails
CLIENTS_S = 20.0  # a seed's clients are done well within this, unless a request never ends


# ---- the engine side --------------------------------------------------------------------------------------------
class ChaosEngine(FakeEngine):
    """FakeEngine's generation (each token the last + 1), with failures drawn from its own seeded generator: a
    request failing alone, a whole step failing (EngineStepError: its running requests fail, the engine goes on;
    never twice in a row, since three in a row end the engine), and a slow step. The errors name the engine request
    they failed, so a client can tell an injected failure from any other."""

    def __init__(self, seed: int, fail_p: float = 0.0, step_error_p: float = 0.0, slow_p: float = 0.0,
                 slow_s: float = 0.2, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.rng = random.Random(seed)
        self.fail_p, self.step_error_p, self.slow_p, self.slow_s = fail_p, step_error_p, slow_p, slow_s
        self.armed = False  # no chaos until the services are up (the start-up canary must pass)
        self.dead = False  # every step raises: the engine service fails and exits 1
        self.failed: set[str] = set()  # engine ids failed by injection
        self.finished: Counter[str] = Counter()  # natural ends, by reason
        self.aborts = 0  # abort_request calls that found their request
        self.added = 0  # requests it took
        self._failed_last = False

    def add_request(self, request_id, prompt_token_ids, sampling_params) -> None:
        super().add_request(request_id, prompt_token_ids, sampling_params)
        self.added += 1

    def abort_request(self, request_id: str) -> bool:
        found = super().abort_request(request_id)
        self.aborts += found
        return found

    def step(self, on_launch=None) -> list[StepOutput]:
        if on_launch is not None:
            on_launch()
        if self.dead:
            raise RuntimeError(f"{INJECTED} fatal engine failure")
        chaos = self.armed
        time.sleep(self.step_s + (self.slow_s if chaos and self.rng.random() < self.slow_p else 0.0))
        outputs = [StepOutput(rid, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        if chaos and self.running and not self._failed_last and self.rng.random() < self.step_error_p:
            self._failed_last = True
            failed = [self._fail(rid, "step error") for rid in list(self.running)]
            raise EngineStepError(f"{INJECTED} step error", outputs + failed)
        self._failed_last = False
        for rid in list(self.running):
            if chaos and self.rng.random() < self.fail_p:
                outputs.append(self._fail(rid, "request failure"))
                continue
            tokens, params, n_prompt = self.reqs[rid]
            token = (tokens[-1] + 1) % self.model_info["vocab_size"]
            tokens.append(token)
            done = len(tokens) - n_prompt
            reason = None
            if (token in self.model_info["eos_token_ids"] and not params.ignore_eos
                    or token in params.stop_token_ids) and done >= params.min_tokens:
                reason = "stop"
            elif done >= params.max_tokens or len(tokens) >= self.model_info["max_model_len"]:
                reason = "length"
            outputs.append(StepOutput(rid, [token], reason, num_prompt_tokens=n_prompt))
            if reason:
                self.finished[reason] += 1
                self.running.remove(rid)
                del self.reqs[rid]
        return outputs

    def _fail(self, rid: str, what: str) -> StepOutput:
        self.running.remove(rid)
        del self.reqs[rid]
        self.failed.add(rid)
        return StepOutput(rid, finish_reason=FINISH_ERROR, error=f"{INJECTED} {what} of {rid}")


# ---- the two services, with their internals in reach ------------------------------------------------------------
@dataclass
class Internals:
    """What serve() builds, recorded as it builds it."""

    engine_servicer: object = None
    engine_loop: object = None
    text_servicer: object = None
    traces: dict[str, str] = field(default_factory=dict)  # engine request id -> the trace id it was added with
    door_refusals: int = 0  # requests the engine servicer refused before its engine thread


@contextlib.contextmanager
def recorded() -> Internals:
    """Patch serve()'s classes in both services with subclasses that record their instances."""
    seen = Internals()

    class Loop(engine_loop_module.EngineLoop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.engine_loop = self

        def add(self, request_id, prompt_token_ids, params, sink, trace_id=None, if_full=None):
            super().add(request_id, prompt_token_ids, params, sink, trace_id, if_full)
            seen.traces[request_id] = trace_id

    class EngineServicer(engine_server.EngineServicer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.engine_servicer = self

        def _refuse(self, *args, **kwargs):
            seen.door_refusals += 1
            super()._refuse(*args, **kwargs)

    class TextServicer(text_server.TextServicer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.text_servicer = self

    saved = engine_server.EngineLoop, engine_server.EngineServicer, text_server.TextServicer
    engine_server.EngineLoop, engine_server.EngineServicer, text_server.TextServicer = Loop, EngineServicer, TextServicer
    try:
        yield seen
    finally:
        engine_server.EngineLoop, engine_server.EngineServicer, text_server.TextServicer = saved


def on_loop(service, fn):
    """fn() run on a service's event loop (its state is that thread's), its result returned here; run here once the
    service has stopped."""
    if not service.thread.is_alive():
        return fn()

    async def call():
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), service.loop).result(10)


class Stack:
    """A chaos engine behind the engine service, behind the tokenizer service, all in this process."""

    def __init__(self, model_dir, tokenizer, seed: int, stream_interval: int = 1, engine: dict | None = None,
                 text: dict | None = None, engine_service: dict | None = None) -> None:
        from tokenizer_service.validation import read_eos_token_ids

        self.lines = Lines()
        self._logger = logging.getLogger(REQUEST_LOGGER)
        self._level = self._logger.level
        self._logger.addHandler(self.lines)
        self._logger.setLevel(logging.INFO)

        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        settings = dict(vocab_size=vocab, max_model_len=100_000, max_num_seqs=16, step_s=0.002,
                        fail_p=0.004, step_error_p=0.01, slow_p=0.01, slow_s=0.15)
        self.fake = ChaosEngine(seed, **{**settings, **(engine or {})})
        self.fake.model_info["eos_token_ids"] = sorted(read_eos_token_ids(str(model_dir), tokenizer, vocab))
        self.tokenizer, self.vocab = tokenizer, vocab
        self.eos = set(self.fake.model_info["eos_token_ids"])
        with recorded() as self.seen:
            self.engine = Running(self.fake, **{"max_num_seqs": 16, "max_waiting": 64, **(engine_service or {})})
            self.text = TextServer(model_dir, engines=self.engine.target, stream_interval=stream_interval,
                                   stream_max_wait_s=0.05, **{"max_buffered_updates": 64, **(text or {})})
        self.channel = grpc.insecure_channel(self.text.target)
        wait_ready(pb_grpc.TextGenerationStub(self.channel))
        self.fake.armed = True

    def tasks(self) -> tuple[Counter[str], Counter[str]]:
        """The asyncio tasks on each service's loop (engine, tokenizer), counted by their coroutines' names; none
        once it has stopped."""
        def names(service):
            return on_loop(service, lambda: Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks(service.loop)
                                                    if t is not asyncio.current_task()) if service.thread.is_alive()
                           else Counter())

        return names(self.engine), names(self.text)

    def close(self) -> None:
        self.channel.close()
        self.text.stop()
        try:
            assert self.engine.stop() == (1 if self.fake.dead else 0)
        finally:
            self._logger.removeHandler(self.lines)
            self._logger.setLevel(self._level)


class Lines(logging.Handler):
    """The tokenizer service's request lines: each trace id's finish reasons, in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if "engine_request_id" not in fields:  # the engine service's lines carry it
            self.reasons.setdefault(fields["request_id"], []).append(fields["finish_reason"])


# ---- what the clients send ----------------------------------------------------------------------------------------
@dataclass
class Sent:
    """One request as a client sent it (for GenerateMulti, one use of its id), and what came back for it."""

    label: str
    request: pb.GenerateRequest
    trace: str  # its id in both services' logs and metrics
    invalid: bool = False
    deadline_s: float | None = None  # the earlier of deadline_ms and the call's timeout
    call_timeout: float | None = None  # Generate: the call's own deadline, if it has one
    multi: bool = False
    slow: bool = False  # its reader stalls: a full buffer may fail it
    duplicate: bool = False  # sent under a GenerateMulti id the client had not seen end
    sent: float = 0.0
    ended: float = 0.0
    responses: list = field(default_factory=list)
    code: grpc.StatusCode | None = None  # Generate: the call's status
    details: str = ""
    cancelled: bool = False  # the client cancelled its call before its last message
    aborted: bool = False  # the client sent an in-band abort for it
    drained: bool = False  # a service stopped while it was live
    stray: bool = False  # not a request: a message that came for an id none of whose uses was open
    events: list = field(default_factory=list)  # GenerateMulti: what the call carried for its id, in order

    @property
    def final(self) -> pb.GenerateResponse | None:
        return next((r for r in self.responses if r.finish_reason in (pb.FINISH_REASON_ERROR, pb.FINISH_REASON_ABORT)),
                    None)


def expected_ids(request: pb.GenerateRequest, prompt: list[int], vocab: int, eos: set[int]) -> tuple[list[int], str]:
    """What the chaos engine generates for one completion of the request, left alone, and why it ends."""
    params = request.sampling_params
    max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
    out, token = [], prompt[-1]
    while True:
        token = (token + 1) % vocab
        out.append(token)
        if (token in eos and not params.ignore_eos or token in params.stop_token_ids) and len(out) >= params.min_tokens:
            return out, "stop"
        if len(out) >= max_tokens:
            return out, "length"


class Plan:
    """A seed's requests: valid ones of every shape, and invalid ones mixed in."""

    def __init__(self, rng: random.Random, stack: Stack, long_p: float = 0.05) -> None:
        self.rng, self.stack, self.long_p = rng, stack, long_p

    def prompt(self) -> list[int]:
        rng = self.rng
        last = rng.choice([rng.randrange(300, 1700), rng.randrange(self.stack.vocab - 12, self.stack.vocab)])
        return [rng.randrange(3, self.stack.vocab) for _ in range(rng.randrange(0, 6))] + [last]

    def request(self) -> tuple[pb.GenerateRequest, bool]:
        """A request and whether it is invalid."""
        rng = self.rng
        prompt = self.prompt()
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt))
        params = request.sampling_params
        params.max_tokens = rng.choice([1, 2, 5, 12, 30, 80])
        params.ignore_eos = rng.random() < 0.5
        if rng.random() < self.long_p:
            params.max_tokens = rng.choice([300, 1200])  # long: a stalled reader fills its buffers
        if rng.random() < 0.1:
            params.min_tokens = rng.randrange(0, min(4, params.max_tokens + 1))
        if rng.random() < 0.3:
            request.n = rng.choice([2, 3])
        if rng.random() < 0.25 and not params.min_tokens:
            full = self.stack.tokenizer.decode(expected_ids(request, prompt, self.stack.vocab, self.stack.eos)[0])
            text = full.replace("\ufffd", "")
            if len(text) > 2:
                at = rng.randrange(0, len(text) - 1)
                request.stop.append(text[at : at + rng.choice([1, 2, 3])])
                request.include_stop_str_in_output = rng.random() < 0.3
        if rng.random() < 0.1:
            params.stop_token_ids.append(expected_ids(request, prompt, self.stack.vocab, self.stack.eos)[0][-1])
        if rng.random() < 0.15:
            request.deadline_ms = rng.randrange(20, 400)
        if rng.random() < 0.1:
            request.skip_special_tokens = False
        if rng.random() < 0.2:  # a full engine queue takes a request of a lower value in place of a waiting one
            params.priority = rng.randrange(3)
        invalid = rng.random() < 0.08
        if invalid:
            kind = rng.randrange(5)
            if kind == 0:
                request.prompt_token_ids.ids.append(self.stack.vocab + 5)
            elif kind == 1:
                request.prompt_token_ids.ClearField("ids")
            elif kind == 2:
                request.n = 0
            elif kind == 3:
                request.stop.append("")
            else:
                params.temperature = -1.0  # refused by the engine, relayed by the tokenizer service
        return request, invalid


async def run_generate(stub, sent: Sent, timeout: float | None, cancel_after: float | None, stall_at: int | None,
                       stall_s: float) -> None:
    """One Generate call: read it to its end, or cancel it after `cancel_after` seconds, stalling once after
    `stall_at` messages."""
    call = stub.Generate(sent.request, timeout=timeout, metadata=(("x-request-id", sent.trace),))
    sent.sent = time.monotonic()
    canceller = None
    if cancel_after is not None:
        async def cancel():
            await asyncio.sleep(cancel_after)
            if not call.done():
                sent.cancelled = call.cancel()

        canceller = asyncio.create_task(cancel())
    try:
        async for response in call:
            sent.responses.append(response)
            if len(sent.responses) == stall_at:
                await asyncio.sleep(stall_s)
        sent.code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        sent.code, sent.details = exc.code(), exc.details() or ""
    except asyncio.CancelledError:
        sent.code = grpc.StatusCode.CANCELLED
    sent.ended = time.monotonic()
    if canceller is not None:
        canceller.cancel()


class MultiCall:
    """One GenerateMulti call, its requests sent over time: new ids, ids reused once their request ended or was
    aborted, in-band aborts of live requests (and of ids not live), a duplicate of a live id now and then; its
    reader may stall, and the client may cancel the whole call."""

    def __init__(self, plan: Plan, rng: random.Random, label: str, requests: int, slow_p: float) -> None:
        self.plan, self.rng, self.label = plan, rng, label
        self.call_id = f"{label}-{rng.randrange(10**6)}"
        self.requests = requests
        self.sent: list[Sent] = []
        self.by_id: dict[str, list[Sent]] = {}  # each id's uses, in order
        self.free: list[str] = []  # ids whose last use ended or was aborted
        self.ids = 0
        self.cancel_after = rng.uniform(0.05, 1.0) if rng.random() < 0.15 else None
        self.timeout = rng.uniform(0.1, 1.0) if rng.random() < 0.15 else None  # the whole call's deadline
        self.stall = (rng.randrange(1, 20), rng.uniform(0.1, 0.6)) if rng.random() < 2 * slow_p else None
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.read = 0
        self.events: dict[str, list[str]] = {}  # by id: what was written and read for it, in order

    def live(self) -> list[Sent]:
        """The uses the client may abort: not ended, not aborted, not duplicates (refused, if nothing ended their
        id's live use first)."""
        return [s for uses in self.by_id.values() for s in uses if not (s.ended or s.aborted or s.duplicate)]

    def idle(self, rid: str) -> bool:
        """Whether no use of the id is open or aborted: it may be sent again."""
        return all(s.ended or s.aborted for s in self.by_id.get(rid, []))

    def owner(self, response: pb.GenerateResponse) -> Sent | None:
        """The use of its id a response belongs to: a duplicate's refusal to the duplicate, the rest to the
        earliest use that has not ended."""
        uses = self.by_id.get(response.request_id, [])
        if response.finish_reason == pb.FINISH_REASON_ERROR and "not live" in response.status.message:
            dup = next((s for s in uses if s.duplicate and not s.responses), None)
            if dup is not None:
                return dup
        return next((s for s in uses if not s.ended), None)

    def on_response(self, response: pb.GenerateResponse) -> None:
        self.events.setdefault(response.request_id, []).append(
            f"got {response.index}:{list(response.token_ids)}:{FINISH.get(response.finish_reason, '')}"
            f"{response.status.code or ''}{response.status.message}")
        sent = self.owner(response)
        if sent is None:  # after the last message of every use of its id
            stray = Sent(f"{self.label}:{response.request_id}:stray", pb.GenerateRequest(), "", multi=True, stray=True)
            stray.responses.append(response)
            stray.ended = time.monotonic()
            self.sent.append(stray)
            return
        sent.responses.append(response)
        if self.request_done(sent):
            sent.ended = time.monotonic()
            if response.request_id not in self.free and self.idle(response.request_id):
                self.free.append(response.request_id)

    @staticmethod
    def request_done(sent: Sent) -> bool:
        """Whether the request's last message has come: ABORT or ERROR, or each completion's own."""
        if sent.final is not None:
            return True
        n = sent.request.n if sent.request.HasField("n") else 1
        return len({r.index for r in sent.responses if r.finish_reason}) >= n

    async def run(self, stub) -> None:
        call = stub.GenerateMulti(metadata=(("x-request-id", self.call_id),), timeout=self.timeout)
        reader = asyncio.create_task(self._read(call))
        canceller = None
        if self.cancel_after is not None:
            async def cancel():
                await asyncio.sleep(self.cancel_after)
                if call.cancel():
                    for sent in self.sent:
                        sent.cancelled = sent.cancelled or not sent.ended

            canceller = asyncio.create_task(cancel())
        try:
            for _ in range(self.requests):
                await asyncio.sleep(self.rng.choice([0, 0, 0.005, 0.02, 0.08]))
                if call.done():
                    break
                action = self.rng.random()
                if action < 0.2 and self.live():
                    rid = self.rng.choice(self.live()).request.request_id
                    for sent in self.by_id[rid]:  # the service aborts whichever use of the id is live
                        sent.aborted = sent.aborted or not sent.ended
                    self.events.setdefault(rid, []).append("abort")
                    await call.write(pb.MultiRequest(abort_request_id=rid))
                    if self.rng.random() < 0.5:  # reused at once, the abort still in flight
                        await self._send(call, rid)
                    elif rid not in self.free:
                        self.free.append(rid)
                elif action < 0.25:  # an abort of an id that is not live: nothing comes of it
                    await call.write(pb.MultiRequest(abort_request_id=f"nobody-{self.rng.randrange(5)}"))
                elif action < 0.3 and self.live():
                    rid = self.rng.choice(self.live()).request.request_id
                    # One duplicate of an id unanswered at a time: its refusal, which names only the id, is then its.
                    if not any(s.duplicate and not s.responses for s in self.by_id[rid]):
                        await self._send(call, rid, duplicate=True)
                elif action < 0.6 and self.free:
                    await self._send(call, self.free.pop(self.rng.randrange(len(self.free))))
                else:
                    self.ids += 1
                    await self._send(call, f"r{self.ids}")
            try:
                await call.done_writing()
            except Exception:  # noqa: BLE001 -- grpc's internal ExecuteBatchError, where the call ended (this
                if not call.done():  # client's own cancel, racing the close) as the close went out; else a failure
                    raise
            await reader
        except (grpc.aio.AioRpcError, asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.UsageError):
            await asyncio.wait([reader])
        if canceller is not None:
            canceller.cancel()
        now = time.monotonic()
        for sent in self.sent:
            # Sent after the client cancelled the call, or open when it did.
            sent.cancelled = sent.cancelled or (not sent.ended and self.code in (
                grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED))
            sent.ended = sent.ended or now

    async def _send(self, call, rid: str, duplicate: bool = False) -> None:
        request, invalid = self.plan.request()
        request.request_id = rid
        if rid in self.free and not duplicate:
            self.free.remove(rid)
        uses = self.by_id.setdefault(rid, [])
        sent = Sent(f"{self.label}:{rid}#{len(uses)}", request, multi_request_id(self.call_id, rid), invalid=invalid,
                    deadline_s=request.deadline_ms / 1000 if request.deadline_ms else None, multi=True,
                    slow=self.stall is not None, duplicate=duplicate)
        uses.append(sent)
        self.sent.append(sent)
        sent.events = self.events.setdefault(rid, [])
        sent.events.append(f"send #{len(uses) - 1}{' (duplicate)' if duplicate else ''}")
        sent.sent = time.monotonic()
        await call.write(pb.MultiRequest(generate=request))

    async def _read(self, call) -> None:
        try:
            async for response in call:
                self.read += 1
                self.on_response(response)
                if self.stall is not None and self.read == self.stall[0]:
                    await asyncio.sleep(self.stall[1])
            self.code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
            if self.code == grpc.StatusCode.INTERNAL and self.details == "Internal error from Core" \
                    and self.timeout is not None:
                # grpcio's aio client reports a write that races the call's end as this, in place of the status
                # (grpc/grpc#36066): here the call's own deadline.
                self.code = grpc.StatusCode.DEADLINE_EXCEEDED
        except asyncio.CancelledError:
            self.code = grpc.StatusCode.CANCELLED


# ---- the invariants -------------------------------------------------------------------------------------------------
class Checker:
    """Each request's invariants, and the services' state and counters after a run."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.problems: list[str] = []

    def bad(self, sent: Sent, what: str) -> None:
        shown = [(r.index, list(r.token_ids), r.text, FINISH.get(r.finish_reason, ""), r.status.code,
                  r.usage.completion_tokens) for r in sent.responses]
        self.problems.append(f"{sent.label}: {what}; stop={list(sent.request.stop)}; code={sent.code} "
                             f"{sent.details!r}; responses={shown}"
                             + (f"; its id's events {sent.events}" if sent.events else ""))

    def explained(self, sent: Sent, code: grpc.StatusCode, message: str) -> bool:
        """Whether a failure with this status fits what happened to the request."""
        COVERAGE[f"{code.name}: {re.sub(r'[0-9.:]+', 'N', message)[:60]}"] += 1
        if sent.drained and (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                             or message == "Internal error from Core" or f"{INJECTED} fatal" in message):
            return True  # a service stopped under it (the aio client's words for a write then: grpc/grpc#36066)
        if code == grpc.StatusCode.INTERNAL:
            found = re.search(rf"{INJECTED} .* of (\S+)", message)
            return bool(found) and found.group(1) in self.stack.fake.failed \
                and self.stack.seen.traces.get(found.group(1)) == sent.trace
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return sent.deadline_s is not None and sent.ended - sent.sent >= sent.deadline_s - 0.005
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "queue is full" in message or (sent.slow and "read too slowly" in message) or (
                "displaced" in message and sent.request.sampling_params.priority > 0)
        if code == grpc.StatusCode.CANCELLED:
            return sent.cancelled
        return False

    def text_of(self, sent: Sent, ids: list[int], hide_last: bool) -> str:
        request = sent.request
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return self.stack.tokenizer.decode(ids[:-1] if hide_last else ids, skip_special_tokens=skip)

    @staticmethod
    def first_stop(request: pb.GenerateRequest, text: str) -> tuple[str, str] | None:
        """The stop string that ends first in text (the longer at equal ends), and the text it leaves."""
        ends = [(text.find(s) + len(s), -len(s), s) for s in request.stop if s in text]
        if not ends:
            return None
        end, _, stop = min(ends)
        return stop, text[:end] if request.include_stop_str_in_output else text[: end - len(stop)]

    def cut_text(self, sent: Sent, ids: list[int]) -> str:
        """The text of ids as an early end sends it: what it holds back is flushed, up to a stop string."""
        full = self.text_of(sent, ids, False)
        stopped = self.first_stop(sent.request, full)
        return full if stopped is None else stopped[1]

    def check(self, sent: Sent) -> str | None:
        """Check one request; the finish reason its service counts it under (None: the client cannot know)."""
        request = sent.request
        if sent.stray:
            self.bad(sent, "a message for an id after the last message of each of its uses")
            return None
        n = request.n if request.HasField("n") else 1
        final = sent.final
        if final is not None and sent.responses[-1] is not final:
            self.bad(sent, "a message after its ABORT or ERROR")
        if sent.invalid or (sent.duplicate and final is not None and "not live" in final.status.message):
            code = grpc.StatusCode.INVALID_ARGUMENT
            if sent.multi and final is not None and final.status.code == code.value[0] and len(sent.responses) == 1:
                return "error"
            if sent.aborted and final is not None and final.finish_reason == pb.FINISH_REASON_ABORT \
                    and len(sent.responses) == 1 and not final.usage.completion_tokens:
                return "abort"  # aborted before it was refused
            if not sent.multi and sent.code == code and not sent.responses:
                return "error"
            ran_out = sent.code == grpc.StatusCode.DEADLINE_EXCEEDED and sent.call_timeout is not None
            if (sent.cancelled or sent.drained or ran_out) and not sent.responses:
                return None
            unavailable = grpc.StatusCode.UNAVAILABLE
            if sent.drained and (sent.code == unavailable or final is not None and final.status.code == unavailable.value[0]):
                return None  # refused for the drain before it was read
            # The tokenizer service sheds load before it tokenizes (and so validates) a request.
            full = "the tokenizer service's queue is full"
            if full in sent.details and not sent.responses or final is not None and full in final.status.message:
                return "error"
            self.bad(sent, "an invalid request not refused with INVALID_ARGUMENT alone")
            return None
        prompt = list(request.prompt_token_ids.ids)
        params = request.sampling_params
        expected, why = expected_ids(request, prompt, self.stack.vocab, self.stack.eos)
        ids: dict[int, list[int]] = {i: [] for i in range(n)}
        texts: dict[int, str] = {i: "" for i in range(n)}
        own: dict[int, pb.GenerateResponse] = {}  # each completion's STOP or LENGTH
        for response in sent.responses:
            if response.index >= n:
                self.bad(sent, f"a message with index {response.index} of n={n}")
                return None
            if response.index in own and response is not final:  # an ABORT or ERROR ends the request, not an index
                self.bad(sent, f"a message for completion {response.index} after its last")
            ids[response.index] += response.token_ids
            texts[response.index] += response.text
            if response.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
                own[response.index] = response
        for i in range(n):
            if ids[i] != expected[: len(ids[i])]:
                self.bad(sent, f"completion {i}'s ids are not a prefix of what the engine generated, {expected}")
                return None
        for i, last in own.items():
            usage = last.usage
            if (usage.completion_tokens, usage.prompt_tokens) != (len(ids[i]), len(prompt)):
                self.bad(sent, f"completion {i}'s usage {usage.completion_tokens}/{usage.prompt_tokens} is not "
                               f"{len(ids[i])} ids of a {len(prompt)}-token prompt")
            engine_stop = ids[i] == expected and why == "stop"
            if last.stop_reason:
                if last.finish_reason != pb.FINISH_REASON_STOP or last.stop_reason not in request.stop:
                    self.bad(sent, f"stop_reason {last.stop_reason!r} with {FINISH[last.finish_reason]}")
                    continue
                full = self.text_of(sent, ids[i], False)
                stopped = self.first_stop(request, full)
                if stopped is None:
                    self.bad(sent, f"stop string {last.stop_reason!r} not in the text of its ids, {full!r}")
                    continue
                stop, want = stopped
                if (stop, texts[i]) != (last.stop_reason, want):
                    self.bad(sent, f"completion {i} stopped on {last.stop_reason!r} with text {texts[i]!r}; its ids "
                                   f"read {full!r}: {stop!r} first, text {want!r}")
                continue
            if last.finish_reason == pb.FINISH_REASON_LENGTH and (ids[i], why) != (expected, "length"):
                self.bad(sent, f"completion {i} LENGTH after {len(ids[i])} of {expected} ({why})")
            if last.finish_reason == pb.FINISH_REASON_STOP and not engine_stop:
                self.bad(sent, f"completion {i} STOP with no stop string after {len(ids[i])} of {expected} ({why})")
            hide = engine_stop and not request.include_stop_str_in_output and (
                ids[i][-1] in params.stop_token_ids or not params.ignore_eos and ids[i][-1] in self.stack.eos)
            full = self.text_of(sent, ids[i], hide)
            if texts[i] != full:
                self.bad(sent, f"completion {i}'s text {texts[i]!r} is not its ids' {full!r}")
            if any(s in full for s in request.stop):
                self.bad(sent, f"completion {i} ended {FINISH[last.finish_reason]} past a stop string in {full!r}")
        open_ = [i for i in range(n) if i not in own]
        if final is not None:  # GenerateMulti: the request's ABORT or ERROR ends what is open
            total = sum(map(len, ids.values()))
            if final.usage.completion_tokens != total or final.usage.prompt_tokens not in (0, len(prompt)):
                self.bad(sent, f"{FINISH[final.finish_reason]} usage {final.usage.completion_tokens}/"
                               f"{final.usage.prompt_tokens}, after {total} ids of a {len(prompt)}-token prompt")
            if not open_:
                self.bad(sent, f"{FINISH[final.finish_reason]} after the last message of every completion")
            if final.finish_reason == pb.FINISH_REASON_ABORT and not sent.aborted:
                self.bad(sent, "ABORT without an abort")
            if final.finish_reason == pb.FINISH_REASON_ERROR and not self.explained(
                    sent, grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == final.status.code)),
                    final.status.message):
                self.bad(sent, f"an ERROR that nothing explains: {final.status.code} {final.status.message!r}")
            for i in open_:
                if texts[i] != self.cut_text(sent, ids[i]):
                    self.bad(sent, f"completion {i}'s text {texts[i]!r} is not its ids' at its "
                                   f"{FINISH[final.finish_reason]}")
            return FINISH[final.finish_reason]
        if not open_:
            # The client's own deadline or cancel can still end the call before it reads the status.
            if not sent.multi and sent.code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    and not sent.cancelled:
                self.bad(sent, "the call failed after the last message of every completion")
            if n == 1:
                return FINISH[own[0].finish_reason]
            return "length" if any(r.finish_reason == pb.FINISH_REASON_LENGTH for r in own.values()) else "stop"
        # Open completions with no last message: only the call's end may explain that.
        if sent.multi:
            if not sent.cancelled and not sent.drained:
                self.bad(sent, "no last message, and the call was not cancelled")
            return None
        if sent.code == grpc.StatusCode.OK or sent.code is None or not self.explained(sent, sent.code, sent.details):
            self.bad(sent, "the call ended without a last message, with a status nothing explains")
            return None
        for i in open_:
            full = self.cut_text(sent, ids[i])
            cut = sent.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
            if (not full.startswith(texts[i])) if cut else texts[i] != full:
                self.bad(sent, f"completion {i}'s text {texts[i]!r} does not fit its ids' {full!r}")
        # The client's deadline or cancel may end the call before gRPC hands it to the service (which then never
        # counts it), or before the client reads messages the service sent in time (it then counts what it sent).
        uncertain = sent.code == grpc.StatusCode.CANCELLED or sent.drained or (
            sent.code == grpc.StatusCode.DEADLINE_EXCEEDED and sent.call_timeout is not None)
        return None if uncertain else "error"


@dataclass
class Counts:
    """The services' counters at one moment."""

    text: dict[str, float]
    engine: dict[str, int]
    traced: int  # engine requests added with a trace id (the canary has none)
    door: int
    fake_finished: Counter
    fake_aborts: int
    fake_failed: int
    fake_added: int

    @classmethod
    def now(cls, stack: Stack) -> Counts:
        servicer = stack.seen.text_servicer
        registry, model = servicer.metrics.registry, servicer.model_name
        text = {reason: registry.get_sample_value("llmserve:text_requests_total",
                                                  {"model_name": model, "finished_reason": reason}) or 0.0
                for reason in ("stop", "length", "abort", "error", "cancelled")}
        loop = stack.seen.engine_loop
        return cls(text, dict(loop.metrics.finished), sum(t is not None for t in stack.seen.traces.values()),
                   stack.seen.door_refusals, Counter(stack.fake.finished), stack.fake.aborts, len(stack.fake.failed),
                   stack.fake.added)


def settled(stack: Stack, baseline_tasks: tuple[Counter[str], Counter[str]]) -> list[str]:
    """What is still in flight on either service, or left behind: [] once nothing is."""
    text, loop, engine = stack.seen.text_servicer, stack.seen.engine_loop, stack.seen.engine_servicer
    left = []

    def text_side():
        pool = text.pool
        return (text.inflight, text.admitting, text.num_calls, len(text._multi_wakes),
                sum(len(c.inflight) for c in pool.conns.values()))

    if any(on_loop(stack.text, text_side)):
        left.append(f"tokenizer service: inflight, admitting, calls, multi calls, engine handles = "
                    f"{on_loop(stack.text, text_side)}")

    def engine_side():
        return (loop.num_live, len(loop._priorities), len(loop.metrics._live), len(engine._unary),
                [len(s.live) for s in engine._streams])

    live, priorities, tracked, unary, streams = on_loop(stack.engine, engine_side)
    both = stack.engine.thread.is_alive() and stack.text.thread.is_alive()  # the tokenizer's stream is open
    if live or priorities or tracked or unary or streams != ([0] if both else []):
        left.append(f"engine service: live {live}, priorities {priorities}, tracked {tracked}, unary {unary}, "
                    f"streams' live {streams}")
    fake = stack.fake
    if not fake.dead and (fake.reqs or fake.waiting or fake.running):  # a failed engine is left as it failed
        left.append(f"engine: requests {sorted(fake.reqs)} waiting {fake.waiting} running {fake.running}")
    tasks = stack.tasks()
    for side, now, before in zip(("engine", "tokenizer"), tasks, baseline_tasks, strict=True):
        if now - before:
            left.append(f"{side} service: tasks left {dict(now - before)}")
    return left


def run_seed(stack: Stack, seed: int, generates: int = 24, multis: int = 3, multi_requests: int = 10,
             spread_s: float = 0.8, drain: str | None = None, drain_at: float = 0.4, long_p: float = 0.05,
             slow_p: float = 0.15) -> tuple[list[str], int]:
    """One seed's clients, all at once; the invariants' violations (and how many requests were checked).

    drain: "text" or "engine" stops that service (its SIGTERM path: a drain within its grace) drain_at seconds in;
    "fatal" breaks the engine then (the engine service fails its requests and exits 1)."""
    baseline_tasks = stack.tasks()
    before = Counts.now(stack)
    rng = random.Random(seed)
    plan = Plan(rng, stack, long_p)
    singles: list[tuple[Sent, float | None, float | None, int | None, float, float]] = []
    for i in range(generates):
        request, invalid = plan.request()
        timeout = rng.uniform(0.05, 0.6) if rng.random() < 0.1 else None
        limits = [t for t in (timeout, request.deadline_ms / 1000 if request.deadline_ms else None) if t]
        sent = Sent(f"seed{seed}:g{i}", request, f"chaos-{seed}-g{i}", invalid=invalid,
                    deadline_s=min(limits) if limits else None, call_timeout=timeout)
        cancel_after = rng.uniform(0.0, 0.4) if rng.random() < 0.1 else None
        stall_at = rng.randrange(1, 10) if rng.random() < slow_p else None
        sent.slow = stall_at is not None
        singles.append((sent, timeout, cancel_after, stall_at, rng.uniform(0.1, 0.8), rng.uniform(0, spread_s)))
    calls = [MultiCall(plan, random.Random(rng.random()), f"seed{seed}:m{j}", multi_requests, slow_p)
             for j in range(multis)]

    async def clients() -> None:
        # Readers that stall do it on a connection with a small flow-control window, so that what the service sends
        # backs up to it within a few hundred messages (gRPC's own windows grow to megabytes).
        async with grpc.aio.insecure_channel(stack.text.target) as channel, grpc.aio.insecure_channel(
                stack.text.target, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        ) as narrow:
            stubs = {False: pb_grpc.TextGenerationStub(channel), True: pb_grpc.TextGenerationStub(narrow)}

            async def single(sent, timeout, cancel_after, stall_at, stall_s, delay):
                await asyncio.sleep(delay)
                await run_generate(stubs[sent.slow], sent, timeout or 30.0, cancel_after, stall_at, stall_s)

            async def stop():
                nonlocal drained_at
                await asyncio.sleep(drain_at)
                drained_at = time.monotonic()
                if drain == "fatal":
                    stack.fake.dead = True
                else:
                    await asyncio.to_thread(stack.text.stop if drain == "text" else stack.engine.stop)

            jobs = asyncio.gather(*(single(*args) for args in singles),
                                  *(call.run(stubs[call.stall is not None]) for call in calls),
                                  *([stop()] if drain else []))
            try:
                await asyncio.wait_for(jobs, CLIENTS_S)
            except TimeoutError:
                hung.append(f"the clients were not done after {CLIENTS_S}s: a request never ended")

    drained_at = float("inf")
    hung: list[str] = []
    asyncio.run(clients())
    for sent in [args[0] for args in singles] + [sent for call in calls for sent in call.sent]:
        sent.drained = sent.ended >= drained_at
    checker = Checker(stack)
    checker.problems += hung
    observed: Counter[str] = Counter()
    unknown = 0
    every = [args[0] for args in singles] + [sent for call in calls for sent in call.sent]
    by_trace: dict[str, list[str | None]] = {}
    for sent in every:
        reason = checker.check(sent)
        if reason is None:
            unknown += 1
        else:
            observed[reason] += 1
        if not sent.stray:
            by_trace.setdefault(sent.trace, []).append(reason)
    for call in calls:
        expected = {grpc.StatusCode.OK} | ({grpc.StatusCode.CANCELLED} if call.cancel_after is not None else set()) \
            | ({grpc.StatusCode.DEADLINE_EXCEEDED} if call.timeout is not None else set())
        if drain:  # the service ended the call, or went away under it (a write then reads as grpc/grpc#36066's)
            expected |= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
        if call.code not in expected:
            checker.problems.append(f"{call.label}: the call ended {call.code} {call.details!r} (timeout "
                                    f"{call.timeout}, cancel after {call.cancel_after})")
    deadline = time.monotonic() + 10
    while (left := settled(stack, baseline_tasks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    checker.problems += left
    for trace, reasons in by_trace.items():
        logged = Counter(stack.lines.reasons.get(trace, []))
        known = Counter(r for r in reasons if r is not None)
        if known - logged or sum(logged.values()) > len(reasons):
            checker.problems.append(f"{trace}: the tokenizer service logged {dict(logged)}, the client saw {reasons}")
    after = Counts.now(stack)
    text = {reason: after.text[reason] - before.text[reason] for reason in after.text}
    for reason, count in text.items():
        if not observed[reason] <= count <= observed[reason] + unknown:
            checker.problems.append(f"text_requests_total{{{reason}}} rose by {count:g}; the clients saw "
                                    f"{observed[reason]} (and {unknown} they cannot know): {dict(observed)} vs {text}")
    engine = {reason: after.engine[reason] - before.engine.get(reason, 0) for reason in after.engine}
    added = after.traced - before.traced
    refused = after.door - before.door
    if sum(engine.values()) != added + refused:
        checker.problems.append(f"engine request_success rose by {sum(engine.values())} ({engine}); {added} requests "
                                f"were added and {refused} refused at the door")
    if engine.get("length", 0) != after.fake_finished["length"] - before.fake_finished["length"]:
        checker.problems.append(f"engine request_success{{length}} rose by {engine.get('length')}; the engine "
                                f"finished {after.fake_finished['length'] - before.fake_finished['length']} so")
    # Every end that is not a length: a stop (the engine's, or a stop string's abort), an abort (a client's, a
    # deadline's, a displacement's), an injected failure, or a refusal (at the door, or on the engine thread).
    ended = sum(engine.get(reason, 0) for reason in ("stop", "abort", "error"))
    accounted = (after.fake_finished["stop"] - before.fake_finished["stop"] + after.fake_aborts - before.fake_aborts
                 + after.fake_failed - before.fake_failed + refused + added - (after.fake_added - before.fake_added))
    if not stack.fake.dead and ended != accounted:  # a failed engine's live requests end in the service alone
        checker.problems.append(f"engine request_success{{stop,abort,error}} rose by {ended} ({engine}); the engine "
                                f"and the service's refusals account for {accounted}")
    return checker.problems, len(every)


def _fail_on(problems: list[str]) -> None:
    """Fail with the problems alone, no traceback: pytest reads the test's source with ast.parse to show one, and
    while the module's stacks still run their service threads (which log tracebacks, parsing too), Python 3.11
    before 3.11.8 can corrupt its parser's recursion counter across threads (CPython gh-106905): pytest then died
    with INTERNALERROR, and the problems were never shown."""
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def stacks(demo_model_dir, demo_tokenizer):
    """Two stacks: messages as they come, and --stream-interval 3."""
    made = {}
    try:
        for interval in (1, 3):
            made[interval] = Stack(demo_model_dir, demo_tokenizer, seed=interval, stream_interval=interval)
        yield made
    finally:
        for stack in made.values():
            stack.close()


@pytest.mark.parametrize(("seed", "interval"), [(1, 1), (2, 3), (3, 1)])
def test_chaos_keeps_every_request_whole_and_every_count_right(stacks, seed, interval):
    problems, checked = run_seed(stacks[interval], seed)
    assert checked > 30
    _fail_on(problems)


@pytest.mark.parametrize(("seed", "drain"), [(4, "text"), (5, "engine")])
def test_chaos_through_a_drain_keeps_every_request_whole(demo_model_dir, demo_tokenizer, seed, drain):
    """A service stopped (its SIGTERM path) while the chaos runs: each request still ends once, or its call says why,
    and neither service is left holding anything."""
    stack = Stack(demo_model_dir, demo_tokenizer, seed=seed, text={"engine_wait_s": 0.3, "grace_s": 0.5},
                  engine_service={"grace_s": 0.5})
    try:
        problems, checked = run_seed(stack, seed, drain=drain, drain_at=0.4)
    finally:
        stack.close()
    assert checked > 30
    _fail_on(problems)


def test_an_invalid_request_is_invalid_argument_even_when_the_engine_queue_is_full():
    """The engine looked at its queue before the request: an invalid one (a negative temperature, an id outside the
    vocabulary) that came while the queue was full was refused RESOURCE_EXHAUSTED, "retry later", so its client (the
    tokenizer service, which relays it) would retry a request no engine can serve. A valid one is still refused."""
    from clients.engine_client import EngineClient
    from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
    from tests.unit.test_engine_service_fake import new, wait_serving

    running = Running(FakeEngine(max_num_seqs=1, max_model_len=1_000_000), max_waiting=1, max_num_seqs=1)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
            hogs = [new(f"hog{i}", [1], max_tokens=100_000, ignore_eos=True) for i in range(2)]
            held = client.stub.Generate(iter([engine_pb.ClientFrame(requests=hogs)]), timeout=20)
            next(held)
            deadline = time.monotonic() + 5
            while client.load().num_waiting < 1 and time.monotonic() < deadline:  # one runs, one waits: full
                time.sleep(0.02)
            later = [new("negative", [1], temperature=-1.0, max_tokens=2), new("vocab", [10**6], max_tokens=2),
                     new("valid", [1], max_tokens=2)]
            ends = {u.request_id: u.status for frame in client.stub.Generate(
                iter([engine_pb.ClientFrame(requests=later)]), timeout=20) for u in frame.updates if u.finish_reason}
            held.cancel()
        codes = {rid: grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status.code)).name
                 for rid, status in ends.items()}
        assert codes == {"negative": "INVALID_ARGUMENT", "vocab": "INVALID_ARGUMENT", "valid": "RESOURCE_EXHAUSTED"}
        assert "temperature" in ends["negative"].message and "queue is full" in ends["valid"].message
    finally:
        assert running.stop() == 0
