"""The personalization API as the integration tests run it: `onboardflow serve` in a process of its own.

``ApiDeployment`` is one isolated deployment (deployment ``i19api`` unless
a test names its own, a Redis prefix and warehouse schema unique to the run) with a secret file, an API
keys file holding one key per scope set (``keys``), and helpers that write
profiles the way the pipeline does (``encode_profile`` + ``RedisProfileWriter``,
the profile store's own writer). ``ApiServer`` starts the real command on a
real port (the API tests' ports are 8700-8749), waits for ``/healthz`` and
stops it; its stdout (the access log) is kept for assertions.
``OwnRedis`` is a redis-server of the test's own (port 8750) that a test may
stop: the shared one must never be.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

from onboardflow.runners.api.keys import KeyFile
from onboardflow.tests.conftest import delete_redis_prefix
from onboardflow.transforms.profile_store.encoding import encode_profile
from onboardflow.transforms.profile_store.writer import RedisProfileWriter

DEPLOYMENT = "i19api"
SECRET = b"i19api-integration-secret-0123456789"
#: Scope sets of the keys every deployment gets, by key name.
KEY_SCOPES = {
    "all": ["profiles:read", "segments:read", "users:erase"],
    "profiles": ["profiles:read"],
    "segments": ["segments:read"],
    "eraser": ["users:erase"],
    "revoked": ["profiles:read", "segments:read", "users:erase"],
}


def user_key(user_id: str) -> str:
    """The pseudonym the anonymization stage gives ``user_id`` under ``SECRET``."""
    return hmac.new(SECRET, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def pipeline_profile(user_id: str, *, updated_at: Optional[int] = None, segments=("active_engaged",),
                     **fields) -> dict:
    """A profile as the pipeline's stages build it (contract fields; docs/redis-contract.md)."""
    as_of = now_ms() - 60_000
    profile = {
        "user_key": user_key(user_id), "version": as_of * 1000 + 12, "as_of": as_of,
        "updated_at": updated_at if updated_at is not None else now_ms(),
        "engagement_score": 4.25, "intent_score": 0.5, "feature_usage_score": 33.0,
        "first_event_at": as_of - 86_400_000, "last_event_at": as_of, "signup_at": as_of - 86_000_000,
        "recency_ms": 0, "events_total": 12, "events_7d": 12, "events_30d": 12, "active_days_7d": 2,
        "active_days_30d": 2, "event_counts": {"login": 4, "feature_used": 6, "tutorial_step": 2},
        "features_used": {"dashboards": 4, "export": 2}, "distinct_features": 2, "milestones": [],
        "tutorial_steps_done": 2, "tutorial_step_total": 6, "onboarding_progress": 2 / 6,
        "days_since_signup": 1.0, "session_count": 3, "sessions_7d": 3, "sessions_30d": 3,
        "avg_session_duration_s": 310.5, "last_session_duration_s": 200.0, "avg_events_per_session": 4.0,
        "visits": 3, "median_visit_events": 4.0, "median_visit_duration_s": 300.0, "account_id": "acct-7",
        "signup_plan": "trial", "email_domain": "example.com", "device_class": "desktop", "country": "DE",
        "plan": "trial", "account_tier": "smb", "industry": "software", "company_size": 40,
        "segments": list(segments), "cluster_id": 0, "segment_label": "power adopter", "propensity": 0.71,
        "model_version": "seg-000001+prop-000001", "onboarding_track": "advanced",
    }
    profile.update(fields)
    return {k: v for k, v in profile.items() if v is not None}


class ApiDeployment:
    """One isolated deployment for the API tests (module docstring); ``cleanup()`` deletes its keys and schema."""

    def __init__(self, redis_url: str, pg_dsn: str, kafka_bootstrap: str, deployment: str = DEPLOYMENT) -> None:
        tag = uuid.uuid4().hex[:8]
        self.deployment = deployment
        self.prefix = f"{deployment}-{tag}"
        self.schema = f"{deployment}_{tag}"
        self.redis_url, self.pg_dsn, self.kafka_bootstrap = redis_url, pg_dsn, kafka_bootstrap
        self.topic = f"{self.prefix}.events"
        self.group = f"onboardflow-{self.prefix}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"obf-{deployment}-"))
        self.secret_file = self.dir / "secret.key"
        self.secret_file.write_bytes(SECRET)
        self.keys_file = self.dir / "apikeys.json"
        keys = KeyFile(self.keys_file)
        self.keys = {name: keys.create(name, scopes)[0] for name, scopes in KEY_SCOPES.items()}
        keys.revoke("revoked")
        self.writer = RedisProfileWriter(redis_url, self.prefix, profile_ttl_s=3600, backoff_base_s=0.01)

    def write(self, *profiles: dict) -> list[bool]:
        """Write ``profiles`` through the profile store's writer; which were applied."""
        return [o.applied for o in self.writer.write([encode_profile(p) for p in profiles])]

    def serve_args(self, port: int, *extra: str, redis_url: Optional[str] = None) -> list[str]:
        return ["--port", str(port), "--redis-url", redis_url or self.redis_url, "--key-prefix", self.prefix,
                "--secret-file", str(self.secret_file), "--api-keys-file", str(self.keys_file),
                "--warehouse-dsn", self.pg_dsn, "--warehouse-schema", self.schema,
                "--bootstrap-servers", self.kafka_bootstrap, "--topic", self.topic,
                "--consumer-group", self.group, *extra]

    def cleanup(self) -> None:
        import psycopg
        from psycopg import sql

        self.writer.close()
        delete_redis_prefix(self.redis_url, self.prefix)
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
        shutil.rmtree(self.dir, ignore_errors=True)


class ApiServer:
    """`onboardflow serve ARGS` on 127.0.0.1:``port``, started and health-checked; ``stop()`` ends it."""

    def __init__(self, port: int, args: list[str], log_dir: Path, deployment: str = DEPLOYMENT) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.access_log = log_dir / f"serve-{port}.out"
        self.stderr_log = log_dir / f"serve-{port}.err"
        env = {**os.environ, "OBF_DEPLOYMENT": deployment}
        with open(self.access_log, "wb") as out, open(self.stderr_log, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", "serve", *args],
                                            stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"onboardflow serve exited: {self.stderr_log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("onboardflow serve did not answer /healthz within 60 s")

    def access_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class OwnRedis:
    """A redis-server of the test's own on ``port`` (no persistence), which it may stop and start again."""

    def __init__(self, port: int = 8750) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.binary = shutil.which("redis-server")  # as runners/services/redis.sh finds it
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: `make services-up` installs it")
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None
