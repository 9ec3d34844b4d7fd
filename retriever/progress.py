"""Progress bars on stderr (rich), shown by default only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Any, Callable


class progress:
    """`with progress(total, "embedding", "texts", show) as advance: advance(n)`; a no-op when hidden."""

    def __init__(self, total: int | None, label: str, unit: str, show: bool | None = None):
        self.total, self.label, self.unit = total, label, unit
        self.show = (sys.stderr.isatty() if show is None else show) and total != 0
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        unit = self.unit

        class Speed(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed or 0:,.0f} {unit}/s")

        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), Speed(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda n: self.bar.advance(task, n) if n else None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
