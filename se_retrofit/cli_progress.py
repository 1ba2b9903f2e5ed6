"""What the command line is doing, while it does it: a spinner with the stage's name on a terminal,
and a line with its time when the stage ends. Nothing where stderr is not a terminal (piped, in a
log, under a test), so piped output and ``--json`` stay exactly as they were.

Example:
    >>> from rich.console import Console
    >>> import io
    >>> progress = Progress(Console(file=io.StringIO()))  # not a terminal: silent
    >>> with progress.stage("building resnet50"):
    ...     pass
    >>> progress.enabled
    False
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console


class Progress:
    """Stages shown on ``console`` (the stderr one) when it is a terminal."""

    def __init__(self, console: Console, enabled: bool | None = None):
        self.console = console
        self.enabled = console.is_terminal if enabled is None else enabled
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"{text} …"):
            yield
        self.console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - start:.1f} s)[/]", highlight=False)

    def done(self) -> None:
        if self.enabled:
            self.console.print(f"[dim]done in {time.perf_counter() - self.started:.1f} s[/]", highlight=False)
