"""Event -> pipeline -> API latency at the demo's idle rate (prints, never asserts).

    python tests/benchmarks/bench_api_e2e.py [--events 50] [--users 5] [--port 8801] [--server-root ROOT]
        [--pipeline-arg=--FLAG=VALUE ...]

A deployment of its own (``i19e2e``: topics, consumer group, Redis prefix,
warehouse schema, all emptied first) runs what `make demo` runs: the Beam
pipeline, streaming on Prism with the demo's flags (runners/cli/demo.py), in
a process of its own, and ``onboardflow serve`` in another. No other traffic:
after the demo has settled its backlog, the events an app's users send trickle
in one at a time, and that is what this measures.

Each of ``--events`` probes is a login of one of ``--users`` users (each
created first by a login of its own): this process reads the user's profile
through the API (its ``ETag``), produces the event to Kafka (acks from all
replicas), then polls ``GET /v1/profiles/{id}`` with ``If-None-Match`` until
the reply is a 200 with a new ``ETag``, and beside it the profile's
``version`` in Redis. Printed: p50 / p99 / max of event -> API, of event ->
Redis (the pipeline's part) and of Redis -> API (the service's part), and the
pipeline settings that bound it. Raw figures: .run/bench-api/e2e.json.
The seeds' target, 200 ms end to end, is reported, not asserted.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
import uuid

from bench_api import machine
from bench_topics import fresh_topics, interrupt

from onboardflow.runners.cli.demo import MAX_OUT_OF_ORDERNESS_S, _login, _percentile
from onboardflow.runners.paths import run_dir
from onboardflow.runners.settings import Settings
from onboardflow.tests.integration.api_service import CLI, ApiDeployment, ApiServer

CONSENT = {"analytics": True, "personalization": True, "marketing": False}
#: The demo's streaming flags (runners/cli/demo.py ``run_demo``) minus its backfill's lateness settings.
PIPELINE_FLAGS = ["--streaming", "--kafka_start_position=earliest", "--kafka_idle_timeout=5",
                  f"--kafka_max_out_of_orderness={MAX_OUT_OF_ORDERNESS_S}", "--model_refresh_seconds=5"]


class Probe:
    """A user's profile through the API (keep-alive connection) and its version in Redis."""

    def __init__(self, server: ApiServer, key: str, redis_client, profile_key) -> None:
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        self.headers = {"Authorization": f"Bearer {key}"}
        self.redis, self.profile_key = redis_client, profile_key

    def etag(self, user: str, if_none_match=None) -> tuple[int, object]:
        headers = dict(self.headers, **({"If-None-Match": if_none_match} if if_none_match else {}))
        self.conn.request("GET", f"/v1/profiles/{user}", headers=headers)
        reply = self.conn.getresponse()
        reply.read()
        return reply.status, reply.getheader("ETag")

    def version(self, user: str):
        return self.redis.hget(self.profile_key(user), "version")

    def until_changed(self, user: str, etag, version, timeout_s: float = 60.0) -> tuple[float, float]:
        """Seconds from now until Redis, then the API, show a change; raises TimeoutError."""
        start = time.perf_counter()
        in_redis = None
        while time.perf_counter() - start < timeout_s:
            if in_redis is None and self.version(user) != version:
                in_redis = time.perf_counter() - start
            status, new = self.etag(user, etag)
            if status == 200 and new != etag:
                done = time.perf_counter() - start
                return (done if in_redis is None else in_redis), done
            time.sleep(0.002)
        raise TimeoutError(f"no change through the API within {timeout_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--events", type=int, default=50, help="probe events")
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--port", type=int, default=8801)
    ap.add_argument("--deployment", default="i19e2e")
    ap.add_argument("--server-root", default=None, help="serve the checkout at ROOT instead of this one")
    ap.add_argument("--pipeline-arg", action="append", default=[],
                    help="one more pipeline flag, after the demo's, e.g. --pipeline-arg=--kafka_idle_timeout=1")
    args = ap.parse_args()
    flags = PIPELINE_FLAGS + args.pipeline_arg

    from kafka import KafkaProducer

    from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
    from onboardflow.schemas.wire import AvroSerializer
    from onboardflow.transforms.connections import kafka_config, redis_client, warehouse_connect
    from onboardflow.transforms.warehouse.migrations import apply_migrations

    out = run_dir() / "bench-api"
    deployment = ApiDeployment(args.deployment, out)
    env = deployment.environ()
    settings = Settings.load(env)
    deployment.clear_redis()
    deployment.api_keys_file.unlink(missing_ok=True)  # an earlier run's keys
    fresh_topics(settings.kafka_bootstrap, [(settings.events_topic, 4), (settings.dead_letter_topic, 1),
                                            (settings.segment_changes_topic, 1), (settings.model_events_topic, 1)],
                 drop_prefix=f"{args.deployment}.")
    with warehouse_connect(settings.warehouse_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{settings.warehouse_schema}" CASCADE')
    apply_migrations(settings.warehouse_dsn, settings.warehouse_schema)
    print(f"== bench_api_e2e: {args.events} events of {args.users} users through the Beam pipeline (streaming, "
          f"Prism, the demo's flags) to the API, one at a time; {machine()}", flush=True)

    pseudonymizer = deployment.pseudonymizer()
    redis = redis_client(deployment.redis_url)
    serializer = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", version=2))
    producer = KafkaProducer(**kafka_config(settings.kafka_bootstrap, acks="all", linger_ms=0))
    with open(out / "e2e-pipeline.log", "ab") as log:
        pipeline = subprocess.Popen([sys.executable, "-c", CLI, "run", *flags], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    # Polled every few ms: no rate limit.
    server = ApiServer(deployment, args.port, package_root=args.server_root, log=out / "e2e-serve.log",
                       args=["--rate-limit", "1000000", "--rate-burst", "1000000"])
    rows = []
    try:
        server.start()
        probe = Probe(server, server.create_key("e2e", ["profiles:read"]), redis,
                      lambda u: f"{deployment.prefix}:profile:{pseudonymizer.user_key(u)}")
        users = [f"e2e-user-{uuid.uuid4().hex[:8]}" for _ in range(args.users)]

        def send(user: str) -> None:
            event = _login(user, int(time.time() * 1000), CONSENT)
            producer.send(settings.events_topic, key=user.encode(), value=serializer.serialize(event)).get(timeout=10)

        t0 = time.time()
        for user in users:  # the pipeline's start-up and each user's first profile
            send(user)
        for user in users:
            probe.until_changed(user, None, None, timeout_s=300)
        print(f"   pipeline and API up, {args.users} users created, after {time.time() - t0:.0f} s", flush=True)
        for i in range(args.events):
            user = users[i % len(users)]
            _, etag = probe.etag(user)
            version = probe.version(user)
            start = time.perf_counter()
            send(user)
            sent = time.perf_counter() - start
            to_redis, to_api = probe.until_changed(user, etag, version)
            rows.append({"produce_s": sent, "redis_s": sent + to_redis, "api_s": sent + to_api})
            time.sleep(0.2)
    finally:
        server.stop()
        if pipeline.poll() is None:
            interrupt(pipeline, timeout=60)
        producer.close()
        redis.close()
        deployment.clear_redis()
    (out / "e2e.json").write_text(json.dumps({"machine": machine(), "flags": flags, "probes": rows},
                                             indent=1))

    def line(label: str, values: list[float]) -> str:
        ms = sorted(v * 1000 for v in values)
        return (f"| {label} | {statistics.median(ms):,.0f} | {_percentile(ms, 0.99):,.0f} | {ms[-1]:,.0f} |")

    print(f"\n| {len(rows)} events, ms | p50 | p99 | max |\n|---|---:|---:|---:|")
    print(line("event -> Redis (produce + pipeline)", [r["redis_s"] for r in rows]))
    print(line("Redis -> API (the service sees it)", [r["api_s"] - r["redis_s"] for r in rows]))
    print(line("**event -> API**", [r["api_s"] for r in rows]))
    p99 = _percentile([r["api_s"] for r in rows], 0.99) * 1000
    print(f"\nseeds' target 200 ms end to end: p99 {p99:,.0f} ms ({'met' if p99 < 200 else 'missed'}; reported, "
          "not asserted). Bounded by the pipeline: the source hands records on when a bundle ends "
          "(--kafka_max_read_seconds, default 0.25 s) and the Redis sink writes in finish_bundle, on "
          "Prism's bundle scheduling; the API reads Redis per request. Raw: " + str(out / "e2e.json"), flush=True)


if __name__ == "__main__":
    main()
