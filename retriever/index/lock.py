"""One build at a time per index: an exclusive lock beside the index directory.

    .NAME.lock   flock(2)-locked by the build writing NAME and .NAME.building; holds its pid

The kernel drops an flock when its process dies, however it dies (kill -9 included), so a lock
is never stale: a lock file left by a killed build is simply taken by the next one.
"""

from __future__ import annotations

import os
from pathlib import Path

from retriever.errors import IndexFormatError


def lock_path(out: Path) -> Path:
    """The lock file guarding the index `out` and its work directories."""
    return out.parent / f".{out.name}.lock"


class BuildLock:
    """An exclusive, non-blocking lock on the index `out`; use as a context manager.

    Raises IndexFormatError naming the holder's pid when another process holds it.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None

    def acquire(self) -> BuildLock:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                raise IndexFormatError(
                    f"{self.path}: cannot be used as the build lock ({e.strerror}); "
                    "move it away, or choose another --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise IndexFormatError(
                    f"another build is writing to {self.out.name} (pid {holder}); wait for it "
                    f"to finish, or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us unlinks the file on release: if we locked an unlinked file,
            # a third process may hold the new one, so start again on whatever is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still held, so no one locks a dead file
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(out: str | Path) -> None:
    """Raise IndexFormatError if a build holds the lock on `out` now (a cheap early check)."""
    out = Path(out)
    if os.path.lexists(lock_path(out)) and out.parent.is_dir():
        with BuildLock(out):
            pass


def is_locked(out: str | Path) -> bool:
    """Whether a live build holds the lock on `out`."""
    try:
        check_unlocked(out)
    except IndexFormatError as e:
        return "another build" in str(e)  # otherwise the lock file is unusable: no build of ours writes there
    return False


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
