"""`onboardflow evaluate --through-pipeline`: a population design through Kafka, the pipeline and Redis.

The in-process evaluation (``runners/cli/evaluate.py``) replays the engine-free
state and models; this one runs a design of ``runners/sim/populations.py`` through
the real thing, on the services of ``make services-up``:

1. **Backfill.** The design's events, ending an hour ago, are produced to a
   fresh topic of three partitions (keyed by user) and read by a bounded run
   of the onboarding pipeline (Prism): profiles, rules, the learner's refits
   at the daily marks and at the end of the input, and the sweep. The
   profiles in Redis then give the *after backfill* figures.
2. **Live phase.** A streaming run reads the topic from the earliest offset
   (Prism keeps no state between jobs: a run resumed from the committed
   offsets would fold the login into an empty profile state and write a
   one-event profile over the full one), and is waited on until it has
   settled (runners/cli/demo.py ``await_settled``: the replay rewrites nothing,
   every version is already stored). Then one login per user
   (``populations.live_login``, event time now) is produced, and the run
   waits until every user with personalization consent has the login in
   their profile (``last_event_at``), or ``--live-timeout``. Every
   login that never arrives is reported by count -- a lost update -- and the
   slowest arrival time is printed. The profiles give the *after live*
   figures: ARI, stability (users with at least 10 events whose cluster did
   not change), the share scored and the contingency table.

Resources are named ``evaluate-<design>-<run id>`` (topic, Redis prefix,
warehouse schema, consumer group) and removed afterwards unless ``--keep``.
The pseudonymization key is random and lives in memory only.
"""
from __future__ import annotations

import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ...schemas.units import DAY_MS, HOUR_MS
from ...transforms.connections import redis_client, warehouse_connect

STABILITY_MIN_EVENTS = 10


@dataclass
class PipelineEvaluation:
    """What one design measured through the pipeline (module docstring)."""

    design: str
    users: int
    messages: int
    backfill_seconds: float
    ari_backfill: float
    ari_live: float
    stable_share: float
    stability_users: int
    scored_share: float
    logins_sent: int
    logins_arrived: int
    slowest_login_s: float
    served_version: Optional[str]
    contingency: dict = field(default_factory=dict)


def _ari(truth, predicted) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, predicted)) if len(truth) > 1 else float("nan")


def evaluate_through_pipeline(name: str, users: int, seed: int, bootstrap: str, redis_url: str, dsn: str,
                              live_timeout_s: float = 180.0, keep: bool = False) -> PipelineEvaluation:
    """Run design ``name`` through the pipeline with a live phase (module docstring)."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from ...models.model_registry import ModelStore
    from ...transforms.anonymize import SecretKey
    from ...transforms.connections import kafka_config
    from ...transforms.profile_store.store import ProfileStore
    from ...transforms.progress import SinkWatermark
    from ..local import stop_streaming_job
    from ..sim.populations import live_login, population, v2_serializer
    from .demo import MAX_OUT_OF_ORDERNESS_S, await_settled
    from .lag import KafkaLagReader, ProgressReader
    from .run import run

    run_id = uuid.uuid4().hex[:8]
    base = f"evaluate-{name.replace('_', '-')}-{run_id}"
    schema = base.replace("-", "_")
    topic, dlq, changes = f"{base}.events", f"{base}.dlq", f"{base}.segment-changes"
    group = base
    secret = SecretKey(secrets.token_bytes(32))
    now = int(time.time() * 1000)
    probe = population(name, users=users, seed=seed)
    pop = population(name, users=users, seed=seed, start_ms=now - HOUR_MS - int(probe.days * DAY_MS))
    admin = KafkaAdminClient(**kafka_config(bootstrap))
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(dlq, 1, 1), NewTopic(changes, 1, 1)])
    common = [
        f"--kafka_bootstrap_servers={bootstrap}", f"--kafka_topics={topic}", f"--kafka_consumer_group={group}",
        f"--dead_letter_topic={dlq}", f"--segment_changes_topic={changes}",
        f"--redis_url={redis_url}", f"--redis_key_prefix={base}", f"--warehouse_dsn={dsn}",
        f"--warehouse_schema={schema}", "--model_refresh_seconds=2",
    ]
    newest_ms = max(e["occurred_at"] for e in pop.events())
    user_ids = sorted(u.user_id for u in pop.users())
    persona = {u.user_id: u.persona for u in pop.users()}
    producer = None
    try:
        producer = KafkaProducer(**kafka_config(bootstrap, acks="all", linger_ms=20))
        messages = 0
        for key, value in pop.messages():
            producer.send(topic, key=key, value=value)
            messages += 1
        producer.flush()
        print(f"  {name}: {messages:,} messages of {users:,} users produced; bounded run ...", file=sys.stderr,
              flush=True)
        t0 = time.time()
        run([*common, "--kafka_start_position=earliest", "--kafka_bounded"], secret=secret)
        backfill_s = time.time() - t0
        with ProfileStore(redis_url, secret, base) as store:
            before = dict(zip(user_ids, store.get_many(user_ids)))

        # Live phase: a streaming run rebuilds the state from the earliest offset and
        # settles; then one login per user, and wait for every consenting one.
        print(f"  {name}: backfill done in {backfill_s:.0f} s; streaming run, live phase ...", file=sys.stderr,
              flush=True)
        live_group = f"{group}-live"
        live_args = [a for a in common if not a.startswith("--kafka_consumer_group=")]
        result = run([*live_args, f"--kafka_consumer_group={live_group}", "--streaming",
                      "--kafka_start_position=earliest", "--kafka_idle_timeout=2",
                      f"--kafka_max_out_of_orderness={MAX_OUT_OF_ORDERNESS_S}"], secret=secret, wait=False)
        try:
            kafka, progress = KafkaLagReader(bootstrap, live_group, [topic]), ProgressReader(redis_url, base)
            client, sink = redis_client(redis_url), SinkWatermark(base)
            try:
                settled = await_settled(kafka, progress, lambda: sink.read(client), newest_ms, time.time(),
                                        live_timeout_s * 3, failed=lambda: None, report_every_s=30.0)
            finally:
                kafka.close()
                progress.close()
                client.close()
            if not settled.ok:
                raise RuntimeError(f"{name}: the streaming run did not settle: {settled.missing[:3]}")
            serialize = v2_serializer()
            at = int(time.time() * 1000)
            sent_at, expected = {}, set()
            for user in pop.users():
                event = live_login(user, at, seed)
                producer.send(topic, key=user.user_id.encode(), value=serialize(event))
                sent_at[user.user_id] = time.time()
                if event["consent"]["personalization"]:
                    expected.add(user.user_id)
            producer.flush()
            arrived: dict[str, float] = {}
            deadline = time.time() + live_timeout_s
            with ProfileStore(redis_url, secret, base) as store:
                while time.time() < deadline and len(arrived) < len(expected):
                    waiting = sorted(expected - set(arrived))
                    for user_id, profile in zip(waiting, store.get_many(waiting)):
                        if profile is not None and profile.get("last_event_at") == at:
                            arrived[user_id] = time.time() - sent_at[user_id]
                    time.sleep(1.0)
                # Scored after the login: the writer scores with the serving model; give the
                # learner's straggler re-scoring a moment for profiles a stale cache scored.
                time.sleep(3.0)
                after = dict(zip(user_ids, store.get_many(user_ids)))
        finally:
            stop_streaming_job(result)
        models = ModelStore(redis_url, key_prefix=base)
        served = models.current("segmentation")
        models.close()
    finally:
        if producer is not None:
            producer.close()
        if not keep:
            client = redis_client(redis_url)
            stale = list(client.scan_iter(match=f"{base}:*", count=1000))
            for i in range(0, len(stale), 1000):
                client.delete(*stale[i:i + 1000])
            client.close()
            with warehouse_connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.delete_topics([topic, dlq, changes])
        admin.close()

    present = [u for u in user_ids if before.get(u) and after.get(u)]
    cluster_before = {u: before[u].get("cluster_id") for u in present}
    cluster_after = {u: after[u].get("cluster_id") for u in present}
    settled = [u for u in present if (before[u].get("events_total") or 0) >= STABILITY_MIN_EVENTS]
    contingency: dict = {}
    for u in present:
        row = contingency.setdefault(persona[u], {})
        label = after[u].get("segment_label") or "unscored"
        row[label] = row.get(label, 0) + 1
    return PipelineEvaluation(
        design=name, users=len(present), messages=messages, backfill_seconds=backfill_s,
        ari_backfill=_ari([persona[u] for u in present], [cluster_before[u] for u in present]),
        ari_live=_ari([persona[u] for u in present], [cluster_after[u] for u in present]),
        stable_share=(sum(cluster_before[u] == cluster_after[u] for u in settled) / len(settled)
                      if settled else float("nan")),
        stability_users=len(settled),
        scored_share=sum(cluster_after[u] is not None for u in present) / len(present) if present else 0.0,
        logins_sent=len(expected), logins_arrived=len(arrived),
        slowest_login_s=max(arrived.values()) if arrived else float("nan"),
        served_version=served.id if served else None, contingency=contingency,
    )


def table(results: list[PipelineEvaluation]) -> str:
    """The through-the-pipeline table, one column per design."""
    def f(v):
        return "n/a" if v != v else f"{v:.3f}"

    rows = [
        ("users / messages", [f"{r.users:,} / {r.messages:,}" for r in results]),
        ("bounded backfill wall time", [f"{r.backfill_seconds:.0f} s" for r in results]),
        ("ARI vs personas after the backfill", [f(r.ari_backfill) for r in results]),
        ("ARI after one live login per user (>= 0.6)", [f(r.ari_live) for r in results]),
        ("stability: same cluster after the login (>= 95%)",
         [f"{f(r.stable_share)} of {r.stability_users:,}" for r in results]),
        ("profiles scored (target 100 %)", [f"{r.scored_share:.1%}" for r in results]),
        ("logins in Redis / sent (consenting users)", [f"{r.logins_arrived:,} / {r.logins_sent:,}" for r in results]),
        ("slowest login to its profile", [f"{r.slowest_login_s:.1f} s" for r in results]),
        ("served segmenter", [r.served_version or "none" for r in results]),
    ]
    from .evaluate import columns

    return columns([r.design for r in results], rows)
