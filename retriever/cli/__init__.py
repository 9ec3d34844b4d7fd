"""The `retriever` command line: a thin layer over the library, one module per group of commands."""

from __future__ import annotations

import sys

# Importing a group registers its commands; --help lists them in this order.
from retriever.cli import (
    prompts,  # noqa: E402,F401,I001
    search,  # noqa: E402,F401,I001
    training,  # noqa: E402,F401,I001
    evaluate,  # noqa: E402,F401,I001
    style,  # noqa: E402,F401,I001
    about,  # noqa: E402,F401,I001 (--version)
)
from retriever.cli.common import app, stderr

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        stderr("interrupted (an interrupted build-index resumes where it stopped when run again)")
        sys.exit(130)
