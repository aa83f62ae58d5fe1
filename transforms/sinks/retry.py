"""The one retry of transient write errors: capped exponential backoff, a minimum of attempts and of time.

In: a zero-argument ``attempt`` and a test of which errors are transient.
Out: the attempt's result, or its last error once both ``max_attempts``
attempts were made *and* ``budget_s`` seconds passed since the first failure.
Every writer (Redis profiles, warehouse, outbox relay) and every
``BatchingSink`` flush retries through it. Why a time budget as well as a
count: docs/reliability.md (retry budgets).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar, Union

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 8
#: Transient errors are retried for at least this long (and at least
#: ``max_attempts`` times) before a write fails its bundle. On Prism a failed
#: bundle fails the whole job, so the budget must outlast a Redis or
#: PostgreSQL restart (tests/integration/test_reliability.py stops each for
#: 30 s); a longer one rides out longer outages, at the cost of a job that
#: stalls (holding its bundle) rather than fails while the service is away.
DEFAULT_RETRY_BUDGET_S = 120.0

_LOG = logging.getLogger(__name__)

Transient = Union[tuple, Callable[[BaseException], bool]]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed attempt and how long to wait.

    Parameters:
      max_attempts: attempts made at least before giving up.
      budget_s: seconds since the first failure before giving up (both limits must be reached).
      base_s, cap_s: the wait before retry ``n`` is ``min(cap_s, base_s * 2**(n-1))``,
        drawn uniformly from [0, that] when ``jitter`` (full jitter), else exactly that.
      log_detail: log the error's first line (service messages name servers, never
        row values); False logs its type only.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    budget_s: float = DEFAULT_RETRY_BUDGET_S
    base_s: float = 0.05
    cap_s: float = 5.0
    jitter: bool = True
    log_detail: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling) if self.jitter else ceiling

    def run(
        self,
        attempt: Callable[[], T],
        *,
        transient: Transient,
        what: str,
        log: logging.Logger = _LOG,
        on_error: Optional[Callable[[BaseException], None]] = None,
        on_retry: Optional[Callable[[BaseException], None]] = None,
        describe: Optional[Callable[[BaseException], str]] = None,
    ) -> T:
        """``attempt()`` until it returns; transient errors are retried within the policy.

        ``on_error(error)`` runs after every failed attempt (metrics, dropping a
        broken connection), ``on_retry(error)`` before every wait (retry
        counters). A non-transient error is raised at once. ``describe(error)``
        words the error in the log lines (default: its type, and its first line
        with ``log_detail``), e.g. to name the service that is away.
        """
        is_transient = transient if callable(transient) else (lambda e: isinstance(e, transient))
        failing_since = 0.0
        number = 0
        while True:
            number += 1
            try:
                return attempt()
            except Exception as error:
                if on_error is not None:
                    on_error(error)
                if not is_transient(error):
                    raise
                now = time.monotonic()
                if number == 1:
                    failing_since = now
                failing_s = now - failing_since
                if describe is not None:
                    text = describe(error)
                elif self.log_detail:
                    text = f"{type(error).__name__}: {_first_line(error)}"
                else:
                    text = type(error).__name__
                if number >= self.max_attempts and failing_s >= self.budget_s:
                    log.error("%s gave up after %d attempts over %.1f s: %s", what, number, failing_s, text)
                    raise
                if on_retry is not None:
                    on_retry(error)
                wait = self.delay(number)
                log.warning("%s failed (attempt %d, failing for %.1f s): %s; retrying in %.2f s",
                            what, number, failing_s, text, wait)
                time.sleep(wait)
