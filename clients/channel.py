"""Channel settings shared by the clients: explicit message limits and keepalive the servers permit."""

from __future__ import annotations

import grpc

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    keepalive_time_s: float = 30.0) -> list[tuple[str, int]]:
    """The servers allow pings every 5 s or more, so a 30 s keepalive never earns a too_many_pings GOAWAY."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def sync_channel(target: str, **kwargs: int | float) -> grpc.Channel:
    return grpc.insecure_channel(target, options=channel_options(**kwargs))


def aio_channel(target: str, **kwargs: int | float) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=channel_options(**kwargs))
