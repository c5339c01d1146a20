"""Pure pieces of the services: config from flags and environment, proto -> SamplingParams, frame coalescing."""

from __future__ import annotations

import asyncio
import math
import types

import grpc
import pytest

from engine_service.outputs import StepOutput, TokenLogprobs
from engine_service.server_config import parse_config
from engine_service.streams import DEADLINE_ERROR, OutputStream, check_prompt_logprobs_size
from engine_service.validation import check_prompt, sampling_params_from_proto
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.text.v1 import text_pb2 as text_pb
from tokenizer_service import servicer as servicer_module
from tokenizer_service.config import parse_config as parse_text_config
from tokenizer_service.metrics import RequestTrace


def test_flags_win_over_environment_and_bad_values_name_the_field():
    env = {"ENGINE_MODEL": "/m", "ENGINE_PORT": "7000", "ENGINE_ENFORCE_EAGER": "true"}
    cfg = parse_config(["--port", "7001"], env)
    assert (cfg.model, cfg.port, cfg.enforce_eager) == ("/m", 7001, True)
    with pytest.raises(ValueError, match="max_waiting"):
        parse_config(["--model", "/m", "--max-waiting", "0"], {})
    overlap = {v: parse_config(["--model", "/m", "--overlap-scheduling", v], {}).engine_kwargs()["overlap_scheduling"]
               for v in ("auto", "true", "false", "on", "OFF")}
    assert overlap == {"auto": None, "true": True, "false": False, "on": True, "OFF": False}
    assert parse_config([], {"ENGINE_MODEL": "/m", "ENGINE_OVERLAP_SCHEDULING": "off"}).auto_flag(
        "overlap_scheduling") is False
    with pytest.raises(ValueError, match="overlap_scheduling must be 'auto' or a boolean"):
        parse_config(["--model", "/m", "--overlap-scheduling", "sometimes"], {})
    fused = {v: parse_config(["--model", "/m", "--fused-ops", v], {}).engine_kwargs()["fused_ops"]
             for v in ("auto", "off", "true")}
    assert fused == {"auto": None, "off": False, "true": True}
    with pytest.raises(ValueError, match="fused_ops must be 'auto' or a boolean"):
        parse_config(["--model", "/m", "--fused-ops", "maybe"], {})
    with pytest.raises(ValueError, match="ENGINE_PORT"):
        parse_config([], {"ENGINE_MODEL": "/m", "ENGINE_PORT": "x"})
    text = parse_text_config([], {"TOKENIZER_MODEL": "/m", "TOKENIZER_ENGINES": "a:1, b:2"})
    assert text.engine_addresses == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="engines"):
        parse_text_config(["--model", "/m"], {})


def test_unset_sampling_fields_take_generation_config_then_engine_defaults():
    proto = pb.SamplingParams(max_tokens=5)
    params = sampling_params_from_proto(proto, {"temperature": 0.7, "top_k": 50})
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (5, 0.7, 50, 1.0)
    proto.temperature = 0.0  # set to zero: greedy, not "unset"
    assert sampling_params_from_proto(proto, {"temperature": 0.7}).temperature == 0.0


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("top_p", 0.0), ("top_k", 0),
                                              ("min_p", 2.0), ("max_tokens", 0), ("min_tokens", -1),
                                              ("temperature", math.inf)])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        sampling_params_from_proto(pb.SamplingParams(**{field: value}), {})


@pytest.mark.parametrize(("prompt", "needle"), [([], "empty"), ([1] * 8, "max_model_len"), ([1, 10], "vocabulary"),
                                                ([-1], "vocabulary")])
def test_prompt_rules(prompt, needle):
    with pytest.raises(ValueError, match=needle):
        check_prompt(prompt, vocab_size=10, max_model_len=8)


def test_output_stream_coalesces_a_step_and_bounds_each_request():
    async def main():
        aborted: list[tuple[str, str | None]] = []
        stream = OutputStream(lambda engine_id, error=None: aborted.append((engine_id, error)), max_buffered_tokens=3)
        stream.register("a", "s1:1:a", None)
        stream.register("b", "s1:2:b", None)
        stream.on_output("a", StepOutput("x", [1]))
        stream.on_output("b", StepOutput("y", [2], "length", num_prompt_tokens=4))
        updates = stream.take()
        assert [(u.request_id, list(u.new_token_ids)) for u in updates] == [("a", [1]), ("b", [2])]
        assert updates[1].finish_reason == pb.FINISH_REASON_LENGTH and "b" not in stream.live
        for t in range(4):  # the client does not read: "a" overflows its buffer and is failed + aborted
            stream.on_output("a", StepOutput("x", [t]))
        [failed] = stream.take()
        assert failed.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        [(engine_id, error)] = aborted  # the engine is told why, for the request's metrics and log line
        assert engine_id == "s1:1:a" and error.startswith("RESOURCE_EXHAUSTED: the client read too slowly")
        stream.input_done = True
        assert stream.done(draining=False)

    asyncio.run(main())


def test_a_backlog_goes_out_in_frames_under_the_byte_budget_in_order():
    """All of a call's buffered updates went out in one ServerFrame: a client that paused while a few hundred
    requests buffered tokens got a message past max_message_bytes, which failed the whole call (RESOURCE_
    EXHAUSTED 'Sent message larger than max'), every request on it with no final update."""
    async def main():
        stream = OutputStream(lambda *a: None, max_buffered_tokens=10_000, max_frame_bytes=2_000)
        stream.register("old", "s1:1:old", None)
        stream.on_output("old", StepOutput("x", [7] * 50, "length"))
        stream.register("old", "s1:2:old", None)  # the id reused: its previous final update waits in `ended`
        for i in range(40):
            stream.register(f"r{i}", f"s1:{i + 3}:r{i}", None)
            stream.on_output(f"r{i}", StepOutput("x", list(range(1000, 1100))))
        for i in range(5):
            stream.reject(f"bad{i}", grpc.StatusCode.INVALID_ARGUMENT, "no")
        frames = []
        while stream.has_updates:
            frames.append(stream.take())
        sizes = [pb.ServerFrame(updates=f).ByteSize() for f in frames]
        assert len(frames) >= 5 and max(sizes) <= 2_000, sizes
        ids = [u.request_id for f in frames for u in f]
        assert ids == ["old"] + [f"r{i}" for i in range(40)] + [f"bad{i}" for i in range(5)]
        assert not stream.wake.is_set()

    asyncio.run(main())


def test_a_call_whose_updates_are_not_read_is_not_read_either():
    """A client that sends requests (here refused at once) and never reads made the engine buffer their
    updates without end: about 940 MiB for 600,000 refusals. Past MAX_BUFFERED_UPDATES the servicer stops
    reading the call's frames until the writer has sent half of them."""
    from engine_service.servicer import EngineServicer
    from engine_service.streams import MAX_BUFFERED_UPDATES

    async def main():
        servicer = EngineServicer(max_waiting=10, max_buffered_tokens=100)  # not started: every request refused
        stream = servicer._new_stream()
        pulled = 0

        async def frames():
            nonlocal pulled
            for n in range(10_000):
                pulled += 1
                yield pb.ClientFrame(requests=[pb.NewRequest(request_id=f"{n}-{k}", prompt_token_ids=[1])
                                               for k in range(100)])

        reader = asyncio.create_task(servicer._read_frames(frames(), stream, "s1:"))
        await asyncio.sleep(0.2)
        first_stop = -(-MAX_BUFFERED_UPDATES // 100)  # the frame that reached the bound is the last one read
        assert not reader.done() and pulled == first_stop, pulled
        assert MAX_BUFFERED_UPDATES <= stream.num_buffered < MAX_BUFFERED_UPDATES + 100
        while stream.num_buffered >= MAX_BUFFERED_UPDATES // 2:
            stream.take()
        await asyncio.sleep(0.05)
        assert pulled > first_stop  # reading again
        reader.cancel()

    asyncio.run(main())


def test_refusing_a_duplicate_id_leaves_the_live_request_alone():
    async def main():
        aborted: list[str] = []
        stream = OutputStream(aborted.append, max_buffered_tokens=100)
        stream.register("a", "s1:1:a", None)
        stream.on_output("a", StepOutput("s1:1:a", [1, 2]))
        stream.reject("a", grpc.StatusCode.INVALID_ARGUMENT, "request_id 'a' is already live on this stream")
        live, refused = stream.take()
        assert list(live.new_token_ids) == [1, 2] and live.finish_reason == pb.FINISH_REASON_UNSPECIFIED
        assert refused.request_id == "a" and refused.finish_reason == pb.FINISH_REASON_ERROR
        assert refused.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "a" in stream.live and aborted == []
        stream.abort("a")  # the live request is still abortable, under its own engine id
        assert aborted == ["s1:1:a"]

    asyncio.run(main())


@pytest.mark.parametrize("end", ["finish", "abort"])
def test_an_id_reused_before_the_writer_ran_keeps_the_two_requests_apart(end):
    """The ended request's final update waited in `pending` under the client's id; the new request's tokens
    were added to it, so one update mixed two requests (old finish reason, new tokens)."""
    async def main():
        aborted: list[str] = []
        stream = OutputStream(aborted.append, max_buffered_tokens=100)
        stream.register("x", "s1:1:x", None)
        stream.on_output("x", StepOutput("s1:1:x", [5]))
        if end == "finish":
            stream.on_output("x", StepOutput("s1:1:x", [6], "length"))
        else:
            assert stream.abort("x")
        stream.register("x", "s1:2:x", None)  # the writer has not run: the old update is still unsent
        stream.on_output("x", StepOutput("s1:2:x", [7]))
        old, new = stream.take()
        assert (old.request_id, list(old.new_token_ids)) == ("x", [5, 6] if end == "finish" else [5])
        assert old.finish_reason == (pb.FINISH_REASON_LENGTH if end == "finish" else pb.FINISH_REASON_ABORT)
        assert (new.request_id, list(new.new_token_ids), new.finish_reason) == ("x", [7], 0)
        assert not stream.has_updates

    asyncio.run(main())


def test_an_unsent_refusal_goes_out_before_a_later_request_of_its_id():
    """A refused request's update waited apart from `pending` and went out last: a client that reused the id
    (its abort of the refused one finds nothing live) got the new request's tokens and finish first, then a stray
    ERROR under the same id. Refused ids leave no entry behind once sent."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=100)
        stream.reject("x", grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        stream.reject("y", grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        assert not stream.abort("x")
        stream.register("x", "s1:2:x", None)
        stream.on_output("x", StepOutput("s1:2:x", [42], "length"))
        sent = [(u.request_id, list(u.new_token_ids), u.finish_reason) for u in stream.take()]
        assert sent == [("x", [], pb.FINISH_REASON_ERROR), ("x", [42], pb.FINISH_REASON_LENGTH),
                        ("y", [], pb.FINISH_REASON_ERROR)]
        assert not stream.has_updates and not stream._refused_ids

    asyncio.run(main())

@pytest.mark.parametrize(("env", "needle"), [
    ({"TOKENIZER_ENGINE_DNS": "llm-engine"}, "NAME:PORT"),
    ({"TOKENIZER_ENGINE_DNS": ":50051"}, "NAME:PORT"),
    ({"TOKENIZER_ENGINE_DNS": "llm-engine:http"}, "NAME:PORT"),
    ({"TOKENIZER_ENGINE_DNS": "llm-engine:50051", "TOKENIZER_ENGINES": "a:1"}, "not both"),
])
def test_engine_dns_must_be_name_and_port_and_exclude_engines(env, needle):
    with pytest.raises(ValueError, match=needle) as err:
        parse_text_config(["--model", "/m"], env)
    assert "engine_dns" in str(err.value) and "--engine-dns" in str(err.value)
    assert parse_text_config(["--model", "/m", "--engine-dns", "llm-engine:50051"], {}).engine_dns


@pytest.mark.parametrize("engines", ["localhost", "127.0.0.1:abc", "http://127.0.0.1:51051", "a:1,host:0"])
def test_engines_must_be_host_and_port(engines):
    """--engines localhost quietly dialled port 443, and 127.0.0.1:abc was retried forever."""
    with pytest.raises(ValueError, match="HOST:PORT") as err:
        parse_text_config(["--model", "/m", "--engines", engines], {})
    assert "--engines" in str(err.value)
    assert parse_text_config(["--model", "/m", "--engines", "a:1,[::1]:50051"], {}).engine_addresses == [
        "a:1", "[::1]:50051"]
    with pytest.raises(ValueError, match="--engines.*--engine-dns"):
        parse_text_config(["--model", "/m"], {})


def test_every_engine_knob_is_a_service_flag_and_reaches_the_engine():
    """gpu_memory_utilization, cpu_kvcache_gib, enable_prefix_caching and seed were engine knobs the service
    could not set; every EngineConfig field is a flag now."""
    import dataclasses

    from engine_service.config import EngineConfig
    from engine_service.server_config import ServerConfig

    service = {f.name for f in dataclasses.fields(ServerConfig)}
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields - service == set()
    cfg = parse_config(["--model", "/m", "--gpu-memory-utilization", "0.5", "--cpu-kvcache-gib", "1.5",
                        "--enable-prefix-caching", "false", "--kv-cache-dtype", "fp8", "--json-mask-budget-s", "0"], {})
    kwargs = cfg.engine_kwargs()
    assert set(kwargs) == engine_fields - {"model"}  # every knob, none left at the engine's default
    engine = EngineConfig.from_kwargs("/m", **kwargs)
    assert (engine.gpu_memory_utilization, engine.cpu_kvcache_gib, engine.enable_prefix_caching) == (0.5, 1.5, False)
    assert engine.kv_cache_dtype == "fp8" and engine.json_mask_budget_s == 0.0
    for flag, value, needle in (("--gpu-memory-utilization", "1.5", "gpu_memory_utilization must be in"),
                                ("--kv-cache-dtype", "fp16", r"kv_cache_dtype must be one of \('auto', 'fp8'\)"),
                                ("--cpu-kvcache-gib", "0", "cpu_kvcache_gib must be positive"),
                                ("--json-mask-budget-s", "-1", r"json_mask_budget_s must be 0 \(no bound\) or a "
                                                               r"positive number of seconds, got -1.0"),
                                ("--json-mask-budget-s", "nan", "json_mask_budget_s must be a finite number")):
        with pytest.raises(ValueError, match=needle):
            parse_config(["--model", "/m", flag, value], {})


def test_max_buffered_tokens_must_fit_one_frame():
    from engine_service.server_config import parse_config

    with pytest.raises(ValueError, match="max_buffered_tokens .* too large for max_message_bytes"):
        parse_config(["--model", "m", "--max-message-bytes", "100000", "--max-buffered-tokens", "65536"], {})
    assert parse_config(["--model", "m"], {}).max_buffered_tokens == 65536  # the defaults fit


@pytest.mark.parametrize("how", ["in-band abort", "call ended"])
def test_an_abort_at_the_deadline_counts_as_the_deadline(how):
    """The client's deadline timer fires a few ms before the engine's: its cancel or abort came first, and a passed
    deadline was counted and logged as a client abort (about 1 deadline in 12 in an audit's fuzz)."""
    async def main():
        aborted: list[tuple[str, str | None]] = []
        stream = OutputStream(lambda engine_id, error=None, stopped=False: aborted.append((engine_id, error)),
                              max_buffered_tokens=100)
        stream.register("due", "s1:1:due", 0.02)  # within DEADLINE_SLACK_S of its deadline
        stream.register("later", "s1:2:later", 30.0)
        if how == "in-band abort":
            assert stream.abort("due") and stream.abort("later")
        else:
            stream.abort_all()
        assert sorted(aborted) == [("s1:1:due", DEADLINE_ERROR), ("s1:2:later", None)]
        if how == "in-band abort":
            updates = {u.request_id: u for u in stream.take()}
            assert updates["due"].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert updates["later"].finish_reason == pb.FINISH_REASON_ABORT
        assert not stream.live

    asyncio.run(main())


def test_grpcs_error_for_a_call_its_deadline_ended_is_one_warning_line(caplog):
    """A deadline passing while a response or status was being written made grpc log an ERROR with a traceback
    (about 1 deadline in 300 in an audit's fuzz, in both services): a routine deadline looked like a server error."""
    import logging

    from clients.tls import quiet_routine_call_ends

    quiet_routine_call_ends()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level(logging.INFO):
        try:
            raise RuntimeError("Failed execute_batch")
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/a.B/C")
        grpc_log.error("Unexpected [%s] raised by servicer method [%s]", "ValueError", "/a.B/C")
    quieted, unexpected = [r for r in caplog.records if r.name == grpc_log.name]
    assert (unexpected.levelname, unexpected.getMessage()) == (
        "ERROR", "Unexpected [ValueError] raised by servicer method [/a.B/C]")
    # One line without the traceback, still visible: a message over max_message_bytes fails the same way.
    assert quieted.levelname == "WARNING" and quieted.exc_info is None
    assert quieted.getMessage().startswith("could not send on [/a.B/C]: the call had already ended")
    assert "Failed execute_batch" in quieted.getMessage()


def test_a_slow_reader_of_logprobs_is_bounded_in_bytes_not_only_in_tokens():
    """A token with 20 logprobs is some 40 times the bytes of its id: a slow reader's update outgrew
    max_message_bytes under a token bound the start-up check had passed, and gRPC failed the whole stream."""
    async def main():
        aborted: list[str] = []
        stream = OutputStream(lambda engine_id, error=None: aborted.append(engine_id), max_buffered_tokens=200)
        stream.register("lp", "s1:1:lp", None)
        stream.register("plain", "s1:2:plain", None)
        lp = TokenLogprobs(-0.5, list(range(20)), [-1.0] * 20)
        for _ in range(200):
            stream.on_output("lp", StepOutput("s1:1:lp", [7], logprobs=[lp]))
            stream.on_output("plain", StepOutput("s1:2:plain", [7]))
        updates = {u.request_id: u for u in stream.take()}
        assert updates["lp"].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "with logprobs" in updates["lp"].status.message and aborted == ["s1:1:lp"]
        # What it buffered stayed within the bytes of max_buffered_tokens plain ids.
        assert len(updates["lp"].logprobs) * 192 <= 200 * 5
        assert len(updates["plain"].new_token_ids) == 200 and "plain" in stream.live

    asyncio.run(main())


def test_a_small_buffer_still_lets_a_token_with_logprobs_through():
    """Scaled by the bytes logprobs add, a max_buffered_tokens under 41 allowed 0 tokens with 20 alternatives:
    every such request failed at its first token, however fast its client read."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=8)
        stream.register("lp", "s1:1:lp", None)
        stream.on_output("lp", StepOutput("s1:1:lp", [7], logprobs=[TokenLogprobs(-0.5, list(range(20)),
                                                                                   [-1.0] * 20)]))
        [update] = stream.take()
        assert update.finish_reason == pb.FINISH_REASON_UNSPECIFIED and len(update.logprobs) == 1

    asyncio.run(main())


def test_prompt_logprobs_ride_on_the_first_update_and_their_worst_size_is_bounded():
    """All of a prompt's logprobs go in one update: the engine refuses a prompt whose could not fit the bound, and
    the bound is never below what protobuf actually takes."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=8)
        stream.register("p", "s1:1:p", None)
        prompt = [TokenLogprobs(-123.456, [2**31 - 1] * 20, [-1e30] * 20) for _ in range(1000)]
        stream.on_output("p", StepOutput("s1:1:p", [7], prompt_logprobs=prompt))
        [update] = stream.take()
        assert len(update.prompt_logprobs) == 1000 and list(update.new_token_ids) == [7]
        worst = update.prompt_logprobs[0].ByteSize() + 3  # and its tag and length in the update
        assert worst <= 17 + 9 * 20
        check_prompt_logprobs_size(1000, 20, 1000 * (17 + 9 * 20))  # fits
        with pytest.raises(ValueError, match=r"^prompt_logprobs=20 for a 1001-token prompt would make one update"):
            check_prompt_logprobs_size(1001, 20, 1000 * (17 + 9 * 20))

    asyncio.run(main())


def test_an_n_request_ends_with_its_last_final_message_not_a_loop_turn_later(monkeypatch):
    """GenerateMulti keeps a request's id live until its generator ends; with n > 1 that waited for each completion's
    task to run once more after its final message (a full queue delays it), and an abort of the id in between
    added an ABORT after the final messages. The generator now ends with the last final message, even while a
    completion's task has not finished."""
    async def scenario() -> list:
        service = servicer_module.TextServicer(None, None, "m", 10, set(), {}, max_inflight=8)
        stuck = asyncio.Event()  # never set: completion 1's task stays alive after its final message

        async def one(prep, engine_request, timeout_s, trace, placement=None, counted=False):
            trace.finish_reason = "length"
            yield text_pb.GenerateResponse(text="x", token_ids=[1], finish_reason=text_pb.FINISH_REASON_LENGTH)
            if engine_request == 1:
                await stuck.wait()

        monkeypatch.setattr(service, "_generate_one", one)
        monkeypatch.setattr(servicer_module, "_choice_request", lambda prep, i: i)
        prep = types.SimpleNamespace(n=2, num_prompt_tokens=3)
        trace = RequestTrace("r")
        got = []

        async def read() -> None:
            async for response in service._generate_n(prep, None, trace):
                got.append(response)

        await asyncio.wait_for(read(), 5)
        await asyncio.sleep(0)  # the cancelled task's done callback gives its place back
        return [got, trace.finish_reason, trace.completion_tokens, service.inflight]

    got, reason, tokens, inflight = asyncio.run(scenario())
    assert sorted(r.index for r in got) == [0, 1]
    assert all(r.finish_reason == text_pb.FINISH_REASON_LENGTH for r in got)
    assert (reason, inflight) == ("length", 0)


@pytest.mark.parametrize("variable, field", [("ENGINE_ENABLE_PREFIX_CACHING", "enable_prefix_caching"),
                                             ("ENGINE_LOG_REQUESTS", "log_requests")])
def test_a_blank_boolean_variable_is_refused_not_read_as_false(variable, field):
    """A ConfigMap key left empty turned off what defaults to on, silently, where a blank number is refused."""
    base = {"ENGINE_MODEL": "/m"}
    assert getattr(parse_config([], base), field) is True  # the default the blank value turned off
    for blank in ("", "  "):
        with pytest.raises(ValueError, match=f"{variable}={blank!r} is invalid: expected a boolean"):
            parse_config([], {**base, variable: blank})
    with pytest.raises(SystemExit):
        parse_config(["--log-requests", ""], base)
    assert getattr(parse_config([], {**base, variable: " Off "}), field) is False
    text = parse_text_config([], {"TOKENIZER_MODEL": "/m", "TOKENIZER_ENGINES": "a:1", "TOKENIZER_LOG_REQUESTS": "yes"})
    assert text.log_requests is True
    with pytest.raises(ValueError, match="TOKENIZER_LOG_REQUESTS=''"):
        parse_text_config([], {"TOKENIZER_MODEL": "/m", "TOKENIZER_ENGINES": "a:1", "TOKENIZER_LOG_REQUESTS": ""})


def test_held_stop_signals_reach_the_event_loop_once():
    """hold() records SIGTERM/SIGINT instead of dying of them; take_over() answers them on the event loop from
    then on, and at once for one that came while held (clients/stop_signals.py)."""
    import os
    import signal

    from clients import stop_signals

    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}

    async def run() -> list[str]:
        calls: list[str] = []
        loop = asyncio.get_running_loop()
        stop_signals.take_over(loop, lambda: calls.append("stop"))
        assert calls == ["stop"]  # the held one, at once
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.2)
        for sig in stop_signals.STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        return calls

    try:
        stop_signals.hold()
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: this process lives on
        assert asyncio.run(run()) == ["stop", "stop"]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("package", ["engine_service", "tokenizer_service"])
def test_each_packages_entry_point_holds_stop_signals_before_importing_its_service(package):
    """The entry point (`engine-service`, `python -m engine_service`) must hold SIGTERM before it imports the
    service, whose imports and start-up take the time in which a PID 1 dropped the signal: a stand-in for the
    service's module records, as it is imported, whether SIGTERM was held."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import importlib.abc, importlib.util, runpy, signal, sys
from clients import stop_signals
class Stand(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "{package}.server" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        held = signal.getsignal(signal.SIGTERM) is stop_signals._record
        module.main = lambda: print("held at import" if held else "not held at import")
sys.meta_path.insert(0, Stand())
runpy.run_module("{package}", run_name="__main__")
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "held at import", out.stdout + out.stderr


def test_an_update_carries_the_cached_prompt_tokens():
    """num_cached_tokens reaches the update (usage's cached_tokens): dropping it passed every test."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=8)
        stream.register("p", "s1:1:p", None)
        stream.on_output("p", StepOutput("s1:1:p", [7], "length", num_prompt_tokens=12, num_cached_tokens=8))
        [update] = stream.take()
        return update.num_prompt_tokens, update.num_cached_tokens

    assert asyncio.run(main()) == (12, 8)


def test_logprob_tokens_are_buffered_up_to_the_same_bytes_as_ids():
    """A slow reader's buffer of tokens with logprobs holds max_buffered_tokens' bytes, not a fifth of them: with no
    alternatives (22 bytes a token) 220 ids' bytes are 50 tokens; the 51st fails the request."""
    async def main():
        stream = OutputStream(lambda *a, **k: None, max_buffered_tokens=220)
        stream.register("p", "s1:1:p", None)
        logprobs = [TokenLogprobs(-0.5, [], []) for _ in range(50)]
        stream.on_output("p", StepOutput("s1:1:p", [7] * 50, logprobs=logprobs))
        alive_at_50 = "p" in stream.live
        stream.on_output("p", StepOutput("s1:1:p", [7], logprobs=logprobs[:1]))
        return alive_at_50, "p" in stream.live

    assert asyncio.run(main()) == (True, False)
