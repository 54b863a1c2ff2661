"""The base of every modality plug-in: `Modality`, the `Option`s plug-ins add, and the helpers for in-memory media.

The plug-ins (image, audio, video, and a user's own) import these from here; the package `mmllm.modalities`
re-exports them and keeps the registry. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

TEXT = "text"  # the core's own input


@dataclasses.dataclass(frozen=True)
class Option:
    """An option a plug-in adds: a modality's to `PrepareConfig` (recorded in the data's preprocessing), a task's
    to `FinetuneConfig`. `low` < value <= `high` is checked by `validate` (None: unchecked); `kind` is the field's
    type name when the default (None: resolved later) does not say it; `choices` are its allowed values."""

    name: str
    default: Any
    help: str
    panel: str = "Model"
    low: float | None = None
    high: float | None = None
    kind: str = ""
    choices: tuple = ()

    def type_name(self) -> str:
        return self.kind or type(self.default).__name__


def flag(name: str) -> str:
    """The command-line flag of an option's name: max_audio_seconds -> --max-audio-seconds."""
    return "--" + name.replace("_", "-")


class Modality:
    """One kind of input. Subclasses set the class attributes and implement `load_encoder` and `decode`."""

    name: str = ""
    columns: tuple[str, ...] = ()  # auto-detected column names (lower case), best first
    extensions: frozenset[str] = frozenset()  # of its files in a folder of class subfolders
    default_model: str = ""
    model_help: str = ""
    options: tuple[Option, ...] = ()
    augment_help: str = ""  # what --augment does to it (one sentence for --augment's help)
    seq_len: int = 16  # tokens stored per item with --sequence-features
    grid: bool = False  # its encoder's sequence is a square spatial map, row by row: stored pooled in 2-D
    parts: tuple[str, ...] = ()  # modalities its files also carry (a soundtrack is audio): see decode_part
    # a part-only modality: it has no column or file of its own; its input is the `encoder_of` part that the
    # files of `carried_by` hold when the record already has that input (a video's soundtrack next to an audio
    # column); it shares that modality's encoder (and --<that>-model), loaded once
    carried_by: str = ""
    encoder_of: str = ""
    transcribable: bool = False  # --transcribe turns it into text (speech)
    fid: bool = False  # eval fid compares files of this modality
    fixed: dict = {}  # its preprocessing that no option changes, as recorded in prepared data (e.g. RGB)

    def column_help(self) -> str:
        shown = ", ".join(self.columns[:3])
        return f"Column with {self.name} paths (auto-detected: {shown}, ...)."

    def load_encoder(self, name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
        """A frozen encoder with `identity`, `dim`, `describe()` and `encode(items) -> (pooled, sequences)`."""
        raise NotImplementedError

    def decode(self, media: str | bytes, encoder: Any, pre: Any) -> Any:
        """The canonical form of one file (a path) or bytes, as its encoder reads it; raises media.MediaError."""
        raise NotImplementedError

    def decode_part(self, part: str, media: str | bytes, encoder: Any, pre: Any) -> Any:
        """The canonical form of the `part` modality a file carries (one of `parts`), as `part`'s `encoder` reads
        it; None: this file has none. A record's own `part` input, when it has one, is used instead."""
        return None

    def sequence_length(self, pre: Any) -> int:
        """Tokens stored per item with --sequence-features (may depend on its options)."""
        return self.seq_len

    def stored_sequence(self, seq: Any, decoded: Any, encoder: Any, pre: Any) -> Any:
        """What --sequence-features stores of the encoder's sequence (T', D) of one decoded item: pooled to
        sequence_length(pre) (in 2-D for a grid)."""
        from mmllm.pooling import pool_sequence

        return pool_sequence(seq, self.sequence_length(pre), self.grid)

    def ragged(self, pre: Any) -> bool:
        """Whether its stored sequences hold a varying number of vectors, the rest zero rows (generation feeds only
        the leading non-zero ones)."""
        return False

    def augment(self, decoded: Any, rng: Any, encoder: Any) -> Any:
        return decoded

    def key_parts(self, pre: Any) -> dict:
        """What else its features depend on, for the feature-cache key (its options that change them)."""
        return {}

    def sample(self) -> Any:
        """A small in-memory value the API's warm-up featurizes (from_memory accepts it)."""
        return None

    def from_memory(self, value: Any) -> Any:
        """What the record reader takes for an in-memory value of the API: paths, bytes and {"bytes", "path"}
        dicts as they are, arrays as the bytes of a file; TypeError / ValueError (the data is never quoted)."""
        if passes(value):
            return os.fspath(value) if isinstance(value, os.PathLike) else value
        raise TypeError(f"{self.name} is a path or bytes, not a {type(value).__name__}")


def is_array(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype")


def passes(value: Any) -> bool:
    """A media value the record reader takes itself."""
    return (isinstance(value, (str, os.PathLike, bytes, bytearray)) or hasattr(value, "save")
            or (isinstance(value, float) and value != value)
            or (isinstance(value, dict) and ("bytes" in value or "path" in value)))
