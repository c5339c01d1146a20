"""Channel settings shared by the clients: explicit message limits, keepalive the servers permit, and TLS."""

from __future__ import annotations

import math

import grpc

from clients.tls import ClientTls, keepalive_options

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
# gRPC turns a deadline past a few decades into one already expired (DEADLINE_EXCEEDED at once): a timeout this
# long or longer means no deadline, as the service reads GenerateMulti's deadline_ms.
MAX_TIMEOUT_S = 10 * 365 * 86400


def client_timeout(timeout: float | None) -> float | None:
    """A client's per-call timeout: None, or a positive number of seconds (inf and very long ones mean none)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, or None for no deadline; got {timeout!r}")
    return None if timeout >= MAX_TIMEOUT_S else float(timeout)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    keepalive_time_s: float = 30.0) -> list[tuple[str, int]]:
    """The servers allow pings every 5 s or more, so a 30 s keepalive never earns a too_many_pings GOAWAY."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *keepalive_options(keepalive_time_s, 10.0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def sync_channel(target: str, tls: ClientTls | None = None, **kwargs: int | float) -> grpc.Channel:
    """A plaintext channel, or a TLS one when tls is given."""
    options = channel_options(**kwargs)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(target: str, tls: ClientTls | None = None, **kwargs: int | float) -> grpc.aio.Channel:
    """The asyncio twin of sync_channel."""
    options = channel_options(**kwargs)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
