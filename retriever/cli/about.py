"""`retriever --version`, and the one-line warning when weecology's Data Retriever shares the environment.

Versions come from installed package metadata (importlib.metadata), so neither reports imports
torch, open_clip or faiss.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution, version
from typing import Annotated

import typer

from retriever.cli.common import app, stderr

DISTRIBUTION = "caption-retriever"
# What the library is built on, by distribution name; FAISS is whichever of the two is installed.
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "pyarrow")


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def data_retriever_version() -> str | None:
    """The version of weecology's Data Retriever if it is installed here (PyPI's `retriever`), else None.

    It installs a `retriever` package and command too, so the two overwrite each other's files.
    """
    try:
        dist = distribution("retriever")
    except PackageNotFoundError:
        return None
    meta = dist.metadata
    text = " ".join(
        str(v) for key in ("Author", "Author-email", "Home-page", "Summary") for v in (meta.get_all(key) or [])
    )
    text += " ".join(meta.get_all("Project-URL") or [])
    # This project was itself called `retriever` before the rename (a development install): not a clash.
    return dist.version if "weecology" in text.lower() or "data retriever" in text.lower() else None


def clash_message(found: str) -> str:
    return (
        f"warning: weecology's Data Retriever {found} is installed in this environment; it also installs a "
        f"`retriever` package and command, so one breaks the other: use a separate virtual environment "
        f"for {DISTRIBUTION}"
    )


def versions_text() -> str:
    """What `retriever --version` prints: this package, the index format, and the libraries it runs on."""
    import platform

    import retriever
    from retriever.index.store import READABLE_FORMATS

    lines = [
        f"retriever {retriever.__version__} ({DISTRIBUTION})",
        f"index formats {', '.join(map(str, READABLE_FORMATS))}",
        f"python {platform.python_version()}",
    ]
    lines += [f"{name} {found}" for name in LIBRARIES if (found := installed_version(name))]
    if not (installed_version("faiss-cpu") or installed_version("faiss-gpu-cu12")):
        lines.append(f"faiss not installed (pip install '{DISTRIBUTION}[cpu]')")
    if (other := data_retriever_version()) is not None:
        lines.append(clash_message(other))
    return "\n".join(lines)


def _print_version(value: bool) -> None:
    if value:
        print(versions_text())
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            callback=_print_version,
            help="Print the version, the index format and library versions, and exit.",
        ),
    ] = False,
) -> None:
    if (other := data_retriever_version()) is not None:
        stderr(clash_message(other))
