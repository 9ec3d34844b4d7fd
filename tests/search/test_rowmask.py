"""RowMask: a filter's rows as a bitmap in FAISS's layout, checked against numpy bools."""

import numpy as np
import pyarrow as pa
import pytest

from retriever.search.rowmask import RowMask


@pytest.mark.parametrize("size", [1, 7, 8, 63, 64, 65, 1000])
def test_matches_numpy_bools(size):
    rng = np.random.default_rng(size)
    a, b = rng.random(size) < 0.3, rng.random(size) < 0.6
    ra, rb = RowMask.from_bools(a), RowMask.from_bools(b)
    assert ra.matches().tolist() == a.tolist() and ra.count == a.sum() and len(ra) == size
    assert (ra & rb).matches().tolist() == (a & b).tolist()
    assert (ra | rb).matches().tolist() == (a | b).tolist()
    assert (~ra).matches().tolist() == (~a).tolist() and (~ra).count == size - a.sum()  # no stray tail bits
    assert ra.rows().tolist() == np.flatnonzero(a).tolist()
    assert ra.bitmap.tobytes() == np.packbits(a, bitorder="little").tobytes()  # FAISS's layout
    assert RowMask.all(size).count == size and RowMask.all(size, False).count == 0


def test_arrow_bitmaps_are_read_as_they_are_and_the_tail_is_cleared():
    values = [True, False, True] * 7  # 21 rows in 3 bytes; Arrow may leave bits set past the end
    bitmap = bytearray(pa.array(values).buffers()[1].to_pybytes()[:3])
    bitmap[2] |= 0b1110_0000
    rows = RowMask.from_bitmap(bytes(bitmap), len(values))
    assert rows.matches().tolist() == values and rows.count == sum(values)


def test_read_only_and_sizes_must_agree():
    rows = RowMask.from_bools([True, False])
    with pytest.raises(ValueError):
        rows.words[0] = 0
    with pytest.raises(ValueError, match="cannot be combined"):
        rows & RowMask.from_bools([True])
