"""stderr console, progress bars and the stdout JSON writer.

stdout carries results only (JSON / JSONL); everything for humans goes to stderr.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line stays one line in pipes
QUIET = False  # the process-wide --quiet of the CLI
RANK = 0  # this process's rank under torchrun: only rank 0 prints logs, tables, progress and warnings
# the Python API's settings, per thread (and per asyncio task): one caller's quiet or capture never reaches another
_QUIET: ContextVar[bool | None] = ContextVar("mmllm_quiet", default=None)
_CAPTURED: ContextVar[list | None] = ContextVar("mmllm_captured", default=None)  # emit() collects here (`capture`)


def set_quiet(quiet: bool) -> None:
    """--quiet for the whole process (the CLI)."""
    global QUIET
    QUIET = quiet


def set_rank(rank: int) -> None:
    """Under torchrun: a rank other than 0 prints nothing for humans (results and errors are not affected)."""
    global RANK
    RANK = rank


def is_quiet() -> bool:
    """--quiet, the caller's own `quieted` setting, or a rank other than 0."""
    own = _QUIET.get()
    return RANK != 0 or (QUIET if own is None else own)


@contextmanager
def quieted(quiet: bool | None) -> Iterator[None]:
    """Silence (or not) log lines, tables and progress in this thread meanwhile; None keeps the setting."""
    token = _QUIET.set(quiet) if quiet is not None else None
    try:
        yield
    finally:
        if token is not None:
            _QUIET.reset(token)


def log(message: str) -> None:
    """A progress/log line on stderr (silenced by --quiet); plain text: brackets in it (a file name, a label) are
    printed as they are, never read as rich markup."""
    if not is_quiet():
        err.print(escape(message))


def show(renderable) -> None:
    """A rich table or text for humans on stderr (silenced by --quiet); a string is plain text (as `log`)."""
    if not is_quiet():
        err.print(escape(renderable) if isinstance(renderable, str) else renderable)


def warn(message: str) -> None:
    """A warning on stderr; never silenced (but printed by rank 0 only under torchrun)."""
    if RANK != 0:
        return
    err.print(f"[yellow]warning:[/yellow] {escape(message)}")


def emit(obj: Any, stream=None) -> None:
    """Write one JSON document (one line) to stdout and flush, so pipes see it at once (inside `capture`:
    collect it instead)."""
    captured = _CAPTURED.get()
    if captured is not None:
        captured.append(as_json(obj))
        return
    stream = stream or sys.stdout
    try:
        stream.write(json.dumps(obj, ensure_ascii=False, default=_jsonable) + "\n")
    except UnicodeEncodeError:  # a lone surrogate (or a narrow stdout encoding): the same JSON with \u escapes
        stream.write(json.dumps(obj, ensure_ascii=True, default=_jsonable) + "\n")
    stream.flush()


def as_json(obj: Any) -> Any:
    """`obj` as a JSON reader of stdout gets it (what `emit` would print, read back)."""
    return json.loads(json.dumps(obj, ensure_ascii=False, default=_jsonable))


@contextmanager
def capture(quiet: bool | None = None) -> Iterator[list]:
    """Collect the documents `emit` would print in this thread, as the dicts a JSON reader of stdout gets (the
    Python API's summaries of prepare / finetune / eval); `quiet` sets --quiet meanwhile, for this thread only."""
    collected: list = []
    token = _CAPTURED.set(collected)
    try:
        with quieted(quiet):
            yield collected
    finally:
        _CAPTURED.reset(token)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "records") -> Iterator:
    """Rich progress bar on stderr; yields `advance(n)`. A no-op under --quiet."""
    if is_quiet():
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
