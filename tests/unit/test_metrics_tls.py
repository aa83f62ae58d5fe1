"""HTTPS (and mutual TLS) for the /metrics endpoints: the workers' and the lag exporter's (local sockets only)."""
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from onboardflow.tests.pki import make_pki
from onboardflow.transforms.metrics_endpoint import MetricsTls, _write_sd_file, start_on_first_free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("onboardflow_events_read", "test", registry=registry).inc(3)
    return registry


def _scrape(url: str, ca: Path, cert: Path = None, key: Path = None) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    with urllib.request.urlopen(url, context=context, timeout=5) as reply:
        return reply.read().decode()


def test_the_tls_flags_go_in_pairs():
    assert MetricsTls.of(None, None) is None
    assert MetricsTls.of("c.pem", "k.pem", "ca.pem") == MetricsTls("c.pem", "k.pem", "ca.pem")
    with pytest.raises(ValueError, match="--metrics_tls_cert and --metrics_tls_key go together"):
        MetricsTls.of("c.pem", None)
    with pytest.raises(ValueError, match="--tls_client_ca needs --tls_cert and --tls_key"):
        MetricsTls.of(None, None, "ca.pem", flag="--tls")


def test_a_tls_endpoint_answers_https_only_and_its_target_file_says_https(pki, tmp_path):
    server = start_on_first_free_port([0], "127.0.0.1", _registry(), MetricsTls(str(pki / "server.crt"),
                                                                                str(pki / "server.key")))
    try:
        port = server.server_port
        assert "onboardflow_events_read_total 3.0" in _scrape(f"https://127.0.0.1:{port}/metrics", pki / "ca.crt")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        server.shutdown()
    target = json.loads(Path(_write_sd_file(str(tmp_path), None, "127.0.0.1", port, https=True)).read_text())
    assert target[0]["labels"]["__scheme__"] == "https"
    plain = json.loads(Path(_write_sd_file(str(tmp_path / "plain"), None, "127.0.0.1", port)).read_text())
    assert "__scheme__" not in plain[0]["labels"]


def test_with_a_client_ca_only_scrapers_with_a_certificate_it_signed_are_answered(pki):
    tls = MetricsTls(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    server = start_on_first_free_port([0], "127.0.0.1", _registry(), tls)
    url = f"https://127.0.0.1:{server.server_port}/metrics"
    try:
        assert "onboardflow_events_read_total" in _scrape(url, pki / "ca.crt", pki / "client.crt", pki / "client.key")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _scrape(url, pki / "ca.crt")  # no client certificate
    finally:
        server.shutdown()


def test_a_certificate_that_cannot_be_loaded_fails_at_once_not_port_after_port(tmp_path):
    with pytest.raises((FileNotFoundError, ssl.SSLError)):
        start_on_first_free_port(range(19400, 19416), "127.0.0.1", _registry(),
                                 MetricsTls(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key")))


def test_the_lag_exporter_serves_https_with_its_tls_flags(pki):
    from onboardflow.runners.cli.lag import serve_lag_exporter

    class Collector:
        def collect(self):
            return _registry().collect()

    server = serve_lag_exporter(Collector(), 0, "127.0.0.1", MetricsTls(str(pki / "server.crt"),
                                                                       str(pki / "server.key")))
    try:
        assert "onboardflow_events_read_total" in _scrape(f"https://127.0.0.1:{server.server_port}/metrics",
                                                          pki / "ca.crt")
    finally:
        server.shutdown()
