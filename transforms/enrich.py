"""Account enrichment: profiles joined with the account reference data (plans, tiers).

The reference data is the warehouse's ``accounts`` table: small, slowly
changing, and owned by another system, read whole into a dict
``{account_id: {plan, account_tier, industry, company_size}}``. Engine-free:

* ``enrich_profile(profile, accounts)`` -> the profile with the account fields,
  and whether the account was found;
* ``enrich_update(update, accounts)`` does it for both sides of a
  ``ProfileUpdate`` (``schemas/records.py``);
* ``AccountsCache`` is the worker-side copy of the table for streaming runs,
  re-read every ``refresh_seconds``; a failed re-read keeps the previous
  table (the first read must succeed).

``pipelines/beam/enrich.py`` (``EnrichProfiles``) runs it in Beam, with the
table as a side input in a bounded replay and as the cache in streaming (why
not a slowly updating side input: docs/decisions.md "transforms/enrich.py").

A profile whose account is missing from the table (or that has no account yet)
is enriched with documented defaults, never dropped: ``plan`` falls back to the
plan the user chose at signup, else ``"free"``; ``account_tier`` and
``industry`` to ``"unknown"``; ``company_size`` (a number of employees, the
table's integer column) stays null. The fields and their types are the profile
contract's (schemas/contract.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from ..schemas.records import ProfileUpdate

ACCOUNT_FIELDS = ("plan", "account_tier", "industry", "company_size")
DEFAULTS = {"plan": "free", "account_tier": "unknown", "industry": "unknown", "company_size": None}

Accounts = Mapping[str, Mapping[str, Any]]


def enrich_profile(profile: Mapping[str, Any], accounts: Accounts) -> tuple[dict, bool]:
    """Return the profile with account fields, and whether the reference was found."""
    out = dict(profile)
    ref = accounts.get(profile.get("account_id") or "")
    for name in ACCOUNT_FIELDS:
        value = ref.get(name) if ref else None
        if value is None:
            value = out.get("signup_plan") if name == "plan" and out.get("signup_plan") else DEFAULTS[name]
        out[name] = value
    return out, ref is not None


def enrich_update(update: ProfileUpdate, accounts: Accounts) -> tuple[ProfileUpdate, bool]:
    """Both sides of ``update`` enriched, and whether the current profile's account was found."""
    current, found = enrich_profile(update.current, accounts)
    previous = enrich_profile(update.previous, accounts)[0] if update.previous else None
    return ProfileUpdate(previous, current), found


class AccountsCache:
    """A worker's copy of the accounts table, re-read at most every ``refresh_seconds``.

    ``load`` returns the table; ``clock`` is monotonic seconds (injected in tests).
    """

    def __init__(self, load: Callable[[], Accounts], refresh_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self.accounts: Optional[Accounts] = None
        self._loaded_at: Optional[float] = None

    def refresh(self) -> bool:
        """Re-read the table when it is due; False when a due re-read failed (the old table stays).

        The first read's failure is raised: there is nothing to serve yet.
        """
        now = self._clock()
        if self._loaded_at is not None and now - self._loaded_at < self._refresh_seconds:
            return True
        ok = True
        try:
            self.accounts = self._load()
        except Exception:  # noqa: BLE001 - keep serving the last good table; the first read must succeed
            if self.accounts is None:
                raise
            ok = False
        self._loaded_at = now
        return ok
