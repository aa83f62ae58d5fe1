"""Longer crash and outage rounds than tests/integration/test_reliability.py; prints counts.

    .venv/bin/python tests/benchmarks/bench_reliability.py [--seeds 1 2 3] [--rounds 8] [--users 300]
        [--outage-seconds 30] [--no-outages]

Per seed: a journey stream with recent event times and 15% keyless records
(``reliability_harness.make_input``) on a fresh topic of the shared broker, an
uninterrupted bounded run (the reference), then ``--rounds`` kill -9s of the
pipeline's process group at seeded moments, each followed by a restart, the
last one run to its end; then the comparison with the reference.

Outages (unless ``--no-outages``), on private Redis / PostgreSQL / Kafka
(tests/integration/private_services.py): ONE bounded run that, once it has
written its first profiles, loses Redis for ``--outage-seconds``, then right
after PostgreSQL for as long, then has its Kafka broker restarted, and must
still end with the reference's outputs.

Prints, per scenario: input records, kill moments, outage lengths, records
compared, lost, doubled and the problems found. Timing is printed, never
judged; the exit status is 1 when anything was lost, doubled or different.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from onboardflow.runners.cli.produce import produce
from onboardflow.tests.conftest import KAFKA_BOOTSTRAP, PG_DSN, REDIS_URL, _assert_same_profiles
from onboardflow.tests.integration.private_services import PrivateServices
from onboardflow.tests.integration.reliability_harness import (
    Deployment,
    Outputs,
    PipelineProcess,
    compare,
    create_topics,
    delete_topics,
    make_input,
    run_to_end,
    write_secret,
)

NO_MODELS = "--disable_online_models"


def _name(label: str) -> str:
    return f"b-rel-{label}-{uuid.uuid4().hex[:8]}"


def _report(title: str, comparison) -> bool:
    print(f"{title}\n{comparison.summary()}", flush=True)
    return not comparison.problems and not sum(comparison.lost.values()) and not sum(comparison.doubled.values())


def _profile_count(redis_url: str, prefix: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return sum(1 for _ in client.scan_iter(f"{prefix}:profile:*", 1000))


def kill_rounds(seed: int, users: int, rounds: int, work: Path, secret: str) -> bool:
    messages = make_input(seed, users)
    topic = f"{_name('in')}.events"
    create_topics(KAFKA_BOOTSTRAP, {topic: 4})
    made = []
    try:
        assert produce(messages, KAFKA_BOOTSTRAP, topic, progress=False).ok
        reference = Deployment(_name("ref"), KAFKA_BOOTSTRAP, topic, REDIS_URL, PG_DSN, secret).create()
        crashed = Deployment(_name("kill"), KAFKA_BOOTSTRAP, topic, REDIS_URL, PG_DSN, secret).create()
        made += [reference, crashed]
        wall_s = run_to_end(reference, reference.name, work / f"{seed}-reference.log", NO_MODELS)
        rng = random.Random(seed)
        kills, ended = [], 0
        for i in range(rounds):
            moment = rng.uniform(0.1, 1.0) * wall_s
            process = PipelineProcess(crashed.argv(crashed.name, NO_MODELS), work / f"{seed}-round{i}.log")
            while process.elapsed() < moment and process.running():
                time.sleep(0.05)
            if not process.running():
                ended += 1  # finished before its kill moment: a complete run, no kill
                continue
            at = process.kill()
            kills.append((round(at, 1), _profile_count(REDIS_URL, crashed.prefix)))
        recovery_s = run_to_end(crashed, crashed.name, work / f"{seed}-recovery.log", NO_MODELS)
        comparison = compare(Outputs.read(crashed), Outputs.read(reference), _assert_same_profiles)
        return _report(
            f"seed {seed}: {len(messages)} records, uninterrupted {wall_s:.1f} s, {len(kills)} kills at "
            f"(s, profiles then) {kills}, {ended} rounds ended before their moment, recovery {recovery_s:.1f} s",
            comparison)
    finally:
        for d in made:
            d.cleanup()
        delete_topics(KAFKA_BOOTSTRAP, [topic])


def outages(seed: int, users: int, outage_s: float, work: Path, secret: str) -> bool:
    messages = make_input(seed, users)
    with PrivateServices(with_kafka=True) as s:
        topic = f"{_name('in')}.events"
        create_topics(s.bootstrap, {topic: 4})
        assert produce(messages, s.bootstrap, topic, progress=False).ok
        reference = Deployment(_name("ref"), s.bootstrap, topic, s.redis_url, s.dsn, secret).create()
        wall_s = run_to_end(reference, reference.name, work / "outage-reference.log", NO_MODELS)
        d = Deployment(_name("outage"), s.bootstrap, topic, s.redis_url, s.dsn, secret).create()
        process = PipelineProcess(d.argv(d.name, NO_MODELS), work / "outage-run.log")
        while not _profile_count(s.redis_url, d.prefix):
            assert process.running() and process.elapsed() < 300, "no profile written"
            time.sleep(0.05)
        faults = []
        for service, down_s in (("redis", outage_s), ("postgres", outage_s), ("kafka", 0.0)):
            faults.append((service, round(process.elapsed(), 1), round(s.restart(service, down_s), 1),
                           process.running()))
        rc = process.wait(900)
        log = process.log_text()
        retries = sum(1 for line in log.splitlines() if "failed (attempt" in line or "unavailable" in line)
        comparison = compare(Outputs.read(d), Outputs.read(reference), _assert_same_profiles)
        ok = _report(f"outages: {len(messages)} records, uninterrupted {wall_s:.1f} s, faults (service, at s, "
                     f"down s, run still running) {faults}, exit {rc}, {retries} retry log lines, "
                     f"run took {process.elapsed():.1f} s", comparison)
        return ok and rc == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=8, help="kill -9s per seed")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--outage-seconds", type=float, default=30.0)
    ap.add_argument("--no-outages", action="store_true")
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        work = Path(tmp)
        secret = write_secret(work)
        for seed in args.seeds:
            ok &= kill_rounds(seed, args.users, args.rounds, work, secret)
        if not args.no_outages:
            ok &= outages(args.seeds[0], args.users, args.outage_seconds, work, secret)
    print("all scenarios: nothing lost or doubled" if ok else "FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
