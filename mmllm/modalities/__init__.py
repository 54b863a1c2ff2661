"""Modalities as plug-ins: each kind of input next to text (image, audio, video) is one `Modality` in a registry.

A modality owns everything about its input: the record key and the column names it auto-detects, the file
extensions of class folders, its prepare options (`--<name>-column`, `--<name>-model` and its own, e.g.
`--max-audio-seconds`), decoding a file into its canonical form (with its limits), its frozen encoder, what its
soundtrack-like parts feed (`parts`), augmentation, and how the API and serve take it from memory. The core
(records, config, features, the model, checkpoints, serve) loops over `names()` and never spells a modality.
Text is the core's own input, not a plug-in. This module imports nothing heavy; nor does any plug-in at import.

A new modality is one module with a `Modality` subclass (of `mmllm.modalities.base`, also reachable here) and one
`register(...)` line (here for the built-in ones; a user's plug-in registers itself the same way, before its
options are used).
"""

from __future__ import annotations

from typing import Any

from mmllm.registry import Registry

from mmllm.modalities.base import TEXT, Modality, Option, flag, is_array, passes  # noqa: F401 - re-exported


_REGISTRY: Registry = Registry("modality", reserved=(TEXT,))  # its hooks: config adds or drops their options
register, unregister, on_change = _REGISTRY.register, _REGISTRY.unregister, _REGISTRY.on_change


def get(name: str) -> Modality:
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered modalities, in registration order (the order of model inputs and Arrow columns)."""
    return tuple(_REGISTRY)


def roles() -> tuple[str, ...]:
    """Every model input: text, then the registered modalities."""
    return (TEXT, *_REGISTRY)


def inputs() -> tuple[str, ...]:
    """The modalities a record holds itself (a column, a file): all but the part-only ones."""
    return tuple(m.name for m in _REGISTRY.values() if not m.carried_by)


def input_roles() -> tuple[str, ...]:
    """Every input a record can hold: text, then `inputs()`."""
    return (TEXT, *inputs())


def encoder_role(name: str) -> str:
    """The role whose encoder (and --<role>-model) `name` runs: its own, or the one a part-only modality shares."""
    return name if name == TEXT else _REGISTRY[name].encoder_of or name


def carrier(name: str) -> str:
    """The input a record must hold for `name`: itself, or the modality whose files carry it."""
    return name if name == TEXT else _REGISTRY[name].carried_by or name


def spare(source: str, part: str) -> str | None:
    """The part-only modality that takes the `part` of a `source` file when the record has its own `part`."""
    return next((m.name for m in _REGISTRY.values() if m.carried_by == source and m.encoder_of == part), None)


def all() -> list[Modality]:  # noqa: A001 - the registry's own word
    return list(_REGISTRY.values())


def options() -> list[tuple[Modality, Option]]:
    return [(m, o) for m in _REGISTRY.values() for o in m.options]


def option_default(name: str) -> Any:
    return next(o.default for _, o in options() if o.name == name)


def by_extension(ext: str) -> str | None:
    """The modality whose files end with `ext` (lower case, with the dot) in a class folder."""
    return next((m.name for m in _REGISTRY.values() if ext in m.extensions), None)


def spelled(words: tuple[str, ...] | None = None, conjunction: str = "or") -> str:
    """"text, image or audio": the inputs (or `words`) as a phrase."""
    words = tuple(input_roles() if words is None else words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def transcribed() -> str | None:
    """The modality --transcribe turns into text."""
    return next((m.name for m in _REGISTRY.values() if m.transcribable), None)


def _builtins() -> None:
    from mmllm.modalities.audio import Audio
    from mmllm.modalities.image import Image
    from mmllm.modalities.video import Video, VideoAudio

    for cls in (Image, Audio, Video, VideoAudio):
        register(cls())


_builtins()


def load_encoder(role: str, name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
    """The encoder of a role (text, or a modality's plug-in); `precision` (auto, fp32, bf16) is how its frozen
    forward runs."""
    from mmllm.encoders import TextEncoder
    from mmllm.errors import UserError

    try:
        if role == TEXT:
            return TextEncoder(name, trust_remote_code=trust_remote_code, precision=precision)
        return get(role).load_encoder(name, trust_remote_code=trust_remote_code, precision=precision)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {role} model '{name}': {str(e).splitlines()[0]}") from None
