"""The outages a relay or a dead-letter recording rides out, and how (``retry_transient``).

Transient: connection-level Redis errors, Kafka errors (no broker to
bootstrap from, records not acknowledged) and a lost relay lease. They are
retried with ``RetryPolicy`` (transforms/sinks/retry.py): doubling waits from
0.1 s capped at 5 s, for ``budget_s`` seconds; each retry logged at WARNING
with the error's type only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import redis

from ..sinks.retry import RetryPolicy

_LOG = logging.getLogger(__name__)


class KafkaRelayError(RuntimeError):
    """Kafka did not take a relay's records; the outbox keeps them for the next relay."""


class RelayCancelled(RuntimeError):
    """The relay was cancelled (its writer closed and stopped waiting): the outbox keeps what is left."""


class LostLease(RuntimeError):
    """Another relay took the stream's lock: this one stops before writing its cursor."""


def _transient_errors() -> tuple:
    from kafka.errors import KafkaError
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            KafkaError, KafkaRelayError, LostLease)


def retry_transient(call: Callable[[], Any], budget_s: float, what: str, cap_s: float = 5.0,
                    on_error: Optional[Callable[[], None]] = None, log: logging.Logger = _LOG):
    """``call()``, retried for ``budget_s`` seconds on errors an outage causes, then raised.

    ``on_error`` runs after each failed attempt (e.g. to drop a broken client).
    """
    policy = RetryPolicy(max_attempts=1, budget_s=budget_s, base_s=0.1, cap_s=cap_s, jitter=False,
                         log_detail=False)
    return policy.run(call, transient=_transient_errors(), what=what, log=log,
                      on_error=None if on_error is None else (lambda _error: on_error()))
