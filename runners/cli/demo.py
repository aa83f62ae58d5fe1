"""`onboardflow demo`: the main job end to end on the local services.

1. The deployment every other command uses (runners/settings.py; default
   ``onboarding``, ``--deployment`` or ``OBF_DEPLOYMENT`` for another):
   its events topic (4 partitions), dead-letter, segment-changes and
   model-events topics, Redis prefix and warehouse schema (migrated, accounts
   loaded from the generator's accounts), emptied first: topics keep their id
   and lose their records, Redis keys and the schema are removed; the demo
   says whether an earlier run had left anything (a cold or a warm run).
2. About 53,000 synthetic onboarding events (150 users, a 45-day timeline ending at
   ``--anchor``, default now, with late, out-of-order, duplicate and
   malformed messages) produced to Kafka.
3. The streaming pipeline on Prism, reading from the earliest offsets, until
   the pipeline's own progress says it is done (never a pause in writes):
   *caught up* = every partition's committed offset at its end offset and the
   newest event time written to Redis (``{prefix}:pipeline:progress``
   ``event_time_ms``) at the newest produced event a profile keeps; *settled*
   = also the sink watermark (``sink_watermark_ms``, ``PublishSinkWatermark``)
   at the wall clock of catch-up minus the max out-of-orderness, i.e. every
   timer due by then (daily refreshes, rule time marks, dormancy) has fired
   and its profile write is in Redis. No settling within ``--timeout`` is a
   failure (exit 1) that says what was still missing.
4. Live phase (``--live``, default on): once the learner has published a
   segmenter, one login per generated user now; waits until every consenting
   user's profile in Redis holds it (counted, with a timeout).
5. Latency probes: fresh events sent one by one, each timed until its profile
   is visible in Redis (produce -> Redis, the path an app sees).
6. A summary of what it waited for and what is in Redis now (SCAN and SCARD,
   not what was sent): profiles, members per segment, scores, one generated
   user's profile read back through ``ProfileStore``, the arms of each running
   experiment (pipelines/experiments.yaml) as the API's decisions serve them to
   the profiles in Redis; the RFM reference (published by ``onboardflow rfm
   refresh`` once the backfill settled, so the live logins are scored against
   it) and the RFM value segments' counts (docs/rfm.md); warehouse row counts,
   throughput and latency percentiles. The pipeline is then cancelled; the
   services and the data stay, and the closing lines are commands that work
   as printed (``onboardflow profile <a user id of this run>``, ``models
   list``, ``lag``, ``make train``).
7. The personalization API (``--api``, default on; runners/api/, docs/api.md):
   ``onboardflow serve`` started on ``--api-port`` with a ``profiles:read``
   key named ``demo`` (hashed in the deployment's API keys file; the key itself
   in a 0600 file beside it, for the curl the demo prints), the sample user's
   decision fetched through the typed client (``onboardflow.client``) and
   printed, then the service stopped.

Two runs with the same ``--seed`` and ``--anchor`` settle on the same
profiles and segment table (tests/integration/test_demo.py), except the
online models' fields: a streaming run refits at the event-time marks its
watermark passes, on the profiles written by then, which depends on how far
the run had read ahead (docs/models.md "Reproducible segments").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import re
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ...schemas.units import DAY_MS
from ...transforms.connections import redis_client, warehouse_connect

#: The source's max out-of-orderness (seconds): an idle pipeline's watermark
#: trails the wall clock by this much, so "due by now" means due by now minus it.
MAX_OUT_OF_ORDERNESS_S = 60.0
#: Model fields: a streaming run's refits read the profile store as the
#: watermark passes each mark, so they depend on how far the run read ahead.


def _anchor_ms(text: str) -> int:
    """``now``, epoch milliseconds, or an ISO 8601 time (UTC when no zone is given)."""
    if text == "now":
        return int(time.time() * 1000)
    if re.fullmatch(r"\d{10,}", text):
        return int(text)
    at = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return int(at.timestamp() * 1000)


def _parse(argv):
    from ..settings import settings

    deployment = settings()
    p = argparse.ArgumentParser(prog="onboardflow demo", description=__doc__.split("\n")[0])
    p.add_argument("--deployment", default=deployment.deployment,
                   help="The deployment to fill (default: %(default)s, the one every other command uses; "
                        "OBF_DEPLOYMENT). Its topics, Redis prefix, warehouse schema and consumer group "
                        "(runners/settings.py) are emptied first.")
    p.add_argument("--bootstrap-servers", default=None, help=f"default: {deployment.kafka_bootstrap}")
    p.add_argument("--redis-url", default=None, help=f"default: {deployment.redis_url}")
    p.add_argument("--warehouse-dsn", default=None, help="default: the deployment's (OBF_WAREHOUSE_DSN)")
    p.add_argument("--secret-file", default=None,
                   help="the pseudonymization key, created when missing (default: the deployment's, "
                        f"{deployment.key_file}); `onboardflow profile` reads the same one")
    # 150 users' 45-day journeys are ~53,000 messages: the cap keeps the whole
    # timeline, so profiles run up to now (400 users were cut four weeks short).
    p.add_argument("--events", type=int, default=60_000, help="messages to produce at most (default 60,000)")
    p.add_argument("--users", type=int, default=150)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--anchor", default="now",
                   help="End of the 45-day timeline: 'now' (default), epoch ms or ISO 8601. Pass the same "
                        "anchor to compare runs: with 'now' each run's events (and profiles) shift with the clock.")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                   help="After settling, send one login per user now and wait until Redis holds them.")
    p.add_argument("--probes", type=int, default=20, help="latency probe events after catch-up")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds from the pipeline's start to settled; past it the demo fails (exit 1)")
    p.add_argument("--live-timeout", type=float, default=150,
                   help="seconds for the live phase (a served model, then every login in Redis)")
    p.add_argument("--run-dir", default=str(deployment.run_dir / "demo"),
                   help="ground truth and other demo output (default: %(default)s)")
    p.add_argument("--api", action=argparse.BooleanOptionalAction, default=True,
                   help="End by serving the API and printing one decision fetched through it (docs/api.md).")
    p.add_argument("--api-port", type=int, default=8080,
                   help="port of the API the demo starts (default %(default)s; a free one when taken)")
    p.add_argument("--engine", choices=("beam", "flink"), default="beam",
                   help="beam: the Beam pipeline (Prism, or Beam's Flink runner with --flink-master); flink: "
                        "the native Flink job on the cluster `make flink-up` runs (docs/flink.md)")
    p.add_argument("--flink-rest-url", default=None,
                   help="--engine flink: the cluster's REST API (default $OBF_FLINK_REST_URL or "
                        "http://127.0.0.1:8081)")
    p.add_argument("--flink-master", help="HOST:PORT of a Flink cluster's REST API: the Beam pipeline on Beam's "
                   "Flink runner (see docs/flink.md; needs the Beam Flink job server jar)")
    p.add_argument("--flink-job-server-jar",
                   help="the beam-runners-flink-2.2-job-server jar (make flink-jobserver-jar)")
    args = p.parse_args(argv)
    try:
        args.settings = demo_settings(deployment, args.deployment, args.bootstrap_servers, args.redis_url,
                                      args.warehouse_dsn, args.secret_file)
    except ValueError as error:
        p.error(f"--deployment: {error}")
    args.anchor_ms = _anchor_ms(args.anchor)
    return args


def demo_settings(base, deployment: str, bootstrap: Optional[str] = None, redis_url: Optional[str] = None,
                  warehouse_dsn: Optional[str] = None, secret_file: Optional[str] = None):
    """The demo's deployment: ``base`` (the settings every command reads), or another deployment's
    names on the same services, with the endpoints the flags give."""
    from ..settings import deployment_names

    names = deployment_names(deployment)
    if deployment != base.deployment:
        base = dataclasses.replace(base, deployment=deployment, secret_file=None, **names)
    endpoints = {"kafka_bootstrap": bootstrap, "redis_url": redis_url, "warehouse_dsn": warehouse_dsn,
                 "secret_file": Path(secret_file) if secret_file else None}
    if bootstrap:  # one Kafka named on the command line: the events are produced there too
        base = dataclasses.replace(base, kafka_producer_bootstrap=None)
    return dataclasses.replace(base, **{k: v for k, v in endpoints.items() if v})


def _fresh_topics(bootstrap, specs) -> list[str]:
    """Empty the demo's topics ``specs`` ((name, partitions)), creating the missing ones.

    Existing topics keep their id (their records are deleted up to the end
    offset): Kafka 4 gives a re-created topic a new topic id, and clients
    holding the old one's metadata can stall on it. Returns the topics that
    held records.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    from ...transforms.connections import kafka_config

    admin = KafkaAdminClient(**kafka_config(bootstrap, client_id="onboardflow-demo"))
    consumer = KafkaConsumer(**kafka_config(bootstrap, client_id="onboardflow-demo", enable_auto_commit=False))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in specs if n not in existing]
        if missing:
            admin.create_topics(missing)
        emptied = []
        for name, _ in specs:
            if name not in existing:
                continue
            partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
            ends, starts = consumer.end_offsets(partitions), consumer.beginning_offsets(partitions)
            held = {tp: ends[tp] for tp in partitions if ends[tp] > starts[tp]}
            if held:
                admin.delete_records(held)
                emptied.append(name)
        return emptied
    finally:
        consumer.close()
        admin.close()


def _count_keys(client, pattern):
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _utc(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _counted(counts, sep: str = ", ") -> str:
    """``label: count`` pairs, so a label's words never run into its number."""
    return sep.join(f"{label}: {count:,}" if isinstance(count, int) else f"{label}: {count}"
                    for label, count in counts)


#: Profile fields that hold epoch milliseconds, shown as ISO 8601 times in the summary.
_TIME_FIELDS = ("as_of", "signup_at", "first_seen_at", "last_event_at", "updated_at")


class _NewestProfileEvent:
    """A serializer wrapper that remembers the newest event a profile will keep.

    The generator serializes each valid event (and re-sent duplicate) right
    before yielding its message, and malformed variants after; ``note(kind)``
    is called for each yielded message, so the event serialized last is the
    message's own. Profiles keep events with personalization consent.
    """

    def __init__(self, serialize):
        self._serialize = serialize
        self._last = None
        self.newest_ms: Optional[int] = None

    def __call__(self, event):
        self._last = event
        return self._serialize(event)

    def note(self, kind: str) -> None:
        from ..sim.generator import DUPLICATE, VALID

        event = self._last
        if kind in (VALID, DUPLICATE) and event is not None and (event.get("consent") or {}).get("personalization"):
            at = event["occurred_at"]
            self.newest_ms = at if self.newest_ms is None else max(self.newest_ms, at)


@dataclasses.dataclass
class Settled:
    """What the demo waited for and when each condition held (``ok`` False: the timeout came first)."""

    ok: bool
    caught_up_s: Optional[float] = None
    settled_s: Optional[float] = None
    due_by_ms: Optional[int] = None
    newest_event_ms: Optional[int] = None
    sink_watermark_ms: Optional[int] = None
    partitions: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)


def await_settled(kafka, progress, sink_read: Callable[[], Optional[int]], newest_event_ms: Optional[int],
                  t0: float, timeout_s: float, lag_s: float = MAX_OUT_OF_ORDERNESS_S,
                  failed: Callable[[], Optional[str]] = lambda: None, poll_s: float = 1.0,
                  report_every_s: float = 5.0, clock: Callable[[], float] = time.time,
                  sleep: Callable[[float], None] = time.sleep) -> Settled:
    """Wait on the pipeline's own progress until settled, or ``timeout_s`` after ``t0``.

    Caught up: every partition committed at its end offset and the newest
    event in Redis at ``newest_event_ms``. Settled: still so, and the sink
    watermark at ``due_by`` = wall clock at catch-up − ``lag_s`` (the
    highest watermark an idle source reaches by then): every timer due by
    ``due_by`` fired and its write is in Redis. ``failed()`` returns a reason
    when the job itself died. ``kafka``/``progress``: the readers of
    runners/cli/lag.py; ``sink_read()``: the sink watermark (epoch ms) or None.
    """
    from .lag import read_lag, unreached

    state = Settled(ok=False, newest_event_ms=newest_event_ms)
    last_print = 0.0
    while True:
        report = read_lag(kafka, progress, clock)
        try:
            watermark = sink_read()
        except Exception as error:  # noqa: BLE001 - an unreadable Redis is "not yet"
            watermark, report.redis_error = None, type(error).__name__
        now = clock()
        state.partitions, state.sink_watermark_ms = report.partitions, watermark
        if state.caught_up_s is None:
            state.missing = unreached(report, newest_event_ms)
            if not state.missing:
                state.caught_up_s = now - t0
                state.due_by_ms = int((now - lag_s) * 1000)
        if state.caught_up_s is not None:
            state.missing = unreached(report, newest_event_ms, watermark, state.due_by_ms)
            if not state.missing:
                state.ok, state.settled_s = True, now - t0
                return state
        if now - last_print >= report_every_s:
            last_print = now
            read = sum(p.log_end - p.lag for p in report.partitions)
            total = sum(p.log_end for p in report.partitions)
            newest = report.progress.event_time_ms if report.progress else None
            print(f"   t={now - t0:5.0f}s  offsets committed {read:,} of {total:,}  newest event in Redis "
                  f"{_utc(newest)}  sink watermark {_utc(watermark)}", flush=True)
        reason = failed()
        if reason:
            state.missing = [f"the pipeline stopped: {reason}"] + state.missing
            return state
        if now - t0 >= timeout_s:
            return state
        sleep(poll_s)


def _describe_settled(state: Settled, lag_s: float) -> list[str]:
    offsets = ", ".join(f"p{p.partition}: {p.committed if p.committed is not None else 0:,}/{p.log_end:,}"
                        for p in state.partitions)
    lines = [f"   offsets: every partition's committed offset at its end offset ({offsets})",
             f"   newest event in Redis {_utc(state.newest_event_ms)} = the newest produced event a profile keeps"]
    if state.due_by_ms is not None:
        lines.append(f"   sink watermark {_utc(state.sink_watermark_ms)} >= {_utc(state.due_by_ms)} (wall clock at "
                     f"catch-up - {lag_s:.0f} s out-of-orderness): every timer due by then has fired and its "
                     "profile write is in Redis")
    return lines


@dataclasses.dataclass
class DemoResult:
    """What a run printed, for callers (tests): exit code, settling, Redis counts."""

    exit_code: int
    settings: object  # runners.settings.Settings
    settled: Optional[Settled] = None
    profiles: int = 0
    segments: dict = dataclasses.field(default_factory=dict)
    sample_profile: Optional[dict] = None
    #: The sample user's decision as the API served it (``--api``), the client's ``Decision`` as a dict.
    decision: Optional[dict] = None
    #: Running experiment -> variant -> profiles in Redis it is served to (decisions as the API makes them now).
    experiment_arms: dict = dataclasses.field(default_factory=dict)
    #: Identity stitching: devices linked, visitors retired, precision / recall against the generator's truth.
    identity: dict = dataclasses.field(default_factory=dict)
    #: The RFM reference the demo published after settling (``runners/cli/rfm.py`` ``Refreshed``), if any.
    rfm: Optional[object] = None
    sample_user: Optional[str] = None


def main(argv=None) -> int:
    return run_demo(_parse(argv)).exit_code


def run_demo(args) -> DemoResult:
    """The demo for parsed ``args`` (see ``_parse``); prints as it goes, returns what it found."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "PrismRunner"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # reconnects it recovers from
    # The stages' own progress (publishes, sweeps) too: the demo prints what it waits for.
    logging.getLogger("onboardflow").setLevel(logging.WARNING)

    from ...schemas import EVENTS_SUBJECT, default_registry, load_schema
    from ...schemas.wire import AvroSerializer
    from ...transforms.anonymize import SecretKey, load_secret
    from ...transforms.profile_store.store import ProfileStore
    from ...transforms.progress import SinkWatermark
    from ...transforms.warehouse.accounts import upsert_accounts
    from ...transforms.warehouse.migrations import WarehouseRoles, apply_migrations
    from ..sim.generator import GeneratorConfig, JourneyGenerator, v1_serializer
    from .lag import KafkaLagReader, ProgressReader
    from .produce import produce
    from .run import run

    deployment = args.settings
    args.bootstrap_servers, args.redis_url = deployment.kafka_bootstrap, deployment.redis_url
    args.warehouse_dsn = deployment.warehouse_dsn
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    secret_file = deployment.key_file
    if not secret_file.exists():
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secrets.token_hex(32) + "\n")
        secret_file.chmod(0o600)
    secret = SecretKey(load_secret(secret_file))
    topic, prefix = deployment.events_topic, deployment.redis_key_prefix
    schema, group = deployment.warehouse_schema, deployment.consumer_group
    outcome = DemoResult(1, deployment)

    print(f"== onboardflow demo: {deployment.describe()}")
    old_topics = _fresh_topics(args.bootstrap_servers,
                               [(topic, 4), (deployment.dead_letter_topic, 2),
                                (deployment.segment_changes_topic, 4), (deployment.model_events_topic, 1)])
    r = redis_client(args.redis_url)
    stale = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(stale), 500):
        r.unlink(*stale[i:i + 500])
    # Resetting the schema and loading accounts is the owner's job when the
    # deployment has separate roles (docs/security.md); the pipeline runs as its own.
    owner_dsn = deployment.warehouse_owner_dsn or args.warehouse_dsn
    with warehouse_connect(owner_dsn, autocommit=True) as conn:
        had_schema = conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                                  (schema,)).fetchone() is not None
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    roles = WarehouseRoles(deployment.warehouse_pipeline_role, deployment.warehouse_reader_role)
    apply_migrations(owner_dsn, schema, roles=roles if roles.pipeline or roles.reader else None)
    if stale or had_schema or old_topics:
        print(f"   warm run: removed an earlier run's {len(stale):,} Redis keys, "
              f"{'its warehouse schema' if had_schema else 'no warehouse schema'} and the records of "
              f"{len(old_topics)} topics")
    else:
        print("   cold run: nothing of an earlier run in this deployment")

    horizon_days = 45
    recorder = _NewestProfileEvent(v1_serializer())
    gen = JourneyGenerator(GeneratorConfig(
        seed=args.seed, users=args.users, start_ms=args.anchor_ms - horizon_days * DAY_MS,
        horizon_days=horizon_days, malformed_fraction=0.005, duplicate_fraction=0.01, late_fraction=0.01,
        cross_device_share=0.3),
        serializer=recorder)
    upsert_accounts(owner_dsn, [dataclasses.asdict(a) for a in gen.accounts()], schema=schema)
    gen.write_ground_truth(run_dir / "ground_truth.csv")

    def noted(messages):
        for message in messages:
            recorder.note(message.kind)
            yield message

    print(f"== producing up to {args.events:,} events for {args.users} users "
          f"({horizon_days}-day journeys ending {_utc(args.anchor_ms)})")
    stats = produce(noted(gen.messages(max_messages=args.events)), deployment.producer_bootstrap, topic,
                    progress=sys.stderr.isatty(), total=args.events)
    produced = sum(stats.attempted.values()) - sum(stats.failed.values())
    print(f"   produced {produced:,} messages in {stats.elapsed_s:.1f}s: " +
          _counted(sorted(stats.attempted.items())))
    if recorder.newest_ms is not None and args.anchor_ms - recorder.newest_ms > DAY_MS:
        print(f"   the --events cap cut the timeline: the newest event a profile keeps is {_utc(recorder.newest_ms)}")
    if sum(stats.failed.values()):
        print(f"   {sum(stats.failed.values()):,} messages could not be produced", file=sys.stderr)
        return outcome

    # Late events come up to 3 days late (offline clients): allowing more than
    # that keeps every one in its profile. Within the default 24 h, whether a
    # late event still counted would depend on how far the watermark had got
    # when it arrived, i.e. on timing, and two runs could differ.
    lateness_h = gen.config.max_lateness_ms / 3_600_000 + 24
    flags = [
        "--streaming", "--kafka_start_position=earliest", "--kafka_idle_timeout=5",
        f"--kafka_max_out_of_orderness={MAX_OUT_OF_ORDERNESS_S}",
        f"--secret_file={secret_file}",
        f"--allowed_lateness_hours={lateness_h}", f"--dedup_horizon_hours={lateness_h}",
        # Pick up new model versions within seconds; the models are refitted at every
        # event-time mark (daily), so the backfill's days publish them.
        "--model_refresh_seconds=5",
    ]
    t0 = time.time()
    if args.engine == "flink":
        print("== streaming job on Flink, native (until its own progress says settled)")
        job = _FlinkJob.submit(flags, deployment, args.flink_rest_url)
        print(f"   Flink job {job.job_id} running; web UI: {job.ui}")
    else:
        flink = []
        if args.flink_master:
            flink = ["--runner=flink", f"--flink_master={args.flink_master}"]
            if args.flink_job_server_jar:
                flink.append(f"--flink_job_server_jar={args.flink_job_server_jar}")
        print(f"== streaming pipeline on {'Flink at ' + args.flink_master if flink else 'Prism'} "
              "(until its own progress says settled)")
        job = _BeamJob(run(flink + flags, secret=secret, wait=False, settings=deployment))
    job_failed = job.failed

    kafka = KafkaLagReader(args.bootstrap_servers, group, [topic])
    progress = ProgressReader(args.redis_url, prefix)
    sink = SinkWatermark(prefix)
    try:
        settled = outcome.settled = await_settled(
            kafka, progress, lambda: sink.read(r), recorder.newest_ms, t0, args.timeout, failed=job_failed)
        if not settled.ok:
            print(f"== NOT settled after {time.time() - t0:.0f} s; still waiting for:", file=sys.stderr)
            for reason in settled.missing[:12]:
                print(f"   {reason}", file=sys.stderr)
            print("   (the summary below counts what Redis holds now, an unfinished run)", file=sys.stderr)
        else:
            print(f"== caught up after {settled.caught_up_s:.0f} s, settled after {settled.settled_s:.0f} s; "
                  "waited for:")
            for line in _describe_settled(settled, MAX_OUT_OF_ORDERNESS_S):
                print(line)
        elapsed = settled.caught_up_s or (time.time() - t0)

        later, live_ok, latencies = 0, True, []
        if settled.ok:
            # The population reference of the settled store; the live logins below are scored against it.
            from .rfm import describe, refresh_reference
            outcome.rfm = refresh_reference(args.redis_url, args.warehouse_dsn, schema, prefix,
                                            reason="demo: after the backfill settled")
            print(f"== {describe(outcome.rfm)}")
            if args.live and outcome.rfm.reference is not None:
                time.sleep(6.0)  # the RFM steps re-check the registry every 5 s (--model_refresh_seconds)
        if settled.ok and (args.live or args.probes):
            serializer = AvroSerializer(default_registry(), EVENTS_SUBJECT,
                                        load_schema("onboarding_event", version=2))
            from kafka import KafkaProducer

            from ...transforms.connections import kafka_config
            producer = KafkaProducer(**kafka_config(deployment.producer_bootstrap, acks="all", linger_ms=0))
            store = ProfileStore(args.redis_url, secret, key_prefix=prefix)
            try:
                if args.live:
                    # Live traffic after the backfill: the learner has published
                    # from the history; one login per user now is scored by the served models.
                    later, live_ok = _live_phase(args, r, store, producer, serializer, topic, prefix, gen)
                latencies = _probes(args.probes, store, producer, serializer, topic)
            finally:
                producer.close()
                store.close()
            later += args.probes

        with ProfileStore(args.redis_url, secret, key_prefix=prefix) as store:
            _summary(args, r, store, gen, stats, produced, elapsed, latencies, schema, prefix, outcome,
                     later=later)
        api_ok, api_key_file = True, None
        if args.api and outcome.sample_user:
            api_key_file = _api_decision(args, secret_file, outcome.sample_user, outcome)
            api_ok = api_key_file is not None
        _next_steps(args, outcome.sample_user, api_key_file)
        outcome.exit_code = 0 if settled.ok and live_ok and api_ok else 1
    finally:
        kafka.close()
        progress.close()
        job.stop()
        r.close()
    return outcome


class _BeamJob:
    """The demo's handle on the Beam pipeline's streaming run (Prism, or Beam's Flink runner)."""

    def __init__(self, result):
        self.result = result

    def failed(self) -> Optional[str]:
        from apache_beam.runners.runner import PipelineState

        state = self.result.state
        return state if state in (PipelineState.FAILED, PipelineState.DONE, PipelineState.CANCELLED) else None

    def stop(self) -> None:
        from ..local import stop_streaming_job

        stop_streaming_job(self.result)


class _FlinkJob:
    """The demo's handle on the native Flink job (runners/flink_job.py): submitted, watched, stopped."""

    def __init__(self, submitted):
        from ..flink_job import FlinkRest

        self.job_id, self.ui = submitted.job_id, submitted.ui
        self._rest = FlinkRest(submitted.rest_url)

    @classmethod
    def submit(cls, flags: list, deployment, rest_url: Optional[str]) -> "_FlinkJob":
        from ..flink_job import submit

        return cls(submit(flags + ["--flink_job_name=onboardflow-demo"], deployment, rest_url))

    def failed(self) -> Optional[str]:
        state = self._rest.state(self.job_id)
        if state in ("FAILED", "CANCELED", "FINISHED"):
            return f"{state}: {self._rest.root_exception(self.job_id)[:600]}"
        return None

    def stop(self) -> None:
        """Stop with a savepoint, so the job can resume where it stopped (``--savepoint_path``)."""
        if self.failed() is not None:
            return
        try:
            location = self._rest.stop_with_savepoint(self.job_id)
            print(f"   Flink job {self.job_id} stopped with a savepoint: {location}")
        except Exception as exc:  # noqa: BLE001 - the demo's results stand; say what was left running
            print(f"   could not stop Flink job {self.job_id} ({type(exc).__name__}); cancel it in {self.ui}",
                  file=sys.stderr)


def _probes(n, store, producer, serializer, topic) -> list[float]:
    """One login per fresh probe user, each timed until its profile is in Redis (30 s at most)."""
    latencies = []
    for _ in range(n):
        user = f"demo-probe-{uuid.uuid4().hex[:10]}"
        sent = time.time()
        event = _login(user, int(sent * 1000), {"analytics": True, "personalization": True, "marketing": False})
        producer.send(topic, key=user.encode(), value=serializer.serialize(event)).get(timeout=10)
        while time.time() - sent < 30:
            if store.get(user) is not None:
                latencies.append(time.time() - sent)
                break
            time.sleep(0.01)
    return latencies


def _experiment_arms(r, prefix) -> dict[str, dict[str, int]]:
    """Running experiment -> variant -> how many of the profiles in Redis the API's decision serves it to now.

    The decisions are the API's own (runners/api/decisions.py ``decide``, with
    the tracks, steps and experiments files `onboardflow serve` loads), so the
    arms are what the onboarding UI would show these users.
    """
    import collections

    from ...transforms.profile_store.encoding import decode_profile
    from ..api.app import decision_files
    from ..api.config import DEFAULT_STALE_AFTER_S, ApiConfig
    from ..api.decisions import decide

    # The files `onboardflow serve` loads by default (ApiConfig's defaults; no service is built).
    _, policy, catalogue, experiments = decision_files(ApiConfig(redis_url="", key_prefix=prefix,
                                                                 api_keys_file=Path()))
    now_ms = int(time.time() * 1000)
    arms: dict[str, collections.Counter] = {e.name: collections.Counter() for e in experiments
                                             if e.is_active(now_ms)}
    for key in r.scan_iter(match=f"{prefix}:profile:*", count=1000):
        raw = r.hgetall(key)
        if not raw:
            continue
        decision = decide(decode_profile(raw), now_ms=now_ms, stale_after_s=DEFAULT_STALE_AFTER_S, policy=policy,
                          catalogue=catalogue, experiments=experiments)
        for name, variant in decision.experiments.items():
            arms[name][variant] += 1
    return {name: dict(counts) for name, counts in arms.items()}


def _identity_summary(args, r, gen, schema, prefix) -> dict:
    """Device links in the warehouse (``identity_aliases``), retired visitors in Redis, and the links'
    precision and recall against the generator's ground truth (``JourneyGenerator.identity_truth``)."""
    from ...transforms.anonymize import Pseudonymizer, load_secret

    pseudonymizer = Pseudonymizer(load_secret(args.settings.key_file))
    with warehouse_connect(args.warehouse_dsn) as conn:
        rows = conn.execute(f'SELECT anonymous_key, user_key, status FROM "{schema}".identity_aliases').fetchall()
    made = {(a, u) for a, u, status in rows if status == "linked"}
    consenting = {u.user_id for u in gen.users() if u.consent["personalization"]}
    truth = [t for t in gen.identity_truth() if t["user_id"] in consenting]
    pairs = {(pseudonymizer.user_key(None, t["anonymous_id"]), pseudonymizer.user_key(t["user_id"])): t["deterministic"]
             for t in truth}
    deterministic = {pair for pair, sure in pairs.items() if sure}
    correct = made & pairs.keys()
    return {"links": len(made), "conflicts": sum(1 for *_, status in rows if status != "linked"),
            "retired": _count_keys(r, f"{prefix}:stitched:*"), "true_pairs": len(pairs),
            "deterministic_pairs": len(deterministic), "correct": len(correct),
            "precision": len(correct) / len(made) if made else 1.0,
            "recall": len(made & deterministic) / len(deterministic) if deterministic else 1.0}


def _segment_table(r, store, prefix) -> dict[str, int]:
    """Members per segment, as Redis holds them now (SCARD), every rule's segment listed."""
    from ...transforms.segment import DEFAULT_RULES_PATH, RuleSet

    names = sorted(set(RuleSet.load(DEFAULT_RULES_PATH).names) | set(store.segments()))
    return {seg: int(r.scard(f"{prefix}:segment:{seg}")) for seg in names}


def _summary(args, r, store, gen, stats, produced, elapsed, latencies, schema, prefix, outcome, later=0):
    """``produced``: the backfill; ``later``: valid events sent after it (live logins, probes).

    Profiles, segments and scores are counted in Redis (SCAN, SCARD) when printed.
    """

    with warehouse_connect(args.warehouse_dsn) as conn:
        def q(sql):
            return conn.execute(sql).fetchall()
        tables = {t: q(f'SELECT count(*) FROM "{schema}".{t}')[0][0]
                  for t in ("events", "late_events", "profile_snapshots", "segment_changes", "dead_letters")}
        dlq = dict(q(f"SELECT reason, count(*) FROM \"{schema}\".dead_letters WHERE stage = 'decode' GROUP BY reason"))
    valid = produced + later - sum(dlq.values())
    profiles = outcome.profiles = _count_keys(r, f"{prefix}:profile:*")
    duplicates = stats.attempted.get("duplicate", 0)
    print("\n== summary (Redis counted now; warehouse rows as read now)")
    print(f"   events read            {produced + later:>9,}   "
          f"({produced:,} backfill, {later:,} live logins and probes)")
    print(f"   valid                  {valid:>9,}   (of which re-sent duplicates {duplicates:,}, dropped by event_id)")
    print(f"   dead-lettered          {sum(dlq.values()):>9,}   ({_counted(sorted(dlq.items()))})")
    print(f"   consent-filtered       {valid - duplicates - tables['events'] - tables['late_events']:>9,}   "
          "(no analytics or personalization consent: never stored)")
    print(f"   too late for profiles  {tables['late_events']:>9,}   (kept in warehouse.late_events)")
    print(f"   profiles in Redis      {profiles:>9,}   (signed-up users and anonymous visitors)")
    outcome.identity = identity = _identity_summary(args, r, gen, schema, prefix)
    print(f"   stitched visitors      {identity['retired']:>9,}   (visitor profiles retired into the account their "
          f"device identified as; {identity['links']:,} device links, {identity['conflicts']:,} conflicts; "
          f"precision {identity['precision']:.3f}, recall {identity['recall']:.3f} against the generator's "
          "deterministic links; docs/identity.md)")
    print("   segment members in Redis:")
    outcome.segments = _segment_table(r, store, prefix)
    for seg, members in outcome.segments.items():
        print(f"     {seg:<28} {members:>6,}")
    _models_summary(args, r, schema, prefix)
    for line in rfm_summary(outcome.rfm, outcome.segments, _rfm_scored(r, prefix)):
        print(line)
    outcome.experiment_arms = _experiment_arms(r, prefix)
    for name, arms in outcome.experiment_arms.items():
        print(f"   experiment {name}: {_counted(sorted(arms.items()))} profiles "
              "(the variants GET /v1/decisions serves now; docs/experiments.md)")
    # The first generated user (signup order) that has a profile: the same user in every run of a seed.
    sample_user = next((u.user_id for u in gen.users() if store.get(u.user_id)), None)
    if sample_user:
        profile = store.get(sample_user)
        keep = ("segments", "engagement_score", "intent_score", "session_count", "sessions_7d", "feature_usage_score",
                "onboarding_progress", "days_since_signup", "plan", "account_tier", "device_class", "email_domain",
                "country", "cluster_id", "segment_label", "propensity", "model_version", "onboarding_track",
                "version")
        outcome.sample_profile = {k: profile.get(k) for k in keep}
        shown = {k: (_utc(v) if k in _TIME_FIELDS and isinstance(v, int) else v)
                 for k, v in outcome.sample_profile.items()}
        if isinstance(shown.get("model_version"), int):
            from ...models.model_registry import version_id
            shown["model_version"] = version_id("segmentation", shown["model_version"])
        print(f"   sample profile of user {sample_user} (ProfileStore.get; its Redis key is the id's HMAC):")
        print("     " + json.dumps(shown, default=str))
    print(f"   warehouse rows         ({_counted(tables.items())})")
    print(f"   throughput             {produced / elapsed:>9,.0f} events/s  ({produced:,} events caught up in "
          f"{elapsed:.1f}s, pipeline start-up included)")
    if latencies or args.probes:
        if latencies:
            print(f"   produce->Redis latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
                  f"p90 {_percentile(latencies, 0.9) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
                  f"({len(latencies)} of {args.probes} probes in Redis within 30 s)")
        else:
            print(f"   produce->Redis latency: none of {args.probes} probes reached Redis within 30 s")
    outcome.sample_user = sample_user


#: The value segments of pipelines/segment_rules.yaml that rank users by their RFM scores (docs/rfm.md).
RFM_SEGMENTS = ("high_intent_engaged", "low_intent_sporadic", "big_spender")


def _rfm_scored(r, prefix) -> tuple[int, int]:
    """(profiles with RFM scores, profiles) in Redis now."""
    scored = total = 0
    for key in r.scan_iter(match=f"{prefix}:profile:*", count=1000):
        total += 1
        scored += r.hget(key, "rfm_reference") not in (None, b"", b"null")
    return scored, total


def rfm_summary(refreshed, segments: dict, scored: tuple[int, int]) -> list[str]:
    """The summary's RFM lines: the reference published, the profiles scored, the value segments' members."""
    if refreshed is None or refreshed.reference is None:
        head = "   RFM reference          none published (the backfill did not settle, or too few buyers)"
    else:
        ref = refreshed.reference
        head = (f"   RFM reference          {ref.version}: {ref.population:,} buyers; boundaries recency days "
                f"{', '.join(f'{b:.1f}' for b in ref.recency_days)} | frequency "
                f"{', '.join(str(b) for b in ref.frequency)} | monetary {', '.join(f'{b:.2f}' for b in ref.monetary)}")
    counts = ", ".join(f"{name} {segments.get(name, 0):,}" for name in RFM_SEGMENTS)
    return [head, f"   RFM segment counts     {counts} ({scored[0]:,} of {scored[1]:,} profiles scored; "
                  "a profile is scored at its next update after the reference)"]


def _next_steps(args, sample_user: Optional[str], api_key_file: Optional[Path] = None) -> None:
    """What to try next, as commands that work as printed (same deployment, same key, services up)."""
    import os

    from ..settings import Settings

    deployment = args.settings
    environ = dict(os.environ)
    if deployment.deployment != Settings.load(environ).deployment:
        environ["OBF_DEPLOYMENT"] = deployment.deployment
    plain = Settings.load(environ)  # what a command started with the printed variables sees
    env = {k: v for k, v in environ.items() if k == "OBF_DEPLOYMENT" and v != os.environ.get(k)}
    for field in ("kafka_bootstrap", "redis_url", "warehouse_dsn"):
        if getattr(deployment, field) != getattr(plain, field):
            env[Settings.variable(field)] = getattr(deployment, field)
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    secret = "" if deployment.key_file == plain.key_file else f" --secret-file {deployment.key_file}"
    print("\n== next: the services stay up (`make services-down` stops them); try")
    if sample_user:
        print(f"   {prefix}onboardflow profile {sample_user}{secret}")
    print(f"   {prefix}onboardflow models list --kind segmentation")
    print(f"   {prefix}onboardflow lag")
    print(f"   {prefix}make train")
    if api_key_file is not None:
        print(f"   {prefix}onboardflow serve{secret} --port {args.api_port}")
        user = sample_user or "USER_ID"
        print(f'   curl -H "Authorization: Bearer $(cat {api_key_file})" '
              f"http://127.0.0.1:{args.api_port}/v1/decisions/{user}")
    print(f"   (every user id of this run: {Path(args.run_dir) / 'ground_truth.csv'})")


def _port_free(port: int) -> int:
    """``port`` if nothing listens on it on 127.0.0.1 (0: a port the kernel picks), else 0."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
        return s.getsockname()[1]


def _api_decision(args, secret_file: Path, sample_user: str, outcome: "DemoResult") -> Optional[Path]:
    """Step 7 of the module docstring; returns the file holding the demo key (None if the API did not serve).

    The service runs as a process of its own, as an app would reach it: over
    HTTP with a key, through ``onboardflow.client``.
    """
    import os
    import subprocess
    import urllib.request

    from ...client import ApiError, OnboardflowClient
    from ..api.keys import ApiKeyError, KeyFile
    from ..settings import Settings

    deployment = args.settings
    keys = KeyFile(deployment.api_keys_path)
    try:
        keys.revoke("demo")  # the previous run's demo key: one active demo key at a time
    except ApiKeyError:
        pass
    key, _ = keys.create("demo", ["profiles:read"])
    key_file = deployment.api_keys_path.with_name(f"{deployment.deployment}.demo.apikey")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    port = args.api_port if _port_free(args.api_port) else _port_free(0)
    env = {**os.environ, **{Settings.variable(f.name): str(getattr(deployment, f.name))
                            for f in dataclasses.fields(deployment) if getattr(deployment, f.name) is not None}}
    log = Path(args.run_dir) / "api.log"
    print(f"\n== personalization API: onboardflow serve on 127.0.0.1:{port} (key 'demo', scope profiles:read; "
          f"access log {log})")
    with open(log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", "serve", "--port", str(port),
                                   "--secret-file", str(secret_file)], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"   the API did not become ready (see {log})", file=sys.stderr)
                return None
            time.sleep(0.3)
        with OnboardflowClient(f"http://127.0.0.1:{port}", key, timeout=5) as client:
            try:
                started = time.perf_counter()
                decision = client.decision(sample_user)
                took_ms = (time.perf_counter() - started) * 1000
            except ApiError as error:
                print(f"   GET /v1/decisions failed: {error}", file=sys.stderr)
                return None
        outcome.decision = dataclasses.asdict(decision)
        print(f"   GET /v1/decisions/{sample_user} ({took_ms:.0f} ms, through onboardflow.client):")
        print("     " + json.dumps(outcome.decision, default=str))
        return key_file
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _login(user_id: str, at_ms: int, consent: dict) -> dict:
    """A valid v2 ``login`` event of ``user_id`` at ``at_ms``."""
    return {"event_id": str(uuid.uuid4()), "event_type": "login", "user_id": user_id, "anonymous_id": None,
            "session_id": None, "occurred_at": at_ms, "received_at": at_ms, "properties": {},
            "context": {"device": "desktop", "os": "linux", "app_version": "demo", "locale": "en-US",
                        "ip": None, "user_agent": None, "email": None},
            "consent": dict(consent)}


def _live_phase(args, r, store, producer, serializer, topic, prefix, gen) -> tuple[int, bool]:
    """Wait for a served segmenter, send one login per generated user, wait until Redis holds them.

    Done when every user with personalization consent has a profile in
    Redis whose ``last_event_at`` is the login's time (read back through
    ``ProfileStore``); ``--live-timeout`` bounds the whole phase. Returns
    (events sent, every login arrived).
    """
    from ...models.model_registry import ModelStore

    models = ModelStore(args.redis_url, key_prefix=prefix)
    t0 = time.time()
    try:
        while models.current_version("segmentation") is None and time.time() - t0 < args.live_timeout / 2:
            time.sleep(1.0)
        version = models.current_version("segmentation")
    finally:
        models.close()
    if version is None:
        print(f"== live phase: no segmentation model served within {args.live_timeout / 2:.0f} s; "
              "logins are sent unscored")
    else:
        time.sleep(6.0)  # the scorers re-check the registry every 5 s (--model_refresh_seconds)
    users = list(gen.users())
    now = int(time.time() * 1000)
    for user in users:
        producer.send(topic, key=user.user_id.encode(),
                      value=serializer.serialize(_login(user.user_id, now, user.consent)))
    producer.flush()
    expected = [u.user_id for u in users if u.consent.get("personalization")]
    from ...models.model_registry import version_id

    served = version_id("segmentation", version) if version is not None else "none yet"
    print(f"== live phase: models served (segmentation {served}); one login for each of {len(users)} users "
          f"({len(expected)} with personalization consent)")
    arrived, scored = 0, 0
    while True:
        current = [p for p in store.get_many(expected) if p and (p.get("last_event_at") or 0) >= now]
        arrived = len(current)
        scored = sum(1 for p in current if p.get("model_version"))
        if arrived == len(expected) or time.time() - t0 >= args.live_timeout:
            break
        time.sleep(1.0)
    ok = arrived == len(expected)
    print(f"   {'' if ok else 'NOT ALL: '}logins in Redis {arrived:,} of {len(expected):,} "
          f"(after {time.time() - t0:.0f} s); scored by the online models {scored:,} of them",
          file=sys.stdout if ok else sys.stderr)
    return len(users), ok


def _models_summary(args, r, schema, prefix):
    """Serving model versions, and how the profiles in Redis were scored and routed."""
    import collections

    from ...models.model_registry import ModelRegistry
    from ...models.propensity import PropensityModel

    with ModelRegistry(args.redis_url, args.warehouse_dsn, schema=schema, key_prefix=prefix) as registry:
        seen_labels = None
        for kind in ("segmentation", "propensity"):
            current = registry.current(kind)
            if current is None and kind == "propensity":
                # Served only once warm: min_per_class labelled points of each class (docs/models.md).
                print("   propensity model           not published: it serves once it has learned "
                      f"{PropensityModel().min_per_class} completions and {PropensityModel().min_per_class} "
                      "timeouts (3-day horizon)"
                      + (f"; {seen_labels:,} labelled points so far" if seen_labels is not None else ""))
            elif current is None:
                print(f"   {kind} model         not published yet (the learner is still warming up)")
            else:
                counts = [(k, v) for k, v in sorted(current.counts.items()) if not isinstance(v, (dict, list))]
                metrics = [(k, round(v, 4) if isinstance(v, float) else v)
                           for k, v in sorted(current.metrics.items()) if not isinstance(v, (dict, list))]
                published = len(registry.versions(kind))
                print(f"   {kind} model         {current.id} serving ({published} version"
                      f"{'' if published == 1 else 's'} published; counts {_counted(counts)}; "
                      f"metrics {_counted(metrics)})")
                seen_labels = current.counts.get("labels") if kind == "segmentation" else seen_labels
    labels, tracks, scored, total = collections.Counter(), collections.Counter(), 0, 0
    for key in r.scan_iter(match=f"{prefix}:profile:*", count=1000):
        label, track, version = r.hmget(key, "segment_label", "onboarding_track", "model_version")
        total += 1
        scored += version not in (None, b"", b"null")
        if label not in (None, b"", b"null"):
            labels[label.decode().strip('"')] += 1
        if track not in (None, b"", b"null"):
            tracks[track.decode().strip('"')] += 1
    print(f"   scored by online models {scored:>8,} of {total:,} profiles (updated after the first publish)")
    if labels:
        print("   clusters: " + _counted(labels.most_common()))
    if tracks:
        print("   onboarding tracks: " + _counted(tracks.most_common()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
