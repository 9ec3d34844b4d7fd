"""A few values derived from large objects (a column prepared for filtering, a value's rows, a
mask packed as a bitmap), kept by the identity of the object they came from, for the last few.

Masks and tables are not hashable by content, and hashing a million rows would cost what the
cache saves. An entry holds a weak reference to its object, so the cache keeps no index's table
alive, and an entry whose object died never answers for a new object given the same id. Safe to
share between a server's threads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any


class DerivedValues:
    """`get(obj, make, key)`: `make()` for `obj` (and `key`), computed once while it is cached;
    the least recently used entries are dropped first."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[tuple[int, Hashable], tuple[Callable[[], Any], Any]] = {}
        self._lock = threading.Lock()

    def get(self, obj: Any, make: Callable[[], Any], key: Hashable = None) -> Any:
        slot = (id(obj), key)
        with self._lock:
            hit = self._entries.pop(slot, None)
            if hit is not None and hit[0]() is obj:
                self._entries[slot] = hit  # last again: the least recently used go first
                return hit[1]
        value = make()  # outside the lock: two threads may both compute it, never wait on it
        try:
            ref: Callable[[], Any] = weakref.ref(obj)
        except TypeError:  # lists and the like: held, so their id cannot be reused while cached
            ref = lambda: obj  # noqa: E731
        with self._lock:
            self._entries.pop(slot, None)  # another thread's, computed meanwhile
            self._entries[slot] = (ref, value)
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]
        return value
