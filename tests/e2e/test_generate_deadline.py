"""Generate's deadline_ms end to end, from a raw stub with no call deadline of its own: the tokenizer service over a
real engine on the demo model (both served in-process over gRPC). The deadline passing mid-stream, in the engine's
queue and while waiting to be tokenized; a deadline_ms past the call's own timeout; deadline_ms 0."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import grpc
import pytest

from clients.engine_client import EngineClient
from engine_service import LLMEngine
from engine_service.server_config import ServerConfig
from protos.llmserve.text.v1 import text_pb2 as pb
from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
from tests.e2e.conftest import wait_idle
from tests.support import free_port
from tests.unit.test_engine_service_fake import Running
from tests.unit.test_text_service_regressions import TextServer, scrape, wait_ready
from tokenizer_service.servicer import OFFLOAD_CHAT_MESSAGES, PREPARE_SLOTS

pytestmark = pytest.mark.timeout(60)
# One sequence at a time, so that a second request waits in the engine's queue; 256 blocks hold the model's 2,048.
ENGINE = dict(device="cpu", dtype="float32", attention_backend="torch", enforce_eager=True, num_kvcache_blocks=256,
              max_num_seqs=1, max_num_batched_tokens=2048)
LONG = pb.SamplingParams(max_tokens=1900, ignore_eos=True)  # ~10 s at ~5 ms a step: only a deadline ends it sooner


class Stack(NamedTuple):
    stub: pb_grpc.TextGenerationStub
    engine: EngineClient
    metrics_port: int


@pytest.fixture(scope="module")
def stack(demo_model_dir):
    # LLMEngine itself, not the service's load_engine: that sets torch's threads for the whole (test) process.
    config = ServerConfig(model=str(demo_model_dir), host="127.0.0.1", port=0, metrics_port=0, **ENGINE)
    engine = Running(LLMEngine(config.model, **config.engine_kwargs()), max_num_seqs=1)
    metrics_port = free_port()
    text = TextServer(demo_model_dir, engines=engine.target, metrics_port=metrics_port)
    try:
        with grpc.insecure_channel(text.target) as channel, EngineClient(engine.target, timeout=10) as eng:
            stub = pb_grpc.TextGenerationStub(channel)
            wait_ready(stub)
            yield Stack(stub, eng, metrics_port)
    finally:
        text.stop()
        assert engine.stop() == 0


def run_out(call) -> tuple[list[pb.GenerateResponse], grpc.RpcError | None, float]:
    """A started call's responses, the error that ended it (None: it finished) and when it ended."""
    responses = []
    try:
        for response in call:
            responses.append(response)
    except grpc.RpcError as exc:
        return responses, exc, time.monotonic()
    return responses, None, time.monotonic()


def finished(stack: Stack) -> dict[str, float]:
    return scrape(stack.metrics_port, "llmserve:text_requests")


def counted(stack: Stack, before: dict[str, float], expected: dict[str, int], within: float = 5.0) -> dict:
    """The requests finished since `before` by reason, once they are `expected` (or `within` s have passed)."""
    deadline = time.monotonic() + within
    while True:
        after = finished(stack)
        got = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def assert_engine_idle(stack: Stack, within: float = 2.0) -> None:
    load = wait_idle(stack.engine, timeout=within)
    assert load.num_live_requests == 0 and load.num_running == 0 and load.num_waiting == 0, str(load)
    assert load.num_kv_blocks_used == 0 and load.num_kv_blocks_free == load.num_kv_blocks_total > 0, str(load)


def assert_answers(stub: pb_grpc.TextGenerationStub) -> None:
    """A later request on the same channel is served in full."""
    responses, error, _ = run_out(stub.Generate(pb.GenerateRequest(
        prompt="again", sampling_params=pb.SamplingParams(max_tokens=4, ignore_eos=True))))
    assert error is None and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == 4


def test_deadline_ms_ends_a_stream_mid_way(stack):
    before = finished(stack)
    sent = time.monotonic()
    responses, error, ended = run_out(stack.stub.Generate(pb.GenerateRequest(
        prompt="Tell me about the sea.", deadline_ms=800, sampling_params=LONG)))
    tokens = sum(len(r.token_ids) for r in responses)
    assert error is not None, f"finished ({responses[-1].finish_reason}) after {tokens} tokens, past its deadline"
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert 0 < tokens < LONG.max_tokens
    assert 0.75 <= ended - sent < 1.8, f"ended {ended - sent:.2f}s after it was sent, with deadline_ms 800"
    assert_engine_idle(stack)
    assert counted(stack, before, {"error": 1}) == {"error": 1}
    assert_answers(stack.stub)


def test_deadline_ms_passing_in_the_engines_queue_ends_the_call_before_any_token(stack):
    blocker = stack.stub.Generate(pb.GenerateRequest(prompt="hold the engine", sampling_params=LONG))
    try:
        assert next(blocker).token_ids  # running: it holds the engine's one sequence
        before = finished(stack)
        sent = time.monotonic()
        responses, error, ended = run_out(stack.stub.Generate(pb.GenerateRequest(
            prompt="queued", deadline_ms=500, sampling_params=pb.SamplingParams(max_tokens=4))))
    finally:
        blocker.cancel()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (error, responses)
    assert not any(r.token_ids for r in responses)
    assert 0.45 <= ended - sent < 1.5, f"ended {ended - sent:.2f}s after it was sent, with deadline_ms 500"
    assert_engine_idle(stack)
    assert counted(stack, before, {"error": 1, "cancelled": 1}) == {"error": 1, "cancelled": 1}  # the blocker cancelled
    assert_answers(stack.stub)


def test_a_deadline_passing_while_waiting_to_be_tokenized_never_reaches_the_engine(stack, caplog):
    # Chats of 4,096 turns are rendered on the PREPARE_SLOTS worker threads (~0.05 s each here) before they are
    # refused as too long: a chat of more than OFFLOAD_CHAT_MESSAGES turns sent after them waits for a slot.
    # One waits out its deadline_ms, the other its call's timeout (its deadline_ms is later).
    turns = [pb.ChatMessage(role=("user", "assistant")[i % 2], content="word") for i in range(4096)]
    crowd_request = pb.GenerateRequest(chat=pb.Chat(messages=turns), sampling_params=pb.SamplingParams(max_tokens=1))
    late = pb.GenerateRequest(chat=pb.Chat(messages=turns[: OFFLOAD_CHAT_MESSAGES + 2]), deadline_ms=300,
                              sampling_params=pb.SamplingParams(max_tokens=4))
    timed = pb.GenerateRequest()
    timed.CopyFrom(late)
    timed.deadline_ms = 30_000
    before = finished(stack)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        crowd = [stack.stub.Generate(crowd_request) for _ in range(20 * PREPARE_SLOTS)]
        # They have arrived, and the late ones queue behind them: the service has refused the first (each takes
        # ~0.05 s to render; a fixed sleep could end before a slow machine had them all).
        waited = time.monotonic() + 30
        while finished(stack).get("error", 0) == before.get("error", 0) and time.monotonic() < waited:
            time.sleep(0.01)
        sent = time.monotonic()
        by_call = stack.stub.Generate(timed, timeout=0.3, metadata=(("x-request-id", "by-call"),))
        responses, error, ended = run_out(stack.stub.Generate(late, metadata=(("x-request-id", "by-deadline-ms"),)))
        _, call_error, call_ended = run_out(by_call)
        crowd_errors = [run_out(call)[1] for call in crowd]
        counts = counted(stack, before, {"error": len(crowd) + 2})
    assert all(e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in crowd_errors), crowd_errors
    assert error is not None, f"it was served ({responses[-1].finish_reason}) after its deadline_ms passed"
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline_ms" in error.details(), error
    assert call_error is not None and call_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, call_error
    assert max(ended, call_ended) - sent < 1.2, f"ended {ended - sent:.2f}s, {call_ended - sent:.2f}s after sent"
    assert counts == {"error": len(crowd) + 2}
    for rid in ("by-deadline-ms", "by-call"):
        lines = [r.fields for r in caplog.records if r.name == "llmserve.request" and r.fields["request_id"] == rid]
        assert [line.get("engine_request_id") for line in lines] == [None], f"{rid} reached the engine: {lines}"
        assert lines[0]["finish_reason"] == "error" and lines[0]["error"].startswith("DEADLINE_EXCEEDED"), lines
    assert_engine_idle(stack)
    assert_answers(stack.stub)


def test_a_deadline_ms_past_the_calls_timeout_does_not_lengthen_it(stack):
    before = finished(stack)
    sent = time.monotonic()
    responses, error, ended = run_out(stack.stub.Generate(pb.GenerateRequest(
        prompt="Tell me about the sky.", deadline_ms=30_000, sampling_params=LONG), timeout=0.6))
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert ended - sent < 1.2
    assert_engine_idle(stack)
    # Ended by the call's deadline, which the service took as the request's: an error, not the client's cancel.
    assert counted(stack, before, {"error": 1}) == {"error": 1}


def test_deadline_ms_0_is_no_deadline(stack):
    responses, error, _ = run_out(stack.stub.Generate(pb.GenerateRequest(
        prompt="Tell me about the hills.", deadline_ms=0, sampling_params=pb.SamplingParams(max_tokens=64,
                                                                                           ignore_eos=True))))
    assert error is None, error
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH and sum(len(r.token_ids) for r in responses) == 64
