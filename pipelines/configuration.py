"""The job's settings turned into the core's objects, for every engine (no Beam, no PyFlink here).

``opts`` is anything with the onboarding options as attributes: Beam's
``OnboardingOptions`` view (pipelines/onboarding.py) or the Flink job's
``JobSettings`` (pipelines/flink/settings.py); both carry the flags of
pipelines/options.py under the same names.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..models.tracks import TrackPolicy
from ..schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from ..transforms.anonymize import SecretKey, generate_demo_secret, load_secret
from ..transforms.experiments import DEFAULT_EXPERIMENTS_PATH, ExperimentSet
from ..transforms.identity import IdentityConfig
from ..transforms.profile import ProfileConfig
from ..transforms.segment import DEFAULT_RULES_PATH, RuleSet
from ..transforms.warehouse.accounts import read_accounts

_LOG = logging.getLogger(__name__)


class AccountsTable:
    """Picklable loader of the accounts reference table (runs on a worker)."""

    def __init__(self, dsn: str, schema: str):
        self.dsn, self.schema = dsn, schema

    def __call__(self) -> dict:
        return read_accounts(self.dsn, self.schema)


def resolve_secret(opts: Any) -> SecretKey:
    """The pseudonymization key: from a file or env var; generated only in demo mode."""
    if opts.secret_file or opts.secret_env:
        return SecretKey(load_secret(opts.secret_file, opts.secret_env))
    if opts.demo_mode:
        key = SecretKey(generate_demo_secret())
        _LOG.warning("demo mode: generated a throw-away pseudonymization key (%s); user keys will "
                     "differ from any other run", key.key_id)
        return key
    raise SystemExit("onboardflow run: no pseudonymization secret; pass --secret_file or --secret_env "
                     "(or --demo_mode for a throw-away key)")


def load_rules(opts: Any) -> RuleSet:
    """The segment rules of ``--rules_file`` (default: the packaged file), compiled: once per pipeline."""
    return RuleSet.load(opts.rules_file or DEFAULT_RULES_PATH)


def load_experiments(opts: Any, rules: RuleSet, tracks: TrackPolicy) -> ExperimentSet:
    """The experiments of ``--experiments_file`` (default: the packaged file), checked against the rules'
    segments and the policy's tracks: once per pipeline (``getattr``: settings of an older launcher lack it)."""
    path = getattr(opts, "experiments_file", None) or DEFAULT_EXPERIMENTS_PATH
    return ExperimentSet.load(path, rules.known_segments, tracks.tracks)


def profile_config(opts: Any, horizon_ms: Optional[int] = None,
                   rules: Optional[RuleSet] = None) -> ProfileConfig:
    """The profile stage's settings from the options; the rules (``load_rules`` by default) add their time marks.

    ``horizon_ms``: a bounded run's horizon (``backfill_horizon``), None when streaming.
    """
    rules = rules if rules is not None else load_rules(opts)
    return ProfileConfig(
        session_gap_ms=int(opts.session_gap_minutes * MINUTE_MS),
        allowed_lateness_ms=int(opts.allowed_lateness_hours * HOUR_MS),
        dedup_horizon_ms=int(opts.dedup_horizon_hours * HOUR_MS),
        new_user_window_ms=int(opts.new_user_window_days * DAY_MS),
        dormancy_ms=int(opts.dormancy_days * DAY_MS),
        state_ttl_ms=int(opts.state_ttl_days * DAY_MS),
        refresh_ms=int(opts.profile_refresh_hours * HOUR_MS),
        refresh_window_ms=int(opts.profile_refresh_window_days * DAY_MS),
        slow_refresh_ms=int(opts.profile_slow_refresh_days * DAY_MS),
        time_marks=rules.time_marks,
        horizon_ms=horizon_ms,
        max_future_ms=int(opts.future_tolerance_seconds * 1000),
    )


def identity_config(opts: Any) -> IdentityConfig:
    """The identity stage's settings: a device is forgotten as long after its newest event as a user's state."""
    return IdentityConfig(ttl_ms=int(opts.state_ttl_days * DAY_MS), max_pending=int(opts.identity_max_pending))


class RecordEncoder:
    """A record dict -> (key, framed Avro) for one of the pipeline's output topics."""

    def __init__(self, registry_url: Optional[str], subject: str, schema_name: str, key_field: str):
        self._registry_url = registry_url
        self._subject, self._schema_name, self._key_field = subject, schema_name, key_field
        self._serializer = None

    def __call__(self, record: dict):
        if self._serializer is None:
            from ..schemas import load_schema
            from ..schemas.schema_registry import registry_from_url
            from ..schemas.wire import AvroSerializer
            self._serializer = AvroSerializer(
                registry_from_url(self._registry_url), self._subject, load_schema(self._schema_name))
        return record[self._key_field].encode("ascii"), self._serializer.serialize(record)


def drift_event_kv(registry_url: Optional[str]) -> RecordEncoder:
    """DriftEvent dict -> (model_name, framed Avro) for the model-events topic."""
    from ..schemas import DRIFT_EVENT_SUBJECT
    return RecordEncoder(registry_url, DRIFT_EVENT_SUBJECT, "drift_event", "model_name")
