"""The login probe's SCRAM against RFC 7677's example, and its reading of a broker's refusal (a local socket)."""
import socket
import struct
import threading

from onboardflow.transforms.kafka_login import _Login, _Refused, _Scram, login_refusal


def test_scram_sha_256_gives_rfc_7677s_client_proof():
    scram = _Scram("sha256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert scram.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    assert scram.client_final(server_first) == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                                                b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")


def _answer(conn, body: bytes) -> None:
    size = struct.unpack(">i", conn.recv(4))[0]
    request = b""
    while len(request) < size:
        request += conn.recv(size - len(request))
    correlation = struct.unpack_from(">i", request, 4)[0]
    conn.sendall(struct.pack(">ii", len(body) + 4, correlation) + body)


def _broker(*bodies: bytes):
    """A socket that answers each request with the next body, then closes (as a refusing broker does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            for body in bodies:
                _answer(conn, body)
        server.close()
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()


def _mechanisms(*names: str) -> bytes:
    return struct.pack(">hi", 0, len(names)) + b"".join(struct.pack(">h", len(n)) + n.encode() for n in names)


def test_a_refused_proof_is_read_whole_even_though_the_broker_closes_right_after_it():
    message = b"Authentication failed during authentication due to invalid credentials with SASL mechanism PLAIN"
    refusal = struct.pack(">hh", 58, len(message)) + message + struct.pack(">iq", 0, 0)
    host, port = _broker(_mechanisms("PLAIN"), refusal)
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            _Login(sock).authenticate("PLAIN", "alice", "wrong")
            raise AssertionError("not refused")
        except _Refused as refused:
            assert str(refused) == "SaslAuthenticationFailedError: " + message.decode()


def test_a_mechanism_the_broker_does_not_offer_is_named():
    host, port = _broker(struct.pack(">h", 33) + _mechanisms("SCRAM-SHA-512")[2:])
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            _Login(sock).authenticate("PLAIN", "alice", "pw")
            raise AssertionError("not refused")
        except _Refused as refused:
            assert "offers ['SCRAM-SHA-512'], not PLAIN" in str(refused)


def test_plaintext_settings_and_unreachable_brokers_give_no_reason():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert login_refusal(f"127.0.0.1:{port}") is None
    assert login_refusal(f"sasl_plaintext://u@127.0.0.1:{port}?password_env=OBF_NO_SUCH_VARIABLE") is None
