"""Model version retention on the real Redis and PostgreSQL: what `prune` keeps, what it drops, and races.

Each test gets a private warehouse schema (all migrations applied) and a
private Redis key prefix, both removed afterwards.
"""
import hashlib
import threading

import psycopg
import pytest
from psycopg import sql

from onboardflow.models.model_registry import ModelRegistry, ModelVersion, RegistryError
from onboardflow.runners.cli import models as models_cli

pytestmark = pytest.mark.integration

SEG = "segmentation"


@pytest.fixture
def registry(model_registry):
    return model_registry


def _publish(registry, *payloads):
    for payload in payloads:
        registry.publish(SEG, payload, source="online")


def _payload_kept(registry, pg_dsn):
    """version -> whether the warehouse row still holds its payload, straight from SQL."""
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version, payload IS NOT NULL FROM {} WHERE kind = %s ORDER BY version").format(
                sql.Identifier(registry.schema, "model_versions")), [SEG]).fetchall()
    return dict(rows)


def _version_hashes(registry, redis_client):
    """Version numbers whose Redis hash exists (not just the zset: both must go)."""
    prefix = f"{registry.store.key_prefix}:model:{SEG}:v:"
    return sorted(int(k.decode()[len(prefix):]) for k in redis_client.scan_iter(match=f"{prefix}*"))


def _cli(registry, redis_url, pg_dsn, *args):
    return models_cli.main([*args, "--redis-url", redis_url, "--warehouse-dsn", pg_dsn,
                            "--warehouse-schema", registry.schema, "--key-prefix", registry.store.key_prefix])


def test_prune_keeps_exactly_the_newest_n_while_the_pointer_follows_publishes(registry, pg_dsn, redis_client):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 7)))

    assert registry.prune(SEG, keep_last=2) == [1, 2, 3, 4]

    assert _payload_kept(registry, pg_dsn) == {1: False, 2: False, 3: False, 4: False, 5: True, 6: True}
    assert registry.store.mirrored_versions(SEG) == [5, 6]
    assert _version_hashes(registry, redis_client) == [5, 6]
    assert registry.current(SEG).payload == b"v6"


def test_prune_keeps_the_pinned_rollback_and_what_recent_moves_served(registry, pg_dsn, redis_client):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 9)))
    registry.rollback(SEG, to_version=3, reason="bad clusters")
    _publish(registry, b"v9")  # recorded while pinned, not served

    pruned = registry.prune(SEG, keep_last=2)

    # newest two: 8, 9; the last two moves served 8 (publish) and 3 (rollback, pinned now)
    assert pruned == [1, 2, 4, 5, 6, 7]
    assert {n for n, kept in _payload_kept(registry, pg_dsn).items() if kept} == {3, 8, 9}
    assert _version_hashes(registry, redis_client) == [3, 8, 9]
    pointer = registry.pointer(SEG)
    assert (pointer.version, pointer.pinned) == (3, True)
    assert registry.current(SEG).payload == b"v3"
    # The history stays readable: every version and every move is still listed.
    versions = registry.versions(SEG)
    assert [(v.number, v.pruned) for v in versions] == [(n, n in pruned) for n in range(1, 10)]
    assert all(v.payload_size is None for v in versions if v.pruned)
    assert versions[0].payload_sha256 == hashlib.sha256(b"v1").hexdigest()
    assert [(e.action, e.to_version) for e in registry.events(SEG)][-2:] == [("publish", 8), ("rollback", 3)]
    # promote still serves the newest
    assert registry.promote(SEG).version == 9 and registry.current(SEG).payload == b"v9"


def test_dry_run_reports_the_same_versions_and_changes_nothing(registry, pg_dsn, redis_client):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 6)))

    assert registry.prune(SEG, keep_last=2, dry_run=True) == [1, 2, 3]

    assert all(_payload_kept(registry, pg_dsn).values())
    assert _version_hashes(registry, redis_client) == [1, 2, 3, 4, 5]
    assert registry.get(SEG, 1).payload == b"v1"
    assert registry.prune(SEG, keep_last=2) == [1, 2, 3]


def test_a_second_prune_is_a_no_op(registry, pg_dsn, redis_client):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 6)))
    first = registry.prune(SEG, keep_last=2)
    after_first = (_payload_kept(registry, pg_dsn), _version_hashes(registry, redis_client),
                   registry.versions(SEG), registry.events(SEG))

    assert registry.prune(SEG, keep_last=2) == []

    assert first == [1, 2, 3]
    assert (_payload_kept(registry, pg_dsn), _version_hashes(registry, redis_client),
            registry.versions(SEG), registry.events(SEG)) == after_first


def test_rollback_or_promote_to_a_pruned_version_is_refused_clearly(registry):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 6)))
    registry.prune(SEG, keep_last=2)  # prunes 1-3
    events_before = registry.events(SEG)

    with pytest.raises(RegistryError, match=r"seg-000002 was pruned on .* UTC \(retention\).*cannot be served"):
        registry.rollback(SEG, to_version="seg-000002")
    with pytest.raises(RegistryError, match="seg-000001 was pruned"):
        registry.promote(SEG, to_version=1)
    with pytest.raises(RegistryError, match="seg-000003 was pruned"):
        registry.get(SEG, 3)

    assert registry.events(SEG) == events_before
    assert registry.current(SEG).payload == b"v5"
    assert registry.describe(SEG, 3).pruned  # the metadata is still there
    # Stepping back without a target skips nothing it can serve, and says why it stops.
    assert registry.rollback(SEG).version == 4
    with pytest.raises(RegistryError, match="every segmentation version older than seg-000004 was pruned"):
        registry.rollback(SEG)
    assert registry.current(SEG).payload == b"v4"


def test_publishing_a_pruned_payload_again_restores_that_version(registry):
    _publish(registry, b"v1", b"v2", b"v3", b"v4")
    assert registry.prune(SEG, keep_last=1) == [1, 2, 3]

    result = registry.publish(SEG, b"v2", source="train")

    assert (result.version.number, result.created, result.serving) == (2, False, False)
    assert registry.get(SEG, 2).payload == b"v2"
    assert registry.store.get(SEG, 2).payload == b"v2"  # mirrored, ready to serve
    assert registry.rollback(SEG, to_version=2).version == 2
    assert registry.current(SEG).payload == b"v2"
    assert [v.number for v in registry.versions(SEG)] == [1, 2, 3, 4]


def test_keep_days_keeps_versions_published_or_served_within_that_many_days(registry, pg_dsn):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 6)))
    assert registry.prune(SEG, keep_last=1, keep_days=1) == []  # all published just now
    # Make versions 1-3 and the moves that served them three days old.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(sql.SQL("UPDATE {} SET created_at = created_at - interval '3 days' "
                             "WHERE kind = %s AND version <= 3").format(
                                 sql.Identifier(registry.schema, "model_versions")), [SEG])
        conn.execute(sql.SQL("UPDATE {} SET at = at - interval '3 days' WHERE kind = %s AND to_version <= 3").format(
            sql.Identifier(registry.schema, "model_events")), [SEG])

    # 3 was served until the (recent) move to 4, so it was served within the last day.
    assert registry.prune(SEG, keep_last=1, keep_days=1) == [1, 2]
    assert registry.prune(SEG, keep_last=1, keep_days=5) == []
    assert registry.prune(SEG, keep_last=1) == [3, 4]


def test_prune_keeps_the_version_redis_still_serves_while_its_mirror_is_pending(registry, redis_client):
    _publish(registry, b"v1", b"v2", b"v3")
    # The warehouse moved the pointer to 3 but Redis still serves 1 (the mirror
    # step failed and no retry or sync has run yet).
    redis_client.delete(registry.store.current_key(SEG))
    registry.store.mirror(registry.get(SEG, 1), registry.pointer(SEG)._replace(version=1, generation=1))
    assert registry.current(SEG).payload == b"v1"

    assert registry.prune(SEG, keep_last=1) == [2]

    assert registry.current(SEG).payload == b"v1"
    assert registry.get(SEG, 1).payload == b"v1"
    assert registry.sync(SEG) == 2
    assert registry.current(SEG).payload == b"v3"


def test_a_version_mirrored_again_after_its_prune_is_dropped_by_the_next_prune(registry, redis_client):
    _publish(registry, b"v1", b"v2", b"v3", b"v4")
    registry.prune(SEG, keep_last=1)
    # A slow publisher's mirror of version 2 lands after the prune dropped it.
    late = ModelVersion(SEG, 2, hashlib.sha256(b"v2").hexdigest(), registry.describe(SEG, 2).created_at,
                        payload=b"v2")
    registry.store.mirror(late)
    assert _version_hashes(registry, redis_client) == [2, 4]

    assert registry.prune(SEG, keep_last=1) == []  # nothing new in the warehouse ...

    assert _version_hashes(registry, redis_client) == [4]  # ... but Redis is swept
    assert registry.store.mirrored_versions(SEG) == [4]


def test_sync_mirrors_only_kept_versions(registry, redis_client):
    _publish(registry, b"v1", b"v2", b"v3", b"v4")
    registry.prune(SEG, keep_last=2)
    for key in redis_client.scan_iter(match=f"{registry.store.key_prefix}:model:*"):
        redis_client.delete(key)

    assert registry.sync(SEG) == 2

    assert _version_hashes(registry, redis_client) == [3, 4]
    assert registry.current(SEG).payload == b"v4"
    # A pruned version Redis still holds (a late mirror) is deleted by sync too.
    registry.store.mirror(ModelVersion(SEG, 1, hashlib.sha256(b"v1").hexdigest(),
                                       registry.describe(SEG, 1).created_at, payload=b"v1"))
    assert registry.sync(SEG) == 2
    assert _version_hashes(registry, redis_client) == [3, 4]


def test_prune_waits_for_the_kind_lock_a_publisher_holds(registry, pg_dsn):
    _publish(registry, b"v1", b"v2", b"v3")
    result = []
    with psycopg.connect(pg_dsn) as conn, conn.transaction():
        registry._lock(conn, SEG)  # what publish holds while it numbers a version and moves the pointer
        pruner = threading.Thread(target=lambda: result.append(registry.prune(SEG, keep_last=1)))
        pruner.start()
        pruner.join(timeout=1.0)
        assert pruner.is_alive() and result == []
    pruner.join(timeout=30)

    assert result == [[1, 2]]


def test_prune_racing_publishers_and_readers_never_loses_the_served_or_newest_versions(
        registry, redis_url, pg_dsn, redis_client):
    publishers, per_publisher, keep_last = 3, 8, 3
    errors, done = [], threading.Event()

    def publish(p):
        try:
            with ModelRegistry(redis_url, pg_dsn, registry.schema, registry.store.key_prefix) as own:
                for i in range(per_publisher):
                    own.publish(SEG, f"model-{p}-{i}".encode(), source="online")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def prune():
        try:
            with ModelRegistry(redis_url, pg_dsn, registry.schema, registry.store.key_prefix) as own:
                while not done.is_set():
                    own.prune(SEG, keep_last=keep_last)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def read():
        try:
            while not done.is_set():
                served = registry.store.current(SEG)
                if served is not None and hashlib.sha256(served.payload).hexdigest() != served.payload_sha256:
                    errors.append(AssertionError(f"{served.id} served with a payload that is not its own"))
        except Exception as exc:  # noqa: BLE001 - a pointer to a dropped hash fails here
            errors.append(exc)

    background = [threading.Thread(target=prune), threading.Thread(target=read)]
    writers = [threading.Thread(target=publish, args=(p,)) for p in range(publishers)]
    for t in background + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in background:
        t.join()
    registry.prune(SEG, keep_last=keep_last)

    assert errors == []
    total = publishers * per_publisher
    newest = list(range(total - keep_last + 1, total + 1))
    assert [v.number for v in registry.versions(SEG)] == list(range(1, total + 1))
    assert [n for n, kept in _payload_kept(registry, pg_dsn).items() if kept] == newest
    assert _version_hashes(registry, redis_client) == newest
    assert registry.store.mirrored_versions(SEG) == newest
    assert registry.pointer(SEG).version == total
    assert registry.current(SEG).payload == registry.get(SEG, total).payload


def test_prune_of_a_kind_never_published_or_for_a_bad_retention(registry):
    assert registry.prune(SEG, keep_last=1) == []
    with pytest.raises(RegistryError, match="keep_last"):
        registry.prune(SEG, keep_last=0)
    with pytest.raises(RegistryError, match="keep_days"):
        registry.prune(SEG, keep_last=1, keep_days=-1)
    with pytest.raises(RegistryError, match="unknown model kind"):
        registry.prune("churn", keep_last=1)


def test_models_prune_command_prints_what_it_prunes(registry, redis_url, pg_dsn, capsys):
    _publish(registry, *(f"v{i}".encode() for i in range(1, 6)))

    assert _cli(registry, redis_url, pg_dsn, "prune", "--kind", SEG, "--keep-last", "2", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "segmentation: would prune 3 versions (6 payload bytes): seg-000001..seg-000003" in out
    assert "2 versions would keep their payload" in out
    assert not any(v.pruned for v in registry.versions(SEG))

    assert _cli(registry, redis_url, pg_dsn, "prune", "--kind", SEG, "--keep-last", "2") == 0
    assert "segmentation: pruned 3 versions (6 payload bytes): seg-000001..seg-000003" in capsys.readouterr().out

    assert _cli(registry, redis_url, pg_dsn, "list", "--kind", SEG) == 0
    listing = capsys.readouterr().out
    assert "  seg-000001" in listing and "  pruned" in listing and "* seg-000005" in listing
    assert _cli(registry, redis_url, pg_dsn, "show", "--kind", SEG, "--version", "1") == 0
    shown = capsys.readouterr().out
    assert "payload_bytes   None" in shown and "pruned_at" in shown
    assert _cli(registry, redis_url, pg_dsn, "rollback", "--kind", SEG, "--to", "seg-000001") == 2
    assert "seg-000001 was pruned" in capsys.readouterr().err

    assert _cli(registry, redis_url, pg_dsn, "prune", "--kind", SEG, "--keep-last", "2") == 0
    assert "segmentation: nothing to prune (2 versions keep their payload)" in capsys.readouterr().out
    assert _cli(registry, redis_url, pg_dsn, "prune", "--kind", SEG, "--keep-last", "0") == 2
    assert "keep_last" in capsys.readouterr().err
