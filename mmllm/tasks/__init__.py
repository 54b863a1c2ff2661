"""Tasks as plug-ins: what a model learns (classify a label, generate a target text) is one `Task` in a registry.

A task owns its whole life: its finetune options (fields of `FinetuneConfig`), the defaults it gives shared
options and its cross-option rules, the prepared column it learns, building the model and its training table
for the generic loop (a `Training`), its validation metrics (what --monitor may name), checking, saving and
loading its checkpoint, prediction output, `eval model` metrics and its part of the model card. The core (config,
the loop, evaluation, predict, serve, checkpoint, modelcard) loops over `names()` or asks `get(config["task"])`
and never spells a task. This module imports nothing heavy, nor does a plug-in's own module at import: their
training and inference code lives beside them and is imported when a task runs.

A new task is one package with a `Task` subclass (of `mmllm.tasks.base`, also reachable here) and one `register(...)`
line (here for the built-in ones; a user's plug-in registers itself the same way, before its options are used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmllm.registry import Registry
from mmllm.tasks.base import Task, Training, core_of  # noqa: F401 - re-exported

DEFAULT = "classify"  # the task of --task's default and of checkpoints written before tasks were recorded


def check_config(config: dict, folder: Path) -> list[str]:
    """Every problem with a checkpoint's config.json: the sections every task has (checkpoint.check_config), then
    its task's (`Task.check`); of an unknown task, that alone."""
    from mmllm import checkpoint

    problems = checkpoint.check_config(config)
    task = config.get("task", DEFAULT)
    if not known(task):
        from mmllm.modalities import spelled

        return problems + [f"task '{task}' is not {spelled(names())}"]
    return problems + get(task).check(config, folder)


def read_config(folder: str | Path) -> dict:
    """A checkpoint's config.json with every section checked (`check_config`), or a UserError naming them."""
    from mmllm import checkpoint

    return checkpoint.read_config(folder, check_config)


def missing_column(prepared: str, meta: dict, task: Task) -> str:
    """The error for prepared data without the column `task` learns: the columns prepare left unused, the prepare
    command that names one, and the other tasks whose column the data has."""
    unused = list(meta.get("ignored_columns") or [])
    source = " ".join((meta.get("input") or ["MANIFEST"])[:1])
    message = f"{prepared} has no {task.learns} column, so --task {task.name} has nothing to learn"
    if unused:
        message += (f"; prepare left these columns unused: {', '.join(unused)}: name the {task.learns} with "
                    f"{task.flag}, e.g. mmllm prepare {source} {task.flag} {unused[0]} --output ...")
    else:
        message += f": prepare again with {task.flag} naming the manifest's {task.learns} column"
    for other in all():
        if other.name != task.name and other.has_column(meta):
            message += f"; or train a {other.kind} on its {other.learns} column with --task {other.name}"
    return message


_REGISTRY: Registry = Registry("task")  # its hooks: config adds or drops the tasks' options
register, unregister, on_change = _REGISTRY.register, _REGISTRY.unregister, _REGISTRY.on_change


def get(name: Any) -> Task:
    return _REGISTRY[name]


def of(config: dict) -> Task:
    """The task of a checkpoint's (checked) config.json."""
    return _REGISTRY[config.get("task", DEFAULT)]


def known(name: Any) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all() -> list[Task]:  # noqa: A001 - the registry's own word
    return list(_REGISTRY.values())


def build_task(cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Training:
    """The Training of `cfg.task`."""
    return get(cfg.task).build(cfg, data, meta, modalities, dist)


def _builtins() -> None:
    from mmllm.tasks.classify import Classify
    from mmllm.tasks.generate import Generate

    for cls in (Classify, Generate):
        register(cls())


_builtins()
