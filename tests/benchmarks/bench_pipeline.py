"""End-to-end benchmark of the onboarding pipeline on Prism (prints, never asserts).

Two measurements against the real local Kafka / Redis / PostgreSQL:

1. Sustained throughput: N events are produced first, then the streaming
   pipeline starts; measured until the consumer group has committed every
   offset AND the number of profiles in Redis has stopped changing for 3 s
   (the source commits before the sinks finish, so lag alone would flatter
   it). Reported with and without start-up (time to the first commit).
2. Latency at a fixed input rate: the pipeline runs while events are produced
   (by a separate process, which would otherwise share the GIL with the workers)
   at --rate events/s; every --probe-interval a probe event for a fresh user
   is sent and timed until its profile is visible in Redis (produce -> Redis).
   p50 / p99 over the probes.

Peak memory: VmHWM of this process (the SDK workers run in-process, LOOPBACK)
and of the Prism process. Usage:

    python tests/benchmarks/bench_pipeline.py [--events 50000] [--rate 1000] [--seconds 60]
"""
from __future__ import annotations

import argparse
import os
import statistics
import multiprocessing
import time
import uuid

from onboardflow.runners.demo import _fresh_topics, _lag, _percentile
from onboardflow.runners.local import stop_streaming_job

DAY_MS = 86_400_000


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _prism_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"prism" in f.read().split(b"\0")[0]:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _start_pipeline(bootstrap, topic, group, prefix, schema, secret, extra=()):
    from onboardflow.pipelines.onboarding import run

    return run(["--streaming", f"--kafka_bootstrap_servers={bootstrap}", f"--kafka_topics={topic}",
                "--kafka_start_position=earliest", f"--kafka_consumer_group={group}", "--kafka_idle_timeout=5",
                f"--dead_letter_topic={topic}.dlq", f"--segment_changes_topic={topic}.changes",
                f"--model_events_topic={topic}.models",
                f"--redis_key_prefix={prefix}", f"--warehouse_schema={schema}", *extra], secret=secret, wait=False)


def _sustained(args, run_id, tag, schema, secret, extra=(), drop_prefix=None):
    """Time a backlog of ``args.events`` from the first offset commit until Redis stops changing."""
    import redis

    from onboardflow.runners.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.runners.produce import produce

    topic = f"bench-{run_id}-{tag}.onboarding.events"
    _fresh_topics(args.bootstrap, [(topic, 4), (f"{topic}.dlq", 1), (f"{topic}.changes", 1), (f"{topic}.models", 1)],
                  drop_prefix=drop_prefix or f"bench-{run_id}-{tag}-x")
    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=3, users=400, start_ms=now - 45 * DAY_MS))
    produce(gen.messages(max_messages=args.events), args.bootstrap, topic, progress=False)
    group, prefix = f"bench-{run_id}-{tag}", f"bench{run_id}{tag}"
    result = _start_pipeline(args.bootstrap, topic, group, prefix, schema, secret, extra)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    first = done = None
    last_count, last_change = -1, time.time()
    t0 = time.time()
    try:
        while time.time() - t0 < 900:
            time.sleep(0.5)
            lag, total = _lag(args.bootstrap, topic, group)
            if first is None and lag < total:
                first = time.time()
            count = sum(1 for _ in client.scan_iter(match=f"{prefix}:profile:*", count=1000))
            if count != last_count:
                last_count, last_change = count, time.time()
            if lag == 0 and count > 0 and time.time() - last_change >= 3:
                done = last_change
                break
    finally:
        stop_streaming_job(result)
    label = "online models off" if "--disable_online_models" in extra else "online models on "
    if done and first:
        print(f"   sustained, {label}: {args.events:,} events into {last_count:,} Redis profiles in "
              f"{done - t0:.1f}s = {args.events / (done - t0):,.0f} events/s with start-up; "
              f"{args.events / (done - first):,.0f} events/s after the first commit ({first - t0:.1f}s start-up)")
    else:
        print(f"   sustained, {label}: did not drain within 900 s")


def _feed(bootstrap: str, topic: str, rate: float, n: int, start_ms: int) -> None:
    """Produce ``n`` generated events at ``rate`` per second (the latency run's background load)."""
    from onboardflow.runners.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.runners.produce import produce

    gen = JourneyGenerator(GeneratorConfig(seed=4, users=5000, start_ms=start_ms))
    produce(gen.messages(max_messages=n), bootstrap, topic, rate=rate, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--probe-interval", type=float, default=1.0)
    ap.add_argument("--pipeline-arg", action="append", default=[],
                    help="extra pipeline flag for every run, e.g. --pipeline-arg=--kafka_max_read_seconds=0.25")
    ap.add_argument("--skip-sustained", action="store_true", help="only the latency measurement")
    args = ap.parse_args()

    import logging
    logging.basicConfig(level=logging.ERROR)
    import psycopg

    from onboardflow.pipelines.options import DEFAULT_WAREHOUSE_DSN
    from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
    from onboardflow.schemas.wire import AvroSerializer
    from onboardflow.transforms.anonymize import SecretKey
    from onboardflow.transforms.profile_store import ProfileStore

    secret = SecretKey(b"bench-secret-0123456789abcdef-xyz")
    run_id = time.strftime("%H%M%S")
    schema = f"bench_{run_id}"
    print("== bench_pipeline (Prism, LOOPBACK workers, real Kafka/Redis/PostgreSQL; 2-core machine)")

    # 1. Sustained throughput over a backlog, with the online models and without.
    if not args.skip_sustained:
        _sustained(args, run_id, "a", schema, secret, extra=tuple(args.pipeline_arg), drop_prefix="bench-")
        _sustained(args, run_id, "c", schema, secret, extra=("--disable_online_models", *args.pipeline_arg))

    # 2. Latency at a fixed rate.
    topic = f"bench-{run_id}-b.onboarding.events"
    _fresh_topics(args.bootstrap, [(topic, 4), (f"{topic}.dlq", 1), (f"{topic}.changes", 1), (f"{topic}.models", 1)],
                  drop_prefix="bench-x")
    group, prefix = f"bench-{run_id}-b", f"bench{run_id}b"
    result = _start_pipeline(args.bootstrap, topic, group, prefix, schema, secret, tuple(args.pipeline_arg))
    time.sleep(10)  # start-up
    n = int(args.rate * args.seconds)
    # The load generator runs in its own process: in this one it would share
    # the GIL with the LOOPBACK SDK workers it is measuring.
    feeder = multiprocessing.get_context("spawn").Process(
        target=_feed, args=(args.bootstrap, topic, args.rate, n, int(time.time() * 1000) - 45 * DAY_MS),
        daemon=True)
    serializer = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", version=2))
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=0)
    store = ProfileStore("redis://127.0.0.1:6379/0", secret, key_prefix=prefix)
    latencies, pending = [], {}
    feeder.start()
    t_end = time.time() + args.seconds
    next_probe = time.time()
    try:
        while time.time() < t_end + 30 and (time.time() < t_end or pending):
            if time.time() >= next_probe and time.time() < t_end:
                user = f"probe-{uuid.uuid4().hex[:10]}"
                t = int(time.time() * 1000)
                event = {"event_id": str(uuid.uuid4()), "event_type": "login", "user_id": user,
                         "anonymous_id": None, "session_id": None, "occurred_at": t, "received_at": t,
                         "properties": {}, "context": {"device": None, "os": None, "app_version": None,
                                                        "locale": None, "ip": None, "user_agent": None,
                                                        "email": None},
                         "consent": {"analytics": True, "personalization": True, "marketing": False}}
                producer.send(topic, key=user.encode(), value=serializer.serialize(event))
                producer.flush()
                pending[user] = time.time()
                next_probe += args.probe_interval
            found = [u for u, r in zip(pending, store.get_many(list(pending))) if r is not None]
            for u in found:
                latencies.append(time.time() - pending.pop(u))
            time.sleep(0.01)
    finally:
        stop_streaming_job(result)
        producer.close()
    feeder.join(timeout=5)
    if feeder.is_alive():
        feeder.terminate()
    if latencies:
        print(f"   latency at {args.rate:,.0f} events/s for {args.seconds:.0f}s: p50 "
              f"{statistics.median(latencies) * 1000:.0f} ms, p99 {_percentile(latencies, 0.99) * 1000:.0f} ms "
              f"({len(latencies)} probes, {len(pending)} not seen within 30 s)")
    print(f"   peak memory: launcher+SDK workers {_vm_hwm_kb(os.getpid()) / 1024:.0f} MiB; Prism "
          + ", ".join(f"{_vm_hwm_kb(p) / 1024:.0f} MiB" for p in _prism_pids()))
    time.sleep(5)  # let cancelled bundles wind down before their schema goes
    with psycopg.connect(DEFAULT_WAREHOUSE_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
