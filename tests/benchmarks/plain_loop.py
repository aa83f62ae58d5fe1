"""The onboarding logic as a plain single-process loop: the ceiling for it in Python (not a benchmark itself).

One process, no engine: a Kafka consumer reads the bounded offset ranges
the Flink launcher resolves for the same flags (``job_settings``,
runners/flink_job.py), and every record goes through the same core
functions as in the native Flink job (pipelines/flink/events.py, users.py),
in the same order:

    OnboardingEventDecoder.decode ─► normalize_event ─► EventAnonymizer
      ─► LocalIdentities (identity stitching, transforms/identity.py)
      ─► ProfileMachine (snapshots=False; state in a dict, timers in a heap)
      ─► StoreChain.flush() (pipelines/flink/store.py:
         enrich, rules, scores, track, ProfileSink to Redis, WarehouseSink,
         outbox relays), when the chain holds --flink_flush_size items or
         --flink_flush_interval_ms passed since the last flush, as in the job

Event time as in the Flink job: the watermark is the smallest per-partition
newest event time minus the out-of-orderness, the machine's probe and
lifecycle timers fire when it passes them (before each flush), and at the
end of input every timer fires (bounded by the run's horizon). The online
models are not trained here (the Flink job's learner stage); with models on,
profiles are scored by whatever models Redis serves.

    python tests/benchmarks/plain_loop.py [onboardflow run flags, e.g. --kafka_topics=T --kafka_bounded ...]

Prints one JSON line: ``{"records", "first_write_s", "seconds", "counts"}``.
"""
from __future__ import annotations

import collections
import heapq
import json
import sys
import time
from typing import Optional

T0 = time.monotonic()

from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from onboardflow.models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy  # noqa: E402
from onboardflow.pipelines.configuration import (  # noqa: E402
    identity_config,
    load_rules,
    profile_config,
    resolve_secret,
)
from onboardflow.pipelines.flink.settings import JobSettings, horizon  # noqa: E402
from onboardflow.pipelines.flink.store import (  # noqa: E402
    DEAD_LETTERS,
    EVENTS,
    IDENTITY_ALIASES,
    LATE_EVENTS,
    RETIREMENTS,
    StoreChain,
    dead_letter_row,
)
from onboardflow.runners.flink_job import job_settings  # noqa: E402
from onboardflow.transforms import anonymize as core  # noqa: E402
from onboardflow.transforms.anonymize import EventAnonymizer, Pseudonymizer  # noqa: E402
from onboardflow.transforms.connections import redis_client  # noqa: E402
from onboardflow.transforms.dead_letter import pipeline_dead_letter  # noqa: E402
from onboardflow.transforms.decode import OnboardingEventDecoder  # noqa: E402
from onboardflow.transforms.erasure import ErasedUsers  # noqa: E402
from onboardflow.transforms.identity import LocalIdentities  # noqa: E402
from onboardflow.transforms.kafka.records import KafkaRecord, event_time_ms  # noqa: E402
from onboardflow.transforms.metrics import PipelineMetrics  # noqa: E402
from onboardflow.transforms.normalize import normalize_event  # noqa: E402
from onboardflow.transforms.outbox.dead_letters import DeadLetterOutbox, dead_letter_id  # noqa: E402
from onboardflow.transforms.outbox.keys import OutboxKeys  # noqa: E402
from onboardflow.transforms.profile import (  # noqa: E402
    ERASED,
    ClearState,
    DeadLetter,
    Emit,
    ProfileMachine,
    SetTimer,
    Store,
    TooLate,
)
from onboardflow.transforms.profile_store.keys import ProfileKeys  # noqa: E402

END = 2**63 - 2


class PlainLoop:
    """The loop's state: users' profile states, their timers, the store chain (module docstring)."""

    def __init__(self, s: JobSettings):
        rules = load_rules(s)
        self.s = s
        self.flush_size = int(s.flush_size)
        self.flush_interval_s = int(s.flush_interval_ms) / 1000
        self.counts: collections.Counter = collections.Counter()
        self.decoder = OnboardingEventDecoder(registry_url=s.registry_url)
        self.anonymizer = EventAnonymizer(Pseudonymizer(resolve_secret(s).resolve()))
        self.client = redis_client(s.redis_url)
        self.machine = ProfileMachine(profile_config(s, horizon(s), rules), snapshots=False,
                                      erased=ErasedUsers(self.client, ProfileKeys(s.redis_key_prefix)))
        self.chain = StoreChain(s, rules, TrackPolicy.from_yaml(s.tracks_file or DEFAULT_TRACKS_PATH, rules),
                                PipelineMetrics(prometheus=False), self.count)
        self.outbox = DeadLetterOutbox(self.client, OutboxKeys(s.redis_key_prefix))
        # Identity stitching, as the job's IdentityStage (dict state: a bounded run needs no expiry).
        self.identities = None if s.get("disable_identity_stitching") else LocalIdentities(identity_config(s))
        self.states: dict = {}
        self.dirty: set = set()
        self.timers: list = []  # heap of (at_ms, user_key)
        self.scheduled: set = set()
        self.newest: dict = {}
        self.lag_ms = int(float(s.kafka_max_out_of_orderness) * 1000)
        self.first_write_s = None

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def record(self, record: KafkaRecord) -> None:
        """One Kafka record: its rows buffered, and its event through the user's ``ProfileMachine``."""
        event = self.event(record)
        if event is None:
            return
        forwarded, stitches = self.identities.resolve(event) if self.identities is not None else ([event], ())
        for stitch in stitches:
            self.chain.add_row(IDENTITY_ALIASES, stitch)
            if stitch.retire:
                self.chain.add_row(RETIREMENTS, stitch)
        for resolved in forwarded:
            self.on_event(resolved["user_key"], resolved)

    def event(self, record: KafkaRecord) -> Optional[dict]:
        """Decode, normalize and anonymize ``record``, buffering its rows (events, dead letters).

        Returns the anonymized event when it goes on to its user's profile
        (personalization consent), else None.
        """
        try:
            event = self.decoder.decode(record)
            t = event_time_ms(event)
        except Exception as error:  # noqa: BLE001 - bad input is dead-lettered, as in the job
            letter = self.decoder.dead_letter(record, error, stage="decode")
            self.outbox.write([(dead_letter_id(letter), letter.get("key"), self.decoder.encode_dead_letter(letter))])
            self.chain.add_row(DEAD_LETTERS, dead_letter_row(letter))
            return None
        tp = record.partition
        if t > self.newest.get(tp, -1):
            self.newest[tp] = t
        event, _ = normalize_event(event)
        route, out, _ = self.anonymizer.anonymize(event)
        if route == core.DEAD_LETTER:
            self.chain.add_row(DEAD_LETTERS, dead_letter_row(out))
            return None
        if route == core.CONSENT_FILTERED:
            return None
        self.count("events_valid")
        self.chain.add_row(EVENTS, out)
        return out if route == core.PERSONALIZATION else None

    def on_event(self, key: str, event: dict) -> None:
        """The machine's decisions on ``event`` of user ``key``, carried out."""
        self.carry_out(self.machine.on_event(self.states.get(key), event), key, event)

    def carry_out(self, decisions, key: str, event=None) -> None:
        for d in decisions:
            kind = type(d)
            if kind is Store:
                self.states[key] = d.state
            elif kind is SetTimer:
                if (d.at_ms, key) not in self.scheduled:
                    self.scheduled.add((d.at_ms, key))
                    heapq.heappush(self.timers, (d.at_ms, key))
            elif kind is Emit:
                self.dirty.add(key)
            elif kind is TooLate:
                self.chain.add_row(LATE_EVENTS, event)
            elif kind is DeadLetter:
                self.chain.add_row(DEAD_LETTERS, dead_letter_row(pipeline_dead_letter("profile", d.reason, d.detail,
                                                                                      event)))
            elif kind is ClearState:
                state = self.states.pop(key, None)
                if key in self.dirty and state is not None and d.reason != ERASED:
                    self.chain.add_profile(state.snapshot(key))
                self.dirty.discard(key)

    def fire(self, watermark: int) -> None:
        """Fire every timer due at or before ``watermark``, as Flink does when the watermark passes it."""
        while self.timers and self.timers[0][0] <= watermark:
            at, key = heapq.heappop(self.timers)
            self.scheduled.discard((at, key))
            state = self.states.get(key)
            if state is None:
                continue
            probe_due, lifecycle_due = state.probe_at == at, state.lifecycle_at == at
            if probe_due:
                self.carry_out(self.machine.on_probe(state, at), key)
            if lifecycle_due and key in self.states:
                self.carry_out(self.machine.on_lifecycle(self.states[key], key, at), key)

    def flush(self, watermark: int) -> None:
        self.fire(watermark)
        for key in self.dirty:
            self.chain.add_profile(self.states[key].snapshot(key))
        self.dirty = set()
        self.chain.flush()
        if self.first_write_s is None:
            self.first_write_s = time.monotonic() - T0

    def watermark(self) -> int:
        return min(self.newest.values()) - self.lag_ms if self.newest else -1


def pop_flag(argv: list[str], name: str, default: str) -> str:
    """The value of ``--name=value`` in ``argv`` (removed from it: not a flag of onboardflow run), else ``default``."""
    for arg in list(argv):
        if arg.startswith(f"--{name}="):
            argv.remove(arg)
            default = arg.split("=", 1)[1]
    return default


def bounded_range(s: JobSettings) -> tuple[str, dict[int, int], dict[int, int]]:
    """(topic, start offsets, stop offsets) of the bounded read, for the partitions with something to read."""
    (only,) = s.bounded_ranges
    start = {int(p): int(o) for p, o in only["start"].items()}
    stop = {int(p): int(o) for p, o in only["stop"].items()}
    return only["topic"], {p: start[p] for p in stop if stop[p] > start[p]}, \
        {p: stop[p] for p in stop if stop[p] > start[p]}


def report(records: int, loop: PlainLoop) -> None:
    """The run's JSON line (module docstring)."""
    print(json.dumps({"records": records, "first_write_s": loop.first_write_s,
                      "seconds": time.monotonic() - T0, "counts": dict(loop.counts)}), flush=True)


def main(argv: list[str]) -> None:
    s = JobSettings(job_settings(argv))
    topic, starts, stops = bounded_range(s)
    consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=64 * 1024 * 1024)
    parts = {p: TopicPartition(topic, p) for p in stops}
    consumer.assign(list(parts.values()))
    for p, tp in parts.items():
        consumer.seek(tp, starts[p])
    loop = PlainLoop(s)
    loop.chain.open()
    records = 0
    flushed_at = time.monotonic()
    try:
        while parts:
            for tp, batch_records in consumer.poll(timeout_ms=1000).items():
                if tp.partition not in parts:
                    continue
                for r in batch_records:
                    if r.offset >= stops[tp.partition]:
                        break
                    loop.record(KafkaRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value))
                    records += 1
                    if loop.chain.pending >= loop.flush_size:
                        loop.flush(loop.watermark())
                        flushed_at = time.monotonic()
                    if r.offset + 1 >= stops[tp.partition]:
                        del parts[tp.partition]
                        consumer.pause(tp)
                        break
            if time.monotonic() - flushed_at >= loop.flush_interval_s:
                loop.flush(loop.watermark())
                flushed_at = time.monotonic()
        # End of input: the watermark jumps to +infinity; timers set while firing fire too.
        loop.flush(END)
    finally:
        loop.chain.close()
        consumer.close()
        loop.client.close()
    report(records, loop)


if __name__ == "__main__":
    main(sys.argv[1:])
