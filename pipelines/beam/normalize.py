"""Beam shell of normalization: ``NormalizeEvents``, decoded events in, normalized events out.

Applies ``normalize_event`` (``transforms/normalize.py``, where the rules are)
to every event; nothing is dropped. An event whose clock skew was clamped is
re-timestamped at its new ``occurred_at`` and counted ``clock_skew_clamped``.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...transforms.normalize import normalize_event


class NormalizeEvents(beam.PTransform):
    """Decoded events in, normalized events out (same count: nothing dropped).

    See ``transforms/normalize.py`` for the rules. Counts ``clock_skew_clamped``.
    """

    def expand(self, events):
        return events | "NormalizeEvent" >> beam.ParDo(_NormalizeFn())


class _NormalizeFn(beam.DoFn):
    def __init__(self):
        self._clamped = Metrics.counter("onboardflow", "clock_skew_clamped")

    def process(self, event):
        out, clamped = normalize_event(event)
        if clamped:
            self._clamped.inc()
            yield beam.window.TimestampedValue(out, out["occurred_at"] / 1000.0)
        else:
            yield out
