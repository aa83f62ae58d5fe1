"""Produce -> Redis latency under live traffic, for any engine (not a benchmark itself).

    from live_latency import probe_latency   # benchmarks run as scripts, so their folder is on sys.path

``probe_latency`` starts a load generator in a process of its own (it would
otherwise share this process's GIL with what it measures): generated events
stamped with the wall clock as they go out, at ``rate`` events/s for
``seconds``. Then it starts the pipeline (``start()``, which returns the
callable that stops it), and every ``probe_interval`` sends a probe event
(a login of a fresh user) and times it until its profile is visible in
Redis. Prints p50 / p99 over all probes and over the steady state (probes
sent after ``warmup`` seconds of load), and the median per 10 s of load.
Used by bench_pipeline.py (Beam on Prism) and bench_engines.py (Beam and the
native Flink job).
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
import uuid
from typing import Callable, Optional

from onboardflow.runners.cli.demo import _login, _percentile

_PROBE_CONSENT = {"analytics": True, "personalization": True, "marketing": False}


def feed_live(bootstrap: str, topic: str, rate: float, n: int, ready, go) -> None:
    """Send ``n`` generated events at ``rate`` per second, each stamped with the wall clock as it goes out.

    The events (their users, types and properties) come from the journey
    generator; their times are replaced when sent, keeping each event's own
    collector delay (received_at - occurred_at) so out-of-order and late
    events stay so. Generation happens first, then ``ready`` is set and
    sending starts when ``go`` is.
    """
    from kafka import KafkaProducer

    from onboardflow.runners.cli.produce import TokenBucket, producer_settings
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator, message_key, v1_serializer

    gen = JourneyGenerator(GeneratorConfig(seed=4, users=max(5_000, n // 5)))
    events = []
    for _, event in gen.events():
        events.append(event)
        if len(events) >= n:
            break
    serialize = v1_serializer()
    producer = KafkaProducer(bootstrap_servers=bootstrap, **producer_settings())
    producer.partitions_for(topic)
    ready.set()
    go.wait()
    bucket = TokenBucket(rate)
    for event in events:
        bucket.acquire()
        now = int(time.time() * 1000)
        event["occurred_at"], event["received_at"] = now - (event["received_at"] - event["occurred_at"]), now
        producer.send(topic, key=message_key(event), value=serialize(event))
    producer.flush()
    producer.close()


def probe_latency(bootstrap: str, topic: str, prefix: str, secret, rate: float, seconds: float,
                  start: Callable[[], Callable[[], None]], *, warmup: float = 20.0, probe_interval: float = 1.0,
                  startup_s: float = 10.0, before_stop: Optional[Callable[[], None]] = None,
                  label: str = "") -> Optional[tuple[float, float]]:
    """Probe produce -> Redis latency while live traffic flows at ``rate`` events/s (module docstring).

    ``start()`` starts the pipeline reading ``topic`` and writing profiles
    under ``prefix``, and returns the callable that stops it; the load
    starts ``startup_s`` after it. ``before_stop`` runs before the pipeline
    stops (e.g. to sample peak memory). Returns the steady-state (p50, p99)
    in seconds (all probes' when there is no steady state), or None when no
    probe reached Redis.
    """
    from kafka import KafkaProducer

    from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
    from onboardflow.schemas.wire import AvroSerializer
    from onboardflow.transforms.profile_store.store import ProfileStore

    n = int(rate * seconds)
    spawn = multiprocessing.get_context("spawn")
    ready, go = spawn.Event(), spawn.Event()
    feeder = spawn.Process(target=feed_live, args=(bootstrap, topic, rate, n, ready, go), daemon=True)
    feeder.start()
    if not ready.wait(timeout=300):
        raise RuntimeError("the load generator did not get ready within 300 s")
    stop = start()
    serializer = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", version=2))
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    store = ProfileStore("redis://127.0.0.1:6379/0", secret, key_prefix=prefix)
    time.sleep(startup_s)
    go.set()
    t_start = time.time()
    t_end = t_start + seconds
    probes: list[tuple[float, float]] = []  # (sent, latency)
    pending: dict[str, float] = {}
    next_probe = t_start
    try:
        while time.time() < t_end + 30 and (time.time() < t_end or pending):
            if next_probe <= time.time() < t_end:
                user = f"probe-{uuid.uuid4().hex[:10]}"
                producer.send(topic, key=user.encode(), value=serializer.serialize(
                    _login(user, int(time.time() * 1000), _PROBE_CONSENT)))
                producer.flush()
                pending[user] = time.time()
                next_probe += probe_interval
            found = [u for u, r in zip(pending, store.get_many(list(pending))) if r is not None]
            for u in found:
                sent = pending.pop(u)
                probes.append((sent, time.time() - sent))
            time.sleep(0.01)
        if before_stop is not None:
            before_stop()
    finally:
        stop()
        producer.close()
        store.close()
    feeder.join(timeout=5)
    if feeder.is_alive():
        feeder.terminate()
    who = f"{label}: " if label else ""
    if not probes:
        print(f"   {who}latency at {rate:,.0f} events/s: no probe reached Redis within 30 s", flush=True)
        return None
    every = [lat for _, lat in probes]
    steady = [lat for sent, lat in probes if sent - t_start >= warmup]
    ms = lambda v: f"{v * 1000:,.0f} ms"  # noqa: E731
    line = (f"   {who}latency at {rate:,.0f} events/s live for {seconds:.0f}s: all probes p50 "
            f"{ms(statistics.median(every))}, p99 {ms(_percentile(every, 0.99))} ({len(every)} probes, "
            f"{len(pending)} not seen within 30 s)")
    if steady:
        line += (f"; after {warmup:.0f}s warm-up p50 {ms(statistics.median(steady))}, "
                 f"p99 {ms(_percentile(steady, 0.99))} ({len(steady)} probes)")
    print(line, flush=True)
    # Median per 10 s of load: shows warm-up and falling behind at a glance.
    buckets: dict[int, list[float]] = {}
    for sent, lat in probes:
        buckets.setdefault(int((sent - t_start) // 10), []).append(lat)
    print("     median by 10 s of load: " + "  ".join(
        f"{b * 10}s {statistics.median(v):.1f}s" for b, v in sorted(buckets.items())), flush=True)
    chosen = steady or every
    return statistics.median(chosen), _percentile(chosen, 0.99)
