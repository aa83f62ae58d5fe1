"""Join profiles with account reference data (plans, tiers), as a side input.

The reference data is the warehouse's ``accounts`` table: small, slowly
changing, and owned by another system. It is read whole into a dict and handed
to the join as a side input, the "slowly updating global window side input"
pattern: in streaming it is re-read every ``refresh_seconds`` (a
``PeriodicImpulse`` fires, the table is read, the newest read replaces the
previous one); in a bounded replay it is read once.

A profile whose account is missing from the table (or that has no account yet)
is enriched with documented defaults, never dropped: ``plan`` falls back to the
plan the user chose at signup, else ``"free"``; ``account_tier``, ``industry``
and ``company_size`` to ``"unknown"``. Counted as ``enrich_reference_missing``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton
from apache_beam.transforms import trigger, window
from apache_beam.transforms.periodicsequence import PeriodicImpulse

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
    def __init__(self):
        self._missing = Metrics.counter("onboardflow", "enrich_reference_missing")

    def process(self, update: ProfileUpdate, accounts):
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
      refresh_seconds: re-read period in streaming; ``None`` reads once (bounded runs).

    Nothing is dropped: missing references get the defaults in the module docstring.
    """

    def __init__(self, load_accounts: Callable[[], Mapping[str, Mapping[str, Any]]], refresh_seconds: Optional[float]):
        super().__init__()
        self._load = load_accounts
        self._refresh = refresh_seconds

    def expand(self, updates):
        load = self._load
        if self._refresh:
            accounts = (
                updates.pipeline
                | "AccountsRefreshTick" >> PeriodicImpulse(fire_interval=self._refresh, apply_windowing=False)
                | "ReadAccounts" >> beam.Map(lambda _: load())
                # Each re-read replaces the previous one for every later lookup.
                | "LatestAccounts" >> beam.WindowInto(
                    window.GlobalWindows(),
                    trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                )
            )
        else:
            accounts = updates.pipeline | "AccountsOnce" >> beam.Create([None]) | "ReadAccounts" >> beam.Map(lambda _: load())
        return updates | "JoinAccounts" >> beam.ParDo(_EnrichFn(), accounts=AsSingleton(accounts))
