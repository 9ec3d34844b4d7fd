"""Where an index may be written, and putting a finished one in place so readers see the old
index or the new one, never neither.

Beside the index NAME live, at most:

    .NAME.lock                  the build lock (see lock.py)
    .NAME.building/             shards of a build in progress (see shards.py)
    .NAME.new-XXXXXXXX.tmp/     a complete index waiting to be published, or the old one after the swap
    .NAME.old/                  the old index while the fallback publish swaps (non-Linux only)

On Linux the new directory and the old one are exchanged by one renameat2(RENAME_EXCHANGE),
which is atomic. Elsewhere the old index is renamed to .NAME.old and the new one into place;
a process killed between the two renames leaves .NAME.old, which the next build or the next
reader puts back. Only directories that are recognisably ours are ever deleted or replaced.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from retriever.errors import IndexFormatError

MANIFEST = "manifest.json"
INDEX_FILES = frozenset({"manifest.json", "index.faiss", "texts.parquet", "vectors.f16.npy", "index.ivfdata"})
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def resolve_out(out: str | Path) -> Path:
    """`out` with a symlink resolved (the index replaces the directory, not the link)."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def describe_contents(path: Path, limit: int = 3) -> str:
    """'holds 12 files, e.g. thesis.pdf, a.jpg' for an error message."""
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        return f"cannot be listed: {e.strerror}"
    if not names:
        return "is empty"
    shown = ", ".join(names[:limit])
    return f"holds {len(names)} file{'s' if len(names) != 1 else ''}, e.g. {shown}"


def _has_our_manifest(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def is_index_dir(path: Path) -> bool:
    """Whether `path` is a directory that a build of ours wrote: only index files, among them a
    manifest with our format key, or a manifest beside index.faiss (a damaged index is still ours)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    if MANIFEST not in names or not names <= INDEX_FILES:
        return False
    return "index.faiss" in names or _has_our_manifest(path)


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Raise IndexFormatError unless an index may be written at `out`; returns the path to use.

    An existing index is replaced only with `overwrite`; an empty directory may be used; anything
    else (a file, a folder holding other things) is refused, saying what is there.
    """
    out = resolve_out(out)
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise IndexFormatError(f"{out}: {parent} is a file, not a folder; choose another --out")
    if not out.exists():
        return out
    if not out.is_dir():
        raise IndexFormatError(f"{out}: not an index (a file is there); choose another --out")
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise IndexFormatError(f"{out}: cannot be listed ({e.strerror}); choose another --out") from None
    if not names:
        return out
    if is_index_dir(out):
        if not overwrite:
            raise IndexFormatError(f"{out} already exists (use --overwrite to replace it)")
        return out
    extra = [name for name in names if name not in INDEX_FILES]
    if _has_our_manifest(out) and extra:
        raise IndexFormatError(
            f"{out}: an index that also holds other files ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); move them out, or choose another --out"
        )
    raise IndexFormatError(f"{out}: not an index ({describe_contents(out)}); choose another --out")


def new_temp_dir(out: Path) -> Path:
    """An empty directory beside `out`, with ordinary permissions, to write the next index into."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an index is an ordinary directory
    return tmp


def leftovers(out: Path) -> list[Path]:
    """Temporary index directories of `out` left by killed builds (ours by name and content)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.new-[A-Za-z0-9_]{{8}}\.tmp")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    return [
        p
        for p in entries
        if pattern.fullmatch(p.name)
        and p.is_dir()
        and not p.is_symlink()
        and {c.name for c in p.iterdir()} <= INDEX_FILES
    ]


def old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def recover(out: Path) -> None:
    """Undo what a killed publish left (call holding the build lock): put `.NAME.old` back if
    NAME is missing, and remove stale temporary index directories."""
    old = old_dir(out)
    if is_index_dir(old):
        if not out.exists():
            os.rename(old, out)
        else:
            shutil.rmtree(old)
    for tmp in leftovers(out):
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Put the complete index `tmp` at `out`, replacing (and then deleting) any index there.

    Call holding the build lock, after `check_out`.
    """
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old index
    else:
        old = old_dir(out)
        if os.path.lexists(old):
            if not is_index_dir(old):
                raise IndexFormatError(
                    f"{old}: not an index ({describe_contents(old) if old.is_dir() else 'a file'})"
                    f"; move it away, it is where {out.name} is kept while being replaced"
                )
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out.parent)


def wait_for_publish(path: Path, timeout: float = 5.0) -> None:
    """For readers: if `path` is missing because a publish was killed (or is between its two
    renames), wait for it or put the old index back. Does nothing when `path` exists."""
    from retriever.index.lock import BuildLock, is_locked

    if path.exists() or not is_index_dir(old_dir(path)):
        return
    deadline = time.monotonic() + timeout
    while is_locked(path) and time.monotonic() < deadline:
        time.sleep(0.02)  # a live build is between its renames: microseconds
        if path.exists():
            return
    try:
        with BuildLock(path):
            if not path.exists() and is_index_dir(old_dir(path)):
                os.rename(old_dir(path), path)
    except (OSError, IndexFormatError):
        pass  # read-only folder, or a build started meanwhile: the caller reports what it finds


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
