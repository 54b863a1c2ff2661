"""Tasks: each module builds a `Task` (model, training table, validation, save) for the generic loop.

`--task` picks a builder from `BUILDERS`; a new task is one module with a `build(cfg, data, meta, modalities, dist)`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BUILDERS = {"classify": "mmllm.tasks.classify", "generate": "mmllm.tasks.generate"}


@dataclasses.dataclass
class Task:
    """What the generic loop needs from a task ."""

    model: torch.nn.Module  # forward(batch) -> {"loss": ...}; backbone_parameters() -> pretrained params
    train: Any  # len(train), train.batch(indices, device) -> dict with "labels"
    validate: Callable[[torch.nn.Module], dict]  # -> {"val_loss": ..., other val_* metrics}
    save: Callable[[torch.nn.Module, Path, dict], None]  # write the checkpoint files into a folder


def missing_column(prepared: str, meta: dict, role: str) -> str:
    """The error for a prepared dataset without the label (`role` "label", --task classify) or target ("target",
    --task generate) column: the columns prepare left unused, the prepare command that names one, and the other
    task when the data has what it needs."""
    want, flag, task = ("labels", "--label-column", "classify") if role == "label" else \
        ("target column", "--target-column", "generate")
    unused = list(meta.get("ignored_columns") or [])
    source = " ".join((meta.get("input") or ["MANIFEST"])[:1])
    message = f"{prepared} has no {want}, so --task {task} has nothing to learn"
    if unused:
        message += (f"; prepare left these columns unused: {', '.join(unused)}: name the {role} with {flag}, e.g. "
                    f"mmllm prepare {source} {flag} {unused[0]} --output ...")
    else:
        message += f": prepare again with {flag} naming the manifest's {role} column"
    if role == "label" and meta.get("has_target"):
        message += "; or train a generator on its target column with --task generate"
    elif role == "target" and meta.get("labels"):
        message += "; or train a classifier on its labels with --task classify"
    return message


def build_task(cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Task:
    """The Task for `cfg.task` (a module of this package, imported only when chosen)."""
    return importlib.import_module(BUILDERS[cfg.task]).build(cfg, data, meta, modalities, dist)
