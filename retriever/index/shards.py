"""The work directory of a build in progress: numbered shards of fp16 embeddings and metadata.

    .NAME.building/
      state.json            what is being built (corpus hash, model, chunk size): resume only if equal
      meta-00000.parquet    id, text and metadata of chunk 0
      emb-00000.npy         its embeddings, fp16; written last, so its presence marks the chunk done

Each file is written under a temporary name and renamed, so a shard is either whole or absent,
whatever kills the process. A restarted build skips the chunks whose `emb-*.npy` exists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


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
        if state_file.is_file():
            try:
                if json.loads(state_file.read_text()) == state:
                    return cls(path, state), True
            except json.JSONDecodeError:
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

    def write(self, number: int, vectors: np.ndarray, table: pa.Table) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        meta = self.path / f"meta-{number:05d}.parquet"
        tmp = meta.with_suffix(".tmp")
        pq.write_table(table, tmp)
        _fsync_rename(tmp, meta)
        emb = self.path / f"emb-{number:05d}.npy"
        tmp = emb.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors.astype(np.float16))
        _fsync_rename(tmp, emb)

    def vectors(self, number: int) -> np.ndarray:
        """Shard `number`'s embeddings, memory-mapped (fp16)."""
        import numpy as np

        return np.load(self.path / f"emb-{number:05d}.npy", mmap_mode="r")

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
