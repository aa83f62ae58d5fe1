"""Throughput of the sinks against the real local services (make services-up).

    .venv/bin/python tests/benchmarks/bench_sinks.py [--profiles 20000] [--rows 50000] [--records 50000]
        [--only redis|postgres|kafka]

* Redis: profiles/s through the monotonic Lua upsert, pipelined in batches of
  500 (one EVALSHA per profile, one round trip per batch), for fresh writes
  (every profile applied) and for a replay (every profile stale). Encoding is
  timed separately: it runs in the DoFn's process(), the write in the flush.
  Then the whole sink (``ProfileSink.add`` per profile: encode, buffer, flush
  at the batch size), what the Beam driver runs per element.
* PostgreSQL: rows/s through COPY into the staging table plus INSERT ... ON
  CONFLICT DO NOTHING, for new rows and for a replay (all duplicates), with
  the sink's default batch of 1000 rows and with 5000; then the whole sink
  (``WarehouseSink.add``: row mapping, buffer, flush) at its default batch.
* Kafka: records/s through ``KafkaSink.add`` per ``(key, value)`` pair
  (~200-byte values, 5000 keys, a 4-partition topic, acks from all
  replicas), flushing at the default ``flush_size`` and once at the end (as
  a bundle of that size would).

Each figure is the median of 3 runs. Uses its own Redis key prefix,
PostgreSQL schema and Kafka topic and removes them afterwards. Prints figures, asserts nothing
about speed.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import sys
import time
import uuid

import psycopg
import redis
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg import sql

from onboardflow.transforms.kafka.sink import DEFAULT_FLUSH_SIZE, KafkaSink, sink_producer_config
from onboardflow.transforms.profile_store.encoding import encode_profile
from onboardflow.transforms.profile_store.sink import ProfileSink
from onboardflow.transforms.profile_store.writer import RedisProfileWriter
from onboardflow.transforms.warehouse.migrations import apply_migrations
from onboardflow.transforms.warehouse.rows import EVENTS, event_row
from onboardflow.transforms.warehouse.sink import WarehouseSink
from onboardflow.transforms.warehouse.writer import WarehouseWriter

KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_URL = f"redis://{os.environ.get('REDIS_HOST', '127.0.0.1')}:{os.environ.get('REDIS_PORT', '6379')}/0"
PG_DSN = (
    f"postgresql://{os.environ.get('PG_USER', 'onboardflow')}:{os.environ.get('PG_PASSWORD', 'onboardflow')}"
    f"@{os.environ.get('PG_HOST', '127.0.0.1')}:{os.environ.get('PG_PORT', '5432')}"
    f"/{os.environ.get('PG_DATABASE', 'onboardflow')}"
)
T0 = 1_736_899_200_000
SECRET = b"benchmark-secret-0123456789abcdef"
RUNS = 3


def user_key(i: int) -> str:
    return hmac.new(SECRET, f"usr-{i:06d}".encode(), hashlib.sha256).hexdigest()


def profile(i: int, version: int) -> dict:
    """A profile shaped like the pipeline's: ~30 fields, two maps, nullable model fields."""
    return {
        "user_key": user_key(i), "version": version, "updated_at": version,
        "segments": ["activated", "power_user"] if i % 3 == 0 else ["new_user"],
        "engagement_score": 0.731 + i * 1e-6, "intent_score": 0.2, "recency_ms": 3_600_000,
        "events_total": 120 + i % 50, "events_7d": 31, "events_30d": 118, "active_days_7d": 4,
        "active_days_30d": 12, "session_count": 9, "sessions_7d": 3, "avg_session_duration_s": 412.5,
        "feature_adoption": {"export": 3, "invite": 1, "dashboards": 7, "api": 2},
        "event_counts": {"page_view": 80, "click": 25, "feature_used": 13, "login": 2},
        "distinct_features": 4, "onboarding_progress": 0.8, "tutorial_steps_done": 4,
        "signup_at": T0 - 86_400_000 * 3, "days_since_signup": 3, "last_event_at": version,
        "plan": "pro", "account_tier": "smb", "email_domain": "example.com", "country": "DE",
        "device_class": "desktop", "dormant": False, "trigger": "events",
        "cluster_id": i % 8, "segment_label": "explorers", "propensity": 0.64, "model_version": "hst-3",
        "onboarding_track": None,
    }


def event(i: int, run: int) -> dict:
    return {
        "event_id": f"bench-{run}-{i:07d}", "event_type": "feature_used", "user_key": user_key(i % 5000),
        "identified": True, "session_id": f"s-{i % 977}", "occurred_at": T0 + (i % 3) * 86_400_000 + i,
        "received_at": T0 + i + 40, "properties": {"feature": "export", "page": "/reports"},
        "context": {"device": None, "os": "macOS", "app_version": "2.3.1", "country": "DE",
                    "email_domain": "example.com", "ip_prefix": "203.0.113.0/24", "device_class": "desktop"},
        "consent": {"analytics": True, "personalization": True, "marketing": False},
        "referrer": "news.example.org",
    }


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_redis(n: int, batch: int = 500) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    writer = RedisProfileWriter(REDIS_URL, prefix, profile_ttl_s=3600)
    sink = ProfileSink(REDIS_URL, prefix, profile_ttl_s=3600, batch_size=batch)
    encode_rates, write_rates, replay_rates, sink_rates = [], [], [], []
    try:
        for run in range(RUNS):
            profiles = [profile(i, T0 + run * 10 + 1) for i in range(n)]  # newer every run: all applied
            start = time.perf_counter()
            encoded = [encode_profile(p) for p in profiles]
            encode_rates.append(rate(n, time.perf_counter() - start))
            for label, rates, expect in (("write", write_rates, True), ("replay", replay_rates, False)):
                start = time.perf_counter()
                applied = 0
                for i in range(0, n, batch):
                    applied += sum(o.applied for o in writer.write(encoded[i:i + batch]))
                rates.append(rate(n, time.perf_counter() - start))
                if applied != (n if expect else 0):
                    raise SystemExit(f"redis {label}: {applied} of {n} applied, expected {n if expect else 0}")
            profiles = [profile(i, T0 + run * 10 + 5) for i in range(n)]
            start = time.perf_counter()
            settled = [r for p in profiles for r in sink.add(p)] + sink.flush()
            sink_rates.append(rate(n, time.perf_counter() - start))
            if sum(r.result.applied for r in settled) != n:
                raise SystemExit("redis sink: not every profile applied")
    finally:
        writer.close()
        sink.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        client.close()
    print(f"redis   profiles={n} batch={batch} (median of {RUNS})")
    print(f"  encode                 {statistics.median(encode_rates):>10,.0f} profiles/s")
    print(f"  Lua upsert, applied    {statistics.median(write_rates):>10,.0f} profiles/s")
    print(f"  Lua upsert, replayed   {statistics.median(replay_rates):>10,.0f} profiles/s")
    print(f"  ProfileSink, applied   {statistics.median(sink_rates):>10,.0f} profiles/s (encode + upsert)")


def bench_postgres(n: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    apply_migrations(PG_DSN, schema)
    try:
        for batch in (1000, 5000):
            writer = WarehouseWriter(PG_DSN, EVENTS, schema)
            new_rates, replay_rates = [], []
            try:
                for run in range(RUNS):
                    rows = [event_row(event(i, f"{batch}-{run}")) for i in range(n)]
                    for label, rates, expect in (("new", new_rates, n), ("replay", replay_rates, 0)):
                        start = time.perf_counter()
                        inserted = sum(writer.write(rows[i:i + batch]).inserted for i in range(0, n, batch))
                        rates.append(rate(n, time.perf_counter() - start))
                        if inserted != expect:
                            raise SystemExit(f"postgres {label}: {inserted} rows inserted, expected {expect}")
            finally:
                writer.close()
            print(f"postgres events rows={n} batch={batch} (median of {RUNS})")
            print(f"  COPY + INSERT, new     {statistics.median(new_rates):>10,.0f} rows/s")
            print(f"  COPY + INSERT, replay  {statistics.median(replay_rates):>10,.0f} rows/s")
        sink = WarehouseSink(PG_DSN, EVENTS, schema)
        sink_rates = []
        try:
            for run in range(RUNS):
                events = [event(i, f"sink-{run}") for i in range(n)]
                start = time.perf_counter()
                settled = [r for e in events for r in sink.add(e)] + sink.flush()
                sink_rates.append(rate(n, time.perf_counter() - start))
                if len(settled) != n or any(r.rejection for r in settled):
                    raise SystemExit("postgres sink: not every event written")
        finally:
            sink.close()
        print(f"postgres events rows={n} through WarehouseSink, batch={sink.batch_size} (median of {RUNS})")
        print(f"  event_row + COPY, new  {statistics.median(sink_rates):>10,.0f} rows/s")
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def bench_kafka(n: int) -> None:
    topic = f"bench-sink-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP)
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    try:
        for flush_size in (DEFAULT_FLUSH_SIZE, n):
            sent = {}
            sink = KafkaSink(KAFKA_BOOTSTRAP, topic, sink_producer_config(), flush_size,
                             count=lambda name, k: sent.__setitem__(name, sent.get(name, 0) + k))
            sink.add((b"warm-up", b"x"))
            sink.flush()  # the producer connects outside the timed runs
            rates = []
            try:
                pairs = [(user_key(i % 5000).encode(), b"%07d:" % i + b"v" * 192) for i in range(n)]
                for _ in range(RUNS):
                    start = time.perf_counter()
                    for pair in pairs:
                        sink.add(pair)
                    sink.flush()
                    rates.append(rate(n, time.perf_counter() - start))
            finally:
                sink.close()
            if sent.get("records_sent") != RUNS * n + 1:
                raise SystemExit(f"kafka sink: {sent} records acked, expected {RUNS * n + 1}")
            print(f"kafka   records={n} through KafkaSink, flush_size={flush_size} (median of {RUNS})")
            print(f"  send + acks            {statistics.median(rates):>10,.0f} records/s")
    finally:
        admin.delete_topics([topic])
        admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--only", choices=("redis", "postgres", "kafka"))
    args = parser.parse_args(argv)
    if args.only in (None, "redis"):
        bench_redis(args.profiles)
    if args.only in (None, "postgres"):
        bench_postgres(args.rows)
    if args.only in (None, "kafka"):
        bench_kafka(args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
