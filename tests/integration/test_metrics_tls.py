"""`onboardflow lag-exporter` with TLS flags, as a process against the real Kafka: HTTPS with the CA answers the
lag, plain HTTP and (under mutual TLS) a scraper without a client certificate get nothing."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from onboardflow.tests.conftest import KAFKA_BOOTSTRAP
from onboardflow.tests.pki import make_pki

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context(pki, client: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


@pytest.mark.parametrize("mutual", [False, True])
def test_the_lag_exporter_serves_its_lag_over_https_only(tmp_path, mutual):
    pki = make_pki(tmp_path)
    port = _free_port()
    flags = ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    if mutual:
        flags += ["--tls-client-ca", str(pki / "ca.crt")]
    proc = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", "lag-exporter", "--port", str(port),
                             "--address", "127.0.0.1", "--bootstrap-servers", KAFKA_BOOTSTRAP, "--redis-url", "",
                             "--consumer-group", "obf-metrics-tls", "--topic", "obf-metrics-tls.events", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"https://127.0.0.1:{port}/metrics"
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None:
            try:
                with urllib.request.urlopen(url, context=_context(pki, client=mutual), timeout=20) as reply:
                    body = reply.read().decode()
            except (urllib.error.URLError, ConnectionError) as error:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, f"no answer over HTTPS: {error}"
                time.sleep(0.5)
        assert "onboardflow_lag_exporter_scrape_duration_seconds" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        if mutual:
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
                urllib.request.urlopen(url, context=_context(pki, client=False), timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(30)


def test_half_a_certificate_pair_is_refused_at_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", "lag-exporter", "--port", "0",
                           "--tls-cert", str(tmp_path / "server.crt")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr
