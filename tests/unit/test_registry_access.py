"""Registry users, roles and the HTTP client's URL (no services: runners/cli/registry_access.py, connections.py)."""
from __future__ import annotations

import base64

import pytest

from onboardflow.runners.cli.registry_access import RegistryUsers, add_user, is_write
from onboardflow.transforms.connections import CredentialsError, http_settings


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_roles_decide_writes_and_credentials_decide_who(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "ci", "read", "read-password-123")
    add_user(path, "deploy", "write", "write-password-123")
    users = RegistryUsers(path)
    read, register = (["subjects", "s"], "POST"), (["subjects", "s", "versions"], "POST")
    assert users.check("GET", ["subjects"], _basic("ci", "read-password-123")) is None
    assert users.check(read[1], read[0], _basic("ci", "read-password-123")) is None
    assert users.check(register[1], register[0], _basic("ci", "read-password-123"))[:2] == (403, 40301)
    assert users.check(register[1], register[0], _basic("deploy", "write-password-123")) is None
    assert users.check("PUT", ["config"], _basic("deploy", "write-password-123")) is None
    for header in (None, "Bearer x", "Basic !!!", _basic("ci", "wrong-password-123"), _basic("nobody", "x" * 12)):
        assert users.check("GET", ["subjects"], header)[:2] == (401, 40101)


def test_the_users_file_holds_hashes_and_refuses_weak_entries(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "ci", "read", "read-password-123")
    assert "read-password-123" not in path.read_text()
    for name, role, password in (("ci", "admin", "x" * 12), ("a:b", "read", "x" * 12), ("ci", "read", "short")):
        with pytest.raises(ValueError):
            add_user(path, name, role, password)


def test_writes_are_registrations_and_level_changes():
    assert is_write("POST", ["subjects", "s", "versions"]) and is_write("PUT", ["config"])
    assert is_write("DELETE", ["config", "s"])
    assert not is_write("POST", ["compatibility", "subjects", "s", "versions", "latest"])
    assert not is_write("POST", ["subjects", "s"]) and not is_write("GET", ["config"])


def test_the_registry_url_names_the_ca_and_the_password_file_never_the_password(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret-password\n")
    plain, context, headers = http_settings(f"https://ci@reg:8081/x?cafile=&password_file={secret}")
    assert plain == "https://reg:8081/x" and context is not None
    assert headers["Authorization"] == _basic("ci", "s3cret-password")
    monkeypatch.setenv("REG_PW", "from-env-password")
    assert http_settings("http://ci@reg:8081?password_env=REG_PW")[2]["Authorization"] == \
        _basic("ci", "from-env-password")
    assert http_settings("http://reg:8081") == ("http://reg:8081", None, {})
    monkeypatch.delenv("REG_PW")
    with pytest.raises(CredentialsError) as missing:
        http_settings("http://ci@reg:8081?password_env=REG_PW")
    assert "REG_PW" in str(missing.value)
