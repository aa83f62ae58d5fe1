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
    settings: dict[str, Any] = {
        "runner": "PrismRunner",
        "prism_location": prism_location(prism_path),
        "environment_type": "LOOPBACK",
        "streaming": streaming,
        # Prism logs every job-state change at info; keep test output readable.
        "prism_log_level": "warn",
        # Type checks are cheap at construction and catch wiring mistakes early.
        "pipeline_type_check": True,
    }
    settings.update(extra)
    return PipelineOptions(**settings)
