"""The fuzzer's regression corpus replayed: every past finding stays fixed (docs/security.md "Fuzzing").

Each file of tests/fuzz/corpus/ is one Kafka record as the fuzzer
(tests/fuzz/fuzz_decode.py) feeds it, checked by the same function,
``harness.check_record``: decoding raises nothing but a documented rejection,
whose dead letter keeps the raw bytes and encodes; an accepted event is routed
by consent, with no raw identifier left in its free text.
"""
import time
from pathlib import Path

import pytest

from onboardflow.schemas.wire import REASONS
from onboardflow.tests.fuzz.harness import ROUTES, FuzzedPath, check_record, record_from_bytes, record_to_bytes
from onboardflow.tests.fuzz.seeds import seed_records

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file())
FINDINGS = [p for p in FILES if p.name.startswith("finding-")]


@pytest.fixture(scope="module")
def path():
    return FuzzedPath()


def test_the_corpus_is_small_and_holds_every_finding():
    assert 20 <= len(FILES) <= 400
    assert all(p.stat().st_size <= 65536 for p in FILES) and sum(p.stat().st_size for p in FILES) <= 256 * 1024
    assert [p.name[:10] for p in FINDINGS] == [f"finding-{i:02d}" for i in range(1, len(FINDINGS) + 1)]


@pytest.mark.parametrize("corpus_file", FILES, ids=[p.name for p in FILES])
def test_every_corpus_input_keeps_the_properties_in_well_under_the_fuzzers_timeout(path, corpus_file):
    started = time.process_time()
    assert check_record(path, record_from_bytes(corpus_file.read_bytes())) in set(REASONS) | ROUTES
    # The fuzzer's timeout is 5 s; finding 04 took 7.5 s before its fix, a few ms after.
    assert time.process_time() - started < 2.0


def test_the_corpus_reaches_every_decode_reason_and_every_consent_route(path):
    outcomes = {check_record(path, record_from_bytes(p.read_bytes())) for p in FILES}
    assert set(REASONS) | {"personalization", "analytics_only", "consent_filtered"} <= outcomes


def test_every_seed_keeps_the_properties(path):
    outcomes = [check_record(path, record_from_bytes(data)) for _, data in seed_records()]
    assert "personalization" in outcomes and "not_framed" in outcomes


def test_the_envelope_round_trips_and_any_bytes_make_a_record():
    record = record_from_bytes(record_to_bytes(b"acct-1", b"\x00\x00\x00\x00\x02", -1))
    assert (record.key, record.value, record.timestamp_ms) == (b"acct-1", b"\x00\x00\x00\x00\x02", -1)
    none = record_from_bytes(record_to_bytes(None, None, 5))
    assert (none.key, none.value, none.timestamp_ms) == (None, None, 5)
    assert record_from_bytes(b"\x07ab").value == b"\x07ab"
