"""models/snapshot.py: model bytes carry their kind and format, and refuse the wrong ones."""
import pytest

from onboardflow.models import snapshot


def test_round_trip_returns_equal_state():
    state = {"centres": [[0.5, 1.0]], "n": 3}
    assert snapshot.load("segmenter", snapshot.dump("segmenter", state)) == state


def test_wrong_kind_is_refused_by_name():
    data = snapshot.dump("propensity", {"n": 1})
    with pytest.raises(snapshot.SnapshotError, match="propensity"):
        snapshot.load("segmenter", data)


@pytest.mark.parametrize("data", [b"", b"not a snapshot", snapshot.MAGIC + bytes([99, 1]) + b"x"])
def test_foreign_or_unknown_format_bytes_are_refused(data):
    with pytest.raises(snapshot.SnapshotError):
        snapshot.load("segmenter", data)


def test_corrupt_body_is_refused_not_crashing():
    data = snapshot.dump("segmenter", {"n": 1})
    with pytest.raises(snapshot.SnapshotError, match="corrupt"):
        snapshot.load("segmenter", data[:-4] + b"\x00\x00\x00\x00")
