"""The model registry on the real Redis and PostgreSQL: publish, serve, roll back, recover.

Each test gets a private warehouse schema (all migrations applied) and a private
Redis key prefix, both removed afterwards.
"""
import threading

import psycopg
import pytest
from psycopg import sql

from onboardflow.models.model_registry import ModelRegistry, RegistryError
from onboardflow.runners.cli import models as models_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(model_registry):
    return model_registry


def _cli(registry, redis_url, pg_dsn, *args):
    return models_cli.main([*args, "--redis-url", redis_url, "--warehouse-dsn", pg_dsn,
                            "--warehouse-schema", registry.schema, "--key-prefix", registry.store.key_prefix])


def test_first_publish_is_served_from_redis_and_kept_in_the_warehouse(registry, redis_client):
    result = registry.publish("segmentation", b"model-A", counts={"users": 120}, metrics={"silhouette": 0.51},
                              source="train")

    assert (result.version.id, result.created, result.serving) == ("seg-000001", True, True)
    served = registry.current("segmentation")
    assert served.payload == b"model-A" and served.number == 1
    assert served.counts == {"users": 120} and served.metrics == {"silhouette": 0.51}
    assert registry.get("segmentation", "seg-000001").payload == b"model-A"
    prefix = registry.store.key_prefix
    assert redis_client.hget(f"{prefix}:model:segmentation:current", "version_id") == b"seg-000001"
    assert redis_client.hget(f"{prefix}:model:segmentation:v:1", "payload") == b"model-A"
    assert [(e.action, e.from_version, e.to_version) for e in registry.events("segmentation")] == [
        ("publish", None, 1)]
    assert registry.current("propensity") is None


def test_retried_publish_of_the_same_payload_returns_the_same_version(registry):
    first = registry.publish("segmentation", b"model-A", counts={"users": 1})
    retried = registry.publish("segmentation", b"model-A", counts={"users": 1})

    assert retried.version.number == first.version.number == 1
    assert retried.created is False and retried.serving is True
    assert [v.number for v in registry.versions("segmentation")] == [1]
    assert len(registry.events("segmentation")) == 1


def test_each_new_payload_gets_the_next_version_and_is_served(registry):
    numbers = [registry.publish("propensity", f"model-{i}".encode()).version.id for i in range(3)]

    assert numbers == ["prop-000001", "prop-000002", "prop-000003"]
    assert registry.current("propensity").payload == b"model-2"
    # kinds are numbered independently
    assert registry.publish("segmentation", b"model-0").version.number == 1


def test_rollback_serves_the_previous_version_pins_it_and_keeps_history(registry):
    for payload in (b"v1", b"v2", b"v3"):
        registry.publish("segmentation", payload)

    pointer = registry.rollback("segmentation", reason="bad clusters")

    assert (pointer.version, pointer.pinned) == (2, True)
    assert registry.current("segmentation").payload == b"v2"
    assert [v.number for v in registry.versions("segmentation")] == [1, 2, 3]
    last = registry.events("segmentation")[-1]
    assert (last.action, last.from_version, last.to_version, last.reason) == ("rollback", 3, 2, "bad clusters")
    # A second rollback steps back once more.
    assert registry.rollback("segmentation").version == 1
    assert registry.current("segmentation").payload == b"v1"


def test_publish_while_pinned_records_the_version_but_keeps_serving_the_rollback(registry):
    registry.publish("segmentation", b"v1")
    registry.publish("segmentation", b"v2")
    registry.rollback("segmentation")

    result = registry.publish("segmentation", b"v3")

    assert (result.version.number, result.created, result.serving) == (3, True, False)
    assert registry.current("segmentation").payload == b"v1"
    assert registry.store.get("segmentation", 3).payload == b"v3"  # mirrored, ready to promote

    pointer = registry.promote("segmentation")
    assert (pointer.version, pointer.pinned) == (3, False)
    assert registry.current("segmentation").payload == b"v3"
    assert registry.publish("segmentation", b"v4").serving is True


def test_rollback_to_a_named_version_is_idempotent(registry):
    for payload in (b"v1", b"v2", b"v3"):
        registry.publish("segmentation", payload)

    registry.rollback("segmentation", to_version="seg-000001")
    again = registry.rollback("segmentation", to_version=1)

    assert again.version == 1
    assert registry.current("segmentation").payload == b"v1"
    assert [e.action for e in registry.events("segmentation")] == ["publish"] * 3 + ["rollback"]


@pytest.mark.parametrize("to, message", [
    (None, "oldest"), ("seg-000009", "does not exist"), ("prop-000001", "not a segmentation version"),
])
def test_rollback_that_cannot_be_done_is_refused_and_changes_nothing(registry, to, message):
    registry.publish("segmentation", b"v1")

    with pytest.raises(RegistryError, match=message):
        registry.rollback("segmentation", to_version=to)
    assert registry.pointer("segmentation").version == 1
    assert len(registry.events("segmentation")) == 1


def test_rollback_forward_is_refused_in_favour_of_promote(registry):
    registry.publish("segmentation", b"v1")
    registry.publish("segmentation", b"v2")
    registry.rollback("segmentation")

    with pytest.raises(RegistryError, match="use promote"):
        registry.rollback("segmentation", to_version=2)


def test_retried_publish_completes_a_publish_whose_redis_mirror_was_lost(registry, redis_client):
    registry.publish("segmentation", b"v1")
    # The warehouse committed but Redis lost the mirror (a crash between the two
    # steps, or a Redis restart without persistence).
    for key in redis_client.scan_iter(match=f"{registry.store.key_prefix}:model:*"):
        redis_client.delete(key)
    assert registry.current("segmentation") is None

    result = registry.publish("segmentation", b"v1")

    assert (result.version.number, result.created) == (1, False)
    assert registry.current("segmentation").payload == b"v1"


def test_sync_rebuilds_the_serving_copy_from_the_warehouse(registry, redis_client):
    for payload in (b"v1", b"v2", b"v3"):
        registry.publish("segmentation", payload)
    registry.rollback("segmentation", to_version=2)
    for key in redis_client.scan_iter(match=f"{registry.store.key_prefix}:model:*"):
        redis_client.delete(key)

    assert registry.sync("segmentation") == 3

    assert registry.current("segmentation").payload == b"v2"
    assert registry.store.mirrored_versions("segmentation") == [1, 2, 3]
    assert redis_client.hget(f"{registry.store.key_prefix}:model:segmentation:current", "pinned") == b"1"


def test_a_stale_mirror_never_moves_the_served_pointer_back(registry):
    registry.publish("segmentation", b"v1")
    registry.publish("segmentation", b"v2")
    old_version = registry.get("segmentation", 1)
    old_pointer = registry.pointer("segmentation")._replace(version=1, generation=1)

    # A writer that decided "v1" long ago mirrors late: Redis keeps the newer generation.
    assert registry.store.mirror(old_version, old_pointer) is False

    assert registry.current("segmentation").payload == b"v2"


def test_concurrent_publishers_get_distinct_versions_and_redis_ends_on_the_newest(registry, redis_url, pg_dsn):
    errors = []

    def publish(i):
        try:
            with ModelRegistry(redis_url, pg_dsn, registry.schema, registry.store.key_prefix) as own:
                own.publish("segmentation", f"model-{i}".encode())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert [v.number for v in registry.versions("segmentation")] == [1, 2, 3, 4, 5, 6]
    assert registry.pointer("segmentation").version == 6
    assert registry.current("segmentation").number == 6


def test_registry_rejects_unknown_kinds_and_non_finite_metrics(registry):
    with pytest.raises(RegistryError, match="unknown model kind"):
        registry.publish("churn", b"x")
    with pytest.raises(RegistryError, match="finite"):
        registry.publish("segmentation", b"x", metrics={"silhouette": float("nan")})
    assert registry.versions("segmentation") == []


def test_models_command_lists_shows_and_rolls_back(registry, redis_url, pg_dsn, capsys):
    registry.publish("segmentation", b"v1", counts={"users": 10}, metrics={"k": 3, "silhouette": 0.5},
                     source="train")
    registry.publish("segmentation", b"v2", counts={"users": 20}, metrics={"k": 4, "silhouette": 0.4},
                     source="train")

    assert _cli(registry, redis_url, pg_dsn, "rollback", "--kind", "segmentation", "--reason", "drift") == 0
    assert "serving seg-000001 (pinned)" in capsys.readouterr().out

    assert _cli(registry, redis_url, pg_dsn, "list", "--kind", "segmentation") == 0
    listing = capsys.readouterr().out
    assert "* seg-000001" in listing and "  seg-000002" in listing
    assert "k=3 silhouette=0.500" in listing and "pinned" in listing
    assert "rollback seg-000002 -> seg-000001  (drift)" in listing

    assert _cli(registry, redis_url, pg_dsn, "show", "--kind", "segmentation", "--version", "2") == 0
    shown = capsys.readouterr().out
    assert "seg-000002" in shown and "serving         False" in shown
    assert "payload_bytes   2" in shown and '"users": 20' in shown

    assert _cli(registry, redis_url, pg_dsn, "rollback", "--kind", "segmentation") == 2
    assert "oldest" in capsys.readouterr().err


def test_models_command_says_when_the_migration_is_missing(redis_url, pg_dsn, warehouse_schema,
                                                           redis_key_prefix, capsys):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(warehouse_schema)))

    code = models_cli.main(["list", "--kind", "segmentation", "--redis-url", redis_url, "--warehouse-dsn", pg_dsn,
                            "--warehouse-schema", warehouse_schema, "--key-prefix", redis_key_prefix])

    assert code == 2
    assert "onboardflow warehouse migrate" in capsys.readouterr().err
