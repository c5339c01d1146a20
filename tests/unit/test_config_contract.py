"""Both services' settings as an operator meets them: a value that cannot work is refused at start-up, by the parser,
in a message that names the setting and the flag or variable it came from, rather than accepted and failing
later (at the first request, in a misleading bind error, or never, in a metrics page that is silently not there).
(tests/unit/test_docs_match_flags.py checks the documented defaults; tests/unit/test_service_pieces.py the basic
HOST:PORT rules and a flag's precedence over its variable.)"""

from __future__ import annotations

import pytest

from engine_service.server_config import ServerConfig
from engine_service.server_config import parse_config as parse_engine_config
from tokenizer_service.config import TextServerConfig
from tokenizer_service.config import parse_config as parse_text_config

ENGINE = ["--model", "/m"]
TOKENIZER = ["--model", "/m", "--engines", "a:1"]


@pytest.mark.parametrize("engines", [",", " ", " , ", "a:1,,b:2", "a:1,"])
def test_an_engine_list_with_an_empty_entry_is_refused(engines):
    """"," and " " passed (a non-empty value) yet named no engine at all: the service started and every request
    waited --engine-wait-s for an engine that was never dialled. "a:1,,b:2" quietly dropped an entry (a name lost
    from a templated list)."""
    with pytest.raises(ValueError, match="empty") as err:
        parse_text_config(["--model", "/m", "--engines", engines], {})
    assert "--engines" in str(err.value) and "TOKENIZER_ENGINES" in str(err.value)


@pytest.mark.parametrize("service", ["engine", "tokenizer"])
@pytest.mark.parametrize("flag", ["--max-connection-idle-s", "--max-connection-age-s", "--keepalive-time-s",
                                  "--keepalive-timeout-s", "--min-ping-interval-s"])
def test_a_grpc_duration_under_a_millisecond_is_refused(service, flag):
    """gRPC takes these in whole milliseconds: 0.0004 became 0 ms, and --max-connection-idle-s then sent every
    connection GOAWAY at once (every call UNAVAILABLE), --max-connection-age-s aborted client processes in grpc-core.
    A millisecond passes."""
    parse = parse_engine_config if service == "engine" else parse_text_config
    argv = ENGINE if service == "engine" else TOKENIZER
    with pytest.raises(ValueError, match="at least 0.001") as err:
        parse([*argv, flag, "0.0004"], {})
    assert flag[2:].replace("-", "_") in str(err.value)
    assert getattr(parse([*argv, flag, "0.001"], {}), flag[2:].replace("-", "_")) == 0.001


def test_a_client_keepalive_under_a_millisecond_is_refused():
    from clients.channel import channel_options

    with pytest.raises(ValueError, match="at least 0.001"):
        channel_options(keepalive_time_s=0.0004)
    assert ("grpc.keepalive_time_ms", 1) in channel_options(keepalive_time_s=0.001)


@pytest.mark.parametrize("engines", ["a:1,a:1", "a:1, b:2 ,a:1", "b:2,b:2,b:2"])
def test_an_engine_listed_twice_is_refused(engines):
    """The pool keeps one connection an address: the second copy replaced the first in its table, and the first went
    on holding a Generate stream to the engine that nothing used or closed."""
    with pytest.raises(ValueError, match="more than once") as err:
        parse_text_config(["--model", "/m", "--engines", engines], {})
    message = str(err.value)
    assert "--engines" in message and "TOKENIZER_ENGINES" in message
    twice = engines.split(",")[0].strip()
    assert twice in message.split("more than once")[0]
    parse_text_config(["--model", "/m", "--engines", "a:1,b:2"], {})  # distinct engines still pass


@pytest.mark.parametrize("engines", ["a b:1", "a..b:1", "a:1:2", "::1:50051", "a:\u0663", "[not-v6]:1", "-a:1"])
def test_an_engine_host_must_be_a_dns_name_or_an_ip_address(engines):
    """Each passed the HOST:PORT check and was dialled for ever (a space or an empty label fails every lookup; an
    unbracketed IPv6 address is ambiguous; an Arabic-Indic digit passed str.isdigit)."""
    with pytest.raises(ValueError, match="HOST:PORT") as err:
        parse_text_config(["--model", "/m", f"--engines={engines}"], {})
    assert "--engines" in str(err.value) and repr(engines.split(",")[-1].strip()) in str(err.value)


def test_an_engine_dns_port_must_be_ascii_digits():
    """'llm-engine:\u0663' passed str.isdigit and int(), and the pool then dialled each address it found with the
    port as written, which gRPC cannot parse: no engine, ever."""
    with pytest.raises(ValueError, match="--engine-dns"):
        parse_text_config(["--model", "/m", "--engine-dns", "llm-engine:\u0663"], {})


def test_the_engine_hosts_the_docs_and_tests_use_are_still_taken():
    engines = "localhost:50051, 10.0.0.7:50051,[::1]:50051,llm-engine.llmserve.svc.cluster.local:50051,[fe80::1%eth0]:1"
    assert parse_text_config(["--model", "/m", "--engines", engines], {}).engine_addresses == [
        "localhost:50051", "10.0.0.7:50051", "[::1]:50051", "llm-engine.llmserve.svc.cluster.local:50051",
        "[fe80::1%eth0]:1"]


@pytest.mark.parametrize("parse, argv, prefix, port", [
    (parse_engine_config, ENGINE, "ENGINE_", ServerConfig.__dataclass_fields__["port"].default),
    (parse_text_config, TOKENIZER, "TOKENIZER_", TextServerConfig.__dataclass_fields__["port"].default)])
def test_a_metrics_port_that_is_the_service_port_is_refused(parse, argv, prefix, port):
    """It passed, the gRPC server took the port, and the metrics server's bind failed with an error line only:
    the service ran without metrics (health_port had this check; metrics_port did not)."""
    with pytest.raises(ValueError, match="metrics_port") as err:
        parse(argv, {prefix + "METRICS_PORT": str(port)})
    assert "--metrics-port" in str(err.value)
    with pytest.raises(ValueError, match="metrics_port"):
        parse([*argv, "--port", "7000", "--metrics-port", "7000"], {})
    assert parse([*argv, "--port", "0", "--metrics-port", "0"], {}).port == 0  # 0: a free port, and metrics off


@pytest.mark.parametrize("parse, argv, prefix", [
    (parse_engine_config, ENGINE, "ENGINE_"), (parse_text_config, TOKENIZER, "TOKENIZER_")])
@pytest.mark.parametrize("host", ["", " ", "my host"])
def test_a_blank_host_is_refused_naming_the_setting(parse, argv, prefix, host):
    """HOST="" (an empty ConfigMap key) passed, and the bind failed with 'another process holds that port, or the
    host is not an address of this machine ... choose another port': the wrong setting named (the tokenizer
    service only after loading its tokenizer)."""
    for args, env in (([*argv, "--host", host], {}), (argv, {prefix + "HOST": host})):
        with pytest.raises(ValueError, match="host") as err:
            parse(args, env)
        assert "--host" in str(err.value) and "[::]" in str(err.value)


@pytest.mark.parametrize("parse, argv, prefix", [
    (parse_engine_config, ENGINE[2:], "ENGINE_"), (parse_text_config, TOKENIZER[2:], "TOKENIZER_")])
def test_a_blank_model_is_refused_as_an_empty_one_is(parse, argv, prefix):
    """MODEL=" " passed the "model must name a model directory" check that MODEL="" meets."""
    with pytest.raises(ValueError, match="model must name a model directory"):
        parse(argv, {prefix + "MODEL": " "})


@pytest.mark.parametrize("parse, argv, var, value", [
    (parse_engine_config, ENGINE, "ENGINE_GRACE_S", "0"),
    (parse_engine_config, ENGINE, "ENGINE_LOG_FORMAT", " json"),
    (parse_engine_config, ENGINE, "ENGINE_GPU_MEMORY_UTILIZATION", "90"),  # the engine's own rule (EngineConfig)
    (parse_text_config, TOKENIZER, "TOKENIZER_CHAT_SPECIAL_TOKENS", "refuse "),
    (parse_text_config, TOKENIZER, "TOKENIZER_STREAM_INTERVAL", "0")])
def test_a_value_refused_after_parsing_names_the_flag_or_variable_it_came_from(parse, argv, var, value):
    """A value that parses but does not pass the settings' rules was refused naming the field alone ("log_format
    must be 'text' or 'json', got ' json'"): neither the flag to change nor that the value came from the
    environment (a ConfigMap with a stray space) rather than from a flag."""
    with pytest.raises(ValueError) as err:
        parse(argv, {var: value})
    assert f"{var}={value!r}" in str(err.value)
    flag = "--" + var.split("_", 1)[1].lower().replace("_", "-")
    for given in ([flag, value], [f"{flag}={value}"]):
        with pytest.raises(ValueError) as err:
            parse([*argv, *given], {var: "ignored"})  # the flag wins: the variable is not its source
        assert flag in str(err.value) and var not in str(err.value)



def test_the_tokenizer_service_name_is_not_the_liveness_name():
    """--service-name liveness passed: the name the liveness probe asks, SERVING from start-up to exit, then also
    followed engine connectivity, so an engine outage failed every tokenizer pod's liveness probe and restarted
    them all."""
    from tokenizer_service.server import LIVENESS

    with pytest.raises(ValueError, match="service_name") as err:
        parse_text_config([*TOKENIZER, "--service-name", LIVENESS], {})
    assert "--service-name" in str(err.value) and "TOKENIZER_SERVICE_NAME" in str(err.value)
    assert "set by" not in str(err.value)  # "the engines" in its prose is not --engines


@pytest.mark.parametrize("parse, argv, prefix", [
    (parse_engine_config, ENGINE, "ENGINE_"), (parse_text_config, TOKENIZER, "TOKENIZER_")])
@pytest.mark.parametrize("name", ["", " "])
def test_a_blank_service_name_is_refused(parse, argv, prefix, name):
    """SERVICE_NAME="" (an empty ConfigMap key) passed: the whole server's name "" was then the only one answered,
    and the readiness probes, which ask for the service's name, got NOT_FOUND: pods that never became ready."""
    with pytest.raises(ValueError, match="service_name") as err:
        parse(argv, {prefix + "SERVICE_NAME": name})
    assert "--service-name" in str(err.value) and prefix + "SERVICE_NAME" in str(err.value)
    default = parse(argv, {}).service_name
    assert f"the default is {default!r}" in str(err.value)


def _start_and_stop(options: list[tuple[str, int]], max_calls: int) -> None:
    """A gRPC server with these options, started and stopped: gRPC reads each option as a C int."""
    import asyncio

    import grpc

    async def run() -> None:
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_calls)
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await server.stop(0)

    asyncio.run(run())


def test_limits_that_grpc_cannot_hold_are_refused_and_the_largest_taken_starts_a_server():
    """--max-message-bytes 2147483648 (2 GiB) and --max-concurrent-rpcs 536870912 passed the parsers, and
    grpc.aio.server then raised "OverflowError: value too large to convert to int", a traceback naming no setting
    (gRPC takes its options as C ints; the queue of calls not yet taken is four times max_concurrent_rpcs)."""
    from clients import tls
    from engine_service.server import SHORT_CALL_HEADROOM, grpc_options
    from tokenizer_service.server import server_options

    cases = [(parse_engine_config, ENGINE, lambda c: (grpc_options(c), c.max_concurrent_rpcs + SHORT_CALL_HEADROOM)),
             (parse_text_config, TOKENIZER, lambda c: (server_options(c), c.max_concurrent_rpcs))]
    for parse, argv, options in cases:
        for flag, field, overflowed in (("--max-message-bytes", "max_message_bytes", 2**31),
                                        ("--max-concurrent-rpcs", "max_concurrent_rpcs", 2**29)):
            with pytest.raises(ValueError, match=field) as err:
                parse([*argv, flag, str(overflowed)], {})
            largest = getattr(tls, field.upper() + "_LIMIT")
            assert f"at most {largest:,}" in str(err.value)
            with pytest.raises(ValueError, match=field):
                parse([*argv, flag, str(largest + 1)], {})
            _start_and_stop(*options(parse([*argv, flag, str(largest)], {})))
