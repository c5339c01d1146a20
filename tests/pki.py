"""Throwaway certificate authorities for the TLS tests, made with `cryptography` (the test extra)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    cert: Path
    key: Path


class CA:
    """A self-signed CA in `directory`, its certificate at `self.cert`; issue() writes a leaf pair beside it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = directory / f"{name}.crt"
        self.cert.write_bytes(self._sign(name, self._key, ca=True, sans=()))

    def _sign(self, subject: str, key, ca: bool, sans: tuple[str, ...],
              valid: tuple[datetime.timedelta, datetime.timedelta] | None = None) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        start, end = valid or (-datetime.timedelta(minutes=5), datetime.timedelta(days=2))  # relative to now
        builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(self.name))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now + start)
                   .not_valid_after(now + end)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            names = [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: str, *sans: str, cert: Path | None = None, key: Path | None = None,
              passphrase: bytes | None = None, valid: tuple[datetime.timedelta, datetime.timedelta] | None = None,
              leaf_key=None) -> Issued:
        """A certificate for `subject` (names it answers to: sans), written to cert/key (default: beside the CA);
        the key is encrypted with passphrase when one is given. valid: (start, end) relative to now; leaf_key:
        the key to certify (default a new P-256 one)."""
        leaf_key = leaf_key or ec.generate_private_key(ec.SECP256R1())
        out = Issued(cert or self.directory / f"{subject}.crt", key or self.directory / f"{subject}.key")
        out.cert.write_bytes(self._sign(subject, leaf_key, ca=False, sans=sans, valid=valid))
        encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                      else serialization.NoEncryption())
        out.key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   encryption))
        return out
