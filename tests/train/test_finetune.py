"""`retriever finetune` on the toy world: real open_clip models, real images on disk, no mocks."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from retriever.cli import app
from retriever.errors import CorpusError, RetrieverError
from retriever.models import toyworld
from retriever.models.loading import load_model
from retriever.train.finetune import TrainOptions, finetune


def write_pairs(folder, n, seed, header="filepath\ttitle", large_only=False):
    """n toy images under folder/images and a TSV of (relative path, caption) next to them."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [header]
    scenes = [s for s in toyworld.all_scenes() if s.size == "large"] if large_only else None
    for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed)):
        if scenes is not None:
            scene = scenes[(seed * 7919 + i) % len(scenes)]
            image, caption = toyworld.render(scene, seed=seed * 100_000 + i), scene.caption
        name = f"{seed}_{i:04d}.png"
        image.save(images / name)
        lines.append(f"images/{name}\t{caption}")
    path = folder / f"pairs{seed}.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return {"train": write_pairs(folder, 192, seed=1), "val": write_pairs(folder, 96, seed=2, large_only=True)}


def step_losses():
    losses = []

    def on_event(kind, details):
        if kind == "step" and details["loss"] is not None:
            losses.append(details["loss"])

    return losses, on_event


def test_training_from_random_weights_lowers_the_loss(tmp_path):
    train = write_pairs(tmp_path, 64, seed=6)
    losses, on_event = step_losses()
    options = TrainOptions(epochs=10, batch_size=32, lr=2e-4, warmup=3, workers=0)
    result = finetune(
        train,
        tmp_path / "out",
        "toyworld",
        from_scratch=True,
        options=options,
        on_event=on_event,
        show_progress_bar=False,
    )
    assert result.model.endswith("from scratch")
    assert len(losses) == 10 * 2
    first, last = losses[0], sum(losses[-4:]) / 4
    assert first == pytest.approx(math.log(32), abs=0.3)  # chance level for a batch of 32
    assert last < first - 0.3, (first, last)


def test_short_run_from_toy_weights_keeps_heldout_recall(data, tmp_path):
    out = tmp_path / "tuned"
    options = TrainOptions(epochs=1, batch_size=32, lr=1e-5, workers=1)
    result = finetune(data["train"], out, "toyworld", val=data["val"], options=options, show_progress_bar=False)
    (report,) = result.epochs
    assert report.recall_at_1 >= 0.9 and report.val_loss is not None and report.exact_match is None
    # The starting model is scored too, so the effect of fine-tuning is visible.
    assert result.before.epoch == 0 and result.before.recall_at_1 >= 0.9 and result.before.train_loss is None

    # The output is a model folder the rest of the project loads, and it is the trained model.
    tuned = load_model(f"local-dir:{out}", device="cpu")
    assert tuned.fingerprint != load_model("toyworld", device="cpu").fingerprint
    from retriever.corpus.pairs import read_pairs
    from retriever.models.images import load_image
    from retriever.train.evaluation import caption_recall_at_1

    val = list(read_pairs(data["val"]).unique_images().items())
    recall = caption_recall_at_1(tuned, [load_image(p) for p, _ in val], [c for _, c in val])
    assert recall == pytest.approx(report.recall_at_1)
    assert (out / "checkpoints" / "epoch_1" / "open_clip_config.json").is_file()
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["epochs"][0]["recall_at_1"] == report.recall_at_1


def test_coca_fine_tune_reports_exact_match_and_writes_captions(tmp_path):
    train = write_pairs(tmp_path, 48, seed=3, large_only=True)
    val = write_pairs(tmp_path, 24, seed=4, large_only=True)
    options = TrainOptions(epochs=1, batch_size=16, lr=1e-5, workers=0)
    result = finetune(train, tmp_path / "coca", "toyworld-coca", val=val, options=options, show_progress_bar=False)
    (report,) = result.epochs
    assert report.exact_match is not None and report.exact_match >= 0.9
    from retriever.corpus.pairs import read_pairs
    from retriever.search.api import Retriever

    pairs = read_pairs(val)
    writer = Retriever.open(generator=f"local-dir:{tmp_path / 'coca'}", device="cpu")  # as `--generator local-dir:OUT`
    (hit,) = writer.query(pairs.images[0], k=1, mode="generate")
    assert hit.text == pairs.captions[0] and hit.source == "generated"


def test_bad_rows_and_unreadable_images_are_reported_and_skipped(tmp_path):
    train = write_pairs(tmp_path, 40, seed=5)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    with open(train, "a") as f:
        f.write("images/gone.png\ta red circle\n")  # line 42: missing image
        f.write("images/5_0000.png\n")  # line 43: one field
        f.write("images/5_0001.png\t   \n")  # line 44: empty caption
        f.write("images/broken.png\ta large red star on the left\n")
        f.write("images/empty.png\ta large red star on the left\n")
    events = []
    result = finetune(
        train,
        tmp_path / "out",
        "toyworld",
        options=TrainOptions(epochs=1, batch_size=8, workers=0),
        on_event=lambda kind, d: events.append((kind, d)),
        show_progress_bar=False,
    )
    rows = {row.line: row.reason for row in result.train.bad_rows}
    assert set(rows) == {42, 43, 44}
    assert "image not found" in rows[42] and "expected 2 fields" in rows[43] and "empty caption" in rows[44]
    assert result.train.kept == 42 and result.train.missing_images == 1
    assert sorted(e.split(":")[0].rsplit("/", 1)[-1] for e in result.unreadable_images) == ["broken.png", "empty.png"]
    assert sum(kind == "unreadable_image" for kind, _ in events) == 2
    assert result.epochs[0].steps >= 4


def test_missing_column_and_empty_file_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("image\ttitle\nx.png\thello\n")
    with pytest.raises(CorpusError, match="no column 'filepath'"):
        finetune(bad, tmp_path / "out", "toyworld")
    missing = tmp_path / "missing.tsv"
    missing.write_text("filepath\ttitle\nnope.png\thello\n")
    with pytest.raises(CorpusError, match=r"no usable image-caption pairs \(1 rows: 1 missing images, 0 empty"):
        finetune(missing, tmp_path / "out", "toyworld")
    mixed = tmp_path / "mixed.tsv"  # a short row the reader cannot parse, an empty caption, a missing image
    mixed.write_text("filepath\ttitle\textra\nonly-one-field\nnope.png\t\tx\nnope.png\thello\tx\n")
    with pytest.raises(CorpusError, match=r"\(3 rows: 1 missing images, 1 empty captions, 1 other bad\)"):
        finetune(mixed, tmp_path / "out", "toyworld")


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path):
    options = TrainOptions(epochs=2, batch_size=32, lr=1e-4, workers=0)
    finetune(data["train"], tmp_path / "straight", "toyworld", options=options, show_progress_bar=False)

    def interrupt(kind, details):
        if kind == "step" and details["epoch"] == 1 and details["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            data["train"],
            tmp_path / "resumed",
            "toyworld",
            options=options,
            on_event=interrupt,
            show_progress_bar=False,
        )
    assert (tmp_path / "resumed" / "checkpoints" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "open_clip_model.safetensors").exists()  # no epoch finished yet
    losses, on_event = step_losses()
    result = finetune(
        data["train"],
        tmp_path / "resumed",
        "toyworld",
        options=options,
        resume=True,
        on_event=on_event,
        show_progress_bar=False,
    )
    assert result.resumed_at == (0, 4) and len(losses) == 2 * 6 - 4
    assert [e.steps for e in result.epochs] == [6, 6]
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "open_clip_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "open_clip_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    # More epochs later: the same command with --resume and a larger --epochs.
    more = finetune(
        data["train"],
        tmp_path / "resumed",
        "toyworld",
        options=TrainOptions(epochs=3, batch_size=32, lr=1e-4, workers=0),
        resume=True,
        show_progress_bar=False,
    )
    assert [e.epoch for e in more.epochs] == [1, 2, 3]


def test_resume_refuses_changed_settings_and_out_is_protected(data, tmp_path):
    out = tmp_path / "run"
    finetune(
        data["train"],
        out,
        "toyworld",
        options=TrainOptions(epochs=1, batch_size=64, workers=0),
        show_progress_bar=False,
    )
    with pytest.raises(RetrieverError, match="not empty.*--resume"):
        finetune(data["train"], out, "toyworld", options=TrainOptions(epochs=1, batch_size=64))
    with pytest.raises(RetrieverError, match="batch_size 64 -> 32"):
        finetune(data["train"], out, "toyworld", options=TrainOptions(epochs=2, batch_size=32), resume=True)
    with pytest.raises(RetrieverError, match="nothing to resume"):
        finetune(data["train"], tmp_path / "fresh", "toyworld", resume=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RetrieverError, match="not a fine-tuning run"):
        finetune(data["train"], tmp_path / "mine", "toyworld", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_runs_reports_and_fails_cleanly(data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [
        "finetune",
        str(data["train"]),
        "--out",
        str(out),
        "--model",
        "toyworld",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--val",
        str(data["val"]),
        "--workers",
        "0",
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"][0]["recall_at_1"] >= 0.9 and summary["train"]["kept"] == 192

    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "error:" in result.stderr and "--resume" in result.stderr
    result = runner.invoke(app, [*args, "--overwrite", "--precision", "amp"])
    assert result.exit_code == 1 and "needs a CUDA device" in result.stderr
    result = runner.invoke(app, [*args, "--overwrite", "--batch-size", "1"])
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "coca_ViT-B-32"])
def test_full_size_models_fine_tune_on_cpu(arch, tmp_path):
    """Real architectures (random weights saved as a checkpoint file, as no hub is reachable):
    the loop runs, and the output loads both as local-dir: and as --model ARCH --pretrained FILE."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    start = tmp_path / "start.safetensors"
    model = load_model(arch, device="cpu", random_weights=True).model  # CoCa's decoder initialised, unlike open_clip's
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(start))
    train = write_pairs(tmp_path, 8, seed=7)
    losses, on_event = step_losses()
    options = TrainOptions(epochs=1, batch_size=4, lr=1e-5, workers=0, contrastive_loss_weight=1.0)
    result = finetune(
        train, tmp_path / "out", arch, str(start), options=options, on_event=on_event, show_progress_bar=False
    )
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and result.epochs[0].steps == 2
    weights = tmp_path / "out" / "open_clip_model.safetensors"
    before, after = load_file(start), load_file(weights)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    for loaded in (
        load_model(f"local-dir:{tmp_path / 'out'}", device="cpu"),
        load_model(arch, str(weights), device="cpu"),
    ):
        assert type(loaded.model).__name__ == ("CoCa" if arch.startswith("coca") else "CLIP")
        assert all(torch.equal(after[k], v) for k, v in loaded.model.state_dict().items())
    shutil.rmtree(tmp_path)  # a few GB (weights, optimizer state): pytest would keep them for three runs


def test_from_scratch_coca_has_no_uninitialised_weights():
    coca = load_model("toyworld-coca", device="cpu", random_weights=True).model
    projection = coca.text_decoder.text_projection
    assert torch.isfinite(projection).all() and 0.5 < projection.std().item() * projection.shape[0] ** 0.5 < 2


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_then_resume(data, tmp_path):
    """A real SIGINT to `retriever finetune` mid-run: exit 130 with a hint, state saved; the same
    command with --resume carries on from there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "retriever",
        "finetune",
        str(data["train"]),
        "--out",
        str(out),
        "--model",
        "toyworld",
        "--batch-size",
        "32",
        "--workers",
        "1",
        "--epochs",
        "100",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "epoch_1").is_dir():
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: the state is saved; add --resume" in stderr and "Traceback" not in stderr
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    done = state["epoch"]
    assert 1 <= done < 100

    resumed = subprocess.run([*cmd[:-1], str(done + 1), "--resume", "--json"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, done + 2))
    assert summary["resumed_at"][0] == done


def test_state_is_saved_every_checkpoint_interval(data, tmp_path):
    events = []
    options = TrainOptions(epochs=1, batch_size=64, workers=0, checkpoint_minutes=0)
    finetune(
        data["train"],
        tmp_path / "out",
        "toyworld",
        options=options,
        show_progress_bar=False,
        on_event=lambda kind, d: events.append((kind, d)),
    )
    saved = [d["step"] for kind, d in events if kind == "checkpoint"]
    assert saved == [1, 2, 3]  # with a zero interval, after every step (and again at the epoch end)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    """The mixed-precision code path (autocast) on the CPU; CUDA's amp path needs a GPU."""
    train = write_pairs(tmp_path, 32, seed=8)
    losses, on_event = step_losses()
    finetune(
        train,
        tmp_path / "out",
        "toyworld",
        options=TrainOptions(epochs=1, batch_size=16, precision="bf16", workers=0),
        on_event=on_event,
        show_progress_bar=False,
    )
    assert len(losses) == 2 and all(math.isfinite(x) and x < 1.0 for x in losses)
