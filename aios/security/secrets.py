"""Secrets (the JWT signing key, the metrics credentials): from the environment or from a file
readable by its owner only, never from the committed TOML."""

from __future__ import annotations

import os
import secrets as _secrets
import stat
from pathlib import Path

from aios.config import SecuritySettings
from aios.errors import ConfigError

MIN_SECRET_BYTES = 32


def read_secret(name: str, value: str | None, file: str | None) -> tuple[str | None, str]:
    """The secret of setting ``name`` (``section.key``): ``value`` if given, else the content of
    ``file`` (stripped), else None; and where it came from, for error messages.

    A file others or the group may read is refused (ConfigError): the secret has leaked already.
    """
    if value is not None or not file:
        return value, name
    path = Path(file)
    source = f"{name}_file ({path})"
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{source}: must be readable by its owner only (chmod 600 {path})")
    return secret, source


def resolve_jwt_secret(settings: SecuritySettings) -> str:
    """Return the signing key, or raise ConfigError (the API refuses to start) if it is missing or weak."""
    secret, source = read_secret("security.jwt_secret", settings.jwt_secret, settings.jwt_secret_file)
    if not secret:
        raise ConfigError(
            "security.jwt_secret: not set; give AIOS_SECURITY__JWT_SECRET or AIOS_SECURITY__JWT_SECRET_FILE "
            f"(at least {MIN_SECRET_BYTES} random bytes, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{source}: must be at least {MIN_SECRET_BYTES} bytes (got {len(secret.encode('utf-8'))}); "
            "a short HS256 key can be brute-forced"
        )
    return secret


def ensure_secret_file(path: Path) -> Path:
    """Create a random signing key at ``path`` (mode 600) unless it exists: the embedded default's key."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(_secrets.token_urlsafe(48))
    return path
