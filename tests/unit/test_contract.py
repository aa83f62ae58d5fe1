"""The profile contract is defined once (schemas/contract.py); every other copy is generated or held equal here."""
import json
from pathlib import Path

from onboardflow.schemas import load_schema_json
from onboardflow.schemas.contract import (
    MODEL_FIELDS,
    PROFILE,
    PROFILE_FIELDS,
    STAGES,
    avsc_text,
    markdown_table,
    profile_avro_schema,
)

ROOT = Path(__file__).resolve().parents[2]


def test_fields_are_unique_typed_and_set_by_a_known_stage():
    assert len(PROFILE) == len(PROFILE_FIELDS)
    for field in PROFILE_FIELDS:
        assert field.type in {"str", "int", "float", "bool", "json"}, field
        assert field.stage in STAGES, field
        assert field.doc.endswith((".", ")")), field
    assert MODEL_FIELDS == ("cluster_id", "segment_label", "propensity", "model_version", "onboarding_track")


def test_the_committed_avro_schema_is_the_generated_one():
    assert (ROOT / "schemas" / "user_profile.avsc").read_text() == avsc_text()
    assert load_schema_json("user_profile") == profile_avro_schema()
    assert json.loads(avsc_text()) == profile_avro_schema()


def test_the_redis_contract_document_lists_exactly_the_contract_fields():
    text = (ROOT / "docs" / "redis-contract.md").read_text()
    begin = text.index("<!-- contract:profile-fields:begin")
    begin = text.index("\n", begin) + 1
    end = text.index("<!-- contract:profile-fields:end -->")
    assert text[begin:end] == markdown_table()


# --------------------------------------------------------------------------- the pipeline's profiles keep it


def _pipeline_profiles(users=60, seed=7):
    """Every profile update the core stages make of generator events, as the Redis store would encode it.

    generator events -> normalize -> anonymize -> profile machine (events, then
    each user's lifecycle timers up to the horizon) -> enrich (every 5th
    account missing from the table) -> RFM scores (a reference fitted on each
    user's last profile) -> rule segments -> the online models' fields as the
    scorer sets them with no model serving -> tracks -> experiments.
    """
    from onboardflow.models.rfm_reference import fit_reference
    from onboardflow.models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.schemas.records import ProfileUpdate
    from onboardflow.transforms.anonymize import PERSONALIZATION, EventAnonymizer, Pseudonymizer
    from onboardflow.transforms.enrich import enrich_update
    from onboardflow.transforms.experiments import ExperimentSet
    from onboardflow.transforms.normalize import normalize_event
    from onboardflow.transforms.online_models import ServingModels
    from onboardflow.transforms.profile import LIFECYCLE, Emit, ProfileConfig, ProfileMachine, SetTimer, Store
    from onboardflow.transforms.rfm import score_profile
    from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet, segment_profile

    gen = JourneyGenerator(GeneratorConfig(seed=seed, users=users))
    accounts = {a.account_id: {"plan": a.plan, "account_tier": "smb", "industry": a.industry,
                               "company_size": a.company_size}
                for i, a in enumerate(gen.accounts()) if i % 5}
    anonymizer = EventAnonymizer(Pseudonymizer(b"contract-test-secret-0123456789"))
    rules = RuleSet.load(DEFAULT_RULES_PATH)
    tracks = TrackPolicy.from_yaml(DEFAULT_TRACKS_PATH, rules)
    experiments = ExperimentSet.load(known_segments=rules.known_segments, known_tracks=tracks.tracks)
    machine = ProfileMachine(ProfileConfig(time_marks=rules.time_marks, horizon_ms=gen.horizon_end_ms),
                             clock_ms=lambda: gen.horizon_end_ms)
    scorer = ServingModels(store=None, refresh_seconds=1e9)  # no model serves: the model fields stay null
    states, lifecycle, updates = {}, {}, []

    def carry_out(key, decisions):
        for d in decisions:
            if isinstance(d, SetTimer) and d.timer == LIFECYCLE:
                lifecycle[key] = d.at_ms
            elif isinstance(d, Emit):
                updates.append(ProfileUpdate(d.previous, d.current))
            elif isinstance(d, Store):
                states[key] = d.state

    for raw in gen.events_in_event_time():
        normalized, _ = normalize_event(dict(raw, received_at=raw["occurred_at"]))
        routed = anonymizer.anonymize(normalized)
        if routed.route == PERSONALIZATION:
            carry_out(routed.record["user_key"], machine.on_event(states.get(routed.record["user_key"]),
                                                                   routed.record))
    while lifecycle:  # the watermark passes the horizon: every timer fires, in event-time order
        key, at = min(lifecycle.items(), key=lambda kv: kv[1])
        del lifecycle[key]
        carry_out(key, machine.on_lifecycle(states.get(key), key, at))

    last = {u.current["user_key"]: u.current for u in updates}
    reference = fit_reference(last.values()).with_version("rfm-000001")
    for update in updates:
        enriched, _ = enrich_update(update, accounts)
        profile = segment_profile(rules, score_profile(enriched.current, reference), enriched.current["as_of"])
        yield experiments.with_experiments(tracks.with_track(scorer.score(profile)), tracks.choose)


def test_every_profile_the_pipeline_writes_keeps_the_contract():
    from onboardflow.transforms.profile_store.encoding import RESERVED_FIELDS, TYPES_FIELD, encode_profile

    required = {f.name for f in PROFILE_FIELDS if not f.nullable}
    seen, n = set(), 0
    for profile in _pipeline_profiles():
        # A field the stages set, even to None (which the store leaves out), is a contract field.
        assert set(profile) <= set(PROFILE), f"not in the contract: {sorted(set(profile) - set(PROFILE))}"
        encoded = json.loads(encode_profile(profile, default_updated_at=1).fields)
        types = json.loads(encoded[TYPES_FIELD])
        fields = set(encoded) - RESERVED_FIELDS
        assert fields <= set(PROFILE), f"not in the contract: {sorted(fields - set(PROFILE))}"
        assert required <= fields, f"missing: {sorted(required - fields)}"
        wrong = {name: kind for name, kind in types.items() if kind != PROFILE[name].type}
        assert not wrong, f"types differ from the contract: {wrong}"
        seen |= fields
        n += 1
    assert n > 1000
    # The sample reaches nearly every field: all but the models' (no model serves here).
    assert set(PROFILE) - seen <= set(MODEL_FIELDS) - {"onboarding_track"}
