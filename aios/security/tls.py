"""TLS of AIOS's own listeners (``aios api``, ``aios up``'s API, ``aios metrics``): the files of an
``[api]`` or ``[metrics]`` section checked before the listener opens, and the server's SSL context.

A listener whose key others can read, or that belongs to another user, refuses to start (exit 2)
with the file and the ``chmod``/``chown`` that fixes it (:func:`aios.security.file_modes.check_key_file`).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from aios.config import TlsSettings
from aios.errors import ConfigError
from aios.security.file_modes import check_key_file


def _check_readable(what: str, raw: str) -> None:
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: not readable by the user running AIOS")


def check_tls_files(section: str, tls: TlsSettings) -> None:
    """Check every TLS file of ``section`` (``api``, ``metrics``) and that the pair loads: a bad file
    stops the command with exit 2 before anything listens, naming the ``section.key`` at fault."""
    if not tls.tls_enabled:
        return
    _check_readable(f"{section}.tls_cert", tls.tls_cert)
    check_key_file(f"{section}.tls_key", tls.tls_key)
    if tls.tls_client_ca:
        _check_readable(f"{section}.tls_client_ca", tls.tls_client_ca)
    server_context(section, tls)


def server_context(section: str, tls: TlsSettings) -> ssl.SSLContext:
    """The SSL context of a listener: TLS 1.2 or newer, this certificate and key, and with a client CA,
    a certificate required of every client (an unsigned or missing one fails the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=tls.tls_cert, keyfile=tls.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{section}.tls_cert/{section}.tls_key ({tls.tls_cert}, {tls.tls_key}): cannot load them as a "
            f"PEM certificate and its private key ({exc})"
        ) from exc
    if tls.tls_client_ca:
        try:
            context.load_verify_locations(cafile=tls.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{section}.tls_client_ca ({tls.tls_client_ca}): not a PEM CA certificate ({exc})"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
