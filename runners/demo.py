"""`onboardflow demo`: the main job end to end on the local services.

1. Fresh demo resources: topics ``demo.onboarding.events`` (4 partitions),
   ``.dlq`` and segment changes; Redis prefix ``demo``; warehouse schema
   ``demo`` (migrated, accounts table loaded from the generator's accounts).
2. About 50,000 synthetic onboarding events (a 45-day timeline ending now,
   with late, out-of-order, duplicate and malformed messages) produced to Kafka.
3. The streaming pipeline on Prism, reading from the earliest offsets, until it
   has caught up: the consumer group's committed offsets equal the end offsets
   and the Redis profile count has stopped changing (the throughput figure);
   then until the profile writes (warehouse snapshots) stop too: the timers
   that came due when the watermark reached the wall clock (refreshes, rule
   time marks, dormancy) have fired.
4. Live phase: once the learner has published a segmenter from the history
   (and the scorers had time to load it), one login per generated user now;
   their profiles come back scored (``cluster_id``, ``segment_label``,
   ``propensity`` once warm, ``onboarding_track``).
5. Latency probes: fresh events sent one by one, each timed until its profile
   update is visible in Redis (produce -> Redis, the path an app sees).
6. A summary: events read / valid / dead-lettered / consent-filtered / late,
   users, members per segment, one profile read back through ``ProfileStore``,
   warehouse row counts, throughput and latency percentiles. The pipeline is
   then cancelled; the demo's data stays for inspection
   (``onboardflow profile USER_ID --secret-file .run/demo/pseudonym.key --key-prefix demo``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

DAY_MS = 86_400_000
REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser(prog="onboardflow demo", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--warehouse-dsn", default="postgresql://onboardflow:onboardflow@127.0.0.1:5432/onboardflow")
    p.add_argument("--events", type=int, default=50_000, help="messages to produce (default 50,000)")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--probes", type=int, default=20, help="latency probe events after catch-up")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for catch-up")
    p.add_argument("--run-dir", default=str(REPO / ".run" / "demo"))
    p.add_argument("--flink-master", help="HOST:PORT of a Flink cluster's REST API: run on Flink, not Prism "
                   "(see docs/flink.md; needs the Beam Flink job server jar)")
    p.add_argument("--flink-job-server-jar", help="the beam-runners-flink-2.2-job-server jar (make flink-jobserver-jar)")
    return p.parse_args(argv)


def _fresh_topics(bootstrap, specs, drop_prefix):
    """Delete earlier demo topics (names starting with ``drop_prefix``), create ``specs``."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import UnknownTopicOrPartitionError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="onboardflow-demo")
    try:
        existing = set(admin.list_topics())
        stale = [name for name in existing if name.startswith(drop_prefix)]
        if stale:
            try:
                admin.delete_topics(stale)
            except UnknownTopicOrPartitionError:
                pass
            deadline = time.time() + 30
            while set(admin.list_topics()) & set(stale) and time.time() < deadline:
                time.sleep(0.5)
        admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1) for n, p in specs])
    finally:
        admin.close()


def _lag(bootstrap, topic, group):
    """Total of (end offset - committed offset) over the topic's partitions."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        lag = 0
        for tp in parts:
            committed = consumer.committed(tp) or 0
            lag += max(0, ends[tp] - committed)
        return lag, sum(ends.values())
    finally:
        consumer.close()


def _count_keys(client, pattern):
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv=None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "apache_beam", "PrismRunner"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import psycopg
    import redis

    from onboardflow.pipelines.onboarding import run
    from onboardflow.runners.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.runners.local import stop_streaming_job
    from onboardflow.runners.produce import produce
    from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
    from onboardflow.schemas.wire import AvroSerializer
    from onboardflow.transforms.anonymize import SecretKey, load_secret
    from onboardflow.transforms.profile_store import ProfileStore
    from onboardflow.transforms.warehouse import apply_migrations, upsert_accounts

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    secret_file = run_dir / "pseudonym.key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32) + "\n")
        secret_file.chmod(0o600)
    secret = SecretKey(load_secret(secret_file))
    # Fresh topic names per run: Kafka 4 gives a re-created topic a new topic id,
    # and clients holding the old one's metadata can stall on it.
    run_id = time.strftime("%Y%m%d-%H%M%S")
    topic = f"demo-{run_id}.onboarding.events"
    dlq, changes_topic = f"{topic}.dlq", f"demo-{run_id}.onboarding.segment-changes"
    prefix, schema, group = "demo", "demo", f"onboardflow-demo-{run_id}"

    print("== onboardflow demo")
    print(f"   topics {topic} (+ .dlq, segment changes), Redis prefix '{prefix}', warehouse schema '{schema}'")
    _fresh_topics(args.bootstrap_servers, [(topic, 4), (dlq, 2), (changes_topic, 4)], drop_prefix="demo-")
    r = redis.Redis.from_url(args.redis_url)
    stale = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(stale), 500):
        r.unlink(*stale[i:i + 500])
    with psycopg.connect(args.warehouse_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    apply_migrations(args.warehouse_dsn, schema)

    now_ms = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(
        seed=args.seed, users=args.users, start_ms=now_ms - 45 * DAY_MS, horizon_days=45,
        malformed_fraction=0.005, duplicate_fraction=0.01, late_fraction=0.01))
    upsert_accounts(args.warehouse_dsn, [dataclasses.asdict(a) for a in gen.accounts()], schema=schema)
    gen.write_ground_truth(run_dir / "ground_truth.csv")

    print(f"== producing ~{args.events:,} events for {args.users} users (45-day journeys ending now)")
    stats = produce(gen.messages(max_messages=args.events), args.bootstrap_servers, topic,
                    progress=sys.stderr.isatty(), total=args.events)
    produced = sum(stats.attempted.values()) - sum(stats.failed.values())
    print(f"   produced {produced:,} messages in {stats.elapsed_s:.1f}s: " +
          ", ".join(f"{k} {v:,}" for k, v in sorted(stats.attempted.items())))

    flink = []
    if args.flink_master:
        flink = ["--runner=flink", f"--flink_master={args.flink_master}"]
        if args.flink_job_server_jar:
            flink.append(f"--flink_job_server_jar={args.flink_job_server_jar}")
    print(f"== streaming pipeline on {'Flink at ' + args.flink_master if flink else 'Prism'} (until caught up)")
    t0 = time.time()
    result = run(flink + [
        "--streaming", f"--kafka_bootstrap_servers={args.bootstrap_servers}", f"--kafka_topics={topic}",
        "--kafka_start_position=earliest", f"--kafka_consumer_group={group}", "--kafka_idle_timeout=5",
        f"--dead_letter_topic={dlq}", f"--segment_changes_topic={changes_topic}",
        f"--redis_url={args.redis_url}", f"--redis_key_prefix={prefix}",
        f"--warehouse_dsn={args.warehouse_dsn}", f"--warehouse_schema={schema}",
        f"--secret_file={secret_file}",
        # A short demo: publish and pick up online model versions within seconds, not minutes.
        "--model_publish_seconds=10", "--model_refresh_seconds=5",
    ], secret=secret, wait=False)
    # Caught up: every event read (lag 0) and the profile stage quiet. The
    # backfill's timeline ends now, so once the partitions go idle and the
    # watermark reaches the wall clock, each quiet user's due timers (daily
    # refreshes, rule time marks, dormancy) fire one after another: their
    # writes (one warehouse snapshot per applied profile write) must have
    # stopped too, or the live phase and the latency probes would share the
    # workers with them.
    caught_up_at, settled_at, read_stable, stable, last = None, None, 0, 0, None
    warehouse = psycopg.connect(args.warehouse_dsn, autocommit=True)
    try:
        while time.time() - t0 < args.timeout:
            time.sleep(1.0)
            lag, total = _lag(args.bootstrap_servers, topic, group)
            count = _count_keys(r, f"{prefix}:profile:*")
            writes = warehouse.execute(f'SELECT count(*) FROM "{schema}".profile_snapshots').fetchone()[0]
            # Events: every one read and every user's profile in Redis (the count stops moving).
            read_stable = read_stable + 1 if (last and count == last[0] and count and lag == 0) else 0
            if caught_up_at is None and read_stable >= 5:
                caught_up_at = time.time() - 5
            stable = stable + 1 if ((count, writes) == last and lag == 0) else 0
            last = (count, writes)
            print(f"   t={time.time() - t0:5.0f}s  lag {lag:>7,}  profiles in Redis {count:,}"
                  f"  profile writes {writes:,}", flush=True)
            if stable >= 5:
                settled_at = time.time() - 5
                break
        if settled_at is None or caught_up_at is None:
            print("   did not catch up within the timeout", file=sys.stderr)
            return 1
        elapsed = caught_up_at - t0
        print(f"   events caught up after {elapsed:.0f} s; the timers due by now (daily refreshes of quiet "
              f"users, rule time marks, dormancy) settled after {settled_at - t0:.0f} s, {last[1]:,} profile writes")

        serializer = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", version=2))
        from kafka import KafkaProducer
        producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, acks="all", linger_ms=0)

        # Live traffic after the backfill: the learner has published from the
        # history; one login per user now is scored by the served models.
        later = _live_phase(args, r, producer, serializer, topic, group, prefix, gen)

        # Latency probes: one login per fresh probe user, timed to its Redis profile.
        store = ProfileStore(args.redis_url, secret, key_prefix=prefix)
        latencies = []
        for i in range(args.probes):
            user = f"demo-probe-{uuid.uuid4().hex[:10]}"
            sent = time.time()
            event = _login(user, int(sent * 1000), {"analytics": True, "personalization": True, "marketing": False})
            producer.send(topic, key=user.encode(), value=serializer.serialize(event)).get(timeout=10)
            while time.time() - sent < 30:
                if store.get(user) is not None:
                    latencies.append(time.time() - sent)
                    break
                time.sleep(0.01)
        producer.close()

        _summary(args, r, store, gen, stats, produced, elapsed, latencies, schema, prefix,
                 later=later + args.probes)
    finally:
        warehouse.close()
        stop_streaming_job(result)
    return 0


def _summary(args, r, store, gen, stats, produced, elapsed, latencies, schema, prefix, later=0):
    """``produced``: the backfill; ``later``: valid events sent after it (live logins, probes)."""
    import psycopg

    with psycopg.connect(args.warehouse_dsn) as conn:
        def q(sql):
            return conn.execute(sql).fetchall()
        tables = {t: q(f'SELECT count(*) FROM "{schema}".{t}')[0][0]
                  for t in ("events", "late_events", "profile_snapshots", "segment_changes", "dead_letters")}
        dlq = dict(q(f"SELECT reason, count(*) FROM \"{schema}\".dead_letters WHERE stage = 'decode' GROUP BY reason"))
    valid = produced + later - sum(dlq.values())
    profiles = _count_keys(r, f"{prefix}:profile:*")
    duplicates = stats.attempted.get("duplicate", 0)
    print("\n== summary")
    print(f"   events read            {produced + later:>9,}   ({produced:,} backfill, {later:,} live logins and probes)")
    print(f"   valid                  {valid:>9,}   (of which re-sent duplicates {duplicates:,}, dropped by event_id)")
    print(f"   dead-lettered          {sum(dlq.values()):>9,}   " + ", ".join(f"{k} {v}" for k, v in sorted(dlq.items())))
    print(f"   consent-filtered       {valid - duplicates - tables['events'] - tables['late_events']:>9,}   "
          "(no analytics or personalization consent: never stored)")
    print(f"   too late for profiles  {tables['late_events']:>9,}   (kept in warehouse.late_events)")
    print(f"   profiles               {profiles:>9,}   (signed-up users and anonymous visitors)")
    print("   segment members:")
    for seg in store.segments():
        print(f"     {seg:<28} {len(store.segment_members(seg)):>6,}")
    _models_summary(args, r, schema, prefix)
    sample_user = next((u.user_id for u in gen.users() if (store.get(u.user_id) or {}).get("model_version")),
                       None) or next((u.user_id for u in gen.users() if store.get(u.user_id)), None)
    if sample_user:
        profile = store.get(sample_user)
        keep = ("segments", "engagement_score", "intent_score", "session_count", "sessions_7d", "feature_usage_score",
                "onboarding_progress", "days_since_signup", "plan", "account_tier", "device_class", "email_domain",
                "country", "cluster_id", "segment_label", "propensity", "model_version", "onboarding_track",
                "version")
        print("   sample profile (ProfileStore.get of one generated user id; Redis key is its HMAC):")
        print("     " + json.dumps({k: profile.get(k) for k in keep}, default=str))
    print("   warehouse rows:        " + ", ".join(f"{t} {n:,}" for t, n in tables.items()))
    print(f"   throughput             {produced / elapsed:>9,.0f} events/s  ({produced:,} events caught up in "
          f"{elapsed:.1f}s, pipeline start-up included)")
    if latencies:
        print(f"   produce->Redis latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p90 {_percentile(latencies, 0.9) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
              f"({len(latencies)} probes)")
    print(f"   look up a profile: onboardflow profile USER_ID --secret-file {args.run_dir}/pseudonym.key "
          f"--key-prefix {prefix}")


def _login(user_id: str, at_ms: int, consent: dict) -> dict:
    """A valid v2 ``login`` event of ``user_id`` at ``at_ms``."""
    return {"event_id": str(uuid.uuid4()), "event_type": "login", "user_id": user_id, "anonymous_id": None,
            "session_id": None, "occurred_at": at_ms, "received_at": at_ms, "properties": {},
            "context": {"device": "desktop", "os": "linux", "app_version": "demo", "locale": "en-US",
                        "ip": None, "user_agent": None, "email": None},
            "consent": dict(consent)}


def _scored(r, prefix) -> tuple[int, int]:
    """(profiles carrying a model_version, all profiles) in Redis under ``prefix``."""
    scored = total = 0
    for key in r.scan_iter(match=f"{prefix}:profile:*", count=1000):
        total += 1
        scored += r.hget(key, "model_version") not in (None, b"", b"null")
    return scored, total


def _live_phase(args, r, producer, serializer, topic, group, prefix, gen, wait_s: float = 90.0) -> int:
    """Wait for a served segmenter, send one login per generated user, wait until they are scored.

    Returns the number of events sent.
    """
    from onboardflow.models.registry import ModelStore

    store = ModelStore(args.redis_url, key_prefix=prefix)
    t0 = time.time()
    try:
        while store.current_version("segmentation") is None and time.time() - t0 < wait_s:
            time.sleep(1.0)
        version = store.current_version("segmentation")
    finally:
        store.close()
    if version is None:
        print(f"== live phase skipped: no segmentation model served within {wait_s:.0f} s")
        return 0
    time.sleep(6.0)  # the scorers re-check the registry every 5 s (--model_refresh_seconds)
    users = list(gen.users())
    now = int(time.time() * 1000)
    for user in users:
        event = _login(user.user_id, now, user.consent)
        producer.send(topic, key=user.user_id.encode(), value=serializer.serialize(event))
    producer.flush()
    print(f"== live phase: models served (segmentation v{version}); one login for each of {len(users)} users")
    last, since = None, time.time()
    while time.time() - t0 < wait_s + 60:
        time.sleep(1.0)
        lag, _ = _lag(args.bootstrap_servers, topic, group)
        counts = _scored(r, prefix)
        if counts != last:
            last, since = counts, time.time()
        elif lag == 0 and time.time() - since >= 3:
            break
    print(f"   scored profiles {last[0]:,} of {last[1]:,}")
    return len(users)


def _models_summary(args, r, schema, prefix):
    """Serving model versions, and how the profiles in Redis were scored and routed."""
    import collections

    from onboardflow.models.propensity import PropensityModel
    from onboardflow.models.registry import ModelRegistry

    with ModelRegistry(args.redis_url, args.warehouse_dsn, schema=schema, key_prefix=prefix) as registry:
        seen_labels = None
        for kind in ("segmentation", "propensity"):
            current = registry.current(kind)
            if current is None and kind == "propensity":
                # Served only once warm: min_per_class labelled points of each class (docs/models.md).
                print("   propensity model           not published: it serves once it has learned "
                      f"{PropensityModel().min_per_class} completions and {PropensityModel().min_per_class} "
                      "timeouts (3-day horizon)"
                      + (f"; {seen_labels:,} labelled points so far" if seen_labels is not None else ""))
            elif current is None:
                print(f"   {kind} model         not published yet (the learner is still warming up)")
            else:
                print(f"   {kind} model         {current.id} (published {len(registry.versions(kind))} versions; "
                      f"counts {json.dumps(dict(current.counts))}; metrics {json.dumps(dict(current.metrics))})")
                seen_labels = current.counts.get("labels") if kind == "segmentation" else seen_labels
    labels, tracks, scored, total = collections.Counter(), collections.Counter(), 0, 0
    for key in r.scan_iter(match=f"{prefix}:profile:*", count=1000):
        label, track, version = r.hmget(key, "segment_label", "onboarding_track", "model_version")
        total += 1
        scored += version not in (None, b"", b"null")
        if label not in (None, b"", b"null"):
            labels[label.decode().strip('"')] += 1
        if track not in (None, b"", b"null"):
            tracks[track.decode().strip('"')] += 1
    print(f"   scored by online models {scored:>8,} of {total:,} profiles (updated after the first publish)")
    if labels:
        print("   clusters: " + ", ".join(f"{k} {v:,}" for k, v in labels.most_common()))
    if tracks:
        print("   onboarding tracks: " + ", ".join(f"{k} {v:,}" for k, v in tracks.most_common()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
