"""Tasks as plug-ins: what a model learns (classify a label, generate a target text) is one `Task` in a registry.

A task owns its whole life: its finetune options (fields of `FinetuneConfig`), the defaults it gives shared
options and its cross-option rules, the prepared column it learns, building the model and its training table
for the generic loop (a `Training`), its validation metrics (what --monitor may name), checking, saving and
loading its checkpoint, prediction output, `eval model` metrics and its part of the model card. The core (config,
the loop, evaluation, predict, serve, checkpoint, modelcard) loops over `names()` or asks `get(config["task"])`
and never spells a task. This module imports nothing heavy, nor does a plug-in's own module at import: their
training and inference code lives beside them and is imported when a task runs.

A new task is one package with a `Task` subclass and one `register(...)` line (here for the built-in ones; a
user's plug-in registers itself the same way, before its options are used).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmllm.modalities import Option
from mmllm.registry import Registry

DEFAULT = "classify"  # the task of --task's default and of checkpoints written before tasks were recorded


@dataclasses.dataclass
class Training:
    """What the generic loop needs from a task for one run."""

    model: Any  # a torch Module: forward(batch) -> {"loss": ...}; backbone_parameters() -> pretrained params
    train: Any  # len(train), train.batch(indices, device) -> dict with "labels"
    validate: Callable[[Any], dict]  # -> {"val_loss": ..., other val_* metrics}
    save: Callable[[Any, Path, dict], None]  # write the checkpoint files into a folder


class Task:
    """One task. Subclasses set the class attributes and implement the methods that raise NotImplementedError."""

    name: str = ""
    help: str = ""  # how --task's help names it, e.g. "classify (label column)"
    kind: str = ""  # what its checkpoint is, for the model card ("classifier")
    learns: str = ""  # the prepared column it learns from ("label", "target"), for error messages
    flag: str = ""  # the prepare option naming that column ("--label-column")
    metrics: tuple[str, ...] = ("val_loss",)  # the validation metrics it reports: what --monitor may name
    options: tuple[Option, ...] = ()  # finetune options only this task reads
    defaults: dict = {}  # values of shared finetune options left at None (their "default: ..." for this task)
    generates: bool = False  # produces text: predict/serve take generation options, serve offers chat routes
    reads_prompt: bool = False  # its checkpoints read a record's text even without a text modality (the prompt)

    # ------------------------------------------------------------ configuration (light)

    def fill(self, cfg: Any) -> None:
        """Resolve the finetune options whose default depends on this task (called as the config is built)."""
        for name, value in self.defaults.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)

    def rules(self, cfg: Any, mods: list[str], explicit: bool) -> list[str]:
        """Cross-option problems of a finetune config of this task (`mods`: --modalities; `explicit`: given)."""
        return []

    def has_column(self, meta: dict) -> bool:
        """Whether prepared data (its metadata) has what this task learns from."""
        raise NotImplementedError

    # ------------------------------------------------------------ training and inference (imported when run)

    def build(self, cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Training:
        raise NotImplementedError

    def check(self, config: dict, folder: Path) -> list[str]:
        """Every problem with this task's sections of a checkpoint's config.json."""
        return []

    def load(self, folder: Path, config: dict, device: Any) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer or None) of a checkpoint whose config.json was checked."""
        raise NotImplementedError

    def input_flags(self, model: Any) -> dict:
        """What the featurizer must compute for this model: {"text_states": bool, "transcripts": bool | None,
        "media_features": bool (False: the media are kept as bytes, never encoded)}."""
        return {}

    def predict(self, predictor: Any, rows: list[dict], top_k: int, reliance: bool, generation: dict) -> dict:
        """{row id: result dict} for featurized rows."""
        raise NotImplementedError

    def evaluate(self, cfg: Any, config: dict, device: Any) -> dict:
        """`eval model`'s result dict (task, checkpoint, data, split, n and the metrics)."""
        raise NotImplementedError

    # ------------------------------------------------------------ model card

    def card_modalities(self, config: dict) -> list[str]:
        return list(config["model"]["modalities"])

    def card_tags(self, config: dict) -> list[str]:
        """Extra front-matter lines (e.g. a pipeline_tag)."""
        return []

    def card_usage(self, config: dict) -> list[str]:
        """Lines after the usage commands: how its pretrained parts are used on their own."""
        return []

    def card_encoder_rows(self, config: dict, license_of: Any, md: Any) -> list[str]:
        """Rows of the card's encoder table beyond the prepared encoders' (e.g. a decoder)."""
        return []

    def card_notes(self, config: dict, frozen: Any) -> list[str]:
        """The sentences under the encoder table; `frozen(roles)` is the one for frozen encoders."""
        return frozen(list(config.get("encoders") or {}))

    def card_files(self, config: dict) -> dict[str, str]:
        """Its files in the checkpoint folder beyond the common ones: {name: what it holds}."""
        return {}

    def card_training(self, config: dict) -> str | None:
        """How its pretrained part was trained ("lora", "full", "frozen"), or None."""
        return None


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


def core_of(package: str) -> tuple[Callable[[], Any], Callable[[str], Any]]:
    """(core, __getattr__) for a task package that keeps its heavy code in `<package>.core`: `core()` imports it on
    first use, and the module-level `__getattr__` (PEP 562) forwards the package's other names to it."""

    def core() -> Any:
        return importlib.import_module(f"{package}.core")

    def forward(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(core(), name)

    return core, forward


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
