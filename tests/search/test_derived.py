"""DerivedValues: computed once per live object, never for a dead one's successor, pins nothing."""

import gc
import weakref

import numpy as np
import pyarrow as pa

from retriever.search.derived import DerivedValues


def test_computed_once_per_object_and_key():
    cache, calls = DerivedValues(size=4), []
    a = np.arange(3)
    make = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert cache.get(a, make) == cache.get(a, make) == 1
    assert cache.get(a, make, key="other") == 2 and cache.get(a.copy(), make) == 3


def test_the_cache_keeps_no_table_alive_and_a_new_one_is_computed_afresh():
    cache = DerivedValues(size=4)
    table = pa.table({"x": [1, 2, 3]})
    alive = weakref.ref(table)
    assert cache.get(table, lambda: "first") == "first"
    del table
    gc.collect()
    assert alive() is None  # not pinned by the cache
    for _ in range(20):  # new tables may reuse the dead one's id; none may get its value
        assert cache.get(pa.table({"x": [4]}), lambda: "new") == "new"


def test_the_least_recently_used_entries_go_first():
    cache = DerivedValues(size=2)
    objects = [np.zeros(1) for _ in range(3)]
    cache.get(objects[0], lambda: 0)
    cache.get(objects[1], lambda: 1)
    assert cache.get(objects[0], lambda: "again") == 0  # used again: now the most recent
    cache.get(objects[2], lambda: 2)  # evicts objects[1]
    assert cache.get(objects[0], lambda: "again") == 0
    assert cache.get(objects[1], lambda: "again") == "again"
    assert cache.get([1, 2], lambda: "list") == "list"  # not weakly referenceable: held instead
