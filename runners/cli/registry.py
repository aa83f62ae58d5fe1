"""``onboardflow registry``: inspect and govern the schema registry, and serve it to Confluent clients.

    onboardflow registry list [--registry URL]
    onboardflow registry register SUBJECT SCHEMA.avsc [--registry URL]
    onboardflow registry config [SUBJECT] [--set LEVEL | --delete] [--registry URL]
    onboardflow registry check SUBJECT SCHEMA.avsc [--version N] [--registry URL]
    onboardflow registry serve [--registry PATH] [--host 127.0.0.1] [--port 8081] [--writable]
                               [--tls-cert PEM --tls-key PEM] [--users-file PATH]
    onboardflow registry user NAME --role read|write --users-file PATH [--password-file PATH]

``serve --tls-cert/--tls-key`` serves HTTPS; ``--users-file`` requires HTTP
basic authentication of the users ``registry user`` adds, in two roles
(runners/cli/registry_access.py: ``read`` looks up and tests, ``write`` also
registers and sets levels; 401 / 403 otherwise). Clients name the CA and the
password file in the URL: ``https://USER@HOST:PORT?cafile=CA&password_file=PATH``.

``--registry`` is a file path or an ``http(s)://`` Confluent-compatible
registry (the shipped ``schemas/registry.json`` by default); every command
goes through the same registry classes (schemas/schema_registry.py).
``config`` prints the global level, or a subject's level (marked
``(global default)`` when it has none of its own), or sets / deletes it.
``check`` prints whether the schema file may be registered as the subject's
next version (exit 0) or why not (exit 1; 2 for an unusable schema file).

``serve`` puts a file registry (by default the shipped one, read-only) behind
the subset of the Confluent Schema Registry REST API that serializers,
deserializers, ``SchemaRegistryClient`` and the ``ConfluentSchemaRegistry``
client use, so any Confluent-compatible producer can write to our topics
without a Confluent install:

    GET  /subjects                               GET  /schemas/ids/{id}
    GET  /subjects/{subject}/versions            GET  /schemas/ids/{id}/schema
    GET  /subjects/{subject}/versions/{v|latest} GET  /schemas/ids/{id}/subjects
    GET  /subjects/{subject}/versions/{v}/schema GET  /schemas/ids/{id}/versions
    POST /subjects/{subject}/versions (register) GET  /schemas/types
    POST /subjects/{subject}          (lookup)
    GET|PUT|DELETE /config                       {"compatibility": LEVEL} in, {"compatibilityLevel": LEVEL} out
    GET|PUT|DELETE /config/{subject}             GET takes ?defaultToGlobal=true
    POST /compatibility/subjects/{subject}/versions[/{v|latest}][?verbose=true]   {"is_compatible": bool}

Registering a schema the subject already holds returns its id. A new one
must pass the subject's compatibility level (global default BACKWARD), or it
is refused with HTTP 409, error code 409, naming what breaks. In a read-only
registry (no ``--writable``) new schemas and level changes are refused (422,
error code 42205, as Confluent does in read-only mode); ``--writable``
appends them to the registry file. Other Confluent error codes: 40401
subject, 40402 version, 40403 schema not found; 40408 subject has no level of
its own; 42201 invalid schema; 42202 invalid version; 42203 invalid level.
Left out: deleting subjects or versions, modes, contexts, references,
non-Avro schema types, normalization.
"""
from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from ...schemas import REGISTRY_FILE
from ...schemas.compatibility import LEVELS
from ...schemas.schema_registry import (
    CONFLUENT_CONTENT_TYPE,
    FileSchemaRegistry,
    IncompatibleEvolution,
    InvalidCompatibilityLevel,
    InvalidSchema,
    RegistryError,
    RegistryReadOnly,
    SchemaNotFound,
    SchemaRegistry,
    registry_from_url,
)
from .registry_access import ROLES, RegistryUsers, add_user

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

# Confluent error codes.
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
SUBJECT_LEVEL_NOT_CONFIGURED = 40408
INCOMPATIBLE_SCHEMA = 409
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INVALID_COMPATIBILITY_LEVEL = 42203
OPERATION_NOT_PERMITTED = 42205

INVALID_LEVEL_MESSAGE = f"Invalid compatibility level. Valid values are {', '.join(LEVELS)}"


class _ApiError(Exception):
    def __init__(self, status: int, error_code: int, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


class _ConfluentApi:
    """The REST routes, on top of any SchemaRegistry."""

    def __init__(self, registry: SchemaRegistry):
        self.registry = registry

    def schema_text(self, schema_id: int) -> str:
        return json.dumps(self.registry.get_schema_json(schema_id), separators=(",", ":"))

    def _schema_by_id(self, raw_id: str) -> int:
        try:
            schema_id = int(raw_id)
            self.registry.get_schema(schema_id)
        except (ValueError, SchemaNotFound):
            raise _ApiError(404, SCHEMA_NOT_FOUND, "Schema not found") from None
        return schema_id

    def _versions(self, subject: str) -> list[int]:
        try:
            return self.registry.versions(subject)
        except SchemaNotFound:
            raise _ApiError(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.") from None

    def _version(self, subject: str, raw_version: str) -> tuple[int, int]:
        ids = self._versions(subject)
        if raw_version in ("latest", "-1"):
            return len(ids), ids[-1]
        try:
            version = int(raw_version)
        except ValueError:
            raise _ApiError(422, INVALID_VERSION, f"Invalid version {raw_version!r}") from None
        if not 1 <= version <= len(ids):
            raise _ApiError(404, VERSION_NOT_FOUND, f"Version {version} not found.")
        return version, ids[version - 1]

    def _subject_version(self, subject: str, version: int, schema_id: int) -> dict:
        return {"subject": subject, "version": version, "id": schema_id, "schema": self.schema_text(schema_id)}

    @staticmethod
    def _schema_from_body(body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise _ApiError(422, INVALID_SCHEMA, "Request body must be an object with a 'schema' string")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise _ApiError(422, INVALID_SCHEMA, "Only AVRO schemas are supported")
        if body.get("references"):
            raise _ApiError(422, INVALID_SCHEMA, "Schema references are not supported")
        return body["schema"]

    @staticmethod
    def _flag(query: dict[str, list[str]], name: str) -> bool:
        return query.get(name, ["false"])[-1].strip().lower() == "true"

    def _compatibility(self, subject: str, raw_version: str | None, body: Any, verbose: bool) -> dict:
        schema = self._schema_from_body(body)
        version = None
        if raw_version is not None:
            try:
                self.registry.versions(subject)
            except SchemaNotFound:
                if raw_version in ("latest", "-1"):  # nothing registered: nothing to break
                    return {"is_compatible": True, **({"messages": []} if verbose else {})}
                raise _ApiError(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.") from None
            version = self._version(subject, raw_version)[0]
        try:
            found = self.registry.compatibility_problems(subject, schema, version)
        except InvalidSchema as err:
            raise _ApiError(422, INVALID_SCHEMA, str(err)) from None
        return {"is_compatible": not found, **({"messages": found} if verbose else {})}

    def _set_level(self, body: Any, subject: str | None) -> dict:
        # Confluent's clients send "compatibility"; its newer config objects "compatibilityLevel".
        level = body.get("compatibility", body.get("compatibilityLevel")) if isinstance(body, dict) else None
        try:
            return {"compatibility": self.registry.set_compatibility(level, subject)}
        except InvalidCompatibilityLevel:
            raise _ApiError(422, INVALID_COMPATIBILITY_LEVEL, INVALID_LEVEL_MESSAGE) from None
        except RegistryReadOnly as err:
            raise _ApiError(422, OPERATION_NOT_PERMITTED, str(err)) from None

    def _delete_level(self, subject: str | None) -> dict:
        try:
            return {"compatibilityLevel": self.registry.delete_compatibility(subject)}
        except RegistryReadOnly as err:
            raise _ApiError(422, OPERATION_NOT_PERMITTED, str(err)) from None
        except SchemaNotFound:
            raise _ApiError(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.") from None

    def get(self, parts: list[str], query: dict[str, list[str]]) -> Any:
        match parts:
            case []:
                return {}
            case ["subjects"]:
                return self.registry.subjects()
            case ["subjects", subject, "versions"]:
                return list(range(1, len(self._versions(subject)) + 1))
            case ["subjects", subject, "versions", version]:
                return self._subject_version(subject, *self._version(subject, version))
            case ["subjects", subject, "versions", version, "schema"]:
                return json.loads(self.schema_text(self._version(subject, version)[1]))
            case ["schemas", "types"]:
                return ["AVRO"]
            case ["schemas", "ids", raw_id]:
                return {"schema": self.schema_text(self._schema_by_id(raw_id))}
            case ["schemas", "ids", raw_id, "schema"]:
                return json.loads(self.schema_text(self._schema_by_id(raw_id)))
            case ["schemas", "ids", raw_id, "subjects"]:
                schema_id = self._schema_by_id(raw_id)
                return [s for s in self.registry.subjects() if schema_id in self.registry.versions(s)]
            case ["schemas", "ids", raw_id, "versions"]:
                schema_id = self._schema_by_id(raw_id)
                return [
                    {"subject": s, "version": i + 1}
                    for s in self.registry.subjects()
                    for i, sid in enumerate(self.registry.versions(s))
                    if sid == schema_id
                ]
            case ["config"]:
                return {"compatibilityLevel": self.registry.compatibility()}
            case ["config", subject]:
                level = self.registry.compatibility(subject, default_to_global=self._flag(query, "defaultToGlobal"))
                if level is None:
                    raise _ApiError(404, SUBJECT_LEVEL_NOT_CONFIGURED,
                                    f"Subject '{subject}' does not have subject-level compatibility configured")
                return {"compatibilityLevel": level}
        raise _ApiError(404, 404, "Not found")

    def put(self, parts: list[str], body: Any) -> Any:
        match parts:
            case ["config"]:
                return self._set_level(body, None)
            case ["config", subject]:
                return self._set_level(body, subject)
        raise _ApiError(404, 404, "Not found")

    def delete(self, parts: list[str]) -> Any:
        match parts:
            case ["config"]:
                return self._delete_level(None)
            case ["config", subject]:
                return self._delete_level(subject)
        raise _ApiError(404, 404, "Not found")

    def post(self, parts: list[str], body: Any, query: dict[str, list[str]]) -> Any:
        match parts:
            case ["compatibility", "subjects", subject, "versions"]:
                return self._compatibility(subject, None, body, self._flag(query, "verbose"))
            case ["compatibility", "subjects", subject, "versions", version]:
                return self._compatibility(subject, version, body, self._flag(query, "verbose"))
            case ["subjects", subject, "versions"]:
                schema = self._schema_from_body(body)
                try:
                    return {"id": self.registry.register(subject, schema)}
                except InvalidSchema as err:
                    raise _ApiError(422, INVALID_SCHEMA, str(err)) from None
                except RegistryReadOnly as err:
                    raise _ApiError(422, OPERATION_NOT_PERMITTED, str(err)) from None
                except IncompatibleEvolution as err:
                    raise _ApiError(409, INCOMPATIBLE_SCHEMA, str(err)) from None
            case ["subjects", subject]:
                schema = self._schema_from_body(body)
                versions = self._versions(subject)
                try:
                    schema_id = self.registry.lookup(subject, schema)
                except InvalidSchema as err:
                    raise _ApiError(422, INVALID_SCHEMA, str(err)) from None
                except SchemaNotFound:
                    raise _ApiError(404, SCHEMA_NOT_FOUND, "Schema not found") from None
                return self._subject_version(subject, versions.index(schema_id) + 1, schema_id)
        raise _ApiError(404, 404, "Not found")


def _handler_for(api: _ConfluentApi, users: Optional[RegistryUsers] = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "onboardflow-registry"

        def _parts(self) -> list[str]:
            path = urllib.parse.urlsplit(self.path).path
            return [urllib.parse.unquote(p) for p in path.split("/") if p]

        def _query(self) -> dict[str, list[str]]:
            return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", CONFLUENT_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, call) -> None:
            if users is not None:
                refused = users.check(self.command, self._parts(), self.headers.get("Authorization"))
                if refused is not None:
                    status, code, message = refused
                    data = json.dumps({"error_code": code, "message": message}).encode("utf-8")
                    self.send_response(status)
                    if status == 401:
                        self.send_header("WWW-Authenticate", 'Basic realm="onboardflow-registry"')
                    self.send_header("Content-Type", CONFLUENT_CONTENT_TYPE)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
            try:
                self._reply(200, call())
            except _ApiError as err:
                self._reply(err.status, {"error_code": err.error_code, "message": err.message})
            except Exception:  # noqa: BLE001 - one bad request must not kill the server
                log.exception("registry request failed: %s %s", self.command, self.path)
                self._reply(500, {"error_code": 50001, "message": "Internal server error"})

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._serve(lambda: api.get(self._parts(), self._query()))

        def _with_body(self, route) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                self._reply(413, {"error_code": 413, "message": "Request body too large"})
                return
            raw = self.rfile.read(length)

            def call():
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    raise _ApiError(400, 400, "Request body is not JSON") from None
                return route(body)

            self._serve(call)

        def do_POST(self) -> None:  # noqa: N802
            self._with_body(lambda body: api.post(self._parts(), body, self._query()))

        def do_PUT(self) -> None:  # noqa: N802
            self._with_body(lambda body: api.put(self._parts(), body))

        def do_DELETE(self) -> None:  # noqa: N802
            self._with_body(lambda _body: api.delete(self._parts()))

        def do_PATCH(self) -> None:  # noqa: N802
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error_code": 405, "message": "Method not allowed"})

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server signature
            log.debug("%s - %s", self.address_string(), format % args)

    return Handler


class RegistryServer:
    """A SchemaRegistry served over the Confluent REST subset, on a thread or in the foreground.

    ``port=0`` picks a free port; ``url`` tells which.
    """

    def __init__(self, registry: SchemaRegistry, host: str = "127.0.0.1", port: int = 8081,
                 tls: Optional[tuple[str, str]] = None, users: Optional[RegistryUsers] = None):
        self.registry = registry
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(_ConfluentApi(registry), users))
        self._httpd.daemon_threads = True
        self._tls = tls is not None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    def start(self) -> "RegistryServer":
        # A short poll interval keeps stop() (and test teardown) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="registry-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "RegistryServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _record_name(schema: Any) -> str:
    return schema.get("name", schema.get("type", "?")) if isinstance(schema, dict) else str(schema)


def _list(args: argparse.Namespace) -> int:
    registry = registry_from_url(args.registry)
    print(f"{'subject':<56} {'version':>7} {'id':>4}  record")
    for subject in registry.subjects():
        for version, schema_id in enumerate(registry.versions(subject), start=1):
            name = _record_name(registry.get_schema(schema_id))
            print(f"{subject:<56} {version:>7} {schema_id:>4}  {name}")
    return 0


def _register(args: argparse.Namespace) -> int:
    registry = registry_from_url(args.registry, writable=True)
    with open(args.schema_file, encoding="utf-8") as f:
        schema = f.read()
    try:
        print(registry.register(args.subject, schema))
    except RegistryError as err:  # incompatible, invalid, read-only
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _config(args: argparse.Namespace) -> int:
    changing = args.set is not None or args.delete
    registry = registry_from_url(args.registry, writable=changing)
    scope = args.subject or "global"
    try:
        if args.set is not None:
            print(f"{scope}: {registry.set_compatibility(args.set, args.subject)}")
        elif args.delete:
            dropped = registry.delete_compatibility(args.subject)
            now = registry.compatibility(args.subject)
            print(f"{scope}: {now} (was {dropped})")
        elif args.subject is None:
            print(f"global: {registry.compatibility()}")
        else:
            own = registry.compatibility(args.subject, default_to_global=False)
            level = own if own is not None else f"{registry.compatibility()} (global default)"
            print(f"{scope}: {level}")
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    registry = registry_from_url(args.registry)
    try:
        with open(args.schema_file, encoding="utf-8") as f:
            schema = f.read()
        level = registry.compatibility(args.subject)
        found = registry.compatibility_problems(args.subject, schema, args.version)
    except OSError as err:
        print(f"error: {args.schema_file}: {err}", file=sys.stderr)
        return 2
    except RegistryError as err:  # an invalid schema, an unknown version, an unreachable registry
        print(f"error: {err}", file=sys.stderr)
        return 2
    against = f"version {args.version}" if args.version is not None else "its earlier versions"
    if found:
        print(f"{args.schema_file} is incompatible with {args.subject} at {level} ({against}):")
        for problem in found:
            print(f"  {problem}")
        return 1
    print(f"{args.schema_file} is compatible with {args.subject} at {level} ({against})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    registry = FileSchemaRegistry(args.registry or REGISTRY_FILE, writable=args.writable)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = RegistryServer(registry, host=args.host, port=args.port, tls=tls,
                            users=RegistryUsers(args.users_file) if args.users_file else None)
    mode = ("writable" if args.writable else "read-only") + (", users " + args.users_file if args.users_file else "")
    print(f"serving {registry.path} ({mode}) at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _user(args: argparse.Namespace) -> int:
    from pathlib import Path

    source = open(args.password_file, encoding="utf-8") if args.password_file else sys.stdin
    with source:
        password = source.readline().rstrip("\r\n")
    try:
        add_user(Path(args.users_file), args.name, args.role, password)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {args.role} in {args.users_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onboardflow registry", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    list_cmd = commands.add_parser("list", help="subjects, versions and schema ids")
    list_cmd.add_argument("--registry", help="registry URL or path (default: the shipped registry.json)")
    list_cmd.set_defaults(run=_list)

    register_cmd = commands.add_parser("register", help="register a schema file under a subject; prints its id")
    register_cmd.add_argument("subject")
    register_cmd.add_argument("schema_file")
    register_cmd.add_argument("--registry", help="registry URL or path (default: the shipped registry.json)")
    register_cmd.set_defaults(run=_register)

    config_cmd = commands.add_parser("config", help="show or set the global or a subject's compatibility level")
    config_cmd.add_argument("subject", nargs="?", help="a subject (default: the global level)")
    change = config_cmd.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="LEVEL", help=f"one of {', '.join(LEVELS)}")
    change.add_argument("--delete", action="store_true",
                        help="drop the subject's own level (global: back to BACKWARD)")
    config_cmd.add_argument("--registry", help="registry URL or path (default: the shipped registry.json)")
    config_cmd.set_defaults(run=_config)

    check_cmd = commands.add_parser(
        "check", help="may a schema file be registered under a subject? exit 1 and the reasons if not")
    check_cmd.add_argument("subject")
    check_cmd.add_argument("schema_file")
    check_cmd.add_argument("--version", type=int, help="check against this version only (default: as registration)")
    check_cmd.add_argument("--registry", help="registry URL or path (default: the shipped registry.json)")
    check_cmd.set_defaults(run=_check)

    serve_cmd = commands.add_parser("serve", help="serve a file registry over the Confluent REST API")
    serve_cmd.add_argument("--registry", help="registry file (default: the shipped registry.json)")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8081)
    serve_cmd.add_argument("--writable", action="store_true", help="append newly registered schemas to the file")
    serve_cmd.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM; with --tls-key)")
    serve_cmd.add_argument("--tls-key", help="the certificate's private key (PEM)")
    serve_cmd.add_argument("--users-file", help="require HTTP basic auth of these users (`registry user` writes it)")
    serve_cmd.set_defaults(run=_serve)

    user_cmd = commands.add_parser("user", help="add or replace a user of `registry serve --users-file`")
    user_cmd.add_argument("name")
    user_cmd.add_argument("--role", choices=ROLES, required=True,
                          help="read: lookups and compatibility tests; write: also register and set levels")
    user_cmd.add_argument("--users-file", required=True)
    user_cmd.add_argument("--password-file", help="file holding the password (default: read from stdin)")
    user_cmd.set_defaults(run=_user)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``onboardflow registry ...``; ``argv`` excludes the word ``registry``."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
