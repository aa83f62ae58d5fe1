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


def flink_kafka_bootstrap(bootstrap: str) -> str:
    """``bootstrap`` for the Flink Kafka connector's ``properties.bootstrap.servers``: plaintext only.

    A secured bootstrap (SASL/TLS, transforms/connections.py) is refused: the
    connector would need the password in its table options, which Flink shows
    in its plan, logs and web UI (docs/security.md "Transport and credentials").
    """
    from ...transforms.connections import kafka_is_secured, kafka_settings, redact

    if kafka_is_secured(bootstrap):
        where = redact(bootstrap.partition("?")[0])
        raise ValueError(f"Kafka bootstrap {where!r}: the Flink runner reads Kafka in plaintext only; "
                         "a secured (SASL/TLS) Kafka works with the Beam runners (docs/security.md)")
    return kafka_settings(bootstrap)[0]


def source_ddl(s: JobSettings, table: str = "onboarding_events") -> str:
    """The 'kafka' table: raw bytes and the record's coordinates, read as the settings say."""
    options = {
        "connector": "kafka",
        "topic": ";".join(s.topics()),
        "properties.bootstrap.servers": flink_kafka_bootstrap(s.kafka_bootstrap_servers),
        "properties.group.id": s.kafka_consumer_group,
        "properties.client.id.prefix": s.job_name,
        "key.format": "raw",
        "key.fields": "record_key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        # Offsets are committed to the group on each completed checkpoint.
        "properties.commit.offsets.on.checkpoint": "true",
        "properties.auto.offset.reset": "earliest",
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
    settings = ",\n  ".join(f"'{k}' = '{v}'" for k, v in options.items())
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
    return {key: str(value) for key, value in values.items()}
