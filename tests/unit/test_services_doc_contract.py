"""docs/SERVICES.md's text-API and engine-pool statements, held to the tokenizer service's code (an audit): what a
stop id's text does with and without include_stop_str_in_output, what usage counts at a stop string, how
--stream-interval and --stream-max-wait-s group tokens, when a request moves to another engine (and when it does not),
what an n request's abort counts, the numbers the document states, and that a bad stop string is refused as bad
input whatever the load (it was "queue is full" under load: the one statement found not to hold).

In-process: the servicer over scripted engine updates (tests/unit/test_text_service_regressions.py's pools), no
server, no engine process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tests.unit.test_text_service_regressions import (
    _call_context,
    _Engine,
    _error_update,
    _generate_all,
    _ScriptedUpdates,
    _servicer,
    _start_multi,
)
from tokenizer_service.engine_pool import RequestFailed
from tokenizer_service.validation import MAX_STOP_STRING_CHARS

pytestmark = pytest.mark.timeout(60)

EOS = 0  # _servicer's EOS id
DOC = (Path(__file__).resolve().parents[2] / "docs" / "SERVICES.md").read_text()


def _update(ids: list[int], finish: int = 0) -> engine_pb.RequestUpdate:
    return engine_pb.RequestUpdate(new_token_ids=ids, finish_reason=finish)


def _words(demo_tokenizer, text: str = "the sea and the sky") -> list[int]:
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= 4, ids
    return ids


# Stop ids and EOS: "without it that token's id is sent and counted, but its text, `</s>` with skip_special_tokens
# off or a stop id's word, is not, as in vLLM"; include_stop_str_in_output "also keeps the text of the EOS or
# stop_token_ids token that ended a request".

@pytest.mark.parametrize("include", [False, True], ids=["dropped", "kept"])
def test_the_eos_that_ends_a_request_is_sent_and_counted_its_text_only_when_included(demo_tokenizer, include):
    ids = _words(demo_tokenizer)
    eos_text = demo_tokenizer.decode([EOS], skip_special_tokens=False)
    assert eos_text, "the EOS id must have text of its own for this test to tell"
    pool = _ScriptedUpdates({"e1": [_update(ids), _update([EOS], engine_pb.FINISH_REASON_STOP)]})
    request = pb.GenerateRequest(prompt="hi", skip_special_tokens=False, include_stop_str_in_output=include)
    got, failed = _generate_all(demo_tokenizer, pool, request)
    assert failed is None
    assert [t for r in got for t in r.token_ids] == [*ids, EOS]
    assert got[-1].usage.completion_tokens == len(ids) + 1
    text = "".join(r.text for r in got)
    assert text == demo_tokenizer.decode(ids + [EOS] if include else ids, skip_special_tokens=False)
    assert got[-1].finish_reason == pb.FINISH_REASON_STOP and got[-1].stop_reason == ""


@pytest.mark.parametrize("include", [False, True], ids=["dropped", "kept"])
def test_a_stop_token_ids_word_is_left_out_unless_included(demo_tokenizer, include):
    ids = _words(demo_tokenizer)
    stop_id = ids[-1]
    pool = _ScriptedUpdates({"e1": [_update(ids[:-1]), _update([stop_id], engine_pb.FINISH_REASON_STOP)]})
    request = pb.GenerateRequest(prompt="hi", include_stop_str_in_output=include,
                                 sampling_params=pb.SamplingParams(stop_token_ids=[stop_id]))
    got, failed = _generate_all(demo_tokenizer, pool, request)
    assert failed is None
    assert [t for r in got for t in r.token_ids] == ids and got[-1].usage.completion_tokens == len(ids)
    assert "".join(r.text for r in got) == demo_tokenizer.decode(ids if include else ids[:-1])


@pytest.mark.parametrize("include", [False, True], ids=["dropped", "kept"])
def test_completion_tokens_end_with_the_stop_strings_token(demo_tokenizer, include):
    """'completion counts the tokens sent, which end with the token whose text completed the stop string'; the text
    ends at the stop string (with it where include_stop_str_in_output), and stop_reason names it. Usage counted
    the whole engine update, so it depended on how the engine's updates coalesced."""
    ids = _words(demo_tokenizer)
    full = demo_tokenizer.decode(ids)
    stop = "sea"
    end = full.index(stop)
    pool = _ScriptedUpdates({"e1": [_update(ids), _update([ids[0]], engine_pb.FINISH_REASON_LENGTH)]})
    got, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi", stop=[stop],
                                                                include_stop_str_in_output=include))
    assert failed is None and got[-1].finish_reason == pb.FINISH_REASON_STOP and got[-1].stop_reason == stop
    assert "".join(r.text for r in got) == full[: end + len(stop) if include else end]
    through = next(k for k in range(1, len(ids) + 1) if stop in demo_tokenizer.decode(ids[:k]))
    assert through < len(ids)  # the update goes on past the stop string
    assert got[-1].usage.completion_tokens == through == len([t for r in got for t in r.token_ids])
    assert got[-1].usage.prompt_tokens == len(demo_tokenizer.encode("hi"))


def test_usage_carries_the_engines_cached_tokens(demo_tokenizer):
    """'usage (prompt, completion, cached tokens)': cached_tokens is what the engine reported."""
    ids = _words(demo_tokenizer)
    updates = [engine_pb.RequestUpdate(new_token_ids=ids[:2], num_cached_tokens=16),
               _update(ids[2:], engine_pb.FINISH_REASON_LENGTH)]
    got, failed = _generate_all(demo_tokenizer, _ScriptedUpdates({"e1": updates}), pb.GenerateRequest(prompt="hi"))
    assert failed is None
    assert got[-1].usage.cached_tokens == 16 and got[-1].usage.completion_tokens == len(ids)


# --stream-interval: "tokens a message carries after the first, which goes out at once; with 4, text is sent once 4
# tokens have come or the request ends".

@pytest.mark.parametrize("interval,sizes", [(1, [1] * 9), (4, [1, 4, 4]), (3, [1, 3, 3, 2])])
def test_stream_interval_sends_the_first_token_at_once_then_groups(demo_tokenizer, interval, sizes):
    ids = _words(demo_tokenizer, "the sea and the sky and the sea and the sky")[:9]
    assert len(ids) == 9
    updates = [_update([t], engine_pb.FINISH_REASON_LENGTH if i == 8 else 0) for i, t in enumerate(ids)]
    got, failed = _generate_all(demo_tokenizer, _ScriptedUpdates({"e1": updates}), pb.GenerateRequest(prompt="hi"),
                       stream_interval=interval, stream_max_wait_s=0.0)
    assert failed is None
    assert [len(r.token_ids) for r in got] == sizes
    assert "".join(r.text for r in got) == demo_tokenizer.decode(ids)


def test_stream_interval_sends_what_it_held_before_an_error(demo_tokenizer):
    """'a request that fails ... still gets what was held back first'."""
    ids = _words(demo_tokenizer)
    updates = [_update([t]) for t in ids] + [_error_update(grpc.StatusCode.INTERNAL, [])]
    got, failed = _generate_all(demo_tokenizer, _ScriptedUpdates({"e1": updates}), pb.GenerateRequest(prompt="hi"),
                       stream_interval=100, stream_max_wait_s=0.0)
    assert failed is not None and failed.code == grpc.StatusCode.INTERNAL
    assert [len(r.token_ids) for r in got] == [1, len(ids) - 1]
    assert "".join(r.text for r in got) == demo_tokenizer.decode(ids)


# Retries: "a request that has not yet received a token is retried, on another engine where there is one (up to 3
# attempts). So is a request an engine refuses before its first token with RESOURCE_EXHAUSTED ..., on an engine not
# yet tried, within the same 3 attempts; once those are spent, or every ready engine able to serve it has refused
# it, the refusal is the caller's ... `(from B, the last of N attempts before any token, on A, B)`".

def _served(demo_tokenizer) -> list[engine_pb.RequestUpdate]:
    return [_update(_words(demo_tokenizer), engine_pb.FINISH_REASON_LENGTH)]


def test_a_request_lost_before_its_first_token_is_tried_on_three_engines_at_most(demo_tokenizer):
    lost = [_error_update(grpc.StatusCode.UNAVAILABLE, [])]
    pool = _ScriptedUpdates({"e1": lost, "e2": lost, "e3": lost, "e4": _served(demo_tokenizer)})
    got, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi"))
    assert pool.sent == ["e1", "e2", "e3"] and got == []
    assert failed is not None and failed.code == grpc.StatusCode.UNAVAILABLE
    assert failed.message.endswith("(from e3, the last of 3 attempts before any token, on e1, e2, e3)"), failed.message


def test_a_full_engine_queue_moves_the_request_to_an_engine_not_yet_tried(demo_tokenizer):
    full = [_error_update(grpc.StatusCode.RESOURCE_EXHAUSTED, [])]
    pool = _ScriptedUpdates({"e1": full, "e2": _served(demo_tokenizer)})
    got, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi"))
    assert failed is None and pool.sent == ["e1", "e2"]
    assert got[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_full_everywhere_is_the_callers_refusal_naming_the_engines_tried(demo_tokenizer):
    full = [_error_update(grpc.StatusCode.RESOURCE_EXHAUSTED, [])]
    pool = _ScriptedUpdates({"e1": full, "e2": full})
    _, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi"))
    assert pool.sent == ["e1", "e2"]
    assert failed is not None and failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.message.endswith("(from e2, the last of 2 attempts before any token, on e1, e2)"), failed.message


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_request_that_got_a_token_is_not_sent_again(demo_tokenizer, code):
    """Once a token reached the caller the failure is the caller's, with the tokens before it."""
    ids = _words(demo_tokenizer)
    pool = _ScriptedUpdates({"e1": [_update(ids), _error_update(code, [])], "e2": _served(demo_tokenizer)})
    got, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi"))
    assert pool.sent == ["e1"]
    assert failed is not None and failed.code == code and "attempts" not in failed.message
    assert [t for r in got for t in r.token_ids] == ids


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.INVALID_ARGUMENT])
def test_other_failures_before_a_token_are_not_retried(demo_tokenizer, code):
    """Only UNAVAILABLE (a lost, draining or failed engine) and a full queue move a request: a failed step
    (INTERNAL), a deadline or a refusal of the request itself would fail the same way elsewhere."""
    pool = _ScriptedUpdates({"e1": [_error_update(code, [])], "e2": _served(demo_tokenizer)})
    got, failed = _generate_all(demo_tokenizer, pool, pb.GenerateRequest(prompt="hi"))
    assert pool.sent == ["e1"] and got == []
    assert failed is not None and failed.code == code


# max_inflight: "a request with n = 4 is refused with RESOURCE_EXHAUSTED unless four are free, and with
# INVALID_ARGUMENT where max_inflight is under 4"; the status table's message: "queue is full".

def test_max_inflight_refusals(demo_tokenizer):
    async def main():
        servicer = _servicer(demo_tokenizer, _ScriptedUpdates({"e1": _served(demo_tokenizer)}), max_inflight=4)
        errors = []
        for n, inflight in ((5, 0), (4, 1)):
            servicer.inflight = inflight
            try:
                async for _ in servicer.Generate(pb.GenerateRequest(prompt="hi", n=n), _call_context()):
                    pass
            except RequestFailed as exc:
                errors.append(exc)
        return errors

    too_many, full = asyncio.run(main())
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT and "max_inflight 4" in too_many.message
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.message


def test_stream_max_wait_sends_held_text_once_its_oldest_token_waited_that_long(demo_tokenizer):
    """'--stream-max-wait-s ... it goes out with the first engine update that comes this long or longer after its
    oldest token ...; 0: wait for the full interval'. Updates 50 ms apart, an interval no request reaches: with no
    wait limit all but the first token come in the last message; with 80 ms, some go out between (a slower machine
    only spaces the updates further)."""
    ids = _words(demo_tokenizer)

    class Paced(_ScriptedUpdates):
        async def submit(self, request, timeout_s, avoid=(), prefer=None):
            handle = await super().submit(request, timeout_s, avoid, prefer)
            updates = handle._updates

            async def paced():
                async for update in updates():
                    await asyncio.sleep(0.05)
                    yield update

            handle._updates = paced
            return handle

    def sizes(max_wait: float) -> list[int]:
        updates = [_update([t], engine_pb.FINISH_REASON_LENGTH if i == len(ids) - 1 else 0) for i, t in enumerate(ids)]
        got, failed = _generate_all(demo_tokenizer, Paced({"e1": updates}), pb.GenerateRequest(prompt="hi"),
                           stream_interval=1024, stream_max_wait_s=max_wait)
        assert failed is None and "".join(r.text for r in got) == demo_tokenizer.decode(ids)
        return [len(r.token_ids) for r in got]

    assert sizes(0.0) == [1, len(ids) - 1]
    waited = sizes(0.08)
    assert len(waited) > 2 and waited[0] == 1 and sum(waited) == len(ids), waited


def test_the_documented_numbers_are_the_codes():
    """Numbers docs/SERVICES.md states for the text API and the engine pool (their behaviour is tested elsewhere
    against the constants, so a changed constant would pass there and leave the document wrong)."""
    from tokenizer_service import chat, engine_pool, servicer, validation

    assert servicer.MAX_ATTEMPTS == 3  # "(up to 3 attempts)"
    assert validation.MAX_N == 16  # "`n` (1 to 16; default 1)"
    assert servicer.MAX_MULTI_REQUEST_ID_CHARS == 256  # "names its request_id (at most 256 characters)"
    assert servicer.PROMPT_LOGPROBS_PER_MESSAGE == 1024  # "at most 1,024 in one message"
    assert servicer.DEADLINE_SLACK_S == 0.05  # "A client's cancel within 50 ms of it"
    assert engine_pool.DEADLINE_GRACE_S == 1.0  # "where it has not 1 s later ... the pool fails it itself"
    assert engine_pool.STREAM_PROVEN_S == 1.0  # "a frame from the engine, or 1 s open"
    assert engine_pool.HEARTBEATS_OF_SILENCE == 4  # "and at least four heartbeat periods"
    assert engine_pool.silence_limit(10.0, 5000) == 20.0 and engine_pool.silence_limit(0.0, 5000) == 0.0
    # "(each wait give or take a fifth at random)"
    waits = [engine_pool.jittered(1.0) for _ in range(2000)]
    assert 0.8 <= min(waits) < 0.85 and 1.15 < max(waits) <= 1.2
    assert servicer.OFFLOAD_TOKENIZE_BYTES == 8 * 1024 and servicer.OFFLOAD_API_BYTES == 64 * 1024  # "8 KiB", "64 KiB"
    assert servicer.OFFLOAD_CHAT_MESSAGES == 64 and servicer.OFFLOAD_STOP_CHARS == 4096
    assert 1 <= servicer.PREPARE_SLOTS <= 4 and servicer.API_SLOTS == 1  # "up to 4 ... one heavy Tokenize"
    assert (validation.MAX_STOP_STRINGS, validation.MAX_STOP_STRING_CHARS, validation.MAX_STOP_TOKEN_IDS) == (64, 1024,
                                                                                                             1024)
    assert validation.MAX_LOGPROBS == 20 and validation.MAX_LOGIT_BIAS_TOKENS == 1024
    assert validation.MAX_JSON_SCHEMA_BYTES == 64 * 1024  # "at most 64 KiB"
    assert (chat.MAX_TOOLS, chat.MAX_TOOL_CALLS, chat.MAX_JSON_DEPTH, chat.MAX_TEMPLATE_KWARGS) == (128, 1024, 32, 64)
    limits = validation.TextLimits()
    assert limits.max_detokenize_ids == 1_048_576  # "at most 1,048,576 ids in a Detokenize call"
    assert (limits.max_prompt_bytes, limits.max_messages) == (8 * 2**20, 4096)  # "8 MiB", "4,096 chat messages"
    # The document's own words, built from the constants: a number changed in the doc alone fails here too.
    phrases = [
        f"(up to {servicer.MAX_ATTEMPTS} attempts)",
        f"`n` (1 to {validation.MAX_N}; default 1)",
        f"at most {servicer.MAX_MULTI_REQUEST_ID_CHARS} characters",
        f"at most {servicer.PROMPT_LOGPROBS_PER_MESSAGE:,} in one message",
        f"within {servicer.DEADLINE_SLACK_S * 1000:g} ms of it",
        f"where it has not {engine_pool.DEADLINE_GRACE_S:g} s later",
        f"or {engine_pool.STREAM_PROVEN_S:g} s open",
        "and at least four heartbeat periods",
        f"over {servicer.OFFLOAD_TOKENIZE_BYTES // 1024} KiB on the wire",
        f"or chats of over {servicer.OFFLOAD_CHAT_MESSAGES} messages",
        f"stop strings of over {servicer.OFFLOAD_STOP_CHARS:,} characters in all",
        "one heavy `Tokenize` or `Detokenize` (`API_SLOTS`",
        f"at most {validation.MAX_JSON_SCHEMA_BYTES // 1024} KiB)",
        f"at most {limits.max_detokenize_ids:,} ids in a `Detokenize` call",
        f"at most {limits.max_prompt_bytes >> 20} MiB of UTF-8, at most {limits.max_messages:,} chat messages, at most "
        f"{validation.MAX_STOP_STRINGS} stop strings of at most {validation.MAX_STOP_STRING_CHARS:,} characters each",
        f"at most {validation.MAX_LOGIT_BIAS_TOKENS:,} tokens;",
    ]
    doc = " ".join(DOC.split())
    missing = [phrase for phrase in phrases if phrase not in doc]
    assert not missing, missing


@pytest.mark.parametrize("stop", [[""], ["x" * (MAX_STOP_STRING_CHARS + 1)]], ids=["empty", "too-long"])
def test_a_bad_stop_string_is_invalid_argument_even_when_the_queue_is_full(demo_tokenizer, stop):
    """The status table: 'the tokenizer service checks its fields first (n, response_format and json_schema, stop
    strings, ...) ..., after the queue check' its texts'. An empty or over-long stop string was checked only as the
    prompt was tokenized, after the queue check: under load it was RESOURCE_EXHAUSTED ("retry later"), which a
    client's retry policy would retry in vain; no load lets it through."""
    async def main():
        servicer = _servicer(demo_tokenizer, _ScriptedUpdates({"e1": _served(demo_tokenizer)}), max_inflight=1)
        errors = []
        for inflight in (0, 1):  # idle, then full
            servicer.inflight = inflight
            try:
                async for _ in servicer.Generate(pb.GenerateRequest(prompt="hi", stop=stop), _call_context()):
                    pass
            except RequestFailed as exc:
                errors.append(exc)
        return errors

    idle, full = asyncio.run(main())
    assert idle.code == grpc.StatusCode.INVALID_ARGUMENT and "stop[0]" in idle.message, idle.message
    assert (full.code, full.message) == (idle.code, idle.message)


@pytest.mark.parametrize("skip", [None, True, False], ids=["default", "true", "false"])
def test_skip_special_tokens_defaults_to_true(demo_tokenizer, skip):
    """'skip_special_tokens (default true)': a special token the model writes mid-reply is left out of the text
    unless it is set false; its id is sent either way."""
    ids = _words(demo_tokenizer)
    special = EOS  # a special token that does not end the request here (ignore_eos)
    assert demo_tokenizer.decode([special], skip_special_tokens=False)
    assert not demo_tokenizer.decode([special], skip_special_tokens=True)
    got_ids = [ids[0], special, *ids[1:]]
    pool = _ScriptedUpdates({"e1": [_update(got_ids, engine_pb.FINISH_REASON_LENGTH)]})
    request = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(ignore_eos=True))
    if skip is not None:
        request.skip_special_tokens = skip
    got, failed = _generate_all(demo_tokenizer, pool, request)
    assert failed is None and [t for r in got for t in r.token_ids] == got_ids
    assert "".join(r.text for r in got) == demo_tokenizer.decode(got_ids, skip_special_tokens=skip is not False)


def test_an_n_requests_abort_counts_the_prompt_once_the_most_cached_and_every_completions_tokens(demo_tokenizer):
    """'an abort ... ends them all, with one ABORT message ... whose usage counts the prompt once, the most cached
    tokens any completion found, and the tokens the call carried for every completion'."""
    class Endless:
        """Each request a token every 10 ms, without end; the i-th sent reports cached[i] cached tokens."""

        max_model_len = 100_000
        cached = (3, 7)

        def __init__(self) -> None:
            self.conns, self.sent = [_Engine("e1")], 0

        def can_try_another(self, tried, params) -> bool:
            return False

        async def submit(self, request, timeout_s, avoid=(), prefer=None):
            cached, self.sent = self.cached[self.sent], self.sent + 1
            conn = self.conns[0]

            class Handle:
                got_tokens = True

                def __init__(self) -> None:
                    self.conn = conn

                async def _updates(self):
                    for k in range(10**6):
                        await asyncio.sleep(0.01)
                        yield engine_pb.RequestUpdate(new_token_ids=[10 + k % 50], num_cached_tokens=cached)

                def __aiter__(self):
                    return self._updates()

                def close(self, stopped: bool = False) -> None:
                    pass

            return Handle()

    async def main() -> list[pb.GenerateResponse]:
        servicer = _servicer(demo_tokenizer, Endless())
        frames, out, consumer = _start_multi(servicer)
        await frames.put(pb.MultiRequest(generate=pb.GenerateRequest(request_id="a", prompt="hi", n=2)))
        for _ in range(500):  # until both completions have sent tokens
            if {r.index for r in out if r.token_ids} == {0, 1}:
                break
            await asyncio.sleep(0.01)
        assert {r.index for r in out if r.token_ids} == {0, 1}, out
        for frame in (pb.MultiRequest(abort_request_id="a"), None):
            await frames.put(frame)
        await asyncio.wait_for(consumer, 10)
        return out

    out = asyncio.run(main())
    ends = [r for r in out if r.finish_reason]
    assert [pb.FinishReason.Name(r.finish_reason) for r in ends] == ["FINISH_REASON_ABORT"], ends
    usage = ends[0].usage
    assert usage.prompt_tokens == len(demo_tokenizer.encode("hi"))  # once, not n times
    assert usage.cached_tokens == max(Endless.cached)
    assert usage.completion_tokens == sum(len(r.token_ids) for r in out) >= 2


@pytest.mark.parametrize("include", [False, True], ids=["dropped", "kept"])
def test_the_ids_and_logprobs_sent_end_at_the_token_that_completed_the_stop_string(demo_tokenizer, include):
    """Several tokens in one update (the engine's updates coalesce when the reader falls behind): the ids and
    logprobs after the one whose text completed the stop string went out with the last message, though their text
    never does, and which ids a caller got depended on the timing. Usage counted them too (it now counts the ids
    sent)."""
    ids = _words(demo_tokenizer, "the sea and the sky and the land")
    stop = "sea"
    last = next(j for j in range(1, len(ids) + 1) if stop in demo_tokenizer.decode(ids[:j]))
    assert last < len(ids) - 1, "tokens must follow the stop string's for this test to tell"
    logprobs = [engine_pb.TokenLogprobs(logprob=-0.5 - i, top_token_ids=[t], top_logprobs=[-0.5 - i])
                for i, t in enumerate(ids)]
    update = engine_pb.RequestUpdate(new_token_ids=ids, logprobs=logprobs)
    pool = _ScriptedUpdates({"e1": [update, _update([ids[0]], engine_pb.FINISH_REASON_LENGTH)]})
    request = pb.GenerateRequest(prompt="hi", stop=[stop], include_stop_str_in_output=include,
                                 sampling_params=pb.SamplingParams(logprobs=1))
    got, failed = _generate_all(demo_tokenizer, pool, request)
    assert failed is None and got[-1].finish_reason == pb.FINISH_REASON_STOP
    sent = [t for r in got for t in r.token_ids]
    assert sent == ids[:last]
    assert [round(lp.logprob, 3) for r in got for lp in r.logprobs] == [-0.5 - i for i in range(last)]
    assert got[-1].usage.completion_tokens == last


@pytest.mark.parametrize("coalesced", [False, True])
def test_a_stop_string_just_before_the_stop_id_that_finished_the_request_ends_the_ids_there(demo_tokenizer,
                                                                                               coalesced):
    """The engine stopped on a stop token id right after the token whose text completed a stop string. Arriving in
    one update, the stop id was still sent and counted, after the stop string's token; arriving alone, it never
    was (the stop string had ended the request)."""
    ids = _words(demo_tokenizer)
    stop = "sea"
    last = next(j for j in range(1, len(ids) + 1) if stop in demo_tokenizer.decode(ids[:j]))
    stop_id = ids[-1]
    through = ids[:last] + [stop_id]
    updates = ([_update(through, engine_pb.FINISH_REASON_STOP)] if coalesced else
               [_update(ids[:last]), _update([stop_id], engine_pb.FINISH_REASON_STOP)])
    request = pb.GenerateRequest(prompt="hi", stop=[stop], sampling_params=pb.SamplingParams(stop_token_ids=[stop_id]))
    got, failed = _generate_all(demo_tokenizer, _ScriptedUpdates({"e1": updates}), request)
    assert failed is None and got[-1].finish_reason == pb.FINISH_REASON_STOP and got[-1].stop_reason == stop
    assert [t for r in got for t in r.token_ids] == ids[:last] and got[-1].usage.completion_tokens == last
