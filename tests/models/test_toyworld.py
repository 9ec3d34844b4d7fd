import numpy as np

from retriever.models import toyworld


def test_256_distinct_captions():
    captions = toyworld.all_captions()
    assert len(captions) == len(set(captions)) == 256
    assert "a large red star on the left" in captions


def test_render_is_reproducible_and_sized():
    scene = toyworld.Scene("small", "blue", "circle", "top")
    a, b = toyworld.render(scene, seed=5), toyworld.render(scene, seed=5)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(toyworld.render(scene, seed=6)))


def test_shape_is_drawn_where_the_caption_says():
    scene = toyworld.Scene("large", "red", "square", "left")
    pixels = np.asarray(toyworld.render(scene, seed=1)).astype(int)
    red = (pixels[..., 0] > 170) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert len(xs) > 100
    assert xs.mean() < 28 and 20 < ys.mean() < 44
