"""Account enrichment: reference fields joined in, documented defaults, the worker-side cache."""
import pytest

from onboardflow.schemas.records import ProfileUpdate
from onboardflow.transforms.enrich import AccountsCache, enrich_profile, enrich_update

ACCOUNTS = {"acct-1": {"plan": "team", "account_tier": "enterprise", "industry": "retail", "company_size": 120}}


def test_a_known_account_fills_in_its_plan_tier_industry_and_size():
    profile, found = enrich_profile({"user_key": "k", "account_id": "acct-1", "signup_plan": "trial"}, ACCOUNTS)
    assert found
    assert (profile["plan"], profile["account_tier"], profile["industry"], profile["company_size"]) == (
        "team", "enterprise", "retail", 120)
    assert profile["user_key"] == "k"


def test_an_unknown_or_missing_account_gets_the_signup_plan_else_free_unknown_labels_and_no_size():
    signed_up, found = enrich_profile({"account_id": "acct-9", "signup_plan": "trial"}, ACCOUNTS)
    assert not found
    assert (signed_up["plan"], signed_up["account_tier"], signed_up["industry"]) == ("trial", "unknown", "unknown")
    visitor, found = enrich_profile({}, ACCOUNTS)
    assert not found and visitor["plan"] == "free" and visitor["company_size"] is None


def test_a_null_reference_field_falls_back_like_a_missing_one():
    profile, found = enrich_profile({"account_id": "a"}, {"a": {"plan": None, "account_tier": "smb"}})
    assert found and profile["plan"] == "free" and profile["account_tier"] == "smb"


def test_enrichment_leaves_the_input_untouched_and_enriches_both_sides_of_an_update():
    previous, current = {"account_id": "acct-1"}, {"account_id": "acct-1", "events_total": 2}
    update, found = enrich_update(ProfileUpdate(previous, current), ACCOUNTS)
    assert found and update.previous["plan"] == update.current["plan"] == "team"
    assert "plan" not in previous and "plan" not in current
    first, _ = enrich_update(ProfileUpdate(None, current), ACCOUNTS)
    assert first.previous is None


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_the_cache_rereads_only_when_due_and_keeps_the_last_good_table_when_a_reread_fails():
    tables = [{"a": {"plan": "free"}}, RuntimeError("warehouse down"), {"a": {"plan": "pro"}}]
    reads = []

    def load():
        reads.append(1)
        item = tables[len(reads) - 1]
        if isinstance(item, Exception):
            raise item
        return item

    clock = Clock()
    cache = AccountsCache(load, refresh_seconds=60, clock=clock)
    assert cache.refresh() and cache.accounts["a"]["plan"] == "free"
    clock.now = 59
    assert cache.refresh() and len(reads) == 1          # not due yet
    clock.now = 61
    assert not cache.refresh()                          # due, failed: the old table stays
    assert cache.accounts["a"]["plan"] == "free"
    clock.now = 100
    assert cache.refresh() and len(reads) == 2          # a failed read also waits a period
    clock.now = 122
    assert cache.refresh() and cache.accounts["a"]["plan"] == "pro"


def test_the_first_read_of_the_cache_must_succeed():
    def load():
        raise RuntimeError("warehouse down")

    with pytest.raises(RuntimeError):
        AccountsCache(load, refresh_seconds=60, clock=Clock()).refresh()
