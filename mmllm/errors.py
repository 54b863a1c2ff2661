"""The one exception type for mistakes a user can fix (bad path, bad flag value, missing column), and the readers of
files whose failures are such mistakes."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Printed as one line on stderr, exit status 2, no traceback (unless --debug)."""

    exit_code = 2


class RecordError(ValueError):
    """A record that cannot be used: which column, which file, why. Read with the others, it is that record's skip
    line; answered with the others (a prompt longer than the model reads), predict and serve give it as that
    record's error and answer the rest."""

    def __init__(self, column: str | None, reason: str, file: str | None = None, record_id: Any = None):
        super().__init__(reason)
        self.column, self.reason, self.file = column, reason, file
        self.record_id = record_id  # the id the bad record gives itself, when it was read (else rowN is used)


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
