"""``ScoreRfm``: the Beam step that sets each profile update's RFM quintile scores.

In: ``ProfileUpdate``s from ``EnrichProfiles``, whose profiles carry the raw RFM
fields the profile stage folds (``rfm_frequency``, ``rfm_monetary``,
``rfm_recency_days``). Out: the same updates, both sides with ``rfm_r``,
``rfm_f``, ``rfm_m`` and ``rfm_reference`` set by ``RfmScorer``
(transforms/rfm.py) against the registry's serving RFM reference, before the
rule stage, so value segments can name the scores. Nothing is dropped; with no
reference published the scores are null.

The reference is read on the worker from the registry's Redis copy
(``ModelStore``, kind ``rfm``) and re-checked at bundle start, at most every
``refresh_seconds`` (the serving models' cadence, ``--model_refresh_seconds``);
a failed re-read keeps the cached reference and is counted as
``onboardflow:rfm_reference_refresh_failures``. docs/rfm.md.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...models.model_registry import DEFAULT_KEY_PREFIX, ModelStore
from ...schemas.records import ProfileUpdate
from ...transforms.rfm import RfmScorer, ServingReference

METRICS_NAMESPACE = "onboardflow"


class _ScoreRfmFn(beam.DoFn):
    def __init__(self, redis_url: str, key_prefix: str, refresh_seconds: float):
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._refresh_seconds = refresh_seconds

    def setup(self):
        self._store = ModelStore(self._redis_url, self._key_prefix)
        self._scorer = RfmScorer(ServingReference(self._store, self._refresh_seconds),
                                 lambda name, n: Metrics.counter(METRICS_NAMESPACE, name).inc(n))

    def start_bundle(self):
        self._scorer.refresh()

    def process(self, update: ProfileUpdate):
        yield self._scorer.score_update(update)

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class ScoreRfm(beam.PTransform):
    """ProfileUpdates -> the same updates with RFM scores (module docstring)."""

    def __init__(self, redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX, refresh_seconds: float = 60.0,
                 label: Optional[str] = None):
        super().__init__(label)
        if refresh_seconds < 0:
            raise ValueError("refresh_seconds must be >= 0")
        self._fn = _ScoreRfmFn(redis_url, key_prefix, refresh_seconds)

    def expand(self, updates):
        return updates | "ScoreAgainstReference" >> beam.ParDo(self._fn)
