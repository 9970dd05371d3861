"""`aios certs create` and the plain logic of TLS and metrics credentials: the settings that go
together, the Authorization headers ``aios metrics`` accepts, what counts as loopback."""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from aios.config import load_settings
from aios.errors import ConfigError
from aios.ops.cluster_metrics import MetricsCredentials, is_loopback, metrics_credentials
from aios.security.file_modes import check_key_file, loose_secret_files
from tests.conftest import REPO_ROOT


def aios(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", *args],
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def names_of(cert: Path) -> set[str]:
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))}


def test_certs_create_writes_the_originals_layout_with_a_600_key_and_the_local_names(tmp_path):
    # When `aios certs create` runs in a fresh folder with one extra name
    result = aios("certs", "create", "--host", "aios.example.test", cwd=tmp_path)
    # Then config/certs/server.crt and server.key exist, the key readable by its owner only
    assert result.returncode == 0, result.stderr
    cert, key = tmp_path / "config" / "certs" / "server.crt", tmp_path / "config" / "certs" / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    # And the certificate is valid for localhost, 127.0.0.1, ::1, this host and the extra name
    assert names_of(cert) == {"localhost", "127.0.0.1", "::1", socket.gethostname(), "aios.example.test"}
    # And the output says how to use it
    assert 'tls_cert = "config/certs/server.crt"' in result.stdout
    check_key_file("server.key", str(key))  # the pair passes the start-up check as written


def test_certs_create_refuses_to_overwrite_a_pair_without_force(tmp_path):
    # Given a pair already written in --dir, valid 10 days
    assert aios("certs", "create", "--dir", "tls", "--days", "10", cwd=tmp_path).returncode == 0
    first = (tmp_path / "tls" / "server.crt").read_bytes()
    # When it runs again without --force, Then it refuses and keeps the pair
    again = aios("certs", "create", "--dir", "tls", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exist; add --force" in again.stderr
    assert (tmp_path / "tls" / "server.crt").read_bytes() == first
    # When it runs with --force, Then a new pair replaces it, the key still 600
    forced = aios("certs", "create", "--dir", "tls", "--force", "--host", "10.0.0.7", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "tls" / "server.crt").read_bytes() != first
    assert stat.S_IMODE((tmp_path / "tls" / "server.key").stat().st_mode) == 0o600
    # And an address given with --host is an IP SAN (what clients match an address against), not a DNS name
    certificate = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_the_group_or_others_can_read_is_refused_with_the_chmod_that_fixes_it(tmp_path, mode):
    key = tmp_path / "server.key"
    key.write_text("key")
    key.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        check_key_file("api.tls_key", str(key))
    assert f"api.tls_key {key} is open to group or others (mode {mode:04o})" in refused.value.message
    assert f"chmod 600 {key}" in refused.value.message


@pytest.mark.parametrize(
    ("section", "values", "says"),
    [
        ("api", {"tls_cert": "a.crt"}, "tls_cert and tls_key go together"),
        ("metrics", {"tls_key": "a.key"}, "tls_cert and tls_key go together"),
        ("api", {"tls_client_ca": "ca.crt"}, "tls_client_ca needs tls_cert"),
        ("metrics", {"basic_auth_user": "prometheus"}, "basic_auth_user and basic_auth_password"),
    ],
)
def test_tls_and_credential_settings_that_go_together_are_checked_at_load(section, values, says):
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={}, overrides={section: values})
    assert says in refused.value.message


def test_metrics_credentials_accept_the_token_or_the_basic_pair_and_nothing_else():
    credentials = MetricsCredentials("t" * 20, "prometheus", "secret password")
    basic = base64.b64encode(b"prometheus:secret password").decode()
    assert credentials.accept(f"Bearer {'t' * 20}")
    assert credentials.accept(f"bearer {'t' * 20}")
    assert credentials.accept(f"Basic {basic}")
    for header in [None, "", "Bearer", f"Bearer {'t' * 19}", "Basic ???", f"Basic {basic[:-4]}", f"Token {'t' * 20}"]:
        assert not credentials.accept(header), header
    assert not MetricsCredentials().required


def test_a_short_metrics_token_is_refused_and_a_secret_file_must_be_owner_only(tmp_path):
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        metrics_credentials(load_settings(environ={}, overrides={"metrics": {"bearer_token": "short"}}).metrics)
    token_file = tmp_path / "token"
    token_file.write_text("x" * 32 + "\n")
    token_file.chmod(0o640)
    settings = load_settings(environ={}, overrides={"metrics": {"bearer_token_file": str(token_file)}})
    with pytest.raises(ConfigError, match=f"chmod 600 {token_file}"):
        metrics_credentials(settings.metrics)
    token_file.chmod(0o600)
    assert metrics_credentials(settings.metrics).bearer_token == "x" * 32


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("10.0.0.5", False), ("metrics.internal", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_tls_keys_are_among_the_files_checked_for_loose_modes_at_every_start(tmp_path):
    key = tmp_path / "api.key"
    key.write_text("key")
    key.chmod(0o644)
    settings = load_settings(environ={}, overrides={"api": {"tls_cert": str(key), "tls_key": str(key)}})
    assert [item.what for item in loose_secret_files(settings, environ={})] == ["api.tls_key"]


def test_aios_config_hides_the_metrics_secrets(tmp_path):
    shown = aios(
        "config",
        cwd=tmp_path,
        AIOS_METRICS__BEARER_TOKEN="a-secret-token-nobody-should-see",
        AIOS_METRICS__BASIC_AUTH_USER="prometheus",
        AIOS_METRICS__BASIC_AUTH_PASSWORD="a-secret-password",
    )
    assert shown.returncode == 0, shown.stderr
    assert "a-secret-token-nobody-should-see" not in shown.stdout and "a-secret-password" not in shown.stdout
    assert '"bearer_token": "***"' in shown.stdout
