"""What keyed state costs per key on Prism with the Python SDK (prints, never asserts).

The profile stage reads and writes one state cell per user per bundle. Prism
(Beam 2.77) sends no cache tokens, so the Python SDK caches no user state
between bundles: every read is a blocking round trip to the runner, every
write a clear and an append, each through the harness's gRPC threads. This
measures that cost in isolation, on the same runner and worker setup as the
pipeline (Prism, in-process SDK workers), with N elements over N/2 keys:

* keyed, no state: a stateless ParDo after the same shuffle (the baseline),
* blind write: one ReadModifyWrite cell written per element,
* read + write: read, then write (what the profile stage does).

The difference to the baseline, per key, is what a user touched in a bundle
costs in state traffic, and bounds the profile stage's throughput when
every event belongs to a different user (live traffic). Usage:

    python tests/benchmarks/bench_prism_state.py [--elements 20000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from onboardflow.runners.local import local_pipeline_options


class _Keyed(beam.DoFn):
    """The baseline: same input, no state (a Reshuffle supplies the same shuffle)."""

    def process(self, kv):
        yield 1


class _BlindWrite(beam.DoFn):
    CELL = ReadModifyWriteStateSpec("cell", FastPrimitivesCoder())

    def process(self, kv, cell=beam.DoFn.StateParam(CELL)):
        cell.write(kv[1])
        yield 1


class _ReadWrite(beam.DoFn):
    CELL = ReadModifyWriteStateSpec("cell", FastPrimitivesCoder())

    def process(self, kv, cell=beam.DoFn.StateParam(CELL)):
        cell.write((cell.read() or 0) + kv[1])
        yield 1


def _run(fn: beam.DoFn, n: int) -> float:
    """Seconds for one bounded run over n elements (n/2 keys), start-up included."""
    elements = [(f"user-{i % (n // 2)}", 1) for i in range(n)]
    start = time.perf_counter()
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        keyed = p | beam.Create(elements, reshuffle=False)
        if isinstance(fn, _Keyed):
            keyed = keyed | beam.Reshuffle()
        _ = keyed | beam.ParDo(fn) | beam.combiners.Count.Globally()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    n = args.elements
    print(f"== bench_prism_state (Prism, in-process SDK workers; {n:,} elements over {n // 2:,} keys; "
          f"median of {args.repeats}; {os.cpu_count()} cores)")
    medians = {}
    for name, fn in (("keyed, no state", _Keyed()), ("blind write", _BlindWrite()),
                     ("read + write", _ReadWrite())):
        medians[name] = statistics.median(_run(fn, n) for _ in range(args.repeats))
        print(f"   {name:<16} {medians[name]:6.2f} s  ({n / medians[name]:,.0f} elements/s incl. start-up)",
              flush=True)
    base = medians["keyed, no state"]
    keys = n // 2
    for name in ("blind write", "read + write"):
        print(f"   {name}: {(medians[name] - base) / keys * 1e6:,.0f} us per key over the baseline "
              f"(each key is touched once per bundle; its 2 elements share the read)")


if __name__ == "__main__":
    main()
