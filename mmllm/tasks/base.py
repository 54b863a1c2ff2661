"""The base of every task plug-in: `Task`, the `Training` it hands the generic loop, and `core_of` for a plug-in
that keeps its heavy code in a `core` module.

The plug-ins (classify, generate, and a user's own) import these from here; the package `mmllm.tasks` re-exports
them and keeps the registry. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmllm.modalities.base import Option


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
