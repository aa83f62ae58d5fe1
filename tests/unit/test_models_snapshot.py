"""models/snapshot.py: model bytes carry their kind and format, and refuse the wrong ones."""
import base64
import math
import zlib

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


def test_a_portable_snapshot_is_zlib_json_behind_the_same_header():
    doc = {"kind": "propensity", "weights": [0.1, -2.5e-300], "n": 3}
    data = snapshot.dump_json("propensity", doc)
    assert snapshot.format_of(data) == snapshot.PORTABLE_FORMAT
    assert snapshot.load("propensity", data) == doc
    with pytest.raises(snapshot.SnapshotError, match="propensity"):
        snapshot.load("segmenter", data)
    assert snapshot.format_of(snapshot.dump("segmenter", doc)) == snapshot.FORMAT_VERSION


def test_non_finite_numbers_are_refused_rather_than_written_as_non_json():
    with pytest.raises(ValueError, match="propensity snapshot"):
        snapshot.dump_json("propensity", {"w": float("inf")})


def test_a_portable_body_that_is_not_a_json_object_is_corrupt():
    head = snapshot.dump_json("propensity", {})[: len(snapshot.MAGIC) + 2 + len("propensity")]
    for body in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        with pytest.raises(snapshot.SnapshotError, match="corrupt"):
            snapshot.load("propensity", head + zlib.compress(body))


def test_packed_arrays_round_trip_exactly_little_endian():
    values = [0.1, -0.0, 1e308, 5e-324, math.inf, -math.inf]
    back = snapshot.unpack_floats(snapshot.pack_floats(values))
    assert list(back) == values and math.copysign(1, back[1]) == -1
    assert math.isnan(snapshot.unpack_floats(snapshot.pack_floats([math.nan]))[0])
    ints = [0, -1, 1_767_571_200_000, 2 ** 63 - 1]
    assert list(snapshot.unpack_ints(snapshot.pack_ints(ints))) == ints
    assert base64.b64decode(snapshot.pack_ints([1])) == b"\x01" + b"\x00" * 7
