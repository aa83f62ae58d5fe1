"""StateCache: a keyed operator's cell values, read once per key, least recently used dropped first."""
from onboardflow.pipelines.flink.state_cache import StateCache


def test_a_miss_loads_once_and_a_write_replaces_the_value():
    cache, loads = StateCache(10), []

    def load():
        loads.append(1)
        return ("primitive", 1)

    assert cache.read("u1", load) == ("primitive", 1)
    assert cache.read("u1", load) == ("primitive", 1)
    assert len(loads) == 1
    cache.put("u1", None)  # the cell was cleared
    assert cache.read("u1", load) is None
    assert len(loads) == 1


def test_the_least_recently_used_key_is_dropped_and_read_again_from_the_cell():
    cache = StateCache(2)
    cells = {"a": 1, "b": 2, "c": 3}
    reads = []

    def loader(key):
        def load():
            reads.append(key)
            return cells[key]
        return load

    cache.read("a", loader("a"))
    cache.read("b", loader("b"))
    cache.read("a", loader("a"))  # a is now the most recent
    cache.read("c", loader("c"))  # drops b
    assert "b" not in cache and "a" in cache and "c" in cache
    cells["b"] = 20
    assert cache.read("b", loader("b")) == 20
    assert reads == ["a", "b", "c", "b"]
