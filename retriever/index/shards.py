"""The work directory of a build in progress: numbered shards of fp16 embeddings and metadata.

    .NAME.building/
      state.json            what is being built (corpus hash, model, chunk size): resume only if equal
      meta-00000.parquet    id, text and metadata of chunk 0
      emb-00000.npy         its embeddings, fp16; written last, so its presence marks the chunk done
      trained.index, block-00000.index, index.ivfdata
                            a distributed build's IVF: trained quantizer, one filled block per
                            worker, and the merged on-disk lists (see distributed.py)

Each file is written under a temporary name and renamed, so a shard is either whole or absent,
whatever kills the process. A restarted build skips the chunks whose `emb-*.npy` exists (the
local engine writes them in order; a distributed one in any order, see `finished`).

Each meta file records the build it belongs to (a hash of state.json), its row count and the
SHA-256 of its embeddings; assembly checks all three, so shards written by another build (another
corpus or model, another chunk size) can never end up in an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.errors import IndexFormatError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

_OURS = re.compile(
    r"state\.json|state\.tmp|(meta|emb)-\d{5}\.(parquet|npy|tmp)|block-\d{5}\.(index|tmp)"
    r"|trained\.(index|tmp)|index\.ivfdata|piece-\d{5}\.(parquet|tmp)"
)
_KEY = b"retriever.shard"


def state_key(state: dict) -> str:
    """A short hash naming one build's inputs; every shard of the build carries it."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def _check_ours(path: Path) -> None:
    """Refuse to delete a `.NAME.building` that is not a work directory of ours."""
    if path.is_symlink() or not path.is_dir():
        raise IndexFormatError(f"{path}: not a build work directory (a file or link is there); move it away")
    foreign = sorted(p.name for p in path.iterdir() if not _OURS.fullmatch(p.name))
    if foreign:
        raise IndexFormatError(f"{path}: not a build work directory (it holds {', '.join(foreign[:3])}); move it away")


class ShardDir:
    """Shards of one build, in a directory beside the final index."""

    def __init__(self, path: Path, state: dict):
        self.path = path
        self.state = state

    @classmethod
    def open(cls, out: Path, state: dict) -> tuple[ShardDir, bool]:
        """The work directory for `out`; returns (shards, resumed). Stale work for other inputs is discarded."""
        path = out.parent / f".{out.name}.building"
        state_file = path / "state.json"
        if path.exists() or path.is_symlink():
            _check_ours(path)
        if state_file.is_file():
            try:
                if json.loads(state_file.read_text()) == state:
                    return cls(path, state), True
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        _atomic_write_bytes(state_file, json.dumps(state, indent=2).encode())
        return cls(path, state), False

    def done(self) -> int:
        """Number of complete shards (they are always a prefix: chunks are written in order)."""
        count = 0
        while (self.path / f"emb-{count:05d}.npy").is_file():
            count += 1
        return count

    def finished(self) -> set[int]:
        """Numbers of all complete shards, in any order (a distributed build finishes them out of order)."""
        return {int(p.name[4:9]) for p in self.path.glob("emb-[0-9][0-9][0-9][0-9][0-9].npy")}

    def write(self, number: int, vectors: np.ndarray, table: pa.Table) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        record = {
            "build": state_key(self.state),
            "number": number,
            "rows": len(vectors),
            "sha256": hashlib.sha256(vectors.tobytes()).hexdigest(),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _KEY: json.dumps(record).encode()})
        meta = self.path / f"meta-{number:05d}.parquet"
        tmp = meta.with_suffix(".tmp")
        pq.write_table(table, tmp)
        _fsync_rename(tmp, meta)
        emb = self.path / f"emb-{number:05d}.npy"
        tmp = emb.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors)
        _fsync_rename(tmp, emb)

    def check(self, count: int, d: int) -> None:
        """Raise IndexFormatError unless shards 0..count-1 are whole and all belong to this build."""
        import numpy as np
        import pyarrow.parquet as pq

        key = state_key(self.state)
        for number in range(count):
            meta = self.path / f"meta-{number:05d}.parquet"
            try:
                raw = (pq.read_schema(meta).metadata or {}).get(_KEY)
                record = json.loads(raw) if raw else {}
                vectors = self.vectors(number)
            except (OSError, ValueError) as e:
                raise IndexFormatError(
                    f"{meta.parent}: shard {number} cannot be read ({e}); delete the folder and build again"
                ) from None
            if record.get("build") != key or record.get("number") != number:
                raise IndexFormatError(
                    f"{meta.parent}: shard {number} belongs to another build (other corpus, "
                    "model or chunk size); delete the folder and build again"
                )
            if (
                vectors.shape != (record.get("rows"), d)
                or vectors.dtype != np.float16
                or hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest() != record.get("sha256")
            ):
                raise IndexFormatError(
                    f"{meta.parent}: shard {number}'s embeddings do not match its record; "
                    "delete the folder and build again"
                )

    def vectors(self, number: int) -> np.ndarray:
        """Shard `number`'s embeddings, memory-mapped (fp16)."""
        import numpy as np

        return np.load(self.path / f"emb-{number:05d}.npy", mmap_mode="r", allow_pickle=False)

    def iter_vectors(self, count: int) -> Iterator[np.ndarray]:
        """Each shard's embeddings as float32, in order."""
        import numpy as np

        for number in range(count):
            yield np.asarray(self.vectors(number), dtype=np.float32)

    def tables(self, count: int) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        for number in range(count):
            yield pq.read_table(self.path / f"meta-{number:05d}.parquet")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
