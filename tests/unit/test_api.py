"""The personalization API's pure parts: keys, scopes, rate limit, steps catalogue, decisions, the OpenAPI document.

No service is involved; the HTTP behaviour is tested against the running
server in tests/integration/test_api.py.
"""
from __future__ import annotations

import doctest
import json
import stat
import typing

import pytest

from onboardflow import client
from onboardflow.models.tracks import TrackPolicy
from onboardflow.runners.api import catalogue as catalogue_module
from onboardflow.runners.api import decisions as decisions_module
from onboardflow.runners.api import ratelimit
from onboardflow.runners.api.catalogue import DEFAULT_STEPS_PATH, CatalogueError, StepCatalogue
from onboardflow.runners.api.decisions import decide
from onboardflow.runners.api.keys import SCOPES, ApiKeyError, KeyFile, KeyRing
from onboardflow.runners.api.openapi import DOCUMENT, openapi_text
from onboardflow.runners.api.ratelimit import RateLimiter
from onboardflow.runners.cli import main as cli_main
from onboardflow.runners.cli.serve import duration_s
from onboardflow.schemas.contract import PROFILE_FIELDS
from onboardflow.transforms.experiments import ExperimentSet

NOW = 1_796_000_000_000


@pytest.fixture(scope="module")
def policy():
    return TrackPolicy.from_yaml()


@pytest.fixture(scope="module")
def catalogue(policy):
    return StepCatalogue.from_yaml(DEFAULT_STEPS_PATH, policy.tracks)


# --------------------------------------------------------------------------- keys


def test_a_created_key_authenticates_and_only_its_hash_is_stored_in_a_private_file(tmp_path):
    keys = KeyFile(tmp_path / "keys" / "api.json")
    plaintext, entry = keys.create("onboarding-ui", ["profiles:read"])
    text = keys.path.read_text()
    assert plaintext not in text and plaintext[17:] not in text and entry.sha256 in text
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    ring = KeyRing(keys.path)
    assert ring.authenticate(plaintext).name == "onboarding-ui"
    assert ring.authenticate(plaintext).scopes == ("profiles:read",)


def test_unknown_malformed_and_tampered_keys_are_refused_alike(tmp_path):
    keys = KeyFile(tmp_path / "api.json")
    plaintext, _ = keys.create("crm", ["segments:read"])
    ring = KeyRing(keys.path)
    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    other_id = "obf_" + "0" * 12 + plaintext[16:]
    for bad in (tampered, other_id, "", "Bearer x", plaintext + "x", plaintext.upper()):
        assert ring.authenticate(bad) is None


def test_a_revoked_key_is_refused_by_a_running_ring_within_its_refresh(tmp_path):
    clock = [0.0]
    keys = KeyFile(tmp_path / "api.json")
    plaintext, _ = keys.create("messaging", ["profiles:read"])
    ring = KeyRing(keys.path, refresh_every_s=1.0, clock=lambda: clock[0])
    assert ring.authenticate(plaintext) is not None
    keys.revoke("messaging")
    clock[0] = 1.5
    assert ring.authenticate(plaintext) is None
    assert [k.revoked_at is not None for k in keys.load()] == [True]  # kept for audits


def test_names_and_scopes_are_checked_and_an_active_name_is_unique(tmp_path):
    keys = KeyFile(tmp_path / "api.json")
    keys.create("a", ["profiles:read"])
    with pytest.raises(ApiKeyError, match="active key named 'a' exists"):
        keys.create("a", ["profiles:read"])
    with pytest.raises(ApiKeyError, match="unknown: profiles:write"):
        keys.create("b", ["profiles:write"])
    with pytest.raises(ApiKeyError, match="one or more"):
        keys.create("b", [])
    with pytest.raises(ApiKeyError, match="key name"):
        keys.create("Bad Name", ["profiles:read"])
    keys.revoke("a")
    assert keys.create("a", list(SCOPES))[1].scopes == tuple(sorted(SCOPES))


def test_the_apikeys_command_prints_the_key_once_and_lists_no_key(tmp_path, capsys):
    path = str(tmp_path / "api.json")
    assert cli_main(["apikeys", "create", "ops", "--scopes", "profiles:read,segments:read", "--keys-file", path]) == 0
    plaintext = capsys.readouterr().out.strip()
    assert plaintext.startswith("obf_")
    assert cli_main(["apikeys", "list", "--json", "--keys-file", path]) == 0
    listed = capsys.readouterr().out
    assert plaintext not in listed and json.loads(listed)["keys"][0]["scopes"] == ["profiles:read", "segments:read"]
    assert "sha256" not in listed
    assert cli_main(["apikeys", "revoke", "ops", "--keys-file", path]) == 0
    assert cli_main(["apikeys", "revoke", "ops", "--keys-file", path]) == 2


# --------------------------------------------------------------------------- rate limit


def test_a_key_gets_its_burst_then_one_request_per_refill_and_keys_do_not_share_buckets():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    now[0] = 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    now[0] = 100.0
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, not beyond


def test_a_rate_limit_needs_a_positive_rate_and_burst():
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0)


# --------------------------------------------------------------------------- catalogue and decisions


def test_the_shipped_catalogue_has_steps_for_every_track_of_the_shipped_policy(policy, catalogue):
    assert set(catalogue.tracks) == set(policy.tracks)
    assert catalogue.fallback_track == policy.default


def test_a_catalogue_missing_a_track_or_naming_an_unknown_one_is_refused():
    doc = {"version": "1", "fallback": {"track": "standard"}, "tracks": {"standard": [{"id": "a", "title": "A"}]}}
    with pytest.raises(CatalogueError, match=r"no steps for the policy's tracks \['advanced'\]"):
        StepCatalogue.from_dict(doc, tracks={"standard", "advanced"})
    extra = {**doc, "tracks": {**doc["tracks"], "bogus": [{"id": "b", "title": "B"}]}}
    with pytest.raises(CatalogueError, match=r"tracks \['bogus'\] are not in the track policy"):
        StepCatalogue.from_dict(extra, tracks={"standard"})
    bad_step = {**doc, "tracks": {"standard": [{"id": "a", "title": "A", "done_when": {"color": "red"}}]}}
    with pytest.raises(CatalogueError, match=r"tracks.standard\[0\].done_when"):
        StepCatalogue.from_dict(bad_step)


def test_steps_already_done_are_skipped_and_at_most_max_steps_are_recommended(catalogue):
    profile = {"features_used": {"integrations": 1, "automations": 2}, "milestones": [], "event_counts": {}}
    assert [s.id for s in catalogue.next_steps("advanced", profile)] == ["create_api_key", "set_up_alerts"]
    assert len(catalogue.next_steps("standard", {})) == catalogue.max_steps


def test_a_fresh_profile_gets_its_track_a_stale_one_and_an_unknown_user_the_fallback(policy, catalogue):
    fresh = {"user_key": "k" * 64, "version": 5, "updated_at": NOW - 1000, "onboarding_track": "simplified",
             "segments": ["dormant"], "features_used": {"templates": 1}}
    decision = decide(fresh, now_ms=NOW, stale_after_s=60, policy=policy, catalogue=catalogue)
    assert (decision.track, decision.track_rule, decision.fallback) == ("simplified", "profile", False)
    assert [s.id for s in decision.next_steps] == ["one_dashboard"]
    stale = decide({**fresh, "updated_at": NOW - 61_000}, now_ms=NOW, stale_after_s=60, policy=policy,
                   catalogue=catalogue)
    assert (stale.fallback, stale.fallback_reason, stale.track, stale.segments) == (
        True, "stale_profile", "standard", [])
    never_stale = decide({**fresh, "updated_at": 0}, now_ms=NOW, stale_after_s=None, policy=policy,
                         catalogue=catalogue)
    assert not never_stale.fallback
    unknown = decide(None, now_ms=NOW, stale_after_s=60, policy=policy, catalogue=catalogue, user_key="u" * 64)
    assert (unknown.fallback_reason, unknown.user_key) == ("unknown_user", "u" * 64)


def test_a_profile_the_models_stage_has_not_reached_gets_the_policys_track(policy, catalogue):
    profile = {"user_key": "k" * 64, "version": 5, "updated_at": NOW, "segments": ["needs_help"]}
    decision = decide(profile, now_ms=NOW, stale_after_s=60, policy=policy, catalogue=catalogue)
    assert (decision.track, decision.track_rule) == ("guided", "asks_for_help")


@pytest.fixture(scope="module")
def experiments():
    variants = [{"name": "control", "weight": 0.5}, {"name": "checklist", "weight": 0.5}]
    return ExperimentSet.from_dict({"version": "t", "experiments": [
        {"name": "for_simplified", "salt": "a", "status": "running", "start": "2026-11-01T00:00:00Z",
         "variants": variants, "eligible": {"tracks": ["simplified"]}},
        {"name": "for_stalled", "salt": "b", "status": "running", "start": "2026-11-01T00:00:00Z",
         "variants": variants, "eligible": {"segments_any": ["onboarding_stalled"]}},
        {"name": "not_yet", "salt": "c", "status": "running", "start": "2027-01-01T00:00:00Z", "variants": variants},
    ]})


def stored_profile(**fields):
    base = {"user_key": "k1", "version": 1, "updated_at": NOW, "segments": ["onboarding_stalled"],
            "onboarding_track": "simplified"}
    base.update(fields)
    return base


def test_a_decision_serves_the_profiles_experiments_field(policy, catalogue, experiments):
    # The pipeline judged eligibility at the profile's as_of; the API serves that, not its own reading of
    # the segments (here the user is no longer stalled, but their profile's field is the truth).
    stored = stored_profile(segments=[], onboarding_track="advanced",
                            experiments={"for_stalled": "checklist", "for_simplified": "control"})
    decision = decide(stored, now_ms=NOW, stale_after_s=None, policy=policy, catalogue=catalogue,
                      experiments=experiments)
    assert decision.experiments == {"for_stalled": "checklist", "for_simplified": "control"}
    # An empty field is served as empty, even when the user would be eligible now.
    empty = decide(stored_profile(experiments={}), now_ms=NOW, stale_after_s=None, policy=policy,
                   catalogue=catalogue, experiments=experiments)
    assert empty.experiments == {}


def test_an_experiment_the_service_does_not_run_now_is_taken_out_of_the_profiles_field(policy, catalogue,
                                                                                      experiments):
    stored = stored_profile(experiments={"for_simplified": "control", "not_yet": "checklist",
                                         "no_longer_declared": "control", "for_stalled": "undeclared_variant"})
    decision = decide(stored, now_ms=NOW, stale_after_s=None, policy=policy, catalogue=catalogue,
                      experiments=experiments)
    assert decision.experiments == {"for_simplified": "control"}
    without_file = decide(stored, now_ms=NOW, stale_after_s=None, policy=policy, catalogue=catalogue)
    assert without_file.experiments == {}


def test_a_profile_written_before_the_experiments_field_gets_each_running_experiment_it_is_eligible_for(
        policy, catalogue, experiments):
    decision = decide(stored_profile(), now_ms=NOW, stale_after_s=None, policy=policy, catalogue=catalogue,
                      experiments=experiments)
    assert decision.experiments == {"for_simplified": experiments["for_simplified"].variant("k1"),
                                    "for_stalled": experiments["for_stalled"].variant("k1")}
    other = decide(stored_profile(segments=[], onboarding_track="advanced"), now_ms=NOW, stale_after_s=None,
                   policy=policy, catalogue=catalogue, experiments=experiments)
    assert other.experiments == {}


def test_eligibility_by_track_uses_the_decisions_track_when_the_profile_has_none(policy, catalogue, experiments):
    # Written before the experiments field, and no onboarding_track yet: the policy chooses
    # (dormant -> simplified), and the experiment follows that choice.
    decision = decide(stored_profile(onboarding_track=None, segments=["dormant"]), now_ms=NOW, stale_after_s=None,
                      policy=policy, catalogue=catalogue, experiments=experiments)
    assert decision.track == "simplified" and set(decision.experiments) == {"for_simplified"}


@pytest.mark.parametrize("stored,stale_after_s", [(None, None), (stored_profile(updated_at=NOW - 7_200_000), 3600.0)])
def test_a_fallback_decision_is_in_no_experiment(policy, catalogue, experiments, stored, stale_after_s):
    decision = decide(stored, now_ms=NOW, stale_after_s=stale_after_s, policy=policy, catalogue=catalogue,
                      user_key="k1", experiments=experiments)
    assert decision.fallback and decision.experiments == {}


def test_the_docstring_examples_hold():
    for module in (catalogue_module, decisions_module, ratelimit):
        assert doctest.testmod(module).failed == 0


# --------------------------------------------------------------------------- OpenAPI, CLI, client


def test_the_committed_openapi_document_is_the_apps(tmp_path):
    assert DOCUMENT.read_text(encoding="utf-8") == openapi_text(), \
        "docs/api/openapi.json is out of date: run `make openapi`"


def test_the_openapi_document_names_every_route_with_its_error_bodies_and_the_bearer_scheme():
    doc = json.loads(openapi_text())
    assert set(doc["paths"]) == {"/v1/profiles/{user_id}", "/v1/decisions/{user_id}",
                                 "/v1/visitors/profile/{anonymous_id}", "/v1/visitors/decision/{anonymous_id}",
                                 "/v1/segments", "/v1/segments/{name}/members", "/v1/status", "/v1/users/{user_id}",
                                 "/healthz", "/readyz", "/metrics"}
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path in ("/v1/profiles/{user_id}", "/v1/visitors/profile/{anonymous_id}"):
        assert {"200", "304", "401", "403", "404", "429"} <= set(doc["paths"][path]["get"]["responses"])


@pytest.mark.parametrize("text,seconds", [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("6h", 21600.0),
                                          ("14d", 1_209_600.0), ("off", None)])
def test_stale_after_takes_durations_with_units(text, seconds):
    assert duration_s(text) == seconds


def test_the_clients_profile_type_has_every_contract_field():
    hints = typing.get_type_hints(client.Profile)
    assert list(hints) == [f.name for f in PROFILE_FIELDS]


def test_the_metrics_exposed_are_the_catalogues_and_name_routes_by_template():
    from prometheus_client.parser import text_string_to_metric_families

    from onboardflow.runners.api.metrics import ApiMetrics, api_sample_names

    metrics = ApiMetrics()
    metrics.observe("GET", "/v1/decisions/{user_id}", 200, 0.002)
    metrics.fallback("stale_profile")
    samples = [s for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples]
    assert {s.name for s in samples} <= api_sample_names()
    assert {s.labels.get("route") for s in samples if "route" in s.labels} == {"/v1/decisions/{user_id}"}


def test_a_running_ring_keeps_its_keys_when_the_file_turns_unreadable(tmp_path):
    clock = [0.0]
    keys = KeyFile(tmp_path / "api.json")
    plaintext, _ = keys.create("ui", ["profiles:read"])
    ring = KeyRing(keys.path, clock=lambda: clock[0])
    keys.path.write_text("{not json")
    clock[0] = 2.0
    assert ring.authenticate(plaintext).name == "ui"
    with pytest.raises(ApiKeyError, match="cannot read"):
        KeyRing(keys.path)
