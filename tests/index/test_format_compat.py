"""The index format promise: an index written by version N opens in N+1, or the error says how to migrate.

tests/data/index-format-N/ is a tiny index (8 toy captions, the bundled toyworld model) written by
the release that introduced format N, and committed. When FORMAT_VERSION changes, commit an index
of the new format beside the old ones (build-index tests/data/format1_corpus.tsv --model toyworld
--out tests/data/index-format-N), and keep every older one opening, or failing with a message
that names the migration.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import IndexFormatError
from retriever.index.store import FORMAT_VERSION, READABLE_FORMATS, read_index, read_manifest
from retriever.index.verify import verify_index

DATA = Path(__file__).resolve().parents[1] / "data"
COMMITTED = sorted(DATA.glob("index-format-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
CAPTIONS = [line.split("\t")[0] for line in (DATA / "format1_corpus.tsv").read_text().splitlines()[1:]]


def test_the_current_format_has_a_committed_index():
    assert DATA / f"index-format-{FORMAT_VERSION}" in COMMITTED, (
        f"FORMAT_VERSION is {FORMAT_VERSION}: commit tests/data/index-format-{FORMAT_VERSION} (see this module's docstring)"
    )


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_indexes_open_or_say_how_to_migrate(path, tmp_path):
    version = int(path.name.rsplit("-", 1)[1])
    try:
        index = read_index(path, use_gpu=False)
    except IndexFormatError as e:  # an older format this release no longer reads
        assert version < FORMAT_VERSION, f"this release's own format {version} must open: {e}"
        message = str(e)
        assert "\n" not in message and re.search(r"rebuild|migrate", message), message
        return
    assert read_manifest(path)["format_version"] == version
    verify_index(path)  # every file's size and SHA-256 as the manifest records them
    assert len(index) == len(CAPTIONS)
    assert index.texts.column("text").to_pylist() == CAPTIONS
    assert index.rows([0])[0]["source"] == "toy"
    # Each stored vector's nearest neighbour is its own row, with cosine ~1.
    vectors = np.load(path / "vectors.f16.npy").astype(np.float32)
    D, I = index.search(vectors, k=1)
    assert I[:, 0].tolist() == list(range(len(CAPTIONS)))
    assert np.allclose(D[:, 0], 1.0, atol=2e-3)


def test_the_current_format_answers_an_image_query_with_the_bundled_model():
    from retriever.models import toyworld
    from retriever.models.loading import load_model
    from retriever.search.api import Retriever

    path = DATA / f"index-format-{FORMAT_VERSION}"
    if read_manifest(path)["model"]["fingerprint"] != load_model("toyworld").fingerprint:
        pytest.fail(f"the bundled toyworld weights changed: rebuild {path} (see this module's docstring)")
    scene = next(s for s in toyworld.all_scenes() if s.caption == CAPTIONS[0])
    hits = Retriever.open(path).query(toyworld.render(scene, seed=0), k=3)
    assert hits[0].text == CAPTIONS[0] and hits[0].metadata == {"source": "toy"}


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    import json
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(DATA / f"index-format-{FORMAT_VERSION}", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    newest = max(READABLE_FORMATS)
    manifest["format_version"] = newest + 1
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=f"index format {newest + 1}, this retriever reads formats") as e:
        read_index(newer, use_gpu=False)
    assert "\n" not in str(e.value) and str(e.value).endswith("newer release: pip install -U caption-retriever")
