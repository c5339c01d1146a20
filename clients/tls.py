"""TLS and mutual TLS for every gRPC hop, from PEM files (docs/SECURITY.md). It imports only grpc (and its
health package) and the standard library.

- ClientTls dials a TLS server: the clients here, and the tokenizer service dialing its engines. A channel
  keeps the credentials it was made with, reconnects included: the clients make a new channel for new calls
  once the files change (clients/channel.py), and the engine pool makes one per dial.
- ServerTls serves TLS: both services. A server reloads its files on the next handshake after they change
  (a Kubernetes Secret or cert-manager rotating them), without a restart; a change that does not load (a
  half-written file, a key that does not match the certificate) keeps the current pair. It logs an error while
  the certificate it serves has expired, and exports when it expires (expiry(), a gauge in both services).
- HealthServicer is grpc.health.v1 as grpcio-health-checking serves it, with its Watch fixed (both services').
- start_health_server serves grpc.health.v1 alone in plaintext on a port of its own, for probes that cannot speak
  TLS (the kubelet's gRPC probe cannot).
- listen binds a server's port, TLS or plaintext, and refuses a port another process holds: gRPC's default
  SO_REUSEPORT would let a second server bind it and take half its connections (NO_REUSEPORT, in every
  server's options). shared_server_options adds it, the connection age and idle limits and the size of gRPC's queue of calls
  not yet taken, to both services' servers; service_server_options is all of a service's server options, and
  keepalive_options the keepalive settings of every server and channel here.
- add_checked_servicer registers a servicer so that a request that does not parse is refused with
  INVALID_ARGUMENT naming its type, rather than gRPC's UNKNOWN and an ERROR traceback per request.

Both services use this file, which keeps them from importing each other: the dependency rules allow either
to import the client library.
"""

from __future__ import annotations

import argparse
import base64
import logging
import math
import os
import re
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

log = logging.getLogger(__name__)
CERTIFICATE = "CERTIFICATE"
PRIVATE_KEY = "PRIVATE KEY"
NO_REUSEPORT = ("grpc.so_reuseport", 0)  # a port in use is an error, not a port shared with a stranger
UNLIMITED_MS = 2**31 - 1  # gRPC's "no limit" for a duration in milliseconds


def _ms(seconds: float) -> int:
    """A duration as gRPC's options take it: whole milliseconds in a C int (24.8 days and more are its limit; a
    larger value made grpc.aio.server raise OverflowError at start-up)."""
    return int(min(seconds * 1000, UNLIMITED_MS))  # min first: int() of an infinite product raised


def shared_server_options(max_connection_age_s: float, max_calls: int,
                          max_connection_idle_s: float = 0.0) -> list[tuple[str, int]]:
    """Server options both services set: no SO_REUSEPORT, and with max_connection_age_s > 0 a GOAWAY once a
    connection is that old, so that new calls open a new connection (to another replica behind a ClusterIP).
    Calls already streaming run to their end, however long: no grace cuts a generation. With
    max_connection_idle_s > 0, a GOAWAY to a connection that has had no call open for that long: a client that
    holds a channel it no longer uses stops holding a socket here (its channel goes idle and dials again on its
    next call). A connection with a call open, a silent stream included, is never idle.

    max_calls (the server's maximum_concurrent_rpcs) also sizes the queue of calls grpc-core holds before grpc.aio
    has taken them. grpc.aio takes one new call per turn of its event loop, those it will refuse included; past
    1,000 waiting (core's default) core drops new calls at random, and all of them past 3,000, with a bare
    CANCELLED (a bidi client sees INTERNAL 'Internal error from Core') before any handler sees them: a burst of
    2,000 streams lost about 10% of its calls so. The queue holds four times the calls allowed open, and at least
    16,384 (a waiting call costs little): a burst waits its turn, and the calls past the limit meet our own
    limits, which refuse in words (RESOURCE_EXHAUSTED)."""
    pending = max(4 * max_calls, 16_384)
    options = [NO_REUSEPORT, ("grpc.server.max_pending_requests", pending),
               ("grpc.server.max_pending_requests_hard_limit", pending)]
    if max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", _ms(max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", UNLIMITED_MS)]
    if max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(max_connection_idle_s)))
    return options


# gRPC reads its options as C ints: a message limit past 2 GiB - 1, or a queue of calls not yet taken (four times the
# calls allowed open, shared_server_options) past it, made grpc.aio.server raise OverflowError at start-up.
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1
MAX_CONCURRENT_RPCS_LIMIT = 2**31 // 8


GRPC_DURATIONS_S = ("keepalive_time_s", "keepalive_timeout_s", "min_ping_interval_s", "max_connection_age_s",
                    "max_connection_idle_s")  # both services' settings that reach gRPC in milliseconds (_ms)


def check_grpc_limits(config: Any) -> None:
    """ValueError where a service's max_message_bytes or max_concurrent_rpcs is past what gRPC's C ints hold, or one
    of its GRPC_DURATIONS_S is positive but under a millisecond: gRPC takes whole milliseconds, and 0 ms made a
    --max-connection-idle-s GOAWAY every connection at once (every call UNAVAILABLE) and a --max-connection-age-s
    abort client processes inside grpc-core. Negative, NaN and 0 are the callers' own rules."""
    for name, limit in (("max_message_bytes", MAX_MESSAGE_BYTES_LIMIT),
                        ("max_concurrent_rpcs", MAX_CONCURRENT_RPCS_LIMIT)):
        if getattr(config, name) > limit:
            raise ValueError(f"{name} must be at most {limit:,} (gRPC holds it in a C int), got "
                             f"{getattr(config, name):,}")
    for name in GRPC_DURATIONS_S:
        if 0 < getattr(config, name) < 0.001:
            raise ValueError(f"{name} must be at least 0.001 (one millisecond: gRPC takes whole milliseconds, and "
                             f"this rounds to 0), got {getattr(config, name)}")


def service_server_options(config: Any, max_calls: int) -> list[tuple[str, int]]:
    """Both services' server options, from the settings they share (max_message_bytes, keepalive_time_s,
    keepalive_timeout_s, min_ping_interval_s, max_connection_age_s, max_connection_idle_s): message limits, keepalive that clients may
    use as often as min_ping_interval_s without a too_many_pings GOAWAY, and shared_server_options."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        *keepalive_options(config.keepalive_time_s, config.keepalive_timeout_s),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(config.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for pinging
        *shared_server_options(config.max_connection_age_s, max_calls, config.max_connection_idle_s),
    ]


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Ping the peer every time_s and drop the connection when a ping goes unanswered for timeout_s; its calls
    fail UNAVAILABLE. A peer that stops answering while its kernel keeps the TCP connection up (a frozen process,
    a paused VM or container) is found only by this.

    grpc-core times an unanswered ping by grpc.http2.ping_timeout_ms (60 s by default), not by
    keepalive_timeout_ms alone: with only the latter, calls on a frozen engine hung a minute whatever the
    timeout said. Both are set."""
    return [
        ("grpc.keepalive_time_ms", _ms(time_s)),
        ("grpc.keepalive_timeout_ms", _ms(timeout_s)),
        ("grpc.http2.ping_timeout_ms", _ms(timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class PortUnavailable(RuntimeError):
    """A server could not bind its address (held by another process, or not this host's)."""


def listen(server: grpc.aio.Server, address: str, tls: ServerTls | None = None, what: str = "port") -> int:
    """Bind address (HOST:PORT) on server, with tls or plaintext; the bound port (PORT 0 picks a free one).
    PortUnavailable names the address and the setting to change when it cannot be bound."""
    try:
        return server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:
        also = ("; or gRPC could not load the TLS certificate and key (it logs 'Invalid cert chain file' then)"
                if tls else "")
        raise PortUnavailable(f"cannot listen on {address} ({what}): another process holds that port, or the host "
                              f"is not an address of this machine; choose another {what} or stop the other "
                              f"process{also}") from None


def read_pem(path: str, kind: str) -> bytes:
    """The file's bytes; a ValueError naming the path unless it reads and holds a PEM block of `kind`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    # "PRIVATE KEY" matches PKCS#8 and the older "RSA PRIVATE KEY" and "EC PRIVATE KEY" blocks.
    if not re.search(rb"-----BEGIN [A-Z ]*" + kind.encode() + rb"-----", data):
        raise ValueError(f"{path!r} holds no PEM {kind} (a block starting with '-----BEGIN ...{kind}-----')")
    return data


def read_ca(path: str) -> bytes:
    """The CA file's bytes; a ValueError naming it unless it holds at least one whole CA certificate (a
    truncated file, or one pasted indented from YAML, went to gRPC, which failed every handshake with no word
    of the file)."""
    data = read_pem(path, CERTIFICATE)
    # The blocks alone: system bundles carry comment lines, some not ASCII ("# NetLock Arany ... Főtanúsítvány").
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", data, re.S)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=b"\n".join(blocks).decode("ascii", errors="ignore"))
    except (ssl.SSLError, ValueError, TypeError) as exc:
        raise ValueError(f"{path!r} holds no usable CA certificate ({getattr(exc, 'reason', None) or exc}): each "
                         "PEM block must be whole, its lines not indented") from None
    _check_ca_dates(path, context.get_ca_certs())
    return data


def _check_ca_dates(path: str, certs: list[dict]) -> None:
    """A ValueError when no CA certificate in the file (as ssl decoded them: `certs`) is valid now: every peer's
    handshake would fail, and the error blamed the peer's certificate ("Socket closed" on the server's side,
    nothing logged)."""
    now = time.time()
    spans = []
    for cert in certs:
        try:
            dates = ssl.cert_time_to_seconds(cert["notBefore"]), ssl.cert_time_to_seconds(cert["notAfter"])
        except (KeyError, ValueError):
            return  # one this check cannot read: the handshake has the last word
        if dates[0] <= now < dates[1]:
            return
        spans.append(dates)
    if not spans:
        return
    coming = [not_before for not_before, _ in spans if not_before > now]
    if coming:
        raise ValueError(f"no CA certificate in {path!r} is valid now: the first is not valid before "
                         f"{_utc(min(coming))}: check this machine's clock, or wait")
    raise ValueError(f"no CA certificate in {path!r} is valid now: the last expired on "
                     f"{_utc(max(not_after for _, not_after in spans))}: renew the CA (during a CA rotation, give a "
                     "bundle of the old CA and the new)")


# The keys gRPC's TLS (BoringSSL) signs handshakes with: RSA, and ECDSA on P-256 or P-384. Python's ssl (OpenSSL)
# loads more (Ed25519, P-521, secp256k1, brainpool, DSA), and then every handshake failed while the service said
# SERVING, or a rotation to one kept serving the old certificate while the expiry gauge read the new one's date.
# Recognised by their DER object identifiers: rsaEncryption, then id-ecPublicKey with its named curve.
_RSA_OID = bytes.fromhex("06092a864886f70d010101")
_EC_OID = bytes.fromhex("06072a8648ce3d0201")
_CURVE_OIDS = {bytes.fromhex("06082a8648ce3d030107"): "P-256", bytes.fromhex("06052b81040022"): "P-384"}
_EXPIRY_WARNING_S = 24 * 3600
RELOAD_RETRY_S = 30.0  # TLS files that changed and did not load are tried again this often


def key_kind(key_file: str) -> str | None:
    """"RSA", "P-256" or "P-384" for a key gRPC's TLS can sign handshakes with; None for any other kind."""
    try:
        text = Path(key_file).read_bytes()
    except OSError as exc:  # gone mid-rotation, after load_cert_chain read it
        raise ValueError(f"cannot read {key_file!r}: {exc.strerror or exc}") from None
    found = re.search(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----(.*?)-----END", text, re.S)  # PKCS#8, RSA or EC
    if found is None:
        return None
    label = found.group(1)
    try:
        der = base64.b64decode(b"".join(found.group(2).split()))
    except ValueError:
        return None
    if label == b"RSA " or (label == b"" and _RSA_OID in der[:32]):
        return "RSA"
    if label == b"EC " or (label == b"" and _EC_OID in der[:32]):
        # The curve: in PKCS#8 beside the algorithm, near the start; in an EC block after the key's 32-48 bytes.
        return next((name for oid, name in _CURVE_OIDS.items() if oid in der[:96]), None)
    return None


def certificate_dates(cert_file: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the (first) certificate in cert_file as Unix times; None when it cannot be read
    (load_cert_chain has said, or will say, what is wrong with the file)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's own PEM reader
    if decode is None:
        return None
    try:
        fields = decode(cert_file)
        return ssl.cert_time_to_seconds(fields["notBefore"]), ssl.cert_time_to_seconds(fields["notAfter"])
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def check_validity(cert_file: str, now: float | None = None, warn: bool = True) -> None:
    """A ValueError when the (first) certificate in cert_file has expired or is not valid yet; with warn, a
    warning when it expires within a day. A server with such a certificate started and said SERVING while every
    client's handshake failed, and logged nothing."""
    dates = certificate_dates(cert_file)
    if dates is None:
        return
    not_before, not_after = dates
    now = time.time() if now is None else now
    if now >= not_after:
        raise ValueError(f"the certificate in {cert_file!r} expired on {_utc(not_after)}: renew it")
    if now < not_before:
        raise ValueError(f"the certificate in {cert_file!r} is not valid before {_utc(not_before)}: check this "
                         "machine's clock, or wait")
    if warn and not_after - now < _EXPIRY_WARNING_S:
        log.warning("TLS: the certificate in %r expires on %s, within a day: renew it", cert_file, _utc(not_after))


def check_pair(cert_file: str, key_file: str, warn: bool = True) -> None:
    """A ValueError unless the key is unencrypted and is the private key of the certificate, the certificate is
    valid now, and the key is of a type gRPC's TLS can use; with warn, a warning when it expires within a day."""

    def encrypted() -> bytes:  # asked for only when the key has a passphrase; never prompt on a terminal
        raise ValueError(f"{key_file!r} is encrypted: give the private key without a passphrase")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=encrypted)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_TOO_SMALL" in reason or "MD_TOO_WEAK" in reason:
            raise ValueError(f"the key in {key_file!r} is too small, or the certificate in {cert_file!r} signed with "
                             f"too weak a digest ({reason}): issue an RSA key of 2048 bits or more, or an ECDSA "
                             "P-256 or P-384 key, signed with SHA-256 or stronger") from None
        raise ValueError(f"{key_file!r} is not the private key of the certificate in {cert_file!r}, or one of "
                         f"the two files is damaged ({reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename or cert_file!r}: {exc.strerror or exc}") from None
    if key_kind(key_file) is None:
        raise ValueError(f"{key_file!r} is a key of a kind gRPC's TLS cannot sign handshakes with (Ed25519, Ed448, "
                         "ECDSA on P-521, secp256k1 or brainpool curves, DSA): issue an RSA key (2048 bits or more) "
                         "or an ECDSA P-256 or P-384 key")
    check_validity(cert_file, warn=warn)


def files_stamp(*paths: str) -> tuple[object, ...]:
    """What changes when any of the files does (Kubernetes swaps a Secret's files through a symlink; ctime also
    moves on a chmod or chown, which can be what fixes a file that did not load). A path "" is no file."""
    out: list[object] = []
    for path in paths:
        try:
            st = os.stat(path) if path else None
            out.append(None if st is None else (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except OSError:
            out.append("missing")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How to dial a TLS server. Files are PEM; the constructor reads them once to fail early. A channel keeps
    the credentials it was made with through all its reconnects: the clients here make a new channel when
    stamp() changes (clients/channel.py Channels), and the tokenizer's engine pool makes one per dial."""

    ca_file: str = ""  # the CA that signed the server's certificate; "": the roots grpcio ships (docs/SECURITY.md)
    cert_file: str = ""  # with key_file: our own certificate, for a server that asks for one (mutual TLS)
    key_file: str = ""
    server_name: str = ""  # the name to verify in the server's certificate when the address is not it

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate and its private key go together: give both or neither, got "
                             f"certificate {self.cert_file!r} and key {self.key_file!r}")
        self.credentials(warn=False)  # the channel made from the files warns of a certificate near its end

    def credentials(self, warn: bool = True) -> grpc.ChannelCredentials:
        """Channel credentials from the files as they are now; warn: when the certificate expires within a day."""
        if self.cert_file:
            check_pair(self.cert_file, self.key_file, warn)
        return grpc.ssl_channel_credentials(
            root_certificates=read_ca(self.ca_file) if self.ca_file else None,
            private_key=read_pem(self.key_file, PRIVATE_KEY) if self.key_file else None,
            certificate_chain=read_pem(self.cert_file, CERTIFICATE) if self.cert_file else None)

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the name to verify, when it is not the target's host."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def stamp(self) -> tuple[object, ...]:
        """What changes when any of the files does; a few stat calls, cheap enough before each call."""
        return files_stamp(self.ca_file, self.cert_file, self.key_file)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line clients' TLS flags (llm-client, the serving benchmark)."""
    group = parser.add_argument_group("TLS (docs/SECURITY.md); any of these turns it on")
    group.add_argument("--tls", action="store_true",
                       help="dial over TLS, trusting the root certificates grpcio ships (not the machine's store: for "
                            "that, give --tls-ca /etc/ssl/certs/ca-certificates.crt, or set "
                            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH to it)")
    group.add_argument("--tls-ca", default="", help="PEM file: the CA that signed the service's certificate")
    group.add_argument("--tls-cert", default="", help="PEM file: our certificate, for a service that asks for one")
    group.add_argument("--tls-key", default="", help="PEM file: the private key of --tls-cert")
    group.add_argument("--tls-server-name", default="", help="the name to verify when the target is not it")


def tls_from_arguments(args: argparse.Namespace) -> ClientTls | None:
    """The TLS the flags ask for, or None for plaintext; ValueError on unusable files."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


class _Served:
    """The certificate a server presents now: when it expires, and when to look at that again. The client refuses
    an expired one, so gRPC logs nothing on the server and health stays SERVING: this says it."""

    __slots__ = ("cert_file", "stamp", "not_after", "check_at", "warned")

    def __init__(self) -> None:
        self.cert_file, self.stamp, self.not_after, self.check_at, self.warned = "", (), math.nan, 0.0, False

    def load(self, cert_file: str, stamp: tuple[object, ...]) -> None:
        """The pair from cert_file (its files' stamp then) is served from now on."""
        dates = certificate_dates(cert_file)
        # nan (a Python that cannot read certificates): every comparison is False, so check() says nothing
        self.cert_file, self.stamp, self.not_after = cert_file, stamp, dates[1] if dates else math.nan
        self.check_at, self.warned = 0.0, False

    def check(self) -> None:
        """At most every RELOAD_RETRY_S: an ERROR once the certificate has expired; before that, a WARNING (once)
        when it expires within a day."""
        if time.monotonic() < self.check_at:
            return
        self.check_at = time.monotonic() + RELOAD_RETRY_S
        left = self.not_after - time.time()
        if left <= 0:
            log.error("TLS: the certificate served from %r expired on %s: every TLS handshake fails; renew it",
                      self.cert_file, _utc(self.not_after))
        elif left < _EXPIRY_WARNING_S and not self.warned:
            self.warned = True
            log.warning("TLS: the certificate served from %r expires on %s, within a day: renew it",
                        self.cert_file, _utc(self.not_after))


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A TLS server's certificate and key, and for mutual TLS the CA that must have signed each client's."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""  # set: every client must present a certificate this CA signed
    _served: _Served = field(default_factory=_Served, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise ValueError("a TLS server needs a certificate and its private key, got certificate "
                             f"{self.cert_file!r} and key {self.key_file!r}")
        self._configuration()

    @property
    def mutual(self) -> bool:
        """Every client must present a certificate (mutual TLS)."""
        return bool(self.client_ca_file)

    def expiry(self) -> float:
        """When the certificate served expires (its notAfter, a Unix time; nan when unknown), for a gauge. Files
        renewed since the last handshake count as served when they load: the next handshake serves them, and an
        engine whose callers hold their connections open may see none for weeks (the alert would fire on the
        old date)."""
        served = self._served
        if self._stamp() == served.stamp:
            return served.not_after
        try:
            check_pair(self.cert_file, self.key_file, warn=False)
        except ValueError:
            return served.not_after  # half-written: the next handshake keeps the current pair too
        dates = certificate_dates(self.cert_file)
        return dates[1] if dates else served.not_after

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert = read_pem(self.key_file, PRIVATE_KEY), read_pem(self.cert_file, CERTIFICATE)
        check_pair(self.cert_file, self.key_file, warn=False)  # _Served.check warns, once per certificate served
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)],
            root_certificates=read_ca(self.client_ca_file) if self.client_ca_file else None)

    def _stamp(self) -> tuple[object, ...]:
        return files_stamp(self.cert_file, self.key_file, self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that reload the files on the first handshake after they change, and say when the
        certificate served expires within a day or has expired."""
        seen = self._stamp()
        initial = self._configuration()
        self._served.load(self.cert_file, seen)
        self._served.check()
        retry_at: float | None = None  # files that did not load are tried again from then (a renewed
        # certificate not valid yet: its notBefore passes without the files changing again)

        def fetch() -> grpc.ServerCertificateConfiguration | None:  # grpc calls this before each handshake
            nonlocal seen, retry_at
            now = self._stamp()
            configuration = None
            if now != seen or (retry_at is not None and time.monotonic() >= retry_at):
                seen, retry_at = now, None
                try:
                    configuration = self._configuration()
                except Exception as exc:  # noqa: BLE001 -- any failure (an OSError too) must keep the retry going
                    retry_at = time.monotonic() + RELOAD_RETRY_S
                    log.warning("TLS files changed but do not load (%s); keeping the current certificate, trying "
                                "again in %.0fs or when they change", exc, RELOAD_RETRY_S)
                else:
                    log.info("TLS: reloading the certificate from %s", self.cert_file)
                    self._served.load(self.cert_file, now)
            self._served.check()  # the files unchanged too: a certificate expires where it lies
            return configuration

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)


def server_tls_settings(config: Any, env_prefix: str) -> ServerTls | None:
    """A service's TLS from the settings both services have (tls_cert, tls_key, tls_client_ca, health_port,
    beside port and metrics_port), or None for plaintext; a ValueError names the settings that cannot work."""
    if not 0 <= config.health_port < 65536:
        raise ValueError(f"health_port must be in 0..65535 (0 turns it off), got {config.health_port}")
    if config.health_port and config.health_port in (config.port, config.metrics_port):
        raise ValueError(f"health_port {config.health_port} is taken by port or metrics_port: give the plaintext "
                         "health server a port of its own")
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    try:
        return ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    except ValueError as exc:
        raise ValueError(f"TLS (tls_cert, tls_key, tls_client_ca; --tls-*, {env_prefix}TLS_*): {exc}") from None


def describe(tls: ServerTls | None) -> str:
    """For the start-up log line."""
    return "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS"


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 as grpcio-health-checking serves it, but a Watch that ends leaves the other Watch calls of
    its service name still notified: the library's Watch removes the name's shared condition when any one of them
    ends, and the rest then never heard another status (NOT_SERVING on a drain or an engine failure included). Both services serve this one."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: Counter[str] = Counter()  # Watch calls open, by service name

    async def Watch(self, request, context) -> None:
        service = request.service
        condition = self._server_watchers[service]  # the one the library's Watch waits on
        self._watching[service] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watching[service] -= 1
            if self._watching[service]:
                self._server_watchers[service] = condition  # the library's Watch removed it from under the others
            else:
                del self._watching[service]


async def start_health_server(servicer: object, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started plaintext server with grpc.health.v1 alone (the same servicer as the main port), and its port."""
    server = grpc.aio.server(options=[NO_REUSEPORT])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = listen(server, f"{host}:{port}", what="health_port")
    await server.start()
    return server, bound


class _Malformed:
    """What a request that did not parse becomes, so that the handler can refuse it in words."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _tolerant(parse: Any, type_name: str) -> Any:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 -- DecodeError (bad wire format, invalid UTF-8 in a string)
            return _Malformed(f"the request is not a valid {type_name} ({type(exc).__name__}: {exc})")
    return deserialize


async def _checked_messages(messages: Any) -> Any:
    async for message in messages:
        if isinstance(message, _Malformed):
            raise ValueError(message.detail)  # the service's stream reader ends the call with INVALID_ARGUMENT
        yield message


def _checked(handler: grpc.RpcMethodHandler, type_name: str) -> grpc.RpcMethodHandler:
    """The handler with a deserializer that does not raise, and a behaviour that refuses what did not parse."""
    deserialize = _tolerant(handler.request_deserializer, type_name)
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
            return await behaviour(request, context)
        return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(request: object, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
            responses = streaming(request, context)
            try:
                async for response in responses:
                    yield response
            finally:  # closed with this one (a cancelled call): the handler's cleanup runs now, not at GC
                await responses.aclose()
        return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
    if handler.stream_stream is not None:
        bidi = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            responses = bidi(_checked_messages(requests), context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()
        return handler._replace(request_deserializer=deserialize, stream_stream=stream_stream)
    return handler  # client streaming alone: no such method in these services


class _Registrar:
    """Stands in for a server to a generated add_*Servicer_to_server: takes its handlers, to register checked."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


class RoutineCallEndFilter(logging.Filter):
    """grpc logs at ERROR, with a traceback, a failure to send on a call that its core ended meanwhile: mostly the
    request's deadline passing while a response or its status was being written (after a client's cancel it logs
    nothing), which the caller sees as DEADLINE_EXCEEDED and the request's own log line reports. This makes it one
    WARNING line without the traceback: a routine deadline must not look like a server error, while a message over
    max_message_bytes, which fails the same way, still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("ExecuteBatchError raised in core"):
            why = record.exc_info[1] if record.exc_info else None
            record.msg = (f"could not send on {record.getMessage().rpartition(' ')[2]}: the call had already ended "
                          f"(its deadline passed as it was answered, or a message was over the size limit): {why}")
            record.args = None
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        return True


def quiet_routine_call_ends() -> None:
    """Install RoutineCallEndFilter on grpc's server logger (once)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, RoutineCallEndFilter) for f in grpc_log.filters):
        grpc_log.addFilter(RoutineCallEndFilter())


def add_checked_servicer(add_to_server: Any, servicer: object, server: grpc.aio.Server, file_descriptor: Any) -> None:
    """Register a servicer as its generated add_*_to_server would, except that a request that does not parse is
    refused with INVALID_ARGUMENT naming its message type: gRPC itself answers UNKNOWN and logs an ERROR with a
    traceback per such request, so garbage on the wire could flood the logs. Routine deadline ends are quieted
    too (RoutineCallEndFilter)."""
    quiet_routine_call_ends()
    registrar = _Registrar()
    add_to_server(servicer, registrar)
    service = file_descriptor.services_by_name[registrar.service.rpartition(".")[2]]
    handlers = {name: _checked(handler, service.methods_by_name[name].input_type.name)
                for name, handler in registrar.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(registrar.service, handlers),))
    server.add_registered_method_handlers(registrar.service, handlers)
