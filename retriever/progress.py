"""Progress bars on stderr (rich), shown by default only when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class progress:
    """`with progress(total, "embedding", "texts", show) as advance: advance(n)`; a no-op when hidden.

    `advance(n, "loss 1.23")` also replaces the text shown after the bar.
    """

    def __init__(self, total: int | None, label: str, unit: str, show: bool | None = None):
        self.total, self.label, self.unit = total, label, unit
        self.show = (sys.stderr.isatty() if show is None else show) and total != 0
        self.bar: Any = None

    def __enter__(self) -> Callable[..., None]:
        if not self.show:
            return lambda n, info=None: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        unit = self.unit

        class Speed(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.speed or 0
                return Text(f"{speed:,.0f} {unit}/s" if speed >= 10 else f"{speed:.2f} {unit}/s")

        self.bar = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            Speed(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("", total=self.total, info="")

        def advance(n: int, info: str | None = None) -> None:
            if info is not None:
                self.bar.update(task, advance=n, info=info)
            elif n:
                self.bar.advance(task, n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
