"""``AssignRuleSegments``: the Beam step that sets each profile's rule segments.

In, either a ``ProfileUpdate(previous, current)`` (``schemas/records.py``,
from ``BuildUserProfiles`` via ``EnrichProfiles``) or a profile dict. Profiles
carry ``user_key``, the features rules use (the contract's
``rule_field_kinds()``, ``schemas/contract.py``) and ``as_of`` (the event-time
evaluation point; the element timestamp otherwise).

Out (main, ``profiles``): the current profile dict with ``segments`` set by
``segment_profile``: rule segments re-evaluated, retired ones removed,
segments the rules do not own (e.g. from the online model) kept.
``dead_letter``: ``{"stage", "reason", "detail", "user_key", "payload"}`` for
profiles that lack a user_key or have malformed ``segments`` (counted in
``onboardflow:segment_dead_letter``). Segment changes are derived downstream,
by the profile store's outbox, from what the store accepted
(docs/architecture.md).
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...transforms.dead_letter import pipeline_dead_letter
from ...transforms.segment import ProfileRejected, RuleSet, segment_profile

METRICS_NAMESPACE = "onboardflow"


class _AssignRuleSegmentsFn(beam.DoFn):
    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._dead_letters = Metrics.counter(METRICS_NAMESPACE, "segment_dead_letter")

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        try:
            yield segment_profile(self._rules, element, timestamp.micros // 1000)
        except ProfileRejected as rejected:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(
                AssignRuleSegments.DEAD_LETTER,
                pipeline_dead_letter("segment", rejected.reason, rejected.detail, element, key_field="user_key"))


class AssignRuleSegments(beam.PTransform):
    """Profile updates -> profiles with rule ``segments`` (module docstring).

    ``rules``: the compiled ``RuleSet`` (``RuleSet.load``, once per pipeline);
    it travels to workers as its text and is compiled there on arrival.
    """

    PROFILES = "profiles"
    DEAD_LETTER = "dead_letter"

    def __init__(self, rules: RuleSet, label: Optional[str] = None) -> None:
        super().__init__(label)
        self.rules = rules

    def expand(self, profiles):
        return profiles | "EvaluateRules" >> beam.ParDo(
            _AssignRuleSegmentsFn(self.rules)
        ).with_outputs(self.DEAD_LETTER, main=self.PROFILES)
