"""The synthetic journey generator and the pure parts of `onboardflow produce`.

Pins what the rest of the project relies on: the stream is deterministic,
decodes against the v1 contract, carries the configured share of duplicates,
disorder and malformed messages (each of the kind it claims), journeys look
like journeys (anonymous views, signup, sessions split by 30-minute gaps), the
personas are behaviourally distinct, and the ground-truth labels agree with
the events. The token bucket is tested on an injected clock, never wall time.
"""
import csv
import io
import ipaddress
import json
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone

import fastavro
import pytest

from onboardflow.runners.cli.produce import ProduceStats, TokenBucket, build_parser, main
from onboardflow.runners.sim.generator import (
    DAY_MS,
    FEATURES,
    HOUR_MS,
    MALFORMATION_KINDS,
    MALFORMATION_REASONS,
    MINUTE_MS,
    PERSONAS,
    SEAT_PRICES,
    STEP_TOTAL,
    UNKNOWN_SCHEMA_ID,
    WEEK_MS,
    GeneratorConfig,
    JourneyGenerator,
)
from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema, load_schema_json
from onboardflow.schemas.wire import AvroDeserializer, InvalidEvent, epoch_millis_schema

YEAR_2000_MS = int(datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
V1_MILLIS = epoch_millis_schema(load_schema("onboarding_event", 1))
MALFORMED = set(MALFORMATION_KINDS)


def decode_v1(value: bytes) -> dict:
    """A framed v1 event as a dict with epoch-millis timestamps."""
    return fastavro.schemaless_reader(io.BytesIO(value[5:]), V1_MILLIS, None)


def stream_config(**overrides) -> GeneratorConfig:
    base = dict(seed=11, users=40, malformed_fraction=0.02, duplicate_fraction=0.02)
    return GeneratorConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def run():
    """One full run: generator, messages, and the generator's own tallies of that run."""
    generator = JourneyGenerator(stream_config())
    messages = list(generator.messages())
    return generator, messages, Counter(generator.counts), Counter(generator.perturbations)


@pytest.fixture(scope="module")
def stream(run):
    return run[:2]


@pytest.fixture(scope="module")
def tallies(run):
    """(counts by kind, perturbations), as they were after the run (a later run replaces them)."""
    return run[2:]


@pytest.fixture(scope="module")
def valid_events(stream):
    _, messages = stream
    return [decode_v1(m.value) for m in messages if m.kind == "valid"]


@pytest.fixture(scope="module")
def balanced_population():
    """100 users, personas equally likely, full horizon, no stream perturbations."""
    config = GeneratorConfig(seed=5, users=100, persona_mix={p: 1.0 for p in PERSONAS},
                             duplicate_fraction=0.0, late_fraction=0.0, out_of_order_fraction=0.0)
    generator = JourneyGenerator(config)
    profiles = {p.user_id: p for p in generator.users()}
    return generator, profiles, [event for _, event in generator.events()]


def per_user_behaviour(generator, profiles, events):
    """Per user: the features a segmentation stage would compute."""
    seen = defaultdict(lambda: {"events": 0, "sessions": set(), "steps": set(), "features": set(),
                                "browse": 0, "support": 0, "purchases": 0, "last": 0})
    for event in events:
        user = event["user_id"]
        if user is None:
            continue
        b = seen[user]
        b["events"] += 1
        b["last"] = max(b["last"], event["occurred_at"])
        if event["session_id"]:
            b["sessions"].add(event["session_id"])
        kind = event["event_type"]
        if kind == "tutorial_step":
            b["steps"].add(event["properties"]["step"])
        elif kind == "feature_used":
            b["features"].add(event["properties"]["feature"])
        elif kind in ("page_view", "click"):
            b["browse"] += 1
        elif kind == "support_message":
            b["support"] += 1
        elif kind == "purchase":
            b["purchases"] += 1
    rows = {}
    for user, profile in profiles.items():
        b = seen[user]
        weeks = (generator.horizon_end_ms - profile.signup_ms) / WEEK_MS
        rows[user] = {
            "sessions_per_week": len(b["sessions"]) / weeks,
            "events_per_session": b["events"] / len(b["sessions"]),
            "tutorial_steps": len(b["steps"]),
            "feature_breadth": len(b["features"]),
            "browse_share": b["browse"] / b["events"],
            "support_share": b["support"] / b["events"],
            "purchased": float(b["purchases"] > 0),
            "days_since_last": (generator.horizon_end_ms - b["last"]) / DAY_MS,
        }
    return rows


def persona_mean(rows, profiles, persona, feature):
    return statistics.mean(rows[u][feature] for u, p in profiles.items() if p.persona == persona)


# -- determinism ---------------------------------------------------------------


def test_same_seed_and_config_give_byte_identical_messages_and_ground_truth(stream, tmp_path):
    generator, messages = stream
    again = JourneyGenerator(stream_config())
    assert list(again.messages()) == messages
    generator.write_ground_truth(tmp_path / "a.csv")
    again.write_ground_truth(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_a_different_seed_gives_a_different_stream(stream):
    _, messages = stream
    other = list(JourneyGenerator(stream_config(seed=12)).messages(max_messages=500))
    assert [m.value for m in other] != [m.value for m in messages[:500]]


def test_messages_can_be_regenerated_from_the_same_generator(stream):
    generator, messages = stream
    assert list(generator.messages(max_messages=300)) == messages[:300]


def test_live_mode_anchors_the_timeline_at_the_clock_not_the_fixed_start():
    now_s = 1_900_000_000.0
    generator = JourneyGenerator(GeneratorConfig(users=5, live=True), clock=lambda: now_s)
    assert generator.start_ms == int(now_s * 1000)
    signups = [p.signup_ms for p in generator.users()]
    assert min(signups) >= generator.start_ms
    first = next(generator.events())[1]
    assert first["occurred_at"] >= generator.start_ms - 15 * MINUTE_MS


# -- the wire contract ---------------------------------------------------------


def test_every_valid_message_decodes_with_fastavro_against_v1_and_has_an_identity(stream):
    _, messages = stream
    v1_id = default_registry().lookup(EVENTS_SUBJECT, load_schema("onboarding_event", 1))
    raw_v1 = fastavro.parse_schema(load_schema_json("onboarding_event", 1))
    good = [m for m in messages if m.kind in ("valid", "duplicate")]
    assert len(good) > 5000
    for message in good:
        assert message.value[0] == 0 and int.from_bytes(message.value[1:5], "big") == v1_id
        payload = io.BytesIO(message.value[5:])
        event = fastavro.schemaless_reader(payload, raw_v1, None)
        assert payload.tell() == len(message.value) - 5  # no trailing bytes
        assert event["user_id"] or event["anonymous_id"]
        assert event["event_id"]
        assert message.key == (event["user_id"] or event["anonymous_id"]).encode("utf-8")


def test_stream_is_ordered_by_received_time(stream):
    _, messages = stream
    received = [decode_v1(m.value)["received_at"] for m in messages if m.kind in ("valid", "duplicate")]
    assert received == sorted(received)


def test_received_at_never_precedes_occurred_at_and_is_usually_sub_second(valid_events):
    delays = [e["received_at"] - e["occurred_at"] for e in valid_events]
    assert min(delays) >= 0
    assert statistics.median(delays) < 1000


# -- perturbations ---------------------------------------------------------------


def test_malformed_share_matches_the_config_to_within_one_message(stream, tallies):
    _, messages = stream
    kinds = Counter(m.kind for m in messages)
    assert kinds == tallies[0]
    malformed = sum(kinds[k] for k in MALFORMED)
    assert abs(malformed - 0.02 * len(messages)) < 1
    # dealt from a shuffled deck: every kind, evenly
    per_kind = [kinds[k] for k in MALFORMATION_KINDS]
    assert min(per_kind) > 0 and max(per_kind) - min(per_kind) <= 1


def test_the_pipeline_decoder_rejects_each_malformed_message_for_its_kinds_reason(stream):
    from onboardflow.transforms.decode import OnboardingEventDecoder
    from onboardflow.transforms.kafka.records import KafkaRecord

    _, messages = stream
    decoder = OnboardingEventDecoder()
    outcomes = defaultdict(Counter)
    for offset, message in enumerate(messages):
        record = KafkaRecord("onboarding.events", 0, offset, 0, message.key, message.value)
        try:
            decoder.decode(record)
        except InvalidEvent as err:
            outcomes[message.kind][err.reason] += 1
        else:
            outcomes[message.kind]["accepted"] += 1
    assert set(outcomes["valid"]) == {"accepted"} and set(outcomes["duplicate"]) == {"accepted"}
    for kind, reason in MALFORMATION_REASONS.items():
        assert set(outcomes[kind]) == {reason}, kind


def test_malformed_messages_break_the_contract_only_where_their_kind_says(stream):
    _, messages = stream
    decoder = AvroDeserializer(default_registry(), load_schema("onboarding_event", 2))
    for message in messages:
        if message.kind == "unknown_schema_id":
            assert int.from_bytes(message.value[1:5], "big") == UNKNOWN_SCHEMA_ID
            assert fastavro.schemaless_reader(io.BytesIO(message.value[5:]), V1_MILLIS, None)["event_id"]
        elif message.kind == "garbage":
            assert message.value[0] != 0 and message.key is None
        elif message.kind in ("missing_identity", "bad_timestamp", "empty_event_id"):
            event = decoder.deserialize(message.value)  # well-framed, well-formed Avro
            assert (event["user_id"] is None and event["anonymous_id"] is None) == (message.kind == "missing_identity")
            assert (event["event_id"] == "") == (message.kind == "empty_event_id")
            out_of_range = (event["occurred_at"] < YEAR_2000_MS
                            or event["occurred_at"] > event["received_at"] + DAY_MS)
            assert out_of_range == (message.kind == "bad_timestamp")
            assert (message.key is None) == (message.kind == "missing_identity")


def test_malformation_kinds_can_be_restricted():
    config = stream_config(malformed_fraction=0.05, malformation_kinds=("garbage", "truncated"))
    generator = JourneyGenerator(config)
    kinds = Counter(m.kind for m in generator.messages(max_messages=2000))
    assert set(kinds) - {"valid", "duplicate"} == {"garbage", "truncated"}


def test_no_malformed_messages_by_default():
    generator = JourneyGenerator(GeneratorConfig(users=10))
    kinds = Counter(m.kind for m in generator.messages(max_messages=3000))
    assert set(kinds) <= {"valid", "duplicate"}


def test_duplicates_resend_an_earlier_event_id_later(stream, tallies):
    _, messages = stream
    counts, perturbations = tallies
    seen_at = {}
    duplicates = 0
    for message in messages:
        if message.kind == "valid":
            event = decode_v1(message.value)
            seen_at[event["event_id"]] = event
        elif message.kind == "duplicate":
            again = decode_v1(message.value)
            original = seen_at[again["event_id"]]
            assert again["received_at"] > original["received_at"]
            assert {k: v for k, v in again.items() if k != "received_at"} == {
                k: v for k, v in original.items() if k != "received_at"}
            duplicates += 1
    assert duplicates == counts["duplicate"] == perturbations["duplicate"]
    assert 0.01 < duplicates / counts["valid"] < 0.03


def out_of_order_share(events):
    latest, behind = 0, 0
    for event in events:
        behind += event["occurred_at"] < latest
        latest = max(latest, event["occurred_at"])
    return behind / len(events)


def test_out_of_order_share_is_roughly_as_configured():
    def share(fraction):
        config = GeneratorConfig(seed=3, users=30, out_of_order_fraction=fraction,
                                 late_fraction=0.0, duplicate_fraction=0.0)
        return out_of_order_share([e for _, e in JourneyGenerator(config).events()])

    assert share(0.0) < 0.005
    assert 0.075 < share(0.1) < 0.12


def test_late_events_arrive_hours_to_days_after_they_occurred():
    config = GeneratorConfig(seed=3, users=30, out_of_order_fraction=0.0, late_fraction=0.05,
                             duplicate_fraction=0.0)
    generator = JourneyGenerator(config)
    events = [e for _, e in generator.events()]
    late = [e["received_at"] - e["occurred_at"] for e in events if e["received_at"] - e["occurred_at"] >= HOUR_MS]
    assert len(late) == generator.perturbations["late"]
    assert 0.04 < len(late) / len(events) < 0.06
    assert max(late) <= 3 * DAY_MS
    assert max(late) > DAY_MS  # some arrive days late, not just hours


def test_max_messages_caps_the_stream():
    generator = JourneyGenerator(stream_config())
    assert len(list(generator.messages(max_messages=777))) == 777
    assert sum(generator.counts.values()) == 777


# -- journeys ---------------------------------------------------------------------


def test_anonymous_page_views_precede_the_signup_that_assigns_the_user_id(valid_events):
    by_device = defaultdict(list)
    for event in valid_events:
        if event["anonymous_id"]:
            by_device[event["anonymous_id"]].append(event)
    signups = 0
    for events in by_device.values():
        events.sort(key=lambda e: e["occurred_at"])
        if not any(e["event_type"] == "signup" for e in events):
            continue  # a user's second device: first seen at a login
        signups += 1
        first_identified = next(i for i, e in enumerate(events) if e["user_id"])
        assert first_identified > 0
        assert events[first_identified]["event_type"] == "signup"
        assert all(e["event_type"] == "page_view" and e["context"]["email"] is None
                   for e in events[:first_identified])
        assert all(e["user_id"] == events[first_identified]["user_id"] for e in events[first_identified:])
    assert signups == 40


def test_sessions_are_separated_by_more_than_30_minutes_and_events_within_by_less(valid_events):
    by_user = defaultdict(list)
    for event in valid_events:
        if event["user_id"] and event["session_id"]:
            by_user[event["user_id"]].append(event)
    for events in by_user.values():
        events.sort(key=lambda e: e["occurred_at"])
        assert events[0]["event_type"] == "signup"
        for before, after in zip(events, events[1:]):
            gap = after["occurred_at"] - before["occurred_at"]
            if after["session_id"] == before["session_id"]:
                assert 0 < gap <= 3 * MINUTE_MS
            else:
                assert gap > 30 * MINUTE_MS
                assert after["event_type"] == "login"


def test_event_properties_carry_what_downstream_stages_read(valid_events):
    types = Counter(e["event_type"] for e in valid_events)
    assert set(types) >= {"signup", "login", "page_view", "click", "form_submit", "tutorial_step",
                          "feature_used", "support_message", "purchase", "logout"}
    for event in valid_events:
        props = event["properties"]
        if event["event_type"] == "tutorial_step":
            assert 1 <= int(props["step"]) <= int(props["step_total"]) == STEP_TOTAL
        elif event["event_type"] == "feature_used":
            assert props["feature"] in FEATURES
        elif event["event_type"] == "purchase":
            assert float(props["amount"]) > 0 and props["plan"]
            # sent by the billing backend: no client session or device
            assert event["session_id"] is None and event["context"]["device"] is None
        elif event["event_type"] == "signup":
            assert props["account_id"].startswith("acct-") and props["plan"]


def test_context_carries_synthetic_pii_and_per_user_consent(stream, valid_events):
    generator, _ = stream
    profiles = {p.user_id: p for p in generator.users()}
    emails = defaultdict(set)
    for event in valid_events:
        ctx = event["context"]
        if event["user_id"]:
            emails[event["user_id"]].add(ctx["email"])
            assert event["consent"] == dict(profiles[event["user_id"]].consent)
        if ctx["device"] is not None:
            assert ctx["device"] in ("desktop", "mobile", "tablet")
            assert ctx["user_agent"].startswith("Mozilla/5.0")
            ipaddress.ip_address(ctx["ip"])
    assert all(len(v) == 1 for v in emails.values())
    all_emails = [next(iter(v)) for v in emails.values()]
    assert len(set(all_emails)) == len(all_emails) == 40
    versions = {ipaddress.ip_address(e["context"]["ip"]).version for e in valid_events if e["context"]["ip"]}
    assert versions == {4, 6}


def test_consent_rates_follow_the_config():
    profiles = list(JourneyGenerator(GeneratorConfig(seed=2, users=4000)).users())
    refused = sum(not p.consent["personalization"] for p in profiles) / len(profiles)
    analytics = sum(p.consent["analytics"] for p in profiles) / len(profiles)
    assert 0.035 < refused < 0.065
    assert 0.88 < analytics < 0.92
    nobody = JourneyGenerator(GeneratorConfig(users=200, personalization_consent_rate=0.0)).users()
    assert not any(p.consent["personalization"] for p in nobody)


def test_users_belong_to_accounts_of_the_reference_table():
    generator = JourneyGenerator(GeneratorConfig(seed=4, users=300))
    accounts = {a.account_id: a for a in generator.accounts()}
    profiles = list(generator.users())
    assert all(accounts[p.account_id].plan == p.account_plan for p in profiles)
    shared = Counter(p.account_id for p in profiles)
    assert max(shared.values()) > 1  # some accounts have several users
    signups = [p.signup_ms for p in profiles]
    assert signups == sorted(signups)
    assert generator.start_ms <= signups[0] and signups[-1] <= generator.start_ms + 10 * DAY_MS


# -- personas and ground truth -------------------------------------------------


def test_personas_differ_in_the_behaviour_segmentation_sees(balanced_population):
    generator, profiles, events = balanced_population
    rows = per_user_behaviour(generator, profiles, events)

    def mean(persona, feature):
        return persona_mean(rows, profiles, persona, feature)

    assert mean("fast_adopter", "tutorial_steps") > 4.5 > 2 >= mean("stalled", "tutorial_steps")
    assert mean("churner", "tutorial_steps") < 2
    assert mean("fast_adopter", "feature_breadth") > 2 * max(mean("stalled", "feature_breadth"),
                                                               mean("churner", "feature_breadth"))
    assert mean("fast_adopter", "sessions_per_week") > 3 * mean("stalled", "sessions_per_week")
    assert mean("explorer", "browse_share") > mean("fast_adopter", "browse_share") + 0.2
    assert mean("explorer", "events_per_session") > mean("fast_adopter", "events_per_session")
    assert mean("support_seeker", "support_share") > 2 * max(
        mean(p, "support_share") for p in PERSONAS if p != "support_seeker")
    assert mean("fast_adopter", "purchased") > 0.4 > 0.1 > mean("stalled", "purchased")
    # churners go quiet within days of signing up: dormant for 30+ days at the horizon
    assert all(rows[u]["days_since_last"] > 30 for u, p in profiles.items() if p.persona == "churner")
    assert mean("fast_adopter", "days_since_last") < 3


def test_personas_are_recoverable_from_behaviour_alone(balanced_population):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    generator, profiles, events = balanced_population
    rows = per_user_behaviour(generator, profiles, events)
    users = sorted(profiles)
    features = [list(rows[u].values()) for u in users]
    personas = [profiles[u].persona for u in users]
    accuracy = cross_val_score(make_pipeline(StandardScaler(), NearestCentroid()), features, personas, cv=5)
    assert accuracy.mean() > 0.8


def test_ground_truth_labels_agree_with_the_emitted_journeys(stream, valid_events):
    generator, _ = stream
    steps, purchases, addons = defaultdict(set), Counter(), Counter()
    for event in valid_events:
        if event["event_type"] == "tutorial_step":
            steps[event["user_id"]].add(int(event["properties"]["step"]))
        elif event["event_type"] == "purchase" and event["properties"].get("item") == "extra_seats":
            # A seat add-on of the plan bought, priced per seat (docs/rfm.md).
            props = event["properties"]
            assert props["amount"] == f"{int(props['quantity']) * SEAT_PRICES[props['plan']]:.2f}"
            addons[event["user_id"]] += 1
        elif event["event_type"] == "purchase":
            purchases[event["user_id"]] += 1
    profiles = list(generator.users())
    for profile in profiles:
        assert steps[profile.user_id] == set(range(1, profile.tutorial_steps + 1))
        assert profile.will_complete_onboarding == (len(steps[profile.user_id]) == STEP_TOTAL)
        assert purchases[profile.user_id] == (1 if profile.converted else 0)
        assert profile.converted or addons[profile.user_id] == 0  # add-ons only after the purchase
    assert sum(addons.values()) > 0
    assert any(p.will_complete_onboarding for p in profiles)
    assert any(not p.will_complete_onboarding for p in profiles)
    assert any(p.converted for p in profiles)


def test_ground_truth_is_written_as_csv_or_json_lines(stream, tmp_path):
    generator, _ = stream
    profiles = {p.user_id: p for p in generator.users()}
    assert generator.write_ground_truth(tmp_path / "truth.csv") == 40
    with open(tmp_path / "truth.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    for row in rows:
        profile = profiles[row["user_id"]]
        assert row["persona"] == profile.persona
        assert row["will_complete_onboarding"] == str(profile.will_complete_onboarding).lower()
        assert row["converted"] == str(profile.converted).lower()
        assert int(row["signup_ms"]) == profile.signup_ms and row["signup_at"].endswith("Z")

    assert generator.write_ground_truth(tmp_path / "sub" / "truth.jsonl") == 40
    lines = [json.loads(line) for line in (tmp_path / "sub" / "truth.jsonl").read_text().splitlines()]
    assert {r["user_id"]: (r["persona"], r["converted"]) for r in lines} == {
        u: (p.persona, p.converted) for u, p in profiles.items()}


def test_config_rejects_impossible_settings():
    for bad in (dict(users=0), dict(malformed_fraction=1.0), dict(duplicate_fraction=-0.1),
                dict(persona_mix={"wizard": 1.0}), dict(persona_mix={"churner": 0.0}),
                dict(malformation_kinds=("cosmic_ray",)), dict(out_of_order_fraction=0.7, late_fraction=0.5)):
        with pytest.raises(ValueError):
            GeneratorConfig(**bad)


# -- rate limiting -------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps (or the test says)."""

    def __init__(self, oversleep: float = 1.0):
        self.now = 100.0
        self.oversleep = oversleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds * self.oversleep


def test_token_bucket_paces_acquisitions_to_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    for _ in range(1001):
        bucket.acquire()
    assert clock.now - 100.0 == pytest.approx(10.0, abs=1e-6)


def test_token_bucket_pays_back_oversleeping_so_the_long_run_rate_holds():
    clock = FakeClock(oversleep=1.7)
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    for _ in range(10_001):
        bucket.acquire()
    # 10 s for 10,000 intervals; the burst capacity (50) bounds the error
    assert 10.0 - 0.051 <= clock.now - 100.0 <= 10.0 + 0.002


def test_token_bucket_allows_at_most_a_burst_after_idling():
    clock = FakeClock()
    bucket = TokenBucket(100, burst=5, clock=clock, sleep=clock.sleep)
    clock.now += 60.0
    slept = [bucket.acquire() for _ in range(7)]
    assert slept[:5] == [0.0] * 5
    assert slept[5] == pytest.approx(0.01) and slept[6] == pytest.approx(0.01)


def test_token_bucket_rejects_a_non_positive_rate():
    with pytest.raises(ValueError):
        TokenBucket(0)


# -- the command line and its summary --------------------------------------------------


def test_produce_stats_count_what_the_broker_acknowledged():
    stats = ProduceStats(topic="t", attempted=Counter(valid=10, garbage=2), failed=Counter(valid=1),
                         errors=Counter(KafkaTimeoutError=1), elapsed_s=2.0)
    assert stats.sent == Counter(valid=9, garbage=2)
    assert stats.total_sent == 11 and stats.rate == 5.5 and not stats.ok
    assert "FAILED 1" in stats.summary() and "KafkaTimeoutError=1" in stats.summary()
    assert ProduceStats(topic="t", attempted=Counter(valid=3), elapsed_s=1.0).ok


def test_produce_flags_parse_into_the_generator_config():
    args = build_parser().parse_args(["--users", "7", "--persona-mix", "churner=2,explorer=1",
                                      "--malformed-fraction", "0.1", "--rate", "250", "--live"])
    assert args.users == 7 and args.rate == 250 and args.live
    assert args.persona_mix == {"churner": 2.0, "explorer": 1.0}
    assert args.malformed_fraction == 0.1


def test_produce_rejects_bad_flags_before_touching_kafka(capsys):
    assert main(["--users", "0", "--no-progress"]) == 2
    assert main(["--persona-mix", "wizard=1", "--no-progress"]) == 2
    assert main(["--events", "0", "--no-progress"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--malformed-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "users must be at least 1" in capsys.readouterr().err

