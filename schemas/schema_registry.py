"""Schema registries: where the 4-byte schema ids in our Kafka frames point, and what may evolve.

Producers register the schema they write under a subject and put the returned
id in front of every record; consumers fetch the writer schema by id and
resolve it into their reader schema. Three interchangeable registries:

* ``FileSchemaRegistry``: ``schemas/registry.json`` shipped in the repo is the
  default, so pipelines, tests and demos need no registry service. Ids are
  stable (onboarding event v1 = 1, v2 = 2, then the other records) and the
  schemas are stored inline, so editing an ``.avsc`` file never silently
  changes what an id means. A writable file registry appends new schemas.
* ``ConfluentSchemaRegistry``: a client for the Confluent Schema Registry REST
  API (the subset below) on urllib, caching ids and schemas.
* ``onboardflow registry serve`` (runners/cli/registry.py) serves a file registry
  over that same REST subset, so Confluent clients work without Confluent.

Identity of a schema is its JSON after fastavro parsing (full names expanded),
key-sorted, whitespace-free: formatting and namespace shorthand do not matter;
docs, defaults and symbols do (as for Confluent, a doc change is a new schema).
Like Confluent, an identical schema gets the same id under every subject.

Governance, as in Confluent: every registry has a global compatibility level
(BACKWARD unless set) and optional per-subject levels; a new version of a
subject must pass schemas/compatibility.py against the subject's earlier
versions at its level (the latest, or all of them for a ``*_TRANSITIVE``
level), or registration raises ``IncompatibleEvolution`` naming what breaks.
Registering a schema the subject already holds returns its id unchecked.
``compatibility_problems`` runs the same check without registering. The file
registry keeps the levels in its file (``"compatibility": {"global": LEVEL,
"subjects": {subject: LEVEL}}``; a file without that key is BACKWARD
throughout). docs/security.md ("Schema governance") has the rules.
"""
from __future__ import annotations

import abc
import http.client
import json
import os
import pathlib
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, Union

import fastavro
from fastavro.schema import SchemaParseException

from . import REGISTRY_FILE, default_registry
from .compatibility import (
    DEFAULT_LEVEL,
    InvalidLevel,
    UnreadableSchema,
    check_level,
    pair_problems,
    versions_to_check,
)

# A schema as accepted by the registries: Avro JSON text, a JSON dict/list, or a
# fastavro-parsed schema.
SchemaLike = Union[str, dict, list]

CONFLUENT_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(Exception):
    """The registry refused or failed a request."""


class SchemaNotFound(RegistryError, LookupError):
    """No such schema id, subject or version."""


class InvalidSchema(RegistryError):
    """The schema is not a valid Avro schema (or not Avro at all)."""


class RegistryReadOnly(RegistryError):
    """Registering a new schema in a read-only registry."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or failed (transient: retry later)."""


class IncompatibleEvolution(RegistryError):
    """The schema may not follow the subject's earlier versions at its compatibility level.

    ``problems`` lists what breaks, one line each (empty when a remote registry gave no details).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


class InvalidCompatibilityLevel(RegistryError, InvalidLevel):
    """Not one of the compatibility levels (schemas/compatibility.py LEVELS)."""


def _incompatible_message(subject: str, level: str, problems: Sequence[str]) -> str:
    # Confluent's wording, with what breaks as the details.
    return (f'Schema being registered is incompatible with an earlier schema for subject "{subject}", '
            f"details: [{level}: {'; '.join(problems)}]")


def _level(level: Any) -> str:
    try:
        return check_level(level)
    except InvalidLevel as err:
        raise InvalidCompatibilityLevel(str(err)) from None


def plain_schema(schema: SchemaLike) -> Any:
    """The schema as plain Avro JSON data: parsed markers (``__*`` keys) removed."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise InvalidSchema(f"schema is not JSON: {err.msg} at {err.pos}") from None
    return _strip_markers(schema)


def _strip_markers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_markers(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [_strip_markers(v) for v in node]
    return node


def parse(schema: SchemaLike) -> Any:
    """fastavro-parse a schema given in any accepted form; InvalidSchema if it is not Avro."""
    if isinstance(schema, dict) and "__fastavro_parsed" in schema:
        return schema
    try:
        return fastavro.parse_schema(plain_schema(schema))
    except (SchemaParseException, TypeError, ValueError, KeyError, AttributeError) as err:
        raise InvalidSchema(f"not a valid Avro schema: {type(err).__name__}") from None


def normalize(schema: SchemaLike) -> str:
    """The identity of a schema: parsed, full names expanded, sorted keys, no whitespace."""
    return json.dumps(plain_schema(parse(schema)), sort_keys=True, separators=(",", ":"))


class SchemaRegistry(abc.ABC):
    """Maps (subject, schema) to a global schema id and back."""

    @abc.abstractmethod
    def register(self, subject: str, schema: SchemaLike) -> int:
        """Id of ``schema`` under ``subject``, registering it as a new version if needed."""

    @abc.abstractmethod
    def get_schema(self, schema_id: int) -> Any:
        """The fastavro-parsed schema with this id; SchemaNotFound if there is none."""

    @abc.abstractmethod
    def latest(self, subject: str) -> tuple[int, Any]:
        """(id, parsed schema) of the latest version under ``subject``."""

    @abc.abstractmethod
    def subjects(self) -> list[str]:
        """All subjects, sorted."""

    @abc.abstractmethod
    def versions(self, subject: str) -> list[int]:
        """Schema ids registered under ``subject``, in version order (version N = item N-1)."""

    def lookup(self, subject: str, schema: SchemaLike) -> int:
        """Id of ``schema`` if it is registered under ``subject``; SchemaNotFound otherwise."""
        wanted = normalize(schema)
        for schema_id in self.versions(subject):
            if normalize(self.get_schema(schema_id)) == wanted:
                return schema_id
        raise SchemaNotFound(f"schema not registered under subject {subject!r}")

    def get_schema_json(self, schema_id: int) -> Any:
        """The schema with this id as plain Avro JSON data."""
        return plain_schema(self.get_schema(schema_id))

    # Governance. Registries that do not override these have no levels.

    def compatibility(self, subject: str | None = None, default_to_global: bool = True) -> str | None:
        """The global level, or ``subject``'s own level; without one, the global level
        (``default_to_global``) or None."""
        raise NotImplementedError(f"{type(self).__name__} has no compatibility levels")

    def set_compatibility(self, level: str, subject: str | None = None) -> str:
        """Set the global level, or ``subject``'s own; returns the level set.
        InvalidCompatibilityLevel for an unknown level, RegistryReadOnly when read-only."""
        raise NotImplementedError(f"{type(self).__name__} has no compatibility levels")

    def delete_compatibility(self, subject: str | None = None) -> str:
        """Drop ``subject``'s own level (SchemaNotFound if it has none), or reset the global
        level to BACKWARD; returns the level dropped."""
        raise NotImplementedError(f"{type(self).__name__} has no compatibility levels")

    def compatibility_problems(self, subject: str, schema: SchemaLike, version: int | None = None) -> list[str]:
        """What stops ``schema`` from following ``subject``'s versions; empty when it may.

        ``version=None`` checks what registration checks: the versions the
        subject's level names (the latest, or all for a ``*_TRANSITIVE``
        level). A version number checks that version alone, in the level's
        direction(s). A subject without versions has nothing to break; a
        version it does not have is SchemaNotFound; InvalidSchema if
        ``schema`` is not Avro.
        """
        parse(schema)
        level = self.compatibility(subject)
        try:
            ids = self.versions(subject)
        except SchemaNotFound:
            if version is None:
                return []
            raise
        if version is None:
            numbers = versions_to_check(level, len(ids))
        elif 1 <= version <= len(ids):
            numbers = [] if level == "NONE" else [version]
        else:
            raise SchemaNotFound(f"subject {subject!r} has no version {version}")
        new = plain_schema(schema)
        found: list[str] = []
        try:
            for number in numbers:
                old = self.get_schema_json(ids[number - 1])
                found += [f"version {number}: {p}" for p in pair_problems(new, old, level)]
        except UnreadableSchema as err:
            raise InvalidSchema(str(err)) from None
        return found


class FileSchemaRegistry(SchemaRegistry):
    """A registry kept in a JSON file: ``{"compatibility": {"global": LEVEL, "subjects":
    {subject: LEVEL}}, "schemas": [{"id", "schema"}], "subjects": {subject: [ids]}}``.

    Read-only unless ``writable`` (new schemas and level changes then raise
    RegistryReadOnly); a writable registry rewrites the file atomically on
    every new registration or level change, and is safe to share between
    threads (the served registry), though not between processes. A file
    without ``"compatibility"`` loads as BACKWARD throughout.
    """

    def __init__(self, path: str | os.PathLike = REGISTRY_FILE, writable: bool = False):
        self.path = pathlib.Path(path)
        self.writable = writable
        self._lock = threading.Lock()
        self._raw: dict[int, Any] = {}  # id -> schema JSON as registered
        self._parsed: dict[int, Any] = {}
        self._ids_by_identity: dict[str, int] = {}
        self._subjects: dict[str, list[int]] = {}
        self._global_level = DEFAULT_LEVEL
        self._subject_levels: dict[str, str] = {}
        if self.path.exists():
            self._load(json.loads(self.path.read_text(encoding="utf-8")))
        elif not writable:
            raise FileNotFoundError(f"no registry file {self.path}")

    def _load(self, data: dict) -> None:
        for entry in data.get("schemas", []):
            schema_id, schema = int(entry["id"]), entry["schema"]
            self._raw[schema_id] = schema
            self._parsed[schema_id] = parse(schema)
            self._ids_by_identity.setdefault(normalize(self._parsed[schema_id]), schema_id)
        for subject, ids in data.get("subjects", {}).items():
            unknown = [i for i in ids if i not in self._raw]
            if unknown:
                raise ValueError(f"{self.path}: subject {subject!r} refers to unknown ids {unknown}")
            self._subjects[subject] = list(ids)
        levels = data.get("compatibility", {})
        try:
            self._global_level = check_level(levels.get("global", DEFAULT_LEVEL))
            self._subject_levels = {s: check_level(v) for s, v in levels.get("subjects", {}).items()}
        except InvalidLevel as err:
            raise ValueError(f"{self.path}: {err}") from None

    def register(self, subject: str, schema: SchemaLike) -> int:
        identity = normalize(schema)
        with self._lock:
            schema_id = self._ids_by_identity.get(identity)
            if schema_id is not None and schema_id in self._subjects.get(subject, ()):
                return schema_id
            if not self.writable:
                raise RegistryReadOnly(
                    f"schema not registered under subject {subject!r} and {self.path.name} is read-only"
                )
            found = self.compatibility_problems(subject, schema)
            if found:
                level = self.compatibility(subject)
                raise IncompatibleEvolution(_incompatible_message(subject, level, found), found)
            if schema_id is None:
                schema_id = max(self._raw, default=0) + 1
                self._raw[schema_id] = plain_schema(schema)
                self._parsed[schema_id] = parse(schema)
                self._ids_by_identity[identity] = schema_id
            self._subjects.setdefault(subject, []).append(schema_id)
            self._save()
            return schema_id

    def compatibility(self, subject: str | None = None, default_to_global: bool = True) -> str | None:
        if subject is None:
            return self._global_level
        own = self._subject_levels.get(subject)
        return own if own is not None or not default_to_global else self._global_level

    def set_compatibility(self, level: str, subject: str | None = None) -> str:
        level = _level(level)
        with self._lock:
            self._check_writable("compatibility level")
            if subject is None:
                self._global_level = level
            else:
                self._subject_levels[subject] = level
            self._save()
        return level

    def delete_compatibility(self, subject: str | None = None) -> str:
        with self._lock:
            self._check_writable("compatibility level")
            if subject is None:
                dropped, self._global_level = self._global_level, DEFAULT_LEVEL
            elif subject in self._subject_levels:
                dropped = self._subject_levels.pop(subject)
            else:
                raise SchemaNotFound(f"subject {subject!r} has no compatibility level of its own")
            self._save()
        return dropped

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise RegistryReadOnly(f"{self.path.name} is read-only: its {what} cannot change")

    def _save(self) -> None:
        data = {
            "compatibility": {
                "global": self._global_level,
                "subjects": {s: self._subject_levels[s] for s in sorted(self._subject_levels)},
            },
            "schemas": [{"id": i, "schema": self._raw[i]} for i in sorted(self._raw)],
            "subjects": {s: self._subjects[s] for s in sorted(self._subjects)},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
                out.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def get_schema(self, schema_id: int) -> Any:
        try:
            return self._parsed[schema_id]
        except KeyError:
            raise SchemaNotFound(f"no schema with id {schema_id}") from None

    def get_schema_json(self, schema_id: int) -> Any:
        """The schema with this id exactly as it was registered (for serving it)."""
        try:
            return self._raw[schema_id]
        except KeyError:
            raise SchemaNotFound(f"no schema with id {schema_id}") from None

    def latest(self, subject: str) -> tuple[int, Any]:
        ids = self.versions(subject)
        return ids[-1], self._parsed[ids[-1]]

    def subjects(self) -> list[str]:
        return sorted(self._subjects)

    def versions(self, subject: str) -> list[int]:
        try:
            return list(self._subjects[subject])
        except KeyError:
            raise SchemaNotFound(f"no subject {subject!r}") from None

    def lookup(self, subject: str, schema: SchemaLike) -> int:
        schema_id = self._ids_by_identity.get(normalize(schema))
        if schema_id is None or schema_id not in self._subjects.get(subject, ()):
            raise SchemaNotFound(f"schema not registered under subject {subject!r}")
        return schema_id


class ConfluentSchemaRegistry(SchemaRegistry):
    """Client for the Confluent Schema Registry REST API (Avro only), on urllib.

    ``url`` may ask for TLS and basic authentication without holding the
    password: ``https://USER@HOST:PORT?cafile=CA&password_file=PATH``
    (transforms/connections.py ``http_settings``).

    Schemas by id are cached forever (ids are immutable); registrations are
    cached per subject and schema; ``latest`` always asks the server.
    """

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._schemas: dict[int, Any] = {}
        self._registered: dict[tuple[str, str], int] = {}

    def __getstate__(self):
        # Caches are rebuilt on the other side of a pickle.
        return {"url": self.url, "timeout_s": self.timeout_s}

    def __setstate__(self, state):
        self.__init__(**state)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        from ..transforms.connections import http_settings

        base, context, auth = http_settings(self.url)
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            f"{base.rstrip('/')}/{path}",
            data=data,
            method=method,
            headers={"Accept": CONFLUENT_CONTENT_TYPE, "Content-Type": CONFLUENT_CONTENT_TYPE, **auth},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read() or b"{}")
            except ValueError:
                payload = {}
            code = payload.get("error_code", err.code) if isinstance(payload, dict) else err.code
            message = payload.get("message", err.reason) if isinstance(payload, dict) else err.reason
            text = f"{method} {path}: HTTP {err.code} (error_code {code}): {message}"
            if err.code in (401, 403):
                raise RegistryError(text) from None
            if err.code == 404:
                raise SchemaNotFound(text) from None
            if err.code == 409:
                raise IncompatibleEvolution(text) from None
            if err.code == 422 and code == 42203:
                raise InvalidCompatibilityLevel(text) from None
            if err.code == 422 and code == 42205:
                raise RegistryReadOnly(text) from None
            if err.code == 422 and str(code).startswith("422"):
                raise InvalidSchema(text) from None
            if err.code >= 500 or err.code == 429:
                raise RegistryUnavailable(text) from None
            raise RegistryError(text) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
            raise RegistryUnavailable(f"{method} {path}: {type(err).__name__}: {err}") from None

    @staticmethod
    def _quote(subject: str) -> str:
        return urllib.parse.quote(subject, safe="")

    @staticmethod
    def _parse_response_schema(payload: dict) -> Any:
        schema_type = payload.get("schemaType", "AVRO")
        if schema_type != "AVRO":
            raise InvalidSchema(f"schema is {schema_type}, not AVRO")
        return parse(payload["schema"])

    def register(self, subject: str, schema: SchemaLike) -> int:
        identity = normalize(schema)
        schema_id = self._registered.get((subject, identity))
        if schema_id is None:
            body = {"schema": json.dumps(plain_schema(schema))}
            schema_id = int(self._request("POST", f"subjects/{self._quote(subject)}/versions", body)["id"])
            self._registered[(subject, identity)] = schema_id
        return schema_id

    def get_schema(self, schema_id: int) -> Any:
        schema = self._schemas.get(schema_id)
        if schema is None:
            schema = self._parse_response_schema(self._request("GET", f"schemas/ids/{int(schema_id)}"))
            self._schemas[schema_id] = schema
        return schema

    def latest(self, subject: str) -> tuple[int, Any]:
        payload = self._request("GET", f"subjects/{self._quote(subject)}/versions/latest")
        schema_id = int(payload["id"])
        schema = self._schemas.get(schema_id)
        if schema is None:
            schema = self._schemas[schema_id] = self._parse_response_schema(payload)
        return schema_id, schema

    def subjects(self) -> list[str]:
        return sorted(self._request("GET", "subjects"))

    def versions(self, subject: str) -> list[int]:
        quoted = self._quote(subject)
        numbers = sorted(self._request("GET", f"subjects/{quoted}/versions"))
        return [int(self._request("GET", f"subjects/{quoted}/versions/{n}")["id"]) for n in numbers]

    def lookup(self, subject: str, schema: SchemaLike) -> int:
        body = {"schema": json.dumps(plain_schema(schema))}
        return int(self._request("POST", f"subjects/{self._quote(subject)}", body)["id"])

    def compatibility(self, subject: str | None = None, default_to_global: bool = True) -> str | None:
        if subject is None:
            return self._request("GET", "config")["compatibilityLevel"]
        path = f"config/{self._quote(subject)}" + ("?defaultToGlobal=true" if default_to_global else "")
        try:
            return self._request("GET", path)["compatibilityLevel"]
        except SchemaNotFound:
            # 40408 (older registries: 40401): the subject has no level of its own.
            if default_to_global:
                raise
            return None

    def set_compatibility(self, level: str, subject: str | None = None) -> str:
        path = "config" if subject is None else f"config/{self._quote(subject)}"
        return self._request("PUT", path, {"compatibility": _level(level)})["compatibility"]

    def delete_compatibility(self, subject: str | None = None) -> str:
        path = "config" if subject is None else f"config/{self._quote(subject)}"
        return self._request("DELETE", path)["compatibilityLevel"]

    def compatibility_problems(self, subject: str, schema: SchemaLike, version: int | None = None) -> list[str]:
        path = f"compatibility/subjects/{self._quote(subject)}/versions"
        if version is not None:
            path += f"/{int(version)}"
        body = {"schema": json.dumps(plain_schema(parse(schema)))}
        try:
            answer = self._request("POST", path + "?verbose=true", body)
        except SchemaNotFound:
            if version is None:  # a subject without versions has nothing to break
                return []
            raise
        if answer.get("is_compatible"):
            return []
        return [str(m) for m in answer.get("messages") or ()] or ["incompatible (the registry gave no details)"]


def registry_from_url(url: str | None = None, writable: bool = False) -> SchemaRegistry:
    """A registry for a URL: None -> the shipped file registry; ``http(s)://`` ->
    Confluent REST client; ``file:///path`` or a bare path -> file registry."""
    if url is None or url == "":
        return default_registry() if not writable else FileSchemaRegistry(REGISTRY_FILE, writable=True)
    if url.startswith(("http://", "https://")):
        return ConfluentSchemaRegistry(url)
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        return FileSchemaRegistry(urllib.parse.unquote(parsed.netloc + parsed.path), writable=writable)
    if "://" in url:
        raise ValueError(f"unsupported registry URL scheme: {url.split('://', 1)[0]}")
    return FileSchemaRegistry(url, writable=writable)


__all__ = [
    "ConfluentSchemaRegistry",
    "FileSchemaRegistry",
    "IncompatibleEvolution",
    "InvalidCompatibilityLevel",
    "InvalidSchema",
    "RegistryError",
    "RegistryReadOnly",
    "RegistryUnavailable",
    "SchemaNotFound",
    "SchemaRegistry",
    "normalize",
    "parse",
    "plain_schema",
    "registry_from_url",
]
