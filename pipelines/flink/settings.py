"""``JobSettings``: what the launcher hands the Flink job, as one JSON file.

The launcher (runners/flink_job.py, ``onboardflow run --engine flink``)
parses the same flags as the Beam pipeline (pipelines/options.py) over the
deployment's settings, adds what it resolved (the bounded read's offset
ranges, its horizon, the job's parallelism), and writes them here; the job,
in the Flink virtualenv where Beam's option classes are not used, reads them
back. Attribute access by option name (``settings.redis_url``), so
pipelines/configuration.py builds the same core objects from it as from
Beam's options. The secret itself never travels: only ``secret_file`` or
``secret_env``.

Also here, free of PyFlink so unit tests read them: ``source_ddl`` (the
Kafka table the job reads) and ``flink_configuration`` (the job's Flink
settings: thread mode, RocksDB, checkpoints, restarts, savepoint).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

#: Settings the launcher adds to the options (the job's own).
JOB_FIELDS = {
    "job_name": "onboardflow",
    "parallelism": 1,
    # Kafka source and decoding; the launcher sets one per partition.
    "source_parallelism": 1,
    "learner_parallelism": 1,
    # {"topic": str, "start": {partition: offset}, "stop": {partition: offset}} per topic, or None (streaming)
    "bounded_ranges": None,
    "horizon_ms": None,
    "flush_size": 5000,
    "flush_interval_ms": 100,
    # The outbox relays are woken at most this often (the user stage's flushes ask at every tick).
    "relay_interval_ms": 1000,
    "connector_jars": [],
    "checkpoint_dir": None,
}


class JobSettings:
    """Read-only options by attribute; ``to_json`` / ``from_file`` round-trip them."""

    def __init__(self, values: Mapping[str, Any]):
        merged = dict(JOB_FIELDS)
        merged.update(values)
        object.__setattr__(self, "_values", merged)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no job setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("JobSettings are read-only")

    def __reduce__(self):
        return JobSettings, (self._values,)

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def replace(self, **changes: Any) -> "JobSettings":
        return JobSettings({**self._values, **changes})

    def to_json(self) -> str:
        return json.dumps(self._values, sort_keys=True, indent=1, default=str)

    @classmethod
    def from_file(cls, path: str | Path) -> "JobSettings":
        return cls(json.loads(Path(path).read_text()))

    def topics(self) -> list[str]:
        return [t.strip() for t in str(self.kafka_topics).split(",") if t.strip()]

    def streaming(self) -> bool:
        return self.bounded_ranges is None

    def __repr__(self) -> str:
        return f"JobSettings(job_name={self.job_name!r}, parallelism={self.parallelism})"


def horizon(settings: JobSettings) -> Optional[int]:
    value = settings.horizon_ms
    return None if value is None else int(value)


def _offsets(partitions: dict) -> str:
    return ";".join(f"partition:{p},offset:{o}" for p, o in sorted(partitions.items(), key=lambda kv: int(kv[0])))


#: Where flink-sql-connector-kafka keeps the Kafka client (it relocates ``org.apache.kafka``).
SHADED_KAFKA = "org.apache.flink.kafka.shaded.org.apache.kafka"
_LOGIN_MODULES = {"PLAIN": "common.security.plain.PlainLoginModule",
                  "SCRAM-SHA-256": "common.security.scram.ScramLoginModule",
                  "SCRAM-SHA-512": "common.security.scram.ScramLoginModule"}
_KAFKA_USER = re.compile(r"[A-Za-z0-9._@+=-]+")


def flink_kafka_properties(bootstrap: str) -> dict[str, str]:
    """The Kafka connector's ``properties.*`` table options for a bootstrap setting (transforms/connections.py).

    ``host:port`` -> ``{"properties.bootstrap.servers": "host:port"}``. A
    secured URL adds the protocol, the CA as a PEM truststore and, for SASL,
    a JAAS line whose password is a Kafka config-provider reference, resolved
    by the Kafka client inside the TaskManager: ``${dir:DIR:FILE}`` (the
    ``password_file``, read byte for byte: it must not end in a newline) or
    ``${env:VAR}`` (``password_env``, a variable of the TaskManagers'
    environment). The password is never read here, so it is in no table
    option, plan, log or web UI page (docs/security.md "Transport and credentials").

    Raises ``ValueError`` for what the connector cannot take: a client
    certificate, a mechanism other than PLAIN/SCRAM, a password file ending in
    whitespace.
    """
    from ...transforms.connections import parse_kafka_bootstrap, redact

    endpoint = parse_kafka_bootstrap(bootstrap)
    options = {"properties.bootstrap.servers": endpoint.servers}
    if endpoint.protocol == "PLAINTEXT":
        return options
    where = redact(bootstrap.partition("?")[0])
    tls = dict(endpoint.tls)
    if "ssl_certfile" in tls or "ssl_keyfile" in tls:
        raise ValueError(f"Kafka bootstrap {where!r}: the Flink runner does not present client certificates; "
                         "authenticate with SASL (sasl_ssl://USER@...) (docs/security.md)")
    options["properties.security.protocol"] = endpoint.protocol
    if "ssl_cafile" in tls:
        options.update({"properties.ssl.truststore.type": "PEM",
                        "properties.ssl.truststore.location": str(Path(tls["ssl_cafile"]).resolve())})
    if not endpoint.sasl:
        return options
    module = _LOGIN_MODULES.get(endpoint.sasl_mechanism.upper())
    if module is None:
        raise ValueError(f"Kafka bootstrap {where!r}: the Flink runner authenticates with "
                         f"{', '.join(_LOGIN_MODULES)}, not {endpoint.sasl_mechanism}")
    if not _KAFKA_USER.fullmatch(endpoint.user):
        raise ValueError(f"Kafka bootstrap {where!r}: a user name the JAAS line can quote "
                         "(letters, digits and ._@+=-)")
    if endpoint.password_file:
        path = Path(endpoint.password_file).resolve()
        _check_password_file(path, where)
        provider, reference = "dir", f"${{dir:{path.parent}:{path.name}}}"
    else:
        provider, reference = "env", f"${{env:{endpoint.password_env}}}"
    provider_class = {"dir": "DirectoryConfigProvider", "env": "EnvVarConfigProvider"}[provider]
    options.update({
        "properties.sasl.mechanism": endpoint.sasl_mechanism.upper(),
        "properties.sasl.jaas.config": f'{SHADED_KAFKA}.{module} required username="{endpoint.user}" '
                                       f'password="{reference}";',
        "properties.config.providers": provider,
        f"properties.config.providers.{provider}.class": f"{SHADED_KAFKA}.common.config.provider.{provider_class}",
    })
    return options


def _check_password_file(path: Path, where: str) -> None:
    """The Kafka client reads the file whole; a trailing newline would become part of the password.

    Checked where the launcher runs (the local cluster's TaskManagers read the
    same file); a file only the TaskManagers can see is left to them.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ValueError(f"Kafka bootstrap {where!r}: password file {path}: {exc.strerror}") from None
    if not data.strip():
        raise ValueError(f"Kafka bootstrap {where!r}: password file {path} is empty")
    if data != data.rstrip():
        raise ValueError(f"Kafka bootstrap {where!r}: password file {path} ends in a newline or space, which the "
                         "Flink job's Kafka client would send as part of the password; write it without one "
                         "(printf %s \"$(cat FILE)\" > FILE)")


def source_ddl(s: JobSettings, table: str = "onboarding_events") -> str:
    """The 'kafka' table: raw bytes and the record's coordinates, read as the settings say."""
    options = {
        "connector": "kafka",
        "topic": ";".join(s.topics()),
        "properties.group.id": s.kafka_consumer_group,
        "properties.client.id.prefix": s.job_name,
        "key.format": "raw",
        "key.fields": "record_key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        # Offsets are committed to the group on each completed checkpoint.
        "properties.commit.offsets.on.checkpoint": "true",
        "properties.auto.offset.reset": "earliest",
        **flink_kafka_properties(s.kafka_bootstrap_servers),
    }
    ranges = s.bounded_ranges
    if ranges:
        if len(ranges) != 1:
            raise ValueError("a bounded Flink run reads one topic (the 'kafka' connector's specific offsets "
                             "name partitions, not topics)")
        (only,) = ranges
        options.update({"scan.startup.mode": "specific-offsets",
                        "scan.startup.specific-offsets": _offsets(only["start"]),
                        "scan.bounded.mode": "specific-offsets",
                        "scan.bounded.specific-offsets": _offsets(only["stop"]),
                        # The partitions are fixed: one discovery. (A restored bounded enumerator then
                        # needs runners/flink/connectors/FLINK-31006.patch to finish: docs/flink.md.)
                        "scan.topic-partition-discovery.interval": "0"})
    else:
        options["scan.startup.mode"] = {"earliest": "earliest-offset", "latest": "latest-offset",
                                        "committed": "group-offsets"}.get(s.kafka_start_position, "group-offsets")
    settings = ",\n  ".join(f"'{k}' = '{_quoted(v)}'" for k, v in options.items())
    return f"""CREATE TEMPORARY TABLE {table} (
  `record_key` BYTES,
  `value` BYTES,
  `topic` STRING METADATA VIRTUAL,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  `kafka_ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
) WITH (
  {settings}
)"""


def _quoted(value: object) -> str:
    """A string literal's body in Flink SQL: a quote doubled."""
    return str(value).replace("'", "''")


def flink_configuration(s: JobSettings) -> dict[str, str]:
    """The job's Flink configuration: thread mode, state, checkpoints, restarts (key -> value)."""
    values = {
        "python.execution-mode": "thread",
        "pipeline.name": s.job_name,
        "state.backend.type": s.get("state_backend") or "rocksdb",
        "state.backend.incremental": "true",
        "execution.checkpointing.interval": f"{int(s.get('checkpointing_interval') or 10_000)} ms",
        "execution.checkpointing.mode": s.get("checkpointing_mode") or "EXACTLY_ONCE",
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "restart-strategy.type": s.get("restart_strategy") or "fixed-delay",
        "restart-strategy.fixed-delay.attempts": str(s.get("restart_attempts") or 10),
        "restart-strategy.fixed-delay.delay": f"{int(s.get('restart_delay_ms') or 2000)} ms",
        # Bounded reads finish; keep checkpointing while other subtasks still run.
        "execution.checkpointing.checkpoints-after-tasks-finish": "true",
    }
    if s.get("checkpoint_timeout_millis"):
        values["execution.checkpointing.timeout"] = f"{int(s.checkpoint_timeout_millis)} ms"
    if s.get("checkpoint_dir"):
        values["execution.checkpointing.dir"] = s.checkpoint_dir
    if s.get("savepoint_path"):
        values["execution.state-recovery.path"] = s.savepoint_path
        values["execution.state-recovery.ignore-unclaimed-state"] = str(bool(
            s.get("allow_non_restored_state"))).lower()
    values.update(extra_configuration(s.get("flink_config") or ()))
    return {key: str(value) for key, value in values.items()}


def extra_configuration(pairs) -> dict[str, str]:
    """``--flink_config KEY=VALUE`` pairs as configuration (the last of a key wins); ``ValueError`` names a
    pair that is not ``KEY=VALUE``."""
    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--flink_config {pair!r}: expected KEY=VALUE, "
                             "e.g. execution.buffer-timeout.interval=10ms")
        out[key.strip()] = value.strip()
    return out
