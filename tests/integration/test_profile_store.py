"""The Redis profile store against the real local Redis (make services-up).

Every test writes under its own key prefix and deletes it afterwards.
"""
import hashlib
import hmac
import json
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from onboardflow.pipelines.beam.profile_store import WriteProfilesToRedis
from onboardflow.runners.cli import profile as profile_cli
from onboardflow.transforms.profile_store import writer as profile_writer
from onboardflow.transforms.profile_store.encoding import decode_profile, encode_profile
from onboardflow.transforms.profile_store.store import ProfileStore
from onboardflow.transforms.profile_store.writer import RedisProfileWriter

pytestmark = pytest.mark.integration

SECRET = b"integration-secret-0123456789abcdef"
T0 = 1_736_899_200_000  # 2025-01-15T00:00:00Z


def key_of(user_id):
    return hmac.new(SECRET, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def profile(user_id, version, segments=("activated",), **fields):
    p = {"user_key": key_of(user_id), "version": version, "updated_at": version, "segments": list(segments)}
    p.update(fields)
    return p


@pytest.fixture
def admin(redis_client):
    return redis_client


@pytest.fixture
def prefix(admin, unique_name):
    yield unique_name
    keys = list(admin.scan_iter(match=f"{unique_name}:*", count=1000))
    if keys:
        admin.delete(*keys)


@pytest.fixture
def writer(redis_url, prefix):
    w = RedisProfileWriter(redis_url, prefix, profile_ttl_s=3600, backoff_base_s=0.01)
    yield w
    w.close()


def write(writer, *profiles, write_id=None):
    return [o.applied for o in writer.write([encode_profile(p) for p in profiles], write_id=write_id)]


def stored(admin, prefix, user_id):
    raw = admin.hgetall(f"{prefix}:profile:{key_of(user_id)}")
    return decode_profile(raw) if raw else None


def members(admin, prefix, segment):
    return {m.decode() for m in admin.smembers(f"{prefix}:segment:{segment}")}


# --------------------------------------------------------------------------- monotonic writes


def test_an_older_version_written_after_a_newer_one_is_ignored(writer, admin, prefix):
    assert write(writer, profile("u1", T0 + 2000, engagement_score=0.9)) == [True]
    assert write(writer, profile("u1", T0 + 1000, engagement_score=0.1)) == [False]
    got = stored(admin, prefix, "u1")
    assert (got["version"], got["engagement_score"]) == (T0 + 2000, 0.9)


def test_unicode_and_wide_profiles_round_trip_through_the_script(writer, admin, prefix):
    wide = {f"feature_{i:03d}": i * 0.5 for i in range(250)}  # more fields than one HSET chunk
    p = profile("u1", T0, segments=["überfan", "😀"], plan="Prö ✓", tags={"ключ": "значение"}, **wide)
    assert write(writer, p) == [True]
    assert stored(admin, prefix, "u1") == p
    assert members(admin, prefix, "😀") == {key_of("u1")}


def test_the_same_version_twice_is_written_once(writer, admin, prefix):
    assert write(writer, profile("u1", T0, engagement_score=0.5)) == [True]
    # Same version, different content: an idempotent replay, not an update.
    assert write(writer, profile("u1", T0, engagement_score=0.7)) == [False]
    assert stored(admin, prefix, "u1")["engagement_score"] == 0.5


def test_an_applied_write_replaces_the_whole_hash(writer, admin, prefix):
    write(writer, profile("u1", T0, propensity=0.4, cluster_id=3))
    write(writer, profile("u1", T0 + 1, propensity=None))
    got = stored(admin, prefix, "u1")
    assert "propensity" not in got and "cluster_id" not in got


def test_segment_sets_follow_entered_and_exited_segments(writer, admin, prefix):
    write(writer, profile("u1", T0, segments=["a", "b"]), profile("u2", T0, segments=["b"]))
    assert members(admin, prefix, "a") == {key_of("u1")}
    assert members(admin, prefix, "b") == {key_of("u1"), key_of("u2")}
    write(writer, profile("u1", T0 + 1, segments=["b", "c"]))  # exits a, enters c
    assert members(admin, prefix, "a") == set()
    assert members(admin, prefix, "b") == {key_of("u1"), key_of("u2")}
    assert members(admin, prefix, "c") == {key_of("u1")}
    write(writer, profile("u1", T0, segments=["a"]))  # stale: sets untouched
    assert members(admin, prefix, "a") == set()
    assert members(admin, prefix, "c") == {key_of("u1")}


def test_ttl_is_set_and_refreshed_by_accepted_writes_only(writer, admin, prefix):
    key = f"{prefix}:profile:{key_of('u1')}"
    write(writer, profile("u1", T0))
    assert 3590 <= admin.ttl(key) <= 3600
    admin.pexpire(key, 50_000)
    write(writer, profile("u1", T0 - 1))  # stale
    assert admin.pttl(key) <= 50_000
    write(writer, profile("u1", T0 + 1))  # accepted
    assert 3590 <= admin.ttl(key) <= 3600
    # Segment sets never expire.
    assert admin.ttl(f"{prefix}:segment:activated") == -1


def test_a_replayed_batch_writes_nothing_new(writer, admin, prefix):
    batch = [profile(f"u{i}", T0 + i, segments=[f"s{i % 3}"], session_count=i) for i in range(50)]
    assert write(writer, *batch) == [True] * 50
    before = {k: admin.hgetall(k) for k in admin.scan_iter(match=f"{prefix}:profile:*")}
    sets_before = {s: members(admin, prefix, s) for s in ("s0", "s1", "s2")}
    assert write(writer, *batch) == [False] * 50
    after = {k: admin.hgetall(k) for k in admin.scan_iter(match=f"{prefix}:profile:*")}
    assert after == before  # including _write_id: nothing was rewritten
    assert {s: members(admin, prefix, s) for s in ("s0", "s1", "s2")} == sets_before


def test_a_retried_flush_recognizes_its_own_write_and_does_not_rewrite(writer, admin, prefix):
    # What happens when a reply is lost: the same flush (same write id) is resent.
    p = profile("u1", T0, plan="pro")
    assert write(writer, p, write_id="flush-1") == [True]
    admin.hset(f"{prefix}:profile:{key_of('u1')}", "marker", "kept")
    assert write(writer, p, write_id="flush-1") == [True]  # reported applied, counted once
    assert admin.hget(f"{prefix}:profile:{key_of('u1')}", "marker") == b"kept"
    assert write(writer, p, write_id="flush-2") == [False]  # another flush: a replay


def test_an_applied_write_reports_the_segments_the_store_held_before_it_even_when_retried(writer, prefix):
    [first] = writer.write([encode_profile(profile("u1", T0, segments=("new",)))])
    assert first.applied and first.previous_segments == ()
    p2 = encode_profile(profile("u1", T0 + 1, segments=("active", "dormant")))
    [second] = writer.write([p2], write_id="flush-7")
    assert second.previous_segments == ("new",)
    [retried] = writer.write([p2], write_id="flush-7")  # the reply was lost: same write again
    assert retried.applied and retried.previous_segments == ("new",)
    [stale] = writer.write([encode_profile(profile("u1", T0, segments=("x",)))])
    assert not stale.applied and stale.previous_segments is None


def test_the_sink_records_segment_changes_in_the_outbox_and_a_replay_records_none(redis_url, prefix, admin):
    from onboardflow.transforms.outbox.keys import SEGMENT_CHANGES, OutboxKeys

    batch = [profile("u1", T0, segments=("dormant",), as_of=T0),
             profile("u2", T0, segments=(), as_of=T0)]
    stream = OutboxKeys(prefix).stream(SEGMENT_CHANGES)
    for _ in range(2):  # the same writes again: all stale, nothing recorded
        with BeamTestPipeline() as p:
            _ = p | beam.Create(batch) | WriteProfilesToRedis(redis_url, prefix, profile_ttl_s=3600)
        entries = admin.xrange(stream)
        assert [(f[b"u"].decode(), f[b"old"], f[b"new"], int(f[b"at"])) for _, f in entries] == [
            (key_of("u1"), b"[]", b'["dormant"]', T0)]


# --------------------------------------------------------------------------- failures


def test_a_write_redis_refuses_is_reported_rejected_and_the_rest_land(writer, admin, prefix):
    admin.set(f"{prefix}:profile:{key_of('u2')}", "not a hash")
    outcomes = writer.write([encode_profile(profile(f"u{i}", T0)) for i in range(4)])
    assert [o.applied for o in outcomes] == [True, True, False, True]
    assert outcomes[2].rejected.startswith("WRONGTYPE")
    assert writer.retries == 0
    assert stored(admin, prefix, "u3")["version"] == T0


def test_connection_killed_mid_write_is_retried_and_the_write_lands_once(writer, admin, prefix):
    items = [profile(f"u{i}", T0, segments=["killed"]) for i in range(20)]
    writer.client.ping()
    outcome = {}
    # CLIENT PAUSE WRITE holds the writer's EVALSHAs inside Redis, unexecuted,
    # so the kill lands while the batch is in flight. Paused for at most 5 s.
    admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        thread = threading.Thread(target=lambda: outcome.setdefault("applied", write(writer, *items)))
        thread.start()
        deadline = time.monotonic() + 5
        blocked = []
        while not blocked and time.monotonic() < deadline:
            blocked = [
                c for c in admin.client_list()
                if c.get("name") == writer.client_name and "b" in c.get("flags", "")
            ]
            time.sleep(0.01)
        assert blocked, "the writer never blocked on the paused server"
        assert admin.client_kill_filter(_id=blocked[0]["id"]) == 1
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    thread.join(30)
    assert outcome["applied"] == [True] * 20
    assert writer.retries >= 1
    assert members(admin, prefix, "killed") == {key_of(f"u{i}") for i in range(20)}
    write_ids = {admin.hget(f"{prefix}:profile:{key_of(f'u{i}')}", "_write_id") for i in range(20)}
    assert len(write_ids) == 1  # one logical write, whatever the attempts


def test_a_connection_killed_between_writes_does_not_lose_the_next_write(writer, admin, prefix):
    write(writer, profile("u1", T0))
    mine = [c for c in admin.client_list() if c.get("name") == writer.client_name]
    assert mine
    for c in mine:
        admin.client_kill_filter(_id=c["id"])
    assert write(writer, profile("u1", T0 + 1)) == [True]
    assert stored(admin, prefix, "u1")["version"] == T0 + 1


def test_script_missing_after_a_redis_restart_is_reloaded(redis_url, admin, prefix, monkeypatch, unique_name):
    # A script text Redis has never seen stands in for the script cache a restart empties.
    monkeypatch.setattr(profile_writer, "UPSERT_PROFILE_LUA",
                        f"-- {unique_name}\n" + profile_writer.UPSERT_PROFILE_LUA)
    w = RedisProfileWriter(redis_url, prefix, backoff_base_s=0.01)
    w._script_loaded = True  # as if loaded before the restart
    try:
        assert write(w, profile("u1", T0)) == [True]
        assert w.retries == 1
    finally:
        w.close()
    assert stored(admin, prefix, "u1")["version"] == T0


# --------------------------------------------------------------------------- Beam


def _counters(result):
    """Counters of the onboardflow namespace, summed over the steps that report them."""
    totals = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        if c.key.metric.namespace == "onboardflow":
            totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + c.committed
    return totals


def _run_write_pipeline(redis_url, prefix, profiles):
    p = BeamTestPipeline()
    out = p | beam.Create(profiles, reshuffle=False) | WriteProfilesToRedis(redis_url, key_prefix=prefix, batch_size=4)
    applied = (out[WriteProfilesToRedis.WRITTEN]
               | beam.Filter(lambda r: r.applied)
               | beam.Map(lambda r: (r.user_key, r.version)))
    reasons = out[WriteProfilesToRedis.DEAD_LETTER] | beam.Map(lambda d: d["reason"])
    return p, applied, reasons


def test_write_profiles_to_redis_in_a_pipeline_and_replay_it(redis_url, admin, prefix):
    # u0 already holds a newer profile: the pipeline's one is stale.
    seed = RedisProfileWriter(redis_url, prefix)
    seed.write([encode_profile(profile("u0", T0 + 10_000))])
    seed.close()
    # Someone else's string sits where u9's hash belongs: Redis refuses that one write.
    admin.set(f"{prefix}:profile:{key_of('u9')}", "not a hash")
    profiles = [profile(f"u{i}", T0 + i, session_count=i) for i in range(10)] + [{"user_key": "raw-id", "version": 1}]

    p, applied, reasons = _run_write_pipeline(redis_url, prefix, profiles)
    assert_that(applied, equal_to([(key_of(f"u{i}"), T0 + i) for i in range(1, 9)]), label="Applied")
    assert_that(reasons, equal_to(["invalid_user_key", "redis_rejected"]), label="DeadLetters")
    result = p.run()
    result.wait_until_finish()
    counters = _counters(result)
    assert counters["profiles_written"] == 8
    assert counters["profiles_stale_skipped"] == 1
    assert counters["profile_store_dead_letter"] == 2
    for i in range(1, 9):
        got = stored(admin, prefix, f"u{i}")
        assert (got["version"], got["session_count"]) == (T0 + i, i)
    assert stored(admin, prefix, "u0")["version"] == T0 + 10_000

    # Replaying the same input (a restart from old offsets) writes nothing.
    p, applied, _ = _run_write_pipeline(redis_url, prefix, profiles)
    assert_that(applied, equal_to([]), label="NothingApplied")
    result = p.run()
    result.wait_until_finish()
    counters = _counters(result)
    assert counters.get("profiles_written", 0) == 0
    assert counters["profiles_stale_skipped"] == 9


def test_write_results_carry_the_write_time_for_latency(redis_url, prefix):
    started = int(time.time() * 1000)
    p = BeamTestPipeline()
    out = p | beam.Create([profile("u1", T0)]) | WriteProfilesToRedis(redis_url, key_prefix=prefix)
    assert_that(
        out[WriteProfilesToRedis.WRITTEN]
        | beam.Map(lambda r, s: (r.applied, r.version, s <= r.written_at <= s + 600_000), started),
        equal_to([(True, T0, True)]),
    )
    p.run().wait_until_finish()


def test_only_the_newest_profile_per_user_in_a_bundle_reaches_redis(redis_url, admin, prefix):
    fn = WriteProfilesToRedis(redis_url, prefix, 3600, batch_size=100, max_attempts=3).fn
    fn.setup()
    try:
        fn.start_bundle()
        window, ts = GlobalWindow(), Timestamp(0)
        emitted = []
        for version in (T0 + 2, T0 + 1, T0 + 3):
            emitted += list(fn.process(profile("u1", version), timestamp=ts, window=window))
        emitted += list(fn.finish_bundle())
    finally:
        fn.teardown()
    results = sorted(
        (getattr(e, "value", e).version, getattr(e, "value", e).applied) for e in emitted
    )
    assert results == [(T0 + 1, False), (T0 + 2, False), (T0 + 3, True)]
    assert stored(admin, prefix, "u1")["version"] == T0 + 3


# --------------------------------------------------------------------------- reads


def test_profile_store_finds_a_profile_by_raw_user_id(redis_url, writer, prefix):
    write(writer, profile("user-42", T0, plan="pro", feature_adoption={"export": 2}))
    with ProfileStore(redis_url, SECRET, key_prefix=prefix) as store:
        got = store.get("user-42")
        assert got["user_key"] == key_of("user-42")
        assert (got["plan"], got["feature_adoption"], got["version"]) == ("pro", {"export": 2}, T0)
        assert store.get("user-43") is None
        many = store.get_many(["user-43", "user-42"])
        assert many[0] is None and many[1]["plan"] == "pro"
        assert store.segment_members("activated") == {key_of("user-42")}
        assert 3590 <= store.ttl_s(key_of("user-42")) <= 3600


def test_sweep_removes_members_of_expired_or_left_segments(redis_url, writer, admin, prefix):
    write(writer, profile("gone", T0, segments=["a"]), profile("kept", T0, segments=["a"]))
    admin.pexpire(f"{prefix}:profile:{key_of('gone')}", 1)
    deadline = time.monotonic() + 5
    while admin.exists(f"{prefix}:profile:{key_of('gone')}") and time.monotonic() < deadline:
        time.sleep(0.01)
    admin.sadd(f"{prefix}:segment:b", key_of("kept"))  # a membership its profile does not list
    with ProfileStore(redis_url, key_prefix=prefix) as store:
        assert store.segment_members("a") == {key_of("gone"), key_of("kept")}  # the documented caveat
        report = store.sweep_segments()
        assert (report.segments_scanned, report.members_checked, report.members_removed) == (2, 3, 2)
        assert store.segment_members("a") == {key_of("kept")}
        assert store.segment_members("b") == set()


def test_profile_command_prints_the_profile_of_a_raw_user_id(redis_url, writer, prefix, tmp_path, capsys):
    write(writer, profile("user-7", T0, plan="team"))
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    base = ["--redis-url", redis_url, "--key-prefix", prefix, "--secret-file", str(secret_file)]
    assert profile_cli.main(["user-7", *base, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["plan"] == "team"
    assert "user-7" not in out
    assert profile_cli.main(["user-8", *base]) == 1
    assert "user-8" not in capsys.readouterr().err
    assert profile_cli.main(["--key", key_of("user-7"), "--redis-url", redis_url, "--key-prefix", prefix]) == 0
    assert "team" in capsys.readouterr().out
    assert profile_cli.main(["--sweep-segments", "--redis-url", redis_url, "--key-prefix", prefix]) == 0
    assert "removed 0" in capsys.readouterr().out


def test_profile_command_reads_the_secret_from_an_environment_variable(redis_url, writer, prefix, monkeypatch, capsys):
    write(writer, profile("user-9", T0))
    monkeypatch.setenv("OBF_TEST_SECRET", SECRET.decode())
    args = ["user-9", "--redis-url", redis_url, "--key-prefix", prefix, "--secret-env", "OBF_TEST_SECRET", "--json"]
    assert profile_cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["version"] == T0
    monkeypatch.delenv("OBF_TEST_SECRET")
    assert profile_cli.main(args) == 2
