"""Result options over real FAISS indexes, against brute force over the same vectors."""

import numpy as np
import pytest

from retriever.errors import RetrieverError
from retriever.index.store import read_index
from retriever.models import toyworld
from retriever.search.diversity import collapse_near_duplicates, mmr
from retriever.search.filters import where_mask
from retriever.search.options import VECTORS_FILE, ResultOptions, exact_vectors, search_index


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The 256 toy captions, their partial captions and 3,000 flavor-like distractors, with metadata."""
    from retriever.prompts.label_tables import builtin_labels

    path = tmp_path_factory.mktemp("opts") / "corpus.tsv"
    rows = [(s.caption, "toy", s.colour) for s in toyworld.all_scenes()]
    rows += [(t, "partial", "") for template in toyworld.PARTIAL_TEMPLATES for t in toyworld.partial_captions(template)]
    rows += [(t, "flavor", "") for t in builtin_labels("flavors")[:3000] if "\t" not in t]
    path.write_text("text\tsource\tcolour\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, corpus, toy_model):
    from retriever.index.build import build_index

    root = tmp_path_factory.mktemp("built")
    out = {}
    for kind in ("flat", "hnsw", "ivf"):
        build_index(corpus, root / kind, toy_model, index_type=kind, show_progress_bar=False)
        out[kind] = read_index(root / kind, use_gpu=False)
    return out


@pytest.fixture(scope="module")
def queries(toy_model):
    from retriever.models.encoder import Encoder

    images = [toyworld.render(s, seed=70 + i) for i, s in enumerate(toyworld.all_scenes()[::37])]
    return Encoder(toy_model).encode_image(images, show_progress_bar=False)


def brute_vectors(index):
    return (
        index.faiss_index.reconstruct_n(0, len(index))
        if "IVF" not in index.manifest["faiss_factory"]
        else exact_vectors(index, np.arange(len(index)))
    )


def test_plain_options_return_the_nearest(indexes, queries):
    index = indexes["flat"]
    xb = brute_vectors(index)
    for (_, ids), q in zip(search_index(index, queries, 10, ResultOptions()), queries):
        assert ids.tolist() == np.argsort(-(xb @ q), kind="stable")[:10].tolist()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_where_prefilters_and_still_returns_k(indexes, queries, kind):
    index = indexes[kind]
    mask = where_mask(index.texts, 'source = "toy" and colour in ("red", "blue")')
    assert mask.sum() == 64
    results = search_index(index, queries, 10, ResultOptions(), mask=mask)
    for _, ids in results:
        assert len(ids) == 10 and mask[ids].all()
    if kind == "flat":  # exact: the same as brute force over the matching rows
        xb = brute_vectors(index)
        for (_, ids), q in zip(results, queries):
            allowed = np.flatnonzero(mask)
            assert set(ids.tolist()) == set(allowed[np.argsort(-(xb[allowed] @ q))[:10]].tolist())


def test_a_row_mask_selects_as_its_bools_do_and_must_fit_the_index(indexes, queries):
    from retriever.errors import RetrieverError
    from retriever.search.filters import where_rows

    index = indexes["hnsw"]
    rows = where_rows(index.texts, 'colour = "red" or len < 25')
    as_bools = search_index(index, queries, 10, ResultOptions(), mask=rows.matches())
    assert [ids.tolist() for _, ids in search_index(index, queries, 10, ResultOptions(), mask=rows)] == [
        ids.tolist() for _, ids in as_bools
    ]
    with pytest.raises(RetrieverError, match="cannot select"):
        search_index(index, queries, 10, ResultOptions(), mask=rows.matches()[:-1])


def test_where_with_fewer_matches_than_k(indexes, queries):
    index = indexes["flat"]
    mask = where_mask(index.texts, 'text = "a large red star on the left"')
    (scores, ids), *_ = search_index(index, queries, 10, ResultOptions(), mask=mask)
    assert len(ids) == 1


def test_diversity_and_dedupe_match_reference(indexes, queries):
    index = indexes["flat"]
    xb = brute_vectors(index)
    options = ResultOptions(diversity=0.5, dedupe=0.9, fetch_k=200)
    _, I = index.faiss_index.search(queries, 200)
    for (_, ids), q, cand in zip(search_index(index, queries, 10, options), queries, I):
        s = xb[cand] @ q
        kept = collapse_near_duplicates(s, xb[cand], 0.9)
        expected = cand[kept][mmr(s[kept], xb[cand][kept], 10, 0.5)]
        assert ids.tolist() == expected.tolist()
        assert ids[0] == cand[0]  # the nearest stays first
        sims = xb[ids] @ xb[ids].T
        assert (sims[~np.eye(len(ids), dtype=bool)] < 0.9 + 1e-5).all()


def test_diversity_lowers_intra_list_similarity_with_top1_unchanged(indexes, queries):
    index = indexes["hnsw"]
    plain = search_index(index, queries, 10, ResultOptions())
    diverse = search_index(index, queries, 10, ResultOptions(diversity=0.5))

    def ils(ids):
        v = exact_vectors(index, ids)
        s = v @ v.T
        return (s.sum() - len(ids)) / (len(ids) * (len(ids) - 1))

    assert all(p[1][0] == d[1][0] for p, d in zip(plain, diverse))
    assert np.mean([ils(d[1]) for d in diverse]) < np.mean([ils(p[1]) for p in plain]) - 0.05


def test_approximate_index_without_vectors_says_what_it_needs(indexes, queries, tmp_path):
    import dataclasses

    index = dataclasses.replace(indexes["ivf"], mapped_vectors=None)  # as if opened without the file
    vectors = index.path / VECTORS_FILE
    if vectors.exists():
        vectors.rename(tmp_path / "kept.npy")
    try:
        with pytest.raises(RetrieverError, match="no stored vectors"):
            search_index(index, queries, 10, ResultOptions(diversity=0.3))
        assert len(search_index(index, queries, 10, ResultOptions())[0][1]) == 10  # plain search still works
    finally:
        if (tmp_path / "kept.npy").exists():
            (tmp_path / "kept.npy").rename(vectors)


@pytest.mark.parametrize(
    "options",
    [
        ResultOptions(diversity=1.5),
        ResultOptions(dedupe=0.0),
        ResultOptions(fetch_k=0),
        ResultOptions(diversity=float("nan")),
    ],
)
def test_bad_options(indexes, queries, options):
    with pytest.raises(RetrieverError):
        search_index(indexes["flat"], queries, 10, options)


def test_build_stores_exact_vectors_and_no_vectors_leaves_them_out(indexes, corpus, toy_model, tmp_path):
    from retriever.index.build import build_index
    from retriever.models.encoder import Encoder

    index = indexes["ivf"]
    stored = np.load(index.path / VECTORS_FILE, mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (len(index), 128)
    texts = index.texts.column("text").to_pylist()
    fresh = Encoder(toy_model).encode_text(texts[:50], show_progress_bar=False)
    assert (np.asarray(stored[:50], dtype=np.float32) * fresh).sum(axis=1).min() > 0.999  # row i is text i
    build_index(corpus, tmp_path / "bare", toy_model, index_type="ivf", store_vectors=False, show_progress_bar=False)
    assert not (tmp_path / "bare" / VECTORS_FILE).exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_several_indexes_merge_the_same_searched_in_parallel(indexes, queries, kind):
    """The merge of an index with itself lists each of its hits twice, in score order, and the
    calling thread's OpenMP thread count is left as it was."""
    import retriever.search.options as options
    from retriever.index.faiss_import import import_faiss

    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    merged = options.search_indexes([indexes[kind], indexes[kind]], queries, 6, ResultOptions())
    assert faiss.omp_get_max_threads() == before
    alone = search_index(indexes[kind], queries, 3, ResultOptions())
    for hits, (scores, ids) in zip(merged, alone):
        assert [i for _, _, i in hits] == np.repeat(ids, 2).tolist()
        assert sorted(n for n, _, _ in hits[:2]) == [0, 1]
        assert np.allclose([s for _, s, _ in hits], np.repeat(scores, 2))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_several_indexes_are_re_ranked_as_one_list(indexes, queries, kind):
    """Dedupe and MMR run over the indexes' candidates together: an index merged with itself
    gives each text once under dedupe, and with diversity the same hits as the index alone."""
    from retriever.search.options import search_indexes

    index = indexes[kind]
    for options in (ResultOptions(dedupe=0.999), ResultOptions(diversity=0.5, dedupe=0.999)):
        merged = search_indexes([index, index], queries[:1], 5, options)[0]
        (scores, ids), *_ = search_index(index, queries[:1], 5, options)
        assert [i for _, _, i in merged] == ids.tolist()
        assert np.allclose([s for _, s, _ in merged], scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_id_selector_path_returns_k_matching_rows(indexes, queries, kind, monkeypatch):
    """With the brute-force shortcut off, the filter runs inside FAISS (id selector, widened
    efSearch / nprobe): k hits, all matching, and mostly the exact ones."""
    from retriever.search import options as options_module

    monkeypatch.setattr(options_module, "BRUTE_FORCE_ROWS", 0)
    index = indexes[kind]
    mask = where_mask(index.texts, 'source = "toy" and colour in ("red", "blue")')
    xb = brute_vectors(index)
    allowed = np.flatnonzero(mask)
    found = []
    for (_, ids), q in zip(search_index(index, queries, 10, ResultOptions(), mask=mask), queries):
        assert len(ids) == 10 and mask[ids].all()
        found.append(len(set(ids.tolist()) & set(allowed[np.argsort(-(xb[allowed] @ q))[:10]].tolist())) / 10)
    assert np.mean(found) >= 0.9


def test_a_reused_bool_mask_is_packed_once_and_a_new_one_afresh():
    from retriever.search.options import as_rows

    a = np.zeros(1000, dtype=bool)
    a[[1, 9, 999]] = True
    rows = as_rows(a)
    assert as_rows(a) is rows and rows.count == 3 and rows.rows().tolist() == [1, 9, 999]
    b = a.copy()
    b[5] = True
    assert as_rows(b).rows().tolist() == [1, 5, 9, 999]
