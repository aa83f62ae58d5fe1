"""Ask a Kafka broker itself why it refuses a client: its TLS and SASL login, replayed on one blocking socket.

In: a bootstrap setting (transforms/connections.py: ``sasl_ssl://USER@HOST:PORT?...``).
Out: the broker's refusal as text kafka-python would have logged
(``SaslAuthenticationFailedError: Authentication failed ...``, ``[SSL:
CERTIFICATE_VERIFY_FAILED] ...``), or None when the login succeeds or the
broker cannot be asked.

Why: kafka-python retries a refused login until its bootstrap timeout and then
raises only "Unable to bootstrap"; the reason is only logged on the way, and
only when the client reads it. A broker that refuses a SCRAM proof answers and
closes the connection at once, and a busy client can see the close first: a
bare disconnect, no reason logged. ``login_refusal`` replays the same login
(TCP, TLS with the same CA and client certificate, ``SaslHandshake`` v1,
``SaslAuthenticate`` v1 with PLAIN or SCRAM-SHA-256/512) and reads every answer
to its end, so the broker's own words come back every time. docs/security.md
("When Kafka refuses a client").

Nothing secret leaves: the password goes into the SCRAM proof only; the texts
returned are the broker's error message and the TLS library's.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
from typing import Optional

_SASL_HANDSHAKE, _SASL_AUTHENTICATE = 17, 36
_CLIENT_ID = b"onboardflow-login-probe"


class _Refused(Exception):
    """The broker's refusal, worded like kafka-python's log line."""


def speaks_tls(server: str, timeout_s: float = 3.0) -> bool:
    """True when ``host:port`` completes a TLS handshake (its certificate not checked: only the protocol is)."""
    host, port = _host_port(server)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host or None):
                return True
    except (OSError, ValueError):
        return False


def login_refusal(bootstrap: str, timeout_s: float = 10.0) -> Optional[str]:
    """Why the first server of a secured ``bootstrap`` refuses this client's TLS or SASL login, or None
    (it accepts, it is a plaintext setting, or it could not be asked: unreachable, timed out, not Kafka)."""
    from .connections import parse_kafka_bootstrap

    try:
        endpoint = parse_kafka_bootstrap(bootstrap)
        if endpoint.protocol == "PLAINTEXT":
            return None
        password = endpoint.password() if endpoint.sasl else ""
        host, port = _host_port(endpoint.servers.split(",")[0].strip())
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            sock = _tls(raw, host, dict(endpoint.tls)) if endpoint.protocol.endswith("SSL") else raw
            if endpoint.sasl:
                _Login(sock).authenticate(endpoint.sasl_mechanism, endpoint.user, password)
        return None
    except _Refused as refused:
        return str(refused)
    except Exception:  # noqa: BLE001 - unreachable, timed out, not Kafka, no password: a probe that cannot ask
        return None


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def _tls(raw: socket.socket, host: str, tls: dict) -> ssl.SSLSocket:
    """The TLS kafka-python would speak: the named CA (else the system's), host name checked, client certificate."""
    context = ssl.create_default_context(cafile=tls.get("ssl_cafile") or None)
    if tls.get("ssl_certfile"):
        context.load_cert_chain(tls["ssl_certfile"], tls.get("ssl_keyfile") or None)
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as error:
        raise _Refused(str(error)) from None


class _Login:
    """Kafka's SASL requests (header v1, non-flexible versions), one at a time, each answer read whole."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self._correlation = sock, 0

    def authenticate(self, mechanism: str, user: str, password: str) -> None:
        body = self._call(_SASL_HANDSHAKE, 1, _string(mechanism))
        error_code, offered = struct.unpack_from(">h", body)[0], _strings(body, 2)
        if error_code:
            raise _Refused(f"UnsupportedSaslMechanismError: the broker offers {offered}, not {mechanism}")
        if mechanism == "PLAIN":
            self._round(b"\0" + user.encode() + b"\0" + password.encode())
            return
        algorithm = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}.get(mechanism)
        if algorithm is None:
            raise ValueError(f"no probe for SASL mechanism {mechanism}")
        scram = _Scram(algorithm, user, password)
        self._round(scram.client_final(self._round(scram.client_first())))

    def _round(self, token: bytes) -> bytes:
        body = self._call(_SASL_AUTHENTICATE, 1, struct.pack(">i", len(token)) + token)
        error_code = struct.unpack_from(">h", body)[0]
        message, at = _nullable_string(body, 2)
        if error_code:
            raise _Refused(f"SaslAuthenticationFailedError: {message or f'error code {error_code}'}")
        size = struct.unpack_from(">i", body, at)[0]
        return body[at + 4:at + 4 + max(size, 0)]

    def _call(self, api_key: int, version: int, body: bytes) -> bytes:
        self._correlation += 1
        header = struct.pack(">hhih", api_key, version, self._correlation, len(_CLIENT_ID)) + _CLIENT_ID
        request = header + body
        self._sock.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", self._read(4))[0]
        answer = self._read(size)
        if struct.unpack_from(">i", answer)[0] != self._correlation:
            raise ValueError("an answer to another request")
        return answer[4:]

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data


class _Scram:
    """The client side of SCRAM (RFC 5802), without channel binding, as Kafka's brokers expect it."""

    def __init__(self, algorithm: str, user: str, password: str, nonce: Optional[str] = None) -> None:
        self._algorithm, self._password = algorithm, password
        name = user.replace("=", "=3D").replace(",", "=2C")
        self._nonce = nonce or base64.b64encode(os.urandom(24)).decode()
        self._first_bare = f"n={name},r={self._nonce}"

    def client_first(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        fields = dict(part.split("=", 1) for part in text.split(","))
        if not fields.get("r", "").startswith(self._nonce):
            raise ValueError("the broker's SCRAM nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac(self._algorithm, self._password.encode(), base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", self._algorithm).digest()
        stored_key = hashlib.new(self._algorithm, client_key).digest()
        without_proof = f"c=biws,r={fields['r']}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self._algorithm).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _nullable_string(body: bytes, at: int) -> tuple[Optional[str], int]:
    size = struct.unpack_from(">h", body, at)[0]
    if size < 0:
        return None, at + 2
    return body[at + 2:at + 2 + size].decode(errors="replace"), at + 2 + size


def _strings(body: bytes, at: int) -> list[str]:
    count, at = struct.unpack_from(">i", body, at)[0], at + 4
    out = []
    for _ in range(max(count, 0)):
        text, at = _nullable_string(body, at)
        out.append(text or "")
    return out


__all__ = ["login_refusal", "speaks_tls"]
