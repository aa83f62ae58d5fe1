"""Decode throughput of OnboardingEventDecoder (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_decode.py [--events 50000] [--runs 5]

Prints the median events/s of N runs over realistic framed events: v2 events
(writer = reader schema, no resolution), v1 events (resolved into v2) and a
mix with 5% bad records that become InvalidEvents.
"""
import argparse
import random
import statistics
import time
import uuid

from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
from onboardflow.schemas.wire import AvroSerializer, InvalidEvent
from onboardflow.transforms.decode import OnboardingEventDecoder
from onboardflow.transforms.kafka.records import KafkaRecord

T0 = 1_717_000_000_000
TYPES_V1 = ["signup", "login", "page_view", "click", "form_submit", "tutorial_step", "feature_used"]


def make_event(rng: random.Random, i: int, v2: bool) -> dict:
    event = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "event_type": rng.choice(TYPES_V1 + (["invite_sent"] if v2 else [])),
        "user_id": f"acct-{rng.randrange(20_000)}" if rng.random() < 0.7 else None,
        "anonymous_id": f"anon-{rng.randrange(100_000)}",
        "session_id": f"s-{rng.randrange(50_000)}",
        "occurred_at": T0 + i * 37,
        "received_at": T0 + i * 37 + rng.randrange(2_000),
        "properties": {"page": f"/onboarding/step-{rng.randrange(6)}", "step": str(rng.randrange(6)),
                       "step_total": "6"},
        "context": {"device": "Pixel 8", "os": "Android 14", "app_version": "3.2.0", "locale": "en-US",
                    "ip": f"203.0.113.{rng.randrange(256)}", "user_agent": "Mozilla/5.0 (Linux; Android 14)",
                    "email": f"user{rng.randrange(20_000)}@example.com"},
        "consent": {"analytics": True, "personalization": rng.random() < 0.8, "marketing": False},
    }
    if v2:
        event["referrer"] = "https://partner.example/campaign" if rng.random() < 0.3 else None
    return event


def build_records(n: int, kind: str) -> list[KafkaRecord]:
    rng = random.Random(7)
    registry = default_registry()
    writers = {
        version: AvroSerializer(registry, EVENTS_SUBJECT, load_schema("onboarding_event", version))
        for version in (1, 2)
    }
    records = []
    for i in range(n):
        v2 = kind == "v2" or (kind == "mixed" and rng.random() < 0.5)
        value = writers[2 if v2 else 1].serialize(make_event(rng, i, v2))
        if kind == "mixed" and rng.random() < 0.05:
            value = value[: rng.randrange(len(value))]
        records.append(KafkaRecord("onboarding.events", i % 4, i, T0 + i, None, value))
    return records


def run_once(decoder: OnboardingEventDecoder, records: list[KafkaRecord]) -> float:
    start = time.perf_counter()
    for record in records:
        try:
            decoder.decode(record)
        except InvalidEvent:
            pass
    return len(records) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for kind in ("v2", "v1", "mixed"):
        records = build_records(args.events, kind)
        decoder = OnboardingEventDecoder()
        rates = [run_once(decoder, records) for _ in range(args.runs)]
        print(f"decode {kind:<5} {args.events} events x {args.runs} runs: "
              f"median {statistics.median(rates):,.0f} events/s (min {min(rates):,.0f}, max {max(rates):,.0f})")


if __name__ == "__main__":
    main()
