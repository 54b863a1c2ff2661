"""CLI start-up: `mmllm --help` against `python -c 'import typer'` (the floor for any Typer CLI)."""

from __future__ import annotations

import sys

from common import median_time, mmllm_exe, run_cmd

TARGET = "help <= 0.5 s and <= 8x import typer"


def run(repeat: int) -> dict:
    """Median wall time of each command over `repeat` runs; ratio = help_s / import_typer_s."""
    help_s = median_time(lambda: run_cmd([mmllm_exe(), "--help"]), repeat)
    typer_s = median_time(lambda: run_cmd([sys.executable, "-c", "import typer"]), repeat)
    ratio = help_s / typer_s
    return {"help_s": help_s, "import_typer_s": typer_s, "ratio": ratio, "target": TARGET,
            "met": help_s <= 0.5 and ratio <= 8}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    return [f"| CLI start-up | `mmllm --help` {r['help_s']:.3f} s | `python -c 'import typer'` "
            f"{r['import_typer_s']:.3f} s | {r['ratio']:.2f}x | {r['target']} | {r['met']} |"], []
