"""The event contract: Avro schemas, their registry and the Kafka wire format.

Every record onboardflow reads from or writes to Kafka is Avro, framed the way
Confluent Schema Registry clients frame it (``wire.py``: magic byte 0, 4-byte
big-endian schema id, schemaless Avro binary), so any Confluent-compatible
producer or consumer can talk to our topics. Schema ids come from a registry
(``schema_registry.py``): by default the file registry ``registry.json`` shipped next
to the ``.avsc`` files, or a real Confluent Schema Registry; ``onboardflow
registry serve`` serves the file registry over the Confluent REST API. A new
version of a subject must pass the subject's compatibility level (BACKWARD
unless set; ``compatibility.py``), as in Confluent's registry.

Schemas live here as ``<name>.avsc`` or, for evolving ones, ``<name>.v<N>.avsc``:

* ``onboarding_event.v1`` / ``.v2``: the raw events on ``onboarding.events``;
  v2 is the pipeline's reader schema, every older version resolves into it.
* ``dead_letter``: rejected records on ``onboarding.events.dlq``.
* ``segment_change``: segment entries/exits on ``onboarding.segment-changes``.
* ``user_profile``: the profile written to Redis and the warehouse.
* ``drift_event``: drift detections on ``onboarding.model-events``.

Convention: timestamps (``timestamp-millis``) travel through the pipeline as
epoch-millisecond ints, never datetimes; ``wire.AvroDeserializer`` decodes them
that way and the serializers accept ints.
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import TYPE_CHECKING, Any

import fastavro

if TYPE_CHECKING:
    from .schema_registry import FileSchemaRegistry

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent
REGISTRY_FILE = SCHEMA_DIR / "registry.json"

# Topics (created by runners/services/kafka.sh).
EVENTS_TOPIC = "onboarding.events"
DEAD_LETTER_TOPIC = "onboarding.events.dlq"
SEGMENT_CHANGES_TOPIC = "onboarding.segment-changes"
MODEL_EVENTS_TOPIC = "onboarding.model-events"

# Registry subjects. Single-record topics use Confluent's TopicNameStrategy
# ("<topic>-value"); the model-events topic may carry several record types, so
# it uses TopicRecordNameStrategy; profiles never travel through Kafka and are
# registered under their record name (RecordNameStrategy).
EVENTS_SUBJECT = f"{EVENTS_TOPIC}-value"
DEAD_LETTER_SUBJECT = f"{DEAD_LETTER_TOPIC}-value"
SEGMENT_CHANGES_SUBJECT = f"{SEGMENT_CHANGES_TOPIC}-value"
DRIFT_EVENT_SUBJECT = f"{MODEL_EVENTS_TOPIC}-dev.onboardflow.models.DriftEvent"
USER_PROFILE_SUBJECT = "dev.onboardflow.profiles.UserProfile"

# Schema file name -> subject it is registered under.
SUBJECTS = {
    "onboarding_event": EVENTS_SUBJECT,
    "dead_letter": DEAD_LETTER_SUBJECT,
    "segment_change": SEGMENT_CHANGES_SUBJECT,
    "user_profile": USER_PROFILE_SUBJECT,
    "drift_event": DRIFT_EVENT_SUBJECT,
}

_VERSIONED = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


def schema_versions(name: str) -> list[int]:
    """Versions of a versioned schema shipped here, ascending ([] if unversioned)."""
    versions = []
    for path in SCHEMA_DIR.glob(f"{name}.v*.avsc"):
        match = _VERSIONED.match(path.name)
        if match and match["name"] == name:
            versions.append(int(match["version"]))
    return sorted(versions)


def schema_path(name: str, version: int | None = None) -> pathlib.Path:
    """Path of a schema file: ``name.vN.avsc``, or the latest version, or ``name.avsc``."""
    if version is None:
        versions = schema_versions(name)
        if versions:
            version = versions[-1]
    path = SCHEMA_DIR / (f"{name}.v{version}.avsc" if version is not None else f"{name}.avsc")
    if not path.is_file():
        raise FileNotFoundError(f"no schema {path.name} in {SCHEMA_DIR}")
    return path


@functools.lru_cache(maxsize=None)
def _schema_text(name: str, version: int | None) -> str:
    return schema_path(name, version).read_text(encoding="utf-8")


def load_schema_json(name: str, version: int | None = None) -> dict[str, Any]:
    """The schema as written in its ``.avsc`` file (a fresh dict on every call)."""
    return json.loads(_schema_text(name, version))


@functools.lru_cache(maxsize=None)
def load_schema(name: str, version: int | None = None) -> dict[str, Any]:
    """The fastavro-parsed schema ``name`` (latest version unless given), cached.

    The result is shared between callers: treat it as read-only.
    """
    return fastavro.parse_schema(load_schema_json(name, version))


@functools.lru_cache(maxsize=None)
def default_registry() -> "FileSchemaRegistry":
    """The read-only file registry shipped with the package (``registry.json``), shared."""
    from .schema_registry import FileSchemaRegistry

    return FileSchemaRegistry(REGISTRY_FILE)


__all__ = [
    "DEAD_LETTER_SUBJECT",
    "DEAD_LETTER_TOPIC",
    "DRIFT_EVENT_SUBJECT",
    "EVENTS_SUBJECT",
    "EVENTS_TOPIC",
    "MODEL_EVENTS_TOPIC",
    "REGISTRY_FILE",
    "SCHEMA_DIR",
    "SEGMENT_CHANGES_SUBJECT",
    "SEGMENT_CHANGES_TOPIC",
    "SUBJECTS",
    "USER_PROFILE_SUBJECT",
    "default_registry",
    "load_schema",
    "load_schema_json",
    "schema_path",
    "schema_versions",
]
