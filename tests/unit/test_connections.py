"""The connection factory: URLs that name a password source, never hold the password (transforms/connections.py)."""
import pytest
import redis

from onboardflow.transforms.connections import CredentialsError, redact, redis_client, redis_settings


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
