"""The connection factory: URLs that name a password source, never hold the password (transforms/connections.py)."""
import logging

import pytest
import redis

from onboardflow.transforms.connections import (
    CredentialsError,
    KafkaRefusedError,
    kafka_config,
    kafka_is_secured,
    kafka_refusal,
    kafka_settings,
    redact,
    redis_client,
    redis_settings,
)


def test_a_password_file_is_read_and_its_parameter_removed_before_redis_py_sees_the_url(tmp_path):
    secret = tmp_path / "redis.password"
    secret.write_text("s3cret-from-file\nignored second line\n")
    url = f"rediss://pipeline@127.0.0.1:6380/0?ssl_ca_certs=/ca.crt&password_file={secret}"
    plain, kwargs = redis_settings(url)
    assert kwargs == {"password": "s3cret-from-file"}
    assert plain == "rediss://pipeline@127.0.0.1:6380/0?ssl_ca_certs=%2Fca.crt"
    client = redis_client(url)  # builds without connecting
    options = client.connection_pool.connection_kwargs
    assert (options["username"], options["password"], options["ssl_ca_certs"]) == ("pipeline", "s3cret-from-file",
                                                                                  "/ca.crt")
    assert client.connection_pool.connection_class is redis.SSLConnection


def test_a_password_variable_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("OBF_TEST_REDIS_PASSWORD", "from-env")
    assert redis_settings("redis://app@h:1/0?password_env=OBF_TEST_REDIS_PASSWORD") == (
        "redis://app@h:1/0", {"password": "from-env"})


def test_a_url_without_a_password_source_is_left_alone():
    assert redis_settings("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", {})


def test_an_unreadable_source_is_an_error_that_names_it_and_nothing_else(tmp_path, monkeypatch):
    with pytest.raises(CredentialsError, match="missing.password"):
        redis_settings(f"rediss://u@h:1/0?password_file={tmp_path}/missing.password")
    empty = tmp_path / "empty.password"
    empty.write_text("\n")
    with pytest.raises(CredentialsError, match="is empty"):
        redis_settings(f"rediss://u@h:1/0?password_file={empty}")
    monkeypatch.delenv("OBF_NOT_SET", raising=False)
    with pytest.raises(CredentialsError, match="OBF_NOT_SET is not set"):
        redis_settings("rediss://u@h:1/0?password_env=OBF_NOT_SET")


def test_redact_masks_a_password_written_into_a_url_or_a_keyword_dsn():
    assert redact("redis://user:hunter2@h:1/0") == "redis://user:***@h:1/0"
    assert redact("postgresql://role:hunter2@h:5432/db?sslmode=verify-full") == (
        "postgresql://role:***@h:5432/db?sslmode=verify-full")
    assert redact("host=h user=role password=hunter2 dbname=db") == "host=h user=role password=*** dbname=db"
    assert redact("rediss://pipeline@h:1/0?password_file=/run/secrets/p") == (
        "rediss://pipeline@h:1/0?password_file=/run/secrets/p")


# --------------------------------------------------------------------------- Kafka


def test_a_plaintext_kafka_bootstrap_gives_the_same_client_settings_as_before():
    assert kafka_settings("127.0.0.1:9092,127.0.0.1:9093") == ("127.0.0.1:9092,127.0.0.1:9093", {})
    assert kafka_settings("plaintext://127.0.0.1:9092") == ("127.0.0.1:9092", {})
    assert kafka_config("127.0.0.1:9092", acks="all") == {"bootstrap_servers": "127.0.0.1:9092", "acks": "all"}
    assert not kafka_is_secured("127.0.0.1:9092") and not kafka_is_secured("plaintext://h:1")


def test_a_sasl_ssl_bootstrap_names_the_ca_and_the_password_file(tmp_path, monkeypatch):
    secret = tmp_path / "kafka.password"
    secret.write_text("kafka-s3cret\n")
    url = f"sasl_ssl://onboardflow-pipeline@127.0.0.1:9094,127.0.0.1:9096?ssl_cafile=/ca.crt&password_file={secret}"
    assert kafka_is_secured(url)
    assert kafka_settings(url) == ("127.0.0.1:9094,127.0.0.1:9096", {
        "security_protocol": "SASL_SSL", "ssl_cafile": "/ca.crt", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "onboardflow-pipeline", "sasl_plain_password": "kafka-s3cret"})
    monkeypatch.setenv("OBF_TEST_KAFKA_PASSWORD", "from-env")
    _, kwargs = kafka_settings("sasl_plaintext://app@h:1?password_env=OBF_TEST_KAFKA_PASSWORD&sasl_mechanism=PLAIN")
    assert kwargs == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                      "sasl_plain_username": "app", "sasl_plain_password": "from-env"}
    assert kafka_settings("ssl://h:1?ssl_cafile=/ca&ssl_certfile=/c&ssl_keyfile=/k") == (
        "h:1", {"security_protocol": "SSL", "ssl_cafile": "/ca", "ssl_certfile": "/c", "ssl_keyfile": "/k"})


@pytest.mark.parametrize("url, message", [
    ("sasl_ssl://u:inline-secret@h:1?ssl_cafile=/ca", "password_file= or password_env="),
    ("sasl_ssl://h:1?password_file=/p", "SASL needs a user"),
    ("sasl_ssl://u@h:1?ssl_cafile=/ca", "SASL needs password_file= or password_env="),
    ("sasl_ssl://u@h:1?password_file=/p&sasl_password=inline-secret", "unknown parameters"),
    ("kerberos://u@h:1", "unknown security protocol"),
])
def test_a_malformed_kafka_bootstrap_is_refused_without_showing_a_secret(url, message):
    with pytest.raises(ValueError, match=message) as err:
        kafka_settings(url)
    assert "inline-secret" not in str(err.value)


def test_a_missing_kafka_password_source_is_named(tmp_path, monkeypatch):
    with pytest.raises(CredentialsError, match="Kafka password file .*nope"):
        kafka_settings(f"sasl_ssl://u@h:1?password_file={tmp_path / 'nope'}")
    monkeypatch.delenv("OBF_TEST_KAFKA_UNSET", raising=False)
    with pytest.raises(CredentialsError, match="Kafka password variable OBF_TEST_KAFKA_UNSET is not set"):
        kafka_settings("sasl_ssl://u@h:1?password_env=OBF_TEST_KAFKA_UNSET")


def test_a_logged_security_refusal_explains_a_bootstrap_timeout():
    from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

    kafka_config("127.0.0.1:9092")  # starts watching kafka-python's log
    logging.getLogger("kafka.net.transport").error(
        "<KafkaSSLTransport>: Abort ([Error 58] SaslAuthenticationFailedError: SaslAuthenticationFailedError: "
        "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512)")
    refusal = kafka_refusal(KafkaTimeoutError("Unable to bootstrap from h:1"))
    assert isinstance(refusal, KafkaRefusedError)
    assert str(refusal).startswith("Kafka refused the credentials: Authentication failed during authentication")
    assert kafka_refusal(TopicAuthorizationFailedError("t")) is None
    assert kafka_refusal(ValueError("x")) is None


def test_a_refusal_logged_before_the_client_started_is_not_its_reason():
    import socket
    import time

    from kafka.errors import KafkaTimeoutError

    from onboardflow.transforms.kafka_login import speaks_tls

    kafka_config("127.0.0.1:9092")
    logging.getLogger("kafka.net.manager").error(
        "Connection failed: KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
        "verify failed: unable to get local issuer certificate (_ssl.c:1006)")
    started = time.monotonic()
    # A plain TCP listener that speaks no TLS: no stale certificate message, no TLS diagnosis.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = "127.0.0.1:%d" % listener.getsockname()[1]
        assert not speaks_tls(server, timeout_s=0.5)
        assert kafka_refusal(KafkaTimeoutError("Unable to bootstrap"), since=started, bootstrap=server) is None
    # Without ``since`` the window alone decides, as before.
    assert "certificate was not verified" in str(kafka_refusal(KafkaTimeoutError("Unable to bootstrap")))
