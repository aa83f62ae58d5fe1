"""End-to-end benchmark of the onboarding pipeline on Prism (prints, never asserts).

Against the real local Kafka / Redis / PostgreSQL, with the SDK workers in a
Beam worker pool's processes (``--environment_type=EXTERNAL``, as on Flink),
so that this process, which measures, never shares a GIL with them
(``--workers loopback`` runs them in-process instead, as ``onboardflow run``
does by default).

1. Sustained throughput (backfill): N generated events spanning 45 days are
   produced first, then the streaming pipeline starts; measured until the
   consumer group has committed every offset AND the sink watermark the
   pipeline records in Redis (``SinkWatermark``) has passed the wall clock of
   that moment minus the 60 s out-of-orderness, as the demo decides "settled"
   (the source commits before the sinks finish, so lag alone would flatter
   it; a pause in writes is no proof either). Reported with and without start-up
   (time to the first commit), with the online models and without.
2. Latency under live traffic, at each rate of --rates: a separate process
   (which would otherwise share the GIL with what it measures) sends
   generated events stamped with the wall clock as they go out (event time =
   now, as in production; a 45-day backfill compressed into a minute would
   fire days of lifecycle timers per second instead). Every --probe-interval
   a probe event for a fresh user is sent and timed until its profile is
   visible in Redis (produce -> Redis). p50 / p99 over all probes and over
   the steady state (probes sent after the first --warmup seconds of load:
   first model publications, worker start-up).

Each measurement runs in a process of its own, with its own Prism. Peak
memory, per measurement: VmHWM of the largest SDK worker process (of the
job's process with LOOPBACK workers) and of Prism. Usage:

    python tests/benchmarks/bench_pipeline.py [--events 50000] [--rates 500,1000,2000] [--seconds 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Optional

from bench_topics import fresh_topics, vm_hwm_kb
from live_latency import probe_latency

from onboardflow.runners.local import stop_streaming_job
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.progress import SinkWatermark


def _pids(needle: bytes, first_arg_only: bool = False) -> list[int]:
    """Pids of the processes whose command line (or only its first word) contains ``needle``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
            except OSError:
                continue
            if needle in (words[0] if first_arg_only else b" ".join(words)):
                pids.append(int(entry))
    return pids


class PeakMemory:
    """Largest VmHWM seen per role (SDK workers, Prism), sampled before each job stops."""

    def __init__(self, in_process_workers: bool):
        self.in_process_workers = in_process_workers
        self.workers_kb = 0
        self.prism_kb = 0

    def sample(self) -> None:
        workers = [os.getpid()] if self.in_process_workers else _pids(b"SdkHarness")
        self.workers_kb = max([self.workers_kb] + [vm_hwm_kb(p) for p in workers])
        self.prism_kb = max([self.prism_kb] + [vm_hwm_kb(p) for p in _pids(b"prism", first_arg_only=True)])

    def __str__(self) -> str:
        who = "launcher + in-process SDK workers" if self.in_process_workers else "largest SDK worker process"
        return f"peak memory: {who} {self.workers_kb / 1024:.0f} MiB; Prism {self.prism_kb / 1024:.0f} MiB"


def _start_pipeline(args, topic, group, prefix, schema, secret, extra=()):
    from onboardflow.runners.cli.run import run

    return run(["--streaming", f"--kafka_bootstrap_servers={args.bootstrap}", f"--kafka_topics={topic}",
                "--kafka_start_position=earliest", f"--kafka_consumer_group={group}", "--kafka_idle_timeout=5",
                f"--dead_letter_topic={topic}.dlq", f"--segment_changes_topic={topic}.changes",
                f"--model_events_topic={topic}.models",
                f"--redis_key_prefix={prefix}", f"--warehouse_schema={schema}",
                *args.environment, *args.pipeline_arg, *extra], secret=secret, wait=False)


def _topics(args, topic: str, drop_prefix: str) -> None:
    fresh_topics(args.bootstrap, [(topic, 4), (f"{topic}.dlq", 1), (f"{topic}.changes", 1), (f"{topic}.models", 1)],
                 drop_prefix=drop_prefix)


def _lag(bootstrap, topic, group):
    """Total of (end offset - committed offset) over the topic's partitions, and the total of end offsets."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        return sum(max(0, ends[tp] - (consumer.committed(tp) or 0)) for tp in parts), sum(ends.values())
    finally:
        consumer.close()


def _sustained(args, run_id, tag, schema, secret, memory: PeakMemory, extra=(), drop_prefix=None):
    """Time a backlog of ``args.events`` from the first offset commit until the pipeline settled."""
    import redis

    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator

    topic = f"bench-{run_id}-{tag}.onboarding.events"
    _topics(args, topic, drop_prefix or f"bench-{run_id}-{tag}-x")
    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=3, users=400, start_ms=now - 45 * DAY_MS))
    produce(gen.messages(max_messages=args.events), args.bootstrap, topic, progress=False)
    group, prefix = f"bench-{run_id}-{tag}", f"bench{run_id}{tag}"
    result = _start_pipeline(args, topic, group, prefix, schema, secret, extra)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    watermark = SinkWatermark(prefix)
    first = done = caught_up_ms = None
    last_count = 0
    t0 = time.time()
    try:
        while time.time() - t0 < 900:
            time.sleep(0.5)
            lag, total = _lag(args.bootstrap, topic, group)
            if first is None and lag < total:
                first = time.time()
            if lag == 0 and caught_up_ms is None:
                caught_up_ms = int(time.time() * 1000)
            # Settled as the demo decides it: every offset committed, then the
            # sink watermark past (wall clock at that moment - the source's
            # 60 s out-of-orderness): every event and timer before it is in Redis.
            reached = watermark.read(client)
            if caught_up_ms is not None and reached is not None and reached >= caught_up_ms - 60_000:
                done = time.time()
                last_count = sum(1 for _ in client.scan_iter(match=f"{prefix}:profile:*", count=1000))
                break
        memory.sample()
    finally:
        stop_streaming_job(result)
    label = "online models off" if "--disable_online_models" in extra else "online models on "
    if done and first:
        print(f"   sustained, {label}: {args.events:,} events into {last_count:,} Redis profiles in "
              f"{done - t0:.1f}s = {args.events / (done - t0):,.0f} events/s with start-up; "
              f"{args.events / (done - first):,.0f} events/s after the first commit ({first - t0:.1f}s start-up)",
              flush=True)
    else:
        print(f"   sustained, {label}: did not drain within 900 s", flush=True)


def _latency(args, run_id, rate: float, schema, secret, memory: PeakMemory) -> None:
    """Probe produce -> Redis latency while live traffic flows at ``rate`` events/s (live_latency.py)."""
    tag = f"l{int(rate)}"
    topic = f"bench-{run_id}-{tag}.onboarding.events"
    _topics(args, topic, f"bench-{run_id}-{tag}-x")
    group, prefix = f"bench-{run_id}-{tag}", f"bench{run_id}{tag}"

    def start():
        result = _start_pipeline(args, topic, group, prefix, schema, secret)
        return lambda: stop_streaming_job(result)

    probe_latency(args.bootstrap, topic, prefix, secret, rate, args.seconds, start, warmup=args.warmup,
                  probe_interval=args.probe_interval, before_stop=memory.sample)


def _phase(args) -> None:
    """One measurement (``--phase``), in a process of its own (see ``main``)."""
    import logging

    from onboardflow.transforms.anonymize import SecretKey

    logging.basicConfig(level=logging.ERROR)
    args.environment = (["--environment_type=EXTERNAL", f"--environment_config={args.pool}"] if args.pool else [])
    memory = PeakMemory(in_process_workers=not args.pool)
    secret = SecretKey(b"bench-secret-0123456789abcdef-xyz")
    schema = f"bench_{args.run_id}"
    kind, _, value = args.phase.partition(":")
    if kind == "sustained":
        models_off = value == "models-off"
        _sustained(args, args.run_id, "c" if models_off else "a", schema, secret, memory,
                   extra=("--disable_online_models",) if models_off else (),
                   drop_prefix=None if models_off else "bench-")
    else:
        _latency(args, args.run_id, float(value), schema, secret, memory)
    print(f"     {memory}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rates", default="500,1000,2000",
                    help="comma-separated live rates (events/s) for the latency runs")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--probe-interval", type=float, default=1.0)
    ap.add_argument("--workers", choices=("process", "loopback"), default="process",
                    help="SDK workers in a worker pool's processes (EXTERNAL) or in the job's process (LOOPBACK)")
    ap.add_argument("--pipeline-arg", action="append", default=[],
                    help="extra pipeline flag for every run, e.g. --pipeline-arg=--kafka_max_read_seconds=0.25")
    ap.add_argument("--skip-sustained", action="store_true", help="only the latency measurements")
    # Set by main() for the process that runs one measurement.
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        _phase(args)
        return

    import psycopg

    from onboardflow.pipelines.options import DEFAULT_WAREHOUSE_DSN
    from onboardflow.runners.flink_runner import WorkerPool
    from onboardflow.runners.paths import run_dir

    run_id = time.strftime("%H%M%S")
    pool: Optional[WorkerPool] = None
    if args.workers == "process":
        from apache_beam.utils.subprocess_server import pick_port

        pool = WorkerPool(port=pick_port(None)[0], log_path=run_dir() / "bench" / "worker-pool.log").start()
    print(f"== bench_pipeline (Prism, SDK workers: {'worker-pool processes' if pool else 'in-process'}; "
          f"real Kafka/Redis/PostgreSQL; {os.cpu_count()} cores)", flush=True)
    phases = [] if args.skip_sustained else ["sustained:models-on", "sustained:models-off"]
    phases += [f"latency:{float(r)}" for r in args.rates.split(",") if r.strip()]
    # Each measurement runs in a fresh interpreter, hence with a Prism of its
    # own that exits with it: measurements start from the same state, and the
    # peak memory figures (VmHWM never goes down within a process) are each
    # measurement's own.
    try:
        for phase in phases:
            argv = [sys.executable, __file__, *sys.argv[1:], f"--phase={phase}", f"--run-id={run_id}"]
            if pool is not None:
                argv.append(f"--pool={pool.address}")
            code = subprocess.run(argv, check=False).returncode
            if code:
                print(f"   {phase}: failed (exit code {code})", flush=True)
    finally:
        if pool is not None:
            pool.stop()
        with psycopg.connect(DEFAULT_WAREHOUSE_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "bench_{run_id}" CASCADE')

if __name__ == "__main__":
    main()
