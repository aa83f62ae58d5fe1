"""Backfills of recent events, then live traffic; replays over other partitionings (issue 13, items 1-2).

Real Kafka, Redis and PostgreSQL; the pipeline on Prism. Unlike the end-to-end
tests, the events here are *recent* (the last three weeks, relative to the wall
clock when the test runs), which is what a bounded backfill is for and where
timers firing to +infinity at the end of the input used to push every profile
weeks into the future.

What is pinned:

* a bounded backfill leaves every profile as of the newest event of its input
  (never later, never after the wall clock); nobody is ``dormant`` who was not
  really silent for 30 days; the 7-day counts and every rule segment equal an
  independent computation from the events, written here from the rule file's
  definitions (pipelines/segment_rules.yaml);
* a streaming run from the earliest offsets that follows it delivers each live
  event (event time = now) to its profile, and the segments still agree;
* a user whose events sit on several partitions, some without a Kafka key,
  gets the same profile and version whatever the partitioning: replaying the
  same events split differently over the partitions writes nothing, and Redis
  never holds a smaller version or another segment set meanwhile; the source
  counts the keyless records.
"""
from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Optional

import pytest
from apache_beam.runners.runner import PipelineState
from kafka import KafkaProducer

from onboardflow.runners.cli.run import run
from onboardflow.runners.local import stop_streaming_job
from onboardflow.runners.sim.generator import v1_serializer
from onboardflow.tests.integration.outputs import counters
from onboardflow.transforms.anonymize import SecretKey
from onboardflow.transforms.profile_store.store import ProfileStore

pytestmark = pytest.mark.integration

SECRET = SecretKey(b"backfill-test-pseudonymization-k")
PARTITIONS = 3
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
SESSION_GAP = 30 * MINUTE
HALF_LIFE = 7 * DAY
LN2 = math.log(2.0)
SOURCE = "onboardflow.kafka_source"


# --------------------------------------------------------------------------- input


def raw_event(user_id: str, event_type: str, t: int, **properties: str) -> dict:
    return {
        "event_id": str(uuid.uuid4()), "event_type": event_type, "user_id": user_id, "anonymous_id": None,
        "session_id": None, "occurred_at": t, "received_at": t, "properties": dict(properties),
        "context": {"device": "desktop", "os": "Linux", "app_version": "1.0", "locale": "en_US", "ip": None,
                    "user_agent": None, "email": None},
        "consent": {"analytics": True, "personalization": True, "marketing": False},
    }


def session(rng: random.Random, user: str, start: int, kinds: list[tuple[str, dict]]) -> list[dict]:
    """One burst of events a few minutes apart (one session)."""
    return [raw_event(user, kind, start + i * rng.randint(1, 5) * MINUTE, **props)
            for i, (kind, props) in enumerate(kinds)]


def recent_journeys(now: int, seed: int = 7) -> list[dict]:
    """Eleven users over the last ~40 days; the newest event two hours ago."""
    rng = random.Random(seed)
    events: list[dict] = []
    feature = ("feature_used", {"feature": "export"})
    for u in range(8):  # active users: a session on many of the last 18 days
        user = f"backfill-user-{u}"
        signup = now - (18 - u) * DAY - 5 * HOUR
        events += session(rng, user, signup, [("signup", {"plan": "trial"}),
                                              ("tutorial_step", {"step": "1", "step_total": "4"})])
        for day in range(1, 18 - u):
            if rng.random() < 0.35 + 0.08 * u:
                kinds = [("login", {})] + rng.sample([
                    ("page_view", {"page": "/pricing"}), ("page_view", {"page": "/home"}), feature,
                    ("feature_used", {"feature": rng.choice(["reports", "alerts", "sharing"])}),
                    ("tutorial_step", {"step": str(rng.randint(1, 4)), "step_total": "4"}),
                    ("support_message", {}), ("form_submit", {}),
                ], rng.randint(1, 4))
                events += session(rng, user, signup + day * DAY + rng.randint(0, 8) * HOUR, kinds)
    # A user who went quiet ten days ago (7-day counts 0, not dormant)...
    quiet = now - 16 * DAY
    events += session(rng, "backfill-quiet", quiet, [("signup", {"plan": "trial"}), ("login", {})])
    events += session(rng, "backfill-quiet", now - 10 * DAY, [("login", {}), feature, feature])
    # ...one silent for 35 days (dormant: really 30 days silent)...
    events += session(rng, "backfill-dormant", now - 40 * DAY, [("signup", {"plan": "trial"}), feature])
    events += session(rng, "backfill-dormant", now - 35 * DAY, [("login", {}), ("support_message", {})])
    # ...and the newest event of the input, two hours ago.
    events += session(rng, "backfill-latest", now - 2 * HOUR - 10 * MINUTE,
                      [("signup", {"plan": "trial"}), ("login", {})])
    assert max(e["occurred_at"] for e in events) < now - HOUR
    return events


def produce(bootstrap: str, topic: str, events: list[dict], partition_of, keyed,
            partitions: Optional[dict] = None) -> Counter:
    """Sends each event to ``partition_of(i, event)``, keyed by its user when ``keyed(i, event)``.

    Returns the number of records sent without a key, per partition; ``partitions``
    (user -> set) collects where each user's events went.
    """
    serialize = v1_serializer()
    keyless: Counter = Counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i, event in enumerate(events):
            partition = partition_of(i, event)
            key = event["user_id"].encode() if keyed(i, event) else None
            if key is None:
                keyless[partition] += 1
            if partitions is not None:
                partitions.setdefault(event["user_id"], set()).add(partition)
            producer.send(topic, key=key, value=serialize(event), partition=partition)
        producer.flush()
    finally:
        producer.close()
    return keyless


# --------------------------------------------------------------------------- the independent computation


def utc_day(t: int) -> int:
    return t // DAY


def decayed(times, at: int) -> float:
    return math.fsum(math.exp(-LN2 * (at - t) / HALF_LIFE) for t in times)


def expected_at(events: list[dict], at: int) -> dict:
    """The rule-relevant profile of one user at event time ``at``, and its segments, from raw events."""
    events = [e for e in events if e["occurred_at"] <= at]
    times = sorted(e["occurred_at"] for e in events)
    starts = [times[0]] + [b for a, b in zip(times, times[1:]) if b - a > SESSION_GAP]
    by_type = Counter(e["event_type"] for e in events)
    signup_at = min((e["occurred_at"] for e in events if e["event_type"] == "signup"), default=None)
    features = Counter(e["properties"]["feature"] for e in events if e["event_type"] == "feature_used")
    steps = {e["properties"]["step"] for e in events if e["event_type"] == "tutorial_step"}
    step_total = max((int(e["properties"]["step_total"]) for e in events if e["event_type"] == "tutorial_step"),
                     default=None)
    progress = min(1.0, len(steps) / step_total) if step_total else None
    feature_usage = 100.0 * -math.expm1(
        -decayed([e["occurred_at"] for e in events if e["event_type"] == "feature_used"], at) / 10.0)
    intent = math.fsum(
        ({"purchase": 10.0, "form_submit": 2.0}.get(e["event_type"], 0.0)
         + (3.0 if e["event_type"] == "page_view" and "pricing" in e["properties"].get("page", "") else 0.0))
        * math.exp(-LN2 * (at - e["occurred_at"]) / HALF_LIFE) for e in events)
    last = times[-1]
    sessions = len(starts)
    sessions_7d = sum(1 for s in starts if s >= at - 7 * DAY)
    days_7d = {utc_day(t) for t in times if utc_day(t) >= utc_day(at) - 6}
    completed = progress is not None and progress >= 1.0
    plan = next((e["properties"].get("plan") for e in sorted(events, key=lambda e: e["occurred_at"])
                 if e["event_type"] == "signup"), None) or "free"
    segments = set()
    if sessions > 5 and signup_at is not None and at - signup_at <= 7 * DAY:
        segments.add("highly_engaged_new")
    if at - last > 30 * DAY:
        segments.add("dormant")
    if sessions_7d > 3 or feature_usage > 80:
        segments.add("active_engaged")
    if (signup_at is not None and at - signup_at > 3 * DAY + 0 and not completed
            and ((progress is not None and progress < 0.5) or by_type["tutorial_step"] == 0)):
        segments.add("onboarding_stalled")
    if intent >= 6 and by_type["purchase"] == 0 and at - last <= 7 * DAY:
        segments.add("purchase_intent_no_purchase")
    if len(features) >= 3 and features["export"] >= 1 and (by_type["purchase"] == 0 or plan in ("free", "trial")):
        segments.add("power_user_candidate")
    if by_type["support_message"] >= 2 and progress is not None and 0 <= progress <= 0.99:
        segments.add("needs_help")
    return {
        "events_total": len(events), "last_event_at": last, "session_count": sessions,
        "sessions_7d": sessions_7d, "events_7d": sum(1 for t in times if utc_day(t) >= utc_day(at) - 6),
        "active_days_7d": len(days_7d), "segments": sorted(segments),
    }


def check_profiles(profiles: dict[str, Optional[dict]], by_user: dict[str, list[dict]], at=None) -> dict:
    """{user: {field: (redis, expected)}} of every difference; ``at``: evaluate there, else at each as_of."""
    wrong = {}
    for user, events in by_user.items():
        profile = profiles.get(user)
        if profile is None:
            wrong[user] = "no profile in Redis"
            continue
        expected = expected_at(events, profile["as_of"] if at is None else at)
        actual = {name: profile.get(name) for name in expected}
        actual["segments"] = sorted(actual["segments"] or [])
        if actual != expected:
            wrong[user] = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    return wrong


# --------------------------------------------------------------------------- running it


def pipeline_args(topic, group, prefix, names, kafka_bootstrap, redis_url, pg_dsn, schema, *extra):
    return [
        f"--kafka_bootstrap_servers={kafka_bootstrap}", f"--kafka_topics={topic}",
        "--kafka_start_position=earliest", f"--kafka_consumer_group={group}",
        f"--dead_letter_topic={names['dlq']}", f"--segment_changes_topic={names['changes']}",
        f"--redis_url={redis_url}", f"--redis_key_prefix={prefix}",
        f"--warehouse_dsn={pg_dsn}", f"--warehouse_schema={schema}", "--disable_online_models", *extra,
    ]


def read_profiles(redis_url: str, prefix: str, users) -> dict[str, Optional[dict]]:
    users = sorted(users)
    with ProfileStore(redis_url, SECRET, prefix) as store:
        return dict(zip(users, store.get_many(users)))


@pytest.fixture
def env(kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix, pg_dsn, warehouse_schema, unique_name):
    names = {"dlq": kafka_topic(partitions=1, suffix="dlq"), "changes": kafka_topic(partitions=1, suffix="changes")}

    def args(topic, group, *extra, prefix=None):
        return pipeline_args(topic, f"{unique_name}-{group}", prefix or redis_key_prefix, names, kafka_bootstrap,
                             redis_url, pg_dsn, warehouse_schema, *extra)
    return args


# --------------------------------------------------------------------------- 1. backfill, then live


def test_a_backfill_of_recent_events_ends_at_its_newest_event_and_live_events_that_follow_reach_their_profiles(
        env, kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix):
    now = time.time_ns() // 1_000_000
    events = recent_journeys(now)
    by_user = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    newest = max(e["occurred_at"] for e in events)
    topic = kafka_topic(partitions=PARTITIONS)
    rng = random.Random(3)
    spread: dict = {}
    produce(kafka_bootstrap, topic, events, lambda i, e: rng.randrange(PARTITIONS), lambda i, e: True, spread)
    assert all(len(spread[u]) > 1 for u in by_user), spread  # every user's events on several partitions

    result = run(env(topic, "backfill", "--kafka_bounded"), secret=SECRET)
    assert result.state == PipelineState.DONE
    profiles = read_profiles(redis_url, redis_key_prefix, by_user)

    # Every profile as of the newest input event: not later, and not after the wall clock.
    assert {u: p["as_of"] for u, p in profiles.items()} == {u: newest for u in by_user}
    assert {u: p["version"] for u, p in profiles.items()} == {u: newest * 1000 + len(es) for u, es in by_user.items()}
    dormant = {u for u, p in profiles.items() if "dormant" in p["segments"]}
    assert dormant == {"backfill-dormant"}
    assert profiles["backfill-quiet"]["events_7d"] == 0 and profiles["backfill-quiet"]["recency_ms"] > 9 * DAY
    assert check_profiles(profiles, by_user, at=newest) == {}
    # The data must exercise the rules, or agreeing with them proves little.
    seen = Counter(s for p in profiles.values() for s in p["segments"])
    assert len(seen) >= 4 and sum(p["events_7d"] for p in profiles.values()) > 20, seen

    # Streaming from the earliest offsets (another group), then live events at the wall clock.
    stream = run(env(topic, "streaming", "--streaming", "--kafka_idle_timeout=2"), secret=SECRET, wait=False)
    try:
        live_at = time.time_ns() // 1_000_000
        live = [raw_event(u, kind, live_at + i) for i, (u, kind) in enumerate([
            ("backfill-user-0", "login"), ("backfill-quiet", "feature_used"), ("backfill-dormant", "login"),
            ("backfill-latest", "support_message"), ("backfill-live-only", "signup")])]
        for e in live:
            if e["event_type"] == "feature_used":
                e["properties"] = {"feature": "export"}
            by_user[e["user_id"]].append(e)
        produce(kafka_bootstrap, topic, live, lambda i, e: i % PARTITIONS, lambda i, e: True)
        deadline = time.monotonic() + 300
        while True:
            assert stream.state not in (PipelineState.FAILED, PipelineState.DONE, PipelineState.CANCELLED)
            profiles = read_profiles(redis_url, redis_key_prefix, by_user)
            missing = [e["user_id"] for e in live
                       if (profiles.get(e["user_id"]) or {}).get("events_total") != len(by_user[e["user_id"]])]
            if not missing:
                break
            assert time.monotonic() < deadline, f"live events never reached {missing}"
            time.sleep(1.0)
    finally:
        assert stop_streaming_job(stream, 60, quiet=False) is not None
    profiles = read_profiles(redis_url, redis_key_prefix, by_user)
    wall = time.time_ns() // 1_000_000
    for e in live:
        p = profiles[e["user_id"]]
        assert p["last_event_at"] == e["occurred_at"] and p["recency_ms"] >= 0
    assert all(p["as_of"] <= wall for p in profiles.values())
    assert "dormant" not in profiles["backfill-dormant"]["segments"]  # back after 35 days
    assert check_profiles(profiles, by_user) == {}


# --------------------------------------------------------------------------- 2. partitionings and keyless records


def one_users_week(now: int) -> list[dict]:
    """27 events of one user over the last nine days, plus two other users' events."""
    rng = random.Random(11)
    events = []
    for day in range(9):  # one session a day, three events each
        kinds = [("login", {}), ("page_view", {"page": "/pricing"}),
                 ("feature_used", {"feature": "export"}) if day % 2 else ("support_message", {})]
        events += session(rng, "replay-user", now - (9 - day) * DAY + 2 * HOUR, kinds)
    events += session(rng, "replay-other", now - 3 * DAY, [("signup", {"plan": "trial"}), ("login", {})])
    events += session(rng, "replay-third", now - 1 * DAY, [("login", {}), ("feature_used", {"feature": "alerts"})])
    assert sum(1 for e in events if e["user_id"] == "replay-user") == 27
    return events


def test_a_users_events_over_several_partitions_some_without_a_key_give_one_version_whatever_the_partitioning(
        env, kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix):
    now = time.time_ns() // 1_000_000
    events = one_users_week(now)
    by_user = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    newest = max(e["occurred_at"] for e in events)

    # First topic: every fourth record without a key, spread round-robin.
    first = kafka_topic(partitions=PARTITIONS)
    keyless = produce(kafka_bootstrap, first, events, lambda i, e: i % PARTITIONS, lambda i, e: i % 4 != 0)
    result = run(env(first, "first", "--kafka_bounded"), secret=SECRET)
    assert result.state == PipelineState.DONE
    assert counters(result)[SOURCE, "events_without_key"] == sum(keyless.values()) == len(range(0, len(events), 4))
    assert len(keyless) == PARTITIONS  # and the keyless ones on every partition
    stored = read_profiles(redis_url, redis_key_prefix, by_user)
    assert check_profiles(stored, by_user, at=newest) == {}
    assert stored["replay-user"]["version"] == newest * 1000 + 27

    # Second topic: the same events, none keyed, shuffled over the partitions in another order.
    second = kafka_topic(partitions=PARTITIONS, suffix="events-reshuffled")
    rng = random.Random(5)
    shuffled = rng.sample(events, len(events))
    produce(kafka_bootstrap, second, shuffled, lambda i, e: rng.randrange(PARTITIONS), lambda i, e: False)

    seen: list = []
    stop = threading.Event()

    def watch():
        with ProfileStore(redis_url, SECRET, redis_key_prefix) as store:
            while not stop.is_set():
                p = store.get("replay-user")
                seen.append((p["version"], tuple(p["segments"])))
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        again = run(env(second, "second", "--kafka_bounded"), secret=SECRET)
    finally:
        stop.set()
        watcher.join(10)
    assert again.state == PipelineState.DONE
    m = counters(again)
    assert m[SOURCE, "events_without_key"] == len(events)
    assert m["onboardflow", "profiles_written"] == 0  # every write had a version Redis held already
    assert len(seen) > 5 and set(seen) == {(stored["replay-user"]["version"],
                                             tuple(stored["replay-user"]["segments"]))}
    assert read_profiles(redis_url, redis_key_prefix, by_user) == stored
