"""Shared fixtures: the real local services started by `make services-up`.

Integration tests talk to the same Kafka, Redis and PostgreSQL as the demo;
their addresses come from the same variables as runners/services/env.sh.
Each test gets uniquely named topics / key prefixes / schemas and cleans up.
"""
import contextlib
import math
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

KAFKA_BOOTSTRAP = f"{os.environ.get('KAFKA_HOST', '127.0.0.1')}:{os.environ.get('KAFKA_PORT', '9092')}"
REDIS_URL = f"redis://{os.environ.get('REDIS_HOST', '127.0.0.1')}:{os.environ.get('REDIS_PORT', '6379')}/0"
PG_DSN = (
    f"postgresql://{os.environ.get('PG_USER', 'onboardflow')}:{os.environ.get('PG_PASSWORD', 'onboardflow')}"
    f"@{os.environ.get('PG_HOST', '127.0.0.1')}:{os.environ.get('PG_PORT', '5432')}"
    f"/{os.environ.get('PG_DATABASE', 'onboardflow')}"
)


FLINK_SH = Path(__file__).resolve().parents[1] / "runners" / "flink" / "flink.sh"


@contextlib.contextmanager
def local_flink_cluster():
    """The local Flink cluster (runners/flink/flink.sh) for a test module.

    Started with ``flink.sh up`` when it is not healthy, and stopped again at
    the end only in that case.
    """
    health = subprocess.run([str(FLINK_SH), "health"], capture_output=True, text=True)
    started_here = health.returncode != 0
    if started_here:
        subprocess.run([str(FLINK_SH), "up"], check=True)
    try:
        yield
    finally:
        if started_here:
            subprocess.run([str(FLINK_SH), "down"], check=True)


@pytest.fixture(scope="session")
def kafka_bootstrap():
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def redis_url():
    return REDIS_URL


@pytest.fixture(scope="session")
def pg_dsn():
    return PG_DSN


@pytest.fixture
def unique_name(request):
    """A name unique to this test run, for topics, key prefixes and groups."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka_topic(kafka_bootstrap, unique_name):
    """Factory: create a fresh topic with N partitions; deleted after the test."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="onboardflow-tests")
    created = []

    def make(partitions=4, suffix="events"):
        name = f"{unique_name}.{suffix}"
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        created.append(name)
        return name

    yield make
    if created:
        try:
            admin.delete_topics(created)
        except Exception:  # noqa: BLE001 - cleanup must not mask the test result
            pass
    admin.close()


@pytest.fixture
def redis_key_prefix(redis_url, unique_name):
    """A Redis key prefix unique to this test; every key under it is deleted after."""
    yield unique_name
    delete_redis_prefix(redis_url, unique_name)


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (a test's own prefix) from the Redis at ``redis_url``."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def warehouse_schema(pg_dsn, unique_name):
    """A PostgreSQL schema name unique to this test (not created); dropped after, with its tables."""
    import re

    import psycopg
    from psycopg import sql

    name = re.sub(r"[^a-z0-9_]", "_", unique_name.lower())[:63]
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def model_registry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix):
    """A ``ModelRegistry`` over a freshly migrated schema (every migration: V003 models, V005 retention, ...)."""
    from onboardflow.models.model_registry import ModelRegistry
    from onboardflow.transforms.warehouse.migrations import apply_migrations

    applied = [m.label for m in apply_migrations(pg_dsn, warehouse_schema)]
    assert {"V003__models", "V005__model_retention"} <= set(applied)
    with ModelRegistry(redis_url, pg_dsn, schema=warehouse_schema, key_prefix=redis_key_prefix) as registry:
        yield registry


@pytest.fixture
def redis_client(redis_url):
    """A plain redis-py client on the test Redis, closed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _assert_same_profiles(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    """Two runs' profiles, keyed alike, field by field; floats (decayed scores) to 1e-9 relative.

    The decayed scores are incremental sums whose last bits depend on the
    order events are folded in (transforms/score.py documents and tests order
    independence to 1e-9 relative), and two runs of the same input need not
    fold a user's events in the same order: bundles differ. Measured: one
    ``engagement_score`` differing in its last digit in 1 of 25 repetitions of
    an in-process vs worker-pool run. Everything else must be identical. The
    failure lists (user, field, actual, expected) rather than a diff of two
    big dicts, which pytest truncates into a misleading whole-profile block.
    """
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert (missing, extra) == ([], []), f"profiles only in the expected run: {missing}; only in the other: {extra}"
    differences = []
    for user_key, want_profile in sorted(expected.items()):
        got_profile = actual[user_key]
        for name in sorted(want_profile.keys() | got_profile.keys()):
            want, got = want_profile.get(name), got_profile.get(name)
            same = (math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
                    if isinstance(want, float) and isinstance(got, float) else got == want)
            if not same:
                differences.append((user_key[-12:], name, got, want))
    assert differences == [], f"{len(differences)} fields differ (user, field, actual, expected)"


@pytest.fixture(scope="session")
def assert_same_profiles():
    """``assert_same_profiles(actual, expected)``: decoded profiles of two runs, equal up to float ulps."""
    return _assert_same_profiles


@pytest.fixture
def registry_copy(tmp_path):
    """A writable copy of the shipped schema registry file (tests never change the shipped one)."""
    from onboardflow.schemas import REGISTRY_FILE

    path = tmp_path / "registry.json"
    shutil.copy(REGISTRY_FILE, path)
    return path
