"""`aios metrics` (port 9090 in the original): TLS from ``[metrics] tls_*``, a bearer token or basic
auth from the environment or an owner-only file, and no listening beyond loopback without them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT, free_port, wait_for
from tests.support.tls import client_certificates, server_pair

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "a-bearer-token-for-the-metrics-test"


class Metrics:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def start_metrics(stack, tmp_path) -> Iterator[Callable[..., Metrics]]:
    """Start `aios metrics` on a free port with the session's settings plus ``env``; stopped at teardown."""
    started: list[Metrics] = []

    def start(env: dict[str, str], scheme: str = "http") -> Metrics:
        port = free_port()
        log_path = tmp_path / f"metrics{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "aios.cli", "metrics", "--port", str(port)],
                env={**stack.env, "PYTHONUNBUFFERED": "1", **env},
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(Metrics(process, f"{scheme}://127.0.0.1:{port}/metrics", log_path))
        return started[-1]

    yield start
    for metrics in started:
        if metrics.process.poll() is None:
            metrics.process.terminate()
            metrics.process.wait(timeout=20)


def first_answer(metrics: Metrics, **kwargs) -> requests.Response:
    """The first answer once it listens (in a tuple: a 401 Response is falsy, and wait_for wants truth)."""

    def answer() -> tuple[requests.Response] | None:
        assert metrics.process.poll() is None, metrics.log()[-3000:]
        try:
            return (requests.get(metrics.url, timeout=10, **kwargs),)
        except requests.ConnectionError:
            return None

    return wait_for(answer, timeout=60, interval=0.3, what="aios metrics")[0]


def test_metrics_over_tls_answer_401_without_the_token_and_200_with_it(start_metrics, tmp_path):
    # Given `aios metrics` with a certificate and a bearer token from the environment
    pair = server_pair(tmp_path / "certs")
    metrics = start_metrics(
        {
            "AIOS_METRICS__TLS_CERT": str(pair.cert),
            "AIOS_METRICS__TLS_KEY": str(pair.key),
            "AIOS_METRICS__BEARER_TOKEN": TOKEN,
        },
        scheme="https",
    )
    # When a client verifying the certificate scrapes without credentials, Then 401 and a JSON error
    refused = first_answer(metrics, verify=str(pair.cert))
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert "aios_agents" not in refused.text
    # When it sends a wrong token, Then 401 still
    wrong = requests.get(metrics.url, verify=str(pair.cert), headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    # When it sends the token, Then the metrics, in the Prometheus text format
    scraped = requests.get(metrics.url, verify=str(pair.cert), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert scraped.status_code == 200
    assert "# TYPE aios_agents gauge" in scraped.text
    # And plain HTTP gets nothing
    with pytest.raises(requests.ConnectionError):
        requests.get(metrics.url.replace("https://", "http://"), timeout=5)


def test_metrics_with_basic_auth_whose_password_is_an_owner_only_file(start_metrics, tmp_path):
    # Given basic auth: the user in config, the password in a file only its owner reads
    password_file = tmp_path / "metrics-password"
    password_file.write_text("a-password-in-a-file\n")
    password_file.chmod(0o600)
    metrics = start_metrics(
        {"AIOS_METRICS__BASIC_AUTH_USER": "prometheus", "AIOS_METRICS__BASIC_AUTH_PASSWORD_FILE": str(password_file)}
    )
    # Then without credentials 401 (with a Basic challenge), with a wrong password 401, with the right 200
    refused = first_answer(metrics)
    assert refused.status_code == 401
    assert 'Basic realm="aios metrics"' in refused.headers["WWW-Authenticate"]
    assert requests.get(metrics.url, auth=("prometheus", "wrong"), timeout=10).status_code == 401
    scraped = requests.get(metrics.url, auth=("prometheus", "a-password-in-a-file"), timeout=30)
    assert scraped.status_code == 200
    assert "aios_agents" in scraped.text


def test_metrics_with_a_client_ca_refuse_a_scraper_without_a_certificate(start_metrics, tmp_path):
    # Given `aios metrics` that requires client certificates
    pair = server_pair(tmp_path / "certs")
    client = client_certificates(tmp_path / "client")
    metrics = start_metrics(
        {
            "AIOS_METRICS__TLS_CERT": str(pair.cert),
            "AIOS_METRICS__TLS_KEY": str(pair.key),
            "AIOS_METRICS__TLS_CLIENT_CA": str(client.ca),
        },
        scheme="https",
    )
    # Then a scraper with a certificate the CA signed gets the metrics, one without none
    assert first_answer(metrics, verify=str(pair.cert), cert=(str(client.cert), str(client.key))).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(metrics.url, verify=str(pair.cert), timeout=5)
    # And the server still serves after the failed handshake
    assert requests.get(metrics.url, verify=str(pair.cert), cert=(str(client.cert), str(client.key))).ok


def run_metrics(stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", "metrics", "--port", str(free_port()), *args],
        env={**stack.env, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_metrics_refuse_to_listen_beyond_loopback_without_credentials(stack):
    # When `aios metrics` is asked to listen on every address with no credentials configured
    result = run_metrics(stack, "--host", "0.0.0.0")
    # Then it refuses with exit 2 and says what to set
    assert result.returncode == 2, result.stdout + result.stderr
    assert "metrics.host (0.0.0.0) is beyond loopback" in result.stderr
    assert "AIOS_METRICS__BEARER_TOKEN" in result.stderr


def test_a_world_readable_metrics_key_or_token_file_refuses_start(stack, tmp_path):
    # Given a TLS key others can read
    pair = server_pair(tmp_path / "certs")
    pair.key.chmod(0o604)
    result = run_metrics(stack, AIOS_METRICS__TLS_CERT=str(pair.cert), AIOS_METRICS__TLS_KEY=str(pair.key))
    # Then exit 2, naming the file and the fix
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"metrics.tls_key {pair.key} is open to group or others (mode 0604)" in result.stderr
    assert f"chmod 600 {pair.key}" in result.stderr
    # Given a token file others can read, Then the same
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    result = run_metrics(stack, AIOS_METRICS__BEARER_TOKEN_FILE=str(token_file))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"chmod 600 {token_file}" in result.stderr
