"""The profile contract, defined once: every field a profile carries, its type, who sets it, what it means.

A profile is what the pipeline writes per pseudonymous user to Redis (one hash
field per profile field, docs/redis-contract.md) and to the warehouse
(profile snapshots). Everything that names profile fields derives from
``PROFILE_FIELDS`` here or is tested against it:

* ``schemas/user_profile.avsc`` is ``profile_avro_schema()`` written out
  (``python -m onboardflow.schemas.contract avsc``); a test holds the file equal to it;
* the rule language's field catalogue (which fields a segment condition may
  name, and as what kind) is ``rule_field_kinds()``;
* the Redis encoding's ``_types`` of every field is ``PROFILE[name].type``;
* the field table of docs/redis-contract.md is ``markdown_table()``
  (``python -m onboardflow.schemas.contract table``); a test holds it equal.

So a new profile field is one entry here plus the code that computes it.
Types are the Redis encoding's: ``str``, ``int``, ``float``, ``bool`` and
``json`` (a list or a map). Times are epoch milliseconds, UTC, event time
unless a field says otherwise (schemas/units.py).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Optional

#: Kinds a segment rule can compare a field as (transforms/segment/).
NUMBER, TIMESTAMP, STRING, BOOL = "number", "timestamp", "string", "bool"

#: The stages that set profile fields, in pipeline order (docs/architecture.md).
STAGES = ("anonymize", "profile", "engagement", "sessions", "enrich", "rfm", "rules", "models", "experiments",
          "store")

_AVRO_OF_TYPE = {"str": "string", "int": "long", "float": "double", "bool": "boolean"}
_TIMESTAMP_MILLIS = {"type": "long", "logicalType": "timestamp-millis"}
_COUNTS = {"type": "map", "values": "long"}
_NAMES = {"type": "array", "items": "string"}
_VARIANTS = {"type": "map", "values": "string"}


@dataclass(frozen=True)
class ProfileField:
    """One profile field.

    Parameters:
        name: the field's name in Redis, the warehouse and the Avro record.
        type: its Redis/JSON type: ``str``, ``int``, ``float``, ``bool`` or ``json``.
        stage: the stage that sets it (one of ``STAGES``).
        doc: what it means, one sentence or two.
        nullable: whether it may be missing (null) on a profile.
        rule: the kind a segment rule compares it as, or None if rules cannot name it.
        avro: the Avro type when ``type`` alone does not say it (timestamps, maps, lists).
    """

    name: str
    type: str
    stage: str
    doc: str
    nullable: bool = False
    rule: Optional[str] = None
    avro: Any = None

    def avro_default(self) -> Any:
        """The Avro default: null when nullable, else the type's zero value."""
        if self.nullable:
            return None
        if isinstance(self.avro, dict) and self.avro["type"] in ("map", "array"):
            return {} if self.avro["type"] == "map" else []
        return {"str": "", "int": 0, "float": 0.0, "bool": False}[self.type]

    def avro_type(self) -> Any:
        base = self.avro if self.avro is not None else _AVRO_OF_TYPE[self.type]
        return ["null", base] if self.nullable else base


def _f(name, type_, stage, doc, *, nullable=False, rule=None, avro=None) -> ProfileField:
    return ProfileField(name, type_, stage, doc, nullable, rule, avro)


PROFILE_FIELDS: tuple[ProfileField, ...] = (
    # -- identity and versions
    _f("user_key", "str", "anonymize",
       "Pseudonymous key of the user: HMAC of user_id (or anonymous_id for visitors), never the raw id."),
    _f("version", "int", "profile",
       "Monotonic version: as_of * 1000 + min(999, events_total). A writer only replaces a lower version."),
    _f("as_of", "int", "profile",
       "Event time the profile is computed at: its newest event, or the timer that re-emitted it.",
       avro=_TIMESTAMP_MILLIS),
    _f("updated_at", "int", "store",
       "Wall-clock time the profile store accepted this write (processing time, not event time).",
       avro=_TIMESTAMP_MILLIS),
    # -- engagement (transforms/score.py EngagementState)
    _f("engagement_score", "float", "engagement",
       "Time-decayed engagement, >= 0: a weighted sum of events halved every half-life; "
       "recent, frequent, deep activity scores high.", rule=NUMBER),
    _f("intent_score", "float", "engagement",
       "Time-decayed buying intent, >= 0, the same sum over pricing views, plan forms "
       "and purchases.", rule=NUMBER),
    _f("feature_usage_score", "float", "engagement",
       "Time-decayed feature use, 0..100: 100 * (1 - exp(-recent uses / 10)).", rule=NUMBER),
    _f("first_event_at", "int", "engagement", "Event time of the first event seen for the user.",
       rule=TIMESTAMP, avro=_TIMESTAMP_MILLIS),
    _f("last_event_at", "int", "engagement", "Event time of the newest event folded in.",
       rule=TIMESTAMP, avro=_TIMESTAMP_MILLIS),
    _f("signup_at", "int", "engagement", "Event time of the signup; null for visitors who have not signed up.",
       nullable=True, rule=TIMESTAMP, avro=_TIMESTAMP_MILLIS),
    _f("recency_ms", "int", "engagement", "as_of - last_event_at, milliseconds.", rule=NUMBER),
    _f("events_total", "int", "engagement", "Distinct events folded in since the user was first seen.",
       rule=NUMBER),
    _f("events_7d", "int", "engagement", "Events in the 7 days up to as_of.", rule=NUMBER),
    _f("events_30d", "int", "engagement", "Events in the 30 days up to as_of.", rule=NUMBER),
    _f("active_days_7d", "int", "engagement", "Days with at least one event in the 7 days up to as_of.",
       rule=NUMBER),
    _f("active_days_30d", "int", "engagement", "Days with at least one event in the 30 days up to as_of.",
       rule=NUMBER),
    _f("event_counts", "json", "engagement", "Event type -> number of events of that type.", avro=_COUNTS),
    _f("features_used", "json", "engagement", "Feature name -> number of feature_used events for it.",
       avro=_COUNTS),
    _f("distinct_features", "int", "engagement", "Number of distinct features used.", rule=NUMBER),
    _f("milestones", "json", "engagement", "Milestones reached (e.g. tutorial_completed), sorted.",
       avro=_NAMES),
    _f("tutorial_steps_done", "int", "engagement", "Distinct tutorial steps completed.", rule=NUMBER),
    _f("tutorial_step_total", "int", "engagement", "Tutorial steps in the product; null when unknown.",
       nullable=True, rule=NUMBER),
    _f("onboarding_progress", "float", "engagement",
       "Share of the tutorial completed, 0..1; null until an event says how many steps it has.",
       nullable=True, rule=NUMBER),
    _f("days_since_signup", "float", "engagement", "(as_of - signup_at) in days; null before a signup.",
       nullable=True, rule=NUMBER),
    _f("purchased_plan", "str", "engagement", "Plan of the newest purchase event; null before one.",
       nullable=True, rule=STRING),
    # -- sessions (transforms/sessionize.py SessionState)
    _f("session_count", "int", "sessions", "Sessions since the user was first seen.", rule=NUMBER),
    _f("sessions_7d", "int", "sessions", "Sessions started in the 7 days up to as_of.", rule=NUMBER),
    _f("sessions_30d", "int", "sessions", "Sessions started in the 30 days up to as_of.", rule=NUMBER),
    _f("avg_session_duration_s", "float", "sessions", "Mean session duration, seconds.", rule=NUMBER),
    _f("last_session_duration_s", "float", "sessions", "Duration of the newest session, seconds.", rule=NUMBER),
    _f("avg_events_per_session", "float", "sessions", "Mean events per session.", rule=NUMBER),
    _f("visits", "int", "sessions", "Sessions of at least two events in the last 90 days.", rule=NUMBER),
    _f("median_visit_events", "float", "sessions", "Median events per visit; null before a visit.",
       nullable=True, rule=NUMBER),
    _f("median_visit_duration_s", "float", "sessions", "Median visit duration, seconds; null before a visit.",
       nullable=True, rule=NUMBER),
    # -- what the events said about the user (transforms/profile.py), already anonymized
    _f("account_id", "str", "profile", "Account the user signed up into; null when no event named one.",
       nullable=True),
    _f("signup_plan", "str", "profile", "Plan chosen at signup; null before a signup.",
       nullable=True, rule=STRING),
    _f("email_domain", "str", "profile", "Domain part of the email, lower case (the only part kept).",
       nullable=True, rule=STRING),
    _f("device_class", "str", "profile", "desktop, mobile, tablet, bot or unknown, from the user agent.",
       nullable=True, rule=STRING),
    _f("country", "str", "profile", "ISO 3166-1 alpha-2 region of the event's locale.", nullable=True, rule=STRING),
    _f("os", "str", "profile", "Operating system as the client reported it, PII-scrubbed.",
       nullable=True, rule=STRING),
    # -- RFM: purchases folded (transforms/rfm.py PurchaseHistory) and scored (RfmScorer); docs/rfm.md
    _f("rfm_last_purchase_at", "int", "profile", "Event time of the newest purchase; null before one.",
       nullable=True, avro=_TIMESTAMP_MILLIS),
    _f("rfm_recency_days", "float", "profile",
       "RFM recency: (as_of - rfm_last_purchase_at) in days; null before a purchase. Moves with time "
       "only at the profile's refreshes.", nullable=True, rule=NUMBER),
    _f("rfm_frequency", "int", "profile",
       "RFM frequency: purchases since the user was first seen (lifetime of the profile state).", rule=NUMBER),
    _f("rfm_monetary", "float", "profile",
       "RFM monetary value: sum of the purchases' amounts (summed in cents, as sent; one currency).",
       rule=NUMBER),
    _f("rfm_amounts_ignored", "int", "profile",
       "Purchases whose amount was missing, not a number, negative or absurd: counted in "
       "rfm_frequency, not in rfm_monetary.", rule=NUMBER),
    _f("rfm_r", "int", "rfm", "Recency quintile score 1..5 (5: most recent) against the population "
       "reference; null without a purchase or a reference.", nullable=True, rule=NUMBER),
    _f("rfm_f", "int", "rfm", "Frequency quintile score 1..5 (5: most purchases); null without a purchase "
       "or a reference.", nullable=True, rule=NUMBER),
    _f("rfm_m", "int", "rfm", "Monetary quintile score 1..5 (5: most spent); null without a purchase "
       "or a reference.", nullable=True, rule=NUMBER),
    _f("rfm_reference", "str", "rfm", "Version of the RFM population reference that set the scores, e.g. "
       "rfm-000002; null when unscored.", nullable=True, rule=STRING),
    # -- account reference data (transforms/enrich.py)
    # plan and account_tier are nullable in the record because profiles written before the
    # enrichment defaults (UserProfile v1) may hold null; the pipeline always sets them now.
    _f("plan", "str", "enrich", "The account's subscription plan (free, trial, pro, ...).", nullable=True,
       rule=STRING),
    _f("account_tier", "str", "enrich", "The account's tier (self_serve, smb, enterprise, unknown).",
       nullable=True, rule=STRING),
    _f("industry", "str", "enrich", "The account's industry, or unknown.", rule=STRING),
    _f("company_size", "int", "enrich", "The account's number of employees; null when the table has none.",
       nullable=True, rule=NUMBER),
    # -- rule segments (transforms/segment/)
    _f("segments", "json", "rules", "Rule segments the user is in, sorted (mirrored by the segment sets).",
       avro=_NAMES),
    # -- online models (transforms/online_models.py, models/tracks.py)
    _f("cluster_id", "int", "models", "Behaviour segment: its place in the archetype catalogue.",
       nullable=True),
    _f("segment_label", "str", "models", "Behaviour segment: its archetype label.", nullable=True),
    _f("propensity", "float", "models", "Probability of completing onboarding within the horizon, 0..1.",
       nullable=True),
    _f("model_version", "str", "models", "Serving model versions that set the model fields, e.g. "
       "seg-000003+prop-000002.", nullable=True),
    _f("onboarding_track", "str", "models", "Onboarding track the user is on (models/tracks.py).",
       nullable=True),
    # -- experiments (transforms/experiments.py), after the track: eligibility may name it
    _f("experiments", "json", "experiments",
       "Experiment -> variant, for every experiment of pipelines/experiments.yaml running at as_of that the "
       "profile is eligible for (sticky: the variant is a hash of user_key and the salt; docs/experiments.md). "
       "Missing on profiles written before the field existed.", avro=_VARIANTS),
)

PROFILE: dict[str, ProfileField] = {f.name: f for f in PROFILE_FIELDS}

#: Fields the online models write (and the re-score sweep rewrites in place).
MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in PROFILE_FIELDS if f.stage == "models")


def rule_field_kinds() -> dict[str, str]:
    """Field name -> the kind segment rules compare it as, for every field rules may name."""
    return {f.name: f.rule for f in PROFILE_FIELDS if f.rule is not None}


def profile_avro_schema() -> dict:
    """The ``UserProfile`` Avro record (schemas/user_profile.avsc is this, written out)."""
    fields = []
    for f in PROFILE_FIELDS:
        # Every field has a default, so readers of this version read older profiles (BACKWARD).
        field = {"name": f.name, "type": f.avro_type(), "default": f.avro_default(), "doc": f.doc}
        fields.append(field)
    return {
        "type": "record",
        "name": "UserProfile",
        "namespace": "dev.onboardflow.profiles",
        "doc": "The personalization profile of one user, as written to Redis (online reads) and to the warehouse "
               "(history). Pseudonymous: keyed by user_key, never carries raw ids, emails or IPs. Generated from "
               "schemas/contract.py; do not edit by hand.",
        "fields": fields,
    }


def avsc_text() -> str:
    """``profile_avro_schema()`` as the committed file holds it: one field per line."""
    schema = profile_avro_schema()
    head = {k: v for k, v in schema.items() if k != "fields"}
    lines = [json.dumps(field, separators=(", ", ": ")) for field in schema["fields"]]
    body = json.dumps(head, indent=2)[:-2]
    return body + ',\n  "fields": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"


def markdown_table() -> str:
    """The profile field table of docs/redis-contract.md."""
    rows = ["| field | type | set by | meaning |", "|---|---|---|---|"]
    for f in PROFILE_FIELDS:
        null = " May be null (missing)." if f.nullable else ""
        rows.append(f"| `{f.name}` | {f.type} | {f.stage} | {f.doc}{null} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m onboardflow.schemas.contract avsc|table``: print a generated artefact."""
    what = (argv if argv is not None else sys.argv[1:]) or ["avsc"]
    print(avsc_text() if what[0] == "avsc" else markdown_table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
