"""Channel settings shared by the clients: explicit message limits, keepalive the servers permit, and TLS; and
Channels, which moves a client's new calls to a new channel when its TLS files are rotated."""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from clients.tls import MAX_MESSAGE_BYTES_LIMIT, ClientTls, keepalive_options

log = logging.getLogger(__name__)
ROTATION_RETRY_S = 1.0  # TLS files that changed and did not load are read again on the first call this much later
MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
# gRPC turns a deadline past a few decades into one already expired (DEADLINE_EXCEEDED at once): a timeout this
# long or longer means no deadline, as the service reads GenerateMulti's deadline_ms.
MAX_TIMEOUT_S = 10 * 365 * 86400


def is_port(text: str) -> bool:
    """A TCP port a client can dial: decimal digits naming 1..65535 (gRPC took 65536 + P as port P)."""
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def client_timeout(timeout: float | None) -> float | None:
    """A client's per-call timeout: None, or a positive number of seconds (inf and very long ones mean none)."""
    if timeout is None:
        return None
    # numbers.Real: a numpy number too (np.int64 is no int)
    # timeout != timeout: NaN, where math.isnan raised OverflowError for an int past a float's range
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout != timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, or None for no deadline; got {timeout!r}")
    return None if timeout >= MAX_TIMEOUT_S else float(timeout)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_time_s: float = 30.0,
                    extra_options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The servers allow pings every 5 s or more, so a 30 s keepalive never earns a too_many_pings GOAWAY.
    extra_options: further gRPC channel arguments, e.g. ("grpc.service_config", json.dumps({...})) for a retry
    policy; one this function sets too replaces its value (grpc-core times a keepalive ping out by
    grpc.http2.ping_timeout_ms, clients.tls.keepalive_options). A name given twice is refused (gRPC would keep one
    of them silently)."""
    # numpy's numbers too (numbers.Integral, numbers.Real), as Python's ints and floats passed on to gRPC
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, numbers.Integral) or not (
            1 <= max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT or max_message_bytes == -1):
        # 0 refused every message that was not empty; past a C int, grpc raised a bare OverflowError
        raise ValueError(f"max_message_bytes must be a positive number of bytes, at most {MAX_MESSAGE_BYTES_LIMIT:,} "
                         f"(gRPC holds it in a C int), or -1 (gRPC's no limit); got {max_message_bytes!r}")
    max_message_bytes = int(max_message_bytes)
    if (isinstance(keepalive_time_s, bool) or not isinstance(keepalive_time_s, numbers.Real)
            or not math.isfinite(keepalive_time_s) or keepalive_time_s < 0.001):  # gRPC takes whole ms: 0 is off
        raise ValueError(f"keepalive_time_s must be a positive number of seconds, at least 0.001 (the servers allow a "
                         f"ping every 5 s or more), got {keepalive_time_s!r}")
    keepalive_time_s = float(keepalive_time_s)
    # None or a bare value: list() said only "'NoneType' object is not iterable"
    pairs = isinstance(extra_options, Iterable) and not isinstance(extra_options, str | bytes | Mapping)
    extra = list(extra_options) if pairs else []
    if not pairs or not all(isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) for o in extra):
        raise ValueError(f"extra_options must be (name, value) pairs of gRPC channel arguments, got {extra_options!r}")
    names = [name for name, _ in extra]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"extra_options name {twice} more than once; give each channel argument once")
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *keepalive_options(keepalive_time_s, 10.0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return [(name, value) for name, value in options if name not in names] + extra


CHANNEL_SETTINGS = frozenset(inspect.signature(channel_options).parameters)  # what a client passes on to it


def sync_channel(target: str, tls: ClientTls | None = None, *, credentials: grpc.ChannelCredentials | None = None,
                 **kwargs: Any) -> grpc.Channel:
    """A plaintext channel, or a TLS one when tls is given (credentials: those already read from its files)."""
    options = channel_options(**kwargs)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials or tls.credentials(), options=[*options, *tls.options()])


def aio_channel(target: str, tls: ClientTls | None = None, *, credentials: grpc.ChannelCredentials | None = None,
                **kwargs: Any) -> grpc.aio.Channel:
    """The asyncio twin of sync_channel."""
    options = channel_options(**kwargs)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials or tls.credentials(), options=[*options, *tls.options()])


def _contents(tls: ClientTls) -> bytes:
    """The TLS files' bytes, to tell a rotation from a touch (a few KB, read only when their stamp moved)."""
    out = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        try:
            out.append(Path(path).read_bytes() if path else b"")
        except OSError:
            out.append(b"\0missing")
    return b"\0\0".join(out)


class Channels:
    """A client's channel and stub, made by open_channel (sync_channel or aio_channel).

    A channel reconnects with the credentials it was made with, so a long-lived client kept its first certificate
    (and CA): once that expired, every call failed UNAVAILABLE while a new client on the same files worked. With
    TLS, stub() checks the files' stamp before each call and, when it changed, makes a new channel for new calls.
    Calls in flight finish on the old channel, which is kept (idle, gRPC drops its connection) and closed with the
    client. Files that do not load yet (a rotation half-written) keep the current channel, with one warning, and
    are read again on a later call, at most every ROTATION_RETRY_S.

    defer: make the first channel at the first stub() rather than now (an asyncio client made outside any event
    loop: a grpc.aio channel belongs to the loop it is made in, and asyncio.run() runs a new one)."""

    def __init__(self, open_channel: Callable[..., Any], target: str, tls: ClientTls | None,
                 stub_type: Callable[[Any], Any], *, defer: bool = False, **channel_kwargs: Any) -> None:
        unknown = sorted(set(channel_kwargs) - CHANNEL_SETTINGS)
        if unknown:
            raise TypeError(f"unknown client setting(s) {unknown}; a client takes target, timeout, tls and the "
                            f"channel settings {sorted(CHANNEL_SETTINGS)}")
        # Named here: target=None raised AttributeError "'NoneType' object has no attribute 'encode'", "" made a
        # client whose every call failed UNKNOWN, and tls="ca.crt" raised "'str' object has no attribute 'stamp'".
        if not isinstance(target, str) or not target:
            raise ValueError(f"target must be the service's address as a string, HOST:PORT (e.g. localhost:50052) or "
                             f"a gRPC URI (unix:/path); got {target!r}")
        port = target.rpartition(":")[2]
        if "/" not in target and ":" in target and port.isdigit() and not is_port(port):  # URIs (unix:/...) pass
            raise ValueError(f"target {target!r} names port {port}: ports are 1..65535, e.g. localhost:50052")
        if tls is not None and not all(callable(getattr(tls, name, None)) for name in ("stamp", "credentials")):
            raise ValueError(f"tls must be a ClientTls (clients.tls: ClientTls(ca_file='ca.crt'), with cert_file and "
                             f"key_file for mutual TLS), or None for plaintext; got {tls!r}")
        self._open_channel, self._target, self._tls, self._kwargs = open_channel, target, tls, channel_kwargs
        self._stub_type = stub_type
        self._stamp = tls.stamp() if tls is not None else None  # taken before reading: a change meanwhile shows
        self._contents = _contents(tls) if tls is not None else b""
        self.current = None if defer else open_channel(target, tls, **channel_kwargs)
        self._stub = None if defer else stub_type(self.current)
        self.retired: list[Any] = []
        self._retry_at, self._warned = 0.0, False
        self._lock = threading.Lock()  # a blocking client may be shared by threads
        self._closed = False

    @property
    def target(self) -> str:
        """The address this client dials (for messages that name the service)."""
        return self._target

    def stub(self) -> Any:
        """The stub for a new call: on a new channel when the TLS files changed and load. After close(), a ValueError
        naming the client (gRPC's own words were "Channel closed!" from a blocking channel, and grpc.aio's internal
        UsageError "Channel is closed." from an asyncio one)."""
        if self._closed:
            raise ValueError(f"Cannot invoke RPC on closed channel: the client of {self._target} was closed")
        if self._stub is None:
            with self._lock:
                self._open_deferred()
        if self._tls is not None and self._tls.stamp() != self._stamp:
            with self._lock:
                self._renew(self._tls)
        return self._stub

    def _open_deferred(self) -> None:
        if self._stub is not None:
            return  # another thread made it
        if self._closed:
            raise ValueError(f"Cannot invoke RPC on closed channel: the client of {self._target} was closed")
        if self._tls is not None:  # the files as this channel reads them, for telling a later rotation
            self._stamp, self._contents = self._tls.stamp(), _contents(self._tls)
        self.current = self._open_channel(self._target, self._tls, **self._kwargs)
        self._stub = self._stub_type(self.current)

    def _renew(self, tls: ClientTls) -> None:
        stamp = tls.stamp()
        if self._closed or stamp == self._stamp or time.monotonic() < self._retry_at:
            return  # closed (gRPC refuses the call), another thread renewed it, or the files did not load just now
        contents = _contents(tls)
        if contents == self._contents:  # touched, not changed (a chmod, the same Secret written again)
            self._stamp, self._warned = stamp, False
            return
        try:
            credentials = tls.credentials()
        except ValueError as exc:
            self._retry_at = time.monotonic() + ROTATION_RETRY_S
            if not self._warned:
                self._warned = True
                log.warning("TLS files changed but do not load (%s); new calls stay on the current channel until "
                            "they do", exc)
            return
        self.retired.append(self.current)
        self.current = self._open_channel(self._target, tls, credentials=credentials, **self._kwargs)
        self._stub = self._stub_type(self.current)
        self._stamp, self._contents, self._warned = stamp, contents, False
        log.info("TLS files changed: new calls go on a new channel, made from them")

    def close(self) -> list[Any]:
        """Every channel made, those retired first, for the client to close: none is made after this."""
        with self._lock:
            self._closed = True
            return [*self.retired, *([self.current] if self.current is not None else [])]
