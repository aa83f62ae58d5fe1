"""The onboarding logic as a Quix Streams application: the peer of ``make bench-compare`` (not a benchmark itself).

Runs in the benchmark's own virtualenv (tests/benchmarks/quix_venv.sh:
quixstreams 3.28 and onboardflow, apart from .venv). One ``Application``
reads the topic (the run's consumer group, new: from the earliest offset)
and does per record exactly what plain_loop.py's ``PlainLoop`` does, through
the same code (``QuixLoop`` is a ``PlainLoop``):

    OnboardingEventDecoder.decode ─► normalize_event ─► EventAnonymizer
      ─► ProfileMachine (snapshots=False), the user's state in Quix's state store
      ─► at every Quix checkpoint: StoreChain.flush() (enrich, rules, scores,
         tracks, ProfileSink to Redis, WarehouseSink, outbox relays)

State: the profile state lives in Quix's stateful processing (a RocksDB
store under ``--quix_state_dir`` with its changelog topic), written at
every ``Store`` decision as ``UserProfileState.to_primitive()``, pickled (as
the Flink job keeps it). Quix keys state by the message key: the topic is
keyed by user (``message_key``: user id, else anonymous id), so the state
of ``user_key`` is the entry ``user_key`` under the record's Kafka key.
Decoded states read or written since the last checkpoint are kept as
objects (``QuixStates``), as the Flink job's cache does.

Flush: ``StoreChainSink``, a Quix sink, calls ``PlainLoop.flush`` from its
``flush()``, which Quix calls at each checkpoint before it produces the
changelog and commits the offsets, so nothing buffered is lost by a crash.
Checkpoints every ``--quix_commit_every`` records or ``--quix_commit_interval``
seconds, by default the cadence the loop and the Flink job flush at
(``--flink_flush_size`` items, ``--flink_flush_interval_ms``: 5,000 / 0.1 s),
so that every contender keeps Redis equally fresh.

Timers: Quix has none, so the loop's event-time timers (the machine's
probe and lifecycle timers, in a heap in memory, as in plain_loop.py) fire
at each checkpoint, in the sink's ``flush()``, when the watermark (as in
plain_loop.py) has passed them; the states they touch are read and written
through the checkpoint's store transactions (what Quix's stateful functions
use). The heap is not in Quix's state: a restarted application would not
have it (see docs/decisions.md).

Bounded (``--kafka_bounded``): records outside the offset ranges that
``job_settings`` resolves are skipped, and the application stops (``app.stop()``
from ``on_message_processed``) once every partition has reached its stop
offset; the final checkpoint then fires every timer (the watermark jumps
to the end) and flushes. Streaming (``--streaming``): runs until SIGINT or
SIGTERM, on which Quix commits a last checkpoint.

``job_settings`` parses flags with Beam's option classes, which this
virtualenv lacks: it runs in ``--settings_python`` (default the checkout's
.venv), a child process of this one.

    python tests/benchmarks/quix_app.py [--settings_python=PY] [--quix_state_dir=DIR]
        [--quix_commit_every=N] [--quix_commit_interval=S] [onboardflow run flags]

Prints one JSON line, as plain_loop.py: ``{"records", "first_write_s", "seconds", "counts"}``.
"""
from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from plain_loop import END, PlainLoop, bounded_range, pop_flag, report  # first: its clock starts at import
from quixstreams import Application, message_context
from quixstreams.models.topics import TopicAdmin, TopicManager
from quixstreams.sinks import BaseSink
from quixstreams.state.rocksdb import RocksDBOptions

from onboardflow.pipelines.flink.settings import JobSettings
from onboardflow.transforms.kafka.records import KafkaRecord
from onboardflow.transforms.profile import ProfileMachine, UserProfileState

_SETTINGS = ("import json, sys; from onboardflow.runners.flink_job import job_settings; "
             "print(json.dumps(job_settings(sys.argv[1:])))")


class QuixStates:
    """Users' profile states (``user_key`` -> ``UserProfileState``) as a mapping over Quix's state store.

    What ``PlainLoop`` does with its dict (``get``, ``[]``, ``in``, ``pop``,
    assignment) goes to the store partition and key prefix (Kafka key) where
    ``at`` last placed the user, in the current checkpoint's transaction
    (``transaction(partition)``). States read or written since the last
    ``checkpoint()`` are kept decoded.
    """

    def __init__(self, machine: ProfileMachine, transaction: Callable[[int], object]):
        self._machine = machine
        self._transaction = transaction
        self._where: dict[str, tuple[int, bytes]] = {}
        self._live: dict[str, UserProfileState] = {}

    def at(self, key: str, partition: int, prefix: bytes) -> None:
        """User ``key``'s state is under the Kafka key ``prefix`` in store partition ``partition``."""
        self._where[key] = (partition, prefix)

    def _state(self, key: str):
        partition, prefix = self._where[key]
        return self._transaction(partition).as_state(prefix=prefix)

    def get(self, key: str, default=None) -> Optional[UserProfileState]:
        state = self._live.get(key)
        if state is not None:
            return state
        if key not in self._where:
            return default
        primitive = self._state(key).get(key)
        if primitive is None:
            return default
        state = self._live[key] = self._machine.load(primitive)
        return state

    def __getitem__(self, key: str) -> UserProfileState:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: str, state: UserProfileState) -> None:
        self._state(key).set(key, state.to_primitive())
        self._live[key] = state

    def pop(self, key: str, default=None) -> Optional[UserProfileState]:
        state = self.get(key)
        if key in self._where:
            self._state(key).delete(key)
            del self._where[key]
        self._live.pop(key, None)
        return default if state is None else state

    def checkpoint(self) -> None:
        """The checkpoint's transactions are committed: later reads go to the store."""
        self._live.clear()


class QuixLoop(PlainLoop):
    """``PlainLoop`` whose users' states live in Quix's state store (``QuixStates``)."""

    def __init__(self, s: JobSettings, transaction: Callable[[int], object]):
        super().__init__(s)
        self.states = QuixStates(self.machine, transaction)
        self.ending = False
        self._at: tuple[int, bytes] = (0, b"")

    def record(self, record: KafkaRecord) -> None:
        self._at = (record.partition, record.key)
        super().record(record)

    def on_event(self, key: str, event: dict) -> None:
        self.states.at(key, *self._at)
        super().on_event(key, event)


class StoreChainSink(BaseSink):
    """A Quix sink whose ``flush()`` (at each checkpoint) fires due timers and flushes the loop's ``StoreChain``."""

    def __init__(self, loop: QuixLoop):
        super().__init__()
        self._loop = loop

    def add(self, value, key, timestamp, headers, topic, partition, offset) -> None:
        pass  # the loop buffered the record's writes already

    def flush(self) -> None:
        loop = self._loop
        loop.flush(END if loop.ending else loop.watermark())
        loop.states.checkpoint()


class BenchTopicManager(TopicManager):
    """Quix's topic manager, naming its internal topics (the changelog) ``<consumer group>.quix-...``.

    Quix names them ``changelog__<group>--<topic>--<store>``; the benchmark's
    topics all start with its run's ``bench-<run>.`` (its consumer group).
    """

    def _internal_name(self, topic_type, topic_name, suffix) -> str:
        return f"{self._consumer_group}.quix-{super()._internal_name(topic_type, topic_name, suffix)}"


def resolve_settings(argv: list[str], python: str) -> JobSettings:
    """``job_settings(argv)`` (runners/flink_job.py), computed by ``python``, which has Beam."""
    out = subprocess.run([python, "-c", _SETTINGS, *argv], check=True, stdout=subprocess.PIPE, text=True).stdout
    return JobSettings(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str]) -> None:
    import onboardflow
    from onboardflow.runners.paths import run_dir

    default_python = Path(onboardflow.__file__).resolve().parent / ".venv" / "bin" / "python"
    python = pop_flag(argv, "settings_python", str(default_python))
    state_dir = pop_flag(argv, "quix_state_dir", str(run_dir() / "quix-state"))
    commit_every = pop_flag(argv, "quix_commit_every", "")
    commit_interval = pop_flag(argv, "quix_commit_interval", "")
    s = resolve_settings(argv, python)
    bounded = not s.streaming()
    commit_every = int(commit_every or s.flush_size)
    commit_interval = float(commit_interval or int(s.flush_interval_ms) / 1000)
    if bounded:
        topic_name, starts, stops = bounded_range(s)
    else:
        (topic_name,), starts, stops = [t.strip() for t in s.kafka_topics.split(",") if t.strip()], {}, {}
    group = s.kafka_consumer_group
    # --kafka_start_position: committed (else earliest) and earliest are Quix's "earliest", latest its
    # "latest"; a timestamp reads from the earliest (a bounded run skips what precedes its ranges).
    reset = "latest" if str(s.kafka_start_position).strip().lower() == "latest" else "earliest"
    app = Application(
        broker_address=s.kafka_bootstrap_servers, consumer_group=group, auto_offset_reset=reset,
        commit_every=commit_every, commit_interval=commit_interval, state_dir=state_dir,
        rocksdb_options=RocksDBOptions(dumps=pickle.dumps, loads=pickle.loads), use_changelog_topics=True,
        topic_manager=BenchTopicManager(TopicAdmin(broker_address=s.kafka_bootstrap_servers), group),
        on_message_processed=lambda topic, partition, offset: reached(partition, offset),
        loglevel="WARNING")
    topic = app.topic(topic_name, key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(topic)
    context, stream_id = sdf.processing_context, sdf.stream_id
    loop = QuixLoop(s, lambda p: context.checkpoint.get_store_transaction(stream_id=stream_id, partition=p))
    remaining = set(stops)
    records = 0

    def on_record(value, key, timestamp, headers, state) -> None:
        # ``state`` (the record's key's) is the one QuixStates reaches through the transaction.
        nonlocal records
        ctx = message_context()
        p, offset = ctx.partition, ctx.offset
        if bounded and not starts.get(p, 0) <= offset < stops.get(p, 0):
            return
        loop.record(KafkaRecord(ctx.topic, p, offset, timestamp, key, value))
        records += 1

    def reached(partition: int, offset: int) -> None:
        if bounded and partition in remaining and offset + 1 >= stops[partition]:
            remaining.discard(partition)
            if not remaining:
                loop.ending = True
                app.stop()

    sdf.update(on_record, stateful=True, metadata=True)
    sdf.sink(StoreChainSink(loop))
    loop.chain.open()
    try:
        if remaining or not bounded:
            app.run()
        else:
            loop.flush(END)  # nothing to read: the loop's last flush all the same
    finally:
        loop.chain.close()
        loop.client.close()
    report(records, loop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
