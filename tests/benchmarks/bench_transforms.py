"""Per-element throughput of the anonymize, score and segment hot paths.

Run: .venv/bin/python tests/benchmarks/bench_transforms.py [--events N] [--repeats R]

Measures the pure per-element work each DoFn does (no runner overhead), single
threaded, and prints events/s as the median of R runs:

* anonymize: Pseudonymizer.anonymize, and the whole _AnonymizeFn.process
  (consent gate + validation + anonymization + routing);
* score: EngagementState.add + snapshot on a warm per-user state, and the
  DoFn's full per-element cycle (decode stored state, add, encode, snapshot);
* segment: RuleSet.evaluate of the packaged rules on realistic profiles, and
  evaluate + diff against the previous segments.
"""
import argparse
import random
import statistics
import time

from apache_beam.coders import FastPrimitivesCoder

from onboardflow.pipelines.beam.anonymize import _AnonymizeFn
from onboardflow.transforms.anonymize import Pseudonymizer, SecretKey
from onboardflow.transforms.score import DAY_MS, DEFAULT_SCORE_CONFIG, EngagementState
from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet

USER_AGENTS = [
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36 Edg/124.0",
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
]
EVENT_TYPES = ["page_view"] * 6 + ["click"] * 4 + ["feature_used"] * 3 + [
    "login", "form_submit", "tutorial_step", "signup", "support_message", "purchase", "logout"]
T0 = 1_700_000_000_000


def make_events(n, users, rng):
    events = []
    for i in range(n):
        u = rng.randrange(users)
        event_type = rng.choice(EVENT_TYPES)
        properties = {"page": rng.choice(["/home", "/pricing", "/docs/start", "/settings"])}
        if event_type == "feature_used":
            properties["feature"] = rng.choice(["export", "share", "sso", "api", "dashboards"])
        if event_type == "tutorial_step":
            properties.update(step=str(rng.randrange(1, 6)), step_total="5")
        events.append({
            "event_id": f"evt-{i:08d}",
            "event_type": event_type,
            "user_id": f"acct-{u:06d}" if rng.random() < 0.8 else None,
            "anonymous_id": f"dev-{u:06d}-a1b2",
            "session_id": f"s-{u}-{i // 50}",
            "occurred_at": T0 + i * 200 + rng.randrange(-60_000, 60_000),
            "received_at": T0 + i * 200 + 500,
            "properties": properties,
            "context": {
                "device": None, "os": "macOS 14", "app_version": "3.2.1", "locale": "en-US",
                "ip": f"203.0.{u % 250}.{rng.randrange(1, 255)}",
                "user_agent": rng.choice(USER_AGENTS),
                "email": f"user{u}@example{u % 40}.com",
            },
            "consent": {"analytics": True, "personalization": rng.random() < 0.9, "marketing": False},
        })
    return events


def measure(label, fn, items, repeats):
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(items)
        rates.append(len(items) / (time.perf_counter() - start))
    print(f"{label:<48} {statistics.median(rates):>12,.0f} events/s  (median of {repeats}; "
          f"min {min(rates):,.0f}, max {max(rates):,.0f})")
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(7)
    raw = make_events(args.events, args.users, rng)

    secret = b"benchmark-secret-0123456789abcdef"
    pseudonymizer = Pseudonymizer(secret)
    anonymize_fn = _AnonymizeFn(SecretKey(secret))
    anonymize_fn.setup()

    def run_anonymize(events):
        for e in events:
            pseudonymizer.anonymize(e)

    def run_anonymize_fn(events):
        for e in events:
            for _ in anonymize_fn.process(e):
                pass

    print(f"{args.events:,} events, {args.users:,} users, single thread\n")
    measure("anonymize: Pseudonymizer.anonymize", run_anonymize, raw, args.repeats)
    measure("anonymize: _AnonymizeFn.process (gate+route)", run_anonymize_fn, raw, args.repeats)

    anonymized = [pseudonymizer.anonymize(e)[0] for e in raw]
    warm = {}
    for e in anonymized:  # warm states: every user already has history
        warm.setdefault(e["user_key"], EngagementState()).add(e)

    def run_score(events):
        for e in events:
            state = warm[e["user_key"]]
            state.add(e)
            state.snapshot(e["occurred_at"])

    coder = FastPrimitivesCoder()
    stored = {k: coder.encode(s.to_primitive()) for k, s in warm.items()}

    def run_score_with_state_coding(events):
        for e in events:
            key = e["user_key"]
            state = EngagementState.from_primitive(coder.decode(stored[key]), DEFAULT_SCORE_CONFIG)
            state.add(e)
            stored[key] = coder.encode(state.to_primitive())
            state.snapshot(e["occurred_at"])

    measure("score: EngagementState.add + snapshot", run_score, anonymized, args.repeats)
    measure("score: decode state + add + encode + snapshot", run_score_with_state_coding, anonymized, args.repeats)

    rules = RuleSet.load(DEFAULT_RULES_PATH)
    profiles = []
    for e in anonymized:
        profile = warm[e["user_key"]].snapshot(e["occurred_at"] + rng.randrange(0, 40 * DAY_MS))
        profile.update(session_count=rng.randrange(0, 12), sessions_7d=rng.randrange(0, 6),
                       segments=sorted(rng.sample(["dormant", "active_engaged", "needs_help"], 1)))
        profiles.append(profile)

    def run_rules(items):
        for p in items:
            rules.evaluate(p, p["as_of"])

    def run_rules_and_diff(items):
        for p in items:
            previous = set(p["segments"])
            rules.diff(previous, rules.assign(previous, p, p["as_of"]), p["as_of"], "events", "k")

    print(f"\n{len(rules.rules)} rules in {DEFAULT_RULES_PATH.name}")
    measure("segment: RuleSet.evaluate", run_rules, profiles, args.repeats)
    measure("segment: assign + diff", run_rules_and_diff, profiles, args.repeats)


if __name__ == "__main__":
    main()
