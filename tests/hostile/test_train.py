"""Hostile inputs to `retriever finetune`: crafted or damaged training state, folders that are not
runs, changed data, unreadable images, bad paths, and interruptions at every awkward moment.

Each case asserts the exact outcome: the exit code, the one `error:` line, and that nothing that
was there before is gone. Models and files are real (the bundled toy model, images on disk).
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from retriever.errors import RetrieverError
from retriever.models import toyworld
from retriever.train.finetune import TrainOptions, finetune


def _hostile_helpers():
    """tests/hostile/conftest.py as a module (tests/ has no packages, so it cannot be imported by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hostile_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


assert_clean_error = _hostile_helpers().assert_clean_error

OPTIONS = {"epochs": 2, "batch_size": 4, "lr": 1e-4, "workers": 0}  # 3 steps an epoch on 12 pairs
CLI_OPTIONS = ["--model", "toyworld", "--epochs", "2", "--batch-size", "4", "--lr", "1e-4", "--workers", "0", "-q"]


def write_pairs(folder: Path, n: int, seed: int, broken: int = 0) -> Path:
    """n toy images (the first `broken` of them not images at all) and a TSV of them."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed)):
        name = f"{seed}_{i:03d}.png"
        if i < broken:
            (images / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            image.save(images / name)
        lines.append(f"images/{name}\t{caption}")
    path = folder / f"pairs{seed}.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders and symlinks): a snapshot to compare."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() or p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "open_clip_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return {"train": write_pairs(folder, 12, seed=11), "dirty": write_pairs(folder, 12, seed=12, broken=2)}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Uninterrupted two-epoch runs on both pair files: the weights every resumed run must match."""
    root = tmp_path_factory.mktemp("straight")
    runs = {}
    for key in ("train", "dirty"):
        finetune(data[key], root / key, "toyworld", options=TrainOptions(**OPTIONS), show_progress_bar=False)
        runs[key] = weights(root / key)
    return runs


@pytest.fixture(scope="module")
def interrupted_run(data, tmp_path_factory):
    """A run stopped after step 2 of epoch 1: a valid state to copy and then damage."""
    out = tmp_path_factory.mktemp("interrupted") / "run"

    def stop(kind, details):
        if kind == "step" and details["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            data["train"], out, "toyworld", options=TrainOptions(**OPTIONS), on_event=stop, show_progress_bar=False
        )
    return out


@pytest.fixture
def run_copy(interrupted_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    return out


def resume_args(data, out):
    return ["finetune", data["train"], "--out", out, *CLI_OPTIONS, "--resume"]


class Marker:
    """Unpickling this creates the file `path`: proof that a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def state_parts(out: Path) -> tuple[Path, dict, Path]:
    state = out / "checkpoints" / "state.json"
    meta = json.loads(state.read_text())
    return state, meta, out / "checkpoints" / meta["tensors"]["file"]


# --- crafted and damaged training state --------------------------------------------------------


@pytest.mark.parametrize("where", ["legacy state.pt", "state.json", "tensor file"])
def test_a_pickled_state_is_never_unpickled(where, data, run_copy, tmp_path, run):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model_state": Marker(marker), "epoch": 0})
    state, meta, tensor_file = state_parts(run_copy)
    if where == "legacy state.pt":
        for p in run_copy.joinpath("checkpoints").glob("state*"):
            p.unlink()
        (run_copy / "checkpoints" / "state.pt").write_bytes(payload)
        expected = ["state.pt: unreadable training state", "pickled state from an earlier version"]
    elif where == "state.json":
        state.write_bytes(payload)
        expected = ["state.json: unreadable training state", "not JSON"]
    else:  # a pickle in place of the tensors, with state.json's hash updated to match it
        tensor_file.write_bytes(payload)
        meta["tensors"]["sha256"] = hashlib.sha256(payload).hexdigest()
        state.write_text(json.dumps(meta))
        expected = [f"{tensor_file.name}: unreadable training state", "not a safetensors file"]
    before = tree(run_copy)
    result = run(*resume_args(data, run_copy))
    assert_clean_error(result, *expected, "--overwrite")
    assert not marker.exists()
    assert tree(run_copy) == before


def _set(meta, path, value):
    *parents, last = path
    for key in parents:
        meta = meta[key]
    meta[last] = value


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda raw, meta: os.urandom(4096), "not JSON"),
        (lambda raw, meta: raw[: len(raw) // 2], "not JSON"),
        (lambda raw, meta: b"", "not JSON"),
        (lambda raw, meta: b"[1, 2, 3]", "not a retriever-finetune-state file"),
        (
            lambda raw, meta: json.dumps({**meta, "format": "something-else"}).encode(),
            "not a retriever-finetune-state file",
        ),
        (lambda raw, meta: json.dumps({**meta, "version": 99}).encode(), "format version 99"),
        (lambda raw, meta: json.dumps({k: v for k, v in meta.items() if k != "epoch"}).encode(), "no 'epoch' field"),
        (lambda raw, meta: json.dumps({**meta, "epoch": "1"}).encode(), "'epoch' is str"),
        (lambda raw, meta: json.dumps({**meta, "batch": -3}).encode(), "a negative epoch or batch"),
        (lambda raw, meta: json.dumps({**meta, "losses": [1.0, "x"]}).encode(), "a loss is not a number"),
        (
            lambda raw, meta: json.dumps({**meta, "model": {**meta["model"], "name": 7}}).encode(),
            "'model.name' is not a string",
        ),
        (
            lambda raw, meta: json.dumps(
                {**meta, "tensors": {**meta["tensors"], "file": "../../../etc/passwd"}}
            ).encode(),
            "no valid 'tensors' entry",
        ),
        (
            lambda raw, meta: json.dumps({**meta, "history": [{"epoch": 1, "surprise": True}]}).encode(),
            "a history entry does not fit",
        ),
        (
            lambda raw, meta: json.dumps({**meta, "optimizer_groups": meta["optimizer_groups"][:1]}).encode(),
            "does not fit toyworld",
        ),
    ],
    ids=[
        "random-bytes",
        "truncated",
        "empty",
        "a-list",
        "wrong-format",
        "future-version",
        "no-epoch",
        "epoch-a-string",
        "negative-batch",
        "loss-a-string",
        "model-name-a-number",
        "path-traversal",
        "history-wrong-fields",
        "optimizer-groups-missing",
    ],
)
def test_a_damaged_state_json_is_a_clean_error(damage, why, data, run_copy, run):
    state, meta, _ = state_parts(run_copy)
    state.write_bytes(damage(state.read_bytes(), meta))
    before = tree(run_copy)
    assert_clean_error(
        run(*resume_args(data, run_copy)), "state", "unreadable training state", why, "start again with --overwrite"
    )
    assert tree(run_copy) == before


def _foreign_tensors(meta, tensor_file):
    """A valid safetensors file of the wrong tensors, with state.json's hash made to match."""
    save_file({"model.nonsense": torch.zeros(3), "rng": torch.get_rng_state()}, str(tensor_file))
    meta["tensors"]["sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda meta, f: f.write_bytes(os.urandom(2048)), "sha256 differs"),
        (lambda meta, f: f.write_bytes(f.read_bytes()[:1000]), "sha256 differs"),
        (lambda meta, f: f.unlink(), "is missing"),
        (_foreign_tensors, "does not fit toyworld"),
    ],
    ids=["random-bytes", "truncated", "missing", "wrong-tensors"],
)
def test_a_damaged_tensor_file_is_a_clean_error(damage, why, data, run_copy, run):
    state, meta, tensor_file = state_parts(run_copy)
    damage(meta, tensor_file)
    state.write_text(json.dumps(meta))
    assert_clean_error(run(*resume_args(data, run_copy)), "unreadable training state", why, "--overwrite")


# --- folders that are not runs -----------------------------------------------------------------


def _thesis(out):
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("chapter 1")
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff cat")


def _run_plus_notes(out, run_folder):
    shutil.copytree(run_folder, out)
    (out / "notes.txt").write_text("my notes")


def _user_model_folder(out):
    out.mkdir()
    (out / "open_clip_model.safetensors").write_bytes(b"someone's model")
    (out / "open_clip_config.json").write_text("{}")


def _checkpoints_symlink(out, tmp_path):
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "state.json").write_text("{}")
    out.mkdir()
    (out / "finetune.json").write_text("{}")
    (out / "checkpoints").symlink_to(elsewhere)
    return elsewhere


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize(
    "contents, shown",
    [
        ("thesis", "photos/, thesis.tex"),
        ("run-plus-notes", "notes.txt"),
        ("user-model-folder", "open_clip_config.json, open_clip_model.safetensors"),
        ("checkpoints-symlink", "checkpoints (a symlink)"),
    ],
)
def test_a_folder_that_is_not_a_run_is_never_cleared(contents, shown, overwrite, data, interrupted_run, tmp_path, run):
    out = tmp_path / "out"
    elsewhere = None
    if contents == "thesis":
        _thesis(out)
    elif contents == "run-plus-notes":
        _run_plus_notes(out, interrupted_run)
    elif contents == "user-model-folder":
        _user_model_folder(out)
    else:
        elsewhere = _checkpoints_symlink(out, tmp_path)
    before, before_elsewhere = tree(out), tree(elsewhere) if elsewhere else None
    args = ["finetune", data["train"], "--out", out, *CLI_OPTIONS, *(["--overwrite"] if overwrite else [])]
    line = assert_clean_error(run(*args), str(out), shown, "choose another --out")
    assert ("nothing was deleted" if overwrite else "nothing was changed") in line
    assert tree(out) == before
    if elsewhere:
        assert tree(elsewhere) == before_elsewhere


def test_overwrite_refuses_to_delete_its_own_starting_model(data, interrupted_run, tmp_path, run):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    finetune(data["train"], out, "toyworld", options=TrainOptions(**OPTIONS), resume=True, show_progress_bar=False)
    before = tree(out)
    args = ["finetune", data["train"], "--out", out, *CLI_OPTIONS, "--overwrite"]
    args[args.index("toyworld")] = f"local-dir:{out / 'checkpoints' / 'epoch_1'}"
    assert_clean_error(run(*args), "--model", "inside the run that --overwrite would delete")
    assert tree(out) == before


def test_overwrite_replaces_a_real_run(data, interrupted_run, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    finetune(data["train"], out, "toyworld", options=TrainOptions(**OPTIONS), overwrite=True, show_progress_bar=False)
    assert_same_weights(weights(out), straight["train"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        ["epoch_1", "epoch_2", "state.json", _tensor_name(out)]
    )


def _tensor_name(out):
    return json.loads((out / "checkpoints" / "state.json").read_text())["tensors"]["file"]


# --- changed data, unreadable images, bad paths ------------------------------------------------


def test_resume_refuses_pairs_whose_content_changed(data, run_copy, tmp_path, run):
    changed = tmp_path / "pairs.tsv"
    header, *rows = data["train"].read_text().splitlines()
    rows = [_absolute(row, data) for row in rows]
    rows[5] += " again"  # the same rows, one caption edited
    changed.write_text("\n".join([header, *rows]) + "\n")
    state = json.loads((run_copy / "checkpoints" / "state.json").read_text())
    state["data"]["path"] = str(changed.resolve())  # as if the run had been started on this file
    _rewrite_json(run_copy / "checkpoints" / "state.json", state)
    args = resume_args(data, run_copy)
    args[1] = changed
    assert_clean_error(
        run(*args), "the training data changed", "same file and row count, but its content changed", "--overwrite"
    )


def _absolute(line, data):
    path, caption = line.split("\t")
    return f"{Path(path) if Path(path).is_absolute() else data['train'].parent / path}\t{caption}"


def _rewrite_json(path, obj):
    path.write_text(json.dumps(obj))


def test_an_epoch_in_which_no_image_can_be_read_is_an_error(tmp_path, run):
    train = write_pairs(tmp_path, 20, seed=13, broken=20)
    out = tmp_path / "out"
    line = assert_clean_error(
        run("finetune", train, "--out", out, *CLI_OPTIONS),
        str(train),
        "no trainable pairs in epoch 1: all 20 images were unreadable",
    )
    assert "13_0" in line  # names one of them
    assert not (out / "open_clip_model.safetensors").exists() and not (out / "finetune.json").exists()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("epoch_*"))


def _bad_path(kind, tmp_path, data):
    """(argument list, expected fragments) for a bad path of kind `kind`."""
    fifo = tmp_path / "fifo.tsv"
    os.mkfifo(fifo)
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    out = tmp_path / "out"
    cases = {
        "train-missing": ([tmp_path / "nope.tsv", "--out", out], ["nope.tsv", "no such file"]),
        "train-directory": ([tmp_path, "--out", out], [str(tmp_path), "is a directory"]),
        "train-fifo": ([fifo, "--out", out], ["fifo.tsv", "FIFO"]),
        "val-missing": ([data["train"], "--val", tmp_path / "nope.tsv", "--out", out], ["nope.tsv", "no such file"]),
        "val-directory": ([data["train"], "--val", tmp_path, "--out", out], [str(tmp_path), "is a directory"]),
        "val-fifo": ([data["train"], "--val", fifo, "--out", out], ["fifo.tsv", "FIFO"]),
        "out-under-a-file": ([data["train"], "--out", afile / "out"], ["afile.txt is a file, not a folder"]),
        "out-is-a-file": ([data["train"], "--out", afile], ["afile.txt: is a file, not a folder"]),
        "resume-nothing": ([data["train"], "--out", out, "--resume"], ["nothing to resume"]),
        "resume-and-overwrite": ([data["train"], "--out", out, "--resume", "--overwrite"], ["contradict"]),
    }
    return cases[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "train-missing",
        "train-directory",
        "train-fifo",
        "val-missing",
        "val-directory",
        "val-fifo",
        "out-under-a-file",
        "out-is-a-file",
        "resume-nothing",
        "resume-and-overwrite",
    ],
)
def test_bad_paths_fail_before_the_model_is_loaded(kind, tmp_path, data, run_cli):
    args, fragments = _bad_path(kind, tmp_path, data)
    # A model that does not exist: the path error must come first, so no model was loaded.
    result = run_cli("finetune", *args, "--model", "no-such-model", "--workers", "0", timeout=60)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "out").exists()


# --- interruptions -----------------------------------------------------------------------------


@pytest.mark.parametrize("at", ["step", "unreadable_image"])
def test_a_real_sigint_stops_at_a_step_boundary_and_resumes_bit_identically(at, data, straight, tmp_path):
    """SIGINT to this process, delivered between steps ("step" event) or in the middle of one
    (while it reports an unreadable image, before it trains): the step completes, the state is
    saved, KeyboardInterrupt follows; resuming gives exactly the uninterrupted run's weights."""
    key = "train" if at == "step" else "dirty"
    out = tmp_path / "run"
    sent, steps = [], []

    def signal_once(kind, details):
        if kind == "step":
            steps.append(details["step"])
        if kind == at and not sent and (kind != "step" or details["step"] == 2):
            sent.append(kind)
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            data[key], out, "toyworld", options=TrainOptions(**OPTIONS), on_event=signal_once, show_progress_bar=False
        )
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert sent and (state["epoch"], state["batch"]) == (0, steps[-1])  # the step under way was finished
    assert at != "step" or steps[-1] == 2
    result = finetune(data[key], out, "toyworld", options=TrainOptions(**OPTIONS), resume=True, show_progress_bar=False)
    assert result.resumed_at == (state["epoch"], state["batch"])
    assert_same_weights(weights(out), straight[key])


def _raise_once_on(monkeypatch, matches):
    """Make os.replace raise KeyboardInterrupt (as a Ctrl-C would) the first time its target matches."""
    real = os.replace
    fired = []

    def replace(src, dst, *args, **kwargs):
        if not fired and matches(Path(dst)):
            fired.append(str(dst))
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return fired


@pytest.mark.parametrize(
    "target",
    [
        lambda p: p.name == "epoch_1",  # the epoch folder's rename
        lambda p: p.name == "open_clip_model.safetensors" and p.parent.name.startswith(".epoch_1.tmp"),  # its weights
        lambda p: p.name == "open_clip_model.safetensors" and p.parent.name == "run",  # publishing the weights
        lambda p: p.name == "open_clip_config.json" and p.parent.name == "run",  # publishing the config
        lambda p: p.name.startswith("state-") and p.suffix == ".safetensors",  # the state's tensors
        lambda p: p.name == "state.json",  # the state's JSON
        lambda p: p.name == "finetune.json",  # the summary
    ],
    ids=[
        "epoch-rename",
        "epoch-weights",
        "publish-weights",
        "publish-config",
        "state-tensors",
        "state-json",
        "summary",
    ],
)
def test_an_interrupted_epoch_save_leaves_a_recoverable_run(target, monkeypatch, data, straight, tmp_path):
    out = tmp_path / "run"
    fired = _raise_once_on(monkeypatch, target)
    with pytest.raises(KeyboardInterrupt):
        finetune(data["train"], out, "toyworld", options=TrainOptions(**OPTIONS), show_progress_bar=False)
    assert fired
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    for epoch in checkpoints.glob("epoch_*"):  # never an empty or half-written epoch folder
        assert sorted(p.name for p in epoch.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert (checkpoints / "state.json").is_file()
    finetune(data["train"], out, "toyworld", options=TrainOptions(**OPTIONS), resume=True, show_progress_bar=False)
    assert_same_weights(weights(out), straight["train"])
    assert_same_weights(weights(checkpoints / "epoch_2"), straight["train"])
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        ["epoch_1", "epoch_2", "state.json", _tensor_name(out)]
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_save_are_removed_on_resume(data, run_copy, straight):
    checkpoints = run_copy / "checkpoints"
    (checkpoints / ".epoch_1.tmp-4242").mkdir()
    (checkpoints / ".epoch_1.tmp-4242" / ".open_clip_model.safetensors.tmp").write_bytes(b"half")
    (checkpoints / "state-0123456789abcdef.safetensors").write_bytes(b"stale")
    (checkpoints / ".state.json.4242.tmp").write_text("{")
    finetune(data["train"], run_copy, "toyworld", options=TrainOptions(**OPTIONS), resume=True, show_progress_bar=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        ["epoch_1", "epoch_2", "state.json", _tensor_name(run_copy)]
    )
    assert_same_weights(weights(run_copy), straight["train"])


def test_a_library_call_from_another_thread_still_trains(data, tmp_path):
    """Signal handlers belong to the main thread; elsewhere the loop runs without one."""
    import threading

    errors = []

    def work():
        try:
            finetune(
                data["train"],
                tmp_path / "out",
                "toyworld",
                options=TrainOptions(**{**OPTIONS, "epochs": 1}),
                show_progress_bar=False,
            )
        except (RetrieverError, ValueError) as e:  # ValueError: signal.signal outside the main thread
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors and (tmp_path / "out" / "open_clip_model.safetensors").is_file()
