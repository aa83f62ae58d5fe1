"""A tiny PyFlink job that proves the local Flink cluster runs work and checkpoints.

This is NOT the onboarding pipeline (that one is a Beam pipeline and needs
Beam's Flink job server, see docs/flink.md); it is a cluster check, run with
the Flink virtualenv's PyFlink through Flink's own CLI::

    runners/flink/flink.sh cli run -d -py runners/flink/cluster_check_job.py \\
        --output /tmp/out --count 2000 --rows-per-second 250

What it does, at ``--parallelism`` (default 2, so it needs two task slots):

- reads the numbers 1..count from Flink's ``datagen`` connector, throttled to
  ``--rows-per-second`` so the job lives long enough for several periodic
  checkpoints (``--checkpoint-interval-ms``, exactly-once);
- keys them by ``n % 4`` and keeps a running count and sum per key in Flink
  keyed state (a Python ``KeyedProcessFunction``: the TaskManager starts
  Python workers with the configured ``python.executable``);
- writes one line ``key,count,sum`` per number with a ``FileSink`` that
  rolls a part file at every checkpoint and publishes it only when that
  checkpoint completes.

So the published files hold exactly ``count`` lines, and the last line of
each key carries that key's totals, only if the cluster executed the job and
completed its checkpoints: tests/integration/test_flink_cluster.py checks both,
and the checkpoint statistics through the REST API.
"""
from __future__ import annotations

import argparse

from pyflink.common import Types
from pyflink.common.serialization import Encoder
from pyflink.datastream import CheckpointingMode, KeyedProcessFunction, RuntimeContext, StreamExecutionEnvironment
from pyflink.datastream.connectors.file_system import FileSink, OutputFileConfig, RollingPolicy
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

KEYS = 4


class RunningTotals(KeyedProcessFunction):
    """Per key: how many numbers so far and their sum, in checkpointed keyed state."""

    def open(self, runtime_context: RuntimeContext):
        self.totals = runtime_context.get_state(
            ValueStateDescriptor("totals", Types.TUPLE([Types.LONG(), Types.LONG()])))

    def process_element(self, value, ctx):
        count, total = self.totals.value() or (0, 0)
        count, total = count + 1, total + value
        self.totals.update((count, total))
        yield f"{ctx.get_current_key()},{count},{total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for the published part files")
    parser.add_argument("--count", type=int, default=2000, help="numbers to generate (1..count)")
    parser.add_argument("--rows-per-second", type=int, default=250, help="datagen throttle")
    parser.add_argument("--checkpoint-interval-ms", type=int, default=1000)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--job-name", default="onboardflow-cluster-check")
    args = parser.parse_args()

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(args.parallelism)
    env.enable_checkpointing(args.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    tables = StreamTableEnvironment.create(env)
    tables.execute_sql(f"""
        CREATE TEMPORARY TABLE numbers (n BIGINT) WITH (
          'connector' = 'datagen',
          'fields.n.kind' = 'sequence',
          'fields.n.start' = '1',
          'fields.n.end' = '{args.count}',
          'rows-per-second' = '{args.rows_per_second}'
        )""")
    numbers = tables.to_data_stream(tables.from_path("numbers")).map(lambda row: row[0], Types.LONG())

    sink = (FileSink.for_row_format(args.output, Encoder.simple_string_encoder())
            .with_output_file_config(OutputFileConfig.builder().with_part_prefix("totals").build())
            # Roll (and so publish) a part file at every checkpoint; the default
            # policy would keep one in-progress file open until the input ends.
            .with_rolling_policy(RollingPolicy.on_checkpoint_rolling_policy())
            .build())
    (numbers
     .key_by(lambda n: n % KEYS, key_type=Types.LONG())
     .process(RunningTotals(), output_type=Types.STRING())
     .sink_to(sink))
    env.execute(args.job_name)


if __name__ == "__main__":
    main()
