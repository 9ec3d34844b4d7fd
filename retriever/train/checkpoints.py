"""Writing models as open_clip `local-dir:` folders, and the training state that `--resume` reads.

A model folder is `open_clip_config.json` + `open_clip_model.safetensors`, the layout open_clip's
`create_model("local-dir:PATH")` and `retriever.load_model("local-dir:PATH")` read. Every write
goes to a temporary name first and is renamed into place, so an interrupted save never leaves a
half-written checkpoint where a good one was.

The training state is never a pickle (unpickling a file someone hands over runs their code): its
tensors (model, optimizer, RNG) go to `state-<sha256>.safetensors` and everything else to
`state.json`, which names that file and its hash. The tensor file is written first under a new
name, then `state.json` is replaced, so a reader always finds a consistent pair: the old one or
the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.atomic import write_text_atomic
from retriever.errors import ModelError

if TYPE_CHECKING:
    from retriever.models.loading import LoadedModel

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
STATE_NAME = "state.json"
LEGACY_STATE_NAME = "state.pt"  # a pickle from earlier versions: refused, never opened
STATE_FORMAT = "retriever-finetune-state"
STATE_VERSION = 1
_TENSORS_FILE = re.compile(r"state-[0-9a-f]{16}\.safetensors")
_EPOCH_DIR = re.compile(r"epoch_[0-9]+")
# Names a save that was cut short leaves behind: temporary files and folders, replaced epochs.
LEFTOVER = re.compile(
    r"\.(open_clip_model\.safetensors|open_clip_config\.json|finetune\.json|state\.json)(\.[0-9]+)?\.tmp"
    r"|\.state\.[0-9]+\.safetensors\.tmp|\.epoch_[0-9]+\.(tmp|old)-[0-9]+"
)
RESTART_HINT = "start again with --overwrite (or choose another --out)"


def model_config(loaded: LoadedModel) -> dict:
    """The open_clip config (architecture + preprocessing) that rebuilds `loaded`'s model."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    name = loaded.extra.get("open_clip_name", loaded.spec.name)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelError(f"cannot find the open_clip config of {loaded.spec}")
    model_cfg = dict(model_cfg)
    if loaded.extra.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(loaded.model).items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def save_model_dir(model: Any, config: dict, directory: str | Path, info: dict | None = None) -> Path:
    """Write `model`'s weights and `config` as a `local-dir:` model folder (replacing one there)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(cpu_tensors(model.state_dict()), str(tmp))
    os.replace(tmp, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, {**config, **({"finetune": info} if info else {})})
    return directory


def save_epoch_dir(model: Any, config: dict, directory: str | Path, info: dict | None = None) -> Path:
    """Write a model folder under a temporary name and rename it to `directory` when complete.

    An interrupted save leaves a `.epoch_N.tmp-PID` folder (removed by `remove_leftovers`), never
    an empty or half-written `epoch_N`.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, config, tmp, info)
    if directory.exists():  # the epoch was saved before, by a run cut short before moving past it
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def publish_model_dir(source: str | Path, directory: str | Path) -> Path:
    """Make `directory` hold the model of folder `source` (hard links where the disk allows)."""
    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: the config marks a complete folder
        tmp = directory / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source / name, tmp)
        except OSError:
            shutil.copy2(source / name, tmp)
        os.replace(tmp, directory / name)
    return directory


def write_json(path: str | Path, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def cpu_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous CPU copies: safetensors refuses tensors that share storage (tied embeddings)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_state(directory: str | Path, tensors: dict[str, Any], meta: dict) -> Path:
    """Save a training state (tensors, and JSON-able `meta`) in `directory`; returns `state.json`'s path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".state.{os.getpid()}.safetensors.tmp"
    try:
        save_file(cpu_tensors(tensors), str(tmp))
        sha = file_sha256(tmp)
        name = f"state-{sha[:16]}.safetensors"
        os.replace(tmp, directory / name)
    finally:
        tmp.unlink(missing_ok=True)
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "tensors": {"file": name, "sha256": sha, "bytes": (directory / name).stat().st_size},
    }
    write_text_atomic(directory / STATE_NAME, json.dumps({**header, **meta}, indent=1, allow_nan=True) + "\n")
    remove_leftovers(directory, keep=name)
    return directory / STATE_NAME


def has_state(directory: str | Path) -> bool:
    """Whether `directory` holds a saved state (possibly an old pickled one, which `load_state` refuses)."""
    directory = Path(directory)
    return (directory / STATE_NAME).is_file() or (directory / LEGACY_STATE_NAME).is_file()


def load_state(directory: str | Path) -> tuple[dict, dict[str, Any]]:
    """(JSON part, tensors) of a state saved by `save_state`, checked against its recorded hash.

    Raises:
        ModelError: `FILE: unreadable training state (why); start again with --overwrite`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / STATE_NAME
    if not path.is_file() and (directory / LEGACY_STATE_NAME).is_file():
        raise unreadable(
            directory / LEGACY_STATE_NAME,
            "a pickled state from an earlier version; it is not opened, "
            "because unpickling a file can run any code in it",
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise unreadable(path, f"not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise unreadable(path, f"not a {STATE_FORMAT} file")
    if meta.get("version") != STATE_VERSION:
        raise unreadable(path, f"format version {meta.get('version')!r}; this version reads {STATE_VERSION}")
    tensors = meta.get("tensors")
    if not (
        isinstance(tensors, dict)
        and isinstance(tensors.get("file"), str)
        and _TENSORS_FILE.fullmatch(tensors["file"])
        and isinstance(tensors.get("sha256"), str)
    ):
        raise unreadable(path, "no valid 'tensors' entry")
    tensor_path = directory / tensors["file"]
    if not tensor_path.is_file():
        raise unreadable(path, f"its tensor file {tensors['file']} is missing")
    if file_sha256(tensor_path) != tensors["sha256"]:
        raise unreadable(tensor_path, "its sha256 differs from the one state.json recorded: cut short or edited")
    try:
        return meta, load_file(str(tensor_path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise unreadable(tensor_path, f"not a safetensors file: {e}") from None


def training_tensors(net: Any, optimizer: Any) -> tuple[dict[str, Any], list[dict]]:
    """(tensors, optimizer param groups) of a live run: model and optimizer state, and the torch RNG."""
    import torch

    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = torch.get_rng_state()
    return tensors, state["param_groups"]


def restore_tensors(
    path: Path, meta: dict, tensors: dict[str, Any], net: Any, optimizer: Any, scaler: Any, model_name: str
) -> None:
    """Load what `training_tensors` saved into live objects; a mismatch is an unreadable state."""
    import torch

    try:
        net.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optimizer_state, "param_groups": meta["optimizer_groups"]})
        if scaler is not None and meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng"])  # augmentation continues exactly where it stopped
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise unreadable(path, f"it does not fit {model_name}: {first_line}") from None


# The JSON fields of a fine-tuning state, checked before any of them is used.
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "options": dict,
    "data": dict,
    "epoch": int,
    "batch": int,
    "losses": list,
    "history": list,
    "unreadable": list,
    "before": (dict, type(None)),
    "seconds": (int, float),
    "optimizer_groups": list,
    "scaler": (dict, type(None)),
}


def check_state_fields(meta: dict, path: Path) -> None:
    """Raise ModelError (unreadable training state) unless the JSON part has the fields and types `restore` needs."""
    for key, kind in _STATE_FIELDS.items():
        if key not in meta:
            raise unreadable(path, f"no {key!r} field")
        if not isinstance(meta[key], kind) or (isinstance(meta[key], bool) and kind is int):
            raise unreadable(path, f"{key!r} is {type(meta[key]).__name__} {str(meta[key])[:40]!r}")
    model, data = meta["model"], meta["data"]
    problems = [
        (not isinstance(model.get("name"), str), "'model.name' is not a string"),
        (not isinstance(model.get("pretrained"), (str, type(None))), "'model.pretrained' is not a string or null"),
        (not isinstance(model.get("from_scratch"), bool), "'model.from_scratch' is not true or false"),
        (
            not all(isinstance(data.get(k), t) for k, t in (("path", str), ("pairs", int), ("sha256", str))),
            "'data' lacks path, pairs or sha256",
        ),
        (meta["epoch"] < 0 or meta["batch"] < 0, "a negative epoch or batch"),
        (
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in meta["losses"]),
            "a loss is not a number",
        ),
        (
            not all(isinstance(x, dict) for x in [*meta["history"], *meta["optimizer_groups"]]),
            "a history or optimizer entry is not an object",
        ),
        (not all(isinstance(x, str) for x in meta["unreadable"]), "an unreadable-image entry is not a string"),
    ]
    for failed, why in problems:
        if failed:
            raise unreadable(path, why)


def remove_leftovers(directory: str | Path, keep: str | None = None) -> list[str]:
    """Delete what interrupted saves left in a checkpoints folder; returns the names removed.

    `keep` is the tensor file `state.json` names; other `state-*.safetensors` files are stale.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        stale = LEFTOVER.fullmatch(entry.name) or (_TENSORS_FILE.fullmatch(entry.name) and entry.name != keep)
        if not stale or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def referenced_tensors(directory: str | Path) -> str | None:
    """The tensor file name `state.json` in `directory` refers to, or None if it cannot tell."""
    try:
        name = json.loads((Path(directory) / STATE_NAME).read_text(encoding="utf-8"))["tensors"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and _TENSORS_FILE.fullmatch(name) else None


def is_run_entry(relative: tuple[str, ...]) -> bool:
    """Whether a path inside an output folder (as its parts) is one that `finetune` writes."""
    top = {"finetune.json", CONFIG_NAME, WEIGHTS_NAME, "checkpoints"}
    if len(relative) == 1:
        return relative[0] in top or bool(LEFTOVER.fullmatch(relative[0]))
    if relative[0] != "checkpoints":
        return False
    name = relative[1]
    if len(relative) == 2:
        return name in (STATE_NAME, LEGACY_STATE_NAME) or bool(
            _TENSORS_FILE.fullmatch(name) or _EPOCH_DIR.fullmatch(name) or LEFTOVER.fullmatch(name)
        )
    if len(relative) == 3 and (_EPOCH_DIR.fullmatch(name) or LEFTOVER.fullmatch(name)):
        return relative[2] in (CONFIG_NAME, WEIGHTS_NAME) or bool(LEFTOVER.fullmatch(relative[2]))
    return False


def unreadable(path: Path, why: str) -> ModelError:
    """The error for a training state that cannot be used."""
    return ModelError(f"{path}: unreadable training state ({why}); {RESTART_HINT}")
