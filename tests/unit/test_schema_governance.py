"""Schema governance: compatibility levels in the file registry and its file, registrations refused
at the subject's level, the Confluent /config and /compatibility endpoints of ``onboardflow registry
serve``, the Confluent REST client speaking to them, and the ``registry config`` / ``check`` commands."""
import json
import urllib.error
import urllib.request

import pytest

from onboardflow.runners.cli.registry import RegistryServer, main
from onboardflow.schemas import EVENTS_SUBJECT, REGISTRY_FILE, default_registry, load_schema_json
from onboardflow.schemas.schema_registry import (
    ConfluentSchemaRegistry,
    FileSchemaRegistry,
    IncompatibleEvolution,
    InvalidCompatibilityLevel,
    InvalidSchema,
    RegistryReadOnly,
    SchemaNotFound,
)

SUBJECT = "things-value"
#: The id the next schema registered in a copy of the shipped registry gets.
NEXT = 1 + max(i for subject in default_registry().subjects() for i in default_registry().versions(subject))
V1 = {"type": "record", "name": "Thing", "namespace": "test", "fields": [{"name": "a", "type": "int"}]}
# v2 adds b with a default: BACKWARD and FORWARD compatible with v1.
V2 = {**V1, "fields": V1["fields"] + [{"name": "b", "type": "int", "default": 0}]}
# v3 drops b's default: it reads v2 data (which has b) but not v1 data (which has not).
V3 = {**V1, "fields": V1["fields"] + [{"name": "b", "type": "int"}]}
# A new required field: the new schema cannot read anything written before it.
REQUIRED_FIELD = {**V1, "fields": V1["fields"] + [{"name": "c", "type": "string"}]}
TYPE_CHANGE = {**V1, "fields": [{"name": "a", "type": "string"}]}


@pytest.fixture
def registry(registry_copy):
    registry = FileSchemaRegistry(registry_copy, writable=True)
    assert registry.register(SUBJECT, V1) == NEXT
    return registry


@pytest.fixture
def served(registry):
    with RegistryServer(registry, port=0) as server:
        yield server


@pytest.fixture
def served_read_only():
    with RegistryServer(default_registry(), port=0) as server:
        yield server


def call(server, method, path, body=None):
    """(HTTP status, JSON answer) of one request to the served registry."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def schema_body(schema):
    return {"schema": json.dumps(schema)}


# --------------------------------------------------------------------------- the file registry


def test_a_registry_file_without_levels_loads_as_backward_and_gains_them_when_written(tmp_path):
    data = json.loads(REGISTRY_FILE.read_text())
    assert data.pop("compatibility") == {"global": "BACKWARD", "subjects": {EVENTS_SUBJECT: "FULL_TRANSITIVE"}}
    old = tmp_path / "old-registry.json"
    old.write_text(json.dumps(data, indent=2))

    registry = FileSchemaRegistry(old, writable=True)
    assert registry.compatibility() == "BACKWARD"
    assert registry.compatibility(EVENTS_SUBJECT) == "BACKWARD"
    assert registry.compatibility(EVENTS_SUBJECT, default_to_global=False) is None
    assert registry.versions(EVENTS_SUBJECT) == [1, 2]

    assert registry.register(SUBJECT, V1) == NEXT
    written = json.loads(old.read_text())
    assert written["compatibility"] == {"global": "BACKWARD", "subjects": {}}
    assert written["subjects"][SUBJECT] == [NEXT]


def test_levels_persist_in_the_file_per_subject_and_globally(registry, registry_copy):
    assert registry.set_compatibility("forward", SUBJECT) == "FORWARD"
    assert registry.set_compatibility("FULL") == "FULL"
    reopened = FileSchemaRegistry(registry_copy)
    assert reopened.compatibility() == "FULL"
    assert reopened.compatibility(SUBJECT) == "FORWARD"
    assert reopened.compatibility(EVENTS_SUBJECT) == "FULL_TRANSITIVE"
    assert reopened.compatibility("dev.onboardflow.profiles.UserProfile") == "FULL"  # inherits the global level
    assert json.loads(registry_copy.read_text())["compatibility"] == {
        "global": "FULL", "subjects": {EVENTS_SUBJECT: "FULL_TRANSITIVE", SUBJECT: "FORWARD"}}

    assert registry.delete_compatibility(SUBJECT) == "FORWARD"
    assert registry.compatibility(SUBJECT, default_to_global=False) is None
    with pytest.raises(SchemaNotFound):
        registry.delete_compatibility(SUBJECT)
    assert registry.delete_compatibility() == "FULL"
    assert FileSchemaRegistry(registry_copy).compatibility() == "BACKWARD"


def test_unknown_levels_are_refused_in_requests_and_in_the_file(registry, registry_copy, tmp_path):
    before = registry_copy.read_bytes()
    with pytest.raises(InvalidCompatibilityLevel, match="'SIDEWAYS'"):
        registry.set_compatibility("SIDEWAYS", SUBJECT)
    with pytest.raises(InvalidCompatibilityLevel):
        registry.set_compatibility(None)
    assert registry_copy.read_bytes() == before

    data = json.loads(before)
    data["compatibility"]["subjects"][SUBJECT] = "SOMETIMES"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="broken.json: invalid compatibility level 'SOMETIMES'"):
        FileSchemaRegistry(broken)


def test_a_read_only_registry_refuses_level_changes():
    with pytest.raises(RegistryReadOnly):
        default_registry().set_compatibility("NONE")
    with pytest.raises(RegistryReadOnly):
        default_registry().delete_compatibility(EVENTS_SUBJECT)
    assert default_registry().compatibility() == "BACKWARD"


def test_an_incompatible_schema_is_refused_naming_what_breaks_and_the_file_is_untouched(registry, registry_copy):
    before = registry_copy.read_bytes()
    for schema, what in ((REQUIRED_FIELD, "c: in the reader without a default"),
                         (TYPE_CHANGE, "reader type: string not compatible with writer type: int")):
        with pytest.raises(IncompatibleEvolution) as refused:
            registry.register(SUBJECT, schema)
        assert str(refused.value).startswith(
            'Schema being registered is incompatible with an earlier schema for subject "things-value"')
        assert "BACKWARD: version 1: the new schema cannot read old data" in str(refused.value)
        assert len(refused.value.problems) == 1 and what in refused.value.problems[0]
    assert registry_copy.read_bytes() == before
    assert registry.versions(SUBJECT) == [NEXT]


def test_the_same_schema_is_accepted_once_the_subjects_level_is_none(registry, registry_copy):
    registry.set_compatibility("NONE", SUBJECT)
    assert registry.register(SUBJECT, REQUIRED_FIELD) == NEXT + 1
    assert FileSchemaRegistry(registry_copy).versions(SUBJECT) == [NEXT, NEXT + 1]
    # Other subjects keep the global level.
    assert registry.register("other-things-value", V1) == NEXT
    with pytest.raises(IncompatibleEvolution):
        registry.register("other-things-value", REQUIRED_FIELD)


def test_backward_checks_the_latest_version_and_backward_transitive_every_one(registry):
    assert registry.register(SUBJECT, V2) == NEXT + 1
    assert registry.compatibility_problems(SUBJECT, V3) == []  # V3 reads v2 data
    registry.set_compatibility("BACKWARD_TRANSITIVE", SUBJECT)
    found = registry.compatibility_problems(SUBJECT, V3)
    assert [p.split(":")[0] for p in found] == ["version 1"]
    with pytest.raises(IncompatibleEvolution):
        registry.register(SUBJECT, V3)
    registry.set_compatibility("BACKWARD", SUBJECT)
    assert registry.register(SUBJECT, V3) == NEXT + 2


def test_forward_refuses_dropping_a_field_old_readers_need(registry):
    registry.set_compatibility("FORWARD", SUBJECT)
    assert registry.register(SUBJECT, V3) == NEXT + 1  # old readers ignore b
    dropped = {**V1, "fields": [{"name": "b", "type": "int"}]}
    found = registry.compatibility_problems(SUBJECT, dropped)
    assert len(found) == 1 and found[0].startswith("version 2: the old schema cannot read new data")


def test_an_already_registered_schema_returns_its_id_whatever_the_level(registry):
    assert registry.register(SUBJECT, V2) == NEXT + 1
    registry.set_compatibility("FULL_TRANSITIVE", SUBJECT)
    assert registry.register(SUBJECT, V1) == NEXT  # an earlier version: nothing new to check


def test_compatibility_against_one_version_uses_the_levels_direction_only(registry):
    assert registry.register(SUBJECT, V2) == NEXT + 1
    assert registry.compatibility_problems(SUBJECT, V3, version=2) == []
    assert registry.compatibility_problems(SUBJECT, V3, version=1) != []
    registry.set_compatibility("NONE", SUBJECT)
    assert registry.compatibility_problems(SUBJECT, V3, version=1) == []
    with pytest.raises(SchemaNotFound):
        registry.compatibility_problems(SUBJECT, V3, version=3)
    with pytest.raises(SchemaNotFound):
        registry.compatibility_problems("no-such-subject", V3, version=1)
    assert registry.compatibility_problems("no-such-subject", V3) == []
    with pytest.raises(InvalidSchema):
        registry.compatibility_problems(SUBJECT, {"type": "record", "name": "X", "fields": [{"name": "a"}]})


# --------------------------------------------------------------------------- the served REST API


def test_config_endpoints_speak_confluents_shapes(served, registry_copy):
    assert call(served, "GET", "/config") == (200, {"compatibilityLevel": "BACKWARD"})
    assert call(served, "GET", f"/config/{EVENTS_SUBJECT}") == (200, {"compatibilityLevel": "FULL_TRANSITIVE"})
    assert call(served, "GET", f"/config/{SUBJECT}") == (404, {
        "error_code": 40408, "message": "Subject 'things-value' does not have subject-level compatibility configured"})
    assert call(served, "GET", f"/config/{SUBJECT}?defaultToGlobal=true") == (200, {"compatibilityLevel": "BACKWARD"})

    assert call(served, "PUT", "/config", {"compatibility": "FULL"}) == (200, {"compatibility": "FULL"})
    assert call(served, "PUT", f"/config/{SUBJECT}", {"compatibility": "none"}) == (200, {"compatibility": "NONE"})
    assert call(served, "GET", "/config") == (200, {"compatibilityLevel": "FULL"})
    assert call(served, "GET", f"/config/{SUBJECT}") == (200, {"compatibilityLevel": "NONE"})
    assert FileSchemaRegistry(registry_copy).compatibility(SUBJECT) == "NONE"

    status, answer = call(served, "PUT", "/config", {"compatibility": "SIDEWAYS"})
    assert (status, answer["error_code"]) == (422, 42203)
    assert "Invalid compatibility level" in answer["message"]
    assert call(served, "PUT", "/config", {})[1]["error_code"] == 42203

    assert call(served, "DELETE", f"/config/{SUBJECT}") == (200, {"compatibilityLevel": "NONE"})
    assert call(served, "DELETE", f"/config/{SUBJECT}") == (404, {
        "error_code": 40401, "message": "Subject 'things-value' not found."})
    assert call(served, "DELETE", "/config") == (200, {"compatibilityLevel": "FULL"})
    assert call(served, "GET", "/config") == (200, {"compatibilityLevel": "BACKWARD"})


def test_a_read_only_server_refuses_level_changes_with_42205(served_read_only):
    for method, path, body in (("PUT", "/config", {"compatibility": "NONE"}),
                               ("PUT", f"/config/{EVENTS_SUBJECT}", {"compatibility": "NONE"}),
                               ("DELETE", f"/config/{EVENTS_SUBJECT}", None)):
        status, answer = call(served_read_only, method, path, body)
        assert (status, answer["error_code"]) == (422, 42205), (method, path)
    assert call(served_read_only, "GET", f"/config/{EVENTS_SUBJECT}") == (
        200, {"compatibilityLevel": "FULL_TRANSITIVE"})
    status, answer = call(served_read_only, "POST", "/subjects/things-value/versions", schema_body(V1))
    assert (status, answer["error_code"]) == (422, 42205)


def test_compatibility_endpoints_answer_is_compatible_with_messages_when_verbose(served):
    base = f"/compatibility/subjects/{SUBJECT}/versions"
    assert call(served, "POST", f"{base}/latest", schema_body(V2)) == (200, {"is_compatible": True})
    assert call(served, "POST", f"{base}/1", schema_body(REQUIRED_FIELD)) == (200, {"is_compatible": False})
    assert call(served, "POST", base, schema_body(REQUIRED_FIELD)) == (200, {"is_compatible": False})
    status, answer = call(served, "POST", f"{base}/latest?verbose=true", schema_body(REQUIRED_FIELD))
    assert status == 200 and answer["is_compatible"] is False
    assert len(answer["messages"]) == 1 and "c: in the reader without a default" in answer["messages"][0]
    assert call(served, "POST", f"{base}?verbose=true", schema_body(V2)) == (
        200, {"is_compatible": True, "messages": []})
    # Nothing registered under a subject: nothing to break.
    assert call(served, "POST", "/compatibility/subjects/fresh-value/versions/latest", schema_body(V1)) == (
        200, {"is_compatible": True})

    assert call(served, "POST", f"{base}/2", schema_body(V2))[1]["error_code"] == 40402
    assert call(served, "POST", "/compatibility/subjects/fresh-value/versions/1", schema_body(V1))[1][
        "error_code"] == 40401
    assert call(served, "POST", f"{base}/first", schema_body(V2))[1]["error_code"] == 42202
    assert call(served, "POST", f"{base}/latest", {"schema": "{nope"})[1]["error_code"] == 42201


def test_registering_an_incompatible_schema_is_a_409_conflict(served, registry_copy):
    status, answer = call(served, "POST", f"/subjects/{SUBJECT}/versions", schema_body(TYPE_CHANGE))
    assert (status, answer["error_code"]) == (409, 409)
    assert answer["message"].startswith(
        'Schema being registered is incompatible with an earlier schema for subject "things-value", details: [')
    assert "reader type: string not compatible with writer type: int" in answer["message"]
    assert FileSchemaRegistry(registry_copy).versions(SUBJECT) == [NEXT]

    assert call(served, "PUT", f"/config/{SUBJECT}", {"compatibility": "NONE"})[0] == 200
    assert call(served, "POST", f"/subjects/{SUBJECT}/versions", schema_body(TYPE_CHANGE)) == (200, {"id": NEXT + 1})


# --------------------------------------------------------------------------- our REST client


def test_the_confluent_client_governs_the_served_registry(served, served_read_only):
    client = ConfluentSchemaRegistry(served.url)
    assert client.compatibility() == "BACKWARD"
    assert client.compatibility(EVENTS_SUBJECT) == "FULL_TRANSITIVE"
    assert client.compatibility(SUBJECT) == "BACKWARD"
    assert client.compatibility(SUBJECT, default_to_global=False) is None

    found = client.compatibility_problems(SUBJECT, REQUIRED_FIELD)
    assert len(found) == 1 and found[0].startswith("version 1: the new schema cannot read old data")
    assert client.compatibility_problems(SUBJECT, V2) == []
    assert client.compatibility_problems(SUBJECT, REQUIRED_FIELD, version=1) == found
    assert client.compatibility_problems("fresh-value", REQUIRED_FIELD) == []
    with pytest.raises(SchemaNotFound):
        client.compatibility_problems(SUBJECT, V2, version=4)

    with pytest.raises(IncompatibleEvolution, match="HTTP 409 \\(error_code 409\\)"):
        client.register(SUBJECT, REQUIRED_FIELD)
    with pytest.raises(InvalidCompatibilityLevel):
        client.set_compatibility("SIDEWAYS", SUBJECT)
    assert client.set_compatibility("none", SUBJECT) == "NONE"
    assert client.register(SUBJECT, REQUIRED_FIELD) == NEXT + 1
    assert client.delete_compatibility(SUBJECT) == "NONE"
    with pytest.raises(SchemaNotFound):
        client.delete_compatibility(SUBJECT)

    with pytest.raises(RegistryReadOnly):
        ConfluentSchemaRegistry(served_read_only.url).set_compatibility("NONE")


# --------------------------------------------------------------------------- the commands


def test_registry_config_shows_sets_and_deletes_levels(registry_copy, capsys):
    at = ["--registry", str(registry_copy)]
    assert main(["config", *at]) == 0
    assert main(["config", EVENTS_SUBJECT, *at]) == 0
    assert main(["config", SUBJECT, *at]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "global: BACKWARD", f"{EVENTS_SUBJECT}: FULL_TRANSITIVE", f"{SUBJECT}: BACKWARD (global default)"]

    assert main(["config", SUBJECT, "--set", "forward_transitive", *at]) == 0
    assert main(["config", SUBJECT, "--delete", *at]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{SUBJECT}: FORWARD_TRANSITIVE", f"{SUBJECT}: BACKWARD (was FORWARD_TRANSITIVE)"]

    assert main(["config", "--set", "SIDEWAYS", *at]) == 1
    assert "invalid compatibility level 'SIDEWAYS'" in capsys.readouterr().err
    assert FileSchemaRegistry(registry_copy).compatibility() == "BACKWARD"


def test_registry_config_and_check_work_against_an_http_registry_too(served, tmp_path, capsys):
    at = ["--registry", served.url]
    assert main(["config", SUBJECT, "--set", "FULL", *at]) == 0
    assert main(["config", SUBJECT, *at]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{SUBJECT}: FULL", f"{SUBJECT}: FULL"]
    schema_file = tmp_path / "thing.avsc"
    schema_file.write_text(json.dumps(TYPE_CHANGE))
    assert main(["check", SUBJECT, str(schema_file), *at]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{schema_file} is incompatible with {SUBJECT} at FULL (its earlier versions):"
    assert [line.split(":")[0].strip() for line in out[1:]] == ["version 1", "version 1"]  # both directions


def test_registry_check_exits_zero_for_a_safe_evolution_and_one_with_the_reasons_otherwise(tmp_path, capsys):
    event = load_schema_json("onboarding_event", 2)
    safe, unsafe = tmp_path / "safe.avsc", tmp_path / "unsafe.avsc"
    safe.write_text(json.dumps({**event, "fields": event["fields"] + [
        {"name": "tenant", "type": ["null", "string"], "default": None}]}))
    unsafe.write_text(json.dumps({**event, "fields": event["fields"] + [{"name": "tenant", "type": "string"}]}))

    assert main(["check", EVENTS_SUBJECT, str(safe)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{safe} is compatible with {EVENTS_SUBJECT} at FULL_TRANSITIVE (its earlier versions)")
    assert main(["check", EVENTS_SUBJECT, str(unsafe)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{unsafe} is incompatible with {EVENTS_SUBJECT} at FULL_TRANSITIVE (its earlier versions):"
    assert len(lines) == 3 and all("tenant: in the reader without a default" in line for line in lines[1:])
    assert main(["check", EVENTS_SUBJECT, str(unsafe), "--version", "2"]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 2

    missing = tmp_path / "missing.avsc"
    assert main(["check", EVENTS_SUBJECT, str(missing)]) == 2
    not_avro = tmp_path / "not-avro.avsc"
    not_avro.write_text('{"type": "record"}')
    assert main(["check", EVENTS_SUBJECT, str(not_avro)]) == 2
    assert "not a valid Avro schema" in capsys.readouterr().err


def test_registry_register_refuses_an_incompatible_schema_file(registry_copy, tmp_path, capsys):
    schema_file = tmp_path / "event.avsc"
    event = load_schema_json("onboarding_event", 2)
    # event_id dropped: the old readers need it.
    schema_file.write_text(json.dumps({**event, "fields": event["fields"][1:]}))
    assert main(["register", EVENTS_SUBJECT, str(schema_file), "--registry", str(registry_copy)]) == 1
    err = capsys.readouterr().err
    assert "incompatible with an earlier schema" in err and "FULL_TRANSITIVE" in err
    assert FileSchemaRegistry(registry_copy).versions(EVENTS_SUBJECT) == [1, 2]
