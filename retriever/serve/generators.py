"""What `retriever serve` loads: its indexes, and every `--generator`, once, for the indexes it fits.

A CoCa writes captions from the image alone, so one loaded copy serves every index. A style
decoder (`style:PATH`) reads the embedding of the CLIP model it was trained with: it runs on the
CLIP model already loaded for an index built with that model (one decoder per model, or per
index with `memory=index`), and is not offered for indexes built with another model
(`/v1/indexes` lists the generators of each index). A style decoder that fits none of the
indexes is refused at start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError

if TYPE_CHECKING:
    from retriever.search.api import Retriever

GENERATOR_ONLY = "generator"  # the name of the one entry of a server started without an index


@dataclass
class Served:
    """A server's Retrievers by index name (each with its default generator), and every generator
    each index can use, by the name it was given on the command line (the first is the default)."""

    retrievers: dict[str, Retriever]
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)


def generator_name(generator: Any) -> str:
    """The name a generator is known by when no name was given: its spec (`style:PATH`, `NAME:TAG`)."""
    return str(generator.spec)


def generators_of(retrievers: dict[str, Retriever]) -> dict[str, dict[str, Any]]:
    """Each Retriever's own generator (if any), named by its spec: the generators of a server given Retrievers only."""
    return {
        name: ({generator_name(r.generator): r.generator} if r.generator is not None else {})
        for name, r in retrievers.items()
    }


def open_served(indexes: Sequence[str | Path], generators: Sequence[str], device: str | None = None) -> Served:
    """Open `indexes` (named by directory) and load each of `generators` once.

    Args:
        indexes: index directories; none for a server that only writes captions.
        generators: `--generator` values (a CoCa `NAME[:TAG]` or `style:PATH`); the first is the default.
        device: as for `load_model`.

    Raises:
        RetrieverError: two indexes or generators of one name, a generator that cannot load, or
            a style decoder trained with a CLIP model none of the indexes was built with.
    """
    from retriever.generate.style import parse_style_ref
    from retriever.search.api import Retriever

    names = [g.strip() for g in generators]
    twice = {n for n in names if names.count(n) > 1}
    if twice:
        raise RetrieverError(f"--generator {min(twice)} is given twice")
    trained = {
        ref: _trained_with(ref) for ref in names if _is_style(ref)
    }  # a mistyped folder fails before any model loads
    retrievers: dict[str, Retriever] = {}
    for path in indexes:
        name = Path(path).name
        if name in retrievers:
            raise RetrieverError(f"two indexes are named {name!r}; rename one directory")
        retrievers[name] = Retriever.open(path, device=device)
    if not retrievers:
        loaded = {n: Retriever.open(None, device=device, generator=n).generator for n in names}
        first = next(iter(loaded.values()), None)
        return Served({GENERATOR_ONLY: Retriever(None, None, first)}, {GENERATOR_ONLY: loaded})

    fitting = {
        ref: [name for name, r in retrievers.items() if _clip(r).fingerprint == clip.get("fingerprint")]
        for ref, clip in trained.items()
    }
    for ref, clip in trained.items():
        if not fitting[ref]:
            built = sorted({f"{_clip(r).spec} ({name})" for name, r in retrievers.items()})
            raise RetrieverError(
                f"{ref} was trained with CLIP {clip.get('name')} [{clip.get('fingerprint')}], "
                f"which built none of the indexes: {', '.join(built)}"
            )
    served: dict[str, dict[str, Any]] = {name: {} for name in retrievers}
    for ref in names:
        if not _is_style(ref):
            coca = Retriever.open(None, device=device, generator=ref).generator  # one copy for every index
            for per_index in served.values():
                per_index[ref] = coca
            continue
        by_model: dict[str, Any] = {}  # one decoder per CLIP model, unless each index is its memory
        for name in fitting[ref]:
            r = retrievers[name]
            key = name if parse_style_ref(ref)[1].get("memory") == "index" else _clip(r).fingerprint
            if key not in by_model:
                by_model[key] = _load_style(ref, r, device)
            served[name][ref] = by_model[key]
    out = {}
    for name, r in retrievers.items():
        default = next(iter(served[name].values()), None)
        out[name] = Retriever(r.index, r.model, default, r.indexes[1:]) if default is not None else r
    return Served(out, served)


def _is_style(ref: str) -> bool:
    from retriever.generate.style import STYLE_PREFIX

    return ref.startswith(STYLE_PREFIX)


def _trained_with(ref: str) -> dict:
    from retriever.generate.style import resolve_style_path
    from retriever.generate.style_model import read_style_folder

    return read_style_folder(resolve_style_path(ref)).clip


def _load_style(ref: str, retriever: Retriever, device: str | None) -> Any:
    """A style decoder on an index's CLIP model (with the index as its memory when the ref asks)."""
    from retriever.generate.style import load_generator
    from retriever.search.style_memory import index_memory

    generator = load_generator(ref, device=device, clip=retriever.model)
    if getattr(generator, "wants_index_memory", False):
        assert retriever.index is not None
        generator.memory_lookup = index_memory(retriever.index)
    return generator


def _clip(retriever: Retriever) -> Any:
    """The CLIP model of a Retriever opened on an index (which always has one)."""
    assert retriever.model is not None
    return retriever.model
