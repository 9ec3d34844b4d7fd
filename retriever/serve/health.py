"""The start-up check of the served indexes: every file's SHA-256 against its manifest.

Hashing reads every byte (seconds per GB), so it runs in a background thread while the server
already answers; an index found damaged is then refused (503) rather than searched, because a
flipped byte in its vectors gives plausible but wrong answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from retriever.errors import RetrieverError

CHECKING, OK, DAMAGED, UNCHECKED = "checking", "ok", "damaged", "unchecked"


def default_verifier() -> Callable[[Path], None] | None:
    """`retriever.index.verify.verify_index`, or None where this install lacks it."""
    try:
        from retriever.index.verify import verify_index
    except ImportError:
        return None
    return verify_index


class IndexHealth:
    """What the start-up check found for each served index, by name.

    Args:
        paths: each served name with the index directories behind it (none for a generator).
        verify: raises a RetrieverError naming the damaged file; None skips the check.
    """

    def __init__(self, paths: dict[str, list[Path]], verify: Callable[[Path], None] | None):
        self.paths, self.verify = paths, verify
        self._state: dict[str, tuple[str, str | None]] = {
            name: (CHECKING if verify and dirs else UNCHECKED, None) for name, dirs in paths.items()
        }
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin checking in a daemon thread (it must not keep a stopping server alive)."""
        if self.verify is None or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._check_all, name="retriever-verify", daemon=True)
        self.thread.start()

    def _check_all(self) -> None:
        verify = self.verify
        assert verify is not None
        for name, dirs in self.paths.items():
            state: str = OK
            detail: str | None = None
            for path in dirs:
                try:
                    verify(path)
                except (RetrieverError, OSError) as e:
                    state, detail = DAMAGED, str(e)
                    break
                except Exception as e:  # a bug in the check must not read as damage, nor kill the thread
                    state, detail = UNCHECKED, f"the check failed: {type(e).__name__}: {e}"
                    break
            with self._lock:
                self._state[name] = (state, detail)

    def problem(self, name: str) -> str | None:
        """The damage found in index `name`, or None (also while it is still being checked)."""
        with self._lock:
            state, detail = self._state.get(name, (UNCHECKED, None))
        return detail if state == DAMAGED else None

    def report(self) -> dict[str, dict]:
        """`{name: {"state": ..., "detail": ...}}` for /healthz."""
        with self._lock:
            return {
                name: {"state": state, **({"detail": detail} if detail else {})}
                for name, (state, detail) in self._state.items()
            }
