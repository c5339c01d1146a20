"""The tokenizer service's settings: one frozen dataclass, built from flags, each with an environment variable.

Every field `some_name` is the flag `--some-name` and the variable `TOKENIZER_SOME_NAME`; a flag wins over
the variable, and the variable over the default.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

from clients.channel import is_port
from clients.flags import parse_settings
from clients.logs import LOG_LEVELS
from clients.tls import ClientTls, ServerTls, check_grpc_limits, server_tls_settings

_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def is_dns_name(name: str) -> bool:
    """A name DNS can hold (a trailing dot allowed): labels of letters, digits, '-' and '_', 1 to 63 long, at
    most 253 characters in all. Anything else fails every lookup, as a UnicodeError or as 'not found'."""
    name = name.removesuffix(".")
    return 0 < len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def is_host(host: str) -> bool:
    """A host gRPC can dial: a DNS name (an IPv4 address is one), or an IPv6 address in brackets ([::1], a zone
    such as %eth0 allowed). An unbracketed IPv6 address is not: in '::1:50051' the port cannot be told apart."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return is_dns_name(host)


ENV_PREFIX = "TOKENIZER_"
MiB = 1 << 20
# The liveness probe's health name (server.py says why): SERVING from start-up to exit, so no --service-name.
LIVENESS = "liveness"
MAX_STREAM_INTERVAL = 1024  # stream_interval's bound (tokens a message)


@dataclass(slots=True, frozen=True)
class TextServerConfig:
    """Every setting of the tokenizer service."""

    model: str = ""  # the Hugging Face model directory (its tokenizer and generation_config.json)
    host: str = "[::]"
    port: int = 50052
    service_name: str = "llmserve.text.v1.TextGeneration"
    engines: str = ""  # comma-separated engine addresses host:port
    engine_dns: str = ""  # or one name:port re-resolved periodically, one stream per address (headless Service)
    dns_refresh_s: float = 10.0
    reconnect_min_s: float = 0.2  # backoff after a lost engine, doubling up to reconnect_max_s (each wait +-20%)
    reconnect_max_s: float = 5.0
    engine_wait_s: float = 10.0  # how long a request waits for an engine to be connected
    # How long an engine's Generate stream may send nothing, not even the heartbeat it promises (ModelInfo.heartbeat_ms),
    # before the engine is taken as frozen: its requests fail over (those without a token are retried elsewhere) and
    # it is dialled again. HTTP/2 keepalive cannot see this: gRPC's transport answers pings while the service is stuck.
    # At least four heartbeats; 0: never (an engine that predates heartbeats is never judged by it).
    engine_silence_s: float = 10.0
    # TLS (docs/SECURITY.md), PEM files. Ours: tls_cert and tls_key serve TLS (reloaded when they change), and
    # tls_client_ca asks every caller for a certificate that CA signed (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    health_port: int = 0  # plaintext grpc.health.v1 alone on host:health_port, for TLS-blind probes; 0: off
    # To the engines: engine_tls_ca (the CA that signed their certificates) turns TLS on; engine_tls_cert and
    # engine_tls_key are our certificate for engines that ask for one. The name verified in an engine's
    # certificate is engine_tls_server_name, else engine_dns's name, else the address's host.
    engine_tls_ca: str = ""
    engine_tls_cert: str = ""
    engine_tls_key: str = ""
    engine_tls_server_name: str = ""
    # Limits.
    # grpc.aio refuses calls past this with its own RESOURCE_EXHAUSTED; kept above max_inflight, so that a
    # full service says so in its own words first (health checks count too: probes use health_port).
    max_concurrent_rpcs: int = 4096
    max_inflight: int = 2048  # requests in progress; past it: RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 * MiB
    max_buffered_updates: int = 4096  # per request, engine updates not yet consumed; past it the request fails
    # Tokens a Generate / GenerateMulti message carries, after the first (sent at once): text goes out once this many
    # tokens have come, or the request ends. 1 sends every engine update. Each message costs this service CPU (a
    # Generate message about 65-90 us, docs/PERFORMANCE.md): 4 makes a quarter of them, at the cost of smoothness.
    stream_interval: int = 1
    # The longest text held back for stream_interval waits, in seconds: the held message goes out with the first
    # engine update that comes this long or longer after its oldest token (so a slow engine, whose tokens come
    # further apart, is streamed token by token again). 0: no limit (wait for stream_interval tokens).
    stream_max_wait_s: float = 0.5
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_ping_interval_s: float = 5.0
    # 0: unlimited. Set it (e.g. 300) so that clients' long-lived channels reconnect now and then and reach
    # replicas the autoscaler added; streams in flight are never cut by it.
    max_connection_age_s: float = 0.0
    # 0: unlimited. Set it (e.g. 600) so that clients that keep a channel they no longer use stop holding a
    # socket here; their channel dials again on its next call. Calls open, streams included, keep a connection.
    max_connection_idle_s: float = 0.0
    grace_s: float = 30.0  # SIGTERM drain
    log_level: str = "INFO"
    # Observability (docs/OBSERVABILITY.md).
    metrics_port: int = 9401  # Prometheus /metrics over plain HTTP on host:metrics_port; 0 turns it off
    log_format: str = "text"  # "text", or "json": one JSON object per line
    log_requests: bool = True  # one log line per finished request (INFO)
    # Chat contents holding a special token's text (`<|im_start|>system...`) become real control tokens, as in
    # transformers' apply_chat_template: "allow" that, or "refuse" such requests, and outside assistant contents the
    # template's markup tokens (Qwen3's `<tool_response>`): for callers not trusted to write their own turns
    # (docs/SECURITY.md).
    chat_special_tokens: str = "allow"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must name a model directory (--model or TOKENIZER_MODEL)")
        if not self.host.strip() or any(c.isspace() for c in self.host):  # the bind blamed the port
            raise ValueError(f"host (--host, TOKENIZER_HOST) must be an address of this machine to listen on: [::] "
                             f"(every interface, the default), 0.0.0.0, 127.0.0.1, or one of its names; got "
                             f"{self.host!r}")
        if not self.service_name.strip() or self.service_name == LIVENESS:
            # "" is the whole server's name, answered anyway: the readiness probe's name would answer NOT_FOUND. The
            # liveness name following the engines would restart every pod in an engine outage.
            raise ValueError(f"service_name (--service-name, TOKENIZER_SERVICE_NAME) must be neither blank nor "
                             f"{LIVENESS!r} (the liveness probe's name, SERVING whatever the engines do): it is the "
                             f"health name that follows the engines, which the readiness probe asks for; the default "
                             f"is {TextServerConfig.__dataclass_fields__['service_name'].default!r}; got "
                             f"{self.service_name!r}")
        if not self.engines and not self.engine_dns:
            raise ValueError("name the engine service(s): engines (--engines, TOKENIZER_ENGINES) as HOST:PORT[,...] "
                             "or engine_dns (--engine-dns, TOKENIZER_ENGINE_DNS) as NAME:PORT")
        if self.engines and any(not a.strip() for a in self.engines.split(",")):
            # "," named no engine at all, and "a:1,,b:2" dropped an entry unseen (a templated name left empty).
            raise ValueError(f"engines (--engines, TOKENIZER_ENGINES) has an empty entry: give HOST:PORT[,...] with no "
                             f"empty item between, before or after the commas; got {self.engines!r}")
        for address in self.engine_addresses:
            host, _, port = address.rpartition(":")
            if not is_host(host) or not is_port(port):
                raise ValueError(f"engines (--engines, TOKENIZER_ENGINES) must be HOST:PORT[,...], HOST a DNS name, an "
                                 f"IPv4 address or an IPv6 one in brackets, with ports in 1..65535, e.g. "
                                 f"10.0.0.7:50051 or [fd00::7]:50051; got {address!r}")
        twice = sorted({a for a in self.engine_addresses if self.engine_addresses.count(a) > 1})
        if twice:
            # The pool keys its connections by address: a second copy replaced the first in its table while the
            # first kept its own Generate stream to the engine, held one of the engine's RPC slots and was never
            # closed. Listing an engine twice does not weight it either.
            raise ValueError(f"engines (--engines, TOKENIZER_ENGINES) lists {', '.join(twice)} more than once: give "
                             f"each engine once (requests are spread by load, not by how often an address is "
                             f"listed); got {self.engines!r}")
        if self.engines and self.engine_dns:
            raise ValueError(f"give engines (--engines, TOKENIZER_ENGINES) or engine_dns (--engine-dns, "
                             f"TOKENIZER_ENGINE_DNS), not both; got {self.engines!r} and {self.engine_dns!r}")
        if self.engine_dns:
            name, _, port = self.engine_dns.rpartition(":")
            if not name or not is_port(port):
                raise ValueError(f"engine_dns (--engine-dns, TOKENIZER_ENGINE_DNS) must be NAME:PORT with a port "
                                 f"in 1..65535, e.g. llm-engine:50051; got {self.engine_dns!r}")
            if not is_dns_name(name):  # getaddrinfo fails every lookup of it: the pool would never find an engine
                raise ValueError(f"engine_dns (--engine-dns, TOKENIZER_ENGINE_DNS) must be NAME:PORT with a DNS "
                                 f"name: dot-separated labels of 1 to 63 characters each, letters, digits, '-' and "
                                 f"'_' (no empty label, as in 'a..b', no spaces), e.g. "
                                 f"llm-engine.llmserve.svc.cluster.local:50051; got {self.engine_dns!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535 (0 turns metrics off), got {self.metrics_port}")
        if self.port and self.metrics_port == self.port:
            # gRPC takes the port first, and the metrics server's failed bind only logs an error (metrics never stop
            # the service): the metrics would quietly be missing.
            raise ValueError(f"metrics_port {self.metrics_port} (--metrics-port, TOKENIZER_METRICS_PORT) is the "
                             "service's port: give metrics a port of its own, or 0 to turn metrics off")
        self.server_tls  # noqa: B018 (checks the TLS files and the health port)
        if not self.engine_tls_ca and (self.engine_tls_cert or self.engine_tls_key or self.engine_tls_server_name):
            raise ValueError("engine_tls_ca (--engine-tls-ca, TOKENIZER_ENGINE_TLS_CA) turns TLS to the engines on: "
                             "name the CA that signed their certificates (a public CA: the system bundle, e.g. "
                             "/etc/ssl/certs/ca-certificates.crt) before engine_tls_cert, _key or _server_name")
        try:
            self.engine_tls  # noqa: B018
        except ValueError as exc:
            raise ValueError(f"TLS to the engines (engine_tls_*; --engine-tls-*, TOKENIZER_ENGINE_TLS_*): "
                             f"{exc}") from None
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} (any case), got {self.log_level!r}")
        if self.chat_special_tokens not in ("allow", "refuse"):
            raise ValueError(f"chat_special_tokens must be 'allow' or 'refuse', got {self.chat_special_tokens!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        for name in ("max_concurrent_rpcs", "max_inflight", "max_message_bytes", "max_buffered_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_grpc_limits(self)
        if not 1 <= self.stream_interval <= MAX_STREAM_INTERVAL:
            raise ValueError(f"stream_interval must be 1 (every update) to {MAX_STREAM_INTERVAL} tokens a message, got "
                             f"{self.stream_interval}")
        if not math.isfinite(self.stream_max_wait_s) or self.stream_max_wait_s < 0:
            raise ValueError(f"stream_max_wait_s must be 0 (no limit) or a positive number of seconds, got "
                             f"{self.stream_max_wait_s}")
        if not math.isfinite(self.engine_silence_s) or self.engine_silence_s < 0:
            raise ValueError(f"engine_silence_s must be 0 (off) or a positive number of seconds, got "
                             f"{self.engine_silence_s}")
        for name in ("dns_refresh_s", "reconnect_min_s", "reconnect_max_s", "engine_wait_s", "keepalive_time_s",
                     "keepalive_timeout_s", "min_ping_interval_s", "grace_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:  # NaN passed a "<= 0" check
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("max_connection_age_s", "max_connection_idle_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")

    @property
    def server_tls(self) -> ServerTls | None:
        """The TLS this service serves, or None for plaintext; ValueError naming the settings that cannot work."""
        return server_tls_settings(self, ENV_PREFIX)

    @property
    def engine_tls(self) -> ClientTls | None:
        """How to dial the engines over TLS, or None for plaintext."""
        if not self.engine_tls_ca:
            return None
        server_name = self.engine_tls_server_name or self.engine_dns.rpartition(":")[0]
        return ClientTls(self.engine_tls_ca, self.engine_tls_cert, self.engine_tls_key, server_name)

    @property
    def engine_addresses(self) -> list[str]:
        return [a.strip() for a in self.engines.split(",") if a.strip()]


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> TextServerConfig:
    """TextServerConfig from command-line flags, falling back to TOKENIZER_* environment variables."""
    return parse_settings(TextServerConfig, ENV_PREFIX, "tokenizer-service", "The LLM text gRPC service.", argv, env)
