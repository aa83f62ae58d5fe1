"""Redis and PostgreSQL with TLS and authentication (docs/security.md "Transport and credentials").

A private pair of secure services is started by the project's own script
(``runners/services/services.sh secure-up``) on free ports, with its run
directory under /tmp: the script generates the CA, the certificates and every
password there and writes the endpoints to ``services.secure.env``; the
plaintext services of ``make services-up`` are not touched. The pipeline's
real writers then run over TLS as their least-privilege users, the other
users are shown what they may not do, wrong credentials and missing
certificates are refused with a clear error, and no generated password shows
in logs, exception text, ``ps`` output or the env file.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import redis

from onboardflow.models.model_registry import ModelRegistry
from onboardflow.runners.settings import Settings, read_services_env
from onboardflow.transforms.connections import CredentialsError, redis_client, warehouse_connect
from onboardflow.transforms.profile_store.sink import ProfileSink
from onboardflow.transforms.profile_store.store import ProfileStore
from onboardflow.transforms.warehouse.migrations import MigrationError, WarehouseRoles, apply_migrations
from onboardflow.transforms.warehouse.rows import EVENTS, SEGMENT_CHANGES
from onboardflow.transforms.warehouse.sink import WarehouseSink

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).resolve().parents[2] / "runners" / "services" / "services.sh"
PREFIX = "sec"  # the deployment's key prefix: the pipeline user's ACL allows sec:* only
SCHEMA = "secure_wh"
SECRET = b"security-test-secret-0123456789abcdef"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SecureServices:
    """The endpoints ``services.sh secure-up`` wrote, and the secrets it generated (for the leak checks)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.env_file = run_dir / "services.secure.env"
        self.endpoints = read_services_env(self.env_file)
        self.ca = run_dir / "tls" / "ca.crt"
        self.secrets_dir = run_dir / "secrets"
        self.passwords = {p.name: p.read_text().strip() for p in self.secrets_dir.glob("*.password")}

    def __getitem__(self, name: str) -> str:
        return self.endpoints[name]

    def assert_no_secret_in(self, text: str) -> None:
        assert self.passwords and all(len(p) >= 32 for p in self.passwords.values())
        leaked = [name for name, password in self.passwords.items() if password in text]
        assert not leaked, f"secrets {leaked} appear in the output"


@pytest.fixture(scope="module")
def secure():
    # initdb runs as the postgres OS user, which must reach the run dir: not under pytest's 0700 tmp.
    run_dir = Path(tempfile.mkdtemp(prefix="obf-secure-services-", dir="/tmp"))
    os.chmod(run_dir, 0o755)
    env = {**os.environ, "OBF_RUN_DIR": str(run_dir), "OBF_SECURITY": "tls",
           "REDIS_TLS_PORT": str(free_port()), "PG_TLS_PORT": str(free_port()), "REDIS_ACL_PREFIX": PREFIX,
           "OBF_SECURE_SERVICES": "redis postgres"}  # Kafka: test_security_kafka.py
    env.pop("OBF_TLS_DIR", None), env.pop("OBF_SECRETS_DIR", None)
    try:
        done = subprocess.run(["bash", str(SERVICES), "secure-up"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        services = SecureServices(run_dir)
        services.assert_no_secret_in(done.stdout + done.stderr)
        yield services
    finally:
        subprocess.run(["bash", str(SERVICES), "secure-down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def migrated(secure):
    """The warehouse schema, migrated by the owner role, which grants the pipeline and reader roles."""
    roles = WarehouseRoles(secure["OBF_WAREHOUSE_PIPELINE_ROLE"], secure["OBF_WAREHOUSE_READER_ROLE"])
    applied = apply_migrations(secure["OBF_WAREHOUSE_OWNER_DSN"], SCHEMA, roles=roles)
    assert "V007__day_partition_function" in [m.label for m in applied]
    return SCHEMA


def key_of(user_id: str) -> str:
    return hmac.new(SECRET, user_id.encode(), hashlib.sha256).hexdigest()


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- what the files hold


def test_the_env_file_names_tls_endpoints_and_password_files_but_holds_no_secret(secure):
    text = secure.env_file.read_text()
    secure.assert_no_secret_in(text)
    assert secure["OBF_REDIS_URL"].startswith("rediss://onboardflow-pipeline@")
    assert "sslmode=verify-full" in secure["OBF_WAREHOUSE_DSN"]
    assert "passfile=" in secure["OBF_WAREHOUSE_DSN"]
    # Every flag the pipeline is launched with (its argv) is free of secrets too.
    settings = Settings.load({k: v for k, v in secure.endpoints.items()} | {"OBF_RUN_DIR": str(secure.run_dir)})
    secure.assert_no_secret_in(" ".join(settings.pipeline_flags()) + settings.describe())
    for path in [*secure.secrets_dir.iterdir(), secure.run_dir / "tls" / "ca.key"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def written(secure):
    """Three profiles (users u0..u2) written by the pipeline's profile sink as the pipeline user."""
    sink = ProfileSink(secure["OBF_REDIS_URL"], PREFIX, profile_ttl_s=3600, batch_size=10)
    t = now_ms() - 60_000
    for n in range(3):
        sink.add({"user_key": key_of(f"u{n}"), "version": t * 1000 + 1, "updated_at": t,
                  "segments": ["activated"], "engagement_score": 1.5 + n})
    records = sink.flush()
    sink.close()
    return records


def test_the_profile_sink_writes_profiles_and_outbox_entries_over_tls_as_the_pipeline_user(secure, written):
    assert [r.result.applied for r in written] == [True, True, True]

    client = redis_client(secure["OBF_REDIS_URL"])
    try:
        assert client.connection_pool.connection_class is redis.SSLConnection
        assert client.scard(f"{PREFIX}:segment:activated") == 3
        assert client.xlen(f"{PREFIX}:outbox:segment-changes") >= 3
    finally:
        client.close()
    with ProfileStore(secure["OBF_REDIS_APP_URL"], SECRET, PREFIX) as store:
        assert store.get("u1")["engagement_score"] == 2.5
        assert store.segment_members("activated") == {key_of(f"u{n}") for n in range(3)}


def test_the_pipeline_user_stays_in_its_prefix_and_cannot_administer(secure):
    client = redis_client(secure["OBF_REDIS_URL"])
    try:
        client.set(f"{PREFIX}:scratch", "1")  # its own prefix: allowed
        for refused in (lambda: client.set("other:scratch", "1"), lambda: client.get("obf:profile:x"),
                        client.flushall, client.flushdb, lambda: client.keys("*"),
                        lambda: client.config_get("*"), client.acl_list, client.client_list,
                        client.script_flush, client.function_flush, lambda: client.move(f"{PREFIX}:scratch", 1)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        # A script runs with the caller's rights: it cannot reach outside the prefix either.
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            client.eval("return redis.call('GET', 'other:key')", 0)
    finally:
        client.close()


def test_the_app_user_reads_profiles_and_a_write_is_refused_with_noperm(secure, written):
    app = redis_client(secure["OBF_REDIS_APP_URL"])
    try:
        key = f"{PREFIX}:profile:{key_of('u0')}"
        assert app.hget(key, "user_key").decode() == key_of("u0")
        with pytest.raises(redis.exceptions.NoPermissionError, match="hset"):
            app.hset(key, "engagement_score", "99")
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.delete(key)
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.xlen(f"{PREFIX}:outbox:segment-changes")  # not a profile key
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.eval("return 1", 0)
    finally:
        app.close()


def test_a_client_certificate_and_a_password_variable_are_accepted_too(secure, written, monkeypatch):
    tls = secure.run_dir / "tls"
    monkeypatch.setenv("OBF_TEST_REDIS_PASSWORD", secure.passwords["redis-app.password"])
    url = (secure["OBF_REDIS_APP_URL"].split("password_file=")[0]
           + f"ssl_certfile={tls}/client.crt&ssl_keyfile={tls}/client.key&password_env=OBF_TEST_REDIS_PASSWORD")
    client = redis_client(url)
    try:
        assert client.ping()
        assert client.hget(f"{PREFIX}:profile:{key_of('u2')}", "user_key").decode() == key_of("u2")
    finally:
        client.close()


def test_a_wrong_redis_password_is_refused_with_a_clear_error_that_does_not_show_it(secure, tmp_path, caplog):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-" + "x" * 32 + "\n")
    url = secure["OBF_REDIS_URL"].split("password_file=")[0] + f"password_file={wrong}"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(redis.exceptions.AuthenticationError, match="invalid username-password pair") as err:
            redis_client(url).ping()
    assert wrong.read_text().strip() not in str(err.value) + caplog.text
    secure.assert_no_secret_in(str(err.value) + repr(err.value) + caplog.text)
    with pytest.raises(CredentialsError, match="missing.password"):
        redis_client(url.replace(str(wrong), str(tmp_path / "missing.password")))


def test_redis_without_the_ca_or_in_plaintext_is_refused_with_a_clear_error(secure):
    url = secure["OBF_REDIS_URL"]
    without_ca = url.replace(f"ssl_ca_certs={secure.ca}&", "")
    assert "ssl_ca_certs" not in without_ca
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis_client(without_ca, socket_timeout=5).ping()
    plaintext = without_ca.replace("rediss://", "redis://")
    with pytest.raises(redis.exceptions.ConnectionError) as err:
        redis_client(plaintext, socket_timeout=5, socket_connect_timeout=5).ping()
    assert not isinstance(err.value, redis.exceptions.AuthenticationError)
    assert "reset by peer" in str(err.value) or "closed" in str(err.value)


def test_the_cli_says_in_one_line_that_redis_refused_the_credentials(secure, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong-" + "y" * 40)
    secret_file = tmp_path / "pseudonym.key"
    secret_file.write_bytes(SECRET)
    url = secure["OBF_REDIS_APP_URL"].split("password_file=")[0] + f"password_file={wrong}"
    done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", "profile", "u1", "--redis-url", url,
                           "--key-prefix", PREFIX, "--secret-file", str(secret_file)],
                          env={**os.environ, "OBF_RUN_DIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "refused the credentials" in line and "invalid username-password pair" in line
    assert wrong.read_text() not in done.stdout + done.stderr
    secure.assert_no_secret_in(done.stdout + done.stderr)


# --------------------------------------------------------------------------- PostgreSQL


def test_the_warehouse_writer_writes_rows_over_tls_as_the_pipeline_role(secure, migrated):
    today = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    events = WarehouseSink(secure["OBF_WAREHOUSE_DSN"], EVENTS, migrated, batch_size=10)
    for n in range(4):
        events.add({"event_id": f"sec-{n}", "occurred_at": int(today.timestamp() * 1000) - n,
                    "event_type": "login", "user_key": key_of(f"u{n}"), "properties": {}})
    events.flush()
    events.close()
    with warehouse_connect(secure["OBF_WAREHOUSE_READER_DSN"], autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {migrated}.events WHERE event_id LIKE 'sec-%'").fetchone()[0] == 4
        # The day partition was made by create_day_partition (V007), owned by the owner role.
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = %s",
                             [migrated, f"events_p{today:%Y%m%d}"]).fetchone()
        assert owner == (secure["OBF_WAREHOUSE_OWNER_DSN"].split("//")[1].split("@")[0],)
        ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        assert ssl is True


def test_the_model_registry_publishes_through_both_stores_as_the_pipeline(secure, migrated):
    with ModelRegistry(secure["OBF_REDIS_URL"], secure["OBF_WAREHOUSE_DSN"], schema=migrated,
                       key_prefix=PREFIX) as registry:
        published = registry.publish("segmentation", b"model-bytes-1", source="security-test")
        assert registry.current("segmentation").number == published.version.number


def test_the_pipeline_role_cannot_change_the_schema(secure, migrated):
    with warehouse_connect(secure["OBF_WAREHOUSE_DSN"], autocommit=True) as conn:
        for ddl in (f"CREATE TABLE {migrated}.intruder (a int)", "CREATE TABLE public.intruder (a int)",
                    "CREATE SCHEMA intruder", f"DROP TABLE {migrated}.events",
                    f"ALTER TABLE {migrated}.events ADD COLUMN x int", f"DELETE FROM {migrated}.accounts"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)
        # Its one DDL door, create_day_partition, makes day partitions of partitioned tables only,
        # and none outside the writer's horizon (so it cannot be made to create thousands of tables).
        with pytest.raises(psycopg.errors.UndefinedTable, match="not a partitioned table"):
            conn.execute(f"SELECT {migrated}.create_day_partition('accounts', current_date)")
        assert conn.execute(f"SELECT {migrated}.create_day_partition('events', current_date + 30)").fetchone() == (
            False,)
        # Its search_path puts the caller's temporary schema last: a temporary look-alike of a
        # catalog it reads changes nothing.
        conn.execute("CREATE TEMP TABLE pg_partitioned_table (partrelid oid)")
        with pytest.raises(psycopg.errors.UndefinedTable, match="not a partitioned table"):
            conn.execute(f"SELECT {migrated}.create_day_partition('accounts', current_date)")
        assert conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'create_day_partition'").fetchone() == (
            [f"search_path={migrated}, pg_catalog, pg_temp"],)
    # Its migrate step applies nothing: with everything applied it is a no-op; asked to grant, it refuses.
    assert apply_migrations(secure["OBF_WAREHOUSE_DSN"], migrated) == []
    with pytest.raises(MigrationError, match="may not change schema"):
        apply_migrations(secure["OBF_WAREHOUSE_DSN"], migrated, roles=WarehouseRoles(reader="onboardflow_reader"))


def test_the_reader_role_can_select_but_an_insert_is_refused(secure, migrated):
    with warehouse_connect(secure["OBF_WAREHOUSE_READER_DSN"], autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {migrated}.accounts").fetchone()[0] > 0
        assert conn.execute(f"SELECT count(*) FROM {migrated}.latest_profiles").fetchone()[0] >= 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="segment_changes"):
            conn.execute(f"INSERT INTO {migrated}.segment_changes VALUES ('u', 's', 'entered', now(), '', 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"UPDATE {migrated}.accounts SET plan = 'free'")
    sink = WarehouseSink(secure["OBF_WAREHOUSE_READER_DSN"], SEGMENT_CHANGES, migrated, batch_size=1,
                         max_attempts=1)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sink.writer.write([("u", "s", "entered", dt.datetime.now(dt.timezone.utc), "", 1)])
    sink.close()


def test_a_wrong_postgres_password_is_refused_with_a_clear_error_that_does_not_show_it(secure, tmp_path, caplog):
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:wrong-" + "z" * 40 + "\n")
    passfile.chmod(0o600)
    dsn = secure["OBF_WAREHOUSE_DSN"].replace(str(secure.secrets_dir / "pgpass"), str(passfile))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed") as err:
            warehouse_connect(dsn)
    assert "wrong-" not in str(err.value) + caplog.text
    secure.assert_no_secret_in(str(err.value) + repr(err.value) + caplog.text)


def test_postgres_without_the_ca_or_in_plaintext_is_refused_with_a_clear_error(secure, tmp_path):
    dsn = secure["OBF_WAREHOUSE_DSN"]
    missing_ca = dsn.replace(str(secure.ca), str(tmp_path / "no-ca.crt"))
    with pytest.raises(psycopg.OperationalError, match="root certificate file .* does not exist"):
        warehouse_connect(missing_ca)
    other_ca = tmp_path / "other-ca.crt"  # a CA that did not sign the server's certificate
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other",
                    "-keyout", str(tmp_path / "other-ca.key"), "-out", str(other_ca)], check=True,
                   capture_output=True)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        warehouse_connect(dsn.replace(str(secure.ca), str(other_ca)))
    plaintext = dsn.replace("sslmode=verify-full", "sslmode=disable")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        warehouse_connect(plaintext)


# --------------------------------------------------------------------------- ps


def test_a_process_started_with_the_secured_settings_shows_no_secret_in_ps(secure):
    port = free_port()
    env = {**os.environ, **secure.endpoints, "OBF_RUN_DIR": str(secure.run_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", "lag-exporter", "--port", str(port),
                             "--address", "127.0.0.1", "--redis-url", secure["OBF_REDIS_URL"],
                             "--key-prefix", PREFIX, "--timeout-ms", "500"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                    metrics = reply.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the exporter did not serve /metrics"
                time.sleep(0.5)
        ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
        [line] = [row for row in ps.splitlines() if row.split(None, 1)[0] == str(proc.pid)]
        assert "rediss://onboardflow-pipeline@" in line  # found it, with the secured URL on its command line
        secure.assert_no_secret_in(ps)
        # What ps reads: every process's command line, including those ps truncates or hides.
        secure.assert_no_secret_in(Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().replace("\0", " "))
        secure.assert_no_secret_in(metrics)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    secure.assert_no_secret_in(output)


# --------------------------------------------------------------------------- erasure with security on


def test_erase_over_tls_removes_the_user_as_the_pipeline_user_and_owner_role_and_the_pipeline_cannot_rewrite_them(
        secure, written, migrated, tmp_path):
    """`onboardflow erase` with the secured settings (Redis as the pipeline user, the warehouse as the
    owner: the pipeline role has no DELETE), then the pipeline's own writers try the user again."""
    victim = key_of("u2")
    t = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    rows = WarehouseSink(secure["OBF_WAREHOUSE_DSN"], EVENTS, migrated, batch_size=10)
    rows.add({"event_id": "erase-me-1", "occurred_at": t, "event_type": "login", "user_key": victim,
              "properties": {}})
    rows.flush()
    rows.close()
    secret = tmp_path / "secret.key"
    secret.write_bytes(SECRET)
    done = subprocess.run(
        [sys.executable, "-m", "onboardflow.runners.cli", "erase", "u2", "--requested-by=dpo", "--json",
         f"--redis-url={secure['OBF_REDIS_URL']}", f"--key-prefix={PREFIX}",
         f"--warehouse-dsn={secure['OBF_WAREHOUSE_OWNER_DSN']}", f"--warehouse-schema={migrated}",
         f"--secret-file={secret}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    secure.assert_no_secret_in(done.stdout + done.stderr)
    removed = json.loads(done.stdout)["removed"]
    assert removed["redis.profile"] == 1 and removed["warehouse.events"] >= 1, removed

    with ProfileStore(secure["OBF_REDIS_APP_URL"], SECRET, PREFIX) as store:
        assert store.get("u2") is None and victim not in store.segment_members("activated")
        assert store.get("u1") is not None
    # The pipeline writes the user again (a replay): Redis answers stale, the warehouse skips the row.
    sink = ProfileSink(secure["OBF_REDIS_URL"], PREFIX, profile_ttl_s=3600, batch_size=10)
    sink.add({"user_key": victim, "version": (t + 1) * 1000 + 9, "updated_at": t, "segments": ["activated"]})
    assert [r.result.applied for r in sink.flush()] == [False]
    sink.close()
    rows = WarehouseSink(secure["OBF_WAREHOUSE_DSN"], EVENTS, migrated, batch_size=10)
    rows.add({"event_id": "erase-me-2", "occurred_at": t, "event_type": "login", "user_key": victim,
              "properties": {}})
    rows.flush()
    rows.close()
    with warehouse_connect(secure["OBF_WAREHOUSE_READER_DSN"], autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {migrated}.events WHERE user_key = %s",
                            [victim]).fetchone()[0] == 0
        audit = conn.execute(f"SELECT requested_by, source FROM {migrated}.erasure_audit WHERE user_key = %s",
                             [victim]).fetchall()
        assert audit == [("dpo", "cli")]
