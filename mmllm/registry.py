"""A registry of named plug-ins (modalities, tasks): a dict by name whose hooks hear every (un)registration, so
that the configs add or drop the plug-in's options at once. Light: it imports nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict):
    """name -> plug-in, in registration order; `hooks` are called with (plug-in, added)."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()):
        super().__init__()
        self.kind, self.reserved = kind, reserved
        self.hooks: list[Callable[[Any, bool], None]] = []

    def register(self, item: Any) -> Any:
        """Add a plug-in (its options become options of the configs at once)."""
        if not item.name or item.name in self.reserved or item.name in self:
            raise ValueError(f"cannot register a {self.kind} named {item.name!r}")
        self[item.name] = item
        for hook in self.hooks:
            hook(item, True)
        return item

    def unregister(self, name: str) -> None:
        item = self.pop(name)
        for hook in self.hooks:
            hook(item, False)

    def on_change(self, hook: Callable[[Any, bool], None]) -> None:
        self.hooks.append(hook)
