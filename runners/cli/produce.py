"""`onboardflow produce`: synthetic onboarding journeys, sent to Kafka.

The ``JourneyGenerator`` (runners/sim/generator.py) invents the users and their
events; this module sends its messages to a topic with a kafka-python
producer tuned for throughput without giving up delivery guarantees
(``acks="all"``, idempotent, retried, batched, lz4-compressed when the lz4
codec is installed), optionally paced to a target rate by a token bucket on
the monotonic clock. A progress bar goes to stderr and a summary (messages per
kind, rate achieved, failures) to stdout; the exit status is non-zero when any
message could not be delivered.

    onboardflow produce --users 2000 --rate 500 --malformed-fraction 0.01 \\
        --ground-truth .run/ground_truth.csv

``produce()`` is the library entry point used by tests and benchmarks. No
message content is ever printed or logged: events carry synthetic PII, and
errors are reported by type only.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

from ..sim.generator import (
    DEFAULT_PERSONA_MIX,
    GeneratedMessage,
    GeneratorConfig,
    JourneyGenerator,
    v1_serializer,
)

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TOPIC = "onboarding.events"
# Stop early instead of blocking for max_block_ms on every message when the
# producer cannot even enqueue (broker gone, topic missing).
MAX_CONSECUTIVE_SEND_ERRORS = 10


class TokenBucket:
    """Paces callers to ``rate`` acquisitions per second on a monotonic clock.

    The bucket refills continuously and holds at most ``burst`` tokens, so an
    idle spell buys a short burst at most. Acquiring may run the bucket into
    debt, which the caller sleeps off at once; the next refill measures the
    time actually slept, so oversleeping is paid back rather than lost and
    the long-run rate stays exact. ``clock`` and ``sleep`` are injectable for
    tests.
    """

    def __init__(self, rate: float, burst: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        # ~50 ms worth by default: smooth enough, and large enough to absorb
        # the scheduler's sleep granularity at high rates.
        self.capacity = float(burst) if burst is not None else max(1.0, self.rate / 20.0)
        self._clock = clock
        self._sleep = sleep
        self.tokens = 1.0
        self._last = clock()

    def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` tokens, sleeping if the bucket is short; returns the seconds slept."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        self._sleep(wait)
        return wait


@dataclass
class ProduceStats:
    """What a produce run delivered, by message kind."""

    topic: str
    attempted: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    #: exception type name -> count (never messages: they could carry PII)
    errors: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    aborted: bool = False
    interrupted: bool = False

    @property
    def sent(self) -> Counter:
        """Messages acknowledged by the broker, by kind."""
        return Counter({k: self.attempted[k] - self.failed[k] for k in self.attempted})

    @property
    def total_sent(self) -> int:
        return sum(self.attempted.values()) - sum(self.failed.values())

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def rate(self) -> float:
        """Acknowledged messages per second over the run, flush included."""
        return self.total_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.total_failed == 0 and not self.aborted and not self.interrupted

    def summary(self) -> str:
        lines = [f"produced {self.total_sent:,} messages to {self.topic} in {self.elapsed_s:.2f} s "
                 f"({self.rate:,.0f} msg/s)"]
        width = max((len(k) for k in self.attempted), default=5)
        for kind, count in sorted(self.sent.items(), key=lambda kv: (kv[0] != "valid", kv[0])):
            lines.append(f"  {kind:<{width}}  {count:>10,}")
        if self.total_failed:
            failed = ", ".join(f"{k}={v}" for k, v in sorted(self.failed.items()))
            causes = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()))
            lines.append(f"FAILED {self.total_failed:,} messages ({failed}); errors: {causes}")
        if self.aborted:
            lines.append("ABORTED: the producer kept failing to enqueue messages")
        if self.interrupted:
            lines.append("INTERRUPTED before the end of the stream")
        return "\n".join(lines)


def producer_settings() -> dict:
    """kafka-python producer settings: durable (acks=all, idempotent, retried) and batched."""
    from kafka.codec import has_lz4

    return {
        "acks": "all",
        "enable_idempotence": True,
        "retries": 10,
        "delivery_timeout_ms": 120_000,
        "max_block_ms": 15_000,
        # A few ms of lingering fills 256 KiB batches at full speed and costs
        # nothing noticeable when paced.
        "linger_ms": 10,
        "batch_size": 256 * 1024,
        "compression_type": "lz4" if has_lz4() else None,
        "client_id": "onboardflow-produce",
    }


def produce(messages: Iterable[GeneratedMessage], bootstrap_servers: str = DEFAULT_BOOTSTRAP,
            topic: str = DEFAULT_TOPIC, rate: float = 0.0, progress: bool = True,
            total: Optional[int] = None, producer_config: Optional[Mapping] = None,
            clock: Callable[[], float] = time.monotonic) -> ProduceStats:
    """Send ``messages`` to ``topic``, ``rate`` per second (0: as fast as possible).

    Blocks until every message is acknowledged or has failed (flush), and
    returns the per-kind tally. ``producer_config`` overrides
    ``producer_settings()``; ``total`` sizes the progress bar.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from ...transforms.connections import kafka_config, kafka_refusal

    stats = ProduceStats(topic=topic)
    lock = threading.Lock()

    def on_error(kind: str, exc: BaseException) -> None:
        # Runs on the producer's I/O thread.
        with lock:
            stats.failed[kind] += 1
            stats.errors[type(exc).__name__] += 1

    started = time.monotonic()  # refusals logged before this are another client's
    try:
        producer = KafkaProducer(**kafka_config(bootstrap_servers, **{**producer_settings(),
                                                                      **dict(producer_config or {})}))
    except KafkaError as exc:
        # A refused login or certificate surfaces as a bootstrap timeout: name the reason.
        raise (kafka_refusal(exc, since=started, bootstrap=bootstrap_servers) or exc) from None
    try:
        # Fetch the topic's metadata now, so the first send does not stall the
        # pacing (and a missing topic fails here, once).
        producer.partitions_for(topic)
    except BaseException as exc:
        producer.close(timeout=5)
        refusal = kafka_refusal(exc, since=started, bootstrap=bootstrap_servers)
        if refusal is not None:
            raise refusal from None
        raise
    bucket = TokenBucket(rate, clock=clock) if rate > 0 else None
    bar = tqdm(total=total, unit="msg", file=sys.stderr, disable=not progress,
               mininterval=0.5, dynamic_ncols=True, desc=topic)
    # Updating tqdm per message would cost more than the send; paced runs
    # still refresh about ten times a second.
    report_every = 500 if bucket is None else max(1, min(500, int(rate / 10)))
    unreported = 0
    consecutive_errors = 0
    start = clock()
    try:
        try:
            for message in messages:
                if bucket is not None:
                    bucket.acquire()
                stats.attempted[message.kind] += 1
                try:
                    future = producer.send(topic, key=message.key, value=message.value)
                except Exception as exc:  # noqa: BLE001 - counted and reported by type, run goes on
                    on_error(message.kind, exc)
                    consecutive_errors += 1
                    if consecutive_errors >= MAX_CONSECUTIVE_SEND_ERRORS:
                        stats.aborted = True
                        break
                    continue
                consecutive_errors = 0
                future.add_errback(on_error, message.kind)
                unreported += 1
                if unreported >= report_every:
                    bar.update(unreported)
                    unreported = 0
        except KeyboardInterrupt:
            stats.interrupted = True
        _flush(producer)
        stats.elapsed_s = clock() - start  # delivered: closing the client is not part of the rate
    finally:
        producer.close(timeout=30)
        bar.update(unreported)
        bar.close()
        if not stats.elapsed_s:
            stats.elapsed_s = clock() - start
    return stats


def _flush(producer) -> None:
    """Block until every record is acknowledged or failed.

    kafka-python 3.0's flush() snapshots the in-flight batches and raises
    UnknownError("Future not done") on one that the sender meanwhile split
    (after a MESSAGE_TOO_LARGE) and retired; its records live on in the new
    batches, so flushing again waits for those.
    """
    from kafka.errors import UnknownError

    for attempt in range(1000):
        try:
            producer.flush()
            return
        except UnknownError:
            if attempt == 999:
                raise
            time.sleep(0.01)  # let the sender finish retiring the split batch


def _persona_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {part!r}")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name.strip()!r} is not a number") from None
    return mix


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = GeneratorConfig()
    parser = argparse.ArgumentParser(
        prog="onboardflow produce",
        description="Produce synthetic onboarding journeys (Avro, Confluent framing) to Kafka.",
    )
    kafka = parser.add_argument_group("kafka")
    from ..settings import settings

    deployment = settings()
    kafka.add_argument("--bootstrap-servers", default=deployment.producer_bootstrap,
                       help="default: the deployment's event-source identity, %(default)s")
    kafka.add_argument("--topic", default=deployment.events_topic, help="default: the deployment's, %(default)s")
    kafka.add_argument("--registry-url", metavar="URL", default=deployment.schema_registry_url,
                       help="schema registry: http(s):// Confluent REST, file path, "
                            "or the shipped file registry (default)")
    kafka.add_argument("--rate", type=float, default=0.0, help="target messages/s; 0 = as fast as possible")
    kafka.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    gen = parser.add_argument_group("journeys")
    gen.add_argument("--users", type=int, default=defaults.users, help="default: %(default)s")
    gen.add_argument("--events", type=int, default=None,
                     help="stop after about this many messages (default: all journeys to the horizon)")
    gen.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    gen.add_argument("--horizon-days", type=float, default=defaults.horizon_days, help="default: %(default)s")
    gen.add_argument("--live", action="store_true",
                     help="anchor the timeline at now instead of the fixed default start (not reproducible)")
    gen.add_argument("--persona-mix", type=_persona_mix, default=None, metavar="NAME=W,...",
                     help="persona weights, default: " + ",".join(f"{k}={v}" for k, v in DEFAULT_PERSONA_MIX.items()))
    gen.add_argument("--malformed-fraction", type=_fraction, default=defaults.malformed_fraction,
                     help="share of all messages that are malformed (default: %(default)s)")
    gen.add_argument("--duplicate-fraction", type=_fraction, default=defaults.duplicate_fraction,
                     help="share of events re-sent with the same event_id (default: %(default)s)")
    gen.add_argument("--late-fraction", type=_fraction, default=defaults.late_fraction,
                     help="share of events received hours to days late (default: %(default)s)")
    gen.add_argument("--out-of-order-fraction", type=_fraction, default=defaults.out_of_order_fraction,
                     help="share of events received seconds to minutes late (default: %(default)s)")
    gen.add_argument("--ground-truth", metavar="PATH", default=None,
                     help="write persona and outcome labels per user (.csv, else JSON lines)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = GeneratorConfig(
            seed=args.seed, users=args.users, live=args.live, horizon_days=args.horizon_days,
            persona_mix=args.persona_mix or dict(DEFAULT_PERSONA_MIX),
            malformed_fraction=args.malformed_fraction, duplicate_fraction=args.duplicate_fraction,
            late_fraction=args.late_fraction, out_of_order_fraction=args.out_of_order_fraction,
        )
    except ValueError as err:
        print(f"onboardflow produce: {err}", file=sys.stderr)
        return 2
    if args.events is not None and args.events < 1:
        print("onboardflow produce: --events must be at least 1", file=sys.stderr)
        return 2

    from kafka.errors import KafkaError

    from ...schemas.schema_registry import RegistryError, registry_from_url
    from ...transforms.connections import kafka_refusal

    try:
        serializer = v1_serializer(registry_from_url(args.registry_url))
    except (RegistryError, OSError, ValueError) as err:
        print(f"onboardflow produce: schema registry unusable: {err}", file=sys.stderr)
        return 1
    generator = JourneyGenerator(config, serializer=serializer)
    if args.ground_truth:
        rows = generator.write_ground_truth(args.ground_truth)
        print(f"ground truth: {rows:,} users -> {args.ground_truth}", file=sys.stderr)

    try:
        stats = produce(generator.messages(max_messages=args.events), args.bootstrap_servers, args.topic,
                        rate=args.rate, progress=not args.no_progress, total=args.events)
    except (KafkaError, RegistryError) as err:
        print(f"onboardflow produce: {kafka_refusal(err) or f'{type(err).__name__}: {err}'}", file=sys.stderr)
        return 1
    print(stats.summary())
    if stats.interrupted:
        return 130
    return 0 if stats.ok else 1


if __name__ == "__main__":
    sys.exit(main())
