"""The Beam driver of the batching sinks (pipelines/beam/sinks.py) with a fake sink on the direct runner."""
import functools

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from onboardflow.pipelines.beam.sinks import DEAD_LETTER, WRITTEN, WriteToSink
from onboardflow.transforms.sinks.base import BatchingSink, Rejected


class EvenOnly(BatchingSink):
    """Accepts even numbers (result: the number doubled), rejects odd ones."""

    stage = "even_only"

    def write(self, batch):
        rejected = []
        for record in batch:
            if record.value % 2:
                rejected.append(Rejected(record, "odd", "odd numbers are refused"))
            else:
                record.result = record.value * 2
        return rejected


def test_results_and_dead_letters_keep_the_window_and_timestamp_of_their_element():
    with BeamTestPipeline() as p:
        out = (p
               | beam.Create([(n, n * 10) for n in range(6)])
               | beam.MapTuple(lambda n, ts: window.TimestampedValue(n, ts))
               | beam.WindowInto(window.FixedWindows(25))
               | WriteToSink(functools.partial(EvenOnly, 4)))

        def placed(element, ts=beam.DoFn.TimestampParam, win=beam.DoFn.WindowParam):
            value = element["payload"] if isinstance(element, dict) else element
            return value, int(ts), int(win.start)

        assert_that(out[WRITTEN] | "Written" >> beam.Map(placed),
                    equal_to([(0, 0, 0), (4, 20, 0), (8, 40, 25)]), label="Written")
        assert_that(out[DEAD_LETTER] | "Letters" >> beam.Map(placed),
                    equal_to([(1, 10, 0), (3, 30, 25), (5, 50, 50)]), label="Letters")
        assert_that(out[DEAD_LETTER] | beam.Map(lambda d: (d["stage"], d["reason"])),
                    equal_to([("even_only", "odd")] * 3), label="Reasons")
