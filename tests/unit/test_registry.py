"""Schema registries: the shipped file registry, writable file registries, the
Confluent REST client, and ``onboardflow registry serve`` speaking to it over real HTTP."""
import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from onboardflow.runners.cli.registry import RegistryServer, main
from onboardflow.schemas import (
    DEAD_LETTER_SUBJECT,
    EVENTS_SUBJECT,
    REGISTRY_FILE,
    default_registry,
    load_schema,
    load_schema_json,
    schema_path,
)
from onboardflow.schemas.schema_registry import (
    ConfluentSchemaRegistry,
    FileSchemaRegistry,
    InvalidSchema,
    RegistryError,
    RegistryReadOnly,
    RegistryUnavailable,
    SchemaNotFound,
    normalize,
    registry_from_url,
)
from onboardflow.schemas.wire import AvroDeserializer, AvroSerializer, unframe

#: The id the next schema registered in a copy of the shipped registry gets.
NEXT = 1 + max(i for subject in default_registry().subjects() for i in default_registry().versions(subject))
THING = {"type": "record", "name": "Thing", "namespace": "test", "fields": [{"name": "n", "type": "int"}]}
THING_V2 = {**THING, "fields": THING["fields"] + [{"name": "m", "type": ["null", "int"], "default": None}]}

#: The id the shipped registry gives the next new schema (it grows as the contract does).
NEW_ID = max(entry["id"] for entry in json.loads(REGISTRY_FILE.read_text())["schemas"]) + 1


@pytest.fixture
def served(registry_copy):
    """The shipped registry (a writable copy) served on a free port in this process."""
    with RegistryServer(FileSchemaRegistry(registry_copy, writable=True), port=0) as server:
        yield server


@pytest.fixture
def served_read_only():
    with RegistryServer(default_registry(), port=0) as server:
        yield server


def test_shipped_registry_ids_are_stable():
    registry = default_registry()
    assert registry.versions(EVENTS_SUBJECT) == [1, 2]
    assert registry.latest(EVENTS_SUBJECT)[0] == 2
    assert registry.versions(DEAD_LETTER_SUBJECT) == [3]
    assert {s: registry.versions(s) for s in registry.subjects()} == {
        "dev.onboardflow.profiles.UserProfile": [5, 7, 8, 9],  # 8: RFM fields (docs/rfm.md), 9: experiments
        "onboarding.events-value": [1, 2],
        "onboarding.events.dlq-value": [3],
        "onboarding.model-events-dev.onboardflow.models.DriftEvent": [6],
        "onboarding.segment-changes-value": [4],
    }
    assert registry.get_schema(1)["name"] == registry.get_schema(2)["name"] == "dev.onboardflow.events.OnboardingEvent"


def test_registering_an_identical_schema_returns_its_existing_id_whatever_its_formatting():
    registry = default_registry()
    text = schema_path("onboarding_event", 1).read_text()
    compact = json.dumps(json.loads(text), separators=(",", ":"))
    assert registry.register(EVENTS_SUBJECT, text) == 1
    assert registry.register(EVENTS_SUBJECT, compact) == 1
    assert registry.register(EVENTS_SUBJECT, load_schema("onboarding_event", 1)) == 1
    assert registry.register(EVENTS_SUBJECT, load_schema_json("onboarding_event", 2)) == 2


def test_read_only_registry_refuses_new_schemas():
    with pytest.raises(RegistryReadOnly):
        default_registry().register("things-value", THING)
    with pytest.raises(SchemaNotFound):
        default_registry().get_schema(12345)
    with pytest.raises(SchemaNotFound):
        default_registry().latest("no-such-subject")


def test_a_doc_change_is_a_different_schema():
    assert normalize(THING) != normalize({**THING, "doc": "a thing"})
    assert normalize(THING) == normalize({**THING, "name": "test.Thing", "namespace": "ignored.by.fullname"})


def test_writable_file_registry_appends_and_persists(registry_copy):
    registry = FileSchemaRegistry(registry_copy, writable=True)
    assert registry.register("things-value", THING) == NEW_ID
    assert registry.register("things-value", THING_V2) == NEW_ID + 1
    assert registry.register("things-value", THING) == NEW_ID
    # Same schema under another subject: same global id, new version there.
    assert registry.register("other-things-value", THING) == NEW_ID

    reopened = FileSchemaRegistry(registry_copy)
    assert reopened.versions("things-value") == [NEW_ID, NEW_ID + 1]
    assert reopened.versions("other-things-value") == [NEW_ID]
    assert reopened.versions(EVENTS_SUBJECT) == [1, 2]
    assert reopened.latest("things-value")[1]["fields"][1]["name"] == "m"


def test_invalid_schemas_are_refused(registry_copy):
    registry = FileSchemaRegistry(registry_copy, writable=True)
    with pytest.raises(InvalidSchema):
        registry.register("bad-value", "{not json")
    with pytest.raises(InvalidSchema):
        registry.register("bad-value", {"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]})
    assert "bad-value" not in FileSchemaRegistry(registry_copy).subjects()


def test_registry_from_url_picks_the_implementation(registry_copy):
    assert registry_from_url(None) is default_registry()
    assert isinstance(registry_from_url(f"file://{registry_copy}"), FileSchemaRegistry)
    assert registry_from_url(f"file://{registry_copy}").path == registry_copy
    assert registry_from_url(str(registry_copy)).path == registry_copy
    client = registry_from_url("http://127.0.0.1:8081/")
    assert isinstance(client, ConfluentSchemaRegistry) and client.url == "http://127.0.0.1:8081"
    with pytest.raises(ValueError):
        registry_from_url("ftp://example.org/registry")


def test_confluent_client_round_trip_against_the_served_registry(served):
    client = ConfluentSchemaRegistry(served.url)
    assert client.subjects() == default_registry().subjects()
    assert client.versions(EVENTS_SUBJECT) == [1, 2]
    schema_id, schema = client.latest(EVENTS_SUBJECT)
    assert schema_id == 2 and schema == load_schema("onboarding_event", 2)
    assert client.get_schema(1) == load_schema("onboarding_event", 1)
    assert client.register(EVENTS_SUBJECT, load_schema("onboarding_event", 2)) == 2
    assert client.lookup(EVENTS_SUBJECT, schema_path("onboarding_event", 1).read_text()) == 1

    assert client.register("things-value", THING) == NEW_ID
    assert client.versions("things-value") == [NEW_ID]
    assert client.get_schema(NEW_ID)["name"] == "test.Thing"


def test_confluent_client_maps_errors(served, served_read_only):
    client = ConfluentSchemaRegistry(served.url)
    with pytest.raises(SchemaNotFound):
        client.get_schema(999)
    with pytest.raises(SchemaNotFound):
        client.latest("no-such-subject")
    with pytest.raises(SchemaNotFound):
        client.lookup(EVENTS_SUBJECT, THING)
    with pytest.raises(InvalidSchema):
        client.register("bad-value", {"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]})
    with pytest.raises(RegistryError) as refused:
        ConfluentSchemaRegistry(served_read_only.url).register("things-value", THING)
    assert "42205" in str(refused.value)


def test_unreachable_registry_is_unavailable_not_not_found():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RegistryUnavailable):
        ConfluentSchemaRegistry(f"http://127.0.0.1:{port}", timeout_s=2).get_schema(1)


def test_served_registry_speaks_the_confluent_wire_shapes(served_read_only):
    def get(path):
        request = urllib.request.Request(served_read_only.url + path, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"] == "application/vnd.schemaregistry.v1+json"
            return json.loads(response.read())

    assert json.loads(get("/schemas/ids/3")["schema"]) == load_schema_json("dead_letter")
    assert get("/schemas/ids/2/schema") == load_schema_json("onboarding_event", 2)
    assert get("/subjects/onboarding.events-value/versions") == [1, 2]
    latest = get("/subjects/onboarding.events-value/versions/latest")
    assert (latest["subject"], latest["version"], latest["id"]) == ("onboarding.events-value", 2, 2)
    assert get("/schemas/ids/1/versions") == [{"subject": "onboarding.events-value", "version": 1}]
    assert get("/schemas/types") == ["AVRO"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        get("/subjects/onboarding.events-value/versions/7")
    assert missing.value.code == 404
    assert json.loads(missing.value.read())["error_code"] == 40402


def test_events_serialized_through_the_http_registry_decode_with_the_file_registry(served):
    client = ConfluentSchemaRegistry(served.url)
    event = {
        "event_id": "e-9", "event_type": "invite_sent", "user_id": None, "anonymous_id": "anon-1",
        "session_id": None, "occurred_at": 1_717_000_000_000, "received_at": 1_717_000_000_001,
        "properties": {}, "context": {"device": None, "os": None, "app_version": None, "locale": None,
                                      "ip": None, "user_agent": None, "email": None},
        "consent": {"analytics": False, "personalization": False, "marketing": False},
        "referrer": None,
    }
    raw = AvroSerializer(client, EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(event)
    assert unframe(raw)[0] == 2
    assert AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(raw) == event


def test_registry_list_prints_subjects_versions_and_ids(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:3]) for line in lines[1:]}
    assert ("onboarding.events-value", "1", "1") in rows
    assert ("onboarding.events-value", "2", "2") in rows
    assert ("onboarding.events.dlq-value", "1", "3") in rows
    assert len(rows) == NEW_ID - 1  # one row per registered version


def test_registry_register_command_appends_to_a_registry_file(registry_copy, tmp_path, capsys):
    schema_file = tmp_path / "thing.avsc"
    schema_file.write_text(json.dumps(THING))
    assert main(["register", "things-value", str(schema_file), "--registry", str(registry_copy)]) == 0
    assert capsys.readouterr().out.strip() == str(NEW_ID)
    assert FileSchemaRegistry(registry_copy).versions("things-value") == [NEW_ID]


def test_registry_serve_command_serves_the_shipped_registry_over_http():
    server = subprocess.Popen(
        [sys.executable, "-m", "onboardflow.runners.cli.registry", "serve", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        banner = server.stdout.readline()
        assert "(read-only)" in banner
        url = banner.rsplit(" at ", 1)[1].strip()
        client = ConfluentSchemaRegistry(url)
        assert client.latest(EVENTS_SUBJECT)[0] == 2
        assert client.register(EVENTS_SUBJECT, load_schema("onboarding_event", 1)) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)
