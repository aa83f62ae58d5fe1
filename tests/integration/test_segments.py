"""Behaviour segments through the whole pipeline, reproducibly, on a population we did not design them on.

Real Kafka, Redis and PostgreSQL; the pipeline on Prism. The input is a
population of ``runners/sim/populations.py`` (``saas_teams``: its own personas --
drop-offs, inviters, support-heavy users, daily workers, browsers -- in
unequal shares, with noise), with recent event times, produced to a topic of
three partitions with every user's events spread over all of them (half of
the records without a key). What is pinned (issue 14):

* two bounded runs of the same topic, each from a cold learner with its own
  registry, give the same segments: the served segmenter is the same bytes,
  and every user has the same cluster id and label in Redis;
* everyone is scored: every identified user's profile carries a cluster, a
  label and the served version -- also the users whose last event came
  before the model existed (the sweep after the final fit);
* the segments mean something: they agree with the personas (ARI), and the
  labels are distinct names from the catalogue.
"""
from __future__ import annotations

import time

import pytest
import redis
from kafka import KafkaProducer
from sklearn.metrics import adjusted_rand_score

from onboardflow.models.model_registry import ModelRegistry
from onboardflow.models.segmentation import LABELS
from onboardflow.runners.cli.run import run
from onboardflow.runners.sim.populations import population
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.anonymize import SecretKey
from onboardflow.transforms.profile_store.store import ProfileStore

pytestmark = pytest.mark.integration

SECRET = SecretKey(b"segments-test-pseudonymization-k")
USERS = 250


@pytest.fixture
def recent_population(kafka_bootstrap, kafka_topic):
    """saas_teams, ending about a day ago, each user's events spread over a topic of three partitions."""
    now = int(time.time() * 1000)
    pop = population("saas_teams", users=USERS, seed=21, start_ms=(now - 14 * DAY_MS) // DAY_MS * DAY_MS)
    topic = kafka_topic(partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    sent = 0
    for key, value in pop.messages():
        # Each user's events spread over every partition, half of them without a key: the
        # runs read them in whatever interleaving the source makes, and must agree anyway.
        producer.send(topic, key=key if sent % 2 else None, value=value, partition=sent % 3)
        sent += 1
    producer.flush()
    producer.close()
    return pop, topic, sent


def _run_once(pop, topic, kafka_bootstrap, kafka_topic, redis_url, pg_dsn, schema, prefix, group):
    names = {"dlq": kafka_topic(partitions=1, suffix=f"dlq{group}"),
             "changes": kafka_topic(partitions=1, suffix=f"changes{group}")}
    run([
        f"--kafka_bootstrap_servers={kafka_bootstrap}", f"--kafka_topics={topic}",
        "--kafka_start_position=earliest", f"--kafka_consumer_group={prefix}-{group}", "--kafka_bounded",
        f"--dead_letter_topic={names['dlq']}", f"--segment_changes_topic={names['changes']}",
        f"--redis_url={redis_url}", f"--redis_key_prefix={prefix}",
        f"--warehouse_dsn={pg_dsn}", f"--warehouse_schema={schema}",
        "--model_refit_hours=24", "--segment_min_users=50",
    ], secret=SECRET)
    users = sorted(u.user_id for u in pop.users())
    with ProfileStore(redis_url, SECRET, prefix) as store:
        profiles = dict(zip(users, store.get_many(users)))
    with ModelRegistry(redis_url, pg_dsn, schema=schema, key_prefix=prefix) as registry:
        served = registry.current("segmentation")
    return profiles, served


def test_two_runs_of_the_same_topic_give_the_same_segments_and_everyone_is_scored(
        recent_population, kafka_bootstrap, kafka_topic, redis_url, pg_dsn, warehouse_schema, redis_key_prefix):
    pop, topic, sent = recent_population
    assert sent > 5_000
    runs = []
    second_prefix, second_schema = f"{redis_key_prefix}-b", f"{warehouse_schema}_b"
    try:
        for prefix, schema, group in ((redis_key_prefix, warehouse_schema, "a"),
                                      (second_prefix, second_schema, "b")):
            runs.append(_run_once(pop, topic, kafka_bootstrap, kafka_topic, redis_url, pg_dsn, schema, prefix,
                                  group))
    finally:
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{second_prefix}:*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()
        import psycopg
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{second_schema}" CASCADE')

    (first, served_a), (second, served_b) = runs
    assert served_a is not None and served_a.payload == served_b.payload

    # Everyone scored, by the served model, with a catalogue label.
    for profiles, served in runs:
        missing = [u for u, p in profiles.items() if p is None]
        assert not missing, f"{len(missing)} users have no profile"
        unscored = [u for u, p in profiles.items() if p.get("cluster_id") is None]
        assert not unscored, f"{len(unscored)} of {len(profiles)} profiles have no cluster"
        assert {p["model_version"].split("+")[0] for p in profiles.values()} == {served.id}
        assert {p["segment_label"] for p in profiles.values()} <= set(LABELS)

    # The same segments, user by user.
    a = {u: (p["cluster_id"], p["segment_label"]) for u, p in first.items()}
    b = {u: (p["cluster_id"], p["segment_label"]) for u, p in second.items()}
    differ = [u for u in a if a[u] != b[u]]
    assert not differ, f"{len(differ)} users differ between the runs, e.g. {differ[:3]}"

    # And they describe the personas.
    persona = {u.user_id: u.persona for u in pop.users()}
    users = sorted(a)
    ari = adjusted_rand_score([persona[u] for u in users], [a[u][0] for u in users])
    print(f"\nsaas_teams, {len(users)} users, {sent:,} messages: ARI vs personas {ari:.3f}; "
          f"labels {sorted(set(label for _, label in a.values()))}")
    assert ari >= 0.5
