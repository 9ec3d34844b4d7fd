"""A few values derived from large objects (a mask's bitmap, a column read as numbers), kept by
the identity of the object they came from, for the last few objects.

Masks and tables are not hashable by content, and hashing a million rows would cost what the
cache saves. An entry holds its object, so the object's id cannot be reused while it is cached.
Safe to share between a server's threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class DerivedValues:
    """`get(obj, make, key)`: `make()` for `obj` (and `key`), computed once while it is cached."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[tuple[int, Hashable], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, obj: Any, make: Callable[[], Any], key: Hashable = None) -> Any:
        slot = (id(obj), key)
        with self._lock:
            hit = self._entries.get(slot)
        if hit is not None and hit[0] is obj:
            return hit[1]
        value = make()  # outside the lock: two threads may both compute it, never wait on it
        with self._lock:
            self._entries[slot] = (obj, value)
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]
        return value
