"""``StateCache``: the values of a keyed operator's state cells, as this subtask last wrote or read them.

Each call into a Flink state object crosses from the embedded interpreter into
the JVM and unpickles the cell (docs/performance.md, where the Flink job's
time goes); a keyed function reads its key's cell at nearly every element.
Only the function instance that owns a key writes the key's state, and a
restore (failover, savepoint) deploys a new instance with an empty cache, so a
cached value *is* the cell's value: a hit skips the call. Bounded: the least
recently used keys are dropped first (``size`` entries).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

#: Keys whose decoded values a subtask keeps by default.
DEFAULT_SIZE = 50_000


class StateCache:
    """Key -> value, least recently used dropped first. ``read(key, load)`` calls ``load()`` on a miss."""

    def __init__(self, size: int = DEFAULT_SIZE):
        self._values: OrderedDict = OrderedDict()
        self._size = max(1, int(size))

    def read(self, key: str, load: Callable[[], Any]) -> Any:
        """The key's value: cached, else ``load()`` (the cell's read), remembered."""
        try:
            value = self._values[key]
        except KeyError:
            value = load()
            self.put(key, value)
            return value
        self._values.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        """``value`` was just written to the key's cell (or read from it)."""
        self._values[key] = value
        self._values.move_to_end(key)
        if len(self._values) > self._size:
            self._values.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._values


__all__ = ["DEFAULT_SIZE", "StateCache"]
