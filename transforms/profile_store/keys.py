"""The key names of the Redis profile store for one prefix (docs/redis-contract.md).

::

    {prefix}:profile:{user_key}   hash, one field per profile field
    {prefix}:segment:{segment}    set of user_keys currently in the segment
    {prefix}:outbox:{name}        outbox streams (transforms/outbox/)
    {prefix}:erased               set of erased user_keys: no profile write applies to them
    {prefix}:erased:version       counter of erasures (readers of the set reload it when it moves)
    {prefix}:stitched:{user_key}  a visitor retired into an account: the account's user_key; no profile
                                  write of the visitor applies (transforms/identity.py)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..outbox.keys import OutboxKeys

DEFAULT_KEY_PREFIX = "obf"
_KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ProfileKeys:
    """The key names of the contract for one prefix; a prefix with glob or ':' characters is refused."""

    prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _KEY_PREFIX_RE.match(self.prefix):
            # Glob characters would break SCAN patterns and ':' the layout.
            raise ValueError("key prefix must be non-empty and use only letters, digits, '_', '.', '-'")

    @property
    def profile_prefix(self) -> str:
        return f"{self.prefix}:profile:"

    @property
    def segment_prefix(self) -> str:
        return f"{self.prefix}:segment:"

    def profile(self, user_key: str) -> str:
        return self.profile_prefix + user_key

    def segment(self, segment: str) -> str:
        return self.segment_prefix + segment

    @property
    def erased(self) -> str:
        """The set of erased user_keys (transforms/erasure.py): the upsert script writes none of them."""
        return f"{self.prefix}:erased"

    @property
    def erased_version(self) -> str:
        """A counter every erasure increments: readers of ``erased`` reload it when it moved."""
        return f"{self.prefix}:erased:version"

    def stitched(self, user_key: str) -> str:
        """Marker of a visitor retired into an account (its value: the account's user_key)."""
        return f"{self.prefix}:stitched:{user_key}"

    def outbox(self, name: str) -> str:
        """The outbox stream ``name`` (transforms/outbox/) under this prefix."""
        return OutboxKeys(self.prefix).stream(name)
