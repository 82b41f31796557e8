"""HTTPS for a studio that other devices visit: browsers give the webcam only to a secure page (https, or http
on localhost). The user's own certificate (`--tls-cert/--tls-key`), or one this machine signs for itself on first
use and keeps (`<cache>/tls/`, the key readable by its owner only), valid for every name and address of this
machine. A visitor's browser warns once about a self-signed certificate; the printed SHA-256 fingerprint is how
they check it is this one."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mlx_sdxs import loopback
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.imageio import atomic_write_bytes
from mlx_sdxs.runtime import cache_root
from mlx_sdxs.studio.network import is_address

#: A made certificate is valid this long (under the 398 days browsers allow), and remade when less is left.
VALID_DAYS = 397
RENEW_DAYS = 30
CERT_FILE, KEY_FILE = "cert.pem", "key.pem"


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the certificate, colon-separated hex, as browsers show it
    self_signed: bool


def folder(cache: Path | None = None) -> Path:
    """Where the self-signed certificate is kept between runs (in `cache`, default mlx-sdxs's cache)."""
    return (cache if cache is not None else cache_root()) / "tls"


def choose(enabled: bool | None, cert: Path | None, key: Path | None, host: str,
           names: Iterable[str]) -> Certificate | None:
    """The certificate the studio serves with, or None for plain HTTP. `enabled`: --tls/--no-tls (None: HTTPS
    when listening beyond loopback, or when a certificate is given); `names`: what a made one must be valid for."""
    if (cert is None) != (key is None):
        raise SDXSError("--tls-cert and --tls-key go together: give both files, or neither for a self-signed one")
    if enabled is False:
        if cert is not None:
            raise SDXSError("--no-tls contradicts --tls-cert/--tls-key")
        return None
    if cert is not None:
        return given(cert, key)
    if enabled or host not in loopback.NAMES:
        return self_signed(names)
    return None


def given(cert: Path, key: Path) -> Certificate:
    """The user's certificate and key, checked now (readable, PEM, matching, unencrypted) so a bad pair is a
    clear error before the model loads rather than a failed server start."""
    for path in (cert, key):
        if not path.is_file():
            raise SDXSError(f"no such TLS file: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
        text = cert.read_text()
    except (ssl.SSLError, UnicodeDecodeError, OSError) as exc:
        raise SDXSError(f"cannot use {cert} with {key} as the TLS certificate and key ({exc}): they must be PEM "
                        "files, the key matching the certificate") from None
    return Certificate(cert, key, fingerprint(text), self_signed=False)


def self_signed(names: Iterable[str], where: Path | None = None) -> Certificate:
    """This machine's own certificate for `names`: the kept one while it covers them and has time left, else a
    new one (a new fingerprint). Two studios starting at once make one certificate, not a mismatched pair."""
    where = where if where is not None else folder()
    wanted = sorted(set(names))
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = where / CERT_FILE, where / KEY_FILE
    with open(where / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _usable(cert_path, key_path, wanted):
            _make(cert_path, key_path, wanted)
    return Certificate(cert_path, key_path, fingerprint(cert_path.read_text()), self_signed=True)


def fingerprint(pem: str) -> str:
    """SHA-256 of the first certificate in a PEM text, colon-separated upper-case hex (what a browser shows)."""
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise SDXSError("not a PEM certificate (no BEGIN/END CERTIFICATE block)")
    der = ssl.PEM_cert_to_DER_cert(pem[start: end + len("-----END CERTIFICATE-----")])
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _refuse_password() -> bytes:
    raise SDXSError("the TLS key is encrypted: give an unencrypted key file (the server starts unattended)")


def _usable(cert_path: Path, key_path: Path, names: list[str]) -> bool:
    """The kept pair matches, covers `names` and is valid for RENEW_DAYS more."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def der(public_key) -> bytes:
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound):
        return False  # absent or damaged: make a new one
    covered = {*alt.get_values_for_type(x509.DNSName), *map(str, alt.get_values_for_type(x509.IPAddress))}
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return (der(key.public_key()) == der(cert.public_key()) and set(names) <= covered
            and left > datetime.timedelta(days=RENEW_DAYS))


def _make(cert_path: Path, key_path: Path, names: list[str]) -> None:
    """A new EC P-256 key and a certificate for `names` signed by it (server auth only, not a CA); each file
    written whole then renamed, the key created 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mlx-sdxs studio ({os.uname().nodename})"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.IPAddress(ipaddress.ip_address(name)) if is_address(name) else x509.DNSName(name) for name in names]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
