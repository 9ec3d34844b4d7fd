import os

# Before anything imports huggingface_hub: a failed hub lookup otherwise costs ~46 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from retriever.models import toyworld  # noqa: E402


@pytest.fixture(scope="session")
def toy_model():
    from retriever.models.loading import load_model

    return load_model("toyworld", device="cpu")


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """The 256 toy captions as a TSV with attribute metadata."""
    path = tmp_path_factory.mktemp("corpus") / "toy.tsv"
    lines = ["caption\tshape\tcolour"] + [f"{s.caption}\t{s.shape}\t{s.colour}" for s in toyworld.all_scenes()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_index(tmp_path_factory, toy_model, toy_corpus):
    from retriever.index.build import build_index

    out = tmp_path_factory.mktemp("indexes") / "toy"
    build_index(toy_corpus, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture
def toy_images(tmp_path):
    """Eight held-out toy images of large shapes (the toy model's error rate is in the small
    ones; `test_toyworld_quality_*` measures that), on disk; returns [(path, caption)]."""
    import numpy as np

    rng = np.random.default_rng(123)
    large = [s for s in toyworld.all_scenes() if s.size == "large"]
    pairs = []
    for i in range(8):
        scene = large[int(rng.integers(len(large)))]
        path = tmp_path / f"img{i}.png"
        toyworld.render(scene, seed=1000 + i).save(path)
        pairs.append((path, scene.caption))
    return pairs


@pytest.fixture
def run():
    """`run("query", ...)`: the real CLI in-process; returns click's Result (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from retriever.cli import app

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
