"""Population designs: ground truth for segmentation that the default generator did not write.

Pins what an evaluation relies on: each design is deterministic, has its
personas in their configured (unequal) shares, produces journeys the pipeline
accepts (decoder, v2 Avro, sessions, horizon), and its personas behave the
way their names promise -- differently from each other, from the other
designs and from the default generator.
"""
import ast
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from onboardflow.runners.sim import populations
from onboardflow.runners.sim.generator import (
    DAY_MS,
    DEFAULT_START_MS,
    FEATURES,
    MINUTE_MS,
    PERSONAS,
    STEP_TOTAL,
    GeneratorConfig,
    JourneyGenerator,
)
from onboardflow.runners.sim.populations import DESIGNS, Population, PopulationUser, live_login, population
from onboardflow.transforms.decode import OnboardingEventDecoder
from onboardflow.transforms.kafka.records import KafkaRecord
from onboardflow.transforms.normalize import normalize_event

EVENT_TYPES = {"signup", "login", "page_view", "click", "form_submit", "tutorial_step", "feature_used",
               "support_message", "purchase", "logout", "invite_sent"}
IN_SESSION = EVENT_TYPES - {"signup", "login", "logout", "purchase"}
SAMPLE_USERS = {"saas_teams": 600, "mobile_consumer": 600, "b2b_trial": 300}


@pytest.fixture(scope="module")
def runs():
    """Per design: (population, {user_id: persona}, events), seed 11."""
    out = {}
    for name, size in SAMPLE_USERS.items():
        pop = population(name, users=size, seed=11)
        out[name] = pop, {u.user_id: u.persona for u in pop.users()}, list(pop.events())
    return out


def by_user(events):
    grouped = defaultdict(list)
    for event in events:
        grouped[event["user_id"]].append(event)
    return grouped


def sessions_of(user_events):
    """The user's sessions, in order; a backend purchase (no session id) joins the session it follows."""
    sessions = defaultdict(list)
    current = None
    for event in user_events:
        current = event["session_id"] or current
        sessions[current].append(event)
    return sorted(sessions.values(), key=lambda s: s[0]["occurred_at"])


def of_persona(run, persona):
    pop, personas, events = run
    return {u: evs for u, evs in by_user(events).items() if personas[u] == persona}


# -- the catalogue ---------------------------------------------------------------


def test_at_least_three_designs_each_with_its_own_unequal_persona_mix():
    assert len(DESIGNS) >= 3
    persona_sets = []
    for name, make in DESIGNS.items():
        pop = make(users=10)
        assert isinstance(pop, Population) and pop.name == name and pop.description
        shares = pop.persona_shares()
        assert len(shares) >= 4 and sum(shares.values()) == pytest.approx(1.0)
        assert max(shares.values()) - min(shares.values()) >= 0.1, "the mix is meant to be unequal"
        assert not set(shares) & set(PERSONAS), "personas must not be the default generator's"
        persona_sets.append(frozenset(shares))
    assert len(set(persona_sets)) == len(persona_sets)


def test_the_factories_take_the_documented_defaults():
    pop = DESIGNS["saas_teams"]()
    assert (pop.size, pop.seed, pop.start_ms) == (2000, 7, DEFAULT_START_MS)
    assert population("b2b_trial", users=5, seed=3, start_ms=DEFAULT_START_MS + DAY_MS).start_ms == \
        DEFAULT_START_MS + DAY_MS
    with pytest.raises(ValueError):
        population("no_such_design")


def test_the_module_uses_no_persona_code_of_the_default_generator():
    tree = ast.parse(Path(populations.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.level == 1 and node.module == "generator" for alias in node.names}
    assert imported, "expected the shared constants to come from the generator"
    # Constants, the catalogues the pipeline knows, and the persona-free merge of journeys by event time.
    assert imported <= {"DAY_MS", "HOUR_MS", "MINUTE_MS", "SECOND_MS", "DEFAULT_START_MS", "message_key",
                        "TUTORIAL_STEPS", "STEP_TOTAL", "FEATURES", "merge_journeys"}


# -- determinism -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_same_arguments_give_identical_events_and_another_seed_different_ones(name):
    first = list(population(name, users=80, seed=3).events())
    assert first == list(population(name, users=80, seed=3).events())
    assert first != list(population(name, users=80, seed=4).events())
    assert population(name, users=80, seed=3).users() != population(name, users=80, seed=4).users()


# -- ground truth ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_every_persona_appears_in_about_its_configured_share(name):
    pop = population(name, users=2000, seed=7)
    users = pop.users()
    assert len(users) == 2000 and len({u.user_id for u in users}) == 2000
    assert [u.signup_ms for u in users] == sorted(u.signup_ms for u in users)
    observed = Counter(u.persona for u in users)
    for persona, share in pop.persona_shares().items():
        assert observed[persona] / 2000 == pytest.approx(share, abs=0.03), persona
    assert set(observed) == set(pop.persona_shares())


def test_users_sign_up_over_the_first_40_percent_of_the_horizon(runs):
    for pop, _, _ in runs.values():
        signups = [u.signup_ms for u in pop.users()]
        assert min(signups) >= pop.start_ms
        assert max(signups) < pop.start_ms + 0.4 * pop.days * DAY_MS
        assert max(signups) > pop.start_ms + 0.3 * pop.days * DAY_MS  # spread, not bunched at the start


# -- what the pipeline accepts ---------------------------------------------------


def test_events_are_in_time_order_inside_the_horizon_and_each_user_starts_with_signup(runs):
    for pop, personas, events in runs.values():
        times = [e["occurred_at"] for e in events]
        assert times == sorted(times)
        assert pop.start_ms <= times[0] and times[-1] <= pop.start_ms + pop.days * DAY_MS
        grouped = by_user(events)
        assert set(grouped) == set(personas)
        signup_at = {u.user_id: u.signup_ms for u in pop.users()}
        for user, evs in grouped.items():
            assert evs[0]["event_type"] == "signup" and evs[0]["occurred_at"] == signup_at[user]
            assert sum(e["event_type"] == "signup" for e in evs) == 1
            assert all(e["event_type"] == "login" for e in (s[0] for s in sessions_of(evs)[1:]))


def test_sessions_are_more_than_30_minutes_apart_and_events_within_seconds_to_minutes(runs):
    for _, _, events in runs.values():
        for evs in by_user(events).values():
            sessions = sessions_of(evs)
            for earlier, later in zip(sessions, sessions[1:]):
                assert later[0]["occurred_at"] - earlier[-1]["occurred_at"] > 30 * MINUTE_MS
            for session in sessions:
                gaps = [b["occurred_at"] - a["occurred_at"] for a, b in zip(session, session[1:])]
                assert all(2_000 <= g <= 3 * MINUTE_MS for g in gaps) or len(session) == 1


def test_every_message_passes_the_pipeline_decoder_and_round_trips_through_avro_v2(runs):
    decoder = OnboardingEventDecoder()
    for pop, _, events in runs.values():
        messages = list(pop.messages())
        assert len(messages) == len(events)
        for offset, ((key, value), event) in enumerate(zip(messages, events)):
            assert value[0] == 0 and int.from_bytes(value[1:5], "big") == 2  # framed, schema v2
            assert key == event["user_id"].encode()
            decoded = decoder.decode(KafkaRecord("onboarding.events", 0, offset, event["received_at"], key, value))
            assert decoded == {**event, "referrer": None}
            assert normalize_event(decoded)[1] is False  # no clock skew to clamp


def test_events_carry_the_fields_and_properties_downstream_stages_read(runs):
    for _, _, events in runs.values():
        emails = {}
        for event in events:
            kind, props, ctx = event["event_type"], event["properties"], event["context"]
            assert kind in EVENT_TYPES
            assert event["received_at"] == event["occurred_at"] and isinstance(event["occurred_at"], int)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())
            assert event["consent"]["personalization"] is True
            assert emails.setdefault(event["user_id"], ctx["email"]) == ctx["email"]
            if kind == "purchase":
                assert event["session_id"] is None and ctx["device"] is ctx["ip"] is ctx["user_agent"] is None
                assert props["currency"] == "USD" and float(props["amount"]) > 0 and props["plan"]
                continue
            assert event["session_id"].startswith("sess-") and event["anonymous_id"]
            assert ctx["device"] and ctx["user_agent"] and ctx["ip"].count(".") == 3
            required = {"signup": {"plan", "signup_method"}, "page_view": {"page"}, "click": {"element", "page"},
                        "form_submit": {"form"}, "support_message": {"topic", "channel"},
                        "invite_sent": {"channel"}, "feature_used": {"feature"},
                        "tutorial_step": {"step", "step_total", "step_name"}}.get(kind, set())
            assert required <= set(props), kind
            if kind == "signup":
                assert props["plan"] in {"free", "trial", "team"}
            if kind == "feature_used":
                assert props["feature"] in FEATURES
            if kind == "invite_sent":
                assert props["channel"] in {"email", "link", "slack"}
        assert len(set(emails.values())) == len(emails), "one synthetic address per user"


def test_tutorial_steps_come_in_increasing_order_across_each_journey(runs):
    for _, _, events in runs.values():
        for evs in by_user(events).values():
            steps = [int(e["properties"]["step"]) for e in evs if e["event_type"] == "tutorial_step"]
            assert steps == list(range(1, len(steps) + 1))
            assert all(e["properties"]["step_total"] == str(STEP_TOTAL)
                       for e in evs if e["event_type"] == "tutorial_step")


# -- behaviour: designs and personas differ ----------------------------------------


def test_saas_team_inviters_send_invites_more_than_anything_else(runs):
    inviters = of_persona(runs["saas_teams"], "team_inviter")
    top = [Counter(e["event_type"] for e in evs if e["event_type"] in IN_SESSION).most_common(1)[0][0]
           for evs in inviters.values() if len(evs) > 8]
    assert len(top) >= 30 and top.count("invite_sent") / len(top) >= 0.9
    others = [u for u, p in runs["saas_teams"][1].items() if p in ("browse_and_leave", "drop_off")]
    grouped = by_user(runs["saas_teams"][2])
    assert not any(e["event_type"] == "invite_sent" for u in others for e in grouped[u])


def test_saas_drop_offs_are_gone_after_two_days_with_one_or_two_steps_done(runs):
    pop, _, _ = runs["saas_teams"]
    for evs in of_persona(runs["saas_teams"], "drop_off").values():
        assert evs[-1]["occurred_at"] - evs[0]["occurred_at"] < 2 * DAY_MS + 2 * 60 * MINUTE_MS
        assert len(sessions_of(evs)) <= 2
        assert 1 <= sum(e["event_type"] == "tutorial_step" for e in evs) <= 2
    for evs in of_persona(runs["saas_teams"], "browse_and_leave").values():
        assert not {e["event_type"] for e in evs} & {"tutorial_step", "feature_used"}


def test_saas_daily_workers_come_back_most_days_and_finish_the_tutorial(runs):
    pop, _, _ = runs["saas_teams"]
    end = pop.start_ms + pop.days * DAY_MS
    workers = of_persona(runs["saas_teams"], "daily_worker")
    finished = [sum(e["event_type"] == "tutorial_step" for e in evs) == STEP_TOTAL for evs in workers.values()]
    assert sum(finished) / len(finished) >= 0.85
    active_share = [len({e["occurred_at"] // DAY_MS for e in evs}) / ((end - evs[0]["occurred_at"]) / DAY_MS + 1)
                    for evs in workers.values()]
    assert statistics.median(active_share) >= 0.6


def test_mobile_sessions_are_tiny_and_b2b_sessions_long(runs):
    def shape(name):
        sessions = [s for evs in by_user(runs[name][2]).values() for s in sessions_of(evs)]
        lengths = [len(s) for s in sessions]
        minutes = [(s[-1]["occurred_at"] - s[0]["occurred_at"]) / MINUTE_MS for s in sessions]
        return statistics.median(lengths), statistics.median(minutes)

    mobile_events, mobile_minutes = shape("mobile_consumer")
    b2b_events, b2b_minutes = shape("b2b_trial")
    assert mobile_events <= 4 and mobile_minutes <= 3
    assert b2b_events >= 20 and 20 <= b2b_minutes <= 90
    assert b2b_events >= 5 * mobile_events


def test_session_shapes_differ_from_the_default_generators(runs):
    generator = JourneyGenerator(GeneratorConfig(seed=3, users=40, duplicate_fraction=0.0, late_fraction=0.0,
                                                 out_of_order_fraction=0.0))
    default_sizes = Counter(e["session_id"] for _, e in generator.events() if e["session_id"] and e["user_id"])
    default_median = statistics.median(default_sizes.values())
    median = {name: statistics.median(Counter(e["session_id"] for e in events if e["session_id"]).values())
              for name, (_, _, events) in runs.items()}
    assert median["mobile_consumer"] * 2 <= default_median
    assert median["b2b_trial"] >= 2 * default_median
    assert all(e["event_type"] != "invite_sent" for _, e in generator.events())
    assert any(e["event_type"] == "invite_sent" for e in runs["saas_teams"][2])


def test_mobile_weekend_users_return_only_on_saturdays_and_sundays(runs):
    weekend_users = of_persona(runs["mobile_consumer"], "weekend_user")
    later_days = [(s[0]["occurred_at"] // DAY_MS + 3) % 7 for evs in weekend_users.values()
                  for s in sessions_of(evs)[1:]]
    assert len(later_days) >= 100 and set(later_days) <= {5, 6}


def test_mobile_bingers_quit_after_two_days_and_lurkers_only_look(runs):
    for evs in of_persona(runs["mobile_consumer"], "binge_then_quit").values():
        assert evs[-1]["occurred_at"] - evs[0]["occurred_at"] < 2 * DAY_MS + 2 * 60 * MINUTE_MS
    snacker_sessions = [len(sessions_of(evs)) for evs in of_persona(runs["mobile_consumer"], "snacker").values()]
    assert statistics.median(snacker_sessions) >= 10
    for evs in of_persona(runs["mobile_consumer"], "lurker").values():
        assert {e["event_type"] for e in evs} <= {"signup", "login", "page_view"}


def test_b2b_personas_differ_in_forms_docs_purchases_and_sessions(runs):
    run = runs["b2b_trial"]

    def share(persona, predicate):
        users = of_persona(run, persona).values()
        return statistics.mean(sum(map(predicate, evs)) / len(evs) for evs in users)

    assert share("admin_setup", lambda e: e["event_type"] == "form_submit") > 0.3
    assert share("evaluator", lambda e: e["properties"].get("page", "").startswith(("/docs", "/pricing"))) > 0.4
    assert share("power_user", lambda e: e["event_type"] == "feature_used") > 0.45
    champions = of_persona(run, "champion").values()
    assert sum(any(e["event_type"] == "purchase" for e in evs) for evs in champions) / len(champions) >= 0.7
    assert all(len(sessions_of(evs)) <= 2 for evs in of_persona(run, "ghost").values())


# -- the live phase ----------------------------------------------------------------


def test_live_login_is_a_valid_login_of_that_user_at_that_time_from_their_own_device(runs):
    pop, _, events = runs["b2b_trial"]
    user = pop.users()[5]
    at = pop.start_ms + int(pop.days * DAY_MS) + 3 * MINUTE_MS
    event = live_login(user, at, seed=99)
    assert event == live_login(user, at, seed=99)
    assert event["event_id"] != live_login(user, at, seed=100)["event_id"]
    assert event["event_type"] == "login" and event["user_id"] == user.user_id
    assert event["occurred_at"] == event["received_at"] == at
    history = [e for e in events if e["user_id"] == user.user_id and e["session_id"]]
    assert event["anonymous_id"] in {e["anonymous_id"] for e in history}
    assert event["context"]["email"] == history[0]["context"]["email"]
    assert event["consent"] == history[0]["consent"]
    value = populations.v2_serializer()(event)
    decoded = OnboardingEventDecoder().decode(KafkaRecord("onboarding.events", 0, 0, at, user.user_id.encode(), value))
    assert decoded == {**event, "referrer": None}
    with pytest.raises(ValueError):
        live_login(PopulationUser("usr-000001", "explorer", at), at, seed=1)
