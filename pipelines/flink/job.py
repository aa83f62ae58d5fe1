"""The onboarding job on Flink's DataStream API: build it from ``JobSettings`` and submit it.

    Kafka ('kafka' table source: raw key/value, topic/partition/offset/timestamp)
      ─► DecodeAndAnonymize (events.py) ─► event-time watermarks
      ─► key by e-mail pseudonym ─► EmailStage (identity.py: devices and accounts
           that gave the same address)
      ─► key by device (anonymous_key) ─► IdentityStage (identity.py: a device's
           events to the account it identified as, alias rows)
      ─► key by user_key ─► UserStage (users.py: ProfileMachine on keyed state
           and timers; enrich, rules, scores, tracks, experiments, Redis,
           warehouse, relays)
      ─► key by one key ─► LearnerStage (learner.py: online models, drift,
           the sink watermark)

Run by Flink's client in the Flink virtualenv (``flink run -py``, which
runners/flink_job.py does for ``onboardflow run --engine flink``)::

    python -m onboardflow.pipelines.flink.job --settings job.json

Operators have stable uids (their state's identity across savepoints: keep
them). The source commits its offsets to the consumer group on each
completed checkpoint, so ``onboardflow lag`` sees the job. Watermarks are
generated per source subtask, right after decoding (a Python timestamp
assigner cannot run inside the Java source), with the same bounded
out-of-orderness and idle timeout as the Beam source; docs/flink.md says
what that changes.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

from pyflink.common import Configuration, Duration, Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import StreamTableEnvironment

from .events import HEARTBEAT, HEARTBEAT_TICK, DecodeAndAnonymize
from .identity import EmailStage, IdentityStage, device_key, email_stage_key
from .learner import LearnerStage
from .settings import JobSettings, flink_configuration, source_ddl
from .users import DEAD, UserStage

_LOG = logging.getLogger(__name__)
LEARNER_KEY = "online-models"


class OccurredAt(TimestampAssigner):
    """Event time for the watermark: the event's ``occurred_at``, capped at the wall clock (one event
    from a skewed device clock must not make every honest event late, as in the Beam source); a
    heartbeat's wall clock; 0 for dead-letter rows, which hold no watermark up or back."""

    def extract_timestamp(self, value, record_timestamp: int) -> int:
        kind, _, payload = value
        if kind == DEAD:
            return 0
        if kind == HEARTBEAT:
            return payload
        return min(payload["occurred_at"], time.time_ns() // 1_000_000)


def _record(row) -> tuple:
    """A source row as ``KafkaRecord`` fields; TIMESTAMP_LTZ arrives as a java.time.Instant in thread mode."""
    ts = row[5]
    if ts is None:
        kafka_ms = -1
    elif hasattr(ts, "toEpochMilli"):
        kafka_ms = int(ts.toEpochMilli())
    else:
        kafka_ms = int(ts.timestamp() * 1000)
    key, value = row[0], row[1]
    return row[2], int(row[3]), int(row[4]), kafka_ms, None if key is None else bytes(key), \
        None if value is None else bytes(value)


def configuration(s: JobSettings) -> Configuration:
    """The job's Flink configuration (``flink_configuration``) as PyFlink's ``Configuration``."""
    config = Configuration()
    for key, value in flink_configuration(s).items():
        config.set_string(key, value)
    return config


def build(env: StreamExecutionEnvironment, s: JobSettings) -> None:
    """Apply the job to ``env``."""
    tables = StreamTableEnvironment.create(env)
    tables.execute_sql(source_ddl(s))
    records = (tables.to_data_stream(tables.from_path("onboarding_events"))
               .map(_record, output_type=Types.PICKLED_BYTE_ARRAY()).name("KafkaRecords").uid("kafka-records"))
    if s.streaming():
        # A tick a second per decoding subtask, so an idle partition still moves the
        # watermark (events.py _heartbeat); ticks are spread round-robin.
        tables.execute_sql("CREATE TEMPORARY TABLE heartbeat (n BIGINT) WITH "
                           f"('connector' = 'datagen', 'rows-per-second' = '{int(s.source_parallelism)}')")
        ticks = (tables.to_data_stream(tables.from_path("heartbeat"))
                 .map(lambda _: HEARTBEAT_TICK, output_type=Types.PICKLED_BYTE_ARRAY())
                 .name("HeartbeatTicks").uid("heartbeat-ticks").set_parallelism(1))
        records = records.union(ticks)
    idle_ms = int(float(s.kafka_idle_timeout) * 1000) if s.get("kafka_idle_timeout") else 0
    watermarks = WatermarkStrategy.for_bounded_out_of_orderness(
        Duration.of_millis(int(float(s.kafka_max_out_of_orderness) * 1000)))
    if idle_ms > 0:
        watermarks = watermarks.with_idleness(Duration.of_millis(idle_ms))
    events = (records
              .process(DecodeAndAnonymize(s), output_type=Types.PICKLED_BYTE_ARRAY())
              .name("DecodeAndAnonymize").uid("decode-anonymize")
              .assign_timestamps_and_watermarks(watermarks.with_timestamp_assigner(OccurredAt()))
              .name("EventTime").uid("event-time")
              .filter(lambda element: element[0] != HEARTBEAT).name("DropHeartbeats").uid("drop-heartbeats"))
    if not s.get("disable_identity_stitching"):
        events = (events
                  .key_by(email_stage_key, key_type=Types.STRING())
                  .process(EmailStage(s), output_type=Types.PICKLED_BYTE_ARRAY())
                  .name("MatchEmails").uid("match-emails").set_parallelism(int(s.parallelism))
                  .key_by(device_key, key_type=Types.STRING())
                  .process(IdentityStage(s), output_type=Types.PICKLED_BYTE_ARRAY())
                  .name("StitchIdentities").uid("stitch-identities").set_parallelism(int(s.parallelism)))
    applied = (events
               .key_by(lambda element: element[1], key_type=Types.STRING())
               .process(UserStage(s), output_type=Types.PICKLED_BYTE_ARRAY())
               .name("UserProfiles").uid("user-profiles").set_parallelism(int(s.parallelism)))
    learner = (applied
               .key_by(lambda _: LEARNER_KEY, key_type=Types.STRING())
               .process(LearnerStage(s), output_type=Types.PICKLED_BYTE_ARRAY())
               .name("LearnOnlineModels").uid("learn-online-models").set_parallelism(1))
    learner.print().name("Nothing").uid("nothing").set_parallelism(1)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="The onboardflow onboarding job on Flink (docs/flink.md).")
    parser.add_argument("--settings", required=True, help="JobSettings JSON written by runners/flink_job.py")
    args = parser.parse_args(argv)
    s = JobSettings.from_file(args.settings)
    env = StreamExecutionEnvironment.get_execution_environment(configuration(s))
    # The source, decoding and watermarks run one subtask per partition (each partition's own
    # watermark); the keyed stages set their own parallelism.
    env.set_parallelism(int(s.source_parallelism))
    # Jars to ship with the job, for a cluster whose lib/ lacks them (flink.sh puts the Kafka
    # connector there). Appended to the jars PyFlink ships itself: never replace pipeline.jars.
    if s.connector_jars:
        env.add_jars(*(f"file://{jar}" for jar in s.connector_jars))
    build(env, s)
    client = env.execute_async(s.job_name)
    print(f"onboardflow job submitted: {client.get_job_id()}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
