"""The deployment every `onboardflow` command targets: one typed settings object.

A deployment is the Kafka cluster, schema registry, Redis and PostgreSQL the
pipeline runs against, plus the names it uses inside them (topics, consumer
group, Redis key prefix, warehouse schema). ``Settings.load()`` reads it once
from ``OBF_*`` environment variables (each field's docstring names its
variable); what the environment leaves out comes from the endpoints
``make services-up`` wrote to ``$OBF_RUN_DIR/services.env``, then from the
defaults below (the local services on their usual ports). Every CLI command
takes its defaults from ``settings()``, so ``onboardflow demo``, ``run``,
``train``, ``profile``, ``models``, ``lag`` and ``outbox`` all see the same
data unless a flag says otherwise.

The names inside the services derive from one deployment name
(``OBF_DEPLOYMENT``, see ``deployment_names``). ``pipeline_flags()`` is the one
place these settings become the pipeline's Beam options.

No Beam import here: ``onboardflow --help`` and the services stay fast.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from . import paths

DEFAULT_DEPLOYMENT = "onboarding"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_WAREHOUSE_DSN = "postgresql://onboardflow:onboardflow@127.0.0.1:5432/onboardflow"
#: What `make services-up` writes into the run directory: the endpoints it started.
SERVICES_ENV = "services.env"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,40}")


def deployment_names(deployment: str) -> dict[str, str]:
    """The names one deployment uses inside the services, derived from its name.

    The default deployment (``onboarding``) keeps the names the pipeline has
    always used: topics ``onboarding.events``, ``onboarding.events.dlq``,
    ``onboarding.segment-changes``, ``onboarding.model-events``, consumer group
    ``onboardflow``, Redis prefix ``obf`` (docs/redis-contract.md) and warehouse
    schema ``warehouse``. Any other name N gets ``N.events`` (and ``.dlq``),
    ``N.segment-changes``, ``N.model-events``, group ``onboardflow-N``, prefix
    ``N`` and schema N (``-`` as ``_``), so two deployments on one set of
    services never share data.
    """
    if not _NAME.fullmatch(deployment):
        raise ValueError(f"deployment name {deployment!r}: lower-case letters, digits, '-' and '_', "
                         "starting with a letter (at most 41)")
    default = deployment == DEFAULT_DEPLOYMENT
    return {
        "events_topic": f"{deployment}.events",
        "dead_letter_topic": f"{deployment}.events.dlq",
        "segment_changes_topic": f"{deployment}.segment-changes",
        "model_events_topic": f"{deployment}.model-events",
        "consumer_group": "onboardflow" if default else f"onboardflow-{deployment}",
        "redis_key_prefix": "obf" if default else deployment,
        "warehouse_schema": "warehouse" if default else deployment.replace("-", "_"),
    }


@dataclasses.dataclass(frozen=True)
class Settings:
    """One deployment: where the services are and which names the pipeline uses in them."""

    deployment: str = DEFAULT_DEPLOYMENT
    """``OBF_DEPLOYMENT``: the deployment's name; the names below derive from it (``deployment_names``)."""
    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    """``OBF_KAFKA_BOOTSTRAP``: Kafka bootstrap servers, ``host:port[,host:port...]``, as the pipeline's
    identity. Secured: ``sasl_ssl://USER@HOST:PORT?ssl_cafile=CA&password_file=PATH`` (transforms/connections.py)."""
    kafka_producer_bootstrap: Optional[str] = None
    """``OBF_KAFKA_PRODUCER_BOOTSTRAP``: Kafka as the event sources' identity, which writes the events and
    erasure-request topics (`onboardflow produce`, the demo's generator); unset: ``kafka_bootstrap``."""
    schema_registry_url: Optional[str] = None
    """``OBF_SCHEMA_REGISTRY_URL``: a Confluent-compatible registry's URL, or a registry JSON file;
    unset: the registry shipped in schemas/registry.json."""
    redis_url: str = DEFAULT_REDIS_URL
    """``OBF_REDIS_URL``: the Redis profile store and model registry serving copy. Secured:
    ``rediss://USER@HOST:PORT/0?ssl_ca_certs=CA&password_file=PATH`` (transforms/connections.py)."""
    warehouse_dsn: str = DEFAULT_WAREHOUSE_DSN
    """``OBF_WAREHOUSE_DSN``: the PostgreSQL warehouse (libpq URL) as the pipeline's role; never printed
    whole. Secured: ``sslmode=verify-full&sslrootcert=CA&passfile=PGPASS`` and no password in it (docs/security.md)."""
    warehouse_owner_dsn: Optional[str] = None
    """``OBF_WAREHOUSE_OWNER_DSN``: the warehouse as the role that owns the schema, for
    `onboardflow warehouse migrate`; unset: ``warehouse_dsn`` (one role for everything)."""
    warehouse_pipeline_role: Optional[str] = None
    """``OBF_WAREHOUSE_PIPELINE_ROLE``: the pipeline's least-privilege role, granted its writes by each migrate."""
    warehouse_reader_role: Optional[str] = None
    """``OBF_WAREHOUSE_READER_ROLE``: the analysts' role, granted SELECT by each migrate."""
    events_topic: str = "onboarding.events"
    """``OBF_EVENTS_TOPIC``: the topic of onboarding events the pipeline reads."""
    dead_letter_topic: str = "onboarding.events.dlq"
    """``OBF_DEAD_LETTER_TOPIC``: raw records that could not be decoded or validated."""
    segment_changes_topic: str = "onboarding.segment-changes"
    """``OBF_SEGMENT_CHANGES_TOPIC``: SegmentChange records (entered/exited)."""
    model_events_topic: str = "onboarding.model-events"
    """``OBF_MODEL_EVENTS_TOPIC``: drift events of the online models."""
    consumer_group: str = "onboardflow"
    """``OBF_CONSUMER_GROUP``: the pipeline's Kafka consumer group (what `onboardflow lag` reads)."""
    redis_key_prefix: str = "obf"
    """``OBF_REDIS_KEY_PREFIX``: the prefix of every Redis key the deployment writes."""
    warehouse_schema: str = "warehouse"
    """``OBF_WAREHOUSE_SCHEMA``: the PostgreSQL schema of the warehouse tables and model registry."""
    secret_file: Optional[Path] = None
    """``OBF_SECRET_FILE``: the pseudonymization key file; unset: ``$OBF_RUN_DIR/keys/<deployment>.key``
    (what `onboardflow demo` writes), used only when it exists."""
    api_keys_file: Optional[Path] = None
    """``OBF_API_KEYS_FILE``: the hashed API keys of `onboardflow serve` (`onboardflow apikeys`); unset:
    ``$OBF_RUN_DIR/keys/<deployment>.apikeys.json`` (docs/api.md)."""
    run_dir: Path = dataclasses.field(default_factory=paths.run_dir)
    """``OBF_RUN_DIR``: what runs write (service data and logs, demo and train output); runners/paths.py."""
    cache_dir: Path = dataclasses.field(default_factory=paths.cache_dir)
    """``OBF_CACHE_DIR``: what is fetched or built once (Prism, Kafka, jars); runners/paths.py."""

    @property
    def producer_bootstrap(self) -> str:
        """Where event sources write: ``kafka_producer_bootstrap``, else ``kafka_bootstrap``."""
        return self.kafka_producer_bootstrap or self.kafka_bootstrap

    #: field -> environment variable (the one scheme: ``OBF_`` + the field's name in capitals).
    @staticmethod
    def variable(field: str) -> str:
        return "OBF_" + field.upper()

    @classmethod
    def load(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """The settings from ``environ`` (default ``os.environ``) over ``services.env`` over the defaults."""
        environ = os.environ if environ is None else environ
        run_dir = Path(environ["OBF_RUN_DIR"]) if environ.get("OBF_RUN_DIR") else paths.run_dir()
        cache_dir = Path(environ["OBF_CACHE_DIR"]) if environ.get("OBF_CACHE_DIR") else paths.cache_dir()
        values = {**read_services_env(run_dir / SERVICES_ENV),
                  **{k: v for k, v in environ.items() if k.startswith("OBF_") and v}}
        deployment = values.get("OBF_DEPLOYMENT", DEFAULT_DEPLOYMENT)
        fields: dict = {"deployment": deployment, "run_dir": run_dir, "cache_dir": cache_dir}
        for name, derived in deployment_names(deployment).items():
            fields[name] = values.get(cls.variable(name), derived)
        for name in ("kafka_bootstrap", "kafka_producer_bootstrap", "schema_registry_url", "redis_url",
                     "warehouse_dsn", "warehouse_owner_dsn",
                     "warehouse_pipeline_role", "warehouse_reader_role"):
            if cls.variable(name) in values:
                fields[name] = values[cls.variable(name)]
        for name in ("secret_file", "api_keys_file"):
            if values.get(cls.variable(name)):
                fields[name] = Path(values[cls.variable(name)])
        return cls(**fields)

    @property
    def key_file(self) -> Path:
        """The pseudonymization key file of this deployment (``secret_file`` or its default path)."""
        return self.secret_file or self.run_dir / "keys" / f"{self.deployment}.key"

    @property
    def api_keys_path(self) -> Path:
        """The API keys file of this deployment (``api_keys_file`` or its default path)."""
        return self.api_keys_file or self.run_dir / "keys" / f"{self.deployment}.apikeys.json"

    def pipeline_flags(self) -> list[str]:
        """These settings as the onboarding pipeline's Beam flags (pipelines/options.py and
        the Kafka source's options); flags given after them win."""
        flags = [
            f"--kafka_bootstrap_servers={self.kafka_bootstrap}",
            f"--kafka_topics={self.events_topic}",
            f"--kafka_consumer_group={self.consumer_group}",
            f"--dead_letter_topic={self.dead_letter_topic}",
            f"--segment_changes_topic={self.segment_changes_topic}",
            f"--model_events_topic={self.model_events_topic}",
            f"--redis_url={self.redis_url}",
            f"--redis_key_prefix={self.redis_key_prefix}",
            f"--warehouse_dsn={self.warehouse_dsn}",
            f"--warehouse_schema={self.warehouse_schema}",
        ]
        if self.schema_registry_url:
            flags.append(f"--registry_url={self.schema_registry_url}")
        return flags

    def describe(self) -> str:
        """One line naming the deployment (no password)."""
        redis = re.sub(r"//[^@/]*@", "//", self.redis_url)
        pg = re.sub(r"//[^@/]*@", "//", self.warehouse_dsn)
        return (f"deployment '{self.deployment}': Kafka {self.kafka_bootstrap} topic {self.events_topic} "
                f"(group {self.consumer_group}), Redis {redis} prefix '{self.redis_key_prefix}', "
                f"PostgreSQL {pg} schema '{self.warehouse_schema}'")


def read_services_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a services.env file (``#`` comments, optional quotes); {} when missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The process's settings, read once (``Settings.load()``)."""
    return Settings.load()


def add_store_flags(parser, deployment: "Settings") -> None:
    """``--redis-url``, ``--key-prefix``, ``--warehouse-dsn``, ``--warehouse-schema`` of ``parser``, defaulting
    to ``deployment``'s (the flags every command that reads the profile store and the warehouse takes)."""
    parser.add_argument("--redis-url", default=deployment.redis_url,
                        help="Redis URL (default: the deployment's, %(default)s)")
    parser.add_argument("--key-prefix", default=deployment.redis_key_prefix,
                        help="Redis key prefix (default: the deployment's, %(default)s)")
    parser.add_argument("--warehouse-dsn", default=deployment.warehouse_dsn,
                        help="PostgreSQL DSN (default: the deployment's, OBF_WAREHOUSE_DSN)")
    parser.add_argument("--warehouse-schema", default=deployment.warehouse_schema,
                        help="warehouse schema (default: the deployment's, %(default)s)")
