"""``aios certs create``: a self-signed certificate and key for local HTTPS (a laptop, a demo, tests).

The original system shipped ``config/certs/server.crt`` and ``server.key`` (mode 600); this writes the
same pair, so ``[api] tls_cert``/``tls_key`` can point at it. A client trusts it by naming the
certificate (``curl --cacert config/certs/server.crt``, ``requests.get(..., verify=...)``). Production
certificates come from a real CA; nothing here tries to be one.

The key is ECDSA P-256: every TLS client of the last decade speaks it, and it is made in milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aios.errors import AiosError

#: Where ``aios certs create`` writes, relative to the working directory (the original's layout).
DEFAULT_CERTS_DIR = Path("config") / "certs"
CERT_NAME = "server.crt"
KEY_NAME = "server.key"


@dataclass(frozen=True)
class CertificatePair:
    """Where a pair was written, and the names (DNS names and IP addresses) it is valid for."""

    cert: Path
    key: Path
    names: tuple[str, ...]
    not_after: datetime.datetime


def default_names(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """localhost, 127.0.0.1, ::1, this host's name, then ``extra``; each once, in that order."""
    names: list[str] = []
    for name in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]:
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return tuple(names)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def self_signed(names: tuple[str, ...], days: int) -> tuple[bytes, bytes, datetime.datetime]:
    """A self-signed server certificate valid for ``names`` during ``days``, and its key: both PEM."""
    if days < 1:
        raise AiosError(f"--days must be at least 1 (got {days})")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AIOS self-signed"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A minute back: a client whose clock is a little behind must not see a certificate from the future.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(key_id, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem, not_after


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with its final mode, then rename: the key is never, even
    for a moment, a file others could read, and a crash leaves the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)  # the umask may have narrowed it; never widened
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_pair(directory: Path, *, names: tuple[str, ...], days: int, force: bool) -> CertificatePair:
    """Write ``server.crt`` (644) and ``server.key`` (600) into ``directory`` (created, 700 if new).

    An existing pair is kept unless ``force``: overwriting a key silently would break every client
    that trusts the old certificate.
    """
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    existing = [str(path) for path in (cert_path, key_path) if path.exists()]
    if existing and not force:
        raise AiosError(f"{' and '.join(existing)} already exist; add --force to replace them")
    cert_pem, key_pem, not_after = self_signed(names, days)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    return CertificatePair(cert_path, key_path, names, not_after)


def trust_for(cert_path: str) -> str | None:
    """The file a client should trust to reach a server presenting ``cert_path``: the certificate itself
    when it is self-signed (``aios certs create``), else None (a CA the client already trusts signed it).
    So ``aios up``'s hint and ``aios ps`` verify the certificate instead of turning verification off."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return None
    return cert_path if cert.issuer == cert.subject else None
