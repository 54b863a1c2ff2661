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


def build_task(cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Task:
    """The Task for `cfg.task` (a module of this package, imported only when chosen)."""
    return importlib.import_module(BUILDERS[cfg.task]).build(cfg, data, meta, modalities, dist)
