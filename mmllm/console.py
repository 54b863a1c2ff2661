"""stderr console, progress bars and the stdout JSON writer.

stdout carries results only (JSON / JSONL); everything for humans goes to stderr.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any
from collections.abc import Iterator

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line stays one line in pipes
QUIET = False
CAPTURED: list | None = None  # set by `capture`: emit() collects here instead of printing


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def log(message: str) -> None:
    """A progress/log line on stderr (silenced by --quiet)."""
    if not QUIET:
        err.print(message)


def show(renderable) -> None:
    """A rich table or text for humans on stderr (silenced by --quiet)."""
    if not QUIET:
        err.print(renderable)


def warn(message: str) -> None:
    """A warning on stderr; never silenced."""
    err.print(f"[yellow]warning:[/yellow] {message}")


def emit(obj: Any, stream=None) -> None:
    """Write one JSON document (one line) to stdout and flush, so pipes see it at once (inside `capture`:
    collect it instead)."""
    if CAPTURED is not None:
        CAPTURED.append(json.loads(json.dumps(obj, ensure_ascii=False, default=_jsonable)))  # what a pipe reads
        return
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, ensure_ascii=False, default=_jsonable) + "\n")
    stream.flush()


@contextmanager
def capture(quiet: bool | None = None) -> Iterator[list]:
    """Collect the documents `emit` would print, as the dicts a JSON reader of stdout gets (the Python API
    returns them); `quiet` sets --quiet meanwhile."""
    global CAPTURED
    saved, saved_quiet = CAPTURED, QUIET
    CAPTURED = []
    if quiet is not None:
        set_quiet(quiet)
    try:
        yield CAPTURED
    finally:
        CAPTURED = saved
        set_quiet(saved_quiet)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "records") -> Iterator:
    """Rich progress bar on stderr; yields `advance(n)`. A no-op under --quiet."""
    if QUIET:
        yield lambda n=1, **_: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=total, info="", rate="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f} {unit}/s")

        yield advance


def quiet_transformers() -> None:
    """Silence transformers' own logging and progress bars (mmllm reports progress itself)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
