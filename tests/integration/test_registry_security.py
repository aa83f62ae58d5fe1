"""The schema registry over TLS with authentication (issue 18, item 3), driven as outside clients would.

``onboardflow registry serve`` (in process, on a free port, over a copy of the
shipped registry) with a certificate made by the project's own TLS script
(runners/services/security.sh) and users added by ``onboardflow registry
user``: confluent-kafka's ``SchemaRegistryClient`` and onboardflow's own client
(``https://USER@HOST:PORT?cafile=CA&password_file=PATH``) read as the ``read``
user and register as the ``write`` user; a read user's registration is
refused 403 / 40301; a wrong password 401; a client without the CA, or
plain HTTP to the TLS port, fails; no password shows in an error.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from onboardflow.runners.cli.registry import RegistryServer
from onboardflow.runners.cli.registry_access import RegistryUsers
from onboardflow.schemas import EVENTS_SUBJECT, load_schema_json
from onboardflow.schemas.schema_registry import (
    FileSchemaRegistry,
    RegistryError,
    RegistryUnavailable,
    registry_from_url,
)

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).resolve().parents[2] / "runners" / "services"
PASSWORDS = {"reader": "reader-password-0123456789", "writer": "writer-password-0123456789"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1, made by the services' own script."""
    directory = tmp_path_factory.mktemp("tls")
    done = subprocess.run(["bash", "-c", f'source "{SERVICES}/env.sh" && source "{SERVICES}/security.sh" && '
                                         "tls_material"],
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "OBF_TLS_DIR": str(directory),
                               "HOME": str(directory)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The users file, written by `onboardflow registry user` with passwords from files (never argv)."""
    directory = tmp_path_factory.mktemp("users")
    users_file, password_files = directory / "users.json", {}
    for name, role in (("reader", "read"), ("writer", "write")):
        password_files[name] = directory / f"{name}.password"
        password_files[name].write_text(PASSWORDS[name] + "\n")
        done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", "registry", "user", name,
                               f"--role={role}", f"--users-file={users_file}",
                               f"--password-file={password_files[name]}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    text = users_file.read_text()
    assert all(p not in text for p in PASSWORDS.values()), "the users file holds a password"
    assert users_file.stat().st_mode & 0o077 == 0
    return users_file, password_files


@pytest.fixture
def server(tls, users, registry_copy):
    with RegistryServer(FileSchemaRegistry(registry_copy, writable=True), port=0,
                        tls=(str(tls / "server.crt"), str(tls / "server.key")),
                        users=RegistryUsers(users[0])) as running:
        yield running


def _client(server, tls, user: str, password: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": server.url, "ssl.ca.location": str(tls / "ca.crt"),
                                 "basic.auth.user.info": f"{user}:{password}"})


def _event_schema() -> Schema:
    import json
    return Schema(json.dumps(load_schema_json("onboarding_event.v2")), "AVRO")


def test_confluent_clients_read_as_the_reader_and_register_only_as_the_writer(server, tls):
    assert server.url.startswith("https://")
    reader = _client(server, tls, "reader", PASSWORDS["reader"])
    assert EVENTS_SUBJECT in reader.get_subjects()
    assert reader.get_compatibility() == "BACKWARD"
    assert reader.test_compatibility(EVENTS_SUBJECT, _event_schema()) is True
    with pytest.raises(SchemaRegistryError) as refused:
        reader.register_schema(EVENTS_SUBJECT, _event_schema())
    assert (refused.value.http_status_code, refused.value.error_code) == (403, 40301)
    with pytest.raises(SchemaRegistryError) as refused:
        reader.set_compatibility(subject_name=EVENTS_SUBJECT, level="NONE")
    assert refused.value.http_status_code == 403
    writer = _client(server, tls, "writer", PASSWORDS["writer"])
    latest = writer.get_latest_version(EVENTS_SUBJECT)
    assert writer.register_schema(EVENTS_SUBJECT, _event_schema()) == latest.schema_id


def test_a_wrong_password_or_none_is_refused_401_and_not_echoed(server, tls):
    with pytest.raises(SchemaRegistryError) as refused:
        _client(server, tls, "reader", "not-the-password-at-all").get_subjects()
    assert (refused.value.http_status_code, refused.value.error_code) == (401, 40101)
    assert "not-the-password-at-all" not in str(refused.value)
    anonymous = SchemaRegistryClient({"url": server.url, "ssl.ca.location": str(tls / "ca.crt")})
    with pytest.raises(SchemaRegistryError) as refused:
        anonymous.get_subjects()
    assert refused.value.http_status_code == 401


def test_onboardflows_own_client_names_the_ca_and_the_password_file_in_its_url(server, tls, users):
    host_port = server.url.split("://", 1)[1]
    url = f"https://reader@{host_port}?cafile={tls / 'ca.crt'}&password_file={users[1]['reader']}"
    registry = registry_from_url(url)
    assert EVENTS_SUBJECT in registry.subjects()
    assert registry.compatibility() == "BACKWARD"
    wrong = tls / "wrong.password"
    wrong.write_text("wrong-password-0123456789\n")
    with pytest.raises(RegistryError) as refused:
        registry_from_url(f"https://reader@{host_port}?cafile={tls / 'ca.crt'}&password_file={wrong}").subjects()
    assert "HTTP 401" in str(refused.value) and "wrong-password" not in str(refused.value)
    assert PASSWORDS["reader"] not in url


def test_without_the_ca_or_in_plain_http_the_connection_fails(server, tls):
    host_port = server.url.split("://", 1)[1]
    with pytest.raises(Exception) as failed:
        registry_from_url(f"https://reader@{host_port}").subjects()
    assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value) or "certificate" in str(failed.value).lower()
    with pytest.raises(RegistryUnavailable):  # the TLS port resets a plain HTTP request
        registry_from_url(f"http://{host_port}").subjects()
