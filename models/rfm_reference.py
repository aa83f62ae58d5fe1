"""The RFM population reference: quintile boundaries of recency, frequency and monetary value.

In: the profiles of a population (the profile store's, ``ProfileSweep.population``),
each with the raw RFM fields ``transforms/rfm.py`` folds (``rfm_frequency``,
``rfm_monetary``, ``rfm_last_purchase_at``). Out: an ``RfmReference``, whose
``score(profile)`` gives the profile's quintile scores 1..5, and whose JSON
(``to_json``, no pickle: both engines' virtualenvs read it, whatever their
numpy or River) is published to the model registry as kind ``rfm``
(``onboardflow rfm refresh``, runners/cli/rfm.py; docs/rfm.md).

Who is scored: *buyers*, profiles with at least one purchase. The boundaries
come from the buyers alone (RFM ranks customers against customers); a profile
without a purchase gets no scores (null), and neither does any profile before a
reference is published.

Boundaries: for each dimension, the four nearest-rank quantiles at 20, 40, 60
and 80 % of the buyers' sorted values (``b_k = v[ceil(k * n / 5) - 1]``, an
observed value, so ties stay ties). Bins are closed on the right: a value ``x``
is in bin ``1 + #{k : x > b_k}``. That bin is the F and M score (more is
better); the R score is ``6 - bin`` of the recency in days (more recent is
better). Recency in the reference is measured at one instant for everyone, the
newest ``as_of`` of the population, so a buyer whose profile went quiet earlier
is not ranked as more recent than they are; a profile is scored with its own
recency as of its ``as_of``.

>>> population = [{"rfm_frequency": f, "rfm_monetary": 10.0 * f, "rfm_last_purchase_at": 86_400_000 * f,
...                "as_of": 864_000_000} for f in range(1, 11)]
>>> ref = fit_reference(population)
>>> ref.frequency, ref.recency_days
((2, 4, 6, 8), (1.0, 3.0, 5.0, 7.0))
>>> ref.score({"rfm_frequency": 9, "rfm_monetary": 15.0, "rfm_recency_days": 0.5})
{'rfm_r': 5, 'rfm_f': 5, 'rfm_m': 1}
>>> ref.score({"rfm_frequency": 0, "rfm_monetary": 0.0, "rfm_recency_days": None})
{'rfm_r': None, 'rfm_f': None, 'rfm_m': None}
>>> RfmReference.from_json(ref.to_json()) == ref
True
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

from ..schemas.units import DAY_MS

#: The registry kind the reference is published as (models/model_registry, version ids ``rfm-000001``).
RFM_KIND = "rfm"
FORMAT = 1
#: Fewer buyers than this give no reference: quintiles of a handful of values rank nobody.
MIN_POPULATION = 5
QUANTILES = (1, 2, 3, 4)  # of 5


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def boundaries(values: list) -> tuple:
    """The four nearest-rank quintile boundaries of ``values`` (not empty)."""
    ordered = sorted(values)
    n = len(ordered)
    return tuple(ordered[math.ceil(k * n / 5) - 1] for k in QUANTILES)


def quintile(value: float, bounds: tuple) -> int:
    """1..5: ``1 + #{k : value > bounds[k]}`` (bins closed on the right)."""
    return 1 + sum(1 for b in bounds if value > b)


@dataclass(frozen=True)
class RfmReference:
    """Quintile boundaries of one population of buyers (module docstring).

    ``version`` is the registry's version id (``rfm-000003``) once published; it is
    not part of the JSON, so the same population gives the same payload (and the
    registry, which identifies versions by the payload's SHA-256, the same version).
    """

    recency_days: tuple
    frequency: tuple
    monetary: tuple
    population: int
    as_of: int
    version: Optional[str] = None

    def score(self, profile: Mapping[str, Any]) -> dict:
        """``rfm_r``, ``rfm_f``, ``rfm_m`` of ``profile`` (all None for a profile without a purchase)."""
        frequency = _number(profile.get("rfm_frequency"))
        monetary = _number(profile.get("rfm_monetary"))
        recency = _number(profile.get("rfm_recency_days"))
        if not frequency or monetary is None or recency is None:
            return {"rfm_r": None, "rfm_f": None, "rfm_m": None}
        return {"rfm_r": 6 - quintile(recency, self.recency_days), "rfm_f": quintile(frequency, self.frequency),
                "rfm_m": quintile(monetary, self.monetary)}

    def to_json(self) -> bytes:
        """The portable payload (sorted keys, no version): what the registry stores."""
        body = {"format": FORMAT, "recency_days": list(self.recency_days), "frequency": list(self.frequency),
                "monetary": list(self.monetary), "population": self.population, "as_of": self.as_of}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes, version: Optional[str] = None) -> "RfmReference":
        """The reference in ``payload``; ``ValueError`` for anything but a well-formed format-1 one."""
        body = json.loads(payload)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError("not an RFM reference of format 1")
        bounds = {}
        for name in ("recency_days", "frequency", "monetary"):
            values = body.get(name)
            if (not isinstance(values, list) or len(values) != len(QUANTILES)
                    or any(_number(v) is None for v in values) or values != sorted(values)):
                raise ValueError(f"RFM reference {name}: four ascending numbers expected")
            bounds[name] = tuple(values)
        return cls(bounds["recency_days"], bounds["frequency"], bounds["monetary"], int(body["population"]),
                   int(body["as_of"]), version)

    def with_version(self, version: Optional[str]) -> "RfmReference":
        return replace(self, version=version)

    def describe(self) -> dict:
        """Boundaries and population as plain values (the registry's metrics, the demo's summary)."""
        return {"population": self.population, "recency_days": list(self.recency_days),
                "frequency": list(self.frequency), "monetary": list(self.monetary)}


def fit_reference(profiles: Iterable[Mapping[str, Any]],
                  min_population: int = MIN_POPULATION) -> Optional[RfmReference]:
    """The reference of the buyers among ``profiles``; None with fewer than ``min_population`` buyers.

    Profiles without a purchase, or whose RFM fields are missing or malformed, are
    left out. Deterministic: the same profiles, in any order, give the same reference.
    """
    buyers = []
    for profile in profiles:
        frequency = _number(profile.get("rfm_frequency"))
        monetary = _number(profile.get("rfm_monetary"))
        last = profile.get("rfm_last_purchase_at")
        as_of = profile.get("as_of")
        if frequency and frequency > 0 and monetary is not None and isinstance(last, int) \
                and isinstance(as_of, int) and not isinstance(last, bool):
            buyers.append((frequency, monetary, last, as_of))
    if not buyers or len(buyers) < max(1, min_population):
        return None
    at = max(b[3] for b in buyers)
    return RfmReference(
        recency_days=boundaries([max(0, at - last) / DAY_MS for _, _, last, _ in buyers]),
        frequency=boundaries([b[0] for b in buyers]),
        monetary=boundaries([b[1] for b in buyers]),
        population=len(buyers), as_of=at)
