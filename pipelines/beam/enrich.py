"""``EnrichProfiles``: the Beam step that joins profile updates with the accounts table.

In: ``ProfileUpdate``s; out: the same updates with ``plan``, ``account_tier``,
``industry`` and ``company_size`` filled in by ``transforms/enrich.py``
(defaults for a missing account, counted as
``onboardflow:enrich_reference_missing``). Nothing is dropped.

The table is read on a worker:

* in a bounded replay, once, and handed to the join as a singleton side input;
* in streaming, by each worker into an ``AccountsCache`` re-read every
  ``refresh_seconds`` (checked at bundle start; a failed re-read keeps the
  previous table and is counted as ``enrich_reference_refresh_failed``).
  Prism rejects the usual slowly updating side input (docs/decisions.md
  "transforms/enrich.py").
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from ...schemas.records import ProfileUpdate
from ...transforms.enrich import AccountsCache, enrich_update

METRICS_NAMESPACE = "onboardflow"


class _EnrichFn(beam.DoFn):
    def __init__(self, load_accounts=None, refresh_seconds: Optional[float] = None):
        self._load = load_accounts
        self._refresh = refresh_seconds
        self._missing = Metrics.counter(METRICS_NAMESPACE, "enrich_reference_missing")
        self._refresh_failed = Metrics.counter(METRICS_NAMESPACE, "enrich_reference_refresh_failed")

    def setup(self):
        self._cache = AccountsCache(self._load, self._refresh) if self._load is not None else None

    def start_bundle(self):
        if self._cache is not None and not self._cache.refresh():
            self._refresh_failed.inc()

    def process(self, update: ProfileUpdate, accounts=None):
        enriched, found = enrich_update(update, self._cache.accounts if accounts is None else accounts)
        if not found:
            self._missing.inc()
        yield enriched


class EnrichProfiles(beam.PTransform):
    """ProfileUpdates in, ProfileUpdates out with account fields filled in (module docstring).

    Args:
      load_accounts: picklable callable returning ``{account_id: {plan, account_tier,
        industry, company_size}}``; called on a worker.
      refresh_seconds: re-read period of the worker-side cache in streaming;
        ``None`` reads once into a side input (bounded runs).
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
