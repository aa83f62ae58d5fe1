"""``AnonymizeEvents``: the Beam step that pseudonymizes, reduces PII and routes events by consent.

In: decoded event dicts in the ``onboarding_event`` shape, with raw PII. Each
goes through ``EventAnonymizer`` (``transforms/anonymize.py``, where the
privacy rules are documented) and out on the output its route names:

* ``personalization`` (main): anonymized events of users with personalization
  consent; they go on to profiles and segments;
* ``analytics_only``: anonymized events of users with analytics but no
  personalization consent; anonymized analytics only, never profiles;
* ``dead_letter``: ``{"stage", "reason", "detail", "event_id", "payload"}``
  (payload = the raw event, for replay), counted in
  ``onboardflow:anonymize_dead_letter``.

Dropped: events with neither consent, counted in ``onboardflow:consent_filtered``
(and ``PipelineMetrics.consent_filtered``). Stripped PII properties are counted
in ``onboardflow:pii_properties_stripped``.
"""
from __future__ import annotations

from typing import Optional, Union

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...transforms import anonymize as core
from ...transforms.anonymize import EventAnonymizer, Pseudonymizer, SecretProvider, as_secret_provider
from ...transforms.metrics import PipelineMetrics
from .metrics import beam_pipeline_metrics

METRICS_NAMESPACE = "onboardflow"


class _AnonymizeFn(beam.DoFn):
    def __init__(self, secret_provider: SecretProvider, metrics: Optional[PipelineMetrics] = None) -> None:
        self._secret_provider = secret_provider
        self._metrics = metrics or beam_pipeline_metrics(prometheus=False)
        self._anonymizer: Optional[EventAnonymizer] = None
        self._consent_filtered = Metrics.counter(METRICS_NAMESPACE, "consent_filtered")
        self._personalization = Metrics.counter(METRICS_NAMESPACE, "anonymized_personalization")
        self._analytics_only = Metrics.counter(METRICS_NAMESPACE, "anonymized_analytics_only")
        self._dead_letters = Metrics.counter(METRICS_NAMESPACE, "anonymize_dead_letter")
        self._stripped = Metrics.counter(METRICS_NAMESPACE, "pii_properties_stripped")

    def setup(self) -> None:
        self._metrics.setup()
        # Resolved on the worker: a SecretFile is read here, never on the driver's graph.
        self._anonymizer = EventAnonymizer(Pseudonymizer(self._secret_provider.resolve()))

    def process(self, event):
        route, record, stripped = self._anonymizer.anonymize(event)
        if route == core.DEAD_LETTER:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(AnonymizeEvents.DEAD_LETTER, record)
            return
        if route == core.CONSENT_FILTERED:
            self._consent_filtered.inc()
            self._metrics.consent_filtered(1)
            return
        self._metrics.events_valid(1)
        if stripped:
            self._stripped.inc(stripped)
        if route == core.PERSONALIZATION:
            self._personalization.inc()
            yield record
        else:
            self._analytics_only.inc()
            yield beam.pvalue.TaggedOutput(AnonymizeEvents.ANALYTICS_ONLY, record)


class AnonymizeEvents(beam.PTransform):
    """Decoded events -> ``personalization``, ``analytics_only`` and ``dead_letter`` (module docstring).

    ``secret_provider`` is a ``SecretFile`` (preferred: only its path is in the
    graph), a ``SecretKey``, or raw bytes (wrapped in a ``SecretKey``).
    Use ``result = events | AnonymizeEvents(key)``, then ``result.personalization`` etc.
    """

    PERSONALIZATION = core.PERSONALIZATION
    ANALYTICS_ONLY = core.ANALYTICS_ONLY
    DEAD_LETTER = core.DEAD_LETTER

    def __init__(self, secret_provider: Union[SecretProvider, bytes], label: Optional[str] = None,
                 metrics: Optional[PipelineMetrics] = None) -> None:
        super().__init__(label)
        self._secret_provider = as_secret_provider(secret_provider)
        self._metrics = metrics

    def expand(self, events):
        return events | "PseudonymizeAndRoute" >> beam.ParDo(
            _AnonymizeFn(self._secret_provider, self._metrics)
        ).with_outputs(self.ANALYTICS_ONLY, self.DEAD_LETTER, main=self.PERSONALIZATION)
