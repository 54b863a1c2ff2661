"""The one exception type for mistakes a user can fix (bad path, bad flag value, missing column), and the readers of
files whose failures are such mistakes."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Printed as one line on stderr, exit status 2, no traceback (unless --debug)."""

    exit_code = 2


class RecordError(ValueError):
    """What is wrong with one record's content when it is answered (a prompt longer than the model reads): predict
    and serve report it as that record's error and answer the others; a command that stops on it prints one line
    that names the record (`record`, the id the table knows it by)."""

    def __init__(self, message: str, record: Any = None):
        super().__init__(message)
        self.record = record

    def line(self) -> str:
        return f"record {self.record}: {self}" if self.record is not None else str(self)


def utf8_text(raw: bytes, name: str) -> str:
    """`raw` decoded as UTF-8 (a byte order mark dropped), or a UserError naming `name` and the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "re-save it as UTF-8") from None


MAX_JSON_MB = 64  # mmllm's own JSON files (configs, metadata, markers) are kilobytes: a bigger one is not read


def read_json(path: Any, max_mb: float = MAX_JSON_MB) -> Any:
    """The JSON document of a file mmllm wrote (checkpoint config.json, mmllm-prepared.json, ...): a regular file of
    at most `max_mb` MB (checked before reading), UTF-8, parsed; any failure is a UserError naming the file."""
    import json
    import stat
    from pathlib import Path

    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{p} is not a regular file: expected a JSON file")
    if st.st_size > max_mb * (1 << 20):
        raise UserError(f"{p} is {st.st_size / (1 << 20):.0f} MB, more than the {max_mb:g} MB a JSON file of mmllm "
                        "has: not read (replace it with the file mmllm wrote)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror or e})") from None
    try:
        return json.loads(utf8_text(raw, str(p)))
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply to read (the file was edited or damaged)") from None
    except ValueError as e:
        raise UserError(f"{p}: corrupt JSON ({str(e)[:200]})") from None
