"""`aios api --certfile --keyfile` serves HTTPS."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import REPO_ROOT, require_program, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def certificate(tmp_path):
    require_program("openssl", "apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_the_api_serves_https_with_the_given_certificate(stack, certificate, tmp_path):
    # Given a certificate and the API started with it
    cert, key = certificate
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "aios.cli", "api", "--port", str(port), "--certfile", str(cert), "--keyfile", str(key)],
        env={**stack.env, "AIOS_API__WORKERS": "1"},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def answers() -> requests.Response | None:
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            try:
                return requests.get(f"https://127.0.0.1:{port}/healthz", verify=str(cert), timeout=2)
            except requests.ConnectionError:
                return None

        # When a client calls it over HTTPS, verifying the certificate
        response = wait_for(answers, timeout=60, interval=0.3, what="the HTTPS API")
        # Then it answers, with the security headers
        assert response.status_code == 200
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        # And plain HTTP on the same port gets no API answer
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_a_certificate_without_its_key_stops_the_api_with_exit_status_2(stack, certificate):
    cert, _key = certificate
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "aios.cli", "api", "--certfile", str(cert)],
        env=stack.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--keyfile" in result.stderr
    assert time.monotonic() - started < 60
