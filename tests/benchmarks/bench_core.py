"""CPU per event of each step of the engine-free core, in memory (prints, never asserts).

The work every engine does per record and per profile write, without Kafka,
Redis or the warehouse: generated records (the ``make bench-compare``
population, framed Avro bytes as produced) go step by step through the
core, in the order of tests/benchmarks/plain_loop.py:

    decode ─► normalize ─► anonymize ─► events row ─► ProfileMachine.on_event
    and per profile write (one per user per flush of --flush-records records):
    snapshot ─► enrich ─► rule segments ─► Redis encoding

Each step runs over all its inputs at once and is timed in CPU seconds
(``time.process_time``), with what is alive before the step (its
inputs, the users' states) frozen out of the garbage collector, as a
worker's long-lived state is; medians of ``--repeat``
rounds, in µs per item and per record.

``--baseline ROOT``: the same measurement, in the same run, of the checkout
at ROOT (e.g. a ``git worktree`` of an older commit; its steps must have
the same names), printed side by side with this checkout's. Where the
numbers come from and what they led to: docs/performance.md.

    python tests/benchmarks/bench_core.py [--records 50000] [--users 500] [--repeat 3] [--baseline ROOT]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(records: int, users: int, repeat: int, flush_records: int) -> dict[str, tuple[float, int]]:
    """{step: (median CPU µs per item, items)} of this interpreter's onboardflow."""
    from onboardflow.pipelines.configuration import load_rules, profile_config
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.schemas.units import DAY_MS
    from onboardflow.transforms import anonymize as core
    from onboardflow.transforms.anonymize import EventAnonymizer, Pseudonymizer
    from onboardflow.transforms.decode import OnboardingEventDecoder
    from onboardflow.transforms.enrich import enrich_profile
    from onboardflow.transforms.kafka.records import KafkaRecord
    from onboardflow.transforms.normalize import normalize_event
    from onboardflow.transforms.profile import ProfileMachine, Store
    from onboardflow.transforms.profile_store.encoding import encode_profile
    from onboardflow.transforms.segment import segment_profile
    from onboardflow.transforms.warehouse.rows import event_row

    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=7, users=users, start_ms=now - int(14.5 * DAY_MS),
                                           horizon_days=14.0, signup_window_days=7.0))
    raw = [KafkaRecord("bench", i % 4, i, now, m.key, m.value)
           for i, m in enumerate(gen.messages(max_messages=records))]
    from apache_beam.options.pipeline_options import PipelineOptions

    from onboardflow.pipelines.options import OnboardingOptions

    opts = PipelineOptions([]).view_as(OnboardingOptions)  # the pipeline's defaults
    rules = load_rules(opts)
    config = profile_config(opts, None, rules)
    decoder = OnboardingEventDecoder()
    anonymizer = EventAnonymizer(Pseudonymizer(b"bench-core-secret-0123456789abcdef"))

    def decode(record):
        try:
            return decoder.decode(record)
        except Exception:  # noqa: BLE001 - malformed records are dead-lettered: not timed further
            return None

    decode(raw[0])  # the schema fetched and planned once, as in a worker
    timings: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}

    def step(name, fn, items):
        # What is alive (the step's inputs, earlier steps' outputs) is frozen out of the
        # collector: a worker does not hold a whole run's events, and scanning them
        # would bill a step for its predecessors' garbage.
        gc.collect()
        gc.freeze()
        started = time.process_time()
        out = [fn(x) for x in items]
        timings.setdefault(name, []).append((time.process_time() - started) * 1e6 / max(len(items), 1))
        sizes[name] = len(items)
        return out

    for _ in range(repeat):
        machine = ProfileMachine(config, snapshots=False)
        states: dict = {}
        events = [e for e in step("decode", decode, raw) if e is not None]
        normed = step("normalize", lambda e: normalize_event(e)[0], events)
        routed = step("anonymize", anonymizer.anonymize, normed)
        kept = [out for route, out, _ in routed if route in (core.PERSONALIZATION, core.ANALYTICS_ONLY)]
        step("events row", event_row, kept)

        def on_event(event):
            key = event["user_key"]
            for decision in machine.on_event(states.get(key), event):
                if type(decision) is Store:
                    states[key] = decision.state

        personal = [out for route, out, _ in routed if route == core.PERSONALIZATION]
        step("on_event", on_event, personal)
        # One profile write per user per flush, as the loop and the Flink job do.
        writes, pending = [], set()
        for i, event in enumerate(personal, 1):
            pending.add(event["user_key"])
            if i % flush_records == 0 or i == len(personal):
                writes += sorted(pending)
                pending = set()
        snapshots = step("snapshot", lambda key: states[key].snapshot(key), writes)
        enriched = step("enrich", lambda p: enrich_profile(p, {})[0], snapshots)
        segmented = step("segments", lambda p: segment_profile(rules, p, p["as_of"]), enriched)
        step("redis encoding", encode_profile, segmented)
        gc.unfreeze()
    return {name: (statistics.median(values), sizes[name]) for name, values in timings.items()}


def _in_checkout(root: str, args) -> dict[str, tuple[float, int]]:
    """``measure`` in a child interpreter whose ``onboardflow`` is the checkout at ``root``."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "onboardflow").symlink_to(Path(root).resolve())
        env = dict(os.environ, PYTHONPATH=tmp)
        out = subprocess.run([sys.executable, __file__, "--records", str(args.records), "--users", str(args.users),
                              "--repeat", str(args.repeat), "--flush-records", str(args.flush_records), "--json"],
                             env=env, check=True, capture_output=True, text=True).stdout
    return {k: tuple(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flush-records", type=int, default=500, help="records between two profile writes of a user")
    ap.add_argument("--baseline", default=None, help="another checkout's root, measured in the same run")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:
        print(json.dumps(measure(args.records, args.users, args.repeat, args.flush_records)))
        return
    here = str(Path(__file__).resolve().parents[2])
    print(f"== bench_core: {args.records:,} generated records of {args.users:,} users, in memory; CPU µs, "
          f"medians of {args.repeat}; {os.cpu_count()} cores", flush=True)
    runs = {"this checkout": _in_checkout(here, args)}
    if args.baseline:
        runs = {"baseline": _in_checkout(args.baseline, args), **runs}
    names = list(runs["this checkout"])
    records = runs["this checkout"]["decode"][1]
    head = " | ".join(f"{label}: µs/item | µs/record" for label in runs)
    print(f"\n| step | items | {head} |\n|---|---:|" + "---:|---:|" * len(runs))
    totals = {label: 0.0 for label in runs}
    for name in names:
        cells = []
        for label, found in runs.items():
            per_item, items = found.get(name, (float("nan"), 0))
            per_record = per_item * items / records
            totals[label] += per_record
            cells.append(f"{per_item:.2f} | {per_record:.2f}")
        print(f"| {name} | {runs['this checkout'][name][1]:,} | {' | '.join(cells)} |")
    print(f"| **per record, all steps** | {records:,} | "
          + " | ".join(f" | **{total:.1f}** ({1e6 / total:,.0f} records/s)" for total in totals.values()) + " |",
          flush=True)


if __name__ == "__main__":
    main()
