"""TLS from configuration: ``[api] tls_cert``/``tls_key``/``tls_client_ca`` serve `aios api` and
`aios up` over HTTPS, checked by a real client that verifies the certificate; plain HTTP and clients
without a certificate are refused; a key others can read stops the command before it listens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT, free_port, requirement_missing, wait_for
from tests.support.tls import client_certificates, server_pair

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tls_env(cert: Path, key: Path, **extra: str) -> dict[str, str]:
    return {"AIOS_API__TLS_CERT": str(cert), "AIOS_API__TLS_KEY": str(key), **extra}


def test_the_api_serves_https_from_config_to_a_client_that_verifies_the_certificate(start_api, tmp_path):
    # Given the pair of `aios certs create` named in [api] tls_cert / tls_key (no command-line flag)
    pair = server_pair(tmp_path / "certs")
    api = start_api(env=tls_env(pair.cert, pair.key), wait=False)
    api.url, api.ca = api.url.replace("http://", "https://"), pair.cert
    # When a client calls it over HTTPS, trusting only that certificate
    api.wait_ready()
    response = requests.get(f"{api.url}/healthz", verify=str(pair.cert), timeout=5)
    # Then it answers, also by the name localhost the certificate carries
    assert response.status_code == 200
    assert requests.get(api.url.replace("127.0.0.1", "localhost") + "/healthz", verify=str(pair.cert)).ok
    # And a client that trusts the usual CAs instead refuses the self-signed certificate
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{api.url}/healthz", timeout=5)
    # And plain HTTP on the same port gets no answer: the connection is dropped
    with pytest.raises(requests.ConnectionError):
        requests.get(api.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_with_a_client_ca_the_api_refuses_a_client_without_a_certificate(start_api, tmp_path):
    # Given an API that requires client certificates signed by a CA ([api] tls_client_ca)
    pair = server_pair(tmp_path / "certs")
    client = client_certificates(tmp_path / "client")
    api = start_api(env=tls_env(pair.cert, pair.key, AIOS_API__TLS_CLIENT_CA=str(client.ca)), wait=False)
    url = api.url.replace("http://", "https://") + "/healthz"

    def answers_a_client_with_its_certificate() -> requests.Response | None:
        assert api.process.poll() is None, api.log()[-3000:]
        try:
            return requests.get(url, verify=str(pair.cert), cert=(str(client.cert), str(client.key)), timeout=2)
        except requests.ConnectionError:
            return None

    # When a client presents a certificate the CA signed, Then it is served
    assert wait_for(answers_a_client_with_its_certificate, timeout=60, interval=0.3, what="the API").status_code == 200
    # When a client presents none, Then the handshake fails and nothing is served
    with pytest.raises(requests.ConnectionError):
        requests.get(url, verify=str(pair.cert), timeout=5)
    # When a client presents a certificate of another CA (the server's own), Then it is refused too
    with pytest.raises(requests.ConnectionError):
        requests.get(url, verify=str(pair.cert), cert=(str(pair.cert), str(pair.key)), timeout=5)


def run_aios(*args: str, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", [["api"], ["up"], ["api", "--certfile", "{cert}", "--keyfile", "{key}"]])
def test_a_key_others_can_read_stops_the_command_with_the_fix(stack, tmp_path, command):
    # Given a key file others may read (mode 644)
    pair = server_pair(tmp_path / "certs")
    pair.key.chmod(0o644)
    argv = [part.format(cert=pair.cert, key=pair.key) for part in command]
    env = {**stack.env, "AIOS_API__PORT": str(free_port())}
    if "--certfile" not in argv:
        env.update(tls_env(pair.cert, pair.key))
    # When the command starts
    result = run_aios(*argv, env=env)
    # Then it refuses with exit 2, naming the file and the chmod that fixes it
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"chmod 600 {pair.key}" in result.stderr
    assert "open to group or others (mode 0644)" in result.stderr


def test_a_key_owned_by_another_user_stops_the_api(stack, tmp_path):
    if os.geteuid() != 0:
        requirement_missing("root", "only root can give a file to another user")
    # Given a 600 key that belongs to nobody (uid 65534), not to the user running AIOS
    pair = server_pair(tmp_path / "certs")
    os.chown(pair.key, 65534, 65534)
    # When the API starts as root... the key is root's to read, but not its own: a sign of a mix-up
    result = run_aios("api", env={**stack.env, **tls_env(pair.cert, pair.key)})
    # Then it refuses, naming the fix
    assert result.returncode == 2, result.stdout + result.stderr
    assert "belongs to uid 65534" in result.stderr and f"chown root {pair.key}" in result.stderr


def test_aios_up_serves_the_api_over_https_from_config(tmp_path):
    # Given a clean machine (embedded default) whose config names a certificate and key
    cwd = tmp_path / "machine"
    cwd.mkdir()
    pair = server_pair(cwd / "config" / "certs")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        AIOS_CONFIG=str(REPO_ROOT / "config" / "aios.toml"),
        AIOS_API__PORT=str(port),
        AIOS_API__WORKERS="1",
        AIOS_ADMIN_PASSWORD="a-password-for-the-tls-test",
        PYTHONUNBUFFERED="1",
        **tls_env(Path("config/certs/server.crt"), Path("config/certs/server.key")),
    )
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aios.cli", "up", "--migrate"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> requests.Response | None:
            assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
            try:
                return requests.get(f"https://127.0.0.1:{port}/healthz", verify=str(pair.cert), timeout=2)
            except requests.ConnectionError:
                return None

        # When `aios up` has started, Then its API answers over HTTPS to a verifying client
        assert wait_for(answers, timeout=90, interval=0.3, what="aios up's HTTPS API").status_code == 200
        # And it says so: the URL it prints is https://
        assert f"https://127.0.0.1:{port}" in log_path.read_text(errors="replace")
        # And logging in works over it
        login = requests.post(
            f"https://127.0.0.1:{port}/api/v1/auth/token",
            json={"username": "admin", "password": "a-password-for-the-tls-test"},
            verify=str(pair.cert),
            timeout=10,
        )
        assert login.status_code == 200, login.text
        # And the `aios` client commands reach it, trusting the certificate through REQUESTS_CA_BUNDLE
        client_env = {**env, "REQUESTS_CA_BUNDLE": str(pair.cert), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        logged_in = subprocess.run(
            [sys.executable, "-m", "aios.cli", "--url", f"https://localhost:{port}", "login", "--username", "admin"],
            input="a-password-for-the-tls-test\n",
            env=client_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert logged_in.returncode == 0, logged_in.stdout + logged_in.stderr
        # And the `try:` line it printed works as printed: curl trusts the self-signed certificate
        match = re.search(r"^\s*try: (.+)$", log_path.read_text(errors="replace"), re.MULTILINE)
        assert match and "--cacert" in match.group(1), log_path.read_text(errors="replace")[-3000:]
        tried = subprocess.run(["bash", "-c", match.group(1)], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert tried.returncode == 0 and '"state"' in tried.stdout, tried.stdout + tried.stderr
        # And `aios ps` finds the API ready over HTTPS, verifying the same certificate
        ps = subprocess.run(
            [sys.executable, "-m", "aios.cli", "ps", "--json"],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "ready (GET /readyz 200)" in ps.stdout, ps.stdout + ps.stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
