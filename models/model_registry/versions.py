"""Model versions: kinds, version ids, and the records the registry hands out.

Part of the model registry (models/model_registry/__init__.py has the picture).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

DEFAULT_KEY_PREFIX = "obf"
DEFAULT_SCHEMA = "warehouse"

#: The model kinds and the prefix of their version ids (``rfm``: the RFM population reference,
#: a JSON payload, models/rfm_reference.py).
KINDS: dict[str, str] = {"segmentation": "seg", "propensity": "prop", "rfm": "rfm"}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_VERSION_ID_RE = re.compile(r"^(?:(?P<prefix>[a-z]+)-)?0*(?P<n>[1-9][0-9]*)$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RegistryError(f"unknown model kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return kind


def version_id(kind: str, number: int) -> str:
    """The printable id of version ``number`` of ``kind``: ``seg-000012``."""
    return f"{KINDS[check_kind(kind)]}-{number:06d}"


def parse_version(kind: str, value: Union[int, str]) -> int:
    """A version number from ``12``, ``"12"`` or ``"seg-000012"``; the prefix must match ``kind``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise RegistryError(f"version numbers start at 1, got {value}")
        return value
    match = _VERSION_ID_RE.match(str(value).strip())
    if not match:
        raise RegistryError(f"not a version: {value!r} (expected e.g. {version_id(kind, 12)} or 12)")
    prefix = match.group("prefix")
    if prefix is not None and prefix != KINDS[check_kind(kind)]:
        raise RegistryError(f"{value!r} is not a {kind} version (its ids start with {KINDS[kind]}-)")
    return int(match.group("n"))


def _plain(value: Any) -> Any:
    """numpy scalars and tuples as JSON-able Python values."""
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _json(value: Optional[Mapping[str, Any]], name: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise RegistryError(f"{name} must be a mapping, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False, default=_plain)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{name} must be JSON-serializable with finite numbers: {exc}") from None


def _epoch_ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ModelVersion:
    """One published model. ``payload`` is None in listings (``payload_size`` says how big).

    A pruned version (``pruned_at`` set) keeps its metadata; its payload is
    gone, so ``payload`` and ``payload_size`` are None.
    """

    kind: str
    number: int
    payload_sha256: str
    created_at: dt.datetime
    source: str = ""
    counts: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    payload: Optional[bytes] = None
    payload_size: Optional[int] = None
    pruned_at: Optional[dt.datetime] = None

    @property
    def id(self) -> str:
        return version_id(self.kind, self.number)

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None


class Pointer(NamedTuple):
    """Where a kind's serving pointer is. ``generation`` counts its moves."""

    kind: str
    version: int
    generation: int
    pinned: bool
    updated_at: dt.datetime


class PointerEvent(NamedTuple):
    """One move of a serving pointer (``model_events``)."""

    kind: str
    action: str  # publish | rollback | promote
    from_version: Optional[int]
    to_version: int
    generation: int
    reason: str
    at: dt.datetime


class PublishResult(NamedTuple):
    version: ModelVersion
    created: bool  # False: the payload was already registered under this version
    serving: bool  # the version is current after the call
