"""``BackgroundRelays``: the outbox relays of one writer, run in a thread of their own.

In: ``kick()`` after each flush of the writer (its profile writes, and with
them their outbox entries, are in Redis by then). Out: a relay round of
every stream (``OutboxRelay.relay``) in the background, and, at the next
``kick()`` or at ``drain()``, what the finished rounds did: their
``RelayReport``s and the counter calls the relays made meanwhile
(``count``, ``warehouse_retry``, ``redis_error``), to be applied by the caller's thread.

Why: a relay round is Redis reads, a warehouse transaction and Kafka sends
waited for; run inline it stalls the writer, which in the Flink job is the
keyed subtask itself (it reads nothing while it flushes). The relays need no
more than the outbox stream, which the profile writes made durable in the
same Redis script, so they can trail the writer: a crash loses nothing (the
next relay drains what is left, exactly once: relay.py), and ``drain()``
waits for one last round that starts after everything written before it.
Counters come back to the caller's thread because an engine's metric
objects may not be usable from another thread (PyFlink's, in thread mode).
A round that fails for good (its retries spent) is raised by the next
``kick()`` or by ``drain()``, as an inline relay would have raised it.

``drain(timeout_s)`` waits that long at most: a relay that cannot finish
(Kafka down, a topic deleted under a stopping job) is cancelled
(``OutboxRelay.cancel``) and ends at its next batch, wait or retry, before
writing its cursor. What it did not relay stays in the outbox for the next
relay of the deployment, so a bounded close loses nothing; without the
bound a closing Flink task kept relaying for the whole retry budget after
its job had ended (docs/reliability.md, "The outbox relay").
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Optional

from .relay import OutboxRelay, RelayReport
from .retry import RelayCancelled

_LOG = logging.getLogger(__name__)

#: Seconds ``drain()`` waits for the last round by default, and then for a cancelled round to end.
DEFAULT_DRAIN_TIMEOUT_S = 60.0
CANCEL_WAIT_S = 10.0

#: A counter call the relays made: (method name, arguments).
Deferred = tuple[str, tuple]


class BackgroundRelays:
    """Relay rounds in a daemon thread (module docstring). ``start(relays)`` once, ``drain()`` at the end."""

    def __init__(self) -> None:
        self._relays: Mapping[str, OutboxRelay] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._reports: list[tuple[str, RelayReport]] = []
        self._calls: list[Deferred] = []
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    # -- the relays' callbacks (any thread) ----------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._calls.append(("count", (name, n)))

    def warehouse_retry(self, table: str) -> None:
        with self._lock:
            self._calls.append(("warehouse_retry", (table,)))

    def redis_error(self, operation: str) -> None:
        with self._lock:
            self._calls.append(("redis_error", (operation,)))

    # -- the caller's side ----------------------------------------------------------

    def start(self, relays: Mapping[str, OutboxRelay]) -> None:
        self._relays = relays
        self._thread = threading.Thread(target=self._run, name="outbox-relays", daemon=True)
        self._thread.start()

    def kick(self) -> tuple[list[tuple[str, RelayReport]], list[Deferred]]:
        """Ask for a round; (reports, counter calls) of the rounds finished since the last call."""
        done = self._collect()
        self._wake.set()
        return done

    def collect(self) -> tuple[list[tuple[str, RelayReport]], list[Deferred]]:
        """(reports, counter calls) of the rounds finished since the last call, without asking for a round."""
        return self._collect()

    def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
              ) -> tuple[list[tuple[str, RelayReport]], list[Deferred]]:
        """One last round that starts after this call, waited for ``timeout_s`` at most (then
        cancelled: module docstring); the thread ends."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOG.warning("outbox relays still busy %.0f s after their writer closed: cancelled; the outbox "
                             "keeps what they did not relay for the next relay", timeout_s)
                for relay in self._relays.values():
                    relay.cancel()
                self._thread.join(CANCEL_WAIT_S)
                if self._thread.is_alive():
                    _LOG.warning("a cancelled outbox relay is still in a call; it stops when the call returns")
            self._thread = None
        return self._collect()

    def _collect(self) -> tuple[list[tuple[str, RelayReport]], list[Deferred]]:
        with self._lock:
            reports, self._reports = self._reports, []
            calls, self._calls = self._calls, []
            error, self._error = self._error, None
        if error is not None:
            raise error
        return reports, calls

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            last = self._stopping  # read before the round: a drain() during it gets one more
            try:
                reports = [(name, relay.relay()) for name, relay in self._relays.items()]
            except RelayCancelled:
                return  # drain() gave up on this round and said so
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                with self._lock:
                    self._error = error
            else:
                with self._lock:
                    self._reports += reports
            if last:
                return


__all__ = ["BackgroundRelays", "Deferred"]
