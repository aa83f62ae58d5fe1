"""Schema governance as a Confluent client sees it.

confluent-kafka's own ``SchemaRegistryClient`` drives ``onboardflow registry
serve`` (in process, on a free port, over a temporary copy of the shipped
registry file, writable): the global level is BACKWARD, levels can be set per
subject, ``test_compatibility`` tells a safe evolution of the event schema
from an unsafe one, and registering the unsafe one is refused with
Confluent's 409 until the subject's level is NONE.
"""
import json

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from onboardflow.runners.cli.registry import RegistryServer
from onboardflow.schemas import EVENTS_SUBJECT, load_schema_json, schema_path
from onboardflow.schemas.schema_registry import FileSchemaRegistry

pytestmark = pytest.mark.integration

SUBJECT = "governance-test.onboarding.events-value"


def _event_schema(extra_fields=(), fields=None) -> Schema:
    event = load_schema_json("onboarding_event", 2)
    return Schema(json.dumps({**event, "fields": (fields or event["fields"]) + list(extra_fields)}), "AVRO")


# v3 candidates of the event schema
SAFE = _event_schema([{"name": "tenant", "type": ["null", "string"], "default": None}])
REQUIRED_FIELD = _event_schema([{"name": "tenant", "type": "string"}])
TYPE_CHANGE = _event_schema(fields=[
    {**f, "type": "long"} if f["name"] == "event_id" else f for f in load_schema_json("onboarding_event", 2)["fields"]
])


@pytest.fixture
def client(registry_copy):
    with RegistryServer(FileSchemaRegistry(registry_copy, writable=True), port=0) as server:
        client = SchemaRegistryClient({"url": server.url})
        # A subject of our own holding the shipped event versions, at the default level.
        for version in (1, 2):
            client.register_schema(SUBJECT, Schema(schema_path("onboarding_event", version).read_text(), "AVRO"))
        yield client


def test_the_default_level_is_backward_and_levels_are_set_per_subject(client, registry_copy):
    assert client.get_compatibility() == "BACKWARD"
    assert client.get_compatibility(EVENTS_SUBJECT) == "FULL_TRANSITIVE"
    with pytest.raises(SchemaRegistryError) as unset:
        client.get_compatibility(SUBJECT)  # no level of its own: Confluent's 40408
    assert (unset.value.http_status_code, unset.value.error_code) == (404, 40408)

    client.set_compatibility(subject_name=SUBJECT, level="FULL")
    assert client.get_compatibility(SUBJECT) == "FULL"
    assert client.get_compatibility() == "BACKWARD"
    assert FileSchemaRegistry(registry_copy).compatibility(SUBJECT) == "FULL"

    with pytest.raises(SchemaRegistryError) as invalid:
        client.set_compatibility(subject_name=SUBJECT, level="SIDEWAYS")
    assert (invalid.value.http_status_code, invalid.value.error_code) == (422, 42203)


def test_test_compatibility_tells_a_safe_evolution_from_an_unsafe_one(client):
    assert client.test_compatibility(SUBJECT, SAFE) is True
    assert client.test_compatibility(SUBJECT, REQUIRED_FIELD) is False
    assert client.test_compatibility(SUBJECT, TYPE_CHANGE) is False
    assert client.test_compatibility(SUBJECT, SAFE, version=1) is True
    assert client.test_compatibility_all_versions(SUBJECT, SAFE) is True
    assert client.test_compatibility_all_versions(SUBJECT, TYPE_CHANGE) is False
    # The shipped event subject is FULL_TRANSITIVE: the same answers against every version.
    assert client.test_compatibility_all_versions(EVENTS_SUBJECT, SAFE) is True
    assert client.test_compatibility_all_versions(EVENTS_SUBJECT, REQUIRED_FIELD) is False


def test_an_incompatible_schema_is_refused_with_409_until_the_subject_is_set_to_none(client, registry_copy):
    for unsafe in (REQUIRED_FIELD, TYPE_CHANGE):
        with pytest.raises(SchemaRegistryError) as refused:
            client.register_schema(SUBJECT, unsafe)
        assert (refused.value.http_status_code, refused.value.error_code) == (409, 409)
        assert "incompatible with an earlier schema" in refused.value.error_message
    assert client.get_versions(SUBJECT) == [1, 2]

    client.set_compatibility(subject_name=SUBJECT, level="NONE")
    assert client.test_compatibility(SUBJECT, REQUIRED_FIELD) is True
    new_id = client.register_schema(SUBJECT, REQUIRED_FIELD)
    assert client.get_versions(SUBJECT) == [1, 2, 3]
    assert FileSchemaRegistry(registry_copy).versions(SUBJECT)[-1] == new_id


def test_a_safe_evolution_registers_at_the_default_level(client):
    new_id = client.register_schema(SUBJECT, SAFE)
    latest = client.get_latest_version(SUBJECT)
    assert (latest.version, latest.schema_id) == (3, new_id)
