"""Cost of the pipeline metrics facade: per update, and on a small pipeline's throughput.

Per update (inside a Beam metrics container, as in a running DoFn): a bare
Beam counter (what the transforms already pay), the facade with Beam metrics
only (``--metrics_port=-1``) and the facade with Prometheus too, for an
unlabelled counter, a labelled counter and a histogram observation.

Throughput: 200k elements through one DoFn on the in-process FnApiRunner,
with no metrics, Beam-only metrics and Beam + Prometheus, calling the facade
once per element (the worst case: the wiring calls it once per batch where a
batch exists).

Whole pipeline (needs the local services, `make services-up`): a bounded run
of the onboarding pipeline on Prism over the same backlog, with the worker
endpoint (default options) and with ``--metrics_port=-1`` (Beam metrics only),
alternated, best of ``--rounds`` each. Produce/setup time is not counted.

    python tests/benchmarks/bench_metrics.py [--events 20000] [--rounds 2] [--no-pipeline]
"""
from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from prometheus_client import CollectorRegistry

from onboardflow.pipelines.beam.metrics import beam_pipeline_metrics

CALLS = 200_000
ELEMENTS = 200_000


def per_call_ns(fn, calls: int = CALLS) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


class _MeasureUpdates(beam.DoFn):
    """Times each kind of update inside a running DoFn, where Beam's metrics container is live."""

    def process(self, _):
        from apache_beam.metrics import Metrics

        bare = Metrics.counter("bench", "bare")
        beam_only = beam_pipeline_metrics(prometheus=False)
        both = beam_pipeline_metrics(registry=CollectorRegistry())
        cases = [
            ("Beam counter alone (baseline)", lambda: bare.inc(1)),
            ("facade counter, Beam only", lambda: beam_only.profiles_written(1)),
            ("facade counter, Beam + Prometheus", lambda: both.profiles_written(1)),
            ("facade labelled counter, Beam only", lambda: beam_only.events_read("onboarding.events", 3, 1)),
            ("facade labelled counter, Beam + Prometheus", lambda: both.events_read("onboarding.events", 3, 1)),
            ("facade histogram, Beam only", lambda: beam_only.redis_write_seconds(0.004)),
            ("facade histogram, Beam + Prometheus", lambda: both.redis_write_seconds(0.004)),
        ]
        for label, fn in cases:
            fn()  # create caches and children first
            yield f"  {label:<45} {per_call_ns(fn):8.0f} ns"


def bench_updates() -> None:
    print(f"per update, inside a DoFn ({CALLS} calls each):")
    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create([None]) | beam.ParDo(_MeasureUpdates()) | beam.Map(print)
    p.run().wait_until_finish()


class _Work(beam.DoFn):
    def __init__(self, metrics):
        self._metrics = metrics

    def process(self, element):
        if self._metrics is not None:
            self._metrics.events_read("onboarding.events", element & 3, 1)
            self._metrics.events_valid(1)
            self._metrics.redis_write_seconds(0.001)
        yield element


def bench_pipeline(label: str, metrics) -> None:
    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create(range(ELEMENTS), reshuffle=False) | beam.ParDo(_Work(metrics))
    start = time.perf_counter()
    p.run().wait_until_finish()
    took = time.perf_counter() - start
    print(f"  {label:<45} {ELEMENTS / took:10.0f} elements/s ({took:.2f} s)")


def bench_onboarding_pipeline(events: int, rounds: int, bootstrap: str = "127.0.0.1:9092") -> None:
    import logging
    import uuid

    import psycopg
    import redis
    from bench_topics import fresh_topics

    from onboardflow.pipelines.options import DEFAULT_REDIS_URL, DEFAULT_WAREHOUSE_DSN
    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.cli.run import run
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.transforms.anonymize import SecretKey

    logging.getLogger().setLevel(logging.ERROR)
    run_id = uuid.uuid4().hex[:8]
    topic = f"bench-metrics-{run_id}.onboarding.events"
    fresh_topics(bootstrap, [(topic, 4), (f"{topic}.dlq", 1), (f"{topic}.changes", 1)],
                 drop_prefix="bench-metrics-")
    now = int(time.time() * 1000)
    produce(JourneyGenerator(GeneratorConfig(seed=5, users=300, start_ms=now - 30 * 86_400_000))
            .messages(max_messages=events), bootstrap, topic, progress=False)
    secret = SecretKey(b"bench-metrics-secret-0123456789ab")
    schema = f"bench_metrics_{run_id}"
    variants = {"worker endpoint (default)": ["--metrics_port=0", "--metrics_bind_address=127.0.0.1"],
                "Beam metrics only (--metrics_port=-1)": ["--metrics_port=-1"]}
    best: dict = {}
    print(f"whole onboarding pipeline, bounded run over {events:,} events (Prism, best of {rounds}):")
    try:
        for round_ in range(rounds):
            for v, (label, extra) in enumerate(variants.items()):
                prefix = f"benchm{run_id}{round_}{v}"  # fresh Redis keys: every write applies
                args = [f"--kafka_bootstrap_servers={bootstrap}", f"--kafka_topics={topic}",
                        "--kafka_bounded", "--kafka_start_position=earliest",
                        f"--kafka_consumer_group=bench-metrics-{run_id}-{round_}-{v}",
                        f"--dead_letter_topic={topic}.dlq", f"--segment_changes_topic={topic}.changes",
                        f"--redis_key_prefix={prefix}", f"--warehouse_schema={schema}_{round_}_{v}",
                        *extra]
                start = time.perf_counter()
                run(args, secret=secret)
                took = time.perf_counter() - start
                best[label] = min(best.get(label, took), took)
                client = redis.Redis.from_url(DEFAULT_REDIS_URL)
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()
    finally:
        with psycopg.connect(DEFAULT_WAREHOUSE_DSN, autocommit=True) as conn:
            for round_ in range(rounds):
                for v in range(len(variants)):
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}_{round_}_{v}" CASCADE')
    for label, took in best.items():
        print(f"  {label:<45} {events / took:10.0f} events/s ({took:.1f} s incl. start-up)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-pipeline", action="store_true", help="skip the whole-pipeline comparison")
    args = parser.parse_args()
    bench_updates()
    print(f"pipeline throughput, 3 facade calls per element ({ELEMENTS} elements, FnApiRunner):")
    bench_pipeline("no metrics", None)
    bench_pipeline("Beam metrics only (--metrics_port=-1)", beam_pipeline_metrics(prometheus=False))
    bench_pipeline("Beam + Prometheus", beam_pipeline_metrics())
    if not args.no_pipeline:
        bench_onboarding_pipeline(args.events, args.rounds)


if __name__ == "__main__":
    main()
