"""The HTTP endpoint each worker process serves its Prometheus metrics on.

In: ``WorkerMetricsEndpoint`` settings (``--metrics_*``, pipelines/options.py).
Out: ``/metrics`` of ``worker_registry()`` on the first free port of
``[port, port + attempts)`` (port 0: any free port), once per process, and,
with ``sd_dir``, a Prometheus ``file_sd`` target file
(``onboardflow-worker-<host>-<pid>.json``, removed at exit) so Prometheus
finds every worker whatever port it got. Prism in LOOPBACK mode runs the
workers inside the launcher (one process, one port); Flink's SDK harness, or
Prism with PROCESS workers, runs several per machine and each takes the next
free port (docs/observability.md). With ``MetricsTls`` the endpoint speaks
HTTPS only (and, with a client CA, asks every scraper for a certificate that
CA signed); its target file then carries ``__scheme__: https``.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional

from prometheus_client import CollectorRegistry, start_http_server

from .prometheus import worker_registry

_LOG = logging.getLogger(__name__)

_PROCESS_LOCK = threading.Lock()
_PROCESS_ENDPOINT: Optional["_ServedEndpoint"] = None


@dataclasses.dataclass(frozen=True)
class MetricsTls:
    """HTTPS for a ``/metrics`` endpoint: the server's certificate and key (PEM files); with ``client_ca``,
    only scrapers presenting a certificate that CA signed are answered (mutual TLS)."""

    cert: str
    key: str
    client_ca: Optional[str] = None

    @classmethod
    def of(cls, cert: Optional[str], key: Optional[str], client_ca: Optional[str] = None,
           flag: str = "--metrics_tls") -> Optional["MetricsTls"]:
        """None for no certificate; ``ValueError`` naming the flags when only part of a pair is given."""
        if not cert and not key:
            if client_ca:
                raise ValueError(f"{flag}_client_ca needs {flag}_cert and {flag}_key")
            return None
        if not (cert and key):
            raise ValueError(f"{flag}_cert and {flag}_key go together (the endpoint's certificate and its key)")
        return cls(cert, key, client_ca or None)

    def server_options(self) -> dict[str, Any]:
        """``prometheus_client.start_http_server``'s TLS arguments."""
        return {"certfile": self.cert, "keyfile": self.key, "client_cafile": self.client_ca,
                "client_auth_required": bool(self.client_ca)}


class _ServedEndpoint(NamedTuple):
    port: int
    server: Any
    sd_file: Optional[str]


def _write_sd_file(sd_dir: str, host: Optional[str], address: str, port: int, https: bool = False) -> str:
    # The name Prometheus reaches this process by: given, else the bound
    # address, else (bound to every interface) the machine's name.
    host = host or (socket.gethostname() if address in ("", "0.0.0.0", "::") else address)
    os.makedirs(sd_dir, exist_ok=True)
    path = os.path.join(sd_dir, f"onboardflow-worker-{socket.gethostname()}-{os.getpid()}.json")
    labels = {"job": "onboardflow-worker", "pid": str(os.getpid())}
    if https:
        labels["__scheme__"] = "https"  # Prometheus scrapes this target over TLS
    target = [{"targets": [f"{host}:{port}"], "labels": labels}]
    # Prometheus watches the directory: write whole files only (rename is atomic).
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(target, handle)
    os.replace(tmp, path)
    return path


def _remove_sd_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


_ANNOUNCED: set = set()


def _announce(served, sd_dir: Optional[str], advertise_host: Optional[str], address: str,
              https: bool = False) -> None:
    """Write the served endpoint's target file into ``sd_dir`` once (no-op for None or a directory done)."""
    if not sd_dir or str(sd_dir) in _ANNOUNCED:
        return
    _ANNOUNCED.add(str(sd_dir))
    sd_file = _write_sd_file(sd_dir, advertise_host, address, served.port, https)
    if sd_file:
        atexit.register(_remove_sd_file, sd_file)


def serve_worker_metrics(
    port: int = 9310,
    *,
    attempts: int = 16,
    address: str = "0.0.0.0",
    sd_dir: Optional[str] = None,
    advertise_host: Optional[str] = None,
    tls: Optional[MetricsTls] = None,
) -> int:
    """Serve this process's pipeline metrics over HTTP, once; returns the bound port.

    Tries ``port``, ``port + 1``, ... (``attempts`` ports) and keeps the first
    that is free, so several worker processes on one machine each get one.
    ``port=0`` lets the OS choose. Later calls in the same process return the
    port already bound, whatever their port arguments; a later call naming a
    new ``sd_dir`` gets the endpoint's target file written there too (a Flink
    TaskManager serves one endpoint for every job it runs, and each job may
    name its own directory). ``tls``: HTTPS only (``MetricsTls``). Raises
    ``OSError`` when no port of the range is free.
    """
    global _PROCESS_ENDPOINT
    with _PROCESS_LOCK:
        if _PROCESS_ENDPOINT is not None:
            _announce(_PROCESS_ENDPOINT, sd_dir, advertise_host, address, tls is not None)
            return _PROCESS_ENDPOINT.port
    registry = worker_registry()
    with _PROCESS_LOCK:
        if _PROCESS_ENDPOINT is not None:
            _announce(_PROCESS_ENDPOINT, sd_dir, advertise_host, address, tls is not None)
            return _PROCESS_ENDPOINT.port
        candidates = [0] if port == 0 else range(port, port + max(attempts, 1))
        server = start_on_first_free_port(candidates, address, registry, tls)
        bound = server.server_port
        sd_file = _write_sd_file(sd_dir, advertise_host, address, bound, tls is not None) if sd_dir else None
        if sd_file:
            atexit.register(_remove_sd_file, sd_file)
        _PROCESS_ENDPOINT = _ServedEndpoint(bound, server, sd_file)
        if sd_dir:
            _ANNOUNCED.add(str(sd_dir))
        _LOG.info("serving pipeline metrics on %s://%s:%d/metrics", "https" if tls else "http", address, bound)
        return bound


def start_on_first_free_port(ports: Iterable[int], address: str, registry: CollectorRegistry,
                             tls: Optional[MetricsTls] = None):
    """An HTTP server (HTTPS with ``tls``) for ``registry`` on the first of ``ports`` that is free.

    Raises ``OSError`` when every port is taken; a certificate or key that cannot be loaded raises at once.
    """
    options = tls.server_options() if tls is not None else {}
    last_error: Optional[OSError] = None
    tried = []
    for candidate in ports:
        tried.append(candidate)
        try:
            server, _thread = start_http_server(candidate, addr=address, registry=registry, **options)
        except (FileNotFoundError, ssl.SSLError):
            raise  # the certificate, not the port: another port cannot help
        except OSError as error:
            last_error = error
            continue
        return server
    raise OSError(f"no free port for worker metrics among {tried}") from last_error


def served_worker_port() -> Optional[int]:
    """The port this process serves its metrics on, or None when it does not."""
    endpoint = _PROCESS_ENDPOINT
    return endpoint.port if endpoint is not None else None


@dataclasses.dataclass(frozen=True)
class WorkerMetricsEndpoint:
    """Picklable settings of the per-process HTTP endpoint (see ``serve_worker_metrics``)."""

    port: int = 9310
    attempts: int = 16
    address: str = "0.0.0.0"
    sd_dir: Optional[str] = None
    advertise_host: Optional[str] = None
    tls: Optional[MetricsTls] = None

    def start(self) -> int:
        return serve_worker_metrics(self.port, attempts=self.attempts, address=self.address, sd_dir=self.sd_dir,
                                    advertise_host=self.advertise_host, tls=self.tls)
