"""Writing models as open_clip `local-dir:` folders, and the training state that `--resume` reads.

A model folder is `open_clip_config.json` + `open_clip_model.safetensors`, the layout open_clip's
`create_model("local-dir:PATH")` and `retriever.load_model("local-dir:PATH")` read. Every write
goes to a temporary name first and is renamed into place, so an interrupted save never leaves a
half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.atomic import write_text_atomic
from retriever.errors import ModelError

if TYPE_CHECKING:
    from retriever.models.loading import LoadedModel

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
STATE_NAME = "state.pt"


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
    # Clones: safetensors refuses tensors that share storage (tied embeddings).
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, {**config, **({"finetune": info} if info else {})})
    return directory


def publish_model_dir(source: str | Path, directory: str | Path) -> Path:
    """Make `directory` hold the model of folder `source` (hard links where the disk allows)."""
    import shutil

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


def save_state(path: str | Path, state: dict) -> None:
    """Atomically save the training state (model, optimizer, position) for `--resume`."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict:
    """Read a state written by `save_state` (on the CPU; tensors move with the model)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"{path}: unreadable training state ({e})") from e
