"""Images decoded and resized in worker processes give the same vectors, in the same order."""

import json

import numpy as np
from PIL import Image

from retriever.errors import ImageError
from retriever.models import toyworld
from retriever.models.image_stream import iter_image_batches, pil_transforms


def _folder(tmp_path, n=12):
    paths = []
    for i, (image, _) in enumerate(toyworld.sample(n, seed=5, style="random")):
        path = tmp_path / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        image.resize((150, 97) if i % 3 == 0 else image.size).save(path)  # some need a real resize and crop
        paths.append(path)
    paths[5].write_bytes(b"not an image")  # a broken file in the middle
    return paths


def test_workers_give_the_same_images_in_order_and_report_bad_files(toy_model, tmp_path):
    from retriever.models.encoder import Encoder

    paths = _folder(tmp_path)
    transform, side = pil_transforms(toy_model.preprocess)
    assert transform is not None and side == 64
    runs = {}
    for workers in (0, 2):
        loaded = [item for batch in iter_image_batches(paths, 5, workers, transform, side) for item in batch]
        assert [label for label, _ in loaded] == [str(p) for p in paths]
        assert isinstance(loaded[5][1], ImageError) and loaded[5][1].path == str(paths[5])
        runs[workers] = [im for _, im in loaded if isinstance(im, Image.Image)]
    assert all(im.size == (64, 64) for im in runs[2])
    encoder = Encoder(toy_model)
    shrunk = encoder.encode_image(runs[2], show_progress_bar=False)
    plain = encoder.encode_image(
        [Image.open(p).convert("RGB") for i, p in enumerate(paths) if i != 5], show_progress_bar=False
    )
    np.testing.assert_array_equal(shrunk, encoder.encode_image(runs[0], show_progress_bar=False))
    np.testing.assert_allclose(shrunk, plain, atol=1e-6)  # shrinking first changes no vector


def test_query_with_workers_answers_like_without(toy_index, tmp_path, run):
    paths = _folder(tmp_path, n=6)
    outputs = []
    for workers in ("0", "2"):
        result = run("query", str(tmp_path), "-i", str(toy_index), "-k", "3", "--json", "--workers", workers)
        assert result.exit_code == 1 and "05.jpg" in result.stderr  # the broken file is named, the rest answered
        outputs.append([json.loads(line) for line in result.stdout.splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3 * (len(paths) - 1)
