"""`aios` warns at start when a secret file is open to more people than the deployment docs allow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aios.config import DEFAULT_CONFIG_PATH, load_settings
from aios.security.file_modes import loose_secret_files, warn_loose_secret_files

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_file(path: Path, mode: int, text: str = "x" * 48) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    return make_file(tmp_path / "aios.toml", 0o640, "")


def settings_for(config: Path, **env: str):
    return load_settings(environ={"AIOS_CONFIG": str(config), **env})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_a_key_file_open_to_group_or_others_is_named_with_its_mode_and_the_fix(tmp_path, config, mode):
    # Given the JWT key file with a mode wider than 600
    key = make_file(tmp_path / "jwt.key", mode)
    settings = settings_for(config, AIOS_SECURITY__JWT_SECRET_FILE=str(key))
    # When the secret files are checked
    loose = loose_secret_files(settings, {"AIOS_CONFIG": str(config)})
    # Then exactly that file is reported, with its setting, its mode and the chmod that fixes it
    assert [item.path for item in loose] == [key]
    message = loose[0].message
    assert "security.jwt_secret_file" in message and str(key) in message
    assert f"mode {mode:04o}" in message and f"chmod 600 {key}" in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_key_file_for_its_owner_only_passes(tmp_path, config, mode):
    key = make_file(tmp_path / "jwt.key", mode)
    settings = settings_for(config, AIOS_SECURITY__JWT_SECRET_FILE=str(key))
    assert loose_secret_files(settings, {"AIOS_CONFIG": str(config)}) == []


def test_a_missing_key_file_is_left_to_the_code_that_reads_it(tmp_path, config):
    settings = settings_for(config, AIOS_SECURITY__JWT_SECRET_FILE=str(tmp_path / "absent.key"))
    assert loose_secret_files(settings, {"AIOS_CONFIG": str(config)}) == []


def test_an_extra_key_file_such_as_the_tls_key_is_checked_too(tmp_path, config):
    # Given `aios api --keyfile` pointing at a world-readable private key
    tls_key = make_file(tmp_path / "tls.key", 0o644)
    settings = settings_for(config)
    loose = loose_secret_files(settings, {"AIOS_CONFIG": str(config)}, [("--keyfile", str(tls_key)), ("x", None)])
    # Then it is reported under the option's name
    assert [(item.what, item.path, item.fix) for item in loose] == [("--keyfile", tls_key, "600")]


@pytest.mark.parametrize(("mode", "reported"), [(0o640, False), (0o600, False), (0o644, True), (0o606, True)])
def test_the_config_file_may_be_read_by_its_group_but_not_by_others(tmp_path, mode, reported):
    # Given AIOS_CONFIG naming a file with this mode
    config = make_file(tmp_path / "aios.toml", mode, "[api]\nport = 8001\n")
    loose = loose_secret_files(settings_for(config), {"AIOS_CONFIG": str(config)})
    # Then only a file that others can open is reported, with chmod 640 as the fix
    assert [(item.path, item.fix) for item in loose] == ([(config, "640")] if reported else [])


def test_the_repository_config_without_secrets_is_not_reported_even_when_named_explicitly():
    # The checkout's config/aios.toml is world-readable, holds no secret, and tests name it in AIOS_CONFIG.
    assert DEFAULT_CONFIG_PATH.resolve() == (REPO_ROOT / "config" / "aios.toml").resolve()
    environ = {"AIOS_CONFIG": str(DEFAULT_CONFIG_PATH)}
    assert loose_secret_files(load_settings(environ=environ), environ) == []
    assert loose_secret_files(load_settings(environ={}), {}) == []


def test_a_world_readable_config_holding_a_password_is_reported(tmp_path):
    config = make_file(tmp_path / "aios.toml", 0o644, '[broker]\nurl = "redis://:s3cret@redis:6379/0"\n')
    loose = loose_secret_files(settings_for(config), {"AIOS_CONFIG": str(config)})
    assert [item.path for item in loose] == [config]


def test_each_loose_file_is_logged_as_one_warning(tmp_path, caplog):
    # Given a loose key file and a loose config file
    config = make_file(tmp_path / "aios.toml", 0o644, "")
    key = make_file(tmp_path / "jwt.key", 0o644)
    settings = settings_for(config, AIOS_SECURITY__JWT_SECRET_FILE=str(key))
    # When the start-up check runs
    with caplog.at_level(logging.WARNING, logger="aios.security"):
        warn_loose_secret_files(settings, {"AIOS_CONFIG": str(config)})
    # Then each file gets one warning line
    messages = [record.getMessage() for record in caplog.records if record.name == "aios.security"]
    assert len(messages) == 2
    assert any(str(key) in m and "chmod 600" in m for m in messages)
    assert any(str(config) in m and "chmod 640" in m for m in messages)
    assert all("\n" not in m for m in messages)


def run_aios(tmp_path: Path, key_mode: int) -> subprocess.CompletedProcess[str]:
    config = make_file(tmp_path / "aios.toml", 0o640, "")
    key = make_file(tmp_path / "jwt.key", key_mode, "k" * 48)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AIOS_CONFIG": str(config),
        "AIOS_LOGGING__DIR": "",
        "AIOS_SECURITY__JWT_SECRET_FILE": str(key),
    }
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_aios_warns_on_stderr_at_start_when_the_key_file_is_world_readable(tmp_path):
    # Given a JWT key file with mode 644
    result = run_aios(tmp_path, 0o644)
    # Then the command still works, and stderr names the file, its mode and the fix
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert str(tmp_path / "jwt.key") in warnings[0] and "0644" in warnings[0] and "chmod 600" in warnings[0]
    # And the key itself is printed nowhere
    assert "k" * 48 not in result.stdout + result.stderr


def test_aios_starts_silently_when_the_key_file_is_600(tmp_path):
    result = run_aios(tmp_path, 0o600)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_a_backup_directory_open_to_others_is_named_with_the_fix(tmp_path):
    # Given backup.dir readable by every local user (a command's user among them)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o755)
    backups.chmod(0o755)
    settings = load_settings(environ={}, overrides={"backup": {"dir": str(backups)}})
    # Then it is reported with chmod 700; closed, it is not
    loose = [item for item in loose_secret_files(settings, environ={}) if item.path == backups]
    assert [item.fix for item in loose] == ["700"] and "backup.dir" in loose[0].message
    backups.chmod(0o700)
    assert all(item.path != backups for item in loose_secret_files(settings, environ={}))
