"""`onboardflow run`: the onboarding pipeline (pipelines/onboarding.py) from the command line.

    onboardflow run [--engine beam|flink] [BEAM AND PIPELINE FLAGS...]

The flags are Beam's and the pipeline's own ``--snake_case`` options
(pipelines/options.py, the Kafka source's ``--kafka_*``), passed through to
``PipelineOptions``. What they leave out comes from the deployment's settings
(runners/settings.py: Kafka, topics, consumer group, Redis, warehouse), so a
plain ``onboardflow run --demo_mode`` reads and writes what ``onboardflow
demo``, ``profile``, ``models`` and ``lag`` look at. Without ``--runner`` the
job runs locally on Prism (runners/local.py); ``--runner flink`` is completed
with onboardflow's Flink settings (runners/flink_runner.py).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..settings import Settings
from ..settings import settings as current_settings


def pipeline_options(argv: Sequence[str], settings: Optional[Settings] = None):
    """PipelineOptions for ``argv`` over the deployment's settings; without ``--runner``, Prism's.

    ``--runner flink`` is completed with onboardflow's Flink settings (job
    server jar checked first, EXTERNAL worker pool, checkpointing). Without a
    runner the job runs locally on Prism (``runners/local.py``): the Prism
    binary, LOOPBACK workers, streaming unless ``--kafka_bounded``, and the
    experiment that turns off Prism's dynamic splits. Flags the caller gave
    win, e.g. ``--environment_type=EXTERNAL --environment_config=host:port``
    to run the SDK workers in a worker pool's processes.
    """
    from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, StandardOptions

    from ...pipelines import options as _options  # noqa: F401 - registers the option classes
    from ..flink_runner import flink_argv, given_flags
    from ..local import local_pipeline_options

    settings = settings or current_settings()
    given = given_flags(argv)
    argv = flink_argv(list(argv))
    # The deployment first: a flag the caller gave comes later and wins.
    argv = settings.pipeline_flags() + argv
    if not ({"secret_file", "secret_env", "demo_mode"} & set(given)) and settings.key_file.is_file():
        argv = [f"--secret_file={settings.key_file}"] + argv
    options = PipelineOptions(argv)
    std = options.view_as(StandardOptions)
    if std.runner:
        return options
    local = local_pipeline_options(streaming=std.streaming or not options.get_all_options().get("kafka_bounded"))
    experiments = list(options.view_as(DebugOptions).experiments or [])
    experiments += [e for e in local.view_as(DebugOptions).experiments if e not in experiments]
    # Keyword arguments override flags in PipelineOptions, so only the
    # settings the caller left out are passed that way (a flag given with its
    # default value counts as given).
    given = given_flags(argv)
    local_settings = {k: v for k, v in local.get_all_options(drop_default=True).items()
                      if k in ("runner", "prism_location", "environment_type", "streaming",
                               "prism_log_level", "job_server_timeout") and k not in given}
    if "kafka_start_position" not in given:
        # Prism keeps no state between jobs: a job that resumed from the group's
        # committed offsets would fold each user's next event into an empty
        # profile state and write a one-event profile over the full one (a newer
        # version). Locally every job rebuilds its state from the earliest
        # offset; what Redis already holds is skipped (docs/local-runner.md).
        local_settings["kafka_start_position"] = "earliest"
    return PipelineOptions(argv, experiments=experiments, **local_settings)


def run(argv: Optional[Sequence[str]] = None, secret=None, wait: bool = True, settings: Optional[Settings] = None):
    """Run the onboarding pipeline for command-line style ``argv`` (see ``pipeline_options``).

    ``secret``: a ``SecretKey`` instead of the one the flags name. Returns the
    PipelineResult (finished when ``wait``).
    """
    from ...pipelines import onboarding

    options = pipeline_options(sys.argv[1:] if argv is None else argv, settings)
    return onboarding.run(options, secret=secret, wait=wait)


def help_text() -> str:
    """The flags ``onboardflow run`` understands: the pipeline's option groups, then Beam's standard ones."""
    from apache_beam.options.pipeline_options import StandardOptions, _BeamArgumentParser

    from ...pipelines.options import (
        FlinkCheckpointOptions,
        FlinkJobOptions,
        KafkaReadOptions,
        MetricsOptions,
        OnboardingOptions,
    )

    parser = _BeamArgumentParser(
        prog="onboardflow run", usage="onboardflow run [PIPELINE AND BEAM FLAGS...]", allow_abbrev=False,
        description="Run the onboarding pipeline. Flags left out come from the deployment's settings "
                    "(OBF_* variables, runners/settings.py); without --runner it runs locally on Prism.",
        epilog="Every other Beam pipeline option is passed through to Beam (docs/local-runner.md, docs/flink.md).")
    parser.add_argument("--engine", choices=ENGINES, default="beam",
                        help="beam: the Beam pipeline (Prism locally, or --runner). flink: the native Flink "
                             "job on a running cluster (make flink-up; docs/flink.md).")
    for options in (OnboardingOptions, KafkaReadOptions, MetricsOptions, FlinkCheckpointOptions, FlinkJobOptions,
                    StandardOptions):
        options._add_argparse_args(parser)  # each adds its own argument groups
    return parser.format_help()


ENGINES = ("beam", "flink")


def engine_of(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--engine beam|flink`` taken out of ``argv``: (engine, the other flags). Default: beam."""
    rest, engine, args = [], "beam", list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--engine" and args:
            engine = args.pop(0)
        elif arg.startswith("--engine="):
            engine = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if engine not in ENGINES:
        raise SystemExit(f"onboardflow run: --engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    return engine, rest


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    engine, argv = engine_of(argv)
    if engine == "flink":
        from .. import flink_job

        return flink_job.run(argv)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
