"""The batching sink: buffer records, flush them at a size or on demand, retry transient errors once.

The shape of Quix Streams' ``BatchingSink``: a sink only says how a batch is
written (``write(batch)``, which returns the records it rejects, with their
reasons); buffering, flushing, retries and dead letters live here, once.
No engine: ``pipelines/beam/sinks.py`` drives a sink from a Beam DoFn, any
other engine or a plain loop can drive it the same way.

In: elements, each with an opaque ``context`` the driver gets back (Beam: the
element's timestamp and window). Out: *settled* records, each either
``rejected`` (a dead letter: ``dead_letter(record)``) or carrying a
``result`` (what the sink reports downstream, None for nothing).

Optional configuration, each a method with a default:

* ``prepare(element)`` turns an element into what ``write`` stores and may
  refuse it (``RecordRejected``): refused elements never reach the buffer.
* ``compact_key(value)``: when not None, the buffer keeps one record per key,
  the one ``newest`` picks; the other is settled at once as ``superseded``.
* ``transient_errors`` (or ``is_transient(error)``): errors worth retrying under ``retry`` (a
  ``RetryPolicy``); a failed attempt may have settled some records (given
  them a ``result``), and only the others are sent again, in a batch with
  the same ``id`` (so a write can recognize its own earlier attempt).
* ``attempt_failed(error)`` and ``flushed(records, seconds)``: metrics hooks.

Counters go through the injected ``count(name, n)`` callback: dead letters
as ``dead_letter_counter``, retries as ``retry_counter``.
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple, Optional

from ..dead_letter import pipeline_dead_letter
from .retry import RetryPolicy

_LOG = logging.getLogger(__name__)

Count = Callable[[str, int], None]


def _no_count(name: str, n: int) -> None:
    pass


class RecordRejected(ValueError):
    """An element a sink cannot store; ``reason`` is a short dead-letter code, ``detail`` names no values."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SinkRecord:
    """One element on its way through a sink.

    ``value`` is what ``write`` stores, ``element`` the input as received (for
    dead letters and results), ``context`` the driver's (opaque here).
    ``write`` sets ``result``; the base sets ``rejection`` to ``(reason, detail)``.
    """

    __slots__ = ("value", "element", "context", "result", "rejection")

    def __init__(self, value: Any, element: Any, context: Any = None) -> None:
        self.value = value
        self.element = element
        self.context = context
        self.result: Any = None
        self.rejection: Optional[tuple[str, str]] = None

    def __repr__(self) -> str:
        return f"SinkRecord(result={self.result!r}, rejection={self.rejection!r})"


class Rejected(NamedTuple):
    """A record ``write`` refused for its data (retrying cannot help), and why."""

    record: SinkRecord
    reason: str
    detail: str


class SinkBatch:
    """The records one ``write`` attempt stores; ``id`` is the same for every attempt of a flush."""

    __slots__ = ("id", "records")

    def __init__(self, records: Sequence[SinkRecord], batch_id: Optional[str] = None) -> None:
        self.records = list(records)
        self.id = batch_id or uuid.uuid4().hex

    def __iter__(self) -> Iterator[SinkRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def values(self) -> list:
        return [r.value for r in self.records]


class BatchingSink:
    """Buffers records and writes them in batches; a subclass implements ``write(batch)``.

    Parameters:
      batch_size: a flush happens when the buffer holds this many records.
      retry: the policy for ``transient_errors`` (None: one attempt).
      count: ``count(name, n)`` for the sink's counters (Beam counters, Prometheus, ...).

    ``add`` and ``flush`` return the records they settled; the driver emits
    their results and dead letters. A flush that fails past its retries raises
    (its records are dropped from the buffer: the engine retries the input).
    """

    #: stage name of this sink's dead letters (transforms/dead_letter.py)
    stage: str = "sink"
    #: the id field copied into dead letters: "event_id" or "user_key"
    dead_letter_key: str = "event_id"
    dead_letter_counter: Optional[str] = None
    retry_counter: Optional[str] = None
    transient_errors: tuple = ()
    #: how retries of this sink are named in the log
    description: str = "sink write"
    log: logging.Logger = _LOG

    def __init__(self, batch_size: int, retry: Optional[RetryPolicy] = None, count: Optional[Count] = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.retry = retry
        self.count: Count = count or _no_count
        self.retries = 0
        self._buffer: dict[Hashable, SinkRecord] = {}
        self._sequence = itertools.count()

    # -- configuration ----------------------------------------------------------

    def write(self, batch: SinkBatch) -> list[Rejected]:
        """Store ``batch``; return the records refused for their data. Raise to retry (transient) or fail."""
        raise NotImplementedError(f"{type(self).__name__} must implement write(batch)")

    def prepare(self, element: Any) -> Any:
        """What ``write`` stores for ``element``; raise ``RecordRejected`` to refuse it."""
        return element

    def compact_key(self, value: Any) -> Optional[Hashable]:
        """Records with the same key share one place in the buffer (None: every record its own)."""
        return None

    def newest(self, held: SinkRecord, new: SinkRecord) -> SinkRecord:
        """Of two records with one compaction key, the one to keep."""
        return new

    def superseded(self, record: SinkRecord) -> Any:
        """The result of a record that compaction dropped (None: nothing to report)."""
        return None

    def is_transient(self, error: BaseException) -> bool:
        """Worth retrying ``write`` for (default: an instance of ``transient_errors``)."""
        return isinstance(error, self.transient_errors)

    def attempt_failed(self, error: BaseException) -> None:
        """Called after every failed write attempt."""

    def flushed(self, records: list[SinkRecord], seconds: float) -> None:
        """Called after a successful flush of ``records`` that took ``seconds``."""

    def open(self) -> None:
        """Prepare connections (a driver calls it once per worker); failures may wait for the first write."""

    def close(self) -> None:
        """Release connections."""

    # -- driving ----------------------------------------------------------------

    def dead_letter(self, record: SinkRecord) -> dict:
        """The in-pipeline dead letter of a rejected record (transforms/dead_letter.py)."""
        reason, detail = record.rejection
        return pipeline_dead_letter(self.stage, reason, detail, record.element, key_field=self.dead_letter_key)

    def add(self, element: Any, context: Any = None) -> list[SinkRecord]:
        """Buffer ``element``; returns the records this settled (a refusal, a superseded one, a flush)."""
        try:
            record = SinkRecord(self.prepare(element), element, context)
        except RecordRejected as exc:
            record = SinkRecord(None, element, context)
            self._reject(record, exc.reason, exc.detail)
            return [record]
        settled = []
        key = self.compact_key(record.value)
        if key is None:
            key = ("", next(self._sequence))
        held = self._buffer.get(key)
        if held is not None:
            kept = self.newest(held, record)
            dropped = record if kept is held else held
            dropped.result = self.superseded(dropped)
            settled.append(dropped)
            record = kept
        self._buffer[key] = record
        if len(self._buffer) >= self.batch_size:
            settled.extend(self.flush())
        return settled

    def discard(self) -> None:
        """Forget the buffer (an engine does this when it retries the input)."""
        self._buffer = {}

    def flush(self) -> list[SinkRecord]:
        """Write the buffer, retrying transient errors; returns every record of it, settled."""
        if not self._buffer:
            return []
        records = list(self._buffer.values())
        self._buffer = {}
        batch_id = uuid.uuid4().hex
        pending = records

        def attempt() -> list[Rejected]:
            nonlocal pending
            try:
                return self.write(SinkBatch(pending, batch_id))
            except Exception:
                pending = [r for r in pending if r.result is None]
                raise

        started = time.perf_counter()
        if self.retry is None:
            try:
                rejected = attempt()
            except Exception as error:
                self.attempt_failed(error)
                raise
        else:
            rejected = self.retry.run(attempt, transient=self.is_transient, what=self.description, log=self.log,
                                      on_error=self.attempt_failed, on_retry=self._retried)
        for r in rejected:
            self._reject(r.record, r.reason, r.detail)
        self.flushed(records, time.perf_counter() - started)
        return records

    def _retried(self, error: BaseException) -> None:
        self.retries += 1
        if self.retry_counter:
            self.count(self.retry_counter, 1)

    def _reject(self, record: SinkRecord, reason: str, detail: str) -> None:
        record.rejection = (reason, detail)
        record.result = None
        if self.dead_letter_counter:
            self.count(self.dead_letter_counter, 1)
