"""Warn at start about secret files that other users can read.

The deployment docs ask for key files readable by their owner only (600) and the configuration file
for its owner and the service group (640 root:aios). A mode that is wider leaks a key to every local
account, silently: nothing fails. So every ``aios`` command checks the files it was pointed at and logs
one warning per file, naming the file, its mode and the ``chmod`` that fixes it. A warning, not an
error: a process that refused to start over a mode would turn a tidy-up into an outage.

The exceptions are refused outright, because the file is the identity of the process itself: the JWT
key file (:func:`aios.security.secrets.read_secret`) and the TLS private key of a listener
(:func:`check_key_file`, called by :mod:`aios.security.tls`): a leaked key lets anyone on the host
mint tokens or impersonate the server, so starting would only hide the problem behind a padlock.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aios.config import DEFAULT_CONFIG_PATH, Settings
from aios.errors import ConfigError

logger = logging.getLogger("aios.security")

#: Key files: nobody but the owner may have any access.
KEY_FILE_FORBIDDEN = stat.S_IRWXG | stat.S_IRWXO
#: The configuration file: the service group may read it (640), others may not.
CONFIG_FILE_FORBIDDEN = stat.S_IRWXO


@dataclass(frozen=True)
class LooseFile:
    """A secret file whose mode lets more people in than it should."""

    what: str
    path: Path
    mode: int
    #: Who should not be let in ("group or others", "others"), and the mode that fixes it.
    audience: str
    fix: str

    @property
    def message(self) -> str:
        return (
            f"{self.what} {self.path} is open to {self.audience} (mode {self.mode:04o}); "
            f"run: chmod {self.fix} {self.path}"
        )


def key_file_settings(settings: Settings) -> list[tuple[str, str]]:
    """Every ``*_file`` and ``tls_key`` setting that is set, as (``section.key``, path): each names a
    file with a secret."""
    found = []
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        for key in type(section).model_fields:
            value = getattr(section, key)
            if (key.endswith("_file") or key == "tls_key") and isinstance(value, str) and value:
                found.append((f"{section_name}.{key}", value))
    return found


def check_key_file(what: str, raw: str) -> None:
    """Refuse (ConfigError) a private key that is missing, open to the group or others, or owned by
    someone other than the user running AIOS (root may own it: root can read every file anyway)."""
    path = Path(raw)
    try:
        status = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
    if not stat.S_ISREG(status.st_mode):
        raise ConfigError(f"{what} {path}: not a file")
    mode = stat.S_IMODE(status.st_mode)
    if mode & KEY_FILE_FORBIDDEN:
        raise ConfigError(
            f"{what} {path} is open to group or others (mode {mode:04o}); a private key must be readable "
            f"by its owner only: run chmod 600 {path}"
        )
    user = os.geteuid()
    if status.st_uid not in (user, 0):
        try:
            name = pwd.getpwuid(user).pw_name
        except KeyError:  # a uid without a passwd entry (a container's): chown takes the number
            name = str(user)
        raise ConfigError(
            f"{what} {path} belongs to uid {status.st_uid}, not to the user running AIOS ({name}, uid {user}): "
            f"run chown {name} {path}"
        )


def _mode(path: Path) -> int | None:
    try:
        status = path.stat()
    except OSError:
        return None  # missing or unreadable: whoever reads it reports that, with its own message
    return stat.S_IMODE(status.st_mode) if stat.S_ISREG(status.st_mode) else None


def _dir_mode(path: Path) -> int | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return stat.S_IMODE(status.st_mode) if stat.S_ISDIR(status.st_mode) else None


def _holds_secret(path: Path) -> bool:
    """Whether a TOML config file itself carries a secret: a JWT key, a metrics credential or a URL
    with a password."""
    from sqlalchemy.engine import make_url

    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    if (data.get("security") or {}).get("jwt_secret"):
        return True
    metrics = data.get("metrics") or {}
    if metrics.get("bearer_token") or metrics.get("basic_auth_password"):
        return True
    for section in ("database", "broker"):
        url = (data.get(section) or {}).get("url")
        if isinstance(url, str) and "@" in url:
            try:
                if make_url(url).password:
                    return True
            except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: judge by its userinfo part
                if ":" in url.split("@", 1)[0].split("//", 1)[-1]:
                    return True
    return False


def loose_secret_files(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    extra_key_files: Iterable[tuple[str, str | None]] = (),
) -> list[LooseFile]:
    """The secret files whose mode is wider than the docs ask, in a stable order.

    Checked: every ``*_file`` setting and ``extra_key_files`` (say, the API's TLS key), which must
    be 600 or narrower; ``backup.dir``, which must be closed to others (700: a dump is the whole
    ledger, and commands run as another user); and the configuration file (``AIOS_CONFIG``), which must not be open to
    others. The repository's own ``config/aios.toml`` is exempt while it holds no secret: a checkout
    is world-readable, and that is fine for a file without one.
    """
    environ = os.environ if environ is None else environ
    loose: list[LooseFile] = []
    for what, raw in [*key_file_settings(settings), *extra_key_files]:
        if not raw:
            continue
        path = Path(raw)
        mode = _mode(path)
        if mode is not None and mode & KEY_FILE_FORBIDDEN:
            loose.append(LooseFile(what, path, mode, "group or others", "600"))
    backups = Path(settings.backup.dir)
    mode = _dir_mode(backups)
    if mode is not None and mode & stat.S_IRWXO:  # dumps hold every hash and result; commands run as others
        loose.append(LooseFile("backup directory (backup.dir)", backups, mode, "others", "700"))
    explicit = environ.get("AIOS_CONFIG")
    config = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    mode = _mode(config)
    repository_default = config.resolve() == DEFAULT_CONFIG_PATH.resolve()
    if mode is not None and mode & CONFIG_FILE_FORBIDDEN and (not repository_default or _holds_secret(config)):
        loose.append(LooseFile("configuration file", config, mode, "others", "640"))
    return loose


def warn_loose_secret_files(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    extra_key_files: Iterable[tuple[str, str | None]] = (),
) -> list[LooseFile]:
    """Log one warning per loose secret file (see :func:`loose_secret_files`); return them."""
    loose = loose_secret_files(settings, environ, extra_key_files)
    for item in loose:
        logger.warning("%s", item.message)
    return loose
