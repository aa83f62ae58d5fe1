"""models/features.py: the feature vector the online models share."""
import math
import re
from pathlib import Path

from onboardflow.models import features
from onboardflow.models.features import CONTENT_PRIOR, FEATURE_BOUNDS, FEATURES, SEGMENT_FEATURES, feature_vector
from onboardflow.schemas.contract import PROFILE
from onboardflow.transforms.profile import ProfileConfig, UserProfileState

T0 = 1_767_571_200_000


def _profile_after(events):
    state = UserProfileState.new(ProfileConfig())
    for i, (t, event_type, props) in enumerate(events):
        state.apply({"event_id": f"e{i}", "event_type": event_type, "user_key": "u",
                     "occurred_at": t, "properties": props})
    return state.snapshot("u")


def test_vector_has_every_feature_in_order_and_no_identifiers():
    x = feature_vector(_profile_after([(T0, "signup", {"plan": "free"})]))
    assert tuple(x) == FEATURES
    assert all(isinstance(v, float) for v in x.values())
    assert not {"user_key", "account_id", "signup_at", "last_event_at"} & set(x)


def test_profile_of_the_pipeline_maps_to_expected_values():
    minute = 60_000
    events = [(T0, "signup", {"plan": "free"})]
    events += [(T0 + (i + 1) * minute, "support_message", {"topic": "setup"}) for i in range(3)]
    events += [(T0 + 5 * minute, "tutorial_step", {"step": "1", "step_total": "5"}),
               (T0 + 6 * minute, "feature_used", {"feature": "export"})]
    x = feature_vector(_profile_after(events))
    # Shares are of content events (the signup is not content), shrunk by CONTENT_PRIOR pseudo-events.
    assert x["support_share"] == 3 / (5 + CONTENT_PRIOR)
    assert x["feature_use_share"] == 1 / (5 + CONTENT_PRIOR)
    assert x["invite_share"] == 0.0
    assert x["visit_events"] == math.log1p(6)  # one visit of six events
    assert math.isclose(x["onboarding_progress"], 0.2)
    assert x["feature_breadth"] == math.log1p(1)
    assert x["events_7d"] == math.log1p(6)
    assert x["purchased"] == 0.0
    assert x["recency_days"] == 0.0


def test_a_profile_read_back_from_redis_scores_by_the_contract_names():
    stored = {"events_7d": 14, "events_30d": 40, "recency_ms": 2 * 86_400_000,
              "features_used": {"a": 1, "b": 2}, "onboarding_progress": 0.6, "days_since_signup": 3.0}
    x = feature_vector(stored)
    assert x["events_7d"] == math.log1p(14)
    assert x["events_30d"] == math.log1p(40)
    assert math.isclose(x["recency_days"], math.log1p(2.0))
    assert x["feature_breadth"] == math.log1p(2)
    assert x["support_share"] == 0.0  # no event_counts: no shares


def test_every_field_the_features_read_is_a_contract_field():
    source = Path(features.__file__).read_text()
    read = set(re.findall(r'_number\(profile, ((?:"\w+"(?:, )?)+)\)', source))
    names = {n for group in read for n in re.findall(r'"(\w+)"', group)}
    names |= set(re.findall(r'profile\.get\("(\w+)"\)', source))
    names |= set(re.findall(r'"(\w+)" in profile', source))
    assert names, "expected the extractor to read profile fields"
    assert names <= set(PROFILE), names - set(PROFILE)


def test_missing_null_and_absurd_values_stay_bounded():
    assert set(feature_vector({}).values()) == {0.0}
    absurd = {"engagement_score": 1e300, "events_7d": float("inf"), "recency_ms": -5,
              "onboarding_progress": 7.0, "avg_session_duration_s": float("nan"),
              "days_since_signup": None, "session_count": 10 ** 9}
    x = feature_vector(absurd)
    for name, value in x.items():
        assert 0.0 <= value <= FEATURE_BOUNDS[name], name
    assert x["onboarding_progress"] == 1.0
    assert x["events_7d"] == 0.0  # non-finite counts as missing


def test_sessions_per_week_is_normalized_by_tenure():
    young = feature_vector({"session_count": 2, "days_since_signup": 1.0})
    old = feature_vector({"session_count": 2, "days_since_signup": 28.0})
    assert young["sessions_per_week"] > old["sessions_per_week"]
    assert math.isclose(old["sessions_per_week"], math.log1p(0.5))


def test_active_sessions_per_week_is_the_rate_while_the_user_came_back():
    # Eight sessions in the first three days, then silence (a churner's shape),
    # read on day 3 and again on day 10: the active rate stays, the tenure rate falls.
    burst = {"session_count": 8, "days_since_signup": 3.0, "recency_ms": 0}
    after_silence = {"session_count": 8, "days_since_signup": 10.0, "recency_ms": 7 * 86_400_000}
    a, b = feature_vector(burst), feature_vector(after_silence)
    assert math.isclose(a["active_sessions_per_week"], math.log1p(8 / (4 / 7)))
    assert math.isclose(b["active_sessions_per_week"], a["active_sessions_per_week"])
    assert b["sessions_per_week"] < a["sessions_per_week"]
    # The same eight sessions spread over ten days (a stalled user's shape) read lower.
    spread = feature_vector({"session_count": 8, "days_since_signup": 10.0, "recency_ms": 0})
    assert spread["active_sessions_per_week"] < b["active_sessions_per_week"]


def test_active_sessions_per_week_reads_a_stored_profile_too():
    stored = feature_vector({"session_count": 8, "days_since_signup": 10, "recency_ms": 7 * 86_400_000})
    assert math.isclose(stored["active_sessions_per_week"], math.log1p(8 / (4 / 7)))


def test_segment_features_leave_out_recency_and_the_active_span():
    # One login after a long silence resets recency and stretches the active
    # span: neither may move a user's cluster (docs/models.md "Stability").
    assert "recency_days" not in SEGMENT_FEATURES and "active_sessions_per_week" not in SEGMENT_FEATURES
    assert "invite_share" in SEGMENT_FEATURES  # every kind of content has a say


def test_one_login_moves_no_share_and_no_visit_median():
    minute, day = 60_000, 86_400_000
    events = [(T0, "signup", {"plan": "free"})]
    for d in range(3):
        start = T0 + d * day + 3_600_000
        events += [(start, "login", {}), (start + minute, "invite_sent", {"channel": "email"}),
                   (start + 2 * minute, "page_view", {"page": "/"}),
                   (start + 3 * minute, "feature_used", {"feature": "x"})]
    profile_before = _profile_after(events)
    profile_after = _profile_after(events + [(T0 + 20 * day, "login", {})])
    assert profile_after["session_count"] == profile_before["session_count"] + 1
    before, after = feature_vector(profile_before), feature_vector(profile_after)
    for name in ("support_share", "browse_share", "feature_use_share", "invite_share", "form_share",
                 "visit_events", "visit_minutes", "feature_breadth", "onboarding_progress"):
        assert after[name] == before[name], name
