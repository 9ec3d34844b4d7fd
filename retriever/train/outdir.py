"""The output folder of a fine-tuning run: checked before anything is loaded, cleared only of our files.

`--overwrite` deletes only what `finetune` writes (see `checkpoints.is_run_entry`), and only when
the folder is recognisably a run; a folder holding anything else is refused with a list of what
is there, and nothing is deleted. The checks use `stat` and directory listings only, so a typo in
`--out` fails in milliseconds, before the model or the data are loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from retriever.errors import RetrieverError
from retriever.train.checkpoints import has_state, is_run_entry

_SHOWN = 5  # foreign entries named in an error


def check_out(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Check that `out` can take this run; returns the entries `--overwrite` will delete (once inputs check out).

    Raises:
        RetrieverError: `out` is a file or under one, cannot be created, holds someone else's
            files, holds a run and neither --resume nor --overwrite was given, or has nothing to resume.
    """
    if resume and overwrite:
        raise RetrieverError("--resume and --overwrite contradict each other; give one")
    if out.is_symlink() and not out.exists():
        raise RetrieverError(f"{out}: broken symlink (it points to {os.readlink(out)}); fix it or choose another --out")
    if out.exists() and not out.is_dir():
        raise RetrieverError(f"{out}: is a file, not a folder; choose a folder for --out")
    if not out.exists():
        _check_creatable(out)
        if resume:
            raise RetrieverError(f"{out}: nothing to resume (no such folder); drop --resume to start a run there")
        return []
    checkpoints = out / "checkpoints"
    if resume:
        if not has_state(checkpoints):
            raise RetrieverError(
                f"{out}: nothing to resume (no checkpoints/state.json); drop --resume to start a run "
                f"there, or check the folder"
            )
        return []
    ours, foreign = _scan(out)
    if not ours and not foreign:
        return []
    is_run = (
        (out / "finetune.json").is_file()
        or has_state(checkpoints)
        or any(len(p.relative_to(out).parts) == 2 and p.name.startswith("epoch_") for p in ours)
    )
    if foreign or not is_run:
        listed = foreign or [p for p in ours if len(p.relative_to(out).parts) == 1]
        shown = ", ".join(_describe(e, out) for e in listed[:_SHOWN])
        more = f" and {len(listed) - _SHOWN} more" if len(listed) > _SHOWN else ""
        action = (
            "--overwrite only replaces fine-tuning runs, and nothing was deleted"
            if overwrite
            else "nothing was changed"
        )
        what = (
            "a fine-tuning run, but also files it did not write" if is_run else "files that are not a fine-tuning run"
        )
        raise RetrieverError(f"{out} holds {what} ({shown}{more}); {action}: choose another --out, or move them away")
    if not overwrite:
        raise RetrieverError(
            f"{out} is not empty: it holds a fine-tuning run (add --resume to continue it, "
            f"or --overwrite to start over)"
        )
    return [p for p in ours if len(p.relative_to(out).parts) == 1]


def guard_inputs(to_clear: list[Path], inputs: dict[str, str | Path | None]) -> None:
    """Refuse to clear a folder that holds one of this run's own inputs (e.g. `--model local-dir:OUT/...`)."""
    if not to_clear:
        return
    cleared = [p.resolve() for p in to_clear]
    for what, path in inputs.items():
        if not path:
            continue
        resolved = Path(path).expanduser().resolve()
        if any(resolved == c or c in resolved.parents for c in cleared):
            raise RetrieverError(
                f"{what} {path} is inside the run that --overwrite would delete; "
                f"copy it elsewhere first, or write the new run to another --out"
            )


def clear(entries: list[Path]) -> None:
    """Delete the run files `check_out` listed (plain files and our own folders; never through a symlink)."""
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def _check_creatable(out: Path) -> None:
    parent = out.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise RetrieverError(f"{out}: cannot be created: {parent} is a broken symlink; choose another --out")
        parent = parent.parent
    if not parent.is_dir():
        raise RetrieverError(f"{out}: cannot be created: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RetrieverError(f"{out}: cannot be created: no permission to write in {parent}; choose another --out")


def _scan(out: Path) -> tuple[list[Path], list[Path]]:
    """(our entries, foreign ones) under `out`; foreign folders and symlinks are not entered."""
    ours: list[Path] = []
    foreign: list[Path] = []
    pending = [out]
    while pending:
        folder = pending.pop()
        try:
            children = sorted(folder.iterdir())
        except OSError as e:
            raise RetrieverError(f"{folder}: cannot be listed ({e.strerror or e}); choose another --out") from None
        for child in children:
            if child.is_symlink() or not is_run_entry(child.relative_to(out).parts):
                foreign.append(child)
                continue
            ours.append(child)
            if child.is_dir():
                pending.append(child)
    return ours, sorted(foreign)


def _describe(entry: Path, out: Path) -> str:
    relative = str(entry.relative_to(out))
    if entry.is_symlink():
        return f"{relative} (a symlink)"
    return f"{relative}/" if entry.is_dir() else relative
