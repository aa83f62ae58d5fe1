"""Run onboardflow pipelines locally on Beam's Prism runner.

Prism is Beam's portable local runner (a single Go binary). ``make prism``
builds it into ``<repo>/.cache/bin/prism``; ``prism_location()`` finds it there
without reading any environment variable, and ``local_pipeline_options()``
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRISM_PATH = REPO_ROOT / ".cache" / "bin" / "prism"

#: Prism (Beam 2.77) splits a bundle that looks slow and releases the keys of
#: its residual while the primary half still runs, so a keyed stateful stage can
#: process one key in two bundles at once, the later one from stale state: lost
#: updates (engine/elementmanager.go splitBundle; apache/beam#35771; seen as
#: "Unexpected split on a bundle with timers"). Measured: 5 of 9 bounded runs
#: lost events of 1-4 users without this experiment, 0 of 6 with it. The Kafka
#: source declines such splits anyway, so nothing is lost by turning them off.
PRISM_NO_DYNAMIC_SPLITS = "prism_disable_sdf_split"


def prism_location(path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Path of the Prism binary: ``path`` if given, else ``<repo>/.cache/bin/prism``.

    Raises FileNotFoundError (with the ``make prism`` hint) when it is missing,
    rather than letting Beam silently download a binary from GitHub.
    """
    candidate = Path(path) if path is not None else DEFAULT_PRISM_PATH
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Prism binary not found at {candidate}; build it with `make prism` "
            "(or pass the path of an existing binary)."
        )
    if not os.access(candidate, os.X_OK):
        raise PermissionError(f"Prism binary at {candidate} is not executable")
    return str(candidate)


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
        "experiments": experiments,
    }
    settings.update(extra)
    # An explicit empty flag list: options come from here, never from sys.argv.
    return PipelineOptions([], **settings)
