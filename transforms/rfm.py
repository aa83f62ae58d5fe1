"""RFM in the pipeline: each user's purchases folded into recency, frequency and monetary value, then scored.

Engine-free (no Beam, no Flink). Two halves, docs/rfm.md:

* **Folding** (the profile stage): ``PurchaseHistory`` keeps, per user, the
  deduplicated ``purchase`` events' count (lifetime: as long as the profile
  state lives, ``state_ttl`` after the last activity), the sum of their
  ``properties.amount`` in integer cents and the newest purchase's event time.
  Every part is a count, an integer sum or a maximum, so any arrival order
  gives the same state exactly (no float rounding). An amount that is missing,
  not a number, negative (a refund), not finite or above ``MAX_AMOUNT_CENTS``
  is ignored and counted (``rfm_amounts_ignored``); the purchase still counts
  for frequency and recency. Amounts are summed as sent: one currency is
  assumed (the generator's USD). ``UserProfileState`` (transforms/profile.py)
  holds one and puts its ``snapshot`` in the profile.
* **Scoring** (after enrichment, before the rule stage, so rules can name the
  scores): ``RfmScorer`` sets ``rfm_r``, ``rfm_f``, ``rfm_m`` (1..5) and
  ``rfm_reference`` from the population reference the registry serves (kind
  ``rfm``, models/rfm_reference.py), cached per worker and re-checked at most
  every ``refresh_seconds`` like the serving models (``ServingModels``,
  transforms/online_models.py). No reference yet, or no purchase: the scores are
  null, and the value segments of pipelines/segment_rules.yaml do not match.
  Scores are a function of the profile and the reference version alone. The
  Beam shell is pipelines/beam/rfm.py (``ScoreRfm``); the Flink job calls the
  scorer in ``StoreChain._prepare`` (pipelines/flink/store.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Callable, Optional

from ..models.rfm_reference import RFM_KIND, RfmReference
from ..schemas.records import ProfileUpdate
from ..schemas.units import DAY_MS

_LOG = logging.getLogger(__name__)

PURCHASE = "purchase"
#: Amounts above this (10^9 in currency units) are taken for garbage, not for a purchase.
MAX_AMOUNT_CENTS = 100_000_000_000
#: The profile fields the scorer sets (null until a reference serves).
SCORE_FIELDS = ("rfm_r", "rfm_f", "rfm_m", "rfm_reference")


def amount_cents(value: Any) -> Optional[int]:
    """``value`` (a number or a decimal string) in integer cents, half-even; None when unusable.

    >>> amount_cents("19.00"), amount_cents(49), amount_cents(0.125), amount_cents(" 7.5 ")
    (1900, 4900, 12, 750)
    >>> [amount_cents(v) for v in (None, True, "abc", "-1", float("nan"), "1e30", [3])]
    [None, None, None, None, None, None, None]
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    try:
        amount = Decimal(text)
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount * 100 > MAX_AMOUNT_CENTS:
        return None
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


class PurchaseHistory:
    """One user's purchases, folded (module docstring): ``add`` events, ``merge`` another, read ``snapshot``."""

    __slots__ = ("count", "cents", "last_at", "ignored")

    def __init__(self, count: int = 0, cents: int = 0, last_at: Optional[int] = None, ignored: int = 0) -> None:
        self.count, self.cents, self.last_at, self.ignored = count, cents, last_at, ignored

    def add(self, event: Mapping[str, Any]) -> None:
        """Fold one deduplicated, usable event in (anything but a purchase is ignored)."""
        if event.get("event_type") != PURCHASE:
            return
        t = event["occurred_at"]
        self.count += 1
        if self.last_at is None or t > self.last_at:
            self.last_at = t
        cents = amount_cents((event.get("properties") or {}).get("amount"))
        if cents is None:
            self.ignored += 1
        else:
            self.cents += cents

    def snapshot(self, as_of: int) -> dict:
        """The raw RFM profile fields as of ``as_of`` (event time)."""
        return {
            "rfm_last_purchase_at": self.last_at,
            "rfm_recency_days": None if self.last_at is None else max(0, as_of - self.last_at) / DAY_MS,
            "rfm_frequency": self.count,
            "rfm_monetary": self.cents / 100,
            "rfm_amounts_ignored": self.ignored,
        }

    def to_primitive(self) -> tuple:
        return (self.count, self.cents, self.last_at, self.ignored)

    @classmethod
    def from_primitive(cls, data: tuple) -> "PurchaseHistory":
        return cls(*data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PurchaseHistory) and self.to_primitive() == other.to_primitive()

    def __repr__(self) -> str:
        return f"PurchaseHistory{self.to_primitive()}"


def score_profile(profile: Mapping[str, Any], reference: Optional[RfmReference]) -> dict:
    """``profile`` with ``SCORE_FIELDS`` set from ``reference`` (null without one, or without a purchase)."""
    scored = dict(profile)
    scores = reference.score(profile) if reference is not None else {"rfm_r": None, "rfm_f": None, "rfm_m": None}
    scored.update(scores)
    scored["rfm_reference"] = reference.version if reference is not None and scores["rfm_f"] is not None else None
    return scored


class ServingReference:
    """The registry's serving RFM reference (``ModelStore``), cached and re-checked every ``refresh_seconds``."""

    def __init__(self, store, refresh_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._checked_at: Optional[float] = None
        self.number: Optional[int] = None
        self.reference: Optional[RfmReference] = None

    def refresh(self, force: bool = False) -> Optional[int]:
        """Reload when due and the serving version changed; the version number loaded, else None."""
        now = self._clock()
        if not force and self._checked_at is not None and now - self._checked_at < self._refresh_seconds:
            return None
        self._checked_at = now
        number = self._store.current_version(RFM_KIND)
        if number is None or number == self.number:
            return None
        version = self._store.get(RFM_KIND, number)
        if version is None or version.payload is None:
            return None  # the pointer moved between the two reads: next refresh
        self.reference = RfmReference.from_json(version.payload, version.id)
        self.number = number
        return number


class RfmScorer:
    """The RFM scoring step on one worker. ``count(name, n)`` gets ``rfm_reference_refresh_failures``."""

    def __init__(self, serving: ServingReference, count: Optional[Callable[[str, int], None]] = None) -> None:
        self.serving = serving
        self._count = count if count is not None else (lambda name, n: None)

    def refresh(self) -> None:
        """Reload the reference if due; a failed read keeps the one loaded (or none)."""
        try:
            loaded = self.serving.refresh()
        except Exception:  # noqa: BLE001 - keep scoring with the cached reference
            self._count("rfm_reference_refresh_failures", 1)
            _LOG.warning("reading the RFM reference failed; scoring with the cached one", exc_info=True)
            return
        if loaded is not None:
            _LOG.info("RFM reference %s serving", self.serving.reference.version)

    def score(self, profile: Mapping[str, Any]) -> dict:
        return score_profile(profile, self.serving.reference)

    def score_update(self, update: ProfileUpdate) -> ProfileUpdate:
        """Both sides of ``update`` scored (as ``enrich_update`` enriches both)."""
        previous = self.score(update.previous) if update.previous else None
        return ProfileUpdate(previous, self.score(update.current))
