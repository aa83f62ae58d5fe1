"""Join profiles with account reference data (plans, tiers), as a side input.

The reference data is the warehouse's ``accounts`` table: small, slowly
changing, and owned by another system. It is read whole into a dict:

* in a bounded replay, once, and handed to the join as a singleton side input;
* in streaming, by each worker, and re-read every ``refresh_seconds`` (checked
  at bundle start; a failed re-read keeps the previous table and is counted as
  ``enrich_reference_refresh_failed``). Beam's usual "slowly updating global
  window side input" (``PeriodicImpulse`` -> triggered global window ->
  ``AsSingleton``) is not supported by Prism, the local runner
  (apache/beam#31438: "Unbounded GlobalWindow Triggered SideInput"), so the
  streaming path uses this worker-side cache, which behaves the same on Flink.

A profile whose account is missing from the table (or that has no account yet)
is enriched with documented defaults, never dropped: ``plan`` falls back to the
plan the user chose at signup, else ``"free"``; ``account_tier``, ``industry``
and ``company_size`` to ``"unknown"``. Counted as ``enrich_reference_missing``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

ACCOUNT_FIELDS = ("plan", "account_tier", "industry", "company_size")
DEFAULTS = {"plan": "free", "account_tier": "unknown", "industry": "unknown", "company_size": "unknown"}


class ProfileUpdate(NamedTuple):
    """A profile as it is now, and as it was when last emitted (None at first).

    Rule segments are evaluated on both, so segment changes are derived without
    another keyed stage.
    """

    previous: Optional[dict]
    current: dict


def enrich_profile(profile: Mapping[str, Any], accounts: Mapping[str, Mapping[str, Any]]) -> tuple[dict, bool]:
    """Return the profile with account fields, and whether the reference was found."""
    out = dict(profile)
    ref = accounts.get(profile.get("account_id") or "")
    for name in ACCOUNT_FIELDS:
        value = ref.get(name) if ref else None
        if value is None:
            value = out.get("signup_plan") if name == "plan" and out.get("signup_plan") else DEFAULTS[name]
        out[name] = value
    return out, ref is not None


class _EnrichFn(beam.DoFn):
    def __init__(self, load_accounts=None, refresh_seconds: Optional[float] = None):
        self._load = load_accounts
        self._refresh = refresh_seconds
        self._missing = Metrics.counter("onboardflow", "enrich_reference_missing")
        self._refresh_failed = Metrics.counter("onboardflow", "enrich_reference_refresh_failed")

    def setup(self):
        self._accounts, self._loaded_at = None, 0.0

    def start_bundle(self):
        if self._load is None or time.monotonic() - self._loaded_at < self._refresh:
            return
        try:
            self._accounts = self._load()
        except Exception:  # noqa: BLE001 - keep serving the last good table; the first read must succeed
            if self._accounts is None:
                raise
            self._refresh_failed.inc()
        self._loaded_at = time.monotonic()

    def process(self, update: ProfileUpdate, accounts=None):
        if accounts is None:
            accounts = self._accounts
        current, found = enrich_profile(update.current, accounts)
        if not found:
            self._missing.inc()
        previous = enrich_profile(update.previous, accounts)[0] if update.previous else None
        yield ProfileUpdate(previous, current)


class EnrichProfiles(beam.PTransform):
    """ProfileUpdates in, ProfileUpdates out with account fields filled in.

    Args:
      load_accounts: picklable callable returning ``{account_id: {plan, account_tier,
        industry, company_size}}``; called on a worker.
      refresh_seconds: re-read period of the worker-side cache in streaming;
        ``None`` reads once into a side input (bounded runs).

    Nothing is dropped: missing references get the defaults in the module docstring.
    """

    def __init__(self, load_accounts: Callable[[], Mapping[str, Mapping[str, Any]]], refresh_seconds: Optional[float]):
        super().__init__()
        self._load = load_accounts
        self._refresh = refresh_seconds

    def expand(self, updates):
        load = self._load
        if self._refresh:
            return updates | "JoinAccountsCached" >> beam.ParDo(_EnrichFn(load, self._refresh))
        accounts = (updates.pipeline
                    | "AccountsOnce" >> beam.Create([None])
                    | "ReadAccounts" >> beam.Map(lambda _: load()))
        return updates | "JoinAccounts" >> beam.ParDo(_EnrichFn(), accounts=AsSingleton(accounts))
