"""Run onboardflow pipelines locally on Beam's Prism runner.

Prism is Beam's portable local runner (a single Go binary). ``make prism``
builds it into ``<cache dir>/bin/prism`` (runners/paths.py); ``prism_location()``
finds it there, and ``local_pipeline_options()``
turns it into PipelineOptions that tests, the CLI and the demo share.

Workers run in-process (``environment_type=LOOPBACK``): the Python SDK harness
is a thread pool inside the launching process, so tests can hand DoFns local
fixtures (temp files, service addresses) and no Docker is needed.
docs/local-runner.md lists which Beam features the pipelines rely on and what
Prism does with each.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from apache_beam.options.pipeline_options import PipelineOptions

from . import paths

#: Turns off Prism's dynamic splitting of bundles, which can process one key of a
#: keyed stateful stage in two bundles at once and lose updates (docs/decisions.md,
#: runners/local.py). The Kafka source declines such splits anyway.
PRISM_NO_DYNAMIC_SPLITS = "prism_disable_sdf_split"


def default_prism_path() -> Path:
    """Where ``make prism`` builds Prism: ``<cache dir>/bin/prism`` (runners/paths.py)."""
    return paths.cache_dir() / "bin" / "prism"


def prism_location(path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Path of the Prism binary: ``path`` if given, else ``default_prism_path()``.

    Raises FileNotFoundError (with the ``make prism`` hint) when it is missing,
    rather than letting Beam silently download a binary from GitHub.
    """
    candidate = Path(path) if path is not None else default_prism_path()
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Prism binary not found at {candidate}; build it with `make prism` "
            "(or pass the path of an existing binary)."
        )
    if not os.access(candidate, os.X_OK):
        raise PermissionError(f"Prism binary at {candidate} is not executable")
    return str(candidate)


#: The portable runner's job-service deadline for local runs (``--job_server_timeout``).
JOB_STREAM_TIMEOUT_S = 7 * 24 * 3600


def local_pipeline_options(
    streaming: bool,
    *,
    prism_path: Optional[Union[str, os.PathLike]] = None,
    **extra: Any,
) -> PipelineOptions:
    """PipelineOptions that run on Prism with in-process (LOOPBACK) workers.

    ``streaming`` sets ``--streaming`` (unbounded sources, processing-time
    timers and triggers). ``extra`` are further PipelineOptions keyword
    arguments (e.g. ``kafka_bootstrap_servers=...``, ``job_name=...``); they
    override the defaults below.
    """
    experiments = list(extra.pop("experiments", None) or [])
    if PRISM_NO_DYNAMIC_SPLITS not in experiments:
        experiments.append(PRISM_NO_DYNAMIC_SPLITS)
    settings: dict[str, Any] = {
        "runner": "PrismRunner",
        "prism_location": prism_location(prism_path),
        "environment_type": "LOOPBACK",
        "streaming": streaming,
        # Prism logs every job-state change at info; keep test output readable.
        "prism_log_level": "warn",
        # Type checks are cheap at construction and catch wiring mistakes early.
        "pipeline_type_check": True,
        # Beam's portable runner opens the job's state and message streams
        # with this as their gRPC deadline (default 300 s): a bounded backfill
        # or a streaming job that runs longer than that lost its job service
        # and failed with DEADLINE_EXCEEDED after exactly five minutes
        # (docs/local-runner.md). A week: the streams live as long as the job.
        "job_server_timeout": JOB_STREAM_TIMEOUT_S,
        "experiments": experiments,
    }
    settings.update(extra)
    # An explicit empty flag list: options come from here, never from sys.argv.
    return PipelineOptions([], **settings)


def stop_streaming_job(result, timeout_s: float = 30.0, quiet: bool = True, grace_s: float = 5.0) -> Optional[str]:
    """Cancel a streaming job on Prism and wait until it stopped; returns its final state.

    Cancelling tears the in-process SDK workers down under their running
    bundles, and Beam's harness prints a traceback for each one it interrupts
    ("Channel closed prematurely", "Bundle Failed ... pipeline canceled",
    ``_queue.Empty``), to ``sys.stderr`` and through the ``apache_beam``
    loggers, for a job that is only doing what it was told. With ``quiet``
    (the demo and the benchmarks, after they have printed their results)
    those are silenced until the job is down and then ``grace_s`` more
    seconds, while Prism fails the interrupted bundles and the harness
    threads wind up; a job that failed *before* the cancel still reports its own
    error, which was logged when it happened. Returns the state (``CANCELLED``,
    or ``FAILED``/``DONE`` if it had already ended), or None if it did not
    stop within ``timeout_s``.
    """
    import logging
    import sys
    import time

    from apache_beam.runners.runner import PipelineState

    terminal = (PipelineState.CANCELLED, PipelineState.FAILED, PipelineState.DONE)
    # Prism's own output arrives through a logger named after Beam's job-server
    # class, set to INFO by Beam (job_server.SubprocessJobServer.start).
    loggers = [logging.getLogger(name) for name in ("apache_beam", "PrismJobServer", "root")]
    levels = [logger.level for logger in loggers]
    saved_stderr = sys.stderr
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        # Never closed: a harness thread may still hold it after stderr is restored.
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    try:
        try:
            result.cancel()
        except Exception:  # noqa: BLE001 - the job may be gone already; its state says how it ended
            logging.getLogger(__name__).debug("cancel refused; the job's state decides", exc_info=True)
        deadline = time.monotonic() + timeout_s
        state = result.state
        while state not in terminal and time.monotonic() < deadline:
            time.sleep(0.2)
            state = result.state
        if quiet:
            time.sleep(grace_s)
        return state if state in terminal else None
    finally:
        if quiet:
            sys.stderr = saved_stderr
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
