"""The engine service's settings: one frozen dataclass, built from flags, each with an environment variable.

Every field `some_name` is the flag `--some-name` and the variable `ENGINE_SOME_NAME`; a flag wins over the
variable, and the variable over the default. Engine knobs (`engine_*` fields) are passed to LLMEngine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

from clients.flags import parse_bool, parse_settings
from clients.logs import LOG_LEVELS
from clients.tls import ServerTls, check_grpc_limits, server_tls_settings
from engine_service.config import (
    DEFAULT_CPU_KVCACHE_GIB,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_JSON_MASK_BUDGET_S,
    EngineConfig,
)
from engine_service.streams import TOKEN_BYTES

ENV_PREFIX = "ENGINE_"
MiB = 1 << 20


@dataclass(slots=True, frozen=True)
class ServerConfig:
    """Every setting of the engine service."""

    model: str = ""  # a Hugging Face model directory
    host: str = "[::]"
    port: int = 50051
    service_name: str = "llmserve.engine.v1.Engine"  # also gets a health status of its own
    # Engine knobs, passed through to LLMEngine.
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    # The KV cache's element type: "auto" (the model's dtype) or "fp8" (float8 e4m3: twice the tokens in the same
    # memory, half the bytes decode attention reads; it changes results slightly; torch and triton backends).
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    # "auto" (on for CUDA with tensor_parallel_size 1) or a boolean (true/false, on/off); see docs/ENGINE.md.
    overlap_scheduling: str = "auto"
    # "auto" (on for CUDA, except in float64) or a boolean: fused Triton kernels for the norms, RoPE and SiLU.
    fused_ops: str = "auto"
    # Time Triton GEMM tiles against torch's at start-up and use them at the decode batch sizes where faster
    # (CUDA graphs on, bf16/fp16); false keeps torch's GEMMs.
    triton_gemm: bool = True
    # Launch the engine's Triton kernels with programmatic dependent launch (CUDA, compute capability 9.0+).
    pdl: bool = False
    # Run CUDA-graph decode batches of 32+ as two halves on two streams, one's GEMMs beside the other's attention.
    two_batch_overlap: bool = False
    kvcache_block_size: int = 16
    num_kvcache_blocks: int = 0  # 0: sized by the engine, from the two settings below
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # GPU: share of its memory the engine fills
    cpu_kvcache_gib: float = DEFAULT_CPU_KVCACHE_GIB  # CPU: the KV cache's cap in GiB
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds the engine's sampling of requests without a seed of their own, so a run repeats
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 0  # 0: the model's own
    # JSON RoPE scaling over config.json's, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 32768}; "" keeps the model's (docs/ENGINE.md, Model directories)
    rope_scaling: str = ""
    tensor_parallel_size: int = 1
    # JSON mode: the seconds of engine time one request's token-mask cache misses may take before it fails (the
    # other requests wait for them; docs/ENGINE.md, JSON mode); 0: no bound.
    json_mask_budget_s: float = DEFAULT_JSON_MASK_BUDGET_S
    # torch intra-op threads: 0 picks one on CPU when the machine has at most 4 cores (the gRPC threads and the
    # tokenizer service need the rest; oversubscribed cores make torch's threads spin and wait), else torch's own.
    torch_threads: int = 0
    # Python's thread switch interval (sys.setswitchinterval) while serving. The engine thread comes back from each
    # GPU wait needing the GIL, which the asyncio thread writing the last step's outputs holds in bursts of
    # milliseconds; at Python's default (5 ms, a whole H200 decode step) the step loop lost 15-33% of its steps to
    # that wait in a stand-in with 256 GenerateStream calls (docs/PERFORMANCE.md, "The output path and the GIL").
    gil_switch_interval_ms: float = 0.5
    # TLS (docs/SECURITY.md): PEM files, reloaded when they change. tls_cert and tls_key serve TLS; tls_client_ca
    # also asks every client (the tokenizer service) for a certificate that CA signed: mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    health_port: int = 0  # plaintext grpc.health.v1 alone on host:health_port, for TLS-blind probes; 0: off
    # Limits.
    # Generate and GenerateStream calls open at once (refused past it with RESOURCE_EXHAUSTED naming the flag;
    # unary and health calls have room beyond it). Kept above max_waiting plus a running batch of GenerateStream
    # calls, so that a full engine says "queue is full" first.
    max_concurrent_rpcs: int = 4096
    # Requests admitted that cannot be running (live past max_num_seqs while the last step had none waiting, past
    # the running count once some wait); past it: RESOURCE_EXHAUSTED.
    max_waiting: int = 1024
    max_message_bytes: int = 64 * MiB  # receive and send, both ends
    max_buffered_tokens: int = 65536  # per request, not yet written to a slow client; past it the request fails
    # Connections.
    keepalive_time_s: float = 30.0  # server pings idle connections this often
    keepalive_timeout_s: float = 10.0
    min_ping_interval_s: float = 5.0  # clients may ping this often without a too_many_pings GOAWAY
    # 0: unlimited. The tokenizer services dial every engine pod themselves (DNS), so engines need no age;
    # it is for other callers behind one address. Streams in flight are never cut by it.
    max_connection_age_s: float = 0.0
    # 0: unlimited. GOAWAY to a connection with no call open this long (a tokenizer service's streams stay open).
    max_connection_idle_s: float = 0.0
    # Lifecycle.
    grace_s: float = 30.0  # SIGTERM drain: in-flight streams get this long to finish
    watchdog_s: float = 120.0  # a loop that has not stepped this long while requests wait is stalled
    canary_interval_s: float = 30.0  # health re-check period (idle: canary; busy: traffic); 0: off
    canary_timeout_s: float = 60.0
    failure_linger_s: float = 2.0  # after an engine failure, answer NOT_SERVING this long before exiting 1
    log_level: str = "INFO"
    # Observability (docs/OBSERVABILITY.md).
    metrics_port: int = 9400  # Prometheus /metrics over plain HTTP on host:metrics_port; 0 turns it off
    log_format: str = "text"  # "text", or "json": one JSON object per line
    log_requests: bool = True  # one log line per finished request (INFO)

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must name a model directory (--model or ENGINE_MODEL)")
        if not self.service_name.strip():  # "" is the whole server's name: the readiness probe's would be NOT_FOUND
            raise ValueError(f"service_name (--service-name, ENGINE_SERVICE_NAME) must not be blank: it is the health "
                             f"name the readiness probe asks for, besides the whole server's; the default is "
                             f"{ServerConfig.__dataclass_fields__['service_name'].default!r}; got {self.service_name!r}")
        if not self.host.strip() or any(c.isspace() for c in self.host):  # the bind blamed the port
            raise ValueError(f"host (--host, ENGINE_HOST) must be an address of this machine to listen on: [::] "
                             f"(every interface, the default), 0.0.0.0, 127.0.0.1, or one of its names; got "
                             f"{self.host!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535 (0 turns metrics off), got {self.metrics_port}")
        if self.port and self.metrics_port == self.port:
            # gRPC takes the port first, and the metrics server's failed bind only logs an error (metrics never stop
            # the service): the metrics would quietly be missing.
            raise ValueError(f"metrics_port {self.metrics_port} (--metrics-port, ENGINE_METRICS_PORT) is the "
                             "service's port: give metrics a port of its own, or 0 to turn metrics off")
        self.server_tls  # noqa: B018 (checks the TLS files and the health port)
        self.auto_flag("overlap_scheduling")  # each raises on anything but auto or a boolean
        self.auto_flag("fused_ops")
        if self.max_buffered_tokens * TOKEN_BYTES + 1024 > self.max_message_bytes // 2:
            # One request's update (up to max_buffered_tokens ids of up to 5 bytes; tokens with logprobs are
            # bounded to the same bytes, streams.py) must fit one frame.
            raise ValueError(f"max_buffered_tokens ({self.max_buffered_tokens}) is too large for max_message_bytes "
                             f"({self.max_message_bytes}): a frame holds at most half of it; raise "
                             "max_message_bytes or lower max_buffered_tokens")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} (any case), got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        for name in ("max_concurrent_rpcs", "max_waiting", "max_message_bytes", "max_buffered_tokens",
                     "kvcache_block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_grpc_limits(self)
        for name in ("num_kvcache_blocks", "max_model_len", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (automatic) or positive, got {getattr(self, name)}")
        machine_cpus = os.cpu_count() or 1
        if self.torch_threads > machine_cpus:  # torch started them all: a segfault or libgomp's bare failure
            raise ValueError(f"torch_threads ({self.torch_threads}) is more than this machine's {machine_cpus} CPUs: "
                             f"threads past the cores only wait on each other; give at most {machine_cpus}, or 0 "
                             "for the automatic count")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_ping_interval_s", "grace_s",
                     "watchdog_s", "canary_timeout_s", "gil_switch_interval_ms"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:  # NaN passed a "<= 0" check
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not 0.001 <= self.gil_switch_interval_ms <= 1000:
            # Python keeps whole microseconds: under one it switched every bytecode, and past about 2**63 of them
            # the same (1e300 ms, meant as "never", became the shortest interval there is).
            raise ValueError(f"gil_switch_interval_ms must be in 0.001..1000 (Python's default is 5), got "
                             f"{self.gil_switch_interval_ms}")
        for name in ("max_connection_age_s", "max_connection_idle_s", "canary_interval_s", "failure_linger_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        # The engine's own rules for its knobs (gpu_memory_utilization, dtype, device...), checked here at
        # start-up rather than once the server is up and loading.
        EngineConfig.from_kwargs(self.model, **self.engine_kwargs())

    @property
    def server_tls(self) -> ServerTls | None:
        """The TLS this service serves, or None for plaintext; ValueError naming the settings that cannot work."""
        return server_tls_settings(self, ENV_PREFIX)

    def engine_kwargs(self) -> dict[str, object]:
        """Keyword arguments for LLMEngine."""
        return dict(
            device=self.device, dtype=self.dtype, attention_backend=self.attention_backend,
            kv_cache_dtype=self.kv_cache_dtype, enforce_eager=self.enforce_eager, kvcache_block_size=self.kvcache_block_size,
            num_kvcache_blocks=self.num_kvcache_blocks or None,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len or None, rope_scaling=self.rope_scaling_dict(),
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, cpu_kvcache_gib=self.cpu_kvcache_gib,
            enable_prefix_caching=self.enable_prefix_caching, seed=self.seed,
            overlap_scheduling=self.auto_flag("overlap_scheduling"), fused_ops=self.auto_flag("fused_ops"),
            triton_gemm=self.triton_gemm, pdl=self.pdl, two_batch_overlap=self.two_batch_overlap,
            json_mask_budget_s=self.json_mask_budget_s,
        )

    def rope_scaling_dict(self) -> dict | None:
        """--rope-scaling as EngineConfig takes it: None when empty, else its JSON object."""
        if not self.rope_scaling.strip():
            return None
        try:
            value = json.loads(self.rope_scaling)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rope_scaling must be a JSON object such as '{{\"rope_type\": \"yarn\", \"factor\": "
                             f"4.0, \"original_max_position_embeddings\": 32768}}', got {self.rope_scaling!r}: "
                             f"{exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"rope_scaling must be a JSON object, got {self.rope_scaling!r}")
        return value

    def auto_flag(self, name: str) -> bool | None:
        """An "auto"-or-boolean field as EngineConfig takes it: None for auto."""
        value = getattr(self, name)
        if value.strip().lower() == "auto":
            return None
        try:
            return parse_bool(value)
        except argparse.ArgumentTypeError:
            raise ValueError(f"{name} must be 'auto' or a boolean (true/false, on/off), got {value!r}") from None


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> ServerConfig:
    """ServerConfig from command-line flags, falling back to ENGINE_* environment variables."""
    return parse_settings(ServerConfig, ENV_PREFIX, "engine-service", "The LLM engine gRPC service.", argv, env)
