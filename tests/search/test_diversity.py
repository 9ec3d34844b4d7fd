"""MMR, near-duplicate collapse and steering, against straightforward reference code."""

import numpy as np
import pytest

from retriever.errors import RetrieverError
from retriever.search.diversity import collapse_near_duplicates, mmr
from retriever.search.steering import blend, parse_weighted, steer


def unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def reference_mmr(scores, xb, k, lam):
    picked, rest = [], list(range(len(scores)))
    while rest and len(picked) < k:

        def value(i):
            penalty = max((float(xb[i] @ xb[j]) for j in picked), default=0.0)
            return (1 - lam) * scores[i] - lam * penalty if picked else scores[i]

        best = max(rest, key=value)
        picked.append(best)
        rest.remove(best)
    return picked


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_mmr_matches_reference(lam):
    rng = np.random.default_rng(1)
    xb = unit(rng, 200)
    q = unit(rng, 1)[0]
    scores = xb @ q
    assert mmr(scores, xb, 10, lam).tolist() == reference_mmr(scores, xb, 10, lam)


def test_mmr_zero_is_nearest_order_and_first_is_always_nearest():
    rng = np.random.default_rng(2)
    xb = unit(rng, 50)
    scores = xb @ unit(rng, 1)[0]
    assert mmr(scores, xb, 10, 0.0).tolist() == np.argsort(-scores)[:10].tolist()
    for lam in (0.2, 0.7, 1.0):
        assert mmr(scores, xb, 10, lam)[0] == int(np.argmax(scores))


def test_mmr_lowers_intra_list_similarity():
    rng = np.random.default_rng(3)
    # clusters of near-copies: plain nearest returns one cluster, MMR spreads over clusters
    centres = unit(rng, 10)
    xb = np.repeat(centres, 20, axis=0) + 0.05 * rng.normal(size=(200, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    scores = xb @ centres[0]

    def ils(ids):
        v = xb[ids]
        s = v @ v.T
        return (s.sum() - len(ids)) / (len(ids) * (len(ids) - 1))

    assert ils(mmr(scores, xb, 10, 0.5)) < ils(mmr(scores, xb, 10, 0.0)) - 0.1


def test_mmr_edge_cases():
    xb = np.eye(3, dtype=np.float32)
    assert mmr(np.array([0.1, 0.9, 0.5]), xb, 10, 0.5).tolist()[0] == 1
    assert len(mmr(np.array([0.1, 0.9, 0.5]), xb, 10, 0.5)) == 3
    assert mmr(np.empty(0), np.empty((0, 3)), 5, 0.5).size == 0
    with pytest.raises(ValueError):
        mmr(np.array([1.0]), xb[:1], 1, 1.5)


def test_collapse_keeps_the_best_of_each_group():
    rng = np.random.default_rng(4)
    base = unit(rng, 5)
    xb = np.concatenate([base, base + 0.01, base - 0.01])
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    scores = rng.random(15)
    kept = collapse_near_duplicates(scores, xb, 0.95)
    assert len(kept) == 5
    for group in range(5):
        members = [group, group + 5, group + 10]
        assert max(members, key=lambda i: scores[i]) in kept.tolist()
    assert list(scores[kept]) == sorted(scores[kept], reverse=True)
    assert len(collapse_near_duplicates(scores, xb, 1.01)) == 15  # above any cosine: nothing collapses


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("film noir", ("film noir", 1.0)),
        ("autumn:0.5", ("autumn", 0.5)),
        ("a.jpg:2", ("a.jpg", 2.0)),
        ("photo: film noir", ("photo: film noir", 1.0)),
        ("at 12:30", ("at 12", 30.0)),
        (" x :1e-1", ("x", 0.1)),
    ],
)
def test_parse_weighted(spec, expected):
    assert parse_weighted(spec) == expected


@pytest.mark.parametrize("spec", ["", ":0.5", "x:0", "x:-1", "   "])
def test_parse_weighted_rejects(spec):
    with pytest.raises(RetrieverError):
        parse_weighted(spec)


def test_steer_and_blend_arithmetic():
    rng = np.random.default_rng(5)
    q, a, b = unit(rng, 3)
    out = steer(q, plus=a[None], plus_weights=[0.5], minus=b[None], minus_weights=[2.0])
    expected = q + 0.5 * a - 2.0 * b
    assert np.allclose(out, expected / np.linalg.norm(expected), atol=1e-6)
    assert np.allclose(steer(q), q, atol=1e-6)
    mixed = blend(np.stack([a, b]), [1, 3])
    assert np.allclose(mixed, (a + 3 * b) / np.linalg.norm(a + 3 * b), atol=1e-6)
    with pytest.raises(RetrieverError, match="cancel"):
        steer(q, minus=q[None], minus_weights=[1.0])
