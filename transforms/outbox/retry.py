"""The outages a relay or a dead-letter recording rides out, and how (``retry_transient``).

Transient: connection-level Redis errors, Kafka errors (no broker to
bootstrap from, records not acknowledged) and a lost relay lease. They are
retried with ``RetryPolicy`` (transforms/sinks/retry.py): doubling waits from
0.1 s capped at 5 s, for ``budget_s`` seconds; each retry logged at WARNING
naming the service that is away and the error's type only (``outage``), e.g.
``outbox profile-snapshots failed (attempt 3, failing for 0.3 s): Redis
unavailable (ConnectionError); retrying in 0.40 s``.
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


def outage(error: BaseException) -> str:
    """What an outage error says in a log line: the service that is away and the error's type, never its text
    (which may quote a record)."""
    from kafka.errors import KafkaError
    kind = type(error).__name__
    if isinstance(error, redis.exceptions.RedisError):
        return f"Redis unavailable ({kind})"
    if isinstance(error, (KafkaError, KafkaRelayError)):
        return f"Kafka unavailable ({kind})"
    if isinstance(error, LostLease):
        return "relay lease lost to another relay"
    return kind


def retry_transient(call: Callable[[], Any], budget_s: float, what: str, cap_s: float = 5.0,
                    on_error: Optional[Callable[[BaseException], None]] = None, log: logging.Logger = _LOG):
    """``call()``, retried for ``budget_s`` seconds on errors an outage causes, then raised.

    ``on_error(error)`` runs after each failed attempt (e.g. to drop a broken client, or count a Redis error).
    """
    policy = RetryPolicy(max_attempts=1, budget_s=budget_s, base_s=0.1, cap_s=cap_s, jitter=False,
                         log_detail=False)
    return policy.run(call, transient=_transient_errors(), what=what, log=log, on_error=on_error,
                      describe=outage)
