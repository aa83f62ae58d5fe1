"""The Beam driver of every ``BatchingSink`` (transforms/sinks/base.py): one DoFn, one transform.

``_WriteToSinkFn`` holds one sink per worker, created lazily in ``setup``
from a picklable factory (the model: bigtableio's ``_BigTableWriteFn``). It
adds each element with its timestamp and window, lets the sink flush at its
batch size, flushes in ``finish_bundle``, and emits what the sink settled in
the element's own window and timestamp: results on the main output, dead
letters on the ``dead_letter`` output. Counters go to Beam's ``onboardflow``
namespace (or the one the transform names). A flush that fails past its retries fails the bundle, so the
runner retries it rather than dropping writes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from ...transforms.sinks.base import BatchingSink, SinkRecord

METRICS_NAMESPACE = "onboardflow"
WRITTEN = "written"
DEAD_LETTER = "dead_letter"


class _WriteToSinkFn(beam.DoFn):
    """Drives the sink ``make_sink(count=...)`` builds; see the module docstring."""

    def __init__(self, make_sink: Callable[..., BatchingSink], namespace: str = METRICS_NAMESPACE) -> None:
        self._make_sink = make_sink
        self._namespace = namespace
        self._sink: Optional[BatchingSink] = None
        self._counters: dict = {}

    def _count(self, name: str, n: int) -> None:
        if n <= 0:
            return
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(self._namespace, name)
        counter.inc(n)

    def setup(self) -> None:
        self._sink = self._make_sink(count=self._count)
        self._sink.open()

    def start_bundle(self) -> None:
        self._sink.discard()  # nothing of a failed bundle stays behind

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        yield from self._emit(self._sink.add(element, (timestamp, window)))

    def finish_bundle(self):
        yield from self._emit(self._sink.flush())

    def _emit(self, records: list[SinkRecord]):
        for record in records:
            timestamp, window = record.context
            if record.rejection is not None:
                letter = WindowedValue(self._sink.dead_letter(record), timestamp, (window,))
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, letter)
            elif record.result is not None:
                yield WindowedValue(record.result, timestamp, (window,))

    def teardown(self) -> None:
        if self._sink is not None:
            self._sink.close()


class WriteToSink(beam.PTransform):
    """Elements -> ``{"written": results, "dead_letter": dead letters}`` through one ``BatchingSink``.

    ``make_sink(count=callback)`` builds the sink on each worker; it must
    pickle. ``step`` names the ParDo, ``namespace`` the counters' Beam
    namespace; ``fn`` is the DoFn (tests drive it bundle by bundle). The
    sinks' transforms subclass this one.
    """

    def __init__(self, make_sink: Callable[..., BatchingSink], step: str = "WriteBatches",
                 label: Optional[str] = None, namespace: str = METRICS_NAMESPACE) -> None:
        super().__init__(label)
        self.fn = _WriteToSinkFn(make_sink, namespace)
        self._step = step

    def expand(self, elements):
        outputs = elements | self._step >> beam.ParDo(self.fn).with_outputs(DEAD_LETTER, main=WRITTEN)
        return {WRITTEN: outputs[WRITTEN], DEAD_LETTER: outputs[DEAD_LETTER]}
