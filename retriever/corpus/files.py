"""Checking that an input path is an ordinary, readable file before anything reads it whole.

A FIFO, `/dev/zero` or a symlink to either never ends, so hashing or reading it hangs; a directory
or an unreadable file only fails deep inside a reader. These checks use `stat` (which never blocks)
and one short read, so a typo costs milliseconds, not a model load.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path

from retriever.errors import CorpusError

SAMPLE_BYTES = 1 << 16

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# Signatures of files people hand in by mistake (compressed, images, documents).
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive (or .xlsx); extract or export it as text first"),
    (b"BZh", "bzip2-compressed; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first (unzstd)"),
    (b"\x89PNG", "a PNG image, not text"),
    (b"\xff\xd8\xff", "a JPEG image, not text"),
    (b"%PDF", "a PDF document, not text"),
)
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def check_regular_file(path: str | Path, what: str = "input") -> os.stat_result:
    """`os.stat(path)` after checking it is an ordinary file (symlinks followed).

    Raises:
        CorpusError: missing path, broken symlink, directory, FIFO, device or socket; the
            message names the path and what to give instead.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CorpusError(
                f"{path}: broken symlink (it points to {os.readlink(path)}, which does not exist); "
                f"fix the link or give the {what} file itself"
            ) from None
        raise CorpusError(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise CorpusError(
            f"{path}: permission denied while looking it up; check the permissions of the folders above it"
        ) from None
    except OSError as e:  # symlink loops, names too long, I/O errors
        raise CorpusError(f"{path}: cannot be read ({e.strerror or e}); give an ordinary {what} file") from None
    if stat.S_ISDIR(st.st_mode):
        raise CorpusError(f"{path}: is a directory; give the {what} file inside it")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not an ordinary file")
        target = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise CorpusError(
            f"{path}{target}: is {kind}, not an ordinary file; save the {what} to a file first and give that"
        )
    return st


def read_sample(path: str | Path, what: str = "input", size: int = SAMPLE_BYTES) -> bytes:
    """The first `size` bytes of an ordinary, readable, non-empty file (see `check_regular_file`).

    Raises:
        CorpusError: not an ordinary file, unreadable, or empty.
    """
    path = Path(path)
    st = check_regular_file(path, what)
    if st.st_size == 0:
        raise CorpusError(f"{path}: empty file (0 bytes); give the {what} file with its content")
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except PermissionError:
        raise CorpusError(f"{path}: permission denied; make it readable (chmod u+r) or run as its owner") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot be read ({e.strerror or e})") from None


def sniff_text(path: str | Path, sample: bytes, what: str = "text file") -> None:
    """Refuse a sample that is plainly not UTF-8 text: compressed, an image, UTF-16/32 or binary.

    Raises:
        CorpusError: naming the file, what it looks like, and how to turn it into UTF-8 text.
    """
    for bom, encoding in _BOMS:
        if sample.startswith(bom):
            raise CorpusError(
                f"{path}: is {encoding} text; save it as UTF-8 (e.g. iconv -f {encoding} -t UTF-8 {Path(path).name})"
            )
    for magic, looks in _MAGIC:
        if sample.startswith(magic):
            raise CorpusError(f"{path}: is {looks}; give a UTF-8 {what}")
    if sample.startswith(b"PAR1"):
        raise CorpusError(f"{path}: is a parquet file; name it .parquet")
    nuls = sample.count(0)
    if nuls * 10 > len(sample) * 3:  # UTF-16 ASCII is half NULs; a stray NUL line is not
        raise CorpusError(
            f"{path}: looks binary ({100 * nuls // len(sample)}% NUL bytes in its first "
            f"{len(sample)} bytes), or UTF-16 without a byte-order mark; give a UTF-8 {what}"
        )
